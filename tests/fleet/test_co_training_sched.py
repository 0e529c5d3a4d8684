"""Co-training admission against a real redis-server: which queued jobs join a running job's group, in
which order, and how each member's share of the group's GPUs is counted for fair share and quotas."""

from __future__ import annotations

import pytest

from fleet import keys
from fleet.capacity import CapacityStore, NodeCapacity
from fleet.co_training import MemberMemory, group_of, group_shares, join_group
from fleet.job_spec import JobSpec
from fleet.jobs import JobStatus
from fleet.quotas import TenantQuota
from fleet.resources import Resources
from fleet.scheduler_view import cluster_view
from tests.fleet.sched_harness import Cluster

S = 1000  # ms


def _submit(c: Cluster, tenant: str, *, base: str = "llama", quantization: str | None = "nf4", workers: int = 1,
            gpus_per_worker: int = 1, co_training: bool = True, r: int = 8, at: int = 0) -> str:
    spec = JobSpec(quantization=quantization, co_training=co_training, lora={"r": r})
    resources = Resources(workers=workers, gpus_per_worker=gpus_per_worker)
    return c.jobs.create_job(tenant, model=base, training_file="f", spec=spec, resources=resources,
                             now_ms=at).job.id


def _lead(c: Cluster, at: int = 0) -> str:
    """Admit exactly one job (the leader) and return its id."""
    (leader,) = c.admit(at=at, limit=1)
    return leader


def _join_all(c: Cluster, leader: str, max_members: int = 4, memory: MemberMemory | None = None,
              at: int = 0) -> list[str]:
    joined = []
    while (j := join_group(c.jobs, c.claims[leader].fence, "w", 60_000, max_members=max_members, memory=memory,
                           now_ms=at)) is not None:
        c.claims[j.claim.job.id] = j.claim
        joined.append(j.claim.job.id)
    return joined


def _held(c: Cluster) -> dict[str, float]:
    return {t.tenant_id: t.running_gpus for t in cluster_view(c.r, now_ms=0).tenants if t.running_gpus}


def test_compatible_heads_of_other_tenants_join_up_to_the_group_limit_sharing_one_gpu(r):
    c = Cluster(r, 1)
    ids = [_submit(c, t) for t in "abcde"]
    leader = _lead(c)
    assert leader == ids[0]
    joined = _join_all(c, leader)
    assert joined == ids[1:4]  # the group limit (4) leaves e queued
    assert c.jobs.load_job(ids[4]).status == JobStatus.QUEUED
    group = group_of(r, leader)
    assert group and all(group_of(r, j) == group for j in joined)
    assert group_shares(r, group) == {j: 0.25 for j in ids[:4]}
    assert _held(c) == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    assert c.allocated() == 1  # the group's GPU, once


def test_incompatible_and_opted_out_jobs_never_join(r):
    c = Cluster(r, 8)
    leader_id = _submit(c, "a")
    others = [
        _submit(c, "b", base="mistral"),  # another base model
        _submit(c, "c", quantization="int8"),  # another quantization
        _submit(c, "d", workers=2),  # a gang of two workers
        _submit(c, "e", gpus_per_worker=2),  # another size
        _submit(c, "f", co_training=False),  # opted out
    ]
    assert _lead(c) == leader_id
    assert _join_all(c, leader_id) == []
    assert group_of(r, leader_id) is None
    # they are still admitted as jobs of their own
    assert sorted(c.admit()) == sorted(others)


def test_a_group_limit_of_two_and_of_one(r):
    c = Cluster(r, 1)
    ids = [_submit(c, t) for t in "abc"]
    leader = _lead(c)
    assert _join_all(c, leader, max_members=2) == [ids[1]]
    assert _join_all(c, leader, max_members=1) == []


def test_only_a_tenants_queue_head_may_join(r):
    c = Cluster(r, 1)
    leader = _submit(c, "a")
    first_b = _submit(c, "b", base="mistral")  # b's head cannot join; b's next job must not jump it
    _submit(c, "b")
    assert _lead(c) == leader
    assert _join_all(c, leader) == []
    assert c.jobs.load_job(first_b).status == JobStatus.QUEUED


