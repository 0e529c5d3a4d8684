"""/v1/fine_tuning/jobs over real HTTP with the official openai SDK: create, list, get, steer, events, checkpoints.

No worker runs here: jobs wait in the queue, and the running/succeeded shapes are produced by driving
fleet's JobStore the way a dispatcher does.
"""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from fleet import keys
from fleet.job_spec import Hyperparameters, LoraSpec
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.settings import make_redis
from tests.service.conftest import make_api_settings
from workers.spec import lora_config


@pytest.fixture
def uploaded(api_server, tenant_a, dataset_path):
    with open(dataset_path, "rb") as fh:
        return api_server.openai(tenant_a.api_key).files.create(file=fh, purpose="fine-tune")


@pytest.fixture
def job_store(api_server):
    client = make_redis(api_server.settings)
    yield JobStore(client)
    client.close()


def test_create_retrieve_list_cancel_with_the_openai_sdk(api_server, tenant_a, uploaded):
    client = api_server.openai(tenant_a.api_key)
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=uploaded.id,
        suffix="adder",
        seed=7,
        metadata={"team": "nlp"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    )
    assert job.object == "fine_tuning.job"
    assert job.id.startswith("ftjob-")
    assert job.status == "queued"
    assert job.model == "tiny-llama"
    assert job.training_file == uploaded.id
    assert job.organization_id == tenant_a.id
    assert job.seed == 7
    assert job.metadata == {"team": "nlp"}
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 4
    assert job.hyperparameters.learning_rate_multiplier == "auto"
    assert job.method.type == "supervised"
    assert job.fine_tuned_model is None and job.finished_at is None
    extra = job.model_extra
    assert extra["lora"]["r"] == 4 and extra["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert extra["lora"]["quantization"] == "nf4"
    assert extra["queue_position"] is None  # the create response does not estimate it (docs/api.md)
    assert extra["attempt"] == 0

    retrieved = client.fine_tuning.jobs.retrieve(job.id)
    assert retrieved.id == job.id and retrieved.model_extra["queue_position"] == 1
    assert [j.id for j in client.fine_tuning.jobs.list()] == [job.id]

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert cancelled.finished_at is not None
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert any("cancelled" in m for m in messages)
    assert all(e.object == "fine_tuning.job.event" for e in client.fine_tuning.jobs.list_events(job.id))


def test_older_top_level_hyperparameters_and_default_lora(api_server, tenant_a, uploaded):
    client = api_server.openai(tenant_a.api_key)
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id, hyperparameters={"n_epochs": 3}
    )
    assert job.hyperparameters.n_epochs == 3
    assert job.seed is not None  # drawn when not given, so the run is reproducible
    lora = job.model_extra["lora"]
    assert lora["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_all_linear_expands_to_the_models_linear_layers(api_server, tenant_a, uploaded):
    with api_server.client(tenant_a.api_key) as c:
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": uploaded.id, "lora": {"target_modules": "all-linear"}})
    assert r.status_code == 200, r.text
    assert "down_proj" in r.json()["lora"]["target_modules"]


@pytest.mark.parametrize("target_modules", ["all-linear", ["all-linear"]])
def test_all_linear_on_a_hub_id_catalog_model_is_passed_on_to_the_engine(start_api_server, tmp_path, redis_server,
                                                                          dataset_path, target_modules):
    # A catalog entry given as a hub id: its layer names are unknown to the API (no local config.json).
    catalog = {"hub-model": {"path": "some-org/some-model", "quantization": "none", "max_rank": 64}}
    server = start_api_server(make_api_settings(tmp_path, redis_server.url, catalog=catalog))
    tenant = server.create_tenant("hub")
    with server.client(tenant.api_key) as c:
        uploaded = c.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("train.jsonl", dataset_path.read_bytes())})
        r = c.post("/v1/fine_tuning/jobs", json={"model": "hub-model", "training_file": uploaded.json()["id"],
                                                 "lora": {"target_modules": target_modules}})
    assert r.status_code == 200, r.text
    assert r.json()["lora"]["target_modules"] == "all-linear"
    spec = LoraSpec(**{k: v for k, v in r.json()["lora"].items() if k != "quantization"})
    assert lora_config(spec).target_modules == "all-linear"  # what the engine will build


