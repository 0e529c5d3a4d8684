"""Co-training admission: more queued jobs join a running job's group, sharing its GPUs (no torch, no Ray).

The dispatcher claims a job as usual (fleet.leases.claim_next_job), then asks `join_group` for more
jobs to train in the same process on the same resident base (workers.cotrain). Each member is a
claim of its own (attempt, fence, lease), so ends, requeues and lease expiry work per job exactly as
for a job alone. What may join, and in which order, is decided in one Lua step
(fleet.sched_scripts.CO_JOIN): the tenant's queue head only, same base model + quantization + GPUs
per worker, one worker, `co_training` not false, its tenant's borrowing limit admitting what its share
may grow back to (the group's whole GPUs), its memory estimate fitting what is left, in exactly
admission's order (the same Lua sort: tier, entry score, ties, starvation guard), and never around a
leader asked to stop. For fair share and the tier each member counts gpus / members (milli-GPUs); when
one leaves, the others' shares grow back (docs/scheduling.md#co-training). A reclaim preempts a group as
one victim, every member at once (fleet.sched_scripts ADMIT); a group being preempted takes no new member.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from fleet import keys
from fleet.fencing import Fence, new_claim_token
from fleet.leases import Claim
from fleet.queue import JobStore
from fleet.queue_scripts import PRELUDE
from fleet.sched_scripts import CO_JOIN
from fleet.scheduling import migrate_state

__all__ = ["MemberMemory", "GroupJoin", "join_group", "group_of", "group_shares", "set_max_group"]

_JOIN_RETRIES = 8  # a stale index entry is dropped by the script; decide again
_SCRIPT = PRELUDE + CO_JOIN


@dataclass(frozen=True)
class MemberMemory:
    """What a group's device memory allows (bytes): `budget_bytes` left for joining members once the base
    and the first member are in, each member costing `member_fixed_bytes + bytes_per_rank × r`."""

    budget_bytes: int
    member_fixed_bytes: int
    bytes_per_rank: int


@dataclass(frozen=True)
class GroupJoin:
    """A job that joined `group_id`: its claim, as claim_next_job returns one."""

    claim: Claim
    group_id: str


def join_group(jobs: JobStore, leader: Fence, worker_id: str, lease_ms: int, *, max_members: int,
               memory: MemberMemory | None = None, now_ms: int | None = None) -> GroupJoin | None:
    """Claim one more job into the co-training group led by the running attempt `leader` (the group is
    made on the first join); None when no queued job may join, the group has `max_members`, or the
    leader's attempt is over. `memory` None: memory is not checked (CPU mode)."""
    if max_members < 2:
        return None
    migrate_state(jobs.redis)  # a no-op once done (the leader's claim did it)
    script = jobs.redis.register_script(_SCRIPT)
    budget = ("", 0, 0) if memory is None else (memory.budget_bytes, memory.member_fixed_bytes, memory.bytes_per_rank)
    for _ in range(_JOIN_RETRIES):
        token = new_claim_token()
        reply = script(keys=[], args=[worker_id, lease_ms, token, "" if now_ms is None else int(now_ms),
                                      leader.job_id, leader.attempt, leader.token, max_members, *budget])
        if reply[0] == "retry":
            continue
        if reply[0] != "claimed":
            return None
        job_id, attempt, expires, group_id = reply[1], int(reply[2]), int(reply[3]), reply[5]
        fence = Fence(job_id, attempt, token)
        jobs.events.append(job_id, "info", f"Job started (attempt {attempt}).")
        return GroupJoin(Claim(jobs.load_job(job_id), fence, expires), group_id)
    return None


def group_of(client: redis.Redis, job_id: str) -> str | None:
    """The co-training group the running job trains in, or None (alone)."""
    return client.hget(keys.sched_co_member_of(), job_id)


def group_shares(client: redis.Redis, group_id: str) -> dict[str, float]:
    """{job id: GPUs it counts for fair share and quotas} of the group's members."""
    fields = client.hgetall(keys.sched_co_group(group_id))
    return {name[2:]: int(value.split(" ", 1)[0]) / 1000 for name, value in fields.items() if name.startswith("m:")}


def set_max_group(client: redis.Redis, max_group: int) -> None:
    """Record the dispatchers' group size limit (Settings.co_training_max_group) where queue estimates
    read it (fleet.scheduler_view: co-trained jobs start together)."""
    client.hset(keys.sched_config(), "co_training_max_group", int(max_group))

