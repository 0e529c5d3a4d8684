"""JobStore against a real redis-server: creation, idempotency, isolation, control, claim, leases, fencing."""

from __future__ import annotations

import threading

import pytest

from fleet import keys
from fleet.exceptions import (
    CancelRequested,
    FencedOut,
    IdempotencyConflict,
    InvalidRequest,
    InvalidState,
    NotFound,
    PauseWithdrawn,
)
from fleet.fencing import Fence
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.resources import Resources

FAR_FUTURE_MS = 10**13  # "now" for requeue_expired_leases: every lease has expired by then


@pytest.fixture
def jobs(r) -> JobStore:
    return JobStore(r, max_attempts=3)


def _queued(jobs: JobStore, tenant: str, n: int = 1, **kwargs) -> list[str]:
    return [
        jobs.create_job(tenant, model="tiny-llama", training_file="file-x", **kwargs).job.id
        for _ in range(n)
    ]


def _assert_every_fenced_call_refuses(jobs: JobStore, stale: Fence) -> None:
    for stale_call in (
        lambda: jobs.leases.renew_lease(stale, 5000),
        lambda: jobs.leases.record_progress(stale, step=11),
        lambda: jobs.leases.record_checkpoint(stale, 20, "ckpt/stale"),
        lambda: jobs.leases.append_event(stale, "info", "stale"),
        lambda: jobs.leases.control_signal(stale),
        lambda: jobs.leases.finish_job(stale, "succeeded", fine_tuned_model="stale:v1"),
    ):
        with pytest.raises(FencedOut):
            stale_call()


def test_store_rejects_a_client_that_returns_bytes(redis_server):
    with pytest.raises(ValueError, match="decode_responses=True"):
        JobStore(redis_server.client())


def test_created_job_round_trips_with_all_fields(jobs):
    created = jobs.create_job(
        "t1",
        model="tiny-llama",
        training_file="file-a",
        validation_file="file-b",
        suffix="my-run",
        seed=7,
        metadata={"team": "nlp"},
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": "auto"},
        lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        resources=Resources(workers=2, gpus_per_worker=2),
        priority="high",
    )
    assert created.created
    job = jobs.get_job("t1", created.job.id)
    assert created.job == job  # what create returns without reading back is what was stored
    assert [e.message for e in jobs.read_events(job.id)] == [f"Created fine-tuning job: {job.id}"]
    assert job.id.startswith("ftjob-")
    assert job.status == JobStatus.QUEUED
    assert (job.validation_file, job.suffix, job.seed) == ("file-b", "my-run", 7)
    assert job.metadata == {"team": "nlp"}
    assert job.hyperparameters == {"n_epochs": 2, "learning_rate_multiplier": "auto"}
    assert job.lora["target_modules"] == ["q_proj", "v_proj"]
    assert job.attempt == 0 and job.error is None and job.result_files == []


def test_tenant_b_gets_not_found_for_a_job_of_tenant_a(jobs):
    (job_id,) = _queued(jobs, "tenant-a")
    with pytest.raises(NotFound):
        jobs.get_job("tenant-b", job_id)
    for action in (jobs.request_cancel, jobs.request_pause, jobs.resume):
        with pytest.raises(NotFound):
            action("tenant-b", job_id)
    assert jobs.list_jobs("tenant-b") == ([], False)
    assert jobs.get_job("tenant-a", job_id).status == JobStatus.QUEUED


def test_idempotency_key_same_body_returns_same_job_other_body_conflicts(jobs):
    body = {"model": "tiny-llama", "training_file": "file-a"}
    first = jobs.create_job("t1", model="tiny-llama", training_file="file-a", idempotency_key="k1", request_body=body)
    again = jobs.create_job("t1", model="tiny-llama", training_file="file-a", idempotency_key="k1", request_body=body)
    assert first.created and not again.created
    assert again.job.id == first.job.id
    with pytest.raises(IdempotencyConflict):
        jobs.create_job(
            "t1",
            model="tiny-llama",
            training_file="file-b",
            idempotency_key="k1",
            request_body={**body, "training_file": "file-b"},
        )
    # the key is scoped per tenant
    other = jobs.create_job("t2", model="tiny-llama", training_file="file-a", idempotency_key="k1", request_body=body)
    assert other.created and other.job.id != first.job.id
    assert len(jobs.list_jobs("t1")[0]) == 1
    ttl = jobs.redis.ttl(keys.idempotency("t1", "k1"))
    assert 0 < ttl <= 24 * 3600