# (patch to a valid body, the param the 400 names, fragments its message contains)
INVALID_CREATES = [
        ({"model": "gpt-9"}, "model", ["gpt-9", "tiny-llama"]),
        ({"training_file": "file-missing"}, "training_file", ["file-missing"]),
        ({"validation_file": "file-missing"}, "validation_file", ["file-missing"]),
        ({"lora": {"r": 0}}, "lora.r", ["greater than 0"]),
        ({"lora": {"r": -3}}, "lora.r", ["greater than 0"]),
        ({"lora": {"r": 128}}, "lora.r", ["128", "64"]),
        ({"lora": {"target_modules": ["q_proj", "qq_proj"]}}, "lora.target_modules", ["qq_proj", "down_proj"]),
        ({"lora": {"dropout": 1.5}}, "lora.dropout", ["less than 1"]),
        ({"lora": {"quantization": "fp3"}}, "lora.quantization", ["nf4"]),
        ({"suffix": "../../etc"}, "suffix", ["'..'"]),
        ({"suffix": "a/b"}, "suffix", ["a/b"]),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", ["16"]),
        ({"method": {"type": "dpo"}}, "method.type", ["supervised"]),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", ["n_epochs"]),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size", ["batch_size"]),
        ({"learning_rate": 1}, "learning_rate", ["Unrecognized"]),
        ({"training_file": None}, "training_file", ["training_file"]),
]


def test_invalid_create_requests_get_400_naming_the_field(api_server, tenant_a, uploaded):
    with api_server.client(tenant_a.api_key) as c:
        for patch, param, fragments in INVALID_CREATES:
            r = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": uploaded.id, **patch})
            assert r.status_code == 400, (patch, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (patch, error)
            for fragment in fragments:
                assert fragment in error["message"], (patch, error)
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []  # nothing was queued


@pytest.mark.parametrize("number", [b"1e999", b"Infinity", b"-Infinity", b"NaN"])
def test_non_finite_numbers_are_refused_naming_the_field(api_server, tenant_a, uploaded, number):
    # Python's JSON parser reads 1e999 as inf and accepts NaN/Infinity: an adapter scaled by inf trains NaNs.
    body = b'{"model": "tiny-llama", "training_file": "%s", "lora": {"alpha": %s}}' % (uploaded.id.encode(), number)
    with api_server.client(tenant_a.api_key) as c:
        r = c.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "lora.alpha" and "finite" in r.json()["error"]["message"]


def test_unknown_model_through_the_sdk_raises_bad_request(api_server, tenant_a, uploaded):
    client = api_server.openai(tenant_a.api_key)
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="nope", training_file=uploaded.id)
    assert info.value.param == "model"
    assert "tiny-llama" in info.value.message


def test_malformed_json_bodies_get_400(api_server, tenant_a):
    cases = [(b'{"model": "tiny-llama", ', "JSON"), (b"[1, 2]", "JSON object"), (b"", "body"),
             (b"\xff\xfe", "JSON"), (b'{"model": "\xff"}', "can't decode byte 0xff"),
             (b'{"seed": ' + b"9" * 5000 + b"}", "5000 digits")]
    with api_server.client(tenant_a.api_key) as c:
        for content, fragment in cases:
            r = c.post("/v1/fine_tuning/jobs", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (content, r.text)
            assert fragment in r.json()["error"]["message"], (content, r.text)


def test_idempotency_key_returns_one_job_and_409_for_another_body(api_server, tenant_a, uploaded):
    body = {"model": "tiny-llama", "training_file": uploaded.id, "suffix": "once"}
    headers = {"Idempotency-Key": "create-1"}
    with api_server.client(tenant_a.api_key) as c:
        first = c.post("/v1/fine_tuning/jobs", json=body, headers=headers)
        again = c.post("/v1/fine_tuning/jobs", json=body, headers=headers)
        other = c.post("/v1/fine_tuning/jobs", json={**body, "suffix": "twice"}, headers=headers)
        listed = c.get("/v1/fine_tuning/jobs").json()["data"]
    assert first.status_code == 200 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert other.status_code == 409
    assert other.json()["error"]["param"] == "Idempotency-Key"
    assert [j["id"] for j in listed] == [first.json()["id"]]


def test_idempotent_replay_returns_the_job_even_after_its_training_file_is_deleted(api_server, tenant_a, uploaded):
    body = {"model": "tiny-llama", "training_file": uploaded.id}
    headers = {"Idempotency-Key": "create-then-delete"}
    with api_server.client(tenant_a.api_key) as c:
        first = c.post("/v1/fine_tuning/jobs", json=body, headers=headers)
        assert first.status_code == 200, first.text
        assert c.delete(f"/v1/files/{uploaded.id}").status_code == 200
        again = c.post("/v1/fine_tuning/jobs", json=body, headers=headers)
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["Idempotent-Replayed"] == "true"
        other = c.post("/v1/fine_tuning/jobs", json={**body, "suffix": "x"}, headers=headers)
        assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
        fresh = c.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "new-key"})
        assert fresh.status_code == 400 and fresh.json()["error"]["param"] == "training_file"


