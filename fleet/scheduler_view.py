"""What the scheduler shows: the cluster view (nodes, GPUs, who runs, borrows, waits and why) and
each queued job's position and estimated start under the real policy."""

from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, field

import redis
from pydantic import BaseModel

from fleet import fair_share, keys
from fleet.capacity import NodeCapacity
from fleet.quotas import QUOTA_FIELDS, TenantQuota
from fleet.sched_scripts import DEFAULT_HALF_LIFE_MS, DEFAULT_STARVATION_GUARD_MS

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
# An estimate runs on every job read through the API (and every create), so it is bounded: it replays
# at most this many admissions, reading at most _READ_AHEAD queued jobs per tenant (later ones are
# taken to be like the last one read); past that, positions are extrapolated by weight.
_MAX_SIMULATED_ADMISSIONS = 256
_READ_AHEAD = 32
_CO_JOIN_DEPTH = 16  # as fleet.sched_scripts.CO_JOIN: idle tenants read per bucket when a group forms
_CO_MEMORY_PREFIX = "co_memory:"  # sched_config fields CO_JOIN records: "<capacity> <fixed> <per rank>" bytes


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
    preempting: int | float = 0
    queued: int = 0
    jobs: list[tuple[str, int, float]] = field(default_factory=list)  # (id, gpus, queue score), head first
    # out of the queue: (id, gpus, until ms), until None for a job set aside as never fitting the quota
    parked: list[tuple[str, int, int | None]] = field(default_factory=list)


# A running job as the replay ends it: (expected end ms, job id, tenant, GPUs it counts, its group id or "").
_End = tuple[float, str, str, float, str]


@dataclass
class _Group:
    """A co-training group as the replay moves it (as the Lua's co_rebalance and co_release do): it holds
    its `gpus` until its last member ends; each member counts its share (milli-GPUs) in its tenant's usage,
    and when one ends the others' shares grow back."""

    gpus: int
    members: dict[str, list] = field(default_factory=dict)  # job id -> [tenant id, milli-GPUs]


@dataclass(frozen=True)
class _CoMemory:
    """A co-training key's memory terms as the dispatchers record them (CO_JOIN): a group's budget (bytes)
    before any member, and each member's cost, fixed + per_rank × its LoRA rank."""

    capacity: int
    fixed: int
    per_rank: int

    def cost(self, rank: int) -> int:
        return self.fixed + self.per_rank * rank


@dataclass
class _State:
    """The scheduler's state as one estimate or view reads it (a few round trips, whatever the size)."""

    now_ms: int
    half_life_ms: float
    total: int | None
    allocated: int
    incoming: int
    tenants: dict[str, _Tenant]
    ends: list[_End]  # running jobs
    wanted: dict[str, str]  # queued job id -> tenant, of the job ids asked about
    ranks: dict[str, int]  # queued job id -> index in its tenant's queue
    groups: dict[str, _Group] = field(default_factory=dict)  # running co-training groups by id
    co_keys: dict[str, tuple[str, int]] = field(default_factory=dict)  # read queued job id -> (co-training key, rank)
    co_max_group: int = 1  # co-training's group size limit (1: off)
    co_memory: dict[str, _CoMemory] = field(default_factory=dict)  # co-training key -> its memory terms
    queued_at: dict[str, float] = field(default_factory=dict)  # read queued job id -> since when it waits (ms)
    guard_ms: float = DEFAULT_STARVATION_GUARD_MS  # the starvation guard (0: off)


