"""The scheduler's Python side: settings it keeps in Redis, re-indexing, and the queue snapshot.

The policy itself (Kueue's admission fair sharing with quotas, borrowing and preemption) runs inside
Redis, in fleet.sched_scripts, so that each decision and the claim applying it are one atomic step;
fleet.fair_share holds the same formulas in Python for views and estimates (docs/scheduling.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from fleet import keys
from fleet import queue_scripts as lua
from fleet.sched_scripts import SCHEMA

__all__ = [
    "TenantQueue",
    "QueueSnapshot",
    "set_half_life",
    "half_life_ms",
    "set_starvation_guard",
    "reindex_tenants",
    "migrate_state",
]


@dataclass(frozen=True)
class TenantQueue:
    """One tenant's queue as seen in a snapshot."""

    tenant_id: str
    head_job_id: str
    length: int
    nonempty_since_ms: int = 0  # when the queue last went from empty to non-empty


@dataclass(frozen=True)
class QueueSnapshot:
    """Who waits and who runs at one moment (metrics, views): tenants with queued jobs, sorted by id,
    and running jobs per tenant."""

    tenants: Sequence[TenantQueue]
    running: dict[str, int] = field(default_factory=dict)


def half_life_ms(client: redis.Redis) -> int:
    """The fair-share half-life every scheduler step uses (ms; 0: current usage only)."""
    from fleet.sched_scripts import DEFAULT_HALF_LIFE_MS

    value = client.hget(keys.sched_config(), "half_life_ms")
    return int(float(value)) if value is not None else DEFAULT_HALF_LIFE_MS


def set_half_life(client: redis.Redis, half_life_s: float) -> None:
    """Write the half-life (Settings.fair_share_half_life_s) for every process; a change re-indexes
    every waiting tenant, since idle tenants are ordered by keys that depend on it."""
    new = int(round(half_life_s * 1000))
    if half_life_ms(client) == new and client.hexists(keys.sched_config(), "half_life_ms"):
        return
    client.hset(keys.sched_config(), "half_life_ms", new)
    reindex_tenants(client)


def set_starvation_guard(client: redis.Redis, guard_s: float) -> None:
    """Write the starvation guard (Settings.starvation_guard_s; 0: off) for every process: once the
    head the policy would admit first has waited this long, free GPUs are held for it until it fits."""
    client.hset(keys.sched_config(), "starvation_guard_ms", int(round(guard_s * 1000)))


def reindex_tenants(client: redis.Redis, tenant_ids: Sequence[str] = (), *, now_ms: int | None = None) -> int:
    """Re-index these tenants' queue heads (none given: every tenant with queued work) after a change
    to their quota, the default quota or the half-life. Returns how many were re-indexed."""
    clock = "" if now_ms is None else str(int(now_ms))
    return int(client.eval(lua.REINDEX, 0, clock, *tenant_ids))


def migrate_state(client: redis.Redis, legacy_job_gpus: int | None = None) -> None:
    """Bring state written before the scheduler up to date (list queues become sorted sets, running
    jobs' GPUs are accounted). Every fleet script does this first anyway; this is for readers that
    use no script (queue estimates, snapshots). One HGET once done.

    `legacy_job_gpus` (Settings.legacy_job_gpus): what the previous release ran every job on, so
    a job it started still holds that many GPUs until it ends (unknown: 1)."""
    if client.hget(keys.sched_cluster(), "schema") != SCHEMA:
        if legacy_job_gpus is not None:
            client.hset(keys.sched_config(), "legacy_job_gpus", legacy_job_gpus)
        client.eval(lua.MIGRATE, 0)