def test_list_paginates_and_filters_on_metadata(api_server, tenant_a, uploaded):
    client = api_server.openai(tenant_a.api_key)
    ids = [
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id,
                                       metadata={"team": "a" if i % 2 else "b", "i": str(i)}).id
        for i in range(5)
    ]
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(limit=2)] == ids[::-1]
    after = client.fine_tuning.jobs.list(limit=2, after=ids[3])
    assert [j.id for j in after.data] == [ids[2], ids[1]]
    team_a = client.fine_tuning.jobs.list(metadata={"team": "a"})
    assert [j.id for j in team_a.data] == [ids[3], ids[1]]
    with api_server.client(tenant_a.api_key) as c:
        r = c.get("/v1/fine_tuning/jobs", params={"metadata[team]": "b", "metadata[i]": "2"})
        assert [j["id"] for j in r.json()["data"]] == [ids[2]]
        assert c.get("/v1/fine_tuning/jobs", params={"limit": 0}).status_code == 400
        assert c.get("/v1/fine_tuning/jobs", params={"after": "ftjob-nope"}).status_code == 400


def test_queue_position_follows_the_queue(api_server, tenant_a, uploaded):
    client = api_server.openai(tenant_a.api_key)
    jobs = [client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id) for _ in range(3)]
    assert [client.fine_tuning.jobs.retrieve(j.id).model_extra["queue_position"] for j in jobs] == [1, 2, 3]
    client.fine_tuning.jobs.cancel(jobs[0].id)
    assert client.fine_tuning.jobs.retrieve(jobs[2].id).model_extra["queue_position"] == 2


def _snapshot_reads(redis_client, list_page) -> int:
    """How many times serving `list_page()` read the scheduler's state for queue estimates (SMEMBERS of
    the tenants holding GPUs: once per fleet.scheduler_view.estimate_queue)."""
    redis_client.config_resetstat()
    list_page()
    return int(redis_client.info("commandstats").get("cmdstat_smembers", {}).get("calls", 0))


def test_listing_jobs_reads_the_queues_once_per_request_not_per_job(api_server, tenant_a, uploaded, job_store):
    with api_server.client(tenant_a.api_key) as c:
        for _ in range(6):
            assert c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": uploaded.id}
                          ).status_code == 200
        one = _snapshot_reads(job_store.redis, lambda: c.get("/v1/fine_tuning/jobs?limit=1"))
        page = c.get("/v1/fine_tuning/jobs?limit=6").json()["data"]
        six = _snapshot_reads(job_store.redis, lambda: c.get("/v1/fine_tuning/jobs?limit=6"))
    assert sorted(j["queue_position"] for j in page) == [1, 2, 3, 4, 5, 6]
    assert six == one == 1


def test_creating_a_job_does_not_replay_the_scheduler_policy(api_server, tenant_a, uploaded, job_store):
    """The position estimate is paid by GET and list, not by every submission (bench/api_submit.py)."""
    body = {"model": "tiny-llama", "training_file": uploaded.id}
    with api_server.client(tenant_a.api_key) as c:
        assert c.post("/v1/fine_tuning/jobs", json=body).status_code == 200  # the first one loads the scripts
        reads = _snapshot_reads(job_store.redis, lambda: c.post("/v1/fine_tuning/jobs", json=body))
    assert reads == 0


def test_pause_and_resume_a_queued_job(api_server, tenant_a, uploaded):
    client = api_server.openai(tenant_a.api_key)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.ConflictError) as info:
        client.fine_tuning.jobs.resume(job.id)
    assert "cancelled" in info.value.message