def _read_state(client: redis.Redis, job_ids: list[str], now_ms: int | None, depth: int | None = None) -> _State:
    """Read what views and estimates need: the cluster, every tenant that waits or runs (quota, usage,
    up to `depth` queued jobs; None: as many as an estimate can use), the running jobs, and the
    status and queue rank of `job_ids`. Running jobs end at their reported ETA (estimated_finish), else
    are taken to be half done."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(keys.job(job_id), "status", "tenant_id")
    pipe.time()
    pipe.hget(keys.capacity(), "total_gpus")
    pipe.hmget(keys.sched_cluster(), "allocated", "incoming")
    pipe.zrange(keys.queue_tenants(), 0, -1)
    pipe.smembers(keys.sched_holding())
    pipe.hgetall(keys.default_quota())
    pipe.hget(keys.sched_config(), "half_life_ms")
    pipe.zrange(keys.sched_running_jobs(), 0, -1)
    pipe.zrange(keys.sched_backoff(), 0, -1, withscores=True)
    *statuses, (seconds, micros), total, (allocated, incoming), waiting, holding, default, hl, running_ids, parked = (
        pipe.execute()
    )
    now = int(now_ms) if now_ms is not None else seconds * 1000 + micros // 1000
    wanted = {j: t for j, (status, t) in zip(job_ids, statuses, strict=True) if status == "queued" and t}
    parked_pipe = client.pipeline(transaction=False)
    for job_id, _ in parked:
        parked_pipe.hmget(keys.job(job_id), "tenant_id", "gpus")
    parked_by_tenant: dict[str, list[tuple[str, int, int | None]]] = {}
    for (job_id, until), (tenant, g) in zip(parked, parked_pipe.execute() if parked else [], strict=True):
        if tenant is not None:
            end = None if math.isinf(until) else int(until)
            parked_by_tenant.setdefault(tenant, []).append((job_id, int(g or 1), end))
    ids = sorted(set(waiting) | set(holding) | set(parked_by_tenant))
    if depth is None:
        depth = min(_READ_AHEAD, max(2, 2048 // max(len(ids), 1)))
    pipe = client.pipeline(transaction=False)
    for job_id, tenant in wanted.items():
        pipe.zrank(keys.queue(tenant), job_id)
    for t in ids:
        pipe.hgetall(keys.quota(t))
        pipe.hmget(keys.sched_tenant(t), "consumed", "at_ms", "gpus", "preempting", "running")
        pipe.zcard(keys.queue(t))
        pipe.zrange(keys.queue(t), 0, depth - 1, withscores=True)
    for job_id in running_ids:
        pipe.hmget(keys.job(job_id), "tenant_id", "gpus", "estimated_finish")
    if running_ids:  # which co-training group each runs in (None: alone)
        pipe.hmget(keys.sched_co_member_of(), running_ids)
    replies = pipe.execute()
    ranks = {j: r for j, r in zip(wanted, replies, strict=False) if r is not None}
    replies = replies[len(wanted) :]
    tenants: dict[str, _Tenant] = {}
    for i, t in enumerate(ids):
        quota_hash, state, queued, entries = replies[4 * i : 4 * i + 4]
        quota_fields = quota_hash or default
        tenants[t] = _Tenant(
            t,
            TenantQuota.from_redis_hash({k: v for k, v in quota_fields.items() if k in QUOTA_FIELDS}),
            consumed=float(state[0] or 0),
            at_ms=float(state[1] or 0),
            gpus=_held_gpus(state[2]),
            preempting=_held_gpus(state[3]),
            running=int(state[4] or 0),
            queued=int(queued),
            jobs=[(job_id, 1, score) for job_id, score in entries],
            parked=parked_by_tenant.get(t, []),
        )
    running = replies[4 * len(ids) : 4 * len(ids) + len(running_ids)]
    member_of = replies[-1] if running_ids else []
    ends, groups = _running(client, running_ids, running, member_of, now)
    pipe = client.pipeline(transaction=False)
    for tenant in tenants.values():
        for job_id, *_ in tenant.jobs:
            pipe.hmget(keys.job(job_id), "gpus", "spec", "base_model", "model", "queued_at_ms")
    pipe.hgetall(keys.sched_config())
    *fields, config = pipe.execute()
    read = iter(fields)
    co_keys: dict[str, tuple[str, int]] = {}
    queued_at: dict[str, float] = {}
    for tenant in tenants.values():
        jobs = []
        for job_id, _, score in tenant.jobs:
            g, spec, base, model, since = next(read)
            if (key := _co_training_key(spec, base if base is not None else model)) is not None:
                co_keys[job_id] = key
            if since is not None:
                queued_at[job_id] = float(since)
            jobs.append((job_id, int(g or 1), score))
        tenant.jobs = jobs
    co_max = config.get("co_training_max_group")
    co_memory = {}
    for name, value in config.items():
        if name.startswith(_CO_MEMORY_PREFIX):
            capacity, fixed, per_rank = (int(x) for x in value.split())
            co_memory[name[len(_CO_MEMORY_PREFIX) :]] = _CoMemory(capacity, fixed, per_rank)
    return _State(
        now_ms=now,
        half_life_ms=float(hl) if hl is not None else DEFAULT_HALF_LIFE_MS,
        total=int(total) if total is not None else None,
        allocated=max(int(allocated or 0), 0),
        incoming=max(int(incoming or 0), 0),
        tenants=tenants,
        ends=ends,
        wanted=wanted,
        ranks=ranks,
        groups=groups,
        co_keys=co_keys,
        co_max_group=int(co_max) if co_max is not None else 1,
        co_memory=co_memory,
        queued_at=queued_at,
        guard_ms=float(config.get("starvation_guard_ms", DEFAULT_STARVATION_GUARD_MS)),
    )


def _running(
    client: redis.Redis, job_ids: list[str], fields: list, member_of: list[str | None], now: int
) -> tuple[list[_End], dict[str, _Group]]:
    """The running jobs' ends and their co-training groups: a member counts its share of its group's GPUs
    (`m:<job>` milli-GPUs in the group's hash, as the Lua's co_release reads it), not the group's GPUs."""
    gids = sorted({gid for gid in member_of if gid})
    pipe = client.pipeline(transaction=False)
    for gid in gids:
        pipe.hgetall(keys.sched_co_group(gid))
    hashes = dict(zip(gids, pipe.execute() if gids else [], strict=True))
    ends: list[_End] = []
    groups: dict[str, _Group] = {}
    for job_id, (tenant, g, finish), gid in zip(job_ids, fields, member_of, strict=True):
        if tenant is None:
            continue
        end = max(float(finish) * 1000 if finish else now + ASSUMED_JOB_S * 500, now)
        group_hash = hashes.get(gid) if gid else None
        if not group_hash:  # alone (or its group ended between the reads)
            ends.append((end, job_id, tenant, int(g or 1), ""))
            continue
        group = groups.setdefault(gid, _Group(int(group_hash.get("gpus") or 1)))
        milli = int((group_hash.get(f"m:{job_id}") or "0").split(" ", 1)[0])
        group.members[job_id] = [tenant, milli]
        ends.append((end, job_id, tenant, milli / 1000, gid))
    return ends, groups


