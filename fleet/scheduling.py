"""The claim policy: which tenant's head job a free worker takes next (pure functions, no Redis).

fleet.leases reads a `QueueSnapshot` from Redis, asks a `ClaimPolicy` for a tenant, then claims that
tenant's head job in one Lua script that re-checks the head and retries with a fresh snapshot if
another worker won the race. A policy therefore only has to be a correct choice for one snapshot.
Weighted fair share, quotas or preemption replace `round_robin` with a function of the same type;
the snapshot already carries each tenant's running-job count and waiting time for that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "TenantQueue",
    "QueueSnapshot",
    "ClaimPolicy",
    "PositionEstimator",
    "round_robin",
    "estimate_queue_position",
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
    """The scheduler's view of the queues at one moment.

    `tenants` holds only tenants with at least one queued job, sorted by tenant id (a stable
    round-robin order). `cursor` is the tenant served last, or None before the first claim.
    """

    tenants: Sequence[TenantQueue]
    cursor: str | None = None
    running: dict[str, int] = field(default_factory=dict)


ClaimPolicy = Callable[[QueueSnapshot], "str | None"]
# (snapshot, tenant_id, index in the tenant's queue) -> 1-based position; pairs with a ClaimPolicy
PositionEstimator = Callable[[QueueSnapshot, str, int], int]


def _rotation(tenant_ids: Sequence[str], cursor: str | None) -> list[str]:
    """`tenant_ids` (sorted) rotated to start at the first tenant after `cursor`, wrapping around."""
    if cursor is None:
        return list(tenant_ids)
    after = [t for t in tenant_ids if t > cursor]
    before = [t for t in tenant_ids if t <= cursor]
    return after + before


def round_robin(snapshot: QueueSnapshot) -> str | None:
    """Serve tenants in turn (sorted id order, starting after the cursor); FIFO within a tenant.

    Returns the tenant whose head job should be claimed, or None when nothing is queued.
    """
    order = _rotation([t.tenant_id for t in snapshot.tenants], snapshot.cursor)
    return order[0] if order else None


def estimate_queue_position(snapshot: QueueSnapshot, tenant_id: str, index_in_tenant_queue: int) -> int:
    """1-based position at which round-robin will claim the job at `index_in_tenant_queue` of `tenant_id`.

    Each tenant gets one job per round: before our job (the i-th of our queue, 0-based) is served,
    every tenant that comes earlier in the rotation gets up to i+1 claims and every later one up to i.
    An estimate: jobs queued later by other tenants can still move ahead in the rotation.
    """
    order = _rotation([t.tenant_id for t in snapshot.tenants], snapshot.cursor)
    lengths = {t.tenant_id: t.length for t in snapshot.tenants}
    if tenant_id not in lengths:
        return index_in_tenant_queue + 1
    ahead = index_in_tenant_queue
    mine = order.index(tenant_id)
    for rank, other in enumerate(order):
        if other == tenant_id:
            continue
        rounds = index_in_tenant_queue + 1 if rank < mine else index_in_tenant_queue
        ahead += min(lengths[other], rounds)
    return ahead + 1
