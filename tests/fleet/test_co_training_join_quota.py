"""Co-training joins against a real redis-server: a tenant's borrowing limit bounds what its co-trained
shares may grow back to (not only what they are at join time), and a leader already asked to stop is
never grouped."""

from __future__ import annotations

import random

import pytest

from fleet import keys
from fleet.co_training import group_of, join_group
from fleet.jobs import JobStatus
from fleet.quotas import TenantQuota
from tests.fleet.sched_harness import Cluster
from tests.fleet.test_co_training_sched import _held, _join_all, _lead, _submit

S = 1000  # ms


def t_beside_x_and_y(c: Cluster) -> tuple[str, str, str, str]:
    """x's job leads a group that t's first job joins, then y's (on another base) one that t's second
    joins: t holds half a GPU in each. Returns (x's job, t's first, y's job, t's second)."""
    x_job = _submit(c, "x")
    t_first = _submit(c, "t")
    assert _lead(c) == x_job and _join_all(c, x_job, max_members=2) == [t_first]
    y_job = _submit(c, "y", base="other", at=1 * S)
    t_second = _submit(c, "t", base="other", at=1 * S)
    assert _lead(c, at=2 * S) == y_job and _join_all(c, y_job, max_members=2, at=2 * S) == [t_second]
    return x_job, t_first, y_job, t_second


def test_a_tenants_shares_never_grow_past_its_borrowing_limit_when_the_others_leave(r):
    """t's quota is 1 GPU (nominal 1, no borrowing). Its job in a group with x's holds 0.5 now and 1 once x
    leaves, so a member in y's group (0.5 now) would take it to 2: that one may not join."""
    c = Cluster(r, 2, t=TenantQuota(nominal_gpus=1, borrowing_limit_gpus=0))
    x_job = _submit(c, "x")
    t_first = _submit(c, "t")
    assert _lead(c) == t_first  # within its nominal quota: first
    assert _join_all(c, t_first, max_members=2) == [x_job]
    y_job = _submit(c, "y", base="other", at=1 * S)
    t_second = _submit(c, "t", base="other", at=1 * S)
    assert _lead(c, at=2 * S) == y_job
    assert _join_all(c, y_job, max_members=2, at=2 * S) == []
    assert c.jobs.load_job(t_second).status == JobStatus.QUEUED
    c.finish(x_job, at=3 * S)
    c.finish(y_job, at=4 * S)
    assert _held(c) == {"t": 1}  # its first job's share grew back to the whole GPU: its quota, not more
    # t's shares are gone with its group: its second job is admitted to its full quota again
    c.finish(t_first, at=5 * S)
    assert c.admit(at=6 * S) == [t_second]


def test_admission_counts_what_a_tenants_co_trained_shares_may_grow_back_to(r):
    """t may hold 2 GPUs (nominal 0, borrowing limit 2). It holds half a GPU in each of two groups (1 in
    all, 2 once the others leave): a job of its own on one more GPU would take it to 3, so it waits, even
    with GPUs free, until a group's end gives the room back."""
    c = Cluster(r, 4, t=TenantQuota(nominal_gpus=0, borrowing_limit_gpus=2))
    x_job, t_first, y_job, t_second = t_beside_x_and_y(c)
    assert _held(c) == {"t": 1, "x": 0.5, "y": 0.5}
    t_alone = _submit(c, "t", co_training=False, at=3 * S)
    assert c.admit(at=4 * S) == []  # 2 GPUs free, but t's shares may grow back to its whole limit
    c.finish(x_job, at=5 * S)
    c.finish(y_job, at=6 * S)
    assert _held(c) == {"t": 2}
    c.finish(t_first, at=7 * S)
    assert c.admit(at=8 * S) == [t_alone]
    assert _held(c) == {"t": 2}


def test_a_tenants_own_jobs_may_share_one_group_at_its_quota(r):
    """Members of one group share its GPUs between them: a tenant whose jobs are all in one group of 1 GPU
    can never hold more than that GPU, so its quota of 1 admits all of them (a sweep on one GPU)."""
    c = Cluster(r, 2, t=TenantQuota(nominal_gpus=1, borrowing_limit_gpus=0))
    ids = [_submit(c, "t", at=i) for i in range(3)]
    assert _lead(c, at=10) == ids[0]
    assert _join_all(c, ids[0], max_members=4, at=10) == ids[1:]
    assert _held(c) == {"t": 1}
    c.finish(ids[0], at=1 * S)
    assert _held(c) == {"t": 1}
    # with another tenant in the group too, t's further job still fits: t holds at most the group's GPU
    x_job = _submit(c, "x", at=2 * S)
    t_more = _submit(c, "t", at=2 * S + 1)
    assert sorted(_join_all(c, ids[1], max_members=4, at=3 * S)) == sorted([x_job, t_more])
    assert _held(c) == {"t": 0.75, "x": 0.25}


