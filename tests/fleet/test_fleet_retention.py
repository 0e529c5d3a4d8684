"""Retention on a real redis-server and a local object store, with an injected clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fleet import keys
from fleet.checkpoints import upload_checkpoint
from fleet.exceptions import CancelRequested, NotFound
from fleet.jobs import JobStatus
from fleet.objectstore import LocalObjectStore
from fleet.queue import JobStore
from fleet.registry import AdapterRegistry
from fleet.retention import RetentionReport, job_objects_prefix, run_retention
from fleet.settings import Settings

DAY_S = 86_400
FIELDS = {"base_model": "tiny-llama", "lora_config": {"r": 2}}
SETTINGS = Settings(
    retention_job_days=30, retention_checkpoint_days=7, retention_upload_grace_s=3600, retention_events_max_len=10
)


@pytest.fixture
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


@pytest.fixture
def jobs(r) -> JobStore:
    return JobStore(r)


@pytest.fixture
def registry(r, store) -> AdapterRegistry:
    return AdapterRegistry(r, store)


def make_peft_dir(path: Path) -> Path:
    """A minimal PEFT-layout LoRA adapter (one module) written with the real safetensors writer."""
    path.mkdir(parents=True)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{module}.lora_A.weight": np.ones((2, 8), np.float32),
               f"{module}.lora_B.weight": np.zeros((8, 2), np.float32)}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}'
    )
    return path


def _checkpoint(jobs, store, claim, step: int, tmp_path: Path) -> str:
    local = tmp_path / f"ckpt-{claim.job.id}-{step}"
    local.mkdir()
    (local / "optimizer.pt").write_bytes(b"x" * 100)
    location = upload_checkpoint(store, "t1", claim.job.id, step, local, fence=claim.fence)
    jobs.leases.record_checkpoint(claim.fence, step, location)
    return location


def _trained_and_published(jobs, registry, store, tmp_path) -> tuple[str, list[str]]:
    jobs.create_job("t1", model="tiny-llama", training_file="file-x", idempotency_key="once")
    claim = jobs.leases.claim_next_job("w", 60_000)
    locations = [_checkpoint(jobs, store, claim, step, tmp_path) for step in (10, 20, 30)]
    for i in range(30):
        jobs.leases.append_event(claim.fence, "info", f"step {i}", type="metrics")
    ref = registry.publish_adapter_version("t1", "a", make_peft_dir(tmp_path / "adapter"), FIELDS, fence=claim.fence)
    jobs.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, fine_tuned_model=ref)
    # what a stale attempt of the job left behind: an upload no manifest names
    store.put_bytes("tenants/t1/adapters/a/v1/a7/adapter_model.safetensors", b"stale")
    return claim.job.id, locations


def test_a_finished_job_is_cleaned_up_in_stages_and_its_version_stays(jobs, registry, store, r, tmp_path):
    job_id, locations = _trained_and_published(jobs, registry, store, tmp_path)
    jobs.create_job("t1", model="tiny-llama", training_file="file-x")
    running = jobs.leases.claim_next_job("w2", 60_000)  # never touched: it has not finished
    _checkpoint(jobs, store, running, 5, tmp_path)
    finished_at = jobs.load_job(job_id).finished_at

    assert run_retention(r, store, SETTINGS, now=finished_at + 60) == RetentionReport()

    swept = run_retention(r, store, SETTINGS, now=finished_at + 3600 + 1)
    assert (swept.uploads_swept, swept.checkpoints_deleted, swept.jobs_expired) == (1, 0, 0)
    assert not store.exists("tenants/t1/adapters/a/v1/a7/adapter_model.safetensors")
    registry.download_version("t1", "a:v1", tmp_path / "dl1")  # checks every file of the version

    pruned = run_retention(r, store, SETTINGS, now=finished_at + 7 * DAY_S + 1)
    assert (pruned.checkpoints_deleted, pruned.objects_deleted, pruned.jobs_expired) == (2, 2, 0)
    assert [c.step for c in jobs.list_checkpoints(job_id)] == [30]  # the final checkpoint is kept
    assert [bool(store.list(loc)) for loc in locations] == [False, False, True]
    assert r.xlen(keys.job_events(job_id)) == 10
    assert jobs.get_job("t1", job_id).status == JobStatus.SUCCEEDED

    expired = run_retention(r, store, SETTINGS, now=finished_at + 30 * DAY_S + 1)
    assert (expired.jobs_expired, expired.objects_deleted) == (1, 1)
    with pytest.raises(NotFound):
        jobs.get_job("t1", job_id)
    assert [j.id for j in jobs.list_jobs("t1")[0]] == [running.job.id]
    assert not r.exists(keys.job_events(job_id), keys.job_checkpoints(job_id), keys.job_publication(job_id))
    assert store.list(job_objects_prefix("t1", job_id)) == []
    assert [v.ref for v in registry.list_versions("t1", "a")] == ["a:v1"]  # the adapter outlives the job
    registry.download_version("t1", "a:v1", tmp_path / "dl2")
    assert [c.step for c in jobs.list_checkpoints(running.job.id)] == [5]
    # the creating request's Idempotency-Key no longer names the deleted job: a replay creates anew
    replay = jobs.create_job("t1", model="tiny-llama", training_file="file-x", idempotency_key="once")
    assert replay.created and replay.job.id != job_id
    assert run_retention(r, store, SETTINGS, now=finished_at + 60 * DAY_S) == RetentionReport()


def test_a_version_that_never_committed_is_swept_whole(jobs, registry, store, r, tmp_path):
    jobs.create_job("t1", model="tiny-llama", training_file="file-x")
    claim = jobs.leases.claim_next_job("w", 60_000)
    real_put_file = store.put_file

    def cancel_during_last_upload(key, path):
        real_put_file(key, path)
        if key.endswith(".safetensors"):
            jobs.request_cancel("t1", claim.job.id)

    store.put_file = cancel_during_last_upload
    with pytest.raises(CancelRequested):
        registry.publish_adapter_version("t1", "a", make_peft_dir(tmp_path / "adapter"), FIELDS, fence=claim.fence)
    jobs.leases.finish_job(claim.fence, JobStatus.CANCELLED)
    assert store.list("tenants/t1/adapters/a/v1/")  # uploaded, never committed
    finished_at = jobs.load_job(claim.job.id).finished_at
    report = run_retention(r, store, SETTINGS, now=finished_at + 3600 + 1)
    assert report.uploads_swept == 2 and store.list("tenants/t1/adapters/a/v1/") == []


def test_each_run_handles_a_bounded_batch_of_the_jobs_due(jobs, r, store):
    for _ in range(5):
        jobs.request_cancel("t1", jobs.create_job("t1", model="m", training_file="f").job.id)
    small_batches = SETTINGS.model_copy(update={"retention_batch_size": 2})
    later = 10**10
    assert [run_retention(r, store, small_batches, now=later).jobs_expired for _ in range(4)] == [2, 2, 1, 0]
    assert jobs.list_jobs("t1") == ([], False)
    assert all(r.zcard(index) == 0 for index in keys.retention_indexes())


class _StoreThatLetsAnotherDispatcherIn(LocalObjectStore):
    """A real local store whose second listing (the checkpoint stage, after the job's checkpoint records
    were read) first runs `interleave()`: another dispatcher's whole retention run lands while this one
    is in the middle of handling the job."""

    interleave = None
    listings = 0

    def list(self, prefix: str) -> list[str]:
        self.listings += 1
        if self.listings == 2 and self.interleave is not None:
            self.interleave()
        return super().list(prefix)


def test_two_dispatchers_running_retention_at_once_handle_each_job_once(jobs, r, tmp_path):
    store = _StoreThatLetsAnotherDispatcherIn(tmp_path / "objects")
    job_id, _ = _trained_and_published(jobs, AdapterRegistry(r, store), store, tmp_path)
    now = jobs.load_job(job_id).finished_at + 30 * 86_400 + 1  # every stage is due
    other = []
    store.interleave = lambda: other.append(run_retention(r, LocalObjectStore(tmp_path / "objects"), SETTINGS, now=now))
    mine = run_retention(r, store, SETTINGS, now=now)
    assert other, "the other dispatcher's run did not happen"
    total = {f: getattr(mine, f) + getattr(other[0], f) for f in ("uploads_swept", "checkpoints_deleted",
                                                                  "jobs_expired", "objects_deleted")}
    assert total == {"uploads_swept": 1, "checkpoints_deleted": 2, "jobs_expired": 1, "objects_deleted": 4}
    assert not any(r.zscore(index, job_id) for index in keys.retention_indexes())
