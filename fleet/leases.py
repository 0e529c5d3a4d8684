"""Leases: the dispatcher side of the job store: claim, lease, fence, progress, checkpoints, finish.

`fleet.queue.JobStore` builds one `Leases` and hands its methods on, so a dispatcher calls them on the
JobStore: job-id calls carrying the `attempt` fencing token (`claim_next_job`, `renew_lease`,
`record_progress`, `record_checkpoint`, `control_signal`, `finish_job`, `requeue_expired_leases`,
`wait_for_work`). A call with a stale attempt raises FencedOut and changes nothing.

A dispatcher's loop, in outline:
    jobs.requeue_expired_leases()                 # at start-up, then every few seconds
    claim = jobs.claim_next_job(worker_id, lease_ms)
    if claim is None: jobs.wait_for_work(timeout_s); loop
    heartbeat thread: jobs.renew_lease(job_id, claim.attempt, lease_ms) every heartbeat_ms
    resume from jobs.latest_checkpoint(job_id) (fleet.checkpoints.download_checkpoint)
    each step: signal = jobs.record_progress(...); "cancel"/"pause" → finish_job(..., "cancelled"/"paused")
    each checkpoint: upload_checkpoint(...), then jobs.record_checkpoint(job_id, attempt, step, location)
    ref = registry.publish_adapter_version(..., job_id=job_id, attempt=attempt)
    jobs.finish_job(job_id, attempt, "succeeded", fine_tuned_model=ref)
    FencedOut from any call: another attempt owns the job; drop the work, publish nothing.
    CancelRequested from publish/finish "succeeded": the user cancelled; finish_job(..., "cancelled").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fleet import keys
from fleet import queue_scripts as lua
from fleet.events import EventLog
from fleet.exceptions import CancelRequested, FencedOut
from fleet.jobs import Checkpoint, ControlSignal, Job, JobError, JobStatus, Progress
from fleet.scheduling import ClaimPolicy, QueueSnapshot, TenantQueue
from fleet.settings import MAX_BLOCK_S

__all__ = ["Leases", "Claim", "Lease", "ExpiredLease", "queue_key_of"]

log = logging.getLogger(__name__)

_FINISH_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED}
)
_CLAIM_RETRIES = 100


@dataclass(frozen=True)
class Claim:
    """A job a worker now owns; pass `attempt` (the fencing token) back on every later call."""

    job: Job
    attempt: int
    lease_expires_at_ms: int


@dataclass(frozen=True)
class Lease:
    """A renewed lease, with any pending control request (cancel/pause) for the worker to act on."""

    expires_at_ms: int
    control: ControlSignal | None


@dataclass(frozen=True)
class ExpiredLease:
    """A job whose lease expired and what became of it (queued, failed, paused or cancelled)."""

    job_id: str
    attempt: int
    new_status: JobStatus


def _fenced(job_id: str, attempt: int, reply: list) -> FencedOut:
    status, current = reply[1] or "missing", reply[2] or "?"
    return FencedOut(
        f"Attempt {attempt} of job {job_id} is stale (job is {status}, current attempt {current}); stop working on it."
    )


def queue_key_of(client: redis.Redis, job_id: str) -> str:
    """The queue key of the job's tenant (a missing job maps to an empty tenant id, as the Lua expects)."""
    tenant_id = client.hget(keys.job(job_id), "tenant_id")
    return keys.queue(tenant_id or "")


