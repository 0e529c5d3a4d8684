"""The scheduler against a real redis-server, in the style of Kueue's fair-sharing tests: small
deterministic clusters (quotas, weights, arrivals, finishes, preemptions) driven with a simulated clock,
with the exact admission order and shares expected."""

from __future__ import annotations

import random
import threading

import pytest
import redis

from fleet import keys
from fleet.capacity import CapacityStore, NodeCapacity
from fleet.fencing import Fence
from fleet.jobs import JobStatus
from fleet.leases import PREEMPTED_MESSAGE, Claim
from fleet.queue import JobStore
from fleet.quotas import TenantQuota
from fleet.sched_scripts import SCHEMA
from fleet.scheduler_view import cluster_view
from tests.fleet.sched_harness import Cluster, index_problems

S = 1000  # ms


def test_within_nominal_work_goes_first_then_lower_usage_then_older(r):
    c = Cluster(r, 8, a=TenantQuota(nominal_gpus=2), b=TenantQuota(nominal_gpus=6))
    c.submit("a", 4)
    c.submit("b", 4)
    admitted = c.admit()
    # a0 (tie: older), b0 (lower usage), a1 (tie: older), then a borrows: b's within-nominal work first
    assert c.tenant_of(admitted) == ["a", "b", "a", "b", "b", "b", "a", "a"]
    assert c.held() == {"a": 4, "b": 4}


def test_weights_split_the_cluster_in_proportion(r):
    c = Cluster(r, 6, a=TenantQuota(weight=2), b=TenantQuota(weight=1))
    c.submit("a", 10)
    c.submit("b", 10)
    assert c.tenant_of(c.admit()) == ["a", "b", "a", "a", "b", "a"]
    assert c.held() == {"a": 4, "b": 2}
    view = {t.tenant_id: t for t in cluster_view(r, now_ms=0).tenants}
    assert view["a"].share_score == view["b"].share_score == 2.0  # usage / weight, equal


@pytest.mark.parametrize(("at_s", "first"), [(10, "b"), (40, "a")])
def test_decayed_usage_decides_who_goes_first(r, at_s, first):
    """Half-life 10 s. a held 4 GPUs during [0, 10 s]; b holds 1 GPU from 0 on. At 10 s a's usage is
    4·(1 - 2^-1) = 2 and b's 0.5: b first. a's usage then decays, b's grows toward 1: at 40 s a has
    2·2^-3 = 0.25 and b 1 - 2^-4 = 0.9375: a first (a idle is scored through the index, b directly)."""
    c = Cluster(r, 5, half_life_s=10)
    (b_long,) = c.submit("b")
    a_jobs = c.submit("a", 4)
    assert sorted(c.admit(at=0)) == sorted([b_long, *a_jobs])
    for job_id in a_jobs:
        c.finish(job_id, at=10 * S)
    c.submit("a", at=at_s * S)
    c.submit("b", at=at_s * S)
    view = {t.tenant_id: t.share_score for t in cluster_view(r, now_ms=at_s * S).tenants}
    expected_a = 2 * 2 ** -((at_s - 10) / 10)
    expected_b = 1 - 2 ** -(at_s / 10)
    assert view == pytest.approx({"a": expected_a, "b": expected_b})
    assert c.tenant_of(c.admit(at=at_s * S, limit=1)) == [first]


def test_borrowing_limit_and_max_running_block_only_their_tenant(r):
    c = Cluster(
        r,
        8,
        a=TenantQuota(nominal_gpus=2, borrowing_limit_gpus=1),
        b=TenantQuota(max_running_jobs=1),
    )
    c.submit("a", 5)
    c.submit("b", 3)
    c.submit("c", 2)
    admitted = c.admit()
    assert sorted(c.tenant_of(admitted)) == ["a", "a", "a", "b", "c", "c"]
    view = {t.tenant_id: t for t in cluster_view(r, now_ms=0).tenants}
    assert view["a"].borrowed_gpus == 1
    assert "borrowing limit 1" in view["a"].waiting_reason
    assert view["b"].waiting_reason == "tenant at max_running_jobs (1)"
    assert view["c"].waiting_reason is None


