"""Checkpoints upload in the background: the step that saved one never waits on the object store, the
uploads land in order and are recorded whole, a fenced-out attempt uploads nothing, and closing the
reporter (the end of a run, before a pause is acknowledged) waits for the last upload.

The object store is a real LocalObjectStore whose put_file waits at a gate the test opens (a slow
store made deterministic), over a real redis-server."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from fleet.checkpoints import download_checkpoint
from fleet.jobs import JobStatus
from fleet.objectstore import LocalObjectStore
from fleet.queue import JobStore
from fleet.settings import Settings, make_object_store, make_redis
from workers.checkpoint_uploader import CheckpointUploader
from workers.dispatcher import JobReporterFactory

_GATE_TIMEOUT_S = 30.0


class GatedStore(LocalObjectStore):
    """A LocalObjectStore whose uploads wait until `gate` is set, and which records the keys it stored."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.waiting = threading.Event()  # an upload is blocked at the gate
        self.stored: list[str] = []

    def put_file(self, key: str, path: Path) -> None:
        self.waiting.set()
        assert self.gate.wait(_GATE_TIMEOUT_S), f"the test never opened the store's gate for {key}"
        super().put_file(key, path)
        self.stored.append(key)


@pytest.fixture
def running_job(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var")
    jobs = JobStore(make_redis(settings))
    jobs.create_job("t1", model="tiny-llama", training_file="file-1")
    claim = jobs.leases.claim_next_job("test-worker", lease_ms=60_000)
    return settings, jobs, claim


def _gated_reporter(settings: Settings, fence):
    reporter = JobReporterFactory(settings, "t1", fence)()
    reporter.store = GatedStore(make_object_store(settings).root)
    return reporter


def _checkpoint_dir(root: Path, step: int) -> Path:
    path = root / f"ckpt-{step}"
    (path / "adapter").mkdir(parents=True)
    (path / "adapter" / "adapter_model.safetensors").write_bytes(f"weights of step {step}".encode())
    (path / "trainer_state.json").write_text(f'{{"step": {step}}}')
    return path


def _steps_stored(store: GatedStore) -> list[int]:
    steps = [int(key.split("/step-")[1].split("/")[0]) for key in store.stored]
    return sorted(set(steps), key=steps.index)


def test_a_checkpoint_returns_while_its_upload_waits_and_is_recorded_once_whole(running_job, tmp_path):
    settings, jobs, claim = running_job
    reporter = _gated_reporter(settings, claim.fence)
    local = _checkpoint_dir(tmp_path, 3)

    reporter.checkpoint(3, local)  # returns although the store cannot take a byte yet
    assert reporter.store.waiting.wait(_GATE_TIMEOUT_S), "the upload never started"
    assert jobs.latest_checkpoint(claim.job.id) is None  # not recorded before it is whole
    shutil.rmtree(local)  # the loop prunes its local copy at will: the uploader has its own
    reporter.store.gate.set()
    reporter.close(timeout_s=_GATE_TIMEOUT_S)
    assert list(tmp_path.glob(".upload-staging-*")) == []  # the uploader's copies are gone with it

    latest = jobs.latest_checkpoint(claim.job.id)
    assert latest is not None and latest.step == 3
    fetched = download_checkpoint(reporter.store, latest.location, tmp_path / "fetched")
    assert (fetched / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights of step 3"


def test_uploads_land_in_order_and_a_queued_one_is_superseded_by_a_newer(running_job, tmp_path):
    settings, jobs, claim = running_job
    reporter = _gated_reporter(settings, claim.fence)
    reporter.checkpoint(1, _checkpoint_dir(tmp_path, 1))
    assert reporter.store.waiting.wait(_GATE_TIMEOUT_S), "the first upload never started"
    reporter.checkpoint(2, _checkpoint_dir(tmp_path, 2))  # queued behind step 1 ...
    reporter.checkpoint(3, _checkpoint_dir(tmp_path, 3))  # ... and replaced by step 3 before it started
    reporter.store.gate.set()
    reporter.close(timeout_s=_GATE_TIMEOUT_S)

    assert _steps_stored(reporter.store) == [1, 3]
    assert [c.step for c in jobs.list_checkpoints(claim.job.id)] == [3, 1]


def test_a_reporter_fenced_out_while_uploading_uploads_nothing_more(running_job, tmp_path):
    settings, jobs, claim = running_job
    reporter = _gated_reporter(settings, claim.fence)
    reporter.checkpoint(1, _checkpoint_dir(tmp_path, 1))
    assert reporter.store.waiting.wait(_GATE_TIMEOUT_S), "the first upload never started"
    reporter.checkpoint(2, _checkpoint_dir(tmp_path, 2))  # queued while the attempt is still current
    jobs.leases.finish_job(claim.fence, JobStatus.QUEUED)  # handed back: this attempt is stale now
    newer = jobs.leases.claim_next_job("another-worker", lease_ms=60_000)
    assert newer.attempt == claim.attempt + 1
    reporter.store.gate.set()
    reporter.close(timeout_s=_GATE_TIMEOUT_S)

    assert _steps_stored(reporter.store) == [1]  # the upload under way finished under a1/; step 2 never started
    assert jobs.list_checkpoints(claim.job.id) == []  # and the stale attempt recorded nothing


def test_close_waits_for_the_pending_upload_and_says_which_when_it_times_out(running_job, tmp_path):
    settings, jobs, claim = running_job
    reporter = _gated_reporter(settings, claim.fence)
    jobs.request_pause("t1", claim.job.id)  # a pause: the loop saves a checkpoint, then stops
    reporter.checkpoint(5, _checkpoint_dir(tmp_path, 5))
    assert reporter.store.waiting.wait(_GATE_TIMEOUT_S), "the upload never started"

    with pytest.raises(TimeoutError, match=r"checkpoint step\(s\) \[5\].*object store"):
        reporter._uploads.wait(timeout_s=0.5)
    opener = threading.Timer(0.5, reporter.store.gate.set)
    opener.start()
    try:
        reporter.close(timeout_s=_GATE_TIMEOUT_S)
    finally:
        opener.join(_GATE_TIMEOUT_S)
    latest = jobs.latest_checkpoint(claim.job.id)
    assert latest is not None and latest.step == 5  # recorded before close returned


def test_an_upload_error_is_raised_by_the_next_call(tmp_path):
    def upload(step: int, path: Path) -> None:
        raise OSError(f"the store refused step {step}")

    uploader = CheckpointUploader(upload)
    uploader.submit(1, _checkpoint_dir(tmp_path, 1))
    with pytest.raises(RuntimeError, match="refused step 1"):
        uploader.wait(timeout_s=_GATE_TIMEOUT_S)
    with pytest.raises(RuntimeError, match="refused step 1"):
        uploader.submit(2, _checkpoint_dir(tmp_path, 2))
    with pytest.raises(RuntimeError, match="refused step 1"):
        uploader.close(timeout_s=_GATE_TIMEOUT_S)