def test_joiners_follow_admission_order_within_nominal_first_and_quotas_bind_their_share(r):
    c = Cluster(r, 2, nom=TenantQuota(nominal_gpus=1), capped=TenantQuota(nominal_gpus=0, borrowing_limit_gpus=1))
    _submit(c, "capped", base="mistral", at=0)  # holds the 1 GPU its borrowing limit allows
    leader = _submit(c, "lead", at=1)
    assert len(c.admit(at=10 * S, limit=2)) == 2
    older = _submit(c, "old", at=11 * S)  # nominal 0: would borrow its share
    within = _submit(c, "nom", at=12 * S)  # its share fits its nominal quota: goes first despite being newer
    _submit(c, "capped", at=13 * S)  # 1 + a share is over its borrowing limit: never joins
    assert _join_all(c, leader, at=20 * S) == [within, older]


def test_memory_budget_limits_who_joins(r):
    c = Cluster(r, 1)
    leader = _submit(c, "a")
    big = _submit(c, "b", r=64)
    small = _submit(c, "c", r=8)
    _submit(c, "d", r=8)
    assert _lead(c) == leader
    # each member costs 100 + 10·r bytes; 400 left: the rank-64 job does not fit, one rank-8 (180) does twice
    memory = MemberMemory(budget_bytes=400, member_fixed_bytes=100, bytes_per_rank=10)
    joined = _join_all(c, leader, memory=memory)
    assert big not in joined and joined[0] == small and len(joined) == 2
    assert int(r.hget(keys.sched_co_group(group_of(r, leader)), "mem_left")) == 400 - 2 * 180


def test_shares_grow_back_as_members_leave_and_the_last_returns_the_gpus(r):
    c = Cluster(r, 2)
    ids = [_submit(c, t) for t in "abc"]  # one GPU each: a group trains on one device
    leader = _lead(c)
    _join_all(c, leader)
    held = _held(c)  # 1000 milli-GPUs in three, summing exactly (which member gets the odd one: by job id)
    assert set(held) == {"a", "b", "c"} and sorted(held.values()) == [0.333, 0.333, 0.334]
    c.finish(ids[1], at=1 * S)
    assert _held(c) == {"a": 0.5, "c": 0.5}
    c.finish(leader, at=2 * S, status=JobStatus.FAILED)  # the leader may leave first: the group goes on
    assert _held(c) == {"c": 1}
    assert c.allocated() == 1
    c.finish(ids[2], at=3 * S)
    assert _held(c) == {} and c.allocated() == 0
    assert r.hlen(keys.sched_co_member_of()) == 0 and not r.smembers(keys.sched_holding())


def test_an_expired_member_lease_requeues_that_job_and_the_others_keep_training(r):
    c = Cluster(r, 1)
    ids = [_submit(c, t) for t in "ab"]
    leader = _lead(c)
    _join_all(c, leader)
    # b's dispatcher stops heartbeating: its lease runs out, the leader's is renewed
    c.jobs.leases.renew_lease(c.claims[leader].fence, 10 * 60_000)
    expired = c.jobs.leases.requeue_expired_leases(now_ms=int(r.time()[0]) * 1000 + 120_000)
    assert [e.job_id for e in expired] == [ids[1]]
    assert c.jobs.load_job(ids[1]).status == JobStatus.QUEUED
    assert _held(c) == {"a": 1} and c.allocated() == 1
    # and it can join again (a new attempt), not twice
    again = _join_all(c, leader)
    assert again == [ids[1]] and c.jobs.load_job(ids[1]).attempt == 2


@pytest.mark.parametrize("max_members", [2, 4])
def test_no_job_is_claimed_twice_when_two_leaders_compete(r, max_members):
    c = Cluster(r, 2)
    ids = [_submit(c, t) for t in "abcdef"]
    leaders = c.admit(limit=2)
    joined = [j for leader in leaders for j in _join_all(c, leader, max_members=max_members)]
    assert len(set(joined)) == len(joined)
    assert len(joined) == min(len(ids) - 2, 2 * (max_members - 1))


def test_queue_estimates_start_compatible_jobs_together_in_a_group(r):
    from fleet.co_training import set_max_group
    from fleet.scheduler_view import estimate_queue

    c = Cluster(r, 1)
    running = _submit(c, "z", base="other")
    assert _lead(c) == running  # holds the only GPU for an hour (no ETA reported: assumed half done)
    ids = [_submit(c, t, at=i) for i, t in enumerate("abcde")]
    set_max_group(r, 1)
    alone = estimate_queue(r, ids, now_ms=0)
    assert [alone[j].position for j in ids] == [1, 2, 3, 4, 5]
    set_max_group(r, 4)
    grouped = estimate_queue(r, ids, now_ms=0)
    assert [grouped[j].position for j in ids] == [1, 2, 3, 4, 5]
    first = {grouped[j].estimated_start_at for j in ids[:4]}
    assert len(first) == 1, "the four that co-train start together"
    assert grouped[ids[4]].estimated_start_at > first.pop()  # the fifth waits for the group's end
    assert alone[ids[3]].estimated_start_at > grouped[ids[3]].estimated_start_at