def test_running_and_succeeded_shapes_events_and_checkpoints(api_server, tenant_a, uploaded, job_store):
    client = api_server.openai(tenant_a.api_key)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, suffix="adder")
    claim = job_store.leases.claim_next_job("worker-1", lease_ms=60_000)
    assert claim is not None and claim.job.id == job.id
    job_store.leases.record_progress(claim.fence, step=5, total_steps=20, eta_s=30.0,
                              metrics={"train_loss": 1.25})
    job_store.append_event(job.id, "info", "step 5/20", {"step": 5, "train_loss": 1.25}, type="metrics")
    job_store.leases.record_checkpoint(claim.fence, 5, "checkpoints/5", {"train_loss": 1.25, "eval_loss": 1.5})
    job_store.leases.record_checkpoint(claim.fence, 10, "checkpoints/10", {"train_loss": 0.75})

    running = client.fine_tuning.jobs.retrieve(job.id)
    assert running.status == "running"
    assert running.estimated_finish is not None
    assert running.model_extra["progress"] == {
        "step": 5, "total_steps": 20, "percent": 25.0, "eta_seconds": 30.0, "epoch": None,
        "metrics": {"train_loss": 1.25},
    }
    assert running.model_extra["queue_position"] is None
    assert running.model_extra["attempt"] == 1

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints] == [10, 5]
    first = checkpoints.data[1]
    assert first.object == "fine_tuning.job.checkpoint"
    assert first.fine_tuning_job_id == job.id
    assert first.metrics.train_loss == 1.25 and first.metrics.valid_loss == 1.5 and first.metrics.step == 5
    assert first.fine_tuned_model_checkpoint == f"{job.id}:ckpt-step-5"
    page = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert len(page.data) == 1 and page.has_more

    job_store.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, fine_tuned_model="adder:v1",
                         trained_tokens=1234)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded"
    assert done.fine_tuned_model == "adder:v1"
    assert done.trained_tokens == 1234
    assert done.finished_at is not None

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed."  # newest first
    metrics_events = [e for e in events if e.type == "metrics"]
    assert metrics_events and metrics_events[0].data == {"step": 5, "train_loss": 1.25}
    paged = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.id for e in paged.data] == [e.id for e in events[:2]] and paged.has_more

    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.cancel(job.id)


def _read_sse(response, until_event: str = "end"):
    frames, current = [], {}
    for line in response.iter_lines():
        if line == "":
            if "data" in current:
                frames.append(current)
                if current.get("event") == until_event:
                    return frames
            current = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(": ")
        current[name] = json.loads(value) if name == "data" else value
    return frames


def test_event_stream_delivers_backlog_live_events_and_the_end(api_server, tenant_a, uploaded, job_store):
    client = api_server.openai(tenant_a.api_key)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, suffix="live")
    claim = job_store.leases.claim_next_job("worker-1", lease_ms=60_000)

    def worker():
        time.sleep(0.5)
        for step in (1, 2):
            job_store.append_event(job.id, "info", f"step {step}", {"step": step, "train_loss": 1.0 / step},
                                   type="metrics")
            job_store.leases.record_progress(claim.fence, step=step, total_steps=2)
            time.sleep(0.2)
        job_store.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, fine_tuned_model="live:v1")

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        with api_server.client(tenant_a.api_key) as c, c.stream(
            "GET", f"/v1/fine_tuning/jobs/{job.id}/events", params={"stream": "true"}
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            frames = _read_sse(response)
    finally:
        thread.join()
    assert frames[0]["event"] == "job" and frames[0]["data"]["status"] == "running"
    events = [f for f in frames if "event" not in f]
    messages = [f["data"]["message"] for f in events]
    assert messages[0].startswith("Created fine-tuning job")  # the backlog, oldest first
    assert "step 1" in messages and "step 2" in messages
    assert messages[-1] == "The job has successfully completed."
    assert all(f["id"] == f["data"]["id"] for f in events)
    assert frames[-1]["event"] == "end"
    assert frames[-1]["data"]["status"] == "succeeded"
    assert frames[-1]["data"]["fine_tuned_model"] == "live:v1"

    # Reconnecting with Last-Event-ID replays only what came after it.
    last_seen = events[-2]["id"]
    with api_server.client(tenant_a.api_key) as c, c.stream(
        "GET", f"/v1/fine_tuning/jobs/{job.id}/events/stream", headers={"Last-Event-ID": last_seen}
    ) as response:
        replay = _read_sse(response)
    assert [f["data"]["message"] for f in replay if "event" not in f] == [messages[-1]]


def test_a_small_file_serves_as_validation_but_not_as_training_file(api_server, tenant_a, uploaded, make_chat_dataset):
    client = api_server.openai(tenant_a.api_key)
    with open(make_chat_dataset("small.jsonl", n=3), "rb") as fh:
        small = client.files.create(file=fh, purpose="fine-tune")
    assert small.status_details == "3 examples (chat format)"
    with pytest.raises(openai.BadRequestError) as info:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=small.id)
    assert info.value.param == "training_file" and "at least 10" in info.value.message
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id, validation_file=small.id)
    assert job.validation_file == small.id