def _co_training_key(spec_json: str | None, base: str | None) -> tuple[str, int] | None:
    """What a queued job must share with others to be co-trained with them, and its LoRA rank (as the
    Lua's co_key in CO_JOIN reads them), or None: it trains alone."""
    if not spec_json:
        return None
    try:
        spec = json.loads(spec_json)
    except ValueError:
        return None
    if not isinstance(spec, dict) or spec.get("co_training") is False:
        return None
    resources = spec.get("resources")
    if not isinstance(resources, dict) or resources.get("workers") != 1:
        return None
    if resources.get("gpus_per_worker", 1) != 1:
        return None
    quantization = spec.get("quantization")
    lora = spec.get("lora")
    rank = lora.get("r") if isinstance(lora, dict) and isinstance(lora.get("r"), int | float) else 8
    return f"{base or ''}|{quantization if isinstance(quantization, str) else ''}|1", int(rank)


def _held_gpus(stored: str | None) -> int | float:
    """A tenant's GPUs as the Lua stores them: whole, or with co-trained jobs' shares, to the milli-GPU."""
    held = float(stored or 0)
    return int(held) if held.is_integer() else held


def _gpus(n: int) -> str:
    return f"{n} GPU" if n == 1 else f"{n} GPUs"


def _waiting_reason(t: _Tenant, free: int | None, now_ms: int) -> str | None:
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