def _preempting(c: Cluster) -> dict[str, str]:
    """{tenant: GPUs being preempted, as stored} of the tenants with any."""
    out = {}
    for key in c.r.keys(keys.sched_tenant("*")):
        value = c.r.hget(key, "preempting")
        if value not in (None, "0"):
            out[key[len(keys.sched_tenant("")):]] = value
    return out


def _incoming(c: Cluster) -> int:
    return int(c.r.hget(keys.sched_cluster(), "incoming") or 0)


def test_a_group_on_borrowed_gpus_is_reclaimed_as_one_unit_whose_gpu_returns_when_its_last_member_leaves(r):
    c = Cluster(r, 2, owner=TenantQuota(nominal_gpus=2))
    lone = _submit(c, "x", base="other")
    leader = _submit(c, "b")
    members = [leader, _submit(c, "c"), _submit(c, "d")]
    late = _submit(c, "e")  # compatible, but the group is full (3): it waits
    assert c.admit(limit=2) == [lone, leader]
    assert _join_all(c, leader, max_members=3) == members[1:]  # b, c and d borrow one GPU in thirds
    owned = c.jobs.create_job("owner", model="llama", training_file="f", resources=Resources(gpus=1),
                              now_ms=1 * S).job.id
    assert c.admit(at=1 * S) == []
    # the group sits where its earliest-admitted member would (after x in the order): it is asked first,
    # every member at once, since its GPU frees only when all are out; one GPU is enough, so x goes on
    assert c.preempting() == sorted(members)
    assert _incoming(c) == 1
    assert _preempting(c) == {t: s for t, s in zip("bcd", _shares(c, members), strict=True)}
    assert _join_all(c, leader, max_members=4) == []  # a group being preempted takes no one
    # c checkpoints and goes back to its place; its GPU is still held by b and d, still coming back
    c.finish(members[1], at=2 * S, status=JobStatus.QUEUED, preempted=True)
    assert _held(c) == {"x": 1, "b": 0.5, "d": 0.5} and c.allocated() == 2
    assert _incoming(c) == 1 and _preempting(c) == {"b": "0.500", "d": "0.500"}
    assert c.admit(at=2 * S) == [] and c.preempting() == sorted([leader, members[2]])  # no new victim for the same need
    for job_id in (leader, members[2]):
        c.finish(job_id, at=3 * S, status=JobStatus.QUEUED, preempted=True)
    assert c.allocated() == 1 and _incoming(c) == 0 and _preempting(c) == {}
    assert r.hlen(keys.sched_co_member_of()) == 0 and not r.keys(keys.sched_co_group("*"))
    assert c.admit(at=3 * S, limit=1) == [owned]
    for job_id in members:  # each back in its queue (its next attempt resumes from its checkpoint)
        job = c.jobs.load_job(job_id)
        assert job.status == JobStatus.QUEUED and job.attempt == 1
    assert c.jobs.load_job(late).status == JobStatus.QUEUED


def _shares(c: Cluster, job_ids: list[str]) -> list[str]:
    shares = group_shares(c.r, group_of(c.r, job_ids[0]))
    return [f"{shares[j]:.3f}" for j in job_ids]


def test_a_group_is_a_victim_only_when_the_rule_holds_for_every_members_tenant(r):
    """Two groups hold a GPU each. The later-admitted one (first in the order) has a member whose tenant
    (c) is within its nominal quota: preempting the group would take that tenant's own quota, so the other
    group is asked instead."""
    c = Cluster(r, 2, owner=TenantQuota(nominal_gpus=1), c=TenantQuota(nominal_gpus=1))
    second, first = [_submit(c, "d", base="mistral")], [_submit(c, "b")]
    assert c.admit(limit=2) == [second[0], first[0]]
    second.append(_submit(c, "e", base="mistral"))
    first.append(_submit(c, "c"))
    assert _join_all(c, second[0]) == second[1:]
    assert _join_all(c, first[0]) == first[1:]
    c.jobs.create_job("owner", model="other", training_file="f", resources=Resources(gpus=1), now_ms=1 * S)
    assert c.admit(at=1 * S) == []
    assert c.preempting() == sorted(second)
    assert _preempting(c) == {"d": "0.500", "e": "0.500"} and _incoming(c) == 1


