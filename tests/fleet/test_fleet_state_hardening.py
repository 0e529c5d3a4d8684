"""The fleet state layer under faults: Redis restarts, retried scripts, failing completions, parallel chores."""

from __future__ import annotations

import time

import pytest

from fleet import keys
from fleet.checkpoints import download_checkpoint, upload_checkpoint
from fleet.fencing import Fence
from fleet.jobs import JobError, JobStatus
from fleet.objectstore import LocalObjectStore
from fleet.queue import JobStore
from fleet.registry import AdapterRegistry
from fleet.settings import Settings, make_redis

FAR_FUTURE_MS = 10**13  # "now" for requeue_expired_leases: every lease has expired by then
LEASE_MS, HEARTBEAT_MS = 1500, 300


@pytest.fixture
def jobs(r) -> JobStore:
    return JobStore(r, max_attempts=3)


def _queued(jobs: JobStore, tenant: str = "t1") -> str:
    return jobs.create_job(tenant, model="tiny-llama", training_file="file-x").job.id


def _wait_for_uptime(client, seconds: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while int(client.info("server")["uptime_in_seconds"]) < seconds:
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis-server did not report {seconds}s of uptime within {timeout_s}s")
        time.sleep(0.1)


def test_a_job_that_checkpoints_between_lost_workers_never_exhausts_its_attempts(jobs):
    job_id = _queued(jobs)
    for attempt in (1, 2, 3, 4):
        claim = jobs.leases.claim_next_job("w", 5000)
        assert claim.attempt == attempt
        jobs.leases.record_checkpoint(claim.fence, 10 * attempt, f"ckpt/step-{10 * attempt}")  # progress
        (expired,) = jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
        assert expired.new_status == JobStatus.QUEUED, f"attempt {attempt}"
    assert jobs.load_job(job_id).lease_expirations == 1


def test_leases_are_not_expired_until_workers_could_renew_after_a_redis_restart(redis_server):
    settings = Settings(redis_url=redis_server.url, lease_ms=LEASE_MS, heartbeat_ms=HEARTBEAT_MS)
    jobs = JobStore(make_redis(settings), max_attempts=3)
    job_id = _queued(jobs)
    claim = jobs.leases.claim_next_job("w", LEASE_MS)

    redis_server.kill()
    time.sleep(LEASE_MS / 1000 + 0.3)  # the outage outlasts the lease
    redis_server.start()  # same AOF: the lease is recorded, and it has expired

    grace = LEASE_MS + HEARTBEAT_MS
    assert jobs.leases.requeue_expired_leases(restart_grace_ms=grace) == []
    assert jobs.load_job(job_id).status == JobStatus.RUNNING
    jobs.leases.renew_lease(claim.fence, LEASE_MS)  # the worker reconnects within the grace and keeps its job

    # Once the server has been up for the grace, an expired lease is reclaimed as before.
    _wait_for_uptime(jobs.redis, -(-grace // 1000))
    (expired,) = jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS, restart_grace_ms=grace)
    assert (expired.job_id, expired.new_status) == (job_id, JobStatus.QUEUED)


def test_a_retried_create_script_returns_the_job_it_created_and_queues_it_once(jobs, monkeypatch):
    # A retried script (reply lost after it ran) carries the same client-drawn job id: model that.
    import fleet.queue

    monkeypatch.setattr(fleet.queue, "new_job_id", lambda: "ftjob-" + "ab" * 12)
    first = jobs.create_job("t1", model="tiny-llama", training_file="file-x")
    again = jobs.create_job("t1", model="tiny-llama", training_file="file-x")
    assert first.job.id == again.job.id and again.job.seq == first.job.seq
    assert [j.id for j in jobs.list_jobs("t1")[0]] == [first.job.id]
    assert jobs.redis.zcard(keys.queue("t1")) == 1
    claim = jobs.leases.claim_next_job("w", 5000)
    assert claim.job.id == first.job.id and jobs.leases.claim_next_job("w", 5000) is None


def test_a_retried_import_reservation_gets_the_same_version_number(r, tmp_path):
    registry = AdapterRegistry(r, LocalObjectStore(tmp_path / "objects"))
    first = registry._reserve_import_version("t1", "my-adapter", "import-1")
    assert registry._reserve_import_version("t1", "my-adapter", "import-1") == first == 1  # the retry
    assert registry._reserve_import_version("t1", "my-adapter", "import-2") == 2  # a new import: the next number


def _commit_a_version(jobs: JobStore, registry: AdapterRegistry, fence) -> None:
    job_key, pub_key = keys.job(fence.job_id), keys.job_publication(fence.job_id)
    registry._reserve(keys=[job_key, pub_key, keys.adapter_version_seq("t1", "a")],
                      args=[fence.job_id, fence.attempt, fence.token, "a"])
    registry._commit(keys=[job_key, pub_key], args=[fence.attempt, fence.token, "{}"])


def test_a_committed_job_whose_completion_fails_goes_to_the_tail_announced_once(jobs, r, tmp_path):
    registry = AdapterRegistry(r, LocalObjectStore(tmp_path / "objects"))
    committed_job = _queued(jobs)
    claim = jobs.leases.claim_next_job("w", 5000)
    _commit_a_version(jobs, registry, claim.fence)
    other = _queued(jobs)
    handed_back = "Job handed back to the queue."

    error = JobError(code="publish_error", message="object store unreachable")
    job = jobs.leases.finish_job(claim.fence, JobStatus.FAILED, error=error)
    assert job.status == JobStatus.QUEUED and job.error is None
    assert "after its version was committed" in job.last_failure and "object store unreachable" in job.last_failure
    assert jobs.leases.claim_next_job("w", 5000).job.id == other  # the failing completion waits its turn

    again = jobs.leases.claim_next_job("w", 5000)
    assert again.job.id == committed_job
    assert jobs.leases.finish_job(again.fence, JobStatus.FAILED, error=error).status == JobStatus.QUEUED
    messages = [e.message for e in jobs.list_events(committed_job, limit=100)[0]]
    assert messages.count(handed_back) == 1, messages

    last = jobs.leases.claim_next_job("w", 5000)
    done = jobs.leases.finish_job(last.fence, JobStatus.SUCCEEDED, fine_tuned_model="a:v1")
    assert done.status == JobStatus.SUCCEEDED


def test_two_claims_sharing_an_attempt_number_never_write_the_same_checkpoint_keys(tmp_path):
    # A claim rolled back by a Redis failover and the next claim both hold attempt 1, under other tokens.
    store = LocalObjectStore(tmp_path / "objects")
    rolled_back, current = Fence("ftjob-abc", 1, "aaaaaaaaaaaaaaaa"), Fence("ftjob-abc", 1, "bbbbbbbbbbbbbbbb")
    locations = {}
    for fence in (current, rolled_back):  # the rolled-back claim's upload lands last
        src = tmp_path / fence.token
        src.mkdir()
        (src / "adapter_model.safetensors").write_bytes(fence.token.encode())
        locations[fence] = upload_checkpoint(store, "t1", "ftjob-abc", 200, src, fence=fence)
    assert locations[current] != locations[rolled_back]
    dest = download_checkpoint(store, locations[current], tmp_path / "resume")
    assert (dest / "adapter_model.safetensors").read_bytes() == current.token.encode()



def test_leases_still_expire_when_the_redis_user_may_not_run_info(redis_server, r):
    r.execute_command("ACL", "SETUSER", "no-info", "on", ">pw", "~*", "&*", "+@all", "-info")
    limited = JobStore(redis_server.client(username="no-info", password="pw", decode_responses=True))
    job_id = _queued(limited)
    limited.leases.claim_next_job("w", LEASE_MS)
    (expired,) = limited.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS, restart_grace_ms=10**9)
    assert (expired.job_id, expired.new_status) == (job_id, JobStatus.QUEUED)
