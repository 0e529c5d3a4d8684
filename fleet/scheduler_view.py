"""What the scheduler shows: the cluster view (nodes, GPUs, who runs, borrows, waits and why) and
each queued job's position and estimated start under the real policy (read by fleet.scheduler_state,
replayed by fleet.queue_replay)."""

from __future__ import annotations

import math

import redis
from pydantic import BaseModel

from fleet import fair_share, keys
from fleet.capacity import NodeCapacity
from fleet.queue_replay import QueueEstimate, replay
from fleet.quotas import TenantQuota
from fleet.scheduler_state import ASSUMED_JOB_S, TenantState, held_gpus, read_state

__all__ = [
    "ClusterTotals",
    "TenantView",
    "ClusterView",
    "QueueEstimate",
    "cluster_view",
    "estimate_queue",
    "ASSUMED_JOB_S",
]


class ClusterTotals(BaseModel):
    gpus: int | None  # None: no dispatcher has reported the nodes yet
    allocated: int
    free: int | None
    being_preempted: int


class TenantView(BaseModel):
    tenant_id: str
    quota: TenantQuota
    running_jobs: int
    running_gpus: int | float  # a co-trained job counts its share of its group's GPUs (docs/scheduling.md)
    borrowed_gpus: int | float
    queued_jobs: int
    share_score: float
    waiting_reason: str | None = None  # why its head job waits (None: nothing queued)


class ClusterView(BaseModel):
    nodes: list[NodeCapacity]
    totals: ClusterTotals
    tenants: list[TenantView]


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _waiting_reason(t: TenantState, free: int | None, now_ms: int) -> str | None:
    """Why the tenant's head job is not admitted now, in a tenant's words (never naming others); jobs
    set aside as never fitting the tenant's quota are said too."""
    unfit = [g for _, g, until in t.parked if until is None]
    backing_off = [(g, until) for _, g, until in t.parked if until is not None]
    aside = ""
    if unfit:
        q = t.quota
        limit = q.nominal_gpus + (q.borrowing_limit_gpus or 0)
        aside = (
            f"{len(unfit)} job(s) of {_gpus(max(unfit))} set aside: cannot fit the tenant's quota (nominal "
            f"{q.nominal_gpus} + borrowing limit {q.borrowing_limit_gpus} = {limit}); back when the quota changes"
        )
    head = _head_reason(t, free, now_ms, backing_off)
    return "; ".join(r for r in (head, aside) if r) or None


def _head_reason(t: TenantState, free: int | None, now_ms: int, backing_off: list[tuple[int, int]]) -> str | None:
    if not t.jobs:
        if backing_off:
            g, until = backing_off[0]
            return f"waiting {math.ceil(max(until - now_ms, 0) / 1000)} s to retry placing its {_gpus(g)} on the nodes"
        return None
    _, g, _ = t.jobs[0]
    q = t.quota
    if q.max_running_jobs is not None and t.running >= q.max_running_jobs:
        return f"tenant at max_running_jobs ({q.max_running_jobs})"
    if fair_share.tier(q, t.gpus, g, t.growth) is None:
        limit = q.nominal_gpus + (q.borrowing_limit_gpus or 0)
        holds = f"tenant holds {t.gpus}"
        if t.co_growth > 0:  # the limit counts what its co-trained shares may grow back to (docs/scheduling.md)
            could = held_gpus(str(round(t.gpus + t.growth, 3)))
            holds += f" (may grow back to {could} as the other members of its co-trained groups leave)"
        return (
            f"waiting for {_gpus(g)}; {holds} of its nominal quota {q.nominal_gpus} "
            f"+ borrowing limit {q.borrowing_limit_gpus} = {limit}"
        )
    free_text = "capacity unknown" if free is None else f"{free} free"
    if t.gpus >= q.nominal_gpus:
        standing = "tenant at nominal quota" if q.nominal_gpus else "tenant has no nominal quota (borrows idle GPUs)"
    elif t.gpus + g <= q.nominal_gpus:
        standing = "within the tenant's nominal quota"
    else:
        standing = "tenant below nominal quota; the job would borrow"
    if free is not None and g > free:
        reclaim = "; reclaiming borrowed GPUs" if t.gpus < q.nominal_gpus else ""
        return f"waiting for {_gpus(g)}; {free_text}; {standing}{reclaim}"
    return f"waiting for its turn ({_gpus(g)}; {free_text}; {standing}); tenants with a lower share go first"


def cluster_view(client: redis.Redis, now_ms: int | None = None) -> ClusterView:
    """Nodes, GPU totals, and per tenant: quota, what it runs, what it borrows, what waits and why."""
    state = read_state(client, [], now_ms, depth=1)
    free = None if state.total is None else max(state.total - state.allocated, 0)
    raw_nodes = client.hgetall(keys.capacity_nodes())
    nodes = [NodeCapacity.model_validate_json(raw_nodes[n]) for n in sorted(raw_nodes)]
    views = []
    for t in state.tenants.values():
        usage = fair_share.decayed_usage(t.consumed, t.at_ms, t.gpus, state.now_ms, state.half_life_ms)
        views.append(
            TenantView(
                tenant_id=t.tenant_id,
                quota=t.quota,
                running_jobs=t.running,
                running_gpus=t.gpus,
                borrowed_gpus=max(t.gpus - t.quota.nominal_gpus, 0),
                queued_jobs=t.queued,
                share_score=round(usage / t.quota.weight, 6),
                waiting_reason=_waiting_reason(t, free, state.now_ms),
            )
        )
    totals = ClusterTotals(gpus=state.total, allocated=state.allocated, free=free, being_preempted=state.incoming)
    return ClusterView(nodes=nodes, totals=totals, tenants=views)


def estimate_queue(client: redis.Redis, job_ids: list[str], *, now_ms: int | None = None) -> dict[str, QueueEstimate]:
    """Position and estimated start of each queued job in `job_ids` (jobs not queued are left out).

    Replays the policy forward (fleet.fair_share's order, quotas, free capacity, back-offs) from the
    current state. Assumptions: running jobs end at their reported ETA (else are half done), queued
    jobs run ASSUMED_JOB_S, no new jobs arrive, nothing is cancelled, and reclaim waits for jobs to
    end instead of preempting them (so a reclaiming tenant's estimate is an upper bound), and admission's
    starvation guard is not replayed (a co-training join's is, as CO_JOIN applies it). Past
    its bound (fleet.queue_replay), a job's position is extrapolated (every other waiting tenant admits
    jobs in proportion to its weight meanwhile) and its start is None. A job parked by a placement
    back-off is out of the queue until its time: no estimate.
    """
    state = read_state(client, job_ids, now_ms)
    if not state.wanted:
        return {}
    return replay(
        state.tenants, state.ends, state.total, state.now_ms, state.half_life_ms, state.ranks, state.wanted,
        groups=state.groups, co_keys=state.co_keys, co_max_group=state.co_max_group, co_memory=state.co_memory,
        queued_at=state.queued_at, guard_ms=state.guard_ms,
    )