def test_a_job_over_nominal_plus_borrowing_limit_waits_without_blocking_others(r):
    c = Cluster(r, 8, a=TenantQuota(nominal_gpus=4, borrowing_limit_gpus=0))
    c.submit("a", gpus=4)
    c.quotas.set("a", TenantQuota(nominal_gpus=2, borrowing_limit_gpus=0))  # too large from now on
    (b_job,) = c.submit("b")
    assert c.admit() == [b_job]
    reason = {t.tenant_id: t.waiting_reason for t in cluster_view(r, now_ms=0).tenants}["a"]
    assert reason.startswith("1 job(s) of 4 GPUs set aside: cannot fit the tenant's quota")


def test_jobs_wait_for_free_capacity_and_a_finish_admits_the_next(r):
    c = Cluster(r, 4)
    big, small = c.submit("a", gpus=3), c.submit("a", gpus=2)
    assert c.admit() == big
    reason = {t.tenant_id: t.waiting_reason for t in cluster_view(r, now_ms=0).tenants}["a"]
    assert reason.startswith("waiting for 2 GPUs; 1 free")
    c.finish(big[0], at=S)
    assert c.admit(at=S) == small
    assert r.hget(keys.sched_cluster(), "allocated") == "2"


def test_priority_orders_a_tenants_queue(r):
    c = Cluster(r, 1)
    low = c.submit("a", priority="low")
    normal = c.submit("a")
    high = c.submit("a", priority="high")
    order = []
    for step in range(3):
        (job_id,) = c.admit(at=step * S)
        order.append(job_id)
        c.finish(job_id, at=step * S + 1)
    assert order == high + normal + low


def test_a_handed_back_job_returns_at_its_place_and_retry_after_is_honoured(r):
    c = Cluster(r, 4)
    first, second = c.submit("a", 2)
    assert c.admit(at=0, limit=1) == [first]
    c.finish(first, at=1 * S, status=JobStatus.QUEUED, retry_after_ms=5 * S)
    (other,) = c.submit("b", at=1 * S)
    assert set(c.admit(at=2 * S)) == {second, other}  # first backs off; the others are not blocked
    c.finish(second, at=2 * S)
    reasons = {t.tenant_id: t.waiting_reason for t in cluster_view(r, now_ms=3 * S).tenants}
    assert reasons["a"] == "waiting 3 s to retry placing its 1 GPU on the nodes"
    assert c.jobs.leases.claim_next_job("w", 60_000, now_ms=5 * S) is None
    retried = c.jobs.leases.claim_next_job("w", 60_000, now_ms=6 * S)
    assert (retried.job.id, retried.attempt) == (first, 2)


def test_requeue_keeps_the_place_in_the_queue(r):
    c = Cluster(r, 1)
    first, second, third = c.submit("a", 3)
    assert c.admit() == [first]
    c.finish(first, at=S, status=JobStatus.QUEUED)
    assert r.zrange(keys.queue("a"), 0, -1) == [first, second, third]
    assert c.admit(at=S) == [first]


def test_reclaim_preempts_borrowers_lowest_priority_then_newest_once(r):
    c = Cluster(r, 8, a=TenantQuota(nominal_gpus=4), b=TenantQuota(nominal_gpus=0))
    b_low = c.submit("b", 2, priority="low")
    b_normal = c.submit("b", 6)
    assert len(c.admit()) == 8
    (a_job,) = c.submit("a", gpus=4, at=S)
    assert c.admit(at=S) == []
    # the two low-priority jobs first (though older), then the newest normal ones
    assert c.preempting() == sorted(b_low + b_normal[-2:])
    assert c.admit(at=2 * S) == [] and len(c.preempting()) == 4  # no second wave while they stop
    for victim in c.preempting():
        c.finish(victim, at=3 * S, status=JobStatus.QUEUED, preempted=True)
    assert c.admit(at=3 * S) == [a_job]
    assert c.held() == {"a": 4, "b": 4}
    victim = b_low[0]
    assert c.jobs.load_job(victim).status == JobStatus.QUEUED
    assert PREEMPTED_MESSAGE in [e.message for e in c.jobs.read_events(victim)]
    outbox = [fields["type"] for _, fields in r.xrange(keys.webhook_outbox())]
    assert outbox.count("fine_tuning.job.preempted") == 4
    assert r.zrange(keys.queue("b"), 0, -1)[:2] == b_normal[-2:]  # back at their places (normal before low)


