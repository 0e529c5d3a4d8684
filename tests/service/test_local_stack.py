"""`lorafleet up` starts the whole local stack in one command and stops all of it on SIGTERM."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_in(directory: Path) -> set[int]:
    """Pids of processes whose working directory is `directory` (redis-server chdirs to its --dir)."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid"]):
        try:
            if Path(proc.cwd()) == directory:
                found.add(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _processes_mentioning(text: str) -> set[int]:
    import psutil

    found = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if text in " ".join(proc.info["cmdline"] or []):
            found.add(proc.pid)
    return found


@pytest.fixture
def private_tmpdir() -> Iterator[Path]:
    """A TMPDIR of the test's own (short: Ray's socket paths live under it), removed afterwards, so
    that a Ray cluster file written there can never be left behind for other runs."""
    path = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _up_env(tmpdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_") and k != "RAY_ADDRESS"}
    env["TMPDIR"] = str(tmpdir)
    return env


def _assert_dispatcher_sees_logical_gpus(redis_pids: set[int], gpus: int, timeout_s: float = 60.0) -> None:
    """The local Ray node declares `gpus` logical GPUs, and the dispatcher records them as the cluster's."""
    import psutil
    import redis

    from fleet.capacity import CapacityStore

    (port,) = {c.laddr.port for pid in redis_pids for c in psutil.Process(pid).net_connections("inet")
               if c.status == psutil.CONN_LISTEN}
    capacity = CapacityStore(redis.Redis(port=port, decode_responses=True))
    deadline = time.monotonic() + timeout_s
    while capacity.total_gpus() != gpus:
        assert time.monotonic() < deadline, f"capacity {capacity.total_gpus()} GPUs, expected {gpus}"
        time.sleep(0.2)


def _wait_gone(pids: set[int], what: str, timeout_s: float = 20.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"}
        time.sleep(0.2)
    assert not alive, f"{what} outlived the stack: {sorted(alive)}"


def test_up_serves_the_api_with_a_ready_key_and_stops_cleanly(tmp_path: Path, private_tmpdir: Path):
    port, data_dir = _free_port(), tmp_path / "var"
    # A cluster a past `ray start` recorded, long gone: `up` must start its own Ray, not wait for that one.
    (private_tmpdir / "ray").mkdir()
    (private_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}\n")
    env = _up_env(private_tmpdir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port), "--data-dir", str(data_dir),
         "--accelerators", "3"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not any("lorafleet is up" in line for line in output):
            assert time.monotonic() < deadline, "".join(output)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(output)
            output.append(line)
        while not any("tenant API key" in line for line in output):
            output.append(proc.stdout.readline())
        key = re.search(r"tenant API key\s*:\s*(\S+)", "".join(output)).group(1)

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
        models = httpx.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert models.status_code == 200, models.text
        assert "tiny-llama" in [m["id"] for m in models.json()["data"]]
        assert (data_dir / "models" / "tiny-llama" / "model.safetensors").is_file()
        assert (data_dir / "redis" / "appendonlydir").is_dir()  # AOF under the data dir
        redis_pids = _processes_in((data_dir / "redis").resolve())
        assert redis_pids, "no redis-server runs in the data dir"
        _assert_dispatcher_sees_logical_gpus(redis_pids, 3)
        children = _processes_mentioning(str(data_dir)) - {proc.pid}
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest or "")
    assert proc.returncode == 0, "".join(output)
    assert "stack stopped" in "".join(output)
    time.sleep(0.5)
    assert not _processes_in((data_dir / "redis").resolve()), "redis-server outlived the stack"
    assert not (_processes_mentioning(str(data_dir)) & children), "a child process outlived the stack"
    _wait_gone(_processes_mentioning(str(private_tmpdir)), "a Ray process")


def test_sigterm_during_start_up_leaves_no_child_alive(tmp_path: Path, private_tmpdir: Path):
    data_dir = tmp_path / "var"
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(_free_port()), "--data-dir", str(data_dir)],
        env=_up_env(private_tmpdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    redis_dir = data_dir / "redis"
    try:
        deadline = time.monotonic() + 60
        while not (redis_dir.is_dir() and _processes_in(redis_dir.resolve())):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "redis-server of the stack never started"
            time.sleep(0.05)
        started = _processes_mentioning(str(data_dir)) | _processes_mentioning(str(private_tmpdir))
    finally:
        proc.send_signal(signal.SIGTERM)  # start-up is still under way: the API is not up yet
        output, _ = proc.communicate(timeout=60)
    assert "lorafleet is up" not in output, "start-up finished before the signal; the test proves nothing"
    assert "stack stopped" in output, output
    _wait_gone(_processes_in(redis_dir.resolve()), "redis-server")
    _wait_gone(started - {proc.pid}, "a child process")
    _wait_gone(_processes_mentioning(str(data_dir)) | _processes_mentioning(str(private_tmpdir)), "a process")


def test_a_worker_without_ray_address_starts_its_own_ray_despite_a_stale_cluster_file(
        tmp_path: Path, private_tmpdir: Path, redis_server):
    (private_tmpdir / "ray").mkdir()
    (private_tmpdir / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}\n")
    env = {**_up_env(private_tmpdir), "LORAFLEET_REDIS_URL": redis_server.url,
           "LORAFLEET_DATA_DIR": str(tmp_path / "var")}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--worker-id", "solo"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("joined Ray at" in line for line in output):
            assert time.monotonic() < deadline, "the worker did not start Ray within 120 s:\n" + "".join(output)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(output)
            output.append(line)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    _wait_gone(_processes_mentioning(str(private_tmpdir)), "a Ray process of the worker")
