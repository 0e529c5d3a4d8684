"""JobStore: every job state change, atomic in Redis: create, queue, cancel/pause/resume, events.

Two kinds of caller use one JobStore:
- the API (tenant-scoped calls: `create_job`, `get_job`, `list_jobs`, `request_cancel`, `request_pause`,
  `resume`, `queue_position`, events/checkpoints listing);
- dispatchers, through `jobs.leases` (a `fleet.leases.Leases`, which also holds the dispatcher's loop
  in outline): `claim_next_job`, then calls carrying the claim's `Fence` (`renew_lease`,
  `record_progress`, `record_checkpoint`, `append_event`, `control_signal`, `finish_job`), and
  `requeue_expired_leases`, `wait_for_work`. A call with a stale fence raises FencedOut and changes nothing.

The client must decode responses to str (`fleet.settings.make_redis` builds one).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from typing import Any, NamedTuple

import redis

from fleet import keys
from fleet import queue_scripts as lua
from fleet.events import EventLog
from fleet.exceptions import IdempotencyConflict, InvalidRequest, InvalidState, NotFound, QuotaExceeded
from fleet.job_spec import JobSpec
from fleet.jobs import Checkpoint, Event, Job, JobStatus, is_job_id, new_job_id
from fleet.leases import Claim, ExpiredLease, Fence, Lease, Leases, clock_arg, read_queue_snapshot
from fleet.resources import PriorityClass, Resources
from fleet.scheduler_view import QueueEstimate, estimate_queue
from fleet.scheduling import QueueSnapshot, migrate_state, set_half_life, set_starvation_guard
from fleet.settings import check_redis_client

__all__ = ["JobStore", "CreatedJob", "Claim", "Fence", "Lease", "ExpiredLease", "request_sha256"]

# Retry-After of a submission refused at max_queued_jobs: a slot frees when a queued job starts, which
# the submitter cannot see; a minute is a polite default between a busy loop and a stalled client.
QUEUED_QUOTA_RETRY_AFTER_S = 60


class CreatedJob(NamedTuple):
    """Outcome of `create_job`: `created` is False when an Idempotency-Key replay returned an old job."""

    job: Job
    created: bool


def request_sha256(body: Any) -> str:
    """Canonical hash of a request body (dict or raw bytes) for Idempotency-Key comparison."""
    if isinstance(body, bytes | bytearray):
        data = bytes(body)
    else:
        data = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()


def _job_not_found(job_id: str) -> NotFound:
    return NotFound(f"No fine-tuning job with id {job_id!r}.", param="fine_tuning_job_id")


def _idempotency_conflict(idempotency_key: str | None, job_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"Idempotency-Key {idempotency_key!r} was already used with a different request body "
        f"(it created job {job_id}). Use a new key for a different request.",
        param="Idempotency-Key",
    )


def _require_job_id(job_id: str) -> str:
    """`job_id` if well-formed; otherwise NotFound, so a crafted id never names another key."""
    if not is_job_id(job_id):
        raise _job_not_found(job_id)
    return job_id


class JobStore:
    """Jobs in Redis. Holds the client, the API-side Lua scripts and a `Leases`; cheap to create."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_attempts: int = 3,
        events_max_len: int = 10_000,
        idempotency_ttl_s: int = 24 * 3600,
        fair_share_half_life_s: float | None = None,
        starvation_guard_s: float | None = None,
        legacy_job_gpus: int | None = None,
    ) -> None:
        """`fair_share_half_life_s` (Settings.fair_share_half_life_s) and `starvation_guard_s`
        (Settings.starvation_guard_s): when given, written to Redis for every process's scheduler
        (None: keep what is there; by default 1 h and 300 s). `legacy_job_gpus`
        (Settings.legacy_job_gpus): what a job the previous release started holds (migrate_state)."""
        check_redis_client(client)
        self.redis = client
        self.events = EventLog(client, max_len=events_max_len)
        self.idempotency_ttl_s = idempotency_ttl_s
        self._half_life_s = fair_share_half_life_s
        self._starvation_guard_s = starvation_guard_s
        self._legacy_job_gpus = legacy_job_gpus
        self._prepared = False
        self._create = client.register_script(lua.CREATE)
        self._cancel = client.register_script(lua.CANCEL)
        self._pause = client.register_script(lua.PAUSE)
        self._resume = client.register_script(lua.RESUME)
        # The dispatcher side (claim, lease, fenced writes, finish): dispatchers call `jobs.leases.<call>`.
        self.leases: Leases = Leases(
            client, self.events, self.load_job, max_attempts=max_attempts, prepare=self._prepare
        )

    def _prepare(self) -> None:
        """On first use, not at construction (a store is built before Redis may be up): bring state
        from before the scheduler up to date and write the half-life, if this store was given one."""
        if self._prepared:
            return
        migrate_state(self.redis, self._legacy_job_gpus)
        if self._half_life_s is not None:
            set_half_life(self.redis, self._half_life_s)
        if self._starvation_guard_s is not None:
            set_starvation_guard(self.redis, self._starvation_guard_s)
        self._prepared = True

    @property
    def max_attempts(self) -> int:
        """Workers a job may lose (expired leases) before it fails; held by `leases`."""
        return self.leases.max_attempts

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
        spec: JobSpec | None = None,
        base_model: str | None = None,
        init_adapter: str | None = None,
        idempotency_key: str | None = None,
        request_body: Any = None,
        resources: Resources | None = None,
        priority: PriorityClass | None = None,
        now_ms: int | None = None,
        parent: str | None = None,
    ) -> CreatedJob:
        """Create a job, queued (its files were validated at upload; the caller checked the rest).

        `model` is what the caller asked for: a catalog base model, or an adapter version to continue
        training ("<name>:v<N>"); then `base_model` names its catalog base and `init_adapter` the version.

        With `idempotency_key`, a retry with the same key and the same `request_body` (the parsed
        JSON body, or the fields above when None) returns the first job with `created=False`; the same
        key with a different body raises IdempotencyConflict. Keys are per tenant and expire after
        `idempotency_ttl_s`. A seed is drawn when none is given, so every run is reproducible.

        `spec` (default: JobSpec's) is how it trains; `resources` and `priority`, when given, replace
        the spec's (default: one worker, one GPU, "normal"): what the scheduler admits by. A tenant at
        its `max_queued_jobs` quota gets QuotaExceeded, atomically with the count (two racing
        submissions cannot both pass the last slot); a job larger than the tenant's nominal quota plus
        its borrowing limit (when one is set) gets InvalidRequest. `now_ms`: a simulated clock for the
        scheduler (bench/sched_sim.py; None: Redis's). `parent`: the rank sweep (fleet.sweeps) this
        job is a child of.
        """
        now = int(time.time())
        spec = spec or JobSpec()
        overrides = {k: v for k, v in {"resources": resources, "priority": priority}.items() if v is not None}
        if overrides:
            spec = JobSpec.model_validate({**spec.model_dump(), **overrides})
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
            spec=spec,
            status=JobStatus.QUEUED,
            idempotency_key=idempotency_key,
            parent=parent,
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
                        "spec",
                    },
                )
                if seed is None:
                    body.pop("seed")
            job.request_sha256 = request_sha256(body)
        self._prepare()
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
                keys.job_events(job.id),
            ],
            args=[
                job.id,
                tenant_id,
                "1" if idempotency_key is not None else "0",
                job.request_sha256 or "",
                self.idempotency_ttl_s,
                clock_arg(now_ms),
                self.events.max_len,
                now,
                *flat,
            ],
        )
        outcome, job_id = reply[0], reply[1]
        if outcome == "quota":
            raise QuotaExceeded(
                f"Tenant {tenant_id} already has {reply[2]} queued jobs, its {reply[1]} quota. Wait for some "
                "to start, or cancel some, then submit again (an admin can raise the quota).",
                limit=reply[1],
                retry_after_s=QUEUED_QUOTA_RETRY_AFTER_S,
            )
        if outcome == "too_large":
            gpus, nominal, borrow = reply[1:4]
            raise InvalidRequest(
                f"The job asks for {gpus} GPUs, more than tenant {tenant_id}'s nominal quota ({nominal}) plus its "
                f"borrowing_limit_gpus ({borrow}) = {int(nominal) + int(borrow)} allow: it could never start. Ask "
                "for fewer GPUs, or ask an admin to raise the quota.",
                param="resources",
            )
        if outcome == "conflict":
            raise _idempotency_conflict(idempotency_key, job_id)
        if outcome == "existing" and job_id != job.id:  # an earlier request with this Idempotency-Key
            return CreatedJob(self.load_job(job_id), created=False)
        if outcome == "created":  # the script wrote exactly `job` (and its first event): no read back
            return CreatedJob(job.model_copy(update={"seq": int(reply[2])}), created=True)
        # "existing" under our own id: the script ran, its reply was lost and it was retried.
        return CreatedJob(self.load_job(job.id), created=True)

    def find_replay(self, tenant_id: str, idempotency_key: str, request_body: Any) -> Job | None:
        """The job an earlier create with this Idempotency-Key made, if the key is known (read-only).

        Looked up before a request is validated, so a replay answers with the original job even when
        what it named has changed since (its training file deleted, say). IdempotencyConflict when
        the key was used with another body; None when the key is new (then `create_job` decides,
        atomically, should two first attempts race).
        """
        job_id, body_sha256 = self.redis.hmget(keys.idempotency(tenant_id, idempotency_key), "job_id", "body_sha256")
        if job_id is None:
            return None
        if body_sha256 != request_sha256(request_body):
            raise _idempotency_conflict(idempotency_key, job_id)
        return self.load_job(job_id)

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

        `metadata` keeps jobs whose metadata holds every given key/value pair. Without filters a page
        costs O(limit): one ZSCORE for the cursor, one range read, limit + 1 job reads.
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
        # Unfiltered, a page reads exactly limit + 1 jobs (O(page)); a filter reads ahead in batches.
        batch = max(limit + 1, 50) if metadata or status is not None else limit + 1
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

    def request_cancel(self, tenant_id: str, job_id: str, *, now_ms: int | None = None) -> Job:
        """Cancel: immediate unless running; a running job gets a cancel request its worker acts on.

        Once the job's adapter version is committed the cancel changes nothing: the job completes
        (succeeded, with that version), and an event says so.
        """
        messages = {
            "cancelled": "Job cancelled.",
            "requested": "Cancellation requested; stopping the running job.",
            "completing": "Cancel arrived after the adapter was published; the job completes.",
        }
        return self._control(self._cancel, tenant_id, job_id, "cancelled", messages, now_ms)

    def request_pause(self, tenant_id: str, job_id: str, *, now_ms: int | None = None) -> Job:
        """Pause: a queued job leaves the queue now; a running one gets a pause request (it checkpoints)."""
        messages = {
            "paused": "Job paused.",
            "requested": "Pause requested; the job will stop at its next checkpoint.",
            "completing": "Pause arrived after the adapter was published; the job completes.",
        }
        return self._control(self._pause, tenant_id, job_id, "paused", messages, now_ms)

    def resume(self, tenant_id: str, job_id: str, *, now_ms: int | None = None) -> Job:
        """paused → queued (at the back of the tenant's queue); also withdraws a pending pause request.
        QuotaExceeded when the tenant is at its max_queued_jobs quota (parked jobs count)."""
        messages = {
            "queued": "Job resumed; queued to continue from its last checkpoint.",
            "unpaused": "Pause request withdrawn; the job keeps running.",
        }
        return self._control(self._resume, tenant_id, job_id, "resumed", messages, now_ms)

    def _control(
        self, script: Any, tenant_id: str, job_id: str, verb: str, messages: dict[str, str], now_ms: int | None
    ) -> Job:
        """Run a tenant's control script (cancel/pause/resume) and log its outcome as an event."""
        _require_job_id(job_id)
        reply = script(
            keys=[
                keys.job(job_id),
                keys.queue(tenant_id),
                keys.queue_tenants(),
                keys.wakeup(),
                keys.job_publication(job_id),
                *keys.retention_indexes(),
            ],
            args=[job_id, tenant_id, clock_arg(now_ms)],
        )
        if reply[0] == "missing":
            raise _job_not_found(job_id)
        if reply[0] == "invalid":
            raise InvalidState(f"Job {job_id} is {reply[1]}; it cannot be {verb}.")
        if reply[0] == "quota":
            raise QuotaExceeded(
                f"Tenant {tenant_id} already has {reply[2]} queued jobs, its {reply[1]} quota; job {job_id} stays "
                "paused. Wait for some to start, or cancel some, then resume it (an admin can raise the quota).",
                limit=reply[1],
                retry_after_s=QUEUED_QUOTA_RETRY_AFTER_S,
            )
        if reply[0] in messages:
            self.append_event(job_id, "info", messages[reply[0]])
        return self.load_job(job_id)

    def queue_position(self, job_id: str) -> int | None:
        """1-based estimated position of a queued job under the scheduler's policy; None if not queued
        (fleet.scheduler_view.estimate_queue: the assumptions)."""
        estimate = self.queue_estimates([job_id]).get(job_id)
        return estimate.position if estimate else None

    def queue_positions(self, jobs: list[Job]) -> dict[str, int]:
        """`queue_position` of each queued job of a page, from one estimate (job id → position; jobs not
        queued are left out). For listings: one simulation for the page, not one per job."""
        queued = [job.id for job in jobs if job.status == JobStatus.QUEUED]
        return {job_id: e.position for job_id, e in self.queue_estimates(queued).items()}

    def queue_estimates(self, job_ids: list[str], *, now_ms: int | None = None) -> dict[str, QueueEstimate]:
        """Position and estimated start of each queued job among `job_ids` (others are left out)."""
        ids = [j for j in job_ids if is_job_id(j)]
        if not ids:
            return {}
        self._prepare()
        return estimate_queue(self.redis, ids, now_ms=now_ms)

    def snapshot(self) -> QueueSnapshot:
        """Who waits and who runs (tenants with queued jobs, running jobs per tenant), for metrics."""
        self._prepare()
        return read_queue_snapshot(self.redis)

    # -- checkpoints (recorded by dispatchers through `leases.record_checkpoint`) -------------------
    def list_checkpoints(self, job_id: str) -> list[Checkpoint]:
        """A job's checkpoints, newest (highest step) first."""
        raw = self.redis.hvals(keys.job_checkpoints(job_id))
        return sorted((Checkpoint.model_validate_json(r) for r in raw), key=lambda c: c.step, reverse=True)

    def latest_checkpoint(self, job_id: str) -> Checkpoint | None:
        """The checkpoint to resume from, or None."""
        checkpoints = self.list_checkpoints(job_id)
        return checkpoints[0] if checkpoints else None

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
