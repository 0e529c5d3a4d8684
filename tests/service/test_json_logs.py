"""LORAFLEET_LOG_FORMAT=json: one JSON object per line, naming the job and tenant being handled (the
API's request handling here; the dispatcher's lines in test_metrics_scrape.py)."""

from __future__ import annotations

import io
import json
import logging

import pytest

from fleet.log_format import JobContextFilter, JsonFormatter, WorkerLogging
from tests.service.conftest import make_api_settings


@pytest.fixture
def json_lines():
    """Records of this process (the API server runs in a thread here) as fleet.log_format writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    root.removeHandler(handler)
    root.setLevel(level)


def test_a_job_request_logs_json_lines_naming_the_tenant(tmp_path, redis_server, start_api_server, dataset_path,
                                                         json_lines):
    server = start_api_server(make_api_settings(tmp_path, redis_server.url, log_format="json"))
    tenant = server.create_tenant("team-logs")
    with dataset_path.open("rb") as fh:
        uploaded = server.openai(tenant.api_key).files.create(file=fh, purpose="fine-tune")
    with server.client(tenant.api_key) as c:
        r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": uploaded.id})
        assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    created = [line for line in json_lines() if job_id in line["message"]]
    assert created, json_lines()
    line = created[0]
    assert line["tenant_id"] == tenant.id
    assert line["level"] == "INFO" and line["logger"] == "service.routes.jobs" and line["time"].endswith("+00:00")


def test_a_training_worker_logs_json_lines_naming_its_job(capfd):
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        WorkerLogging("json", "ftjob-w1", "tenant-w").apply()  # what workers.ray_train's worker function does
        logging.getLogger("workers.loop").info("step %d", 3)
        line = json.loads(capfd.readouterr().err.strip().splitlines()[-1])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert line["message"] == "step 3" and line["logger"] == "workers.loop"
    assert line["job_id"] == "ftjob-w1" and line["tenant_id"] == "tenant-w"
