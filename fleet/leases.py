"""Leases: the dispatcher side of the job store: claim, lease, fence, progress, checkpoints, events, finish.

A `JobStore` owns one `Leases` as `jobs.leases`; dispatchers call it there. A claim returns a `Claim`
whose `fence` (job id, attempt number, claim token; fleet.fencing) every later call takes: a call with
a stale fence raises FencedOut and changes nothing.

A dispatcher's loop, in outline:
    leases = jobs.leases
    leases.requeue_expired_leases(restart_grace_ms=lease_ms + heartbeat_ms)   # start-up, then every few s
    claim = leases.claim_next_job(worker_id, lease_ms)
    if claim is None: leases.wait_for_work(timeout_s); loop
    fence = claim.fence
    heartbeat thread: leases.renew_lease(fence, lease_ms) every heartbeat_ms
    done = registry.complete_committed_publication(fence)   # an earlier attempt committed: finish with it
    if done: leases.finish_job(fence, "succeeded", fine_tuned_model=done.ref, ...); next claim
    resume from jobs.latest_checkpoint(job_id) (fleet.checkpoints.download_checkpoint)
    each step: signal = leases.record_progress(fence, ...); "cancel"/"pause" → finish_job(fence, "cancelled"/"paused");
        "preempt" → checkpoint now, then finish_job(fence, "queued", preempted=True)
    gang not placed in time → finish_job(fence, "queued", retry_after_ms=N)
    each checkpoint: upload_checkpoint(...), then leases.record_checkpoint(fence, step, location)
    log lines: leases.append_event(fence, level, message)
    ref = registry.publish_adapter_version(..., fence=fence)
    leases.finish_job(fence, "succeeded", fine_tuned_model=ref)
    FencedOut from any call: another attempt owns the job; drop the work, publish nothing.
    CancelRequested from publish/finish "succeeded": the user cancelled; finish_job(fence, "cancelled").
    PauseWithdrawn from finish "paused": the user resumed meanwhile; finish_job(fence, "queued").
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
from fleet.events import EventLog, event_fields, event_from_stream
from fleet.fencing import Fence, new_claim_token, raise_for_refusal
from fleet.jobs import Checkpoint, ControlSignal, Event, Job, JobError, JobStatus, Progress
from fleet.scheduling import QueueSnapshot, TenantQueue
from fleet.settings import MAX_BLOCK_S

__all__ = [
    "Leases",
    "Claim",
    "Fence",
    "Lease",
    "ExpiredLease",
    "queue_key_of",
    "read_queue_snapshot",
    "clock_arg",
    "PREEMPTED_MESSAGE",
]

log = logging.getLogger(__name__)

_FINISH_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED}
)
_CLAIM_RETRIES = 100
# What a preempted job's tenant reads: why, and that no work is lost; never who took the capacity.
PREEMPTED_MESSAGE = "Preempted to return borrowed capacity; it will resume from its checkpoint."


@dataclass(frozen=True)
class Claim:
    """A job a worker now owns; pass `fence` back on every later call for it."""

    job: Job
    fence: Fence
    lease_expires_at_ms: int

    @property
    def attempt(self) -> int:
        return self.fence.attempt


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


def queue_key_of(client: redis.Redis, job_id: str) -> str:
    """The queue key of the job's tenant (a missing job maps to an empty tenant id, as the Lua expects)."""
    tenant_id = client.hget(keys.job(job_id), "tenant_id")
    return keys.queue(tenant_id or "")


def read_queue_snapshot(client: redis.Redis) -> QueueSnapshot:
    """Who waits and who runs, for metrics and views: tenants with queued jobs (head, length, since
    when) and running jobs per tenant. O(tenants waiting); the scheduler itself never reads this."""
    entries = client.zrange(keys.queue_tenants(), 0, -1, withscores=True)
    pipe = client.pipeline(transaction=False)
    for tenant_id, _ in entries:
        pipe.zrange(keys.queue(tenant_id), 0, 0)
        pipe.zcard(keys.queue(tenant_id))
    pipe.hgetall(keys.running_per_tenant())
    replies = pipe.execute()
    tenants = []
    for i, (tenant_id, since) in enumerate(entries):
        head, length = replies[2 * i], replies[2 * i + 1]
        if head:
            tenants.append(TenantQueue(tenant_id, head[0], int(length), int(since)))
    tenants.sort(key=lambda t: t.tenant_id)
    running = {t: int(n) for t, n in replies[-1].items()}
    return QueueSnapshot(tenants=tenants, running=running)


