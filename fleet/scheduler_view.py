"""What the scheduler shows: the cluster view (nodes, GPUs, who runs, borrows, waits and why) and
each queued job's position and estimated start under the real policy."""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import redis
from pydantic import BaseModel

from fleet import fair_share, keys
from fleet.capacity import NodeCapacity
from fleet.quotas import QUOTA_FIELDS, TenantQuota
from fleet.scheduling import half_life_ms

__all__ = [
    "ClusterTotals",
    "TenantView",
    "ClusterView",
    "QueueEstimate",
    "cluster_view",
    "estimate_queue",
    "ASSUMED_JOB_S",
]

# A job's duration when nothing better is known (a queued job; a running one reporting no ETA, which is
# assumed half done). Estimates are rough by nature: they say so in docs/scheduling.md.
ASSUMED_JOB_S = 3600.0
_MAX_SIMULATED_ADMISSIONS = 2000
_READ_AHEAD = 200  # most queued jobs read per tenant for an estimate


class ClusterTotals(BaseModel):
    gpus: int | None  # None: no dispatcher has reported the nodes yet
    allocated: int
    free: int | None
    being_preempted: int


class TenantView(BaseModel):
    tenant_id: str
    quota: TenantQuota
    running_jobs: int
    running_gpus: int
    borrowed_gpus: int
    queued_jobs: int
    share_score: float
    waiting_reason: str | None = None  # why its head job waits (None: nothing queued)


class ClusterView(BaseModel):
    nodes: list[NodeCapacity]
    totals: ClusterTotals
    tenants: list[TenantView]


class QueueEstimate(BaseModel):
    position: int  # 1-based: jobs the policy admits before this one, plus one
    estimated_start_at: int | None  # Unix seconds; None when it cannot be estimated


@dataclass
class _Tenant:
    """A tenant as the view and the estimate read it."""

    tenant_id: str
    quota: TenantQuota
    consumed: float = 0.0
    at_ms: float = 0.0
    gpus: int = 0
    running: int = 0
    preempting: int = 0
    queued: int = 0
    jobs: list[tuple[str, int, float, int]] = field(default_factory=list)  # (id, gpus, queue score, not_before_ms)


def _now_ms(client: redis.Redis, now_ms: int | None) -> int:
    if now_ms is not None:
        return int(now_ms)
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def _read_tenants(client: redis.Redis, depth: int) -> dict[str, _Tenant]:
    """Every tenant that waits or runs: quota, usage state, and up to `depth` queued jobs each."""
    waiting = client.zrange(keys.queue_tenants(), 0, -1)
    holding = client.smembers(keys.sched_holding())
    ids = sorted(set(waiting) | set(holding))
    default = client.hgetall(keys.default_quota())
    pipe = client.pipeline(transaction=False)
    for t in ids:
        pipe.hgetall(keys.quota(t))
        pipe.hmget(keys.sched_tenant(t), "consumed", "at_ms", "gpus", "preempting")
        pipe.hget(keys.running_per_tenant(), t)
        pipe.zcard(keys.queue(t))
        pipe.zrange(keys.queue(t), 0, depth - 1, withscores=True)
    replies = pipe.execute()
    tenants: dict[str, _Tenant] = {}
    for i, t in enumerate(ids):
        quota_hash, state, running, queued, entries = replies[5 * i : 5 * i + 5]
        quota_fields = quota_hash or default
        quota = TenantQuota.from_redis_hash({k: v for k, v in quota_fields.items() if k in QUOTA_FIELDS})
        tenants[t] = _Tenant(
            t,
            quota,
            consumed=float(state[0] or 0),
            at_ms=float(state[1] or 0),
            gpus=int(state[2] or 0),
            running=int(running or 0),
            preempting=int(state[3] or 0),
            queued=int(queued),
            jobs=[(job_id, 1, score, 0) for job_id, score in entries],
        )
    pipe = client.pipeline(transaction=False)
    for tenant in tenants.values():
        for job_id, *_ in tenant.jobs:
            pipe.hmget(keys.job(job_id), "gpus", "not_before_ms")
    fields = iter(pipe.execute())
    for tenant in tenants.values():
        tenant.jobs = [
            (job_id, int(g or 1), score, int(nb or 0))
            for (job_id, _, score, _), (g, nb) in zip(tenant.jobs, fields, strict=False)
        ]
    return tenants


