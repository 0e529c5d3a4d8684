"""The API process is killed and restarted under a submit loop: with the OpenAI SDK's retries and an
Idempotency-Key per create, no job is lost and none is created twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_for_port
from tests.service.conftest import OPERATOR_KEY, make_api_settings, write_chat_dataset
from tests.service.test_end_to_end import _settings_env

pytestmark = pytest.mark.slow

N_CREATES = 200
KILL_AFTER = 60  # creates acknowledged before the API is killed


def _start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    wait_for_port(port, timeout_s=60, proc=proc)
    return proc


def test_no_create_is_lost_or_duplicated_when_the_api_restarts_under_a_submit_loop(redis_server, tmp_path):
    from openai import OpenAI

    settings = make_api_settings(tmp_path, redis_server.url)
    env = {**os.environ, **_settings_env(settings)}
    port, log = free_port(), tmp_path / "api.log"
    base = f"http://127.0.0.1:{port}"
    servers = [_start_api(env, port, log)]
    try:
        created = httpx.post(f"{base}/v1/admin/tenants", json={"name": "submitter"},
                             headers={"Authorization": f"Bearer {OPERATOR_KEY}"}, timeout=30)
        assert created.status_code == 200, created.text
        client = OpenAI(base_url=f"{base}/v1", api_key=created.json()["api_key"], max_retries=10, timeout=15)
        dataset = write_chat_dataset(tmp_path / "train.jsonl", 12)
        training_file = client.files.create(file=dataset.open("rb"), purpose="fine-tune").id

        acknowledged: dict[int, str] = {}
        enough_done = threading.Event()

        def restart_api() -> None:
            enough_done.wait(timeout=300)
            servers[-1].send_signal(signal.SIGKILL)  # as a crash would, possibly mid-request
            servers[-1].wait(timeout=10)
            servers.append(_start_api(env, port, log))

        restarter = threading.Thread(target=restart_api, daemon=True)
        restarter.start()
        for i in range(N_CREATES):
            job = client.fine_tuning.jobs.create(
                model="tiny-llama", training_file=training_file, metadata={"i": str(i)},
                extra_headers={"Idempotency-Key": f"submit-loop-{i}"},
            )
            acknowledged[i] = job.id
            if i + 1 == KILL_AFTER:
                enough_done.set()
        restarter.join(timeout=120)
        assert len(servers) == 2, "the API was never restarted: the test proves nothing"

        listed = list(client.fine_tuning.jobs.list(limit=100))
        by_index: dict[str, list[str]] = {}
        for job in listed:
            by_index.setdefault(job.metadata["i"], []).append(job.id)
        duplicated = {i: ids for i, ids in by_index.items() if len(ids) > 1}
        lost = [i for i in range(N_CREATES) if str(i) not in by_index]
        assert not duplicated, f"created twice: {duplicated}"
        assert not lost, f"acknowledged but not stored: {lost}"
        assert len(listed) == N_CREATES
        assert {by_index[str(i)][0] for i in range(N_CREATES)} == set(acknowledged.values())
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
