"""JobStore: every job state change, atomic in Redis: create, queue, claim/lease/fence, finish, events.

Two kinds of caller use one JobStore:
- the API (tenant-scoped calls: `create_job`, `get_job`, `list_jobs`, `request_cancel`, `request_pause`,
  `resume`, `mark_validated`, `fail_validation`, `queue_position`, events/checkpoints listing);
- dispatchers (job-id calls carrying the `attempt` fencing token: `claim_next_job`, `renew_lease`,
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

The client must decode responses to str (`fleet.settings.make_redis` builds one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis

from fleet import keys
from fleet import queue_scripts as lua
from fleet.events import EventLog
from fleet.exceptions import CancelRequested, FencedOut, IdempotencyConflict, InvalidRequest, InvalidState, NotFound
from fleet.jobs import (
    Checkpoint,
    ControlSignal,
    Event,
    Job,
    JobError,
    JobStatus,
    Progress,
    is_job_id,
    new_job_id,
)
from fleet.scheduling import (
    ClaimPolicy,
    PositionEstimator,
    QueueSnapshot,
    TenantQueue,
    estimate_queue_position,
    round_robin,
)
from fleet.settings import MAX_BLOCK_S, check_redis_client

__all__ = ["JobStore", "CreatedJob", "Claim", "Lease", "ExpiredLease", "request_sha256"]

log = logging.getLogger(__name__)

_FINISH_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED}
)
_CLAIM_RETRIES = 100


class CreatedJob(NamedTuple):
    """Outcome of `create_job`: `created` is False when an Idempotency-Key replay returned an old job."""

    job: Job
    created: bool


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


def request_sha256(body: Any) -> str:
    """Canonical hash of a request body (dict or raw bytes) for Idempotency-Key comparison."""
    if isinstance(body, bytes | bytearray):
        data = bytes(body)
    else:
        data = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


def _job_not_found(job_id: str) -> NotFound:
    return NotFound(f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id")


def _require_job_id(job_id: str) -> str:
    """`job_id` if well-formed; otherwise NotFound, so a crafted id never names another key."""
    if not is_job_id(job_id):
        raise _job_not_found(job_id)
    return job_id


def _fenced(job_id: str, attempt: int, reply: list) -> FencedOut:
    status, current = reply[1] or "missing", reply[2] or "?"
    return FencedOut(
        f"Attempt {attempt} of job {job_id} is stale (job is {status}, current attempt {current}); stop working on it."
    )


class JobStore:
    """Jobs in Redis. Holds the client and the registered Lua scripts; cheap to create."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_attempts: int = 3,
        events_max_len: int = 10_000,
        idempotency_ttl_s: int = 24 * 3600,
        policy: ClaimPolicy = round_robin,
        position_estimator: PositionEstimator = estimate_queue_position,
    ) -> None:
        """`policy` picks whose job is claimed next; `position_estimator` must predict that same policy."""
        check_redis_client(client)
        self.redis = client
        self.max_attempts = max_attempts
        self.events = EventLog(client, max_len=events_max_len)
        self.idempotency_ttl_s = idempotency_ttl_s
        self.policy = policy
        self.position_estimator = position_estimator
        self._create = client.register_script(lua.CREATE)
        self._mark_validated = client.register_script(lua.MARK_VALIDATED)
        self._fail_validation = client.register_script(lua.FAIL_VALIDATION)
        self._cancel = client.register_script(lua.CANCEL)
        self._pause = client.register_script(lua.PAUSE)
        self._resume = client.register_script(lua.RESUME)
        self._claim = client.register_script(lua.CLAIM)
        self._renew = client.register_script(lua.RENEW)
        self._fenced_update = client.register_script(lua.FENCED_UPDATE)
        self._checkpoint = client.register_script(lua.CHECKPOINT)
        self._finish = client.register_script(lua.FINISH)
        self._expire_lease = client.register_script(lua.EXPIRE_LEASE)

    # -- API side -----------------------------------------------------------------------------------
    def create_job(
        self,
        tenant_id: str,
        *,
        model: str,
        training_file: str,
        validation_file: str | None = None,
        suffix: str | None = None,
        seed: int | None = None,
        metadata: dict[str, str] | None = None,
        method: dict[str, Any] | None = None,
        hyperparameters: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
        base_model: str | None = None,
        init_adapter: str | None = None,
        idempotency_key: str | None = None,
        request_body: Any = None,
        validated: bool = False,
    ) -> CreatedJob:
        """Create a job in `validating_files` (or straight in `queued` when `validated`).

        `model` is what the caller asked for: a catalog base model, or an adapter version to continue
        training ("<name>:v<N>"); then `base_model` names its catalog base and `init_adapter` the version.

        With `idempotency_key`, a retry with the same key and the same `request_body` (the parsed
        JSON body, or the fields above when None) returns the first job with `created=False`; the same
        key with a different body raises IdempotencyConflict. Keys are per tenant and expire after
        `idempotency_ttl_s`. A seed is drawn when none is given, so every run is reproducible.
        """
        now = int(time.time())
        job = Job(
            id=new_job_id(),
            tenant_id=tenant_id,
            created_at=now,
            updated_at=now,
            model=model,
            base_model=base_model or model,
            init_adapter=init_adapter,
            training_file=training_file,
            validation_file=validation_file,
            suffix=suffix,
            seed=seed if seed is not None else secrets.randbelow(2**31),
            metadata=metadata or {},
            method=method,
            hyperparameters=hyperparameters or {},
            lora=lora or {},
            status=JobStatus.QUEUED if validated else JobStatus.VALIDATING_FILES,
            idempotency_key=idempotency_key,
        )
        if idempotency_key is not None:
            body = request_body
            if body is None:
                body = job.model_dump(
                    mode="json",
                    include={
                        "model",
                        "training_file",
                        "validation_file",
                        "suffix",
                        "seed",
                        "metadata",
                        "method",
                        "hyperparameters",
                        "lora",
                    },
                )
                if seed is None:
                    body.pop("seed")
            job.request_sha256 = request_sha256(body)
        fields = job.to_redis_hash()
        fields.pop("seq", None)
        flat = [x for pair in fields.items() for x in pair]
        reply = self._create(
            keys=[
                keys.job(job.id),
                keys.tenant_jobs(tenant_id),
                keys.idempotency(tenant_id, idempotency_key or ""),
                keys.job_seq(),
                keys.queue(tenant_id),
                keys.queue_tenants(),
                keys.wakeup(),
            ],
            args=[
                job.id,
                tenant_id,
                "1" if idempotency_key is not None else "0",
                job.request_sha256 or "",
                self.idempotency_ttl_s,
                "1" if validated else "0",
                *flat,
            ],
        )
        outcome, job_id = reply[0], reply[1]
        if outcome == "conflict":
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was already used with a different request body "
                f"(it created job {job_id}). Use a new key for a different request.",
                param="Idempotency-Key",
            )
        if outcome == "existing":
            return CreatedJob(self.load_job(job_id), created=False)
        self.append_event(job.id, "info", f"Created fine-tuning job: {job.id}")
        return CreatedJob(self.load_job(job.id), created=True)

    def load_job(self, job_id: str) -> Job:
        """A job by id regardless of tenant (for dispatchers and internal use)."""
        fields = self.redis.hgetall(keys.job(_require_job_id(job_id)))
        if not fields:
            raise _job_not_found(job_id)
        return Job.from_redis_hash(fields)

    def get_job(self, tenant_id: str, job_id: str) -> Job:
        """A tenant's job; another tenant's job raises NotFound exactly like a missing one."""
        job = self.load_job(job_id)
        if job.tenant_id != tenant_id:
            raise _job_not_found(job_id)
        return job

    def list_jobs(
        self,
        tenant_id: str,
        *,
        after: str | None = None,
        limit: int = 20,
        metadata: dict[str, str] | None = None,
        status: JobStatus | None = None,
    ) -> tuple[list[Job], bool]:
        """A tenant's jobs newest first: (page, has_more). `after` is the last job id of the previous page.

        `metadata` keeps jobs whose metadata holds every given key/value pair.
        """
        if limit < 1:
            raise InvalidRequest(f"limit must be at least 1, got {limit}.", param="limit")
        index = keys.tenant_jobs(tenant_id)
        upper: str = "+inf"
        if after is not None:
            score = self.redis.zscore(index, after)
            if score is None:
                raise InvalidRequest(f"No fine-tuning job with id {after!r} to page after.", param="after")
            upper = f"({int(score)}"
        page: list[Job] = []
        batch = max(limit + 1, 50)
        while len(page) <= limit:
            ids = self.redis.zrevrangebyscore(index, upper, "-inf", start=0, num=batch, withscores=True)
            if not ids:
                break
            pipe = self.redis.pipeline(transaction=False)
            for job_id, _ in ids:
                pipe.hgetall(keys.job(job_id))
            for fields in pipe.execute():
                if not fields:
                    continue
                job = Job.from_redis_hash(fields)
                if metadata and any(job.metadata.get(k) != v for k, v in metadata.items()):
                    continue
                if status is not None and job.status != status:
                    continue
                page.append(job)
            upper = f"({int(ids[-1][1])}"
            if len(ids) < batch:
                break
        return page[:limit], len(page) > limit

    def mark_validated(self, job_id: str) -> Job:
        """validating_files → queued (wakes a dispatcher). A job cancelled meanwhile stays cancelled."""
        _require_job_id(job_id)
        reply = self._mark_validated(
            keys=[keys.job(job_id), self._queue_of(job_id), keys.queue_tenants(), keys.wakeup()],
            args=[job_id],
        )
        if reply[0] == "missing":
            raise _job_not_found(job_id)
        if reply[0] == "invalid" and reply[1] != JobStatus.CANCELLED.value:
            raise InvalidState(f"Job {job_id} is {reply[1]}, not validating_files; it cannot be queued.")
        if reply[0] == "ok":
            self.append_event(job_id, "info", "Files validated; job queued.")
        return self.load_job(job_id)

    def fail_validation(self, job_id: str, error: JobError) -> Job:
        """validating_files → failed with `error` (e.g. code "invalid_training_file", param "training_file").

        A job cancelled meanwhile stays cancelled.
        """
        _require_job_id(job_id)
        reply = self._fail_validation(keys=[keys.job(job_id)], args=[job_id, error.model_dump_json()])
        if reply[0] == "missing":
            raise _job_not_found(job_id)
        if reply[0] == "invalid" and reply[1] != JobStatus.CANCELLED.value:
            raise InvalidState(f"Job {job_id} is {reply[1]}, not validating_files; it cannot fail validation.")
        if reply[0] == "ok":
            self.append_event(job_id, "error", f"File validation failed: {error.message}", error.model_dump())
        return self.load_job(job_id)

    def request_cancel(self, tenant_id: str, job_id: str) -> Job:
        """Cancel: immediate unless running; a running job gets a cancel request its worker acts on."""
        messages = {
            "cancelled": "Job cancelled.",
            "requested": "Cancellation requested; stopping the running job.",
        }
        return self._control(self._cancel, tenant_id, job_id, "cancelled", messages)

    def request_pause(self, tenant_id: str, job_id: str) -> Job:
        """Pause: a queued job leaves the queue now; a running one gets a pause request (it checkpoints)."""
        messages = {
            "paused": "Job paused.",
            "requested": "Pause requested; the job will stop at its next checkpoint.",
        }
        return self._control(self._pause, tenant_id, job_id, "paused", messages)

    def resume(self, tenant_id: str, job_id: str) -> Job:
        """paused → queued (at the back of the tenant's queue); also withdraws a pending pause request."""
        messages = {
            "queued": "Job resumed; queued to continue from its last checkpoint.",
            "unpaused": "Pause request withdrawn; the job keeps running.",
        }
        return self._control(self._resume, tenant_id, job_id, "resumed", messages)

    def _control(self, script: Any, tenant_id: str, job_id: str, verb: str, messages: dict[str, str]) -> Job:
        """Run a tenant's control script (cancel/pause/resume) and log its outcome as an event."""
        _require_job_id(job_id)
        reply = script(
            keys=[keys.job(job_id), keys.queue(tenant_id), keys.queue_tenants(), keys.wakeup()],
            args=[job_id, tenant_id],
        )
        if reply[0] == "missing":
            raise _job_not_found(job_id)
        if reply[0] == "invalid":
            raise InvalidState(f"Job {job_id} is {reply[1]}; it cannot be {verb}.")
        if reply[0] in messages:
            self.append_event(job_id, "info", messages[reply[0]])
        return self.load_job(job_id)

    def queue_position(self, job_id: str) -> int | None:
        """1-based estimated position of a queued job under the claim policy; None if not queued."""
        if not is_job_id(job_id):
            return None
        status, tenant_id = self.redis.hmget(keys.job(job_id), "status", "tenant_id")
        if status != JobStatus.QUEUED.value or tenant_id is None:
            return None
        index = self.redis.lpos(keys.queue(tenant_id), job_id)
        if index is None:
            return None
        return self.position_estimator(self.snapshot(), tenant_id, int(index))

    # -- dispatcher side ----------------------------------------------------------------------------
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
                self.append_event(head, "info", f"Job started (attempt {attempt}) on worker {worker_id}.")
                return Claim(self.load_job(head), attempt, expires)
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
        self.append_event(job_id, "info", f"Checkpoint saved at step {step}.", {"step": step, **(metrics or {})})
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
                self._queue_of(job_id),
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
        self.append_event(job_id, "error" if outcome == JobStatus.FAILED else "info", message)
        return self.load_job(job_id)

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
            self.append_event(job_id, level, f"Worker lost: {reason}; job is now {new_status.value}.")
            log.warning("job %s: %s; now %s", job_id, reason, new_status.value)
        return expired

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until work may be available (a job was queued) or `timeout_s` passes; True if woken.

        Wake-ups are tokens on a short list, so a dispatcher that was busy when work arrived still
        finds the token. A True result is a hint: the claim may still find nothing.
        """
        reply = self.redis.blpop([keys.wakeup()], timeout=min(max(timeout_s, 0.01), MAX_BLOCK_S))
        return reply is not None

    # -- events (the job's log; see fleet.events) ---------------------------------------------------
    def append_event(
        self,
        job_id: str,
        level: str,
        message: str,
        data: dict[str, Any] | None = None,
        *,
        type: str = "message",
    ) -> Event:
        """Append to the job's capped event stream; level info|warn|error, type message|metrics."""
        return self.events.append(job_id, level, message, data, type=type)

    def read_events(self, job_id: str, *, after: str | None = None, limit: int = 100) -> list[Event]:
        """Events oldest first, strictly after event id `after` (all when None)."""
        return self.events.read(job_id, after=after, limit=limit)

    def list_events(self, job_id: str, *, after: str | None = None, limit: int = 20) -> tuple[list[Event], bool]:
        """Events newest first, as OpenAI lists them: (page, has_more)."""
        return self.events.list(job_id, after=after, limit=limit)

    def wait_for_events(self, job_id: str, *, after: str | None, block_ms: int, limit: int = 100) -> list[Event]:
        """Block up to `block_ms` for events after `after` (None: only new ones). For SSE streaming."""
        return self.events.wait(job_id, after=after, block_ms=block_ms, limit=limit)

    # -- helpers ------------------------------------------------------------------------------------
    def _queue_of(self, job_id: str) -> str:
        tenant_id = self.redis.hget(keys.job(job_id), "tenant_id")
        return keys.queue(tenant_id or "")