def _read_capacity(client: redis.Redis) -> tuple[int | None, int, int]:
    total = client.hget(keys.capacity(), "total_gpus")
    allocated, incoming = client.hmget(keys.sched_cluster(), "allocated", "incoming")
    return (int(total) if total is not None else None), max(int(allocated or 0), 0), max(int(incoming or 0), 0)


def _waiting_reason(t: _Tenant, free: int | None, now_ms: int) -> str | None:
    """Why the tenant's head job is not admitted now, in a tenant's words (never naming others)."""
    if not t.jobs:
        return None
    _, g, _, _ = t.jobs[0]
    q = t.quota
    if q.max_running_jobs is not None and t.running >= q.max_running_jobs:
        return f"tenant at max_running_jobs ({q.max_running_jobs})"
    if fair_share.tier(q, t.gpus, g) is None:
        limit = q.nominal_gpus + (q.borrowing_limit_gpus or 0)
        return (
            f"waiting for {g} GPUs; tenant holds {t.gpus} of its nominal quota {q.nominal_gpus} "
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
        return f"waiting for {g} GPUs; {free_text}; {standing}{reclaim}"
    return f"waiting for its turn ({g} GPUs; {free_text}; {standing}); tenants with a lower share go first"


def cluster_view(client: redis.Redis, now_ms: int | None = None) -> ClusterView:
    """Nodes, GPU totals, and per tenant: quota, what it runs, what it borrows, what waits and why."""
    now = _now_ms(client, now_ms)
    hl = half_life_ms(client)
    total, allocated, incoming = _read_capacity(client)
    free = None if total is None else max(total - allocated, 0)
    raw_nodes = client.hgetall(keys.capacity_nodes())
    nodes = [NodeCapacity.model_validate_json(raw_nodes[n]) for n in sorted(raw_nodes)]
    views = []
    for t in _read_tenants(client, depth=1).values():
        score = fair_share.decayed_usage(t.consumed, t.at_ms, t.gpus, now, hl) / t.quota.weight
        views.append(
            TenantView(
                tenant_id=t.tenant_id,
                quota=t.quota,
                running_jobs=t.running,
                running_gpus=t.gpus,
                borrowed_gpus=max(t.gpus - t.quota.nominal_gpus, 0),
                queued_jobs=t.queued,
                share_score=round(score, 6),
                waiting_reason=_waiting_reason(t, free, now),
            )
        )
    totals = ClusterTotals(gpus=total, allocated=allocated, free=free, being_preempted=incoming)
    return ClusterView(nodes=nodes, totals=totals, tenants=views)


def _running_ends(client: redis.Redis, now_ms: int) -> list[tuple[float, str, int]]:
    """(expected end ms, tenant, gpus) of every running job: its reported ETA (estimated_finish), else
    assumed half done."""
    ids = client.zrange(keys.sched_running_jobs(), 0, -1)
    pipe = client.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(keys.job(job_id), "tenant_id", "gpus", "estimated_finish")
    ends = []
    for tenant, g, finish in pipe.execute():
        if tenant is None:
            continue
        end = float(finish) * 1000 if finish else now_ms + ASSUMED_JOB_S * 500
        ends.append((max(end, now_ms), tenant, int(g or 1)))
    return ends


def estimate_queue(client: redis.Redis, job_ids: list[str], *, now_ms: int | None = None) -> dict[str, QueueEstimate]:
    """Position and estimated start of each queued job in `job_ids` (jobs not queued are left out).

    Replays the policy forward (fleet.fair_share's order, quotas, free capacity, back-offs) from the
    current state. Assumptions: running jobs end at their reported ETA (else are half done), queued
    jobs run ASSUMED_JOB_S, no new jobs arrive, nothing is cancelled, and reclaim waits for jobs to
    end instead of preempting them (so a reclaiming tenant's estimate is an upper bound). Past
    _MAX_SIMULATED_ADMISSIONS, a job's position is extrapolated and its start is None.
    """
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(keys.job(job_id), "status", "tenant_id")
    wanted: dict[str, str] = {}
    for job_id, (status, tenant) in zip(job_ids, pipe.execute(), strict=True):
        if status == "queued" and tenant is not None:
            wanted[job_id] = tenant
    if not wanted:
        return {}
    pipe = client.pipeline(transaction=False)
    for job_id, tenant in wanted.items():
        pipe.zrank(keys.queue(tenant), job_id)
    ranks = {j: r for j, r in zip(wanted, pipe.execute(), strict=True) if r is not None}
    depth = min(max(ranks.values(), default=0) * 4 + 8, _READ_AHEAD)
    now = _now_ms(client, now_ms)
    total, _, _ = _read_capacity(client)
    tenants = _read_tenants(client, depth)
    return _simulate(tenants, _running_ends(client, now), total, now, half_life_ms(client), ranks, wanted)


def _simulate(
    tenants: dict[str, _Tenant],
    ends: list[tuple[float, str, int]],
    total: int | None,
    now: int,
    hl: float,
    ranks: dict[str, int],
    wanted: dict[str, str],
) -> dict[str, QueueEstimate]:
    """Admit in policy order at simulated times until every wanted job is placed (see estimate_queue)."""
    capacity = math.inf if total is None else total
    used = sum(g for _, _, g in ends)
    heapq.heapify(ends)
    heads = {t: 0 for t in tenants}  # index of each tenant's next job in its read (or extrapolated) queue
    out: dict[str, QueueEstimate] = {}
    admitted = 0
    t = float(now)

    def head(tenant: _Tenant) -> tuple[str, int, float, int] | None:
        i = heads[tenant.tenant_id]
        if i < len(tenant.jobs):
            return tenant.jobs[i]
        if i < tenant.queued and tenant.jobs:  # beyond what was read: like its last read job
            job_id, g, score, _ = tenant.jobs[-1]
            return (f"{job_id}+{i}", g, score + i, 0)
        return None

    while len(out) < len(wanted) and admitted < _MAX_SIMULATED_ADMISSIONS:
        cands = []
        for tenant in tenants.values():
            h = head(tenant)
            if h is None or h[3] > t:
                continue
            q = tenant.quota
            entry_tier = fair_share.tier(q, tenant.gpus, h[1])
            if entry_tier is None or (q.max_running_jobs is not None and tenant.running >= q.max_running_jobs):
                continue
            score = fair_share.decayed_usage(tenant.consumed, tenant.at_ms, tenant.gpus, t, hl) / q.weight
            key = fair_share.entry_key(entry_tier, score, tenant.gpus / q.weight, h[2])
            cands.append((key, tenant, h, entry_tier))
        cands.sort(key=lambda c: c[0])
        avail = capacity - used
        chosen = None
        for _, tenant, h, entry_tier in cands:
            if h[1] <= avail:
                chosen = (tenant, h)
                break
            if entry_tier <= fair_share.RECLAIMING and tenant.gpus < tenant.quota.nominal_gpus:
                avail = 0  # a reclaiming head holds the free capacity (as the Lua does)
        if chosen is None:
            backoffs = [h[3] for tn in tenants.values() if (h := head(tn)) is not None and h[3] > t]
            next_t = min(([ends[0][0]] if ends else []) + backoffs, default=None)
            if next_t is None:
                break  # nothing running and nothing admissible: the rest waits on a quota change
            t = max(t, next_t)
            while ends and ends[0][0] <= t:
                _, tid, g = heapq.heappop(ends)
                used -= g
                if tid in tenants:
                    _fold(tenants[tid], -g, -1, t, hl)
            continue
        tenant, (job_id, g, _, _) = chosen
        admitted += 1
        heads[tenant.tenant_id] += 1
        if job_id in wanted:
            out[job_id] = QueueEstimate(position=admitted, estimated_start_at=int(t // 1000))
        used += g
        _fold(tenant, g, 1, t, hl)
        heapq.heappush(ends, (t + ASSUMED_JOB_S * 1000, tenant.tenant_id, g))
    waiting = max(len([tn for tn in tenants.values() if tn.queued]), 1)
    for job_id, rank in ranks.items():
        if job_id not in out:  # beyond the simulated horizon: every waiting tenant takes turns
            tenant = tenants.get(wanted[job_id])
            done = heads.get(wanted[job_id], 0) if tenant else 0
            out[job_id] = QueueEstimate(position=admitted + (rank - done) * waiting + 1, estimated_start_at=None)
    return out


def _fold(tenant: _Tenant, dg: int, dj: int, t: float, hl: float) -> None:
    """The tenant now holds dg more GPUs (as the Lua's add_usage)."""
    tenant.consumed = fair_share.decayed_usage(tenant.consumed, tenant.at_ms, tenant.gpus, t, hl)
    tenant.gpus += dg
    tenant.running += dj
    tenant.at_ms = t
    if hl <= 0:
        tenant.consumed = tenant.gpus

