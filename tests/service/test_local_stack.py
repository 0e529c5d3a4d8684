"""`lorafleet up` starts the whole local stack in one command and stops all of it on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
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


def test_up_serves_the_api_with_a_ready_key_and_stops_cleanly(tmp_path: Path):
    port, data_dir = _free_port(), tmp_path / "var"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port), "--data-dir", str(data_dir)],
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
