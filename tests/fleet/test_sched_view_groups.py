"""The queue's replay (fleet.scheduler_view.estimate_queue) against a real redis-server with co-training
groups: running groups hold their GPUs once and their members' shares, and groups form in the replay
exactly as CO_JOIN forms them (memory, order, size, compatibility)."""

from __future__ import annotations

import random
import time

import pytest

from fleet import keys
from fleet.co_training import MemberMemory, group_of, group_shares, set_max_group
from fleet.job_spec import JobSpec
from fleet.queue_replay import fold, join, leave, rebalance, replay
from fleet.quotas import TenantQuota
from fleet.resources import Resources
from fleet.scheduler_state import GroupState, read_state
from fleet.scheduler_view import cluster_view, estimate_queue
from tests.fleet.sched_harness import Cluster
from tests.fleet.test_co_training_join_quota import t_beside_x_and_y
from tests.fleet.test_co_training_sched import _join_all, _lead, _submit

S = 1000  # ms


def test_a_running_group_on_one_of_two_gpus_leaves_the_other_to_a_queued_job_at_once(r):
    c = Cluster(r, 2)
    for tenant in "abcd":
        _submit(c, tenant)
    leader = _lead(c)
    assert len(_join_all(c, leader)) == 3  # four members on one GPU; one GPU free
    waiting = _submit(c, "e", base="other")
    set_max_group(r, 4)
    assert estimate_queue(r, [waiting], now_ms=0)[waiting].model_dump() == {"position": 1, "estimated_start_at": 0}
    assert c.admit() == [waiting]  # as the scheduler does


def test_members_ending_one_by_one_give_their_shares_back_and_the_last_frees_the_gpu(r):
    c = Cluster(r, 1)
    ids = [_submit(c, tenant) for tenant in "abcd"]
    leader = _lead(c)
    _join_all(c, leader)
    for i, job_id in enumerate(ids):  # a ends in 10 min, b in 20, c in 30, d in 40
        c.jobs.leases.record_progress(c.claims[job_id].fence, step=1, eta_s=(i + 1) * 600)
    now = int(time.time() * 1000)
    waiting = _submit(c, "e", base="other")
    set_max_group(r, 4)
    state = read_state(r, [waiting], now)
    out = replay(state.tenants, state.ends, state.total, state.now_ms, state.half_life_ms, state.ranks,
                    state.wanted, groups=state.groups, co_keys=state.co_keys, co_max_group=state.co_max_group)
    # the GPU frees when d, the last member, ends (its share grew back to the whole GPU meanwhile)
    assert out[waiting].position == 1
    assert out[waiting].estimated_start_at >= now // 1000 + 2400 - 1
    held = {tid: tenant.gpus for tid, tenant in state.tenants.items()}
    assert {tid: held[tid] for tid in "abcd"} == {"a": 0, "b": 0, "c": 0, "d": 0}, held  # never negative


def test_the_replay_forms_groups_under_the_memory_budget_co_join_applies(r):
    c = Cluster(r, 1)
    first = _submit(c, "x", r=8)
    assert _lead(c) == first
    # each member costs 100 + 10·r bytes; a rank-8 leader leaves 400: CO_JOIN records these terms
    memory = MemberMemory(budget_bytes=400, member_fixed_bytes=100, bytes_per_rank=10)
    assert _join_all(c, first, memory=memory) == []  # nothing else queued yet: x trains alone
    a, big, small, other = (_submit(c, t, r=rank, at=i) for i, (t, rank) in enumerate([("a", 8), ("b", 64),
                                                                                         ("c", 8), ("d", 8)]))
    set_max_group(r, 4)
    est = estimate_queue(r, [a, big, small, other], now_ms=0)
    # a leads; the rank-64 job (740 bytes) does not fit what a leaves (400); the two rank-8 jobs (180 each) do
    assert [est[j].position for j in (a, small, other, big)] == [1, 2, 3, 4]
    together = est[a].estimated_start_at
    assert est[small].estimated_start_at == est[other].estimated_start_at == together
    assert est[big].estimated_start_at > together
    # as the scheduler does once x ends
    c.finish(first, at=1 * S)
    assert _lead(c, at=1 * S) == a
    assert _join_all(c, a, memory=memory, at=1 * S) == [small, other]


def test_the_replay_lets_a_head_past_the_starvation_guard_join_first_as_co_join_does(r):
    c = Cluster(r, 1)  # the guard: 5 min (its default)

    def submit(tenant: str, priority: str, at: int) -> str:
        spec = JobSpec(quantization="nf4")
        return c.jobs.create_job(tenant, model="llama", training_file="f", spec=spec, resources=Resources(workers=1),
                                 priority=priority, now_ms=at).job.id

    leader = submit("a", "high", 0)
    old = submit("o", "normal", 0)  # has waited 8 min by then: past the guard, so it goes first
    new = submit("p", "high", 7 * 60 * S)  # would come first by priority
    set_max_group(r, 2)
    est = estimate_queue(r, [leader, old, new], now_ms=8 * 60 * S)
    assert [est[j].position for j in (leader, old, new)] == [1, 2, 3]
    assert est[old].estimated_start_at == est[leader].estimated_start_at < est[new].estimated_start_at
    # as the scheduler does
    assert _lead(c, at=8 * 60 * S) == leader
    assert _join_all(c, leader, max_members=2, at=8 * 60 * S) == [old]