def clock_arg(now_ms: int | None) -> str:
    """A script's clock argument: '' for the Redis server's clock, else a simulated time (ms)."""
    return "" if now_ms is None else str(int(now_ms))


class Leases:
    """The dispatcher-side Lua scripts and the calls that run them; JobStore owns one and shares its EventLog."""

    def __init__(
        self,
        client: redis.Redis,
        events: EventLog,
        load_job: Callable[[str], Job],
        *,
        max_attempts: int,
        prepare: Callable[[], None] = lambda: None,
    ) -> None:
        """`load_job` reads a job by id (JobStore.load_job); `prepare` runs before a claim (JobStore's
        first-use setup: the fair-share half-life)."""
        self.redis = client
        self.events = events
        self._load_job = load_job
        self._prepare = prepare
        self.max_attempts = max_attempts
        self._claim = client.register_script(lua.CLAIM)
        self._renew = client.register_script(lua.RENEW)
        self._control = client.register_script(lua.CONTROL)
        self._fenced_update = client.register_script(lua.FENCED_UPDATE)
        self._checkpoint = client.register_script(lua.CHECKPOINT)
        self._append_event = client.register_script(lua.APPEND_EVENT)
        self._finish = client.register_script(lua.FINISH)
        self._expire_lease = client.register_script(lua.EXPIRE_LEASE)
        self._uptime_denied_logged = False

    def claim_next_job(self, worker_id: str, lease_ms: int, *, now_ms: int | None = None) -> Claim | None:
        """Admit the job the scheduler picks and claim it: queued → running, attempt += 1, fresh claim
        token, lease set, its GPUs allocated to its tenant; all in one Lua step (never a double start,
        never an overcommit, however many dispatchers call at once).

        The policy (fleet.sched_scripts, docs/scheduling.md): Kueue's admission fair sharing over the
        tenants' queue heads that fit the free capacity and their quotas. The same step may ask
        borrowers' running jobs to stop ("preempt") so a tenant below its nominal quota gets it back.
        Returns None when nothing is admissible now. `now_ms`: a simulated clock (None: Redis's).
        """
        self._prepare()
        for _ in range(_CLAIM_RETRIES):
            token = new_claim_token()
            reply = self._claim(keys=[], args=[worker_id, lease_ms, token, clock_arg(now_ms)])
            if reply[0] == "retry":  # an index entry named a job no longer queued; it was dropped
                log.warning("scheduler index named a job that was not queued; retrying the decision")
                continue
            if reply[0] == "none":
                return None
            job_id, attempt, expires = reply[1], int(reply[2]), int(reply[3])
            fence = Fence(job_id, attempt, token)
            # Unfenced: the claim just happened, and a claim must never raise FencedOut. Tenants read
            # events, so the worker's host:pid stays on the job record (worker_id), for operators.
            self.events.append(job_id, "info", f"Job started (attempt {attempt}).")
            return Claim(self._load_job(job_id), fence, expires)
        log.warning("claim_next_job gave up after %d retries", _CLAIM_RETRIES)
        return None

    def renew_lease(self, fence: Fence, lease_ms: int) -> Lease:
        """Heartbeat: extend the lease by `lease_ms`; raises FencedOut if the fence is stale."""
        reply = self._renew(
            keys=[keys.job(fence.job_id), keys.leases()], args=[fence.job_id, fence.attempt, fence.token, lease_ms]
        )
        raise_for_refusal(reply, fence, "renew its lease")
        return Lease(int(reply[1]), reply[2] or None)

    def control_signal(self, fence: Fence) -> ControlSignal | None:
        """The pending request for a running attempt: None, "cancel", "pause" or "preempt". FencedOut if stale."""
        reply = self._control(keys=[keys.job(fence.job_id)], args=[fence.attempt, fence.token])
        raise_for_refusal(reply, fence, "read its control signal")
        return reply[1] or None

    def record_progress(
        self,
        fence: Fence,
        *,
        step: int,
        total_steps: int | None = None,
        metrics: dict[str, float] | None = None,
        trained_tokens: int | None = None,
        eta_s: float | None = None,
        epoch: float | None = None,
    ) -> ControlSignal | None:
        """Store the latest progress (fenced) and return any pending control request.

        Appends no event: the caller logs a "metrics" event with `append_event(fence, ..., type="metrics")`.
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
        reply = self._fenced_update(keys=[keys.job(fence.job_id)], args=[fence.attempt, fence.token, *fields])
        raise_for_refusal(reply, fence, "record progress")
        return reply[1] or None

    def record_checkpoint(
        self, fence: Fence, step: int, location: str, metrics: dict[str, float] | None = None
    ) -> Checkpoint:
        """Record a saved checkpoint (fenced). Checkpoints outlive attempts: the next attempt resumes."""
        job_id = fence.job_id
        checkpoint = Checkpoint(
            id=f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}",
            job_id=job_id,
            step=step,
            location=location,
            metrics=metrics or {},
            created_at=int(time.time()),
            attempt=fence.attempt,
        )
        reply = self._checkpoint(
            keys=[keys.job(job_id), keys.job_checkpoints(job_id)],
            args=[fence.attempt, fence.token, step, checkpoint.model_dump_json()],
        )
        raise_for_refusal(reply, fence, "record a checkpoint")
        self.append_event(fence, "info", f"Checkpoint saved at step {step}.", {"step": step, **(metrics or {})})
        return checkpoint

    def append_event(
        self,
        fence: Fence,
        level: str,
        message: str,
        data: dict[str, Any] | None = None,
        *,
        type: str = "message",
    ) -> Event:
        """Append to the job's event log while the claim holds (fenced): a stale attempt's lines never land.

        `level` is info|warn|error, `type` message|metrics. Raises FencedOut if `fence` is stale.
        """
        fields = event_fields(level, message, data, type=type)
        reply = self._append_event(
            keys=[keys.job(fence.job_id), keys.job_events(fence.job_id)],
            args=[fence.attempt, fence.token, self.events.max_len, *(x for pair in fields.items() for x in pair)],
        )
        raise_for_refusal(reply, fence, "write the job's events")
        return event_from_stream(reply[1], fields)

    def finish_job(
        self,
        fence: Fence,
        status: JobStatus | str,
        *,
        fine_tuned_model: str | None = None,
        error: JobError | None = None,
        result_files: list[str] | None = None,
        trained_tokens: int | None = None,
        hyperparameters: dict[str, Any] | None = None,
        last_failure: str | None = None,
        infra_faults: int | None = None,
        preempted: bool = False,
        retry_after_ms: int = 0,
        now_ms: int | None = None,
    ) -> Job:
        """End a running attempt (fenced): succeeded/failed/cancelled, paused, or queued (handed back).

        A pending control request is honoured, as when a lease expires: handing back (queued) or
        pausing with a cancel pending cancels the job; handing back with a pause pending pauses it.
        The returned Job carries the status the job actually ended in.
        `hyperparameters`, when given, replaces the requested ones ("auto" included) by the values used.
        `last_failure`, when given, is the operator-only account of why the attempt ended (never shown
        to the tenant, whose `error` must not carry server paths or tracebacks); `infra_faults`, the
        number of attempts handed back after infrastructure faults so far (the dispatcher bounds it).

        Raises FencedOut if `fence` is stale; a stale attempt can never change the job.
        Raises CancelRequested (and changes nothing) for `succeeded` while a cancel is pending: the
        user's cancel wins, so the worker must finish the job as cancelled instead. Once the job's
        adapter version is committed (fleet.registry) the commit is the point of no return: `succeeded`
        always succeeds, and any other status hands the job back (queued at the tail of its queue, its
        fields dropped, the reason in `last_failure`, an event only the first time) so a later attempt
        completes it (`complete_committed_publication`); a job with a committed version can only end
        succeeded.
        Raises PauseWithdrawn (and changes nothing) for `paused` when no pause is pending any more (the
        tenant resumed after the worker saw the pause): the worker must not end the job paused; it hands
        the job back (`queued`), and the next attempt resumes from the checkpoint the pause saved.

        Every end of an attempt releases its GPUs in the same step. A job handed back (`queued`) returns
        to its place in its tenant's queue. `preempted=True` (the worker stopped for a "preempt"
        request; one pending counts too) says so in its events and announces fine_tuning.job.preempted.
        `retry_after_ms`: a job that could not be placed (its gang reservation timed out) is not
        admitted again for that long (not an attempt failure). `now_ms`: a simulated clock.
        """
        job_id = fence.job_id
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
        if last_failure is not None:
            fields += ["last_failure", last_failure]
        if infra_faults is not None:
            fields += ["infra_faults", infra_faults]
        reply = self._finish(
            keys=[
                keys.job(job_id),
                keys.leases(),
                keys.running_per_tenant(),
                queue_key_of(self.redis, job_id),
                keys.queue_tenants(),
                keys.wakeup(),
                keys.job_publication(job_id),
                *keys.retention_indexes(),
            ],
            args=[
                job_id,
                fence.attempt,
                fence.token,
                target.value,
                clock_arg(now_ms),
                "1" if preempted else "0",
                max(int(retry_after_ms), 0),
                *fields,
            ],
        )
        raise_for_refusal(reply, fence, f"mark the job {target.value}")
        outcome = JobStatus(reply[1])
        if reply[2] != "1":  # a committed job handed back again: announced the first time only
            return self._load_job(job_id)
        if reply[3] == "1":
            self.events.append(job_id, "info", PREEMPTED_MESSAGE)
            return self._load_job(job_id)
        message = {
            JobStatus.SUCCEEDED: "The job has successfully completed.",
            JobStatus.FAILED: f"The job failed: {error.message if error else 'unknown error'}",
            JobStatus.CANCELLED: "Job cancelled.",
            JobStatus.PAUSED: "Job paused; resume it to continue from its last checkpoint.",
            JobStatus.QUEUED: "Job handed back to the queue.",
        }[outcome]
        self.events.append(job_id, "error" if outcome == JobStatus.FAILED else "info", message)
        return self._load_job(job_id)

    def requeue_expired_leases(self, now_ms: int | None = None, *, restart_grace_ms: int = 0) -> list[ExpiredLease]:
        """Recover jobs whose worker stopped heartbeating (call at dispatcher start-up and periodically).

        Each such job releases its GPUs and goes back to its place in its tenant's queue (its checkpoints
        are kept, so the next attempt resumes), or is failed with the reason once it has lost
        `max_attempts` workers in a row (a recorded checkpoint resets the count). A pending cancel/pause
        request is honoured instead. `now_ms` defaults to the Redis server clock; given, it is also the
        scheduler's clock for the state change (a simulation).

        `restart_grace_ms` (dispatchers pass lease_ms + heartbeat_ms): while the Redis server has been
        up for less than this, nothing is expired. Leases run on during a Redis outage although no
        worker could renew them; after a restart their workers get a full lease to reconnect and renew,
        so an outage does not requeue (or, repeated, fail) jobs that were running fine.
        """
        if restart_grace_ms > 0:
            try:
                uptime_ms = int(self.redis.info("server")["uptime_in_seconds"]) * 1000
            except redis.ResponseError as e:  # INFO denied (an ACL, a managed Redis): no grace, as before
                if not self._uptime_denied_logged:
                    log.warning("cannot read Redis's uptime (%s); expiring leases without a restart grace", e)
                    self._uptime_denied_logged = True
                uptime_ms = restart_grace_ms
            if uptime_ms < restart_grace_ms:
                log.info("Redis restarted %d ms ago; expiring no leases for the first %d ms", uptime_ms,
                         restart_grace_ms)
                return []
        clock = clock_arg(now_ms)
        if now_ms is None:
            seconds, micros = self.redis.time()
            now_ms = seconds * 1000 + micros // 1000
        expired: list[ExpiredLease] = []
        for job_id in self.redis.zrangebyscore(keys.leases(), "-inf", now_ms):
            tenant_id, attempt, worker_id, lost = self.redis.hmget(
                keys.job(job_id), "tenant_id", "attempt", "worker_id", "lease_expirations"
            )
            n_lost = int(lost or 0) + 1
            reason = f"attempt {attempt} lost its worker (lease expired without a heartbeat)"  # tenant-visible
            operator_reason = f"{reason}; worker {worker_id}"  # job record (last_failure) and log only
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
                    keys.queue(tenant_id or ""),
                    keys.queue_tenants(),
                    keys.wakeup(),
                    keys.job_publication(job_id),
                    *keys.retention_indexes(),
                ],
                args=[job_id, now_ms, self.max_attempts, attempt or "", operator_reason, error.model_dump_json(),
                      clock],
            )
            if reply[0] == "skip":
                continue
            if reply[0] == "vanished":
                log.warning("job %s: lease expired and its record is gone; its GPUs were released", job_id)
                continue
            new_status = JobStatus(reply[0])
            expired.append(ExpiredLease(job_id, int(attempt), new_status))
            level = "error" if new_status == JobStatus.FAILED else "warn"
            self.events.append(job_id, level, f"Worker lost: {reason}; job is now {new_status.value}.")
            log.warning("job %s: %s; now %s", job_id, operator_reason, new_status.value)
        return expired

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until work may be available (a job was queued) or `timeout_s` passes; True if woken.

        Wake-ups are tokens on a short list, so a dispatcher that was busy when work arrived still
        finds the token. A True result is a hint: the claim may still find nothing.
        """
        reply = self.redis.blpop([keys.wakeup()], timeout=min(max(timeout_s, 0.01), MAX_BLOCK_S))
        return reply is not None