def test_a_group_with_a_member_of_the_reclaiming_tenant_is_not_its_victim(r):
    """Preempting it would stop one of the tenant's own jobs, to free a GPU the tenant itself shares; Kueue
    reclaims from other tenants only."""
    c = Cluster(r, 1, owner=TenantQuota(nominal_gpus=2))
    group = [_submit(c, "owner"), _submit(c, "x")]
    assert c.admit(limit=1) == group[:1]
    assert _join_all(c, group[0]) == group[1:]
    c.jobs.create_job("owner", model="other", training_file="f", resources=Resources(gpus=1), now_ms=1 * S)
    assert c.admit(at=1 * S) == [] and c.preempting() == []


def _idle_x_and_y_then_a_leader(c: Cluster) -> tuple[str, str, str]:
    """x (weight 1) used 1 GPU and y (weight 4) 7 GPUs for the same 30 min, then both went idle: x has the
    lower usage per weight, yet a 1-GPU head lifts x's share by 1 and y's by 1/4, so y's entry score is the
    lower (as in test_fleet_scheduler's idle tenants of different weights). Their co-trainable heads sit
    in buckets of different weights (kind 'k': usage left); x's is the older. Then a fresh tenant's job
    leads a group on 1 GPU. Returns (leader, x's head, y's head)."""
    (x_first,) = c.submit("x", gpus=1)
    (y_first,) = c.submit("y", gpus=7)
    assert sorted(c.admit()) == sorted([x_first, y_first])
    c.finish(x_first, at=30 * 60 * S)
    c.finish(y_first, at=30 * 60 * S)
    x_head = _submit(c, "x", at=31 * 60 * S)
    y_head = _submit(c, "y", at=31 * 60 * S + 1)
    leader = _submit(c, "lead", at=31 * 60 * S + 2)
    return leader, x_head, y_head


def test_idle_tenants_of_every_weight_bucket_join_in_admissions_entry_score_order(r):
    c = Cluster(r, 8, half_life_s=3600, x=TenantQuota(weight=1), y=TenantQuota(weight=4))
    leader, x_head, y_head = _idle_x_and_y_then_a_leader(c)
    now = 31 * 60 * S + 3
    estimate = c.jobs.queue_estimates([leader, x_head, y_head], now_ms=now)  # admission's order, replayed
    assert [estimate[j].position for j in (leader, y_head, x_head)] == [1, 2, 3]
    assert _lead(c, at=now) == leader
    assert _join_all(c, leader, at=now) == [y_head, x_head]
    held = _held(c)
    assert set(held) == {"lead", "x", "y"} and sorted(held.values()) == [0.333, 0.333, 0.334]


def test_a_queue_estimate_with_co_training_on_groups_idle_tenants_in_entry_score_order(r):
    from fleet.co_training import set_max_group

    c = Cluster(r, 8, half_life_s=3600, x=TenantQuota(weight=1), y=TenantQuota(weight=4))
    leader, x_head, y_head = _idle_x_and_y_then_a_leader(c)
    CapacityStore(r).record_nodes([NodeCapacity(node_id="n1", gpus=1)])  # one GPU left: one group at a time
    set_max_group(r, 2)
    now = 31 * 60 * S + 3
    estimate = c.jobs.queue_estimates([leader, x_head, y_head], now_ms=now)
    assert [estimate[j].position for j in (leader, y_head, x_head)] == [1, 2, 3]
    assert estimate[leader].estimated_start_at == estimate[y_head].estimated_start_at  # y joins the leader
    assert estimate[x_head].estimated_start_at > estimate[leader].estimated_start_at  # x waits for the group
    assert _lead(c, at=now) == leader
    assert _join_all(c, leader, max_members=2, at=now) == [y_head]