def test_preemption_cannot_ping_pong(r):
    """a and b each have nominal 4 on 8 GPUs and submit 5-GPU jobs. b runs one (borrowing 1). Naive
    reclaim ("a is below nominal, preempt the borrower") would preempt b, then b, now below nominal,
    would preempt a, and so on. LessThanOrEqualToFinalShare: a's share after admission (1) must be <=
    b's share after the preemption (0): it is not, so a waits for b's job to end."""
    c = Cluster(r, 8, a=TenantQuota(nominal_gpus=4), b=TenantQuota(nominal_gpus=4))
    (b_job,) = c.submit("b", gpus=5)
    assert c.admit() == [b_job]
    (a_job,) = c.submit("a", gpus=5, at=S)
    for step in range(1, 4):
        assert c.admit(at=step * S) == []
        assert c.preempting() == []
    c.finish(b_job, at=5 * S)
    assert c.admit(at=5 * S) == [a_job]


def test_reclaim_within_nominal_preempts_and_the_victim_does_not_preempt_back(r):
    c = Cluster(r, 8, a=TenantQuota(nominal_gpus=4), b=TenantQuota(nominal_gpus=4))
    (b_job,) = c.submit("b", gpus=5)
    assert c.admit() == [b_job]
    (a_job,) = c.submit("a", gpus=4, at=S)
    assert c.admit(at=S) == [] and c.preempting() == [b_job]  # a's share after: 0 <= b's after: 0
    c.finish(b_job, at=2 * S, status=JobStatus.QUEUED, preempted=True)
    assert c.admit(at=2 * S) == [a_job]
    assert c.admit(at=3 * S) == [] and c.preempting() == []  # b (5 GPUs, 4 free) cannot take a's nominal


def test_a_lost_worker_releases_its_gpus(r):
    c = Cluster(r, 2)
    (job_id,) = c.submit("a", gpus=2)
    (waiting,) = c.submit("b", gpus=2)  # the same size: the same entry score, so age decides
    assert c.admit() == [job_id]
    expired = c.jobs.leases.requeue_expired_leases(now_ms=120 * S)
    assert [e.new_status for e in expired] == [JobStatus.QUEUED]
    assert r.hget(keys.sched_cluster(), "allocated") == "0"
    assert c.admit(at=121 * S) == [job_id]  # back at its place, older than b's


def test_two_claimers_never_double_start_or_overcommit(redis_server):
    setup = redis_server.client(decode_responses=True)
    c = Cluster(setup, 10)
    sizes = [1, 2, 3] * 12
    job_ids = [c.submit(f"t{i % 4}", gpus=g)[0] for i, g in enumerate(sizes)]
    started: list[str] = []
    holding: list[Claim] = []
    lock = threading.Lock()
    start = threading.Barrier(2)

    def claimer(n: int) -> None:
        jobs = JobStore(redis_server.client(decode_responses=True))
        mine: list[Claim] = []
        start.wait(timeout=30)
        while True:
            claim = jobs.leases.claim_next_job(f"w{n}", 60_000)
            if claim is None:
                if not mine:
                    return
                done = mine.pop(0)  # free capacity so the run goes on
                with lock:
                    holding.remove(done)
                jobs.leases.finish_job(done.fence, JobStatus.SUCCEEDED)
                continue
            mine.append(claim)
            with lock:
                started.append(claim.job.id)
                holding.append(claim)
                held = sum(x.job.resources.total_gpus for x in holding)
            assert held <= 10, f"overcommitted: {held} GPUs claimed on 10"

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "claimer thread did not finish within 60 s"
    assert sorted(started) == sorted(job_ids)  # every job started, exactly once
    assert all(setup.hget(keys.job(j), "attempt") == "1" for j in job_ids)
    assert setup.hget(keys.sched_cluster(), "allocated") == "0"


