"""Event cursors over real HTTP: `after` and `Last-Event-ID` are validated before Redis or a stream sees them."""

from __future__ import annotations

import json

import pytest

from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.settings import make_redis

MAX_ID_PART = 2**64 - 1
TOO_BIG = [f"ftevent-{MAX_ID_PART + 1}-0", f"ftevent-0-{MAX_ID_PART + 1}", "99999999999999999999-0"]


@pytest.fixture
def job_id(api_server, tenant_a, dataset_path) -> str:
    with api_server.client(tenant_a.api_key) as c, open(dataset_path, "rb") as fh:
        file_id = c.post("/v1/files", files={"file": ("train.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
        r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id})
    assert r.status_code == 200, r.text
    return r.json()["id"]


@pytest.fixture
def job_store(api_server):
    client = make_redis(api_server.settings)
    yield JobStore(client)
    client.close()


def _sse_frames(response) -> list[dict]:
    frames, current = [], {}
    for line in response.iter_lines():
        if line == "":
            if "data" in current:
                frames.append(current)
                if current.get("event") in ("end", "error"):
                    return frames
            current = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            current[name] = json.loads(value) if name == "data" else value
    return frames


def test_after_the_first_possible_id_is_an_empty_page(api_server, tenant_a, job_id):
    with api_server.client(tenant_a.api_key) as c:
        for after in ("ftevent-0-0", "0-0", "ftevent-000-00"):
            r = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": after})
            assert r.status_code == 200, (after, r.text)
            assert r.json()["data"] == [] and r.json()["has_more"] is False
        r = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": f"{MAX_ID_PART}-{MAX_ID_PART}"})
        assert r.status_code == 200 and r.json()["data"], r.text  # going backwards from the last id: all


@pytest.mark.parametrize("after", TOO_BIG)
def test_after_with_a_number_beyond_64_bits_is_a_400_naming_after(api_server, tenant_a, job_id, after):
    with api_server.client(tenant_a.api_key) as c:
        for params in ({"after": after}, {"after": after, "stream": "true"}):
            r = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
            assert r.status_code == 400, (params, r.text)
            assert r.json()["error"]["param"] == "after"
        r = c.get(f"/v1/fine_tuning/jobs/{job_id}/events/stream", params={"after": after})
        assert r.status_code == 400 and r.json()["error"]["param"] == "after", r.text


@pytest.mark.parametrize("last_event_id", TOO_BIG)
def test_bad_last_event_id_is_a_400_before_the_stream_starts(api_server, tenant_a, job_id, last_event_id):
    headers = {"Last-Event-ID": last_event_id}
    with api_server.client(tenant_a.api_key) as c:
        for path, params in ((f"/v1/fine_tuning/jobs/{job_id}/events/stream", {}),
                             (f"/v1/fine_tuning/jobs/{job_id}/events", {"stream": "true"})):
            r = c.get(path, params=params, headers=headers)
            assert r.status_code == 400, (path, r.text)
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["param"] == "Last-Event-ID"


def test_stream_resumed_after_the_last_possible_id_ends_cleanly(api_server, tenant_a, job_id, job_store):
    claim = job_store.leases.claim_next_job("worker-1", lease_ms=60_000)
    job_store.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, fine_tuned_model="x:v1")
    headers = {"Last-Event-ID": f"ftevent-{MAX_ID_PART}-{MAX_ID_PART}"}
    with api_server.client(tenant_a.api_key) as c, c.stream(
        "GET", f"/v1/fine_tuning/jobs/{job_id}/events/stream", headers=headers
    ) as response:
        assert response.status_code == 200
        frames = _sse_frames(response)
    assert [f.get("event") for f in frames] == ["job", "end"]  # nothing after that id, and no error frame