def test_the_replay_gives_a_leaving_members_share_back_to_the_others_as_the_scheduler_does(r):
    c = Cluster(r, 1)
    ids = [_submit(c, tenant) for tenant in "abc"]
    _join_all(c, _lead(c))
    state = read_state(r, [], 0)
    (group,) = state.groups.values()
    assert sorted(milli for _, milli in group.members.values()) == [333, 333, 334]
    # the replay ends b's member ...
    tenant, milli = group.members.pop(ids[1])
    fold(state.tenants[tenant], -milli / 1000, -1, 0, state.half_life_ms)
    rebalance(group, state.tenants, 0, state.half_life_ms)
    # ... and the scheduler ends it
    c.finish(ids[1], at=0)
    shares = group_shares(r, group_of(r, ids[0]))
    assert {job: milli / 1000 for job, (_, milli) in group.members.items()} == shares == {ids[0]: 0.5, ids[2]: 0.5}
    held = {tid: tn.gpus for tid, tn in state.tenants.items() if tn.gpus}
    assert held == {"a": 0.5, "c": 0.5} == {tid: tn.gpus for tid, tn in read_state(r, [], 0).tenants.items()}


def test_the_replay_groups_only_compatible_jobs_up_to_the_size_limit_as_co_join_does(r):
    c = Cluster(r, 1)
    leader = _submit(c, "a", at=0)
    apart = [
        _submit(c, "b", base="mistral", at=1),  # another base model
        _submit(c, "c", quantization="int8", at=2),  # another quantization
        _submit(c, "d", co_training=False, at=3),  # opted out
    ]
    compatible = [_submit(c, t, at=4 + i) for i, t in enumerate("efgh")]
    set_max_group(r, 4)
    est = estimate_queue(r, [leader, *apart, *compatible], now_ms=10)
    starts_now = sorted(j for j, e in est.items() if e.estimated_start_at == 0)
    assert starts_now == sorted([leader, *compatible[:3]])  # the limit (4) leaves h for later
    assert _lead(c, at=10) == leader
    assert _join_all(c, leader, at=10) == compatible[:3]  # as the scheduler does


def test_the_replay_keeps_a_join_within_what_the_tenants_shares_may_grow_back_to_as_co_join_does(r):
    """t's quota is 1 GPU (nominal 1, no borrowing); it holds half a GPU beside x's job, 1 once x leaves. y
    leads a group on another base: t's head there would count 0.5 now but could grow to 1 more, so CO_JOIN
    takes no one, and the replay must not start t's head with y."""
    c = Cluster(r, 2, t=TenantQuota(nominal_gpus=1, borrowing_limit_gpus=0))
    x_job = _submit(c, "x")
    t_first = _submit(c, "t")
    assert _lead(c) == t_first and _join_all(c, t_first, max_members=2) == [x_job]
    y_job = _submit(c, "y", base="other", at=1 * S)
    t_second = _submit(c, "t", base="other", at=1 * S)
    set_max_group(r, 2)
    state = read_state(r, [], 2 * S)
    assert (state.tenants["t"].gpus, state.tenants["t"].co_growth) == (0.5, 500)
    est = estimate_queue(r, [y_job, t_second], now_ms=2 * S)
    assert est[y_job].model_dump() == {"position": 1, "estimated_start_at": 2}
    assert est[t_second].estimated_start_at > 2  # not with y: once t's group has ended
    # as the scheduler does
    assert _lead(c, at=2 * S) == y_job
    assert _join_all(c, y_job, max_members=2, at=2 * S) == []


def test_the_replay_lets_a_tenants_own_jobs_share_one_group_at_its_quota_as_co_join_does(r):
    """t's quota is 1 GPU: its jobs in one group of 1 GPU can never hold more than that GPU together, so
    they all join its leader, in the replay as in CO_JOIN."""
    c = Cluster(r, 2, t=TenantQuota(nominal_gpus=1, borrowing_limit_gpus=0))
    ids = [_submit(c, "t", at=i) for i in range(3)]
    set_max_group(r, 4)
    est = estimate_queue(r, ids, now_ms=10)
    assert [(est[j].position, est[j].estimated_start_at) for j in ids] == [(1, 0), (2, 0), (3, 0)]
    assert _lead(c, at=10) == ids[0]
    assert _join_all(c, ids[0], max_members=4, at=10) == ids[1:]  # as the scheduler does