def test_idempotency_without_explicit_body_hashes_the_request_fields(jobs):
    a = jobs.create_job("t1", model="m", training_file="f", idempotency_key="k")
    b = jobs.create_job("t1", model="m", training_file="f", idempotency_key="k")
    assert b.job.id == a.job.id and not b.created
    with pytest.raises(IdempotencyConflict):
        jobs.create_job("t1", model="m", training_file="other", idempotency_key="k")


def test_list_jobs_newest_first_with_paging_and_metadata_filter(jobs):
    ids = [
        jobs.create_job("t1", model="m", training_file="f", metadata={"i": str(i), "even": str(i % 2 == 0)}).job.id
        for i in range(7)
    ]
    page, more = jobs.list_jobs("t1", limit=3)
    assert [j.id for j in page] == ids[::-1][:3] and more
    page2, more2 = jobs.list_jobs("t1", limit=3, after=page[-1].id)
    assert [j.id for j in page2] == ids[::-1][3:6] and more2
    page3, more3 = jobs.list_jobs("t1", limit=3, after=page2[-1].id)
    assert [j.id for j in page3] == [ids[0]] and not more3
    even, _ = jobs.list_jobs("t1", metadata={"even": "True"})
    assert [j.id for j in even] == [ids[6], ids[4], ids[2], ids[0]]


def test_a_page_of_jobs_reads_only_that_page(jobs, r):
    ids = _queued(jobs, "t1", 120)
    r.config_resetstat()
    page, more = jobs.list_jobs("t1", limit=3, after=ids[60])
    assert [j.id for j in page] == ids[59:56:-1] and more
    assert r.info("commandstats")["cmdstat_hgetall"]["calls"] == 4  # the page and one to tell has_more


def test_cancel_of_queued_job_is_immediate_and_it_is_never_claimed(jobs):
    a, b = _queued(jobs, "t1", 2)
    assert jobs.request_cancel("t1", a).status == JobStatus.CANCELLED
    assert jobs.leases.claim_next_job("w", 5000).job.id == b
    assert jobs.leases.claim_next_job("w", 5000) is None
    assert jobs.request_cancel("t1", a).status == JobStatus.CANCELLED  # idempotent


