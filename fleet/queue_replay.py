"""The queue's replay: each queued job's position and estimated start, by admitting in the real policy's
order at simulated times from the scheduler's state (fleet.scheduler_state), co-training groups
included (docs/scheduling.md, Visibility)."""

from __future__ import annotations

import heapq
import math

from pydantic import BaseModel

from fleet import fair_share
from fleet.scheduler_state import ASSUMED_JOB_S, CoMemory, GroupState, RunningEnd, TenantState

__all__ = ["QueueEstimate", "fold", "join", "leave", "rebalance", "replay"]

# An estimate runs on every job read through the API (and every create), so it is bounded: it replays
# at most this many admissions; past that, positions are extrapolated by weight.
_MAX_SIMULATED_ADMISSIONS = 256
_CO_JOIN_DEPTH = 16  # as fleet.sched_scripts.CO_JOIN: idle tenants read per bucket when a group forms


class QueueEstimate(BaseModel):
    position: int  # 1-based: jobs the policy admits before this one, plus one
    estimated_start_at: int | None  # Unix seconds; None when it cannot be estimated



def replay(
    tenants: dict[str, TenantState],
    ends: list[RunningEnd],
    total: int | None,
    now: int,
    hl: float,
    ranks: dict[str, int],
    wanted: dict[str, str],
    *,
    groups: dict[str, GroupState] | None = None,
    co_keys: dict[str, tuple[str, int]] | None = None,
    co_max_group: int = 1,
    co_memory: dict[str, CoMemory] | None = None,
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

    def head(tenant: TenantState) -> tuple[str, int, float] | None:
        i = heads[tenant.tenant_id]
        if i < len(tenant.jobs):
            return tenant.jobs[i]
        if i < tenant.queued and tenant.jobs:  # beyond what was read: like its last read job
            job_id, g, score = tenant.jobs[-1]
            return (f"{job_id}+{i}", g, score + i)
        return None

    def place(tenant: TenantState) -> None:
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

    def admit(tenant: TenantState, dg: float) -> None:
        """The tenant's head starts, holding dg GPUs (as the Lua's start_job and add_usage)."""
        heads[tenant.tenant_id] += 1
        fold(tenant, dg, 1, t, hl)
        holding.add(tenant.tenant_id)
        place(tenant)  # now holding: out of the idle index

    def co_join(key: str, group: GroupState, mem_left: float) -> tuple[TenantState, str] | None:
        """The head that joins `group` (of g GPUs), as CO_JOIN picks it: idle tenants' heads of g GPUs (the
        first _CO_JOIN_DEPTH of each bucket and kind) and the heads of tenants holding GPUs, compatible
        (`key`), whose borrowing limit admits what their shares may grow back to (all of g on top of their
        growth, nothing more for a tenant with a member in the group: CO_JOIN's consider) and whose memory
        cost fits `mem_left` (bytes), in admission's order (tier and entry score counting the head's g
        GPUs), a head past the starvation guard first within its tier (as the Lua's starvation_guard)."""
        g = group.gpus
        inside = {tid for tid, _ in group.members.values()}
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
            if q.max_running_jobs is not None and tn.running >= q.max_running_jobs:
                continue
            growth = tn.growth
            if tn.tenant_id in inside:
                growth = growth - g
            if (entry_tier := fair_share.tier(q, tn.gpus, g, growth)) is None:
                continue
            order_key = fair_share.entry_key(
                entry_tier,
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
            entry_tier = fair_share.tier(q, tenant.gpus, h[1], tenant.growth)
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
                    leave(group, job_id, tenants, t, hl)
                    if not group.members:
                        used -= group.gpus
                        del groups[gid]
                else:
                    used -= g
                    if tid in tenants:
                        fold(tenants[tid], -g, -1, t, hl)
                if tid in tenants and tenants[tid].gpus <= 0:
                    holding.discard(tid)
                    place(tenants[tid])
            continue
        tenant, (job_id, g, _) = chosen
        used += g
        admit(tenant, g)
        # Co-training (docs/scheduling.md#co-training): compatible heads join the admitted job at once,
        # one at a time as CO_JOIN takes them, sharing its g GPUs (each holds its share, rebalanced).
        group = GroupState(g, {job_id: [tenant.tenant_id, g * 1000]})
        co = co_keys.get(job_id)
        mem_left = math.inf  # CO_JOIN checks memory where the dispatchers recorded its terms (co_memory)
        if co is not None and co[0] in co_memory:
            mem_left = co_memory[co[0]].capacity - co_memory[co[0]].cost(co[1])
        while co is not None and len(group.members) < co_max_group and (
            joiner := co_join(co[0], group, mem_left)
        ):
            member, member_job = joiner
            if co[0] in co_memory:
                mem_left -= co_memory[co[0]].cost(co_keys[member_job][1])
            heads[member.tenant_id] += 1
            join(group, member_job, member, tenants, t, hl)
            holding.add(member.tenant_id)
            place(member)
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


def join(group: GroupState, job_id: str, tenant: TenantState, tenants: dict[str, TenantState], t: float,
         hl: float) -> None:
    """`tenant`'s job joins the group, as CO_JOIN adds it: holding 0 of the group's GPUs it may grow back
    to (co_growth: all of them, unless the tenant has a member in it already), then rebalanced."""
    if all(tid != tenant.tenant_id for tid, _ in group.members.values()):
        tenant.co_growth += group.gpus * 1000
    group.members[job_id] = [tenant.tenant_id, 0]
    fold(tenant, 0, 1, t, hl)
    rebalance(group, tenants, t, hl)


def leave(group: GroupState, job_id: str, tenants: dict[str, TenantState], t: float, hl: float) -> None:
    """The member ends, as the Lua's co_release ends it: its share no longer counts (in its tenant's usage
    nor co_growth), nor, with its tenant's last member here gone, the group's GPUs it might grow back to;
    the others' shares grow back (rebalanced)."""
    tid, milli = group.members.pop(job_id)
    if (tenant := tenants.get(tid)) is not None:
        fold(tenant, -milli / 1000, -1, t, hl)
        tenant.co_growth += milli
        if all(other != tid for other, _ in group.members.values()):
            tenant.co_growth -= group.gpus * 1000
    if group.members:
        rebalance(group, tenants, t, hl)


def rebalance(group: GroupState, tenants: dict[str, TenantState], t: float, hl: float) -> None:
    """Split the group's GPUs equally among its members again, to the milli-GPU, as the Lua's co_rebalance
    does (the first members by job id take the remainder), moving each tenant's usage, and the growth its
    shares have left (co_growth), by the change."""
    total, n = group.gpus * 1000, len(group.members)
    base = total // n
    for i, job_id in enumerate(sorted(group.members)):
        tid, milli = group.members[job_id]
        share = base + (1 if i < total - base * n else 0)
        if share != milli:
            if tid in tenants:
                fold(tenants[tid], (share - milli) / 1000, 0, t, hl)
                tenants[tid].co_growth += milli - share
            group.members[job_id][1] = share


def fold(tenant: TenantState, dg: float, dj: int, t: float, hl: float) -> None:
    """The tenant now holds dg more GPUs (as the Lua's add_usage)."""
    tenant.consumed = fair_share.decayed_usage(tenant.consumed, tenant.at_ms, tenant.gpus, t, hl)
    tenant.gpus = round(tenant.gpus + dg, 6)
    tenant.running += dj
    tenant.at_ms = t
    if hl <= 0:
        tenant.consumed = tenant.gpus