def test_a_leader_asked_to_stop_before_its_first_join_trains_alone_and_its_gpu_comes_back(r):
    """Between a leader's claim and its first join, another dispatcher's admission may pick it as a
    preemption victim. Grouping it then would keep its GPU held by the joiners after it stops, so the
    reclaiming tenant would wait for a GPU that never comes."""
    c = Cluster(r, 1, owner=TenantQuota(nominal_gpus=1))
    leader = _submit(c, "b")
    other = _submit(c, "c")
    assert _lead(c) == leader
    (owned,) = c.submit("owner", at=1 * S)
    assert c.admit(at=1 * S) == [] and c.preempting() == [leader]
    assert join_group(c.jobs, c.claims[leader].fence, "w", 60_000, max_members=4, now_ms=2 * S) is None
    assert group_of(r, leader) is None
    assert c.jobs.load_job(other).status == JobStatus.QUEUED
    c.finish(leader, at=3 * S, status=JobStatus.QUEUED, preempted=True)
    assert c.admit(at=4 * S) == [owned]


def _growth_by_tenant(r) -> dict[str, int]:
    """How far each tenant's co-trained shares may still grow as the others leave, read from the groups
    themselves (milli-GPUs): over the groups it has members in, the group's GPUs less its members' shares."""
    growth: dict[str, int] = {}
    for gk in r.keys(keys.sched_co_group("*")):
        fields = r.hgetall(gk)
        held: dict[str, int] = {}
        for name, value in fields.items():
            if name.startswith("m:"):
                milli, tenant = value.split(" ", 1)
                held[tenant] = held.get(tenant, 0) + int(milli)
        for tenant, milli in held.items():
            growth[tenant] = growth.get(tenant, 0) + int(fields["gpus"]) * 1000 - milli
    return growth


@pytest.mark.parametrize("seed", range(4))
def test_no_tenant_ever_holds_more_than_its_limit_through_random_joins_and_leaves(r, seed):
    """A seeded random walk of admissions with joins, finishes, hand-backs and lease expiries (3 bases):
    after every step no tenant could come to hold more than nominal + borrowing limit, whoever leaves
    (what it holds + what its shares may grow by), and the growth the scheduler charges it is exactly that."""
    rng = random.Random(seed)
    limits = {"a": (1, 0), "b": (0, 1), "c": (0, 2), "d": (1, 1)}
    c = Cluster(r, 4, **{t: TenantQuota(nominal_gpus=n, borrowing_limit_gpus=b) for t, (n, b) in limits.items()})
    tenants = [*limits, "free"]
    grew = False
    for step in range(300):
        at = step * 100
        action = rng.choice(["submit", "submit", "submit", "admit", "finish", "handback", "expire"])
        if action == "submit":
            _submit(c, rng.choice(tenants), base=rng.choice(["llama", "qwen", "mistral"]),
                    co_training=rng.random() < 0.8, at=at)
        elif action == "admit":  # as a dispatcher does: a leader, then whoever may join it
            for leader in c.admit(at=at, limit=1):
                _join_all(c, leader, max_members=rng.choice([2, 3, 4]), at=at)
        elif action in ("finish", "handback") and c.claims:
            status = JobStatus.SUCCEEDED if action == "finish" else JobStatus.QUEUED
            c.finish(rng.choice(list(c.claims)), at=at, status=status)
        elif action == "expire" and c.claims:
            job_id = rng.choice(list(c.claims))
            r.zadd(keys.leases(), {job_id: 0})  # its worker vanished
            c.jobs.leases.requeue_expired_leases(now_ms=at)
            c.claims.pop(job_id)
        growth = _growth_by_tenant(r)
        grew = grew or any(growth.get(t) for t in limits)
        for t, (nominal, borrow) in limits.items():
            could_hold = float(r.hget(keys.sched_tenant(t), "gpus") or 0) + growth.get(t, 0) / 1000
            assert could_hold <= nominal + borrow + 1e-9, f"{t} after step {step} ({action}): {could_hold}"
        charged = {t: int(r.hget(keys.sched_tenant(t), "co_growth") or 0) for t in tenants}
        assert charged == {t: growth.get(t, 0) for t in tenants}, f"after step {step} ({action})"
    assert grew, "the walk co-trained a limited tenant's job beside others"
    for job_id in sorted(c.claims):
        c.finish(job_id, at=10**6)
    assert not r.keys(keys.sched_co_group("*"))
    assert not any(r.hexists(keys.sched_tenant(t), "co_growth") for t in tenants)