def _head_reason(t: _Tenant, free: int | None, now_ms: int, backing_off: list[tuple[int, int]]) -> str | None:
    if not t.jobs:
        if backing_off:
            g, until = backing_off[0]
            return f"waiting {math.ceil(max(until - now_ms, 0) / 1000)} s to retry placing its {_gpus(g)} on the nodes"
        return None
    _, g, _ = t.jobs[0]
    q = t.quota
    if q.max_running_jobs is not None and t.running >= q.max_running_jobs:
        return f"tenant at max_running_jobs ({q.max_running_jobs})"
    if fair_share.tier(q, t.gpus, g) is None:
        limit = q.nominal_gpus + (q.borrowing_limit_gpus or 0)
        return (
            f"waiting for {_gpus(g)}; tenant holds {t.gpus} of its nominal quota {q.nominal_gpus} "
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
    state = _read_state(client, [], now_ms, depth=1)
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
    _MAX_SIMULATED_ADMISSIONS, a job's position is extrapolated (every other waiting tenant admits
    jobs in proportion to its weight meanwhile) and its start is None. A job parked by a placement
    back-off is out of the queue until its time: no estimate.
    """
    state = _read_state(client, job_ids, now_ms)
    if not state.wanted:
        return {}
    return _simulate(
        state.tenants, state.ends, state.total, state.now_ms, state.half_life_ms, state.ranks, state.wanted,
        groups=state.groups, co_keys=state.co_keys, co_max_group=state.co_max_group, co_memory=state.co_memory,
        queued_at=state.queued_at, guard_ms=state.guard_ms,
    )


def _simulate(
    tenants: dict[str, _Tenant],
    ends: list[_End],
    total: int | None,
    now: int,
    hl: float,
    ranks: dict[str, int],
    wanted: dict[str, str],
    *,
    groups: dict[str, _Group] | None = None,
    co_keys: dict[str, tuple[str, int]] | None = None,
    co_max_group: int = 1,
    co_memory: dict[str, _CoMemory] | None = None,
    queued_at: dict[str, float] | None = None,
    guard_ms: float = 0,
) -> dict[str, QueueEstimate]:
    """Admit in policy order at simulated times until every wanted job is placed (see estimate_queue).

    Indexed as the Lua is: idle tenants in heaps per (tier, head GPUs, weight) under their time-invariant
    order, tenants holding GPUs scored directly; a step costs O(buckets + holding tenants + log T).
    """
    co_keys, co_memory, groups, queued_at = co_keys or {}, co_memory or {}, dict(groups or {}), queued_at or {}
    capacity = math.inf if total is None else total
    # a group's GPUs count once, held until its last member ends
    used = sum(g for *_, g, gid in ends if not gid) + sum(group.gpus for group in groups.values())
    heapq.heapify(ends)
    heads = {t: 0 for t in tenants}  # index of each tenant's next job in its read (or extrapolated) queue
    out: dict[str, QueueEstimate] = {}
    admitted = 0
    t = float(now)
    # (tier, gpus, weight) -> heap of [order, tenant id, valid]
    buckets: dict[tuple[int, int, float], list[list]] = {}
    entries: dict[str, list] = {}
    holding = {tid for tid, tn in tenants.items() if tn.gpus > 0}

    def head(tenant: _Tenant) -> tuple[str, int, float] | None:
        i = heads[tenant.tenant_id]
        if i < len(tenant.jobs):
            return tenant.jobs[i]
        if i < tenant.queued and tenant.jobs:  # beyond what was read: like its last read job
            job_id, g, score = tenant.jobs[-1]
            return (f"{job_id}+{i}", g, score + i)
        return None

    def place(tenant: _Tenant) -> None:
        """(Re-)index an idle tenant's head, as the Lua's reindex does."""
        if (old := entries.pop(tenant.tenant_id, None)) is not None:
            old[2] = False
        h = head(tenant)
        q = tenant.quota
        if tenant.gpus > 0 or h is None or (q.max_running_jobs is not None and q.max_running_jobs <= 0):
            return
        entry_tier = fair_share.tier(q, 0, h[1])
        if entry_tier is None:
            return
        if hl <= 0 or tenant.consumed <= 0:
            order = (0, 0.0, h[2])
        else:
            order = (1, math.log2(tenant.consumed / q.weight) + tenant.at_ms / hl, h[2])
        entry = [order, tenant.tenant_id, True]
        heapq.heappush(buckets.setdefault((entry_tier, h[1], q.weight), []), entry)
        entries[tenant.tenant_id] = entry

    def admit(tenant: _Tenant, dg: float) -> None:
        """The tenant's head starts, holding dg GPUs (as the Lua's start_job and add_usage)."""
        heads[tenant.tenant_id] += 1
        _fold(tenant, dg, 1, t, hl)
        holding.add(tenant.tenant_id)
        place(tenant)  # now holding: out of the idle index

    def co_join(key: str, g: int, members: int, mem_left: float) -> tuple[_Tenant, str] | None:
        """The head that joins a group of g GPUs as its member number `members`, as CO_JOIN picks it:
        idle tenants' heads of g GPUs (the first _CO_JOIN_DEPTH of each bucket and kind) and the heads
        of tenants holding GPUs, compatible (`key`), whose quota admits the share and whose memory cost
        fits `mem_left` (bytes), in admission's order (tier and entry score counting the head's g GPUs), a
        head past the starvation guard first within its tier (as the Lua's starvation_guard)."""
        share = g / members
        found = []
        for (_, bucket_g, weight), heap in buckets.items():
            if bucket_g != g:
                continue
            for kind in (0, 1):  # the Lua's buckets of kinds 'z' and 'k'
                for order, tid, _ in heapq.nsmallest(_CO_JOIN_DEPTH, [e for e in heap if e[2] and e[0][0] == kind]):
                    consumed = 0.0 if kind == 0 else 2.0 ** min(order[1] - t / hl, 1000.0) * weight
                    found.append((tenants[tid], consumed))
        for tid in holding:
            tn = tenants[tid]
            found.append((tn, fair_share.decayed_usage(tn.consumed, tn.at_ms, tn.gpus, t, hl)))
        cands = []
        for tn, consumed in found:
            h, q = head(tn), tn.quota
            if h is None or h[1] != g or (co := co_keys.get(h[0])) is None or co[0] != key:
                continue
            if key in co_memory and co_memory[key].cost(co[1]) > mem_left:
                continue
            if (q.max_running_jobs is not None and tn.running >= q.max_running_jobs) or (
                fair_share.tier(q, tn.gpus, share) is None
            ):
                continue
            entry_tier = fair_share.tier(q, tn.gpus, g)
            order_key = fair_share.entry_key(
                fair_share.BORROWING if entry_tier is None else entry_tier,
                fair_share.entry_score(consumed, tn.gpus, g, q.weight, hl),
                tn.gpus / q.weight,
                h[2],
            )
            cands.append((order_key, tn, h[0]))
        if not cands:
            return None
        cands.sort(key=lambda c: c[0])
        waited = [c for c in cands if guard_ms > 0 and t - queued_at.get(c[2], t) > guard_ms]
        if waited and waited[0][0][0] == cands[0][0][0]:  # the guarded head leads its tier
            return waited[0][1], waited[0][2]
        return cands[0][1], cands[0][2]

    for tenant in tenants.values():
        place(tenant)
    while len(out) < len(wanted) and admitted < _MAX_SIMULATED_ADMISSIONS:
        avail = capacity - used
        cands = []
        for (entry_tier, g, weight), heap in buckets.items():
            while heap and not heap[0][2]:
                heapq.heappop(heap)
            if not heap or (entry_tier == fair_share.BORROWING and g > avail):
                continue
            order, tid, _ = heap[0]
            tenant = tenants[tid]
            h = head(tenant)
            consumed = 0.0 if order[0] == 0 else 2.0 ** min(order[1] - t / hl, 1000.0) * weight
            score = fair_share.entry_score(consumed, 0, g, weight, hl)
            cands.append((fair_share.entry_key(entry_tier, score, 0.0, h[2]), tenant, h, entry_tier))
        for tid in holding:
            tenant = tenants[tid]
            h = head(tenant)
            q = tenant.quota
            if h is None or (q.max_running_jobs is not None and tenant.running >= q.max_running_jobs):
                continue
            entry_tier = fair_share.tier(q, tenant.gpus, h[1])
            if entry_tier is None:
                continue
            consumed = fair_share.decayed_usage(tenant.consumed, tenant.at_ms, tenant.gpus, t, hl)
            score = fair_share.entry_score(consumed, tenant.gpus, h[1], q.weight, hl)
            cands.append((fair_share.entry_key(entry_tier, score, tenant.gpus / q.weight, h[2]), tenant, h, entry_tier))
        cands.sort(key=lambda c: c[0])
        chosen = None
        for _, tenant, h, entry_tier in cands:
            if h[1] <= avail:
                chosen = (tenant, h)
                break
            if entry_tier <= fair_share.RECLAIMING and tenant.gpus < tenant.quota.nominal_gpus:
                avail = 0  # a reclaiming head holds the free capacity (as the Lua does)
        if chosen is None:
            if not ends:
                break  # nothing running and nothing admissible: the rest waits on a quota change
            t = max(t, ends[0][0])
            while ends and ends[0][0] <= t:
                _, job_id, tid, g, gid = heapq.heappop(ends)
                if gid:  # a member: its share goes back to the others; the last one out frees the GPUs
                    group = groups[gid]
                    _, g = group.members.pop(job_id)
                    g /= 1000
                    if not group.members:
                        used -= group.gpus
                        del groups[gid]
                else:
                    used -= g
                if tid in tenants:
                    _fold(tenants[tid], -g, -1, t, hl)
                if gid in groups:
                    _rebalance(groups[gid], tenants, t, hl)
                if tid in tenants and tenants[tid].gpus <= 0:
                    holding.discard(tid)
                    place(tenants[tid])
            continue
        tenant, (job_id, g, _) = chosen
        used += g
        admit(tenant, g)
        # Co-training (docs/scheduling.md#co-training): compatible heads join the admitted job at once,
        # one at a time as CO_JOIN takes them, sharing its g GPUs (each holds its share, rebalanced).
        group = _Group(g, {job_id: [tenant.tenant_id, g * 1000]})
        co = co_keys.get(job_id)
        mem_left = math.inf  # CO_JOIN checks memory where the dispatchers recorded its terms (co_memory)
        if co is not None and co[0] in co_memory:
            mem_left = co_memory[co[0]].capacity - co_memory[co[0]].cost(co[1])
        while co is not None and len(group.members) < co_max_group and (
            joiner := co_join(co[0], g, len(group.members) + 1, mem_left)
        ):
            member, member_job = joiner
            if co[0] in co_memory:
                mem_left -= co_memory[co[0]].cost(co_keys[member_job][1])
            group.members[member_job] = [member.tenant_id, 0]
            admit(member, 0)
            _rebalance(group, tenants, t, hl)
        gid = f"replay:{job_id}" if len(group.members) > 1 else ""
        if gid:
            groups[gid] = group
        for member_job, (tid, milli) in list(group.members.items()):
            admitted += 1
            if member_job in wanted:
                out[member_job] = QueueEstimate(position=admitted, estimated_start_at=int(t // 1000))
            heapq.heappush(ends, (t + ASSUMED_JOB_S * 1000, member_job, tid, milli / 1000 if gid else g, gid))
    for job_id, rank in ranks.items():
        if job_id not in out:  # beyond the simulated horizon: the others admit in proportion to weight
            mine = tenants[wanted[job_id]]
            ahead = rank - heads[mine.tenant_id]
            others = sum(
                min(tn.queued - heads[tn.tenant_id], ahead * tn.quota.weight / mine.quota.weight)
                for tn in tenants.values()
                if tn is not mine
            )
            out[job_id] = QueueEstimate(position=admitted + ahead + round(others) + 1, estimated_start_at=None)
    return out


def _rebalance(group: _Group, tenants: dict[str, _Tenant], t: float, hl: float) -> None:
    """Split the group's GPUs equally among its members again, to the milli-GPU, as the Lua's co_rebalance
    does (the first members by job id take the remainder), moving each tenant's usage by the change."""
    total, n = group.gpus * 1000, len(group.members)
    base = total // n
    for i, job_id in enumerate(sorted(group.members)):
        tid, milli = group.members[job_id]
        share = base + (1 if i < total - base * n else 0)
        if share != milli:
            if tid in tenants:
                _fold(tenants[tid], (share - milli) / 1000, 0, t, hl)
            group.members[job_id][1] = share


def _fold(tenant: _Tenant, dg: float, dj: int, t: float, hl: float) -> None:
    """The tenant now holds dg more GPUs (as the Lua's add_usage)."""
    tenant.consumed = fair_share.decayed_usage(tenant.consumed, tenant.at_ms, tenant.gpus, t, hl)
    tenant.gpus = round(tenant.gpus + dg, 6)
    tenant.running += dj
    tenant.at_ms = t
    if hl <= 0:
        tenant.consumed = tenant.gpus

