"""The queue's replay (fleet.scheduler_view.estimate_queue) against a real redis-server with co-training
groups: running groups hold their GPUs once and their members' shares, and groups form in the replay
exactly as CO_JOIN forms them (memory, order, size, compatibility)."""

from __future__ import annotations

import time

from fleet.co_training import MemberMemory, group_of, group_shares, set_max_group
from fleet.job_spec import JobSpec
from fleet.queue_replay import fold, rebalance, replay
from fleet.resources import Resources
from fleet.scheduler_state import read_state
from fleet.scheduler_view import estimate_queue
from tests.fleet.sched_harness import Cluster
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