def test_queue_positions_follow_the_admission_order(r):
    c = Cluster(r, 2, b=TenantQuota(weight=2))
    a_jobs = c.submit("a", 3)
    b_jobs = c.submit("b", 3)
    everyone = a_jobs + b_jobs
    positions = c.jobs.queue_estimates(everyone, now_ms=0)
    predicted = sorted(everyone, key=lambda j: positions[j].position)
    actual: list[str] = []
    at = 0
    while len(actual) < len(everyone):
        actual += c.admit(at=at)
        at += S
        c.finish(actual[len(actual) - len(c.claims)], at=at)  # the oldest running job ends
    assert actual == predicted
    assert [positions[j].position for j in predicted] == list(range(1, 7))
    assert positions[predicted[0]].estimated_start_at == 0


def test_at_equal_usage_the_smaller_head_goes_first_and_the_estimate_agrees(r):
    """The entry score counts half the head's GPUs (H = 0: usage + head / 2, per weight)."""
    c = Cluster(r, 2)
    (big,) = c.submit("a", gpus=2)
    (small,) = c.submit("b", gpus=1)
    positions = c.jobs.queue_estimates([big, small], now_ms=0)
    assert (positions[small].position, positions[big].position) == (1, 2)
    assert c.admit() == [small]


def test_idle_tenants_of_different_weights_are_ordered_by_entry_score_not_by_usage_per_weight(r):
    """x (weight 1) used 1 GPU and y (weight 4) 7 GPUs for the same 30 min: x has the lower usage per
    weight, yet y's 5-GPU head lifts y's share by 5/4 where x's lifts x's by 5, so y goes first, though
    both wait idle with heads of one size. Their heads sit in different buckets (weights differ)."""
    c = Cluster(r, 8, half_life_s=3600, x=TenantQuota(weight=1), y=TenantQuota(weight=4))
    (x_first,) = c.submit("x", gpus=1)
    (y_first,) = c.submit("y", gpus=7)
    assert sorted(c.admit()) == sorted([x_first, y_first])
    c.finish(x_first, at=30 * 60 * S)
    c.finish(y_first, at=30 * 60 * S)
    (x_head,) = c.submit("x", gpus=5, at=31 * 60 * S)
    (y_head,) = c.submit("y", gpus=5, at=31 * 60 * S)
    shares = {t.tenant_id: t.share_score for t in cluster_view(r, now_ms=31 * 60 * S).tenants}
    assert shares["x"] < shares["y"]
    positions = c.jobs.queue_estimates([x_head, y_head], now_ms=31 * 60 * S)
    assert (positions[y_head].position, positions[x_head].position) == (1, 2)
    assert c.admit(at=31 * 60 * S) == [y_head]
    assert index_problems(r, ["x", "y"]) == []


def test_withdrawing_a_pause_keeps_a_pending_preemption(r):
    c = Cluster(r, 2, a=TenantQuota(nominal_gpus=2))
    (b_job,) = c.submit("b", gpus=2)
    assert c.admit() == [b_job]
    c.submit("a", gpus=2)
    assert c.admit(at=S) == [] and c.preempting() == [b_job]
    c.jobs.request_pause("b", b_job)
    c.jobs.resume("b", b_job)
    assert c.preempting() == [b_job]
    assert c.jobs.leases.control_signal(c.claims[b_job].fence) == "preempt"