def test_cancel_of_running_job_is_a_request_the_worker_observes(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    assert jobs.request_cancel("t1", job_id).status == JobStatus.RUNNING
    assert jobs.leases.control_signal(claim.fence) == "cancel"
    assert jobs.leases.renew_lease(claim.fence, 5000).control == "cancel"
    done = jobs.leases.finish_job(claim.fence, JobStatus.CANCELLED)
    assert done.status == JobStatus.CANCELLED and done.finished_at
    with pytest.raises(InvalidState):
        jobs.request_pause("t1", job_id)


def test_pause_and_resume_of_queued_and_running_jobs(jobs):
    a, b = _queued(jobs, "t1", 2)
    assert jobs.request_pause("t1", a).status == JobStatus.PAUSED
    claim = jobs.leases.claim_next_job("w", 5000)
    assert claim.job.id == b  # the paused job left the queue
    assert jobs.request_pause("t1", b).status == JobStatus.RUNNING
    assert jobs.leases.record_progress(claim.fence, step=3, total_steps=10) == "pause"
    assert jobs.leases.finish_job(claim.fence, JobStatus.PAUSED).status == JobStatus.PAUSED
    assert jobs.resume("t1", a).status == JobStatus.QUEUED
    assert jobs.resume("t1", b).status == JobStatus.QUEUED
    first, second = jobs.leases.claim_next_job("w", 5000), jobs.leases.claim_next_job("w", 5000)
    assert [first.job.id, second.job.id] == [a, b]
    assert second.attempt == 2  # a resumed job is a new attempt; the old one is fenced out
    with pytest.raises(FencedOut):
        jobs.leases.record_progress(claim.fence, step=4)


def test_resume_withdraws_a_pending_pause_request(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    jobs.request_pause("t1", job_id)
    jobs.resume("t1", job_id)
    assert jobs.leases.control_signal(claim.fence) is None


def test_a_pause_withdrawn_before_the_worker_stopped_does_not_pause_the_job(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    jobs.request_pause("t1", job_id)
    assert jobs.leases.record_progress(claim.fence, step=3) == "pause"  # the loop saw it and checkpoints
    jobs.resume("t1", job_id)  # the tenant changes their mind before the loop stops
    with pytest.raises(PauseWithdrawn):
        jobs.leases.finish_job(claim.fence, JobStatus.PAUSED)
    assert jobs.load_job(job_id).status == JobStatus.RUNNING  # refused, nothing changed
    handed_back = jobs.leases.finish_job(claim.fence, JobStatus.QUEUED)  # what the worker does instead
    assert handed_back.status == JobStatus.QUEUED
    assert jobs.leases.claim_next_job("w2", 5000).job.id == job_id


def test_terminal_jobs_cannot_be_cancelled_paused_or_resumed(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    jobs.leases.finish_job(claim.fence, "succeeded", fine_tuned_model="run:v1", trained_tokens=1234)
    for action in (jobs.request_cancel, jobs.request_pause, jobs.resume):
        with pytest.raises(InvalidState):
            action("t1", job_id)
    job = jobs.get_job("t1", job_id)
    assert (job.status, job.fine_tuned_model, job.trained_tokens) == (JobStatus.SUCCEEDED, "run:v1", 1234)


def test_concurrent_claims_take_each_job_exactly_once(jobs, r):
    job_ids = set()
    for tenant in ("t1", "t2", "t3"):
        job_ids.update(_queued(jobs, tenant, 10))
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        store = JobStore(r)  # one store per thread, sharing the connection pool, as dispatchers would
        start.wait()
        while (claim := store.leases.claim_next_job(f"w{n}", 60_000)) is not None:
            with lock:
                claimed.append(claim.job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(job_ids)
    assert all(jobs.load_job(j).attempt == 1 and jobs.load_job(j).status == JobStatus.RUNNING for j in job_ids)
    assert jobs.snapshot().running == {"t1": 10, "t2": 10, "t3": 10}


def test_tenants_with_equal_usage_take_turns_oldest_first_fifo_within_each(r):
    jobs = JobStore(r, fair_share_half_life_s=0)  # score = GPUs held now: equal after each round
    a = _queued(jobs, "tenant-a", 3)
    b = _queued(jobs, "tenant-b", 1)
    c = _queued(jobs, "tenant-c", 2)
    order = []
    while (claim := jobs.leases.claim_next_job("w", 5000)) is not None:
        order.append(claim.job.id)
    assert order == [a[0], b[0], c[0], a[1], c[1], a[2]]


def test_queue_position_follows_the_fair_share_policy(jobs):
    a = _queued(jobs, "tenant-a", 3)
    b = _queued(jobs, "tenant-b", 1)
    assert [jobs.queue_position(j) for j in a] == [1, 3, 4]
    assert jobs.queue_position(b[0]) == 2
    jobs.leases.claim_next_job("w", 5000)
    assert jobs.queue_position(b[0]) == 1
    assert jobs.queue_position(a[0]) is None  # running


def test_queue_positions_of_a_page_match_each_jobs_own(jobs):
    a = _queued(jobs, "tenant-a", 3)
    b = _queued(jobs, "tenant-b", 2)
    jobs.leases.claim_next_job("w", 5000)  # a[0] runs: not in the answer
    page = [jobs.load_job(j) for j in a + b]
    assert jobs.queue_positions(page) == {j: jobs.queue_position(j) for j in a[1:] + b}


def test_wait_for_work_wakes_on_enqueue(jobs):
    assert not jobs.leases.wait_for_work(0.05)
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(jobs.leases.wait_for_work(30)))
    waiter.start()
    _queued(jobs, "t1")
    waiter.join(timeout=30)
    assert woke == [True]


def test_expired_lease_requeues_job_and_fences_out_the_stale_attempt(jobs):
    (job_id,) = _queued(jobs, "t1")
    first = jobs.leases.claim_next_job("dead-worker", 5000)
    jobs.leases.record_checkpoint(first.fence, 10, "ckpt/step-10", {"loss": 1.5})
    assert jobs.leases.requeue_expired_leases() == []  # lease still valid by the server clock

    expired = jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    assert [(e.job_id, e.new_status) for e in expired] == [(job_id, JobStatus.QUEUED)]
    second = jobs.leases.claim_next_job("live-worker", 5000)
    assert (second.job.id, second.attempt) == (job_id, 2)
    assert jobs.latest_checkpoint(job_id).step == 10  # the new attempt resumes from here

    _assert_every_fenced_call_refuses(jobs, first.fence)
    job = jobs.load_job(job_id)
    assert (job.status, job.attempt, job.fine_tuned_model) == (JobStatus.RUNNING, 2, None)
    assert [c.step for c in jobs.list_checkpoints(job_id)] == [10]
    assert jobs.leases.finish_job(second.fence, "succeeded").status == JobStatus.SUCCEEDED


def test_job_that_keeps_losing_its_worker_fails_after_max_attempts(jobs):
    (job_id,) = _queued(jobs, "t1")
    for attempt in (1, 2, 3):
        claim = jobs.leases.claim_next_job("w", 5000)
        assert claim.attempt == attempt
        (expired,) = jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    assert expired.new_status == JobStatus.FAILED
    job = jobs.load_job(job_id)
    assert job.status == JobStatus.FAILED and job.error.code == "max_attempts_exceeded"
    assert "3 attempts" in job.error.message and "lease expired" in job.error.message
    assert jobs.leases.claim_next_job("w", 5000) is None
    assert jobs.snapshot().running == {}


def test_expired_lease_honours_a_pending_cancel(jobs):
    (job_id,) = _queued(jobs, "t1")
    jobs.leases.claim_next_job("w", 5000)
    jobs.request_cancel("t1", job_id)
    (expired,) = jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    assert expired.new_status == JobStatus.CANCELLED


def test_handing_back_a_job_with_a_pending_cancel_cancels_it(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    jobs.request_cancel("t1", job_id)
    done = jobs.leases.finish_job(claim.fence, JobStatus.QUEUED)  # e.g. the dispatcher shutting down
    assert (done.status, done.control) == (JobStatus.CANCELLED, None) and done.finished_at
    assert jobs.leases.claim_next_job("w2", 5000) is None  # not requeued
    assert jobs.list_events(job_id, limit=1)[0][0].message == "Job cancelled."


def test_handing_back_a_job_with_a_pending_pause_pauses_it(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    jobs.request_pause("t1", job_id)
    done = jobs.leases.finish_job(claim.fence, JobStatus.QUEUED)
    assert (done.status, done.finished_at) == (JobStatus.PAUSED, None)
    assert jobs.leases.claim_next_job("w2", 5000) is None
    assert jobs.list_events(job_id, limit=1)[0][0].message.startswith("Job paused")
    assert jobs.resume("t1", job_id).status == JobStatus.QUEUED
    assert jobs.leases.claim_next_job("w2", 5000).job.id == job_id


def test_pausing_a_job_with_a_pending_cancel_cancels_it(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    jobs.request_pause("t1", job_id)
    jobs.request_cancel("t1", job_id)  # the worker saw the pause; the user cancels before it stops
    assert jobs.leases.finish_job(claim.fence, JobStatus.PAUSED).status == JobStatus.CANCELLED


def test_a_job_with_a_pending_cancel_cannot_succeed(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    jobs.request_cancel("t1", job_id)  # after the training loop's last look at the control signal
    with pytest.raises(CancelRequested):
        jobs.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, fine_tuned_model="run:v1")
    job = jobs.load_job(job_id)
    assert (job.status, job.control, job.fine_tuned_model) == (JobStatus.RUNNING, "cancel", None)
    done = jobs.leases.finish_job(claim.fence, JobStatus.CANCELLED)
    assert (done.status, done.fine_tuned_model) == (JobStatus.CANCELLED, None)


def test_progress_is_recorded_with_percent_and_eta(jobs):
    (job_id,) = _queued(jobs, "t1")
    claim = jobs.leases.claim_next_job("w", 5000)
    assert jobs.leases.record_progress(claim.fence, step=5, total_steps=20, eta_s=30, metrics={"loss": 2.0}) is None
    job = jobs.load_job(job_id)
    assert (job.progress.step, job.progress.total_steps, job.progress.percent) == (5, 20, 25.0)
    assert job.progress.metrics == {"loss": 2.0} and job.estimated_finish is not None


def test_events_list_newest_first_read_forward_and_wait(jobs):
    (job_id,) = _queued(jobs, "t1")
    for i in range(5):
        jobs.append_event(job_id, "info", f"step {i}", {"step": i}, type="metrics")
    newest, more = jobs.list_events(job_id, limit=3)
    assert [e.message for e in newest] == ["step 4", "step 3", "step 2"] and more
    older, more = jobs.list_events(job_id, after=newest[-1].id, limit=3)
    assert [e.message for e in older] == [
        "step 1",
        "step 0",
        f"Created fine-tuning job: {job_id}",
    ] and not more
    forward = jobs.read_events(job_id, after=older[1].id)
    assert [e.message for e in forward] == [f"step {i}" for i in range(1, 5)]
    assert forward[0].data == {"step": 1} and forward[0].type == "metrics"

    got = []
    waiter = threading.Thread(
        target=lambda: got.extend(jobs.wait_for_events(job_id, after=newest[0].id, block_ms=30_000))
    )
    waiter.start()
    jobs.append_event(job_id, "warn", "live")
    waiter.join(timeout=30)
    assert [e.message for e in got] == ["live"]


def test_event_stream_is_capped(r):
    jobs = JobStore(r, events_max_len=10)
    (job_id,) = _queued(jobs, "t1")
    for i in range(500):
        jobs.append_event(job_id, "info", f"e{i}")
    assert r.xlen(keys.job_events(job_id)) < 200
    assert jobs.list_events(job_id, limit=1)[0][0].message == "e499"


@pytest.mark.parametrize("crafted", ["ftjob-x:events", "ftjob-x:checkpoints", "lf:queue:t1", "../x", ""])
def test_crafted_job_ids_are_not_found_and_touch_no_other_key(jobs, crafted):
    (job_id,) = _queued(jobs, "t1")
    jobs.append_event(job_id, "info", "hello")
    for call in (
        lambda: jobs.get_job("t1", crafted),
        lambda: jobs.request_cancel("t1", crafted),
        lambda: jobs.request_pause("t1", crafted),
        lambda: jobs.resume("t1", crafted),
    ):
        with pytest.raises(NotFound):
            call()
    assert jobs.queue_position(crafted) is None


def test_malformed_event_cursor_is_an_invalid_request(jobs):
    (job_id,) = _queued(jobs, "t1")
    for bad in ("nope", "ftevent-abc", "1-2-3"):
        with pytest.raises(InvalidRequest):
            jobs.list_events(job_id, after=bad)
        with pytest.raises(InvalidRequest):
            jobs.read_events(job_id, after=bad)


def test_state_survives_a_redis_crash(redis_server):
    client = redis_server.client(decode_responses=True)
    jobs = JobStore(client)
    running, queued = _queued(jobs, "t1", 2)
    claim = jobs.leases.claim_next_job("w", 60_000)
    assert claim.job.id == running
    redis_server.kill()  # SIGKILL: only what reached the AOF survives
    redis_server.start()
    client = redis_server.client(decode_responses=True)
    jobs = JobStore(client)
    assert jobs.load_job(running).status == JobStatus.RUNNING
    assert jobs.queue_position(queued) == 1
    jobs.leases.finish_job(claim.fence, "succeeded")
    assert jobs.leases.claim_next_job("w", 60_000).job.id == queued
    client.close()


def test_a_claim_rolled_back_by_a_failover_cannot_be_handed_out_twice_under_one_attempt(jobs, r):
    (job_id,) = _queued(jobs, "t1")
    before_claim = {key: r.dump(key) for key in r.keys("*")}
    lost = jobs.leases.claim_next_job("w-old", 60_000)
    # a failover to a replica that never saw the claim: every key back to its pre-claim state
    r.flushdb()
    for key, value in before_claim.items():
        r.restore(key, 0, value)
    fresh = jobs.leases.claim_next_job("w-new", 60_000)
    assert (fresh.job.id, fresh.attempt) == (lost.job.id, lost.attempt) == (job_id, 1)
    assert fresh.fence.token != lost.fence.token
    _assert_every_fenced_call_refuses(jobs, lost.fence)
    assert jobs.list_checkpoints(job_id) == []
    assert jobs.leases.finish_job(fresh.fence, "succeeded").status == JobStatus.SUCCEEDED


def test_a_stale_attempt_cannot_write_the_jobs_events(jobs):
    (job_id,) = _queued(jobs, "t1")
    first = jobs.leases.claim_next_job("w1", 5000)
    jobs.leases.append_event(first.fence, "info", "first attempt at step 1")
    jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    second = jobs.leases.claim_next_job("w2", 5000)
    with pytest.raises(FencedOut):
        jobs.leases.append_event(first.fence, "info", "first attempt at step 2", type="metrics")
    event = jobs.leases.append_event(second.fence, "warn", "second attempt", {"step": 1})
    messages = [e.message for e in jobs.read_events(job_id)]
    assert "first attempt at step 1" in messages and "first attempt at step 2" not in messages
    assert messages[-1] == event.message == "second attempt" and jobs.read_events(job_id)[-1].data == {"step": 1}


def test_tenant_visible_events_and_errors_do_not_name_the_worker_host(jobs):
    (job_id,) = _queued(jobs, "t1")
    for _ in range(3):
        jobs.leases.claim_next_job("gpu-host-7:4242", 5000)
        jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS)
    job = jobs.load_job(job_id)
    tenant_visible = [e.message for e in jobs.read_events(job_id)] + [job.error.message]
    assert job.status == JobStatus.FAILED and "Job started (attempt 1)." in tenant_visible
    assert not [text for text in tenant_visible if "gpu-host-7" in text]
    assert "gpu-host-7:4242" in job.last_failure  # operators still see which worker it was