def test_naming_an_adapter_version_as_model_continues_it(api_server, tenant_a, tenant_b, uploaded,
                                                        peft_adapter_archive):
    with api_server.client(tenant_a.api_key) as c:
        imported = c.post("/v1/adapters", files={"file": ("a.tar.gz", peft_adapter_archive)},
                          data={"name": "helper", "base_model": "tiny-llama"})
        assert imported.status_code == 200, imported.text

        job = c.post("/v1/fine_tuning/jobs", json={"model": "helper:v1", "training_file": uploaded.id})
        assert job.status_code == 200, job.text
        body = job.json()
        assert (body["model"], body["base_model"], body["init_adapter"]) == ("helper:v1", "tiny-llama", "helper:v1")
        lora = body["lora"]
        assert (lora["r"], lora["alpha"], lora["dropout"], lora["quantization"]) == (4, 8, 0.0, "nf4")
        latest = c.post("/v1/fine_tuning/jobs", json={"model": "helper", "training_file": uploaded.id}).json()
        assert latest["init_adapter"] == "helper:v1"  # a bare name means its latest version

        reshaped = c.post("/v1/fine_tuning/jobs",
                          json={"model": "helper:v1", "training_file": uploaded.id, "lora": {"r": 16}})
        assert reshaped.status_code == 400 and reshaped.json()["error"]["param"] == "lora"
        for missing in ("helper:v9", "nobody:v1"):
            r = c.post("/v1/fine_tuning/jobs", json={"model": missing, "training_file": uploaded.id})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "model" and "tiny-llama" in r.json()["error"]["message"]
    with api_server.client(tenant_b.api_key) as c:  # another tenant's version is as unknown as a missing one
        r = c.post("/v1/fine_tuning/jobs", json={"model": "helper:v1", "training_file": "file-x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_the_request_is_stored_as_a_typed_job_spec(api_server, tenant_a, uploaded, job_store):
    client = api_server.openai(tenant_a.api_key)
    created = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
        extra_body={"lora": {"r": 4, "target_modules": ["q_proj"], "quantization": "none"},
                    "resources": {"gpus": 1}, "priority": "low"},
    )
    spec = job_store.get_job(tenant_a.id, created.id).spec
    assert spec.hyperparameters == Hyperparameters(batch_size=2)
    assert (spec.lora.r, spec.lora.target_modules, spec.quantization) == (4, ["q_proj"], "none")
    assert (spec.resources.total_gpus, spec.priority) == (1, "low")


def test_a_job_stored_before_jobspec_renders_as_it_did(api_server, tenant_a, job_store):
    job_id = job_store.create_job(tenant_a.id, model="tiny-llama", training_file="file-x").job.id
    old_hyperparameters = {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}
    old_lora = {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj"], "use_rslora": False,
                "use_dora": False, "quantization": "nf4"}
    job_store.redis.hdel(keys.job(job_id), "spec")
    job_store.redis.hset(keys.job(job_id), mapping={
        "hyperparameters": json.dumps(old_hyperparameters), "lora": json.dumps(old_lora),
        "method": json.dumps({"type": "supervised", "supervised": {"hyperparameters": old_hyperparameters}}),
        "resources": json.dumps({"workers": 1, "gpus_per_worker": 1}), "priority": "normal"})
    job = api_server.openai(tenant_a.api_key).fine_tuning.jobs.retrieve(job_id)
    assert job.hyperparameters.model_dump() == old_hyperparameters
    assert job.method.supervised.hyperparameters.model_dump() == old_hyperparameters
    assert job.model_extra["lora"] == old_lora