@pytest.mark.parametrize("seed", range(4))
def test_the_index_stays_consistent_through_every_kind_of_change(r, seed):
    """A seeded random walk over every script that touches queues, usage or quotas."""
    rng = random.Random(seed)
    c = Cluster(
        r, 8, half_life_s=5, a=TenantQuota(nominal_gpus=4), b=TenantQuota(nominal_gpus=2, borrowing_limit_gpus=2)
    )
    tenants = ["a", "b", "c"]
    queued: list[str] = []
    paused: list[str] = []
    for step in range(300):
        at = step * 100
        action = rng.choice(["submit", "submit", "admit", "finish", "handback", "preempted", "cancel", "pause",
                             "resume", "expire", "quota", "backoff"])
        if action == "submit":
            queued += c.submit(rng.choice(tenants), gpus=rng.choice([1, 2, 3, 4]),
                               priority=rng.choice(["low", "normal", "high"]), at=at)
        elif action == "admit":
            c.admit(at=at, limit=rng.randint(1, 3))
        elif action in ("finish", "handback", "preempted", "backoff") and c.claims:
            job_id = rng.choice(sorted(c.claims))
            status = JobStatus.SUCCEEDED if action == "finish" else JobStatus.QUEUED
            if r.hget(keys.job(job_id), "control") == "cancel":
                status = JobStatus.CANCELLED
            kwargs = {"preempted": True} if action == "preempted" else {}
            if action == "backoff":
                kwargs = {"retry_after_ms": 500}
            c.finish(job_id, at=at, status=status, **kwargs)
        elif action == "cancel" and (queued or c.claims):
            job_id = rng.choice(queued + sorted(c.claims))
            if not c.jobs.load_job(job_id).status.is_terminal:
                c.jobs.request_cancel(c.jobs.load_job(job_id).tenant_id, job_id, now_ms=at)
        elif action == "pause" and queued:
            job_id = rng.choice(queued)
            if c.jobs.load_job(job_id).status == JobStatus.QUEUED:
                c.jobs.request_pause(c.jobs.load_job(job_id).tenant_id, job_id, now_ms=at)
                paused.append(job_id)
        elif action == "resume" and paused:
            job_id = paused.pop(rng.randrange(len(paused)))
            if c.jobs.load_job(job_id).status == JobStatus.PAUSED:
                c.jobs.resume(c.jobs.load_job(job_id).tenant_id, job_id, now_ms=at)
        elif action == "expire" and c.claims:
            job_id = rng.choice(sorted(c.claims))
            r.zadd(keys.leases(), {job_id: 0})  # its worker vanished
            c.jobs.leases.requeue_expired_leases(now_ms=at)
            c.claims.pop(job_id)
        elif action == "quota":
            c.quotas.set(rng.choice(tenants), TenantQuota(nominal_gpus=rng.randint(0, 6), weight=rng.choice([1, 2])))
        for job_id in [j for j in c.claims if r.hget(keys.job(j), "status") != "running"]:
            c.claims.pop(job_id)  # cancelled while running: its worker would stop
        assert index_problems(r, tenants) == [], f"after step {step} ({action})"


def test_reclaim_frees_the_whole_nominal_quota_in_one_wave(r):
    """The owner's three 2-GPU jobs fit its nominal 6: one wave preempts 6 GPUs of the borrower, so
    the owner holds its quota after one checkpoint + restart, not one per job."""
    c = Cluster(r, 8, owner=TenantQuota(nominal_gpus=6))
    c.submit("borrower", 8)
    assert len(c.admit()) == 8
    owner_jobs = c.submit("owner", 3, gpus=2, at=S)
    assert c.admit(at=S) == []
    assert len(c.preempting()) == 6
    for victim in c.preempting():
        c.finish(victim, at=2 * S, status=JobStatus.QUEUED, preempted=True)
    assert sorted(c.admit(at=2 * S)) == sorted(owner_jobs)
    assert c.held() == {"owner": 6, "borrower": 2}