def test_admission_in_the_replay_counts_what_co_trained_shares_may_grow_back_to_and_the_view_says_so(r):
    """t may hold 2 GPUs (nominal 0, borrowing limit 2) and holds half a GPU in each of two groups: 1 now,
    2 once the others leave. Its job of its own waits with 2 GPUs free, as ADMIT holds it back; the replay
    starts z's job first and t's once a group ends, and the view names the growth as the reason."""
    c = Cluster(r, 4, t=TenantQuota(nominal_gpus=0, borrowing_limit_gpus=2))
    x_job, t_first, y_job, t_second = t_beside_x_and_y(c)
    t_alone = _submit(c, "t", co_training=False, at=3 * S)
    z_job = _submit(c, "z", co_training=False, at=4 * S)  # queued after t's: goes first all the same
    est = estimate_queue(r, [t_alone, z_job], now_ms=5 * S)
    assert est[z_job].model_dump() == {"position": 1, "estimated_start_at": 5}
    assert est[t_alone].position == 2 and est[t_alone].estimated_start_at > 5
    (t_view,) = [tn for tn in cluster_view(r, now_ms=5 * S).tenants if tn.tenant_id == "t"]
    assert t_view.waiting_reason == (
        "waiting for 1 GPU; tenant holds 1 (may grow back to 2 as the other members of its co-trained groups "
        "leave) of its nominal quota 0 + borrowing limit 2 = 2"
    )
    assert c.admit(at=5 * S) == [z_job]  # as the scheduler does: t's job waits


def test_the_replay_moves_each_tenants_co_growth_as_the_scheduler_does(r):
    """Joins and leaves in the replay (join, leave) leave every tenant's co_growth where CO_JOIN and
    co_release leave the scheduler's."""
    c = Cluster(r, 1)
    leader = _submit(c, "a")
    b_job, a_more, c_job = _submit(c, "b", at=1), _submit(c, "a", at=2), _submit(c, "c", at=3)
    assert _lead(c) == leader
    state = read_state(r, [], 0)  # a's leader runs alone, holding its GPU
    group = GroupState(1, {leader: ["a", 1000]})
    tenant_of = {b_job: "b", a_more: "a", c_job: "c"}
    for job_id in _join_all(c, leader):
        join(group, job_id, state.tenants[tenant_of[job_id]], state.tenants, 0, state.half_life_ms)

    def growth() -> dict[str, int]:
        return {tid: tn.co_growth for tid, tn in read_state(r, [], 0).tenants.items() if tn.co_growth}

    replayed = {tid: tn.co_growth for tid, tn in state.tenants.items() if tn.co_growth}
    assert replayed == growth() == {"a": 500, "b": 750, "c": 750}
    for job_id in (leader, b_job, a_more):
        leave(group, job_id, state.tenants, 0, state.half_life_ms)
        c.finish(job_id, at=0)
        replayed = {tid: tn.co_growth for tid, tn in state.tenants.items() if tn.co_growth}
        assert replayed == growth(), job_id
    assert growth() == {} and {m: s for m, (_, s) in group.members.items()} == {c_job: 1000}


@pytest.mark.parametrize("seed", range(4))
def test_the_replays_starts_now_are_the_scheduler_s_through_random_joins_and_leaves(r, seed):
    """A seeded random walk of submissions and ends over tenants whose borrowing limits bind (nominal 0,
    so nothing reclaims): at each check the jobs the replay starts now are exactly those the scheduler
    admits and groups then (a leader at a time, then whoever joins it, as a dispatcher does)."""
    rng = random.Random(seed)
    limits = {"a": 1, "b": 2, "c": 1, "d": 3}
    c = Cluster(r, 3, **{t: TenantQuota(nominal_gpus=0, borrowing_limit_gpus=b) for t, b in limits.items()})
    max_group = 3
    set_max_group(r, max_group)
    grew = checked = 0
    for step in range(120):
        at = step * S
        action = rng.choice(["submit", "submit", "submit", "finish", "check"])
        if action == "submit":
            _submit(c, rng.choice([*limits, "free"]), base=rng.choice(["llama", "qwen"]),
                    co_training=rng.random() < 0.8, at=at)
        elif action == "finish" and c.claims:
            c.finish(rng.choice(sorted(c.claims)), at=at)
        elif action == "check":
            queued = [j for t in [*limits, "free"] for j in r.zrange(keys.queue(t), 0, -1)]
            est = estimate_queue(r, queued, now_ms=at)
            predicted = {j for j, e in est.items() if e.estimated_start_at == at // 1000}
            started = []
            while leaders := c.admit(at=at, limit=1):
                started += [leaders[0], *_join_all(c, leaders[0], max_members=max_group, at=at)]
            assert set(started) == predicted, f"step {step}"
            checked += bool(started)
            grew += any(int(r.hget(keys.sched_tenant(t), "co_growth") or 0) for t in limits)
    assert checked and grew, "the walk started jobs and co-trained a limited tenant's job beside others"
