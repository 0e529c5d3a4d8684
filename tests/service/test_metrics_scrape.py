"""Both /metrics endpoints scraped over real HTTP while a job trains: the API's (the scheduler's state
read from Redis) and the dispatcher's own (training series), with a real `lorafleet worker` process,
which logs JSON lines naming the job it runs."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.test_end_to_end import e2e, synthetic  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

Series = dict[tuple[str, tuple], float]


def _parse(text: str) -> Series:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 240.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _create_job(client: Any, train_id: str, suffix: str) -> Any:
    return client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=train_id, suffix=suffix, seed=5,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 20, "batch_size": 2}}},
        extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    )


def test_metrics_of_the_api_and_the_dispatcher_during_a_running_job(e2e, synthetic, tmp_path):  # noqa: F811
    port = _free_port()
    server, dispatchers = e2e(metrics_port=port, log_format="json")
    tenant = server.create_tenant("team-metrics")
    with server.admin() as admin:  # one job at a time: the second waits in the tenant's queue
        assert admin.put(f"/v1/admin/tenants/{tenant.id}/quota", json={"max_running_jobs": 1}).status_code == 200
    client = server.openai(tenant.api_key)
    train = client.files.create(file=synthetic[0].open("rb"), purpose="fine-tune")
    running = _create_job(client, train.id, "runs")
    waiting = _create_job(client, train.id, "waits")
    dispatchers.start("dispatcher-metrics")
    dispatcher_url = f"http://127.0.0.1:{port}/metrics"

    def dispatcher_series() -> Series | None:
        try:
            series = _parse(httpx.get(dispatcher_url, timeout=5).text)
        except httpx.TransportError:
            return None  # not serving yet
        return series if series.get(("lorafleet_training_step_seconds_count", ()), 0) > 0 else None

    trained = _wait_for(dispatcher_series, "the dispatcher's /metrics to show timed steps")
    with server.admin() as admin:
        api = _parse(admin.get("/metrics").text)
    assert client.fine_tuning.jobs.retrieve(running.id).status == "running"
    assert client.fine_tuning.jobs.retrieve(waiting.id).status == "queued"

    t = (("tenant", tenant.id),)
    assert api[("lorafleet_queue_depth", t)] == 1
    assert api[("lorafleet_queue_oldest_wait_seconds", t)] > 0
    assert api[("lorafleet_jobs", (("state", "running"),))] >= 1
    assert api[("lorafleet_jobs", (("state", "queued"),))] >= 1
    assert api[("lorafleet_job_status_changes_total", (("status", "running"),))] >= 1
    assert api[("lorafleet_job_status_changes_total", (("status", "queued"),))] >= 2
    assert api[("lorafleet_tenant_jobs_running", t)] == 1
    assert api[("lorafleet_tenant_gpus_allocated", t)] >= 1
    assert api[("lorafleet_tenant_gpus_nominal_quota", t)] == 0
    assert api[("lorafleet_tenant_gpus_borrowed", t)] == api[("lorafleet_tenant_gpus_allocated", t)]
    assert api[("lorafleet_cluster_gpus", ())] == 4  # the session's Ray cluster declares 4
    assert api[("lorafleet_cluster_gpus_allocated", ())] >= 1
    assert api[("lorafleet_cluster_gpus_free", ())] == 4 - api[("lorafleet_cluster_gpus_allocated", ())]
    assert any(name == "lorafleet_http_request_duration_seconds_count" for name, _ in api)

    job = (("job", running.id), ("tenant", tenant.id))
    assert trained[("lorafleet_dispatcher_jobs_running", ())] >= 1
    assert trained[("lorafleet_training_step_seconds_sum", ())] > 0
    assert trained[("lorafleet_training_tokens_per_second", job)] > 0
    assert ("lorafleet_checkpoint_upload_seconds_count", ()) in trained

    client.fine_tuning.jobs.cancel(waiting.id)
    client.fine_tuning.jobs.cancel(running.id)
    _wait_for(lambda: client.fine_tuning.jobs.retrieve(running.id).status == "cancelled", "the cancel", 60)
    _wait_for(lambda: ("lorafleet_training_tokens_per_second", job)
              not in _parse(httpx.get(dispatcher_url, timeout=5).text),
              "the ended job's series to leave the dispatcher's /metrics", 30)

    dispatchers.stop_all()
    lines = [json.loads(line) for line in (tmp_path / "dispatcher-metrics.log").read_text().splitlines()
             if line.startswith("{")]
    of_the_job = [line for line in lines if line.get("job_id") == running.id]
    assert of_the_job, lines[-20:]
    assert all(line["tenant_id"] == tenant.id and {"time", "level", "logger", "message"} <= line.keys()
               for line in of_the_job)