def test_a_quota_change_takes_effect_at_the_next_decision(r):
    c = Cluster(r, 8)
    (job_id,) = c.submit("a", gpus=4)
    c.quotas.set("a", TenantQuota(nominal_gpus=0, borrowing_limit_gpus=0))
    assert c.admit() == []
    c.quotas.set("a", TenantQuota(nominal_gpus=4))
    assert c.admit() == [job_id]
    c.submit("a", gpus=4)
    c.quotas.set("a", TenantQuota(max_running_jobs=1))
    assert c.admit() == []
    c.quotas.reset("a")  # back to the default: no limits
    assert len(c.admit()) == 1


def test_reclaim_spares_victims_a_later_pick_made_unneeded(r):
    """Victim order is newest first: two 1-GPU jobs, then a 4-GPU one. Reclaiming 4 GPUs takes the
    4-GPU job alone, not the 1-GPU jobs too."""
    c = Cluster(r, 6, owner=TenantQuota(nominal_gpus=4))
    (big,) = c.submit("borrower", gpus=4)
    assert c.admit() == [big]
    small = c.submit("borrower", 2)
    assert sorted(c.admit()) == sorted(small)
    c.submit("owner", gpus=4, at=S)
    assert c.admit(at=S) == []
    assert c.preempting() == [big]


def test_cluster_view_shows_nodes_totals_borrowers_and_reasons(r):
    c = Cluster(r, None, a=TenantQuota(nominal_gpus=2))
    CapacityStore(r).record_nodes(
        [NodeCapacity(node_id="n1", gpus=4), NodeCapacity(node_id="n2", gpus=4, alive=False)]
    )
    c.submit("a", 2, gpus=2)  # a: 2 within nominal, 2 borrowed
    c.submit("b", gpus=4)
    assert len(c.admit()) == 2
    view = cluster_view(r, now_ms=0)
    assert [(n.node_id, n.gpus, n.alive) for n in view.nodes] == [("n1", 4, True), ("n2", 4, False)]
    assert (view.totals.gpus, view.totals.allocated, view.totals.free) == (4, 4, 0)
    tenants = {t.tenant_id: t for t in view.tenants}
    assert (tenants["a"].running_gpus, tenants["a"].borrowed_gpus, tenants["a"].queued_jobs) == (4, 2, 0)
    assert tenants["b"].waiting_reason == (
        "waiting for 4 GPUs; 0 free; tenant has no nominal quota (borrows idle GPUs)"
    )


def test_freed_or_added_gpus_wake_an_idle_dispatcher(r):
    c = Cluster(r, 2)
    (running,) = c.submit("a", gpus=2)
    c.submit("a", gpus=2)
    assert c.admit() == [running]
    r.delete(keys.wakeup())  # the dispatchers have consumed every wake-up so far
    assert not c.jobs.leases.wait_for_work(0.05)  # nothing fits: an idle dispatcher would sleep
    c.finish(running, at=S)
    assert c.jobs.leases.wait_for_work(2)
    r.delete(keys.wakeup())
    CapacityStore(r).record_nodes([NodeCapacity(node_id="n1", gpus=2), NodeCapacity(node_id="n2", gpus=2)])
    assert c.jobs.leases.wait_for_work(2)


def _state_from_before_the_scheduler(r: redis.Redis) -> None:
    """A running job with no GPUs counted and a list queue of two, as the round-robin version left them."""
    def old_job(job_id: str, seq: int, status: str) -> None:
        r.hset(keys.job(job_id), mapping={"id": job_id, "tenant_id": "t1", "seq": seq, "status": status,
                                          "created_at": 0, "model": "m", "training_file": "f"})

    old_job("ftjob-old1", 1, "running")
    r.hset(keys.job("ftjob-old1"), mapping={"attempt": 1, "claim_token": "tok", "worker_id": "w"})
    r.zadd(keys.leases(), {"ftjob-old1": 10**13})
    r.hset(keys.running_per_tenant(), "t1", 1)
    old_job("ftjob-old2", 2, "queued")
    old_job("ftjob-old3", 3, "queued")
    r.rpush(keys.queue("t1"), "ftjob-old2", "ftjob-old3")
    r.zadd(keys.queue_tenants(), {"t1": 0})