@pytest.mark.parametrize("seed", range(6))
def test_the_queue_estimate_forms_the_group_co_join_forms(r, seed):
    """Tenants of random weights and nominal quotas, with random usage left (one still holding GPUs), queue
    co-trainable heads; one GPU is free. The estimate's first group (the jobs that start with the first
    one) is the leader ADMIT picks and the joiners CO_JOIN then takes, in the same order."""
    import random

    from fleet.co_training import set_max_group

    rng = random.Random(seed)
    names = [f"t{i}" for i in range(5)]
    quotas = {t: TenantQuota(weight=rng.choice([1, 2, 4]), nominal_gpus=rng.choice([0, 1, 2])) for t in names}
    c = Cluster(r, 16, half_life_s=3600, **quotas)
    first = {t: c.submit(t, gpus=rng.randint(1, 3))[0] for t in names}
    assert len(c.admit()) == len(names)
    stays = rng.choice(names)  # its tenant holds GPUs (scored directly, not from a bucket)
    for t in names:
        if t != stays:
            c.finish(first[t], at=rng.randint(5, 30) * 60 * S)
    now = 31 * 60 * S
    queued = [_submit(c, rng.choice(names), at=now + i) for i in range(8)]
    CapacityStore(r).record_nodes([NodeCapacity(node_id="n1", gpus=c.allocated() + 1)])
    max_group = rng.choice([2, 3, 4])
    set_max_group(r, max_group)
    estimate = c.jobs.queue_estimates(queued, now_ms=now + 10)
    by_position = sorted(queued, key=lambda j: estimate[j].position)
    group = [j for j in by_position if estimate[j].estimated_start_at == estimate[by_position[0]].estimated_start_at]
    leader = _lead(c, at=now + 10)
    assert [leader, *_join_all(c, leader, max_members=max_group, at=now + 10)] == group


@pytest.mark.parametrize("guard_s", [300, 0])
def test_a_head_past_the_starvation_guard_joins_first_among_its_tier_as_admission_would_take_it(r, guard_s):
    """old's head has waited 10 min (its tenant has usage left); new's fresh tenant has the lower entry
    score. Admission would move old's head first among the borrowing heads once past the guard; so does
    CO_JOIN. The leader's tenant is within nominal: the guard moves a head only within its tier."""
    from fleet.scheduling import set_starvation_guard

    c = Cluster(r, 1, half_life_s=3600, lead=TenantQuota(nominal_gpus=1))
    set_starvation_guard(r, guard_s)
    (old_first,) = c.submit("old")
    assert c.admit() == [old_first]
    waiting = _submit(c, "old", at=1 * 60 * S)
    c.finish(old_first, at=10 * 60 * S)
    leader = _submit(c, "lead", at=11 * 60 * S)
    fresh = _submit(c, "new", at=11 * 60 * S + 1)
    assert _lead(c, at=11 * 60 * S + 2) == leader
    assert _join_all(c, leader, max_members=2, at=11 * 60 * S + 2) == [waiting if guard_s else fresh]


def test_a_group_being_preempted_stays_consistent_through_a_withdrawn_pause_a_lost_lease_and_a_cancel(r):
    c = Cluster(r, 1, owner=TenantQuota(nominal_gpus=1))
    members = [_submit(c, t) for t in "abc"]
    assert c.admit(limit=1) == members[:1]
    assert _join_all(c, members[0]) == members[1:]
    c.jobs.create_job("owner", model="other", training_file="f", resources=Resources(gpus=1), now_ms=1 * S)
    assert c.admit(at=1 * S) == [] and c.preempting() == sorted(members)
    # a pause replaces the preemption; withdrawn before the member stops, the preemption is back
    c.jobs.request_pause("a", members[0])
    assert r.hget(keys.job(members[0]), "control") == "pause"
    c.jobs.resume("a", members[0])
    assert r.hget(keys.job(members[0]), "control") == "preempt"
    # b's lease runs out: requeued by itself; the GPU is still held by a and c, still coming back
    for job_id in (members[0], members[2]):
        c.jobs.leases.renew_lease(c.claims[job_id].fence, 10 * 60_000)
    expired = c.jobs.leases.requeue_expired_leases(now_ms=int(r.time()[0]) * 1000 + 120_000)
    assert [e.job_id for e in expired] == [members[1]]
    assert _held(c) == {"a": 0.5, "c": 0.5} and _preempting(c) == {"a": "0.500", "c": "0.500"}
    assert c.allocated() == 1 and _incoming(c) == 1
    # c is cancelled, a hands its job back preempted: the last one out returns the GPU, nothing left over
    c.jobs.request_cancel("c", members[2])
    c.finish(members[2], at=2 * S, status=JobStatus.CANCELLED)  # as its dispatcher does on seeing the cancel
    assert _held(c) == {"a": 1} and _preempting(c) == {"a": "1"} and _incoming(c) == 1
    c.finish(members[0], at=2 * S, status=JobStatus.QUEUED, preempted=True)
    assert c.allocated() == 0 and _incoming(c) == 0 and _preempting(c) == {} and _held(c) == {}
    assert not r.keys(keys.sched_co_group("*")) and r.hlen(keys.sched_co_member_of()) == 0
    assert [c.jobs.load_job(j).status for j in members] == [JobStatus.QUEUED, JobStatus.QUEUED, JobStatus.CANCELLED]
