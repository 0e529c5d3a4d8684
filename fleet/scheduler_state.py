"""The scheduler's state as the cluster view and the queue estimate read it from Redis, in a few round
trips whatever the size: the cluster, every tenant that waits or runs, the running jobs and their
co-training groups, and the scheduler's settings (fleet.scheduler_view shows it, fleet.queue_replay
replays the policy forward from it)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import redis

from fleet import keys
from fleet.quotas import QUOTA_FIELDS, TenantQuota
from fleet.sched_scripts import DEFAULT_HALF_LIFE_MS, DEFAULT_STARVATION_GUARD_MS

__all__ = ["ASSUMED_JOB_S", "CoMemory", "GroupState", "RunningEnd", "SchedulerState", "TenantState", "held_gpus",
           "read_state"]

# A job's duration when nothing better is known (a queued job; a running one reporting no ETA, which is
# assumed half done). Estimates are rough by nature: they say so in docs/scheduling.md.
ASSUMED_JOB_S = 3600.0
# At most this many queued jobs are read per tenant (later ones are taken to be like the last one read).
_READ_AHEAD = 32
_CO_MEMORY_PREFIX = "co_memory:"  # sched_config fields CO_JOIN records: "<capacity> <fixed> <per rank>" bytes


@dataclass
class TenantState:
    """A tenant as the view and the estimate read it."""

    tenant_id: str
    quota: TenantQuota
    consumed: float = 0.0
    at_ms: float = 0.0
    gpus: int = 0
    running: int = 0
    preempting: int | float = 0
    queued: int = 0
    # milli-GPUs its co-trained shares may still grow by as other members leave (the Lua's co_growth):
    # over the groups it has members in, the group's GPUs less its members' shares there
    co_growth: int = 0
    jobs: list[tuple[str, int, float]] = field(default_factory=list)  # (id, gpus, queue score), head first
    # out of the queue: (id, gpus, until ms), until None for a job set aside as never fitting the quota
    parked: list[tuple[str, int, int | None]] = field(default_factory=list)

    @property
    def growth(self) -> float:
        """GPUs its co-trained shares may still grow by (as the Lua's tenant_state reads co_growth)."""
        return self.co_growth / 1000


# A running job as the replay ends it: (expected end ms, job id, tenant, GPUs it counts, its group id or "").
RunningEnd = tuple[float, str, str, float, str]


@dataclass
class GroupState:
    """A co-training group as the replay moves it (as the Lua's co_rebalance and co_release do): it holds
    its `gpus` until its last member ends; each member counts its share (milli-GPUs) in its tenant's usage,
    and when one ends the others' shares grow back (each tenant's co_growth following, as the Lua's)."""

    gpus: int
    members: dict[str, list] = field(default_factory=dict)  # job id -> [tenant id, milli-GPUs]


@dataclass(frozen=True)
class CoMemory:
    """A co-training key's memory terms as the dispatchers record them (CO_JOIN): a group's budget (bytes)
    before any member, and each member's cost, fixed + per_rank × its LoRA rank."""

    capacity: int
    fixed: int
    per_rank: int

    def cost(self, rank: int) -> int:
        return self.fixed + self.per_rank * rank


@dataclass
class SchedulerState:
    """The scheduler's state as one estimate or view reads it (a few round trips, whatever the size)."""

    now_ms: int
    half_life_ms: float
    total: int | None
    allocated: int
    incoming: int
    tenants: dict[str, TenantState]
    ends: list[RunningEnd]  # running jobs
    wanted: dict[str, str]  # queued job id -> tenant, of the job ids asked about
    ranks: dict[str, int]  # queued job id -> index in its tenant's queue
    groups: dict[str, GroupState] = field(default_factory=dict)  # running co-training groups by id
    co_keys: dict[str, tuple[str, int]] = field(default_factory=dict)  # read queued job id -> (co-training key, rank)
    co_max_group: int = 1  # co-training's group size limit (1: off)
    co_memory: dict[str, CoMemory] = field(default_factory=dict)  # co-training key -> its memory terms
    queued_at: dict[str, float] = field(default_factory=dict)  # read queued job id -> since when it waits (ms)
    guard_ms: float = DEFAULT_STARVATION_GUARD_MS  # the starvation guard (0: off)


def read_state(client: redis.Redis, job_ids: list[str], now_ms: int | None, depth: int | None = None) -> SchedulerState:
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
        pipe.hmget(keys.sched_tenant(t), "consumed", "at_ms", "gpus", "preempting", "running", "co_growth")
        pipe.zcard(keys.queue(t))
        pipe.zrange(keys.queue(t), 0, depth - 1, withscores=True)
    for job_id in running_ids:
        pipe.hmget(keys.job(job_id), "tenant_id", "gpus", "estimated_finish")
    if running_ids:  # which co-training group each runs in (None: alone)
        pipe.hmget(keys.sched_co_member_of(), running_ids)
    replies = pipe.execute()
    ranks = {j: r for j, r in zip(wanted, replies, strict=False) if r is not None}
    replies = replies[len(wanted) :]
    tenants: dict[str, TenantState] = {}
    for i, t in enumerate(ids):
        quota_hash, state, queued, entries = replies[4 * i : 4 * i + 4]
        quota_fields = quota_hash or default
        tenants[t] = TenantState(
            t,
            TenantQuota.from_redis_hash({k: v for k, v in quota_fields.items() if k in QUOTA_FIELDS}),
            consumed=float(state[0] or 0),
            at_ms=float(state[1] or 0),
            gpus=held_gpus(state[2]),
            preempting=held_gpus(state[3]),
            running=int(state[4] or 0),
            co_growth=int(state[5] or 0),
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
            co_memory[name[len(_CO_MEMORY_PREFIX) :]] = CoMemory(capacity, fixed, per_rank)
    return SchedulerState(
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
) -> tuple[list[RunningEnd], dict[str, GroupState]]:
    """The running jobs' ends and their co-training groups: a member counts its share of its group's GPUs
    (`m:<job>` milli-GPUs in the group's hash, as the Lua's co_release reads it), not the group's GPUs."""
    gids = sorted({gid for gid in member_of if gid})
    pipe = client.pipeline(transaction=False)
    for gid in gids:
        pipe.hgetall(keys.sched_co_group(gid))
    hashes = dict(zip(gids, pipe.execute() if gids else [], strict=True))
    ends: list[RunningEnd] = []
    groups: dict[str, GroupState] = {}
    for job_id, (tenant, g, finish), gid in zip(job_ids, fields, member_of, strict=True):
        if tenant is None:
            continue
        end = max(float(finish) * 1000 if finish else now + ASSUMED_JOB_S * 500, now)
        group_hash = hashes.get(gid) if gid else None
        if not group_hash:  # alone (or its group ended between the reads)
            ends.append((end, job_id, tenant, int(g or 1), ""))
            continue
        group = groups.setdefault(gid, GroupState(int(group_hash.get("gpus") or 1)))
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


def held_gpus(stored: str | None) -> int | float:
    """A tenant's GPUs as the Lua stores them: whole, or with co-trained jobs' shares, to the milli-GPU."""
    held = float(stored or 0)
    return int(held) if held.is_integer() else held