def test_state_from_before_the_scheduler_is_migrated_once(r):
    """The first reader or script brings old state up to date; the scheduler then admits and releases
    as if it had always run."""
    _state_from_before_the_scheduler(r)
    jobs = JobStore(r)
    assert r.type(keys.queue("t1")) == "list"  # building a store touches nothing (Redis may be down)
    assert jobs.queue_position("ftjob-old3") == 2  # a reader without a script migrates first
    assert r.zrange(keys.queue("t1"), 0, -1) == ["ftjob-old2", "ftjob-old3"]
    assert r.hget(keys.sched_cluster(), "allocated") == "1"
    assert index_problems(r, ["t1"]) == []
    assert r.hget(keys.sched_cluster(), "schema") == SCHEMA
    assert jobs.leases.claim_next_job("w", 60_000).job.id == "ftjob-old2"
    jobs.leases.finish_job(Fence("ftjob-old1", 1, "tok"), JobStatus.SUCCEEDED)
    assert r.hget(keys.sched_cluster(), "allocated") == "1"  # old1 released, old2 holds one
    assert r.hget(keys.running_per_tenant(), "t1") == "1"
    assert index_problems(r, ["t1"]) == []


def test_buckets_named_before_weights_were_in_their_key_are_renamed_before_a_decision(r):
    """Schema 1 keyed waiting heads by (tier, kind, size): the first script after the upgrade re-indexes
    every waiting tenant, so ADMIT never meets an old bucket name."""
    c = Cluster(r, 1)
    (job_id,) = c.submit("a", gpus=1)
    (new_name,) = r.zrange(keys.sched_buckets(), 0, -1)
    old_name = new_name.replace(":w1:", ":")
    r.rename(new_name, old_name)
    r.delete(keys.sched_buckets())
    r.zadd(keys.sched_buckets(), {old_name: 1})
    r.hset(keys.sched_tenant("a"), "slot", old_name)
    r.hset(keys.sched_cluster(), "schema", "1")
    assert c.admit() == [job_id]
    assert r.hget(keys.sched_cluster(), "schema") == SCHEMA
    assert not r.exists(old_name) and r.zrange(keys.sched_buckets(), 0, -1) == []


def test_any_script_migrates_old_state_before_it_acts(r):
    _state_from_before_the_scheduler(r)
    jobs = JobStore(r)
    jobs.leases.finish_job(Fence("ftjob-old1", 1, "tok"), JobStatus.QUEUED)  # the first call after an upgrade
    assert r.zrange(keys.queue("t1"), 0, -1) == ["ftjob-old1", "ftjob-old2", "ftjob-old3"]
    assert r.hget(keys.sched_cluster(), "allocated") == "0"
    assert index_problems(r, ["t1"]) == []


def test_no_reclaim_for_a_job_larger_than_the_cluster(r):
    c = Cluster(r, 4, owner=TenantQuota(nominal_gpus=8))
    c.submit("borrower", 4)
    assert len(c.admit()) == 4
    c.submit("owner", gpus=6, at=S)  # nominal 8, but the cluster has 4: preempting cannot make it fit
    assert c.admit(at=S) == [] and c.preempting() == []


def test_reclaim_after_a_node_left_counts_the_overcommit(r):
    """A node with 2 GPUs leaves while the borrower holds 4 (its jobs there are not handed back yet):
    the owner's 2 GPUs need 4 freed, in one wave, not one wave now and another later."""
    c = Cluster(r, 4, owner=TenantQuota(nominal_gpus=2))
    c.submit("borrower", 2, gpus=2)
    assert len(c.admit()) == 2
    CapacityStore(r).record_nodes([NodeCapacity(node_id="n1", gpus=2)])
    (owner_job,) = c.submit("owner", gpus=2, at=S)
    assert c.admit(at=S) == [] and len(c.preempting()) == 2
    for victim in c.preempting():
        c.finish(victim, at=2 * S, status=JobStatus.QUEUED, preempted=True)
    assert c.admit(at=2 * S) == [owner_job]
