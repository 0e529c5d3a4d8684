"""The README's quickstart, run as written against `lorafleet up`: the demo job visibly learns."""

from __future__ import annotations

import json
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

_JOB_TIMEOUT_S = 900  # ~1-2 min on 2 idle cores; a shared CI machine may be several times slower


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`lorafleet up` on a free port, a private data dir and a private TMPDIR (Ray's cluster file stays
    in it); yields the environment the README exports (`LORAFLEET_BASE_URL`, `LORAFLEET_API_KEY`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    private_tmp = Path(tempfile.mkdtemp(prefix="lf-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_") and k != "RAY_ADDRESS"}
    env["TMPDIR"] = str(private_tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "var")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not any("tenant API key" in line for line in output):
            assert time.monotonic() < deadline, "lorafleet up printed no API key in 180 s:\n" + "".join(output)
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "lorafleet up exited:\n" + "".join(output)
            output.append(line)
        key = re.search(r"tenant API key\s*:\s*(\S+)", "".join(output)).group(1)
        yield {**env, "LORAFLEET_BASE_URL": f"http://127.0.0.1:{port}", "LORAFLEET_API_KEY": key}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        shutil.rmtree(private_tmp, ignore_errors=True)


def _lorafleet(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"lorafleet {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _metrics_events(env: dict[str, str], job_id: str) -> list[dict]:
    """Every metrics event of the job, oldest first (the API pages newest first)."""
    headers = {"Authorization": f"Bearer {env['LORAFLEET_API_KEY']}"}
    url = f"{env['LORAFLEET_BASE_URL']}/v1/fine_tuning/jobs/{job_id}/events"
    events, after = [], None
    while True:
        page = httpx.get(url, headers=headers, params={"limit": 1000, **({"after": after} if after else {})},
                         timeout=30).json()
        events += page["data"]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    return [e["data"] for e in reversed(events) if e.get("type") == "metrics"]


def test_quickstart_job_halves_its_training_loss_and_lowers_validation_loss(stack, tmp_path):
    data = tmp_path / "data"
    _lorafleet(stack, "data", "make-synthetic", str(data))
    printed = _lorafleet(
        stack, "jobs", "create", "--model", "tiny-llama", "--training-file", str(data / "train.jsonl"),
        "--validation-file", str(data / "val.jsonl"), "--suffix", "reverser", "--n-epochs", "3", "--r", "8",
        "--json",
    )
    created = json.loads(printed[re.search(r"^\{", printed, re.MULTILINE).start():])  # after "Uploaded ..." lines
    headers = {"Authorization": f"Bearer {stack['LORAFLEET_API_KEY']}"}
    job_url = f"{stack['LORAFLEET_BASE_URL']}/v1/fine_tuning/jobs/{created['id']}"
    deadline = time.monotonic() + _JOB_TIMEOUT_S
    job = created
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"the quickstart job did not finish in {_JOB_TIMEOUT_S} s: {job}"
        time.sleep(2)
        job = httpx.get(job_url, headers=headers, timeout=30).json()
    assert job["status"] == "succeeded", job

    metrics = _metrics_events(stack, created["id"])
    train = [m["train_loss"] for m in metrics if "train_loss" in m]
    valid = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert len(train) >= 10, metrics
    assert train[-1] <= 0.5 * train[0], f"training loss went from {train[0]:.3f} to {train[-1]:.3f}"
    assert len(valid) >= 2 and valid[-1] < valid[0], f"validation loss: {valid}"