class Leases:
    """The dispatcher-side Lua scripts and the calls that run them; JobStore owns one and shares its EventLog."""

    def __init__(
        self,
        client: redis.Redis,
        events: EventLog,
        load_job: Callable[[str], Job],
        *,
        max_attempts: int,
        policy: ClaimPolicy,
    ) -> None:
        """`load_job` reads a job by id (JobStore.load_job); `policy` picks whose job is claimed next."""
        self.redis = client
        self.events = events
        self._load_job = load_job
        self.max_attempts = max_attempts
        self.policy = policy
        self._claim = client.register_script(lua.CLAIM)
        self._renew = client.register_script(lua.RENEW)
        self._fenced_update = client.register_script(lua.FENCED_UPDATE)
        self._checkpoint = client.register_script(lua.CHECKPOINT)
        self._finish = client.register_script(lua.FINISH)
        self._expire_lease = client.register_script(lua.EXPIRE_LEASE)

    def snapshot(self) -> QueueSnapshot:
        """The queues as the claim policy sees them (tenants with queued jobs, cursor, running counts)."""
        entries = self.redis.zrange(keys.queue_tenants(), 0, -1, withscores=True)
        pipe = self.redis.pipeline(transaction=False)
        for tenant_id, _ in entries:
            pipe.lindex(keys.queue(tenant_id), 0)
            pipe.llen(keys.queue(tenant_id))
        pipe.get(keys.queue_cursor())
        pipe.hgetall(keys.running_per_tenant())
        replies = pipe.execute()
        tenants = []
        for i, (tenant_id, since) in enumerate(entries):
            head, length = replies[2 * i], replies[2 * i + 1]
            if head is not None:
                tenants.append(TenantQueue(tenant_id, head, int(length), int(since)))
        tenants.sort(key=lambda t: t.tenant_id)
        running = {t: int(n) for t, n in replies[-1].items()}
        return QueueSnapshot(tenants=tenants, cursor=replies[-2], running=running)

    def claim_next_job(self, worker_id: str, lease_ms: int, policy: ClaimPolicy | None = None) -> Claim | None:
        """Atomically claim the job the policy picks: queued → running, attempt += 1, lease set.

        Returns None when nothing is queued. Races between workers are settled by the Lua claim, which
        only takes the head the policy saw; a loser re-reads the queues and tries again.
        """
        choose = policy or self.policy
        for _ in range(_CLAIM_RETRIES):
            snap = self.snapshot()
            tenant_id = choose(snap)
            if tenant_id is None:
                return None
            head = next((t.head_job_id for t in snap.tenants if t.tenant_id == tenant_id), None)
            if head is None:
                raise ValueError(f"Claim policy chose tenant {tenant_id!r}, which has no queued job.")
            reply = self._claim(
                keys=[
                    keys.job(head),
                    keys.queue(tenant_id),
                    keys.queue_tenants(),
                    keys.queue_cursor(),
                    keys.running_per_tenant(),
                    keys.leases(),
                ],
                args=[head, tenant_id, worker_id, lease_ms],
            )
            if reply[0] == "claimed":
                attempt, expires = int(reply[1]), int(reply[2])
                self.events.append(head, "info", f"Job started (attempt {attempt}) on worker {worker_id}.")
                return Claim(self._load_job(head), attempt, expires)
            if reply[0] == "skip":
                log.warning("dropped queue entry %s of tenant %s: job was no longer queued", head, tenant_id)
        log.warning("claim_next_job gave up after %d contended retries", _CLAIM_RETRIES)
        return None

    def renew_lease(self, job_id: str, attempt: int, lease_ms: int) -> Lease:
        """Heartbeat: extend the lease by `lease_ms`; raises FencedOut if the attempt is stale."""
        reply = self._renew(keys=[keys.job(job_id), keys.leases()], args=[job_id, attempt, lease_ms])
        if reply[0] == "fenced":
            raise _fenced(job_id, attempt, reply)
        return Lease(int(reply[1]), reply[2] or None)

    def control_signal(self, job_id: str, attempt: int) -> ControlSignal | None:
        """The pending request for a running attempt: None, "cancel" or "pause". FencedOut if stale."""
        status, current, control = self.redis.hmget(keys.job(job_id), "status", "attempt", "control")
        if status != JobStatus.RUNNING.value or current != str(attempt):
            raise _fenced(job_id, attempt, ["fenced", status, current])
        return control or None  # type: ignore[return-value]

    def record_progress(
        self,
        job_id: str,
        attempt: int,
        *,
        step: int,
        total_steps: int | None = None,
        metrics: dict[str, float] | None = None,
        trained_tokens: int | None = None,
        eta_s: float | None = None,
        epoch: float | None = None,
    ) -> ControlSignal | None:
        """Store the latest progress (fenced) and return any pending control request.

        Appends no event: the caller logs a "metrics" event with `append_event(..., type="metrics")`.
        """
        percent = round(100.0 * step / total_steps, 2) if total_steps else None
        progress = Progress(
            step=step,
            total_steps=total_steps,
            percent=percent,
            eta_s=eta_s,
            epoch=epoch,
            metrics=metrics or {},
        )
        fields: list[Any] = ["progress", progress.model_dump_json()]
        if trained_tokens is not None:
            fields += ["trained_tokens", trained_tokens]
        if eta_s is not None:
            fields += ["estimated_finish", int(time.time() + eta_s)]
        reply = self._fenced_update(keys=[keys.job(job_id)], args=[attempt, *fields])
        if reply[0] == "fenced":
            raise _fenced(job_id, attempt, reply)
        return reply[1] or None

    def record_checkpoint(
        self, job_id: str, attempt: int, step: int, location: str, metrics: dict[str, float] | None = None
    ) -> Checkpoint:
        """Record a saved checkpoint (fenced). Checkpoints outlive attempts: the next attempt resumes."""
        checkpoint = Checkpoint(
            id=f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}",
            job_id=job_id,
            step=step,
            location=location,
            metrics=metrics or {},
            created_at=int(time.time()),
            attempt=attempt,
        )
        reply = self._checkpoint(
            keys=[keys.job(job_id), keys.job_checkpoints(job_id)],
            args=[attempt, step, checkpoint.model_dump_json()],
        )
        if reply[0] == "fenced":
            raise _fenced(job_id, attempt, reply)
        self.events.append(job_id, "info", f"Checkpoint saved at step {step}.", {"step": step, **(metrics or {})})
        return checkpoint

    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """A job's checkpoints, newest (highest step) first."""
        raw = self.redis.hvals(keys.job_checkpoints(job_id))
        return sorted((Checkpoint.model_validate_json(r) for r in raw), key=lambda c: c.step, reverse=True)

    def latest_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The checkpoint to resume from, or None."""
        checkpoints = self.list_checkpoints(job_id)
        return checkpoints[0] if checkpoints else None

    def finish_job(
        self,
        job_id: str,
        attempt: int,
        status: JobStatus | str,
        *,
        fine_tuned_model: str | None = None,
        error: JobError | None = None,
        result_files: list[str] | None = None,
        trained_tokens: int | None = None,
        hyperparameters: dict[str, Any] | None = None,
    ) -> Job:
        """End a running attempt (fenced): succeeded/failed/cancelled, paused, or queued (handed back).

        A pending control request is honoured, as when a lease expires: handing back (queued) or
        pausing with a cancel pending cancels the job; handing back with a pause pending pauses it.
        The returned Job carries the status the job actually ended in.
        `hyperparameters`, when given, replaces the requested ones ("auto" included) by the values used.

        Raises FencedOut if `attempt` is stale; a stale attempt can never change the job.
        Raises CancelRequested (and changes nothing) for `succeeded` while a cancel is pending: the
        user's cancel wins, so the worker must finish the job as cancelled instead.
        """
        target = JobStatus(status)
        if target not in _FINISH_STATUSES:
            raise ValueError(f"finish_job cannot move a job to {target.value}.")
        fields: list[Any] = []
        if fine_tuned_model is not None:
            fields += ["fine_tuned_model", fine_tuned_model]
        if error is not None:
            fields += ["error", error.model_dump_json()]
        if result_files is not None:
            fields += ["result_files", json.dumps(result_files)]
        if trained_tokens is not None:
            fields += ["trained_tokens", trained_tokens]
        if hyperparameters is not None:
            fields += ["hyperparameters", json.dumps(hyperparameters, separators=(",", ":"), sort_keys=True)]
        reply = self._finish(
            keys=[
                keys.job(job_id),
                keys.leases(),
                keys.running_per_tenant(),
                queue_key_of(self.redis, job_id),
                keys.queue_tenants(),
                keys.wakeup(),
            ],
            args=[job_id, attempt, target.value, *fields],
        )
        if reply[0] == "fenced":
            raise _fenced(job_id, attempt, reply)
        if reply[0] == "cancel_requested":
            raise CancelRequested(
                f"Job {job_id} has a pending cancel request; attempt {attempt} may not mark it succeeded. "
                "Finish it as cancelled."
            )
        outcome = JobStatus(reply[1])
        message = {
            JobStatus.SUCCEEDED: "The job has successfully completed.",
            JobStatus.FAILED: f"The job failed: {error.message if error else 'unknown error'}",
            JobStatus.CANCELLED: "Job cancelled.",
            JobStatus.PAUSED: "Job paused; resume it to continue from its last checkpoint.",
            JobStatus.QUEUED: "Job handed back to the queue.",
        }[outcome]
        self.events.append(job_id, "error" if outcome == JobStatus.FAILED else "info", message)
        return self._load_job(job_id)

    def requeue_expired_leases(self, now_ms: int | None = None) -> list[ExpiredLease]:
        """Recover jobs whose worker stopped heartbeating (call at dispatcher start-up and periodically).

        Each such job goes back to the head of its tenant's queue (its checkpoints are kept, so the next
        attempt resumes), or is failed with the reason once it has lost `max_attempts` workers. A pending
        cancel/pause request is honoured instead. `now_ms` defaults to the Redis server clock.
        """
        if now_ms is None:
            seconds, micros = self.redis.time()
            now_ms = seconds * 1000 + micros // 1000
        expired: list[ExpiredLease] = []
        for job_id in self.redis.zrangebyscore(keys.leases(), "-inf", now_ms):
            tenant_id, attempt, worker_id, lost = self.redis.hmget(
                keys.job(job_id), "tenant_id", "attempt", "worker_id", "lease_expirations"
            )
            if tenant_id is None:
                self.redis.zrem(keys.leases(), job_id)
                continue
            n_lost = int(lost or 0) + 1
            reason = f"attempt {attempt} lost its worker {worker_id} (lease expired without a heartbeat)"
            error = JobError(
                code="max_attempts_exceeded",
                message=(
                    f"The job failed after {n_lost} attempts; each time its worker stopped heartbeating. "
                    f"Last: {reason}. Check the worker logs; resubmit once the cause is fixed."
                ),
            )
            reply = self._expire_lease(
                keys=[
                    keys.job(job_id),
                    keys.leases(),
                    keys.running_per_tenant(),
                    keys.queue(tenant_id),
                    keys.queue_tenants(),
                    keys.wakeup(),
                ],
                args=[job_id, now_ms, self.max_attempts, attempt, reason, error.model_dump_json()],
            )
            if reply[0] == "skip":
                continue
            new_status = JobStatus(reply[0])
            expired.append(ExpiredLease(job_id, int(attempt), new_status))
            level = "error" if new_status == JobStatus.FAILED else "warn"
            self.events.append(job_id, level, f"Worker lost: {reason}; job is now {new_status.value}.")
            log.warning("job %s: %s; now %s", job_id, reason, new_status.value)
        return expired

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until work may be available (a job was queued) or `timeout_s` passes; True if woken.

        Wake-ups are tokens on a short list, so a dispatcher that was busy when work arrived still
        finds the token. A True result is a hint: the claim may still find nothing.
        """
        reply = self.redis.blpop([keys.wakeup()], timeout=min(max(timeout_s, 0.01), MAX_BLOCK_S))
        return reply is not None
