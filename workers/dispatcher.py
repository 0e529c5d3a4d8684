"""The dispatcher: claims jobs from Redis, runs them on Ray Train, streams progress back, publishes adapters.

One dispatcher runs one job at a time (run several for more). For each claim it:
1. holds the job's lease by heartbeat; losing it (fenced out) means another attempt owns the job;
2. fetches the dataset files and the latest checkpoint of earlier attempts from the object store;
3. runs `workers.ray_train.run_training_on_ray`; inside the rank-0 worker a `JobReporter` writes
   progress and events to Redis, uploads each checkpoint to the object store, and relays cancel/pause;
4. publishes the adapter through the registry (idempotent per job, fenced by the claim) and finishes
   the job. Every write carries the claim's fence (attempt + token), so a stale attempt can never
   change the job.
A dispatcher that dies leaves its lease to expire; the maintenance thread of any other dispatcher
(workers/maintenance.py, busy or not) requeues the job and the next attempt resumes from the last
checkpoint.

Cancel and pause reach every phase: the heartbeat keeps the latest control signal RENEW returns, each
blocking phase (downloads, dataset checks) runs on a helper thread the dispatcher stops waiting for,
and training runs as a Ray task the dispatcher kills (workers.ray_train). A cancel ends the job
`cancelled` at once; a pause first lets the training loop write and record its checkpoint (at most
settings.pause_grace_s), then ends it `paused`, to resume from that checkpoint. Redis being unreachable never fails a
job: the reporter rides it out, and a longer outage hands the job back to resume from its checkpoint.
An object-store or Ray node fault hands the job back too, at most `max_infra_faults` times
(workers.errors says which errors are faults of the machinery, and what of an error a tenant sees).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis

from fleet.checkpoints import download_checkpoint, upload_checkpoint
from fleet.exceptions import CancelRequested, FencedOut, FleetError, InvalidRequest, NotFound, PauseWithdrawn
from fleet.fencing import Fence
from fleet.files import FileStore
from fleet.jobs import Checkpoint, ControlSignal, Job, JobError, JobStatus
from fleet.queue import Claim, JobStore
from fleet.registry import AdapterRegistry, adapter_name_for_job, parse_adapter_ref
from fleet.retention import run_retention
from fleet.settings import Settings, load_catalog, make_object_store, make_redis
from workers.checkpoint_uploader import CheckpointUploader
from workers.errors import error_chain, full_text, is_infrastructure_fault, scrub_paths, tenant_summary
from workers.maintenance import MaintenanceThread, claim_work_dir, sweep_work_dirs
from workers.ray_train import TrainingAborted, TrainingSetupError, run_training_on_ray
from workers.reporting import Control
from workers.spec import AUTO_BASE_LEARNING_RATE, Hyperparameters, LoraSpec, TrainingSpec

__all__ = ["Dispatcher", "JobReporter", "JobReporterFactory", "build_training_spec"]

logger = logging.getLogger(__name__)

_LEVELS = {"warning": "warn", "warn": "warn", "error": "error", "critical": "error"}
# READONLY: a replica answering during a failover, before it is promoted; as transient as an outage.
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)
# How long a pause lets a run whose training loop has not started yet end by itself before it is killed;
# a training loop gets up to settings.pause_grace_s to write and record its checkpoint.
_PAUSE_GRACE_S = 2.0
_POLL_S = 0.25  # how often a waiting dispatcher looks at the heartbeat's control signal
_CHECKPOINT_RECORD_TIMEOUT_S = 60.0  # how long the reporter retries recording an uploaded checkpoint
_CHECKPOINT_UPLOAD_WAIT_S = 600.0  # how long the end of a run waits for its checkpoint uploads
_LAST_FAILURE_MAX_CHARS = 20_000  # of the operator-only account of a failure kept on the job
T = TypeVar("T")


# ------------------------------------------------------------------------------------ job → spec
def build_training_spec(job: Job, *, base_model: Path, quantization: str | None, work_dir: Path,
                        training_file: Path, validation_file: Path | None,
                        init_adapter: Path | None = None) -> TrainingSpec:
    """The training engine's spec for a job accepted by the API (whose fields it already validated)."""
    lora_fields = {k: v for k, v in job.lora.items() if k in LoraSpec.model_fields}
    hp = job.hyperparameters
    hyperparameters = Hyperparameters(
        n_epochs=hp.get("n_epochs", "auto"),
        batch_size=hp.get("batch_size", "auto"),
        learning_rate_multiplier=None if hp.get("learning_rate_multiplier", "auto") == "auto"
        else float(hp["learning_rate_multiplier"]),
    )
    return TrainingSpec(
        base_model=base_model,
        quantization=None if quantization in (None, "none") else quantization,
        lora=LoraSpec(**lora_fields),
        hyperparameters=hyperparameters,
        training_file=training_file,
        validation_file=validation_file,
        init_adapter=init_adapter,
        seed=job.seed or 0,
        n_checkpoints=3,
    )


def hyperparameters_used(requested: dict[str, Any], resolved: dict[str, Any]) -> dict[str, Any]:
    """The job's `hyperparameters` after training: OpenAI's three with "auto" replaced by the values
    used, plus every other value the engine resolved (the actual learning_rate, warmup, schedule, ...).
    An auto multiplier is reported as the chosen rate over the base rate (AUTO_BASE_LEARNING_RATE)."""
    multiplier = requested.get("learning_rate_multiplier", "auto")
    if multiplier == "auto":
        multiplier = round(resolved["learning_rate"] / AUTO_BASE_LEARNING_RATE, 6)
    openai_view = {"n_epochs": resolved["n_epochs"], "batch_size": resolved["batch_size"],
                   "learning_rate_multiplier": multiplier}
    return {**resolved, **openai_view}


# --------------------------------------------------------------------- reporter inside Ray rank 0
class JobReporter:
    """The training loop's Reporter for one attempt of one job: Redis for state, object store for files.

    It never raises a Redis outage into training: progress and events written while Redis is away are
    dropped (the next step's replace them), a checkpoint record is retried for
    _CHECKPOINT_RECORD_TIMEOUT_S, and `control()` answers the last signal it saw.
    """

    def __init__(self, settings: Settings, tenant_id: str, fence: Fence) -> None:
        self.job_id, self.tenant_id, self.fence = fence.job_id, tenant_id, fence
        self.attempt = fence.attempt
        self.jobs = JobStore(make_redis(settings), max_attempts=settings.max_attempts,
                             events_max_len=settings.events_max_len)
        self.store = make_object_store(settings)
        self.fenced = False
        self._control: Control = None
        self._started = time.monotonic()
        self._first_step: int | None = None
        self._uploads: CheckpointUploader | None = None  # started by the first checkpoint

    def log(self, message: str, level: str = "info") -> None:
        if self.fenced:
            return
        self._append_event(_LEVELS.get(level, "info"), message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.fenced:
            return
        total = int(values["total_steps"]) if "total_steps" in values else None
        if self._first_step is None:
            self._first_step, self._started = step, time.monotonic()
        eta_s = None
        if total and step > self._first_step:
            rate = (time.monotonic() - self._started) / (step - self._first_step)
            eta_s = round(rate * (total - step), 1)
        shown = {k: float(v) for k, v in values.items() if isinstance(v, int | float)}
        tokens = int(values["tokens_trained"]) if "tokens_trained" in values else None
        try:
            control = self.jobs.leases.record_progress(
                self.fence, step=step, total_steps=total, metrics=shown, eta_s=eta_s,
                epoch=values.get("epoch"), trained_tokens=tokens,
            )
        except FencedOut:
            self.fenced = True
            return
        except _REDIS_DOWN as e:
            logger.warning("%s: Redis unreachable, progress of step %d not recorded (%s)", self.job_id, step, e)
            return
        self._control = control
        parts = [f"Step {step}/{total}" if total else f"Step {step}"]
        for name, label in (("train_loss", "training loss"), ("val_loss", "validation loss"),
                            ("val_token_accuracy", "validation token accuracy")):
            if name in shown:
                parts.append(f"{label}={shown[name]:.4f}")
        self._append_event("info", ", ".join(parts), {"step": step, **shown}, type="metrics")

    def checkpoint(self, step: int, path: Path) -> None:
        """Hand the checkpoint to the background uploader and return at once (the step never waits
        on the object store); `close()` waits for the uploads. Nothing is queued once fenced out or
        cancelled, and the uploader checks again before it starts each upload."""
        if self.control() == "cancel":
            return
        if self._uploads is None:
            self._uploads = CheckpointUploader(self._upload_and_record)
        self._uploads.submit(step, path)

    def close(self, timeout_s: float = _CHECKPOINT_UPLOAD_WAIT_S) -> None:
        """Wait until every checkpoint handed over is uploaded and recorded (so a pause's checkpoint is
        recorded before the job is marked paused), then stop the uploader."""
        if self._uploads is not None:
            self._uploads.close(timeout_s)

    def _upload_and_record(self, step: int, path: Path) -> None:
        # Runs on the uploader's thread. An attempt fenced out after this check still writes only under
        # its own a<attempt>-<token>/ prefix, which no newer claim records.
        if self.control() == "cancel":
            return
        prefix = upload_checkpoint(self.store, self.tenant_id, self.job_id, step, path, fence=self.fence)
        # Every file is stored before the fenced Redis write commits it, so a listed checkpoint is whole.
        deadline = time.monotonic() + _CHECKPOINT_RECORD_TIMEOUT_S
        while True:
            try:
                self.jobs.leases.record_checkpoint(self.fence, step, prefix)
                return
            except FencedOut:
                self.fenced = True
                return
            except _REDIS_DOWN as e:
                if time.monotonic() > deadline:
                    logger.warning("%s: Redis unreachable for %.0fs; checkpoint of step %d not recorded "
                                   "(a later one will be): %s", self.job_id, _CHECKPOINT_RECORD_TIMEOUT_S, step, e)
                    return
                time.sleep(1.0)

    def control(self) -> Control:
        if self.fenced:
            return "cancel"  # another attempt owns the job: stop without writing anything
        try:
            self._control = self.jobs.leases.control_signal(self.fence)
        except FencedOut:
            self.fenced = True
            return "cancel"
        except _REDIS_DOWN:
            pass  # keep training on the last signal seen; the next poll asks again
        return self._control

    def _append_event(self, level: str, message: str, data: dict | None = None, **kwargs: Any) -> None:
        try:
            self.jobs.leases.append_event(self.fence, level, message, data, **kwargs)
        except FencedOut:
            self.fenced = True  # another attempt owns the job's log now
        except _REDIS_DOWN as e:
            logger.warning("%s: Redis unreachable, event dropped: %s (%s)", self.job_id, message, e)


@dataclass(frozen=True)
class JobReporterFactory:
    """Picklable: Ray ships it to the rank-0 worker, which calls it to build its JobReporter."""

    settings: Settings
    tenant_id: str
    fence: Fence

    def __call__(self) -> JobReporter:
        return JobReporter(self.settings, self.tenant_id, self.fence)


# ------------------------------------------------------------------------------------ heartbeat
class StopRequested(Exception):
    """A cancel or pause reached the dispatcher outside the training loop; `signal` says which."""

    def __init__(self, signal: ControlSignal) -> None:
        super().__init__(f"{signal} requested")
        self.signal = signal


class _AlreadyFinished(Exception):
    """The attempt already wrote the job's end (a cancel or pause during training); nothing is left to do."""


class _Heartbeat:
    """Renews a claim's lease every heartbeat_ms on its own thread; keeps the latest control signal
    RENEW returns (`control`) and notes when the claim is lost (`lost`)."""

    def __init__(self, jobs: JobStore, claim: Claim, settings: Settings) -> None:
        self.jobs, self.claim, self.settings = jobs, claim, settings
        self.lost = threading.Event()
        self.control: ControlSignal | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job.id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def raise_if_stopped(self, *, honour_pause: bool = True) -> None:
        """Raise FencedOut if the claim was lost, StopRequested if a cancel (or pause) is pending."""
        if self.lost.is_set():
            raise FencedOut(f"attempt {self.claim.attempt} of {self.claim.job.id} lost its lease")
        if self.control == "cancel" or (self.control == "pause" and honour_pause):
            raise StopRequested(self.control)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_ms / 1000):
            try:
                lease = self.jobs.leases.renew_lease(self.claim.fence, self.settings.lease_ms)
            except FencedOut:
                logger.warning("lost the lease of %s (attempt %d)", self.claim.job.id, self.claim.attempt)
                self.lost.set()
                return
            except Exception:  # Redis away: keep trying until the lease would run out
                logger.exception("heartbeat for %s failed; retrying", self.claim.job.id)
                continue
            self.control = lease.control


class _TrainingStop:
    """`should_stop` for a training run: at once when fenced out or cancelled. For a pause, once the
    pause's checkpoint is recorded (a checkpoint newer than the one recorded when the pause was seen),
    at most `pause_grace_s` after the pause was seen; a run whose training loop has not reported
    progress yet (waiting for resources, loading the model) has nothing to save and is stopped after
    _PAUSE_GRACE_S. A withdrawn pause restarts the clock. A run that ends "paused" by itself is
    finished by the caller.

    `latest_checkpoint` and `training_started` read the job in Redis; while Redis is away they count
    as "nothing new" and the wait is bounded by `pause_grace_s` alone.

    On a cancel or pause it first calls `end_job(signal)`, so the job ends as the user asked at once,
    while the run is still being torn down (its late writes are fenced out)."""

    def __init__(self, heartbeat: _Heartbeat, end_job: Callable[[ControlSignal], None], *,
                 latest_checkpoint: Callable[[], Checkpoint | None], training_started: Callable[[], bool],
                 pause_grace_s: float) -> None:
        self.heartbeat, self.end_job = heartbeat, end_job
        self.latest_checkpoint, self.training_started = latest_checkpoint, training_started
        self.pause_grace_s = pause_grace_s
        self.reason: str | None = None
        self._pause_seen_at: float | None = None
        self._checkpoint_at_pause: tuple[int, str] | None = None

    def __call__(self) -> str | None:
        if self.reason is not None:
            return self.reason
        if self.heartbeat.lost.is_set():
            self.reason = "fenced"
        elif self.heartbeat.control == "cancel":
            self.reason = "cancel"
        elif self.heartbeat.control == "pause":
            if self._pause_seen_at is None:
                self._pause_seen_at = time.monotonic()
                self._checkpoint_at_pause = self._checkpoint_key()
            elif self._pause_may_end(time.monotonic() - self._pause_seen_at):
                self.reason = "pause"
        else:
            self._pause_seen_at = None
        if self.reason in ("cancel", "pause"):
            self.end_job(self.reason)  # type: ignore[arg-type]
        return self.reason

    def _pause_may_end(self, waited_s: float) -> bool:
        if waited_s >= self.pause_grace_s:
            return True
        checkpoint = self._checkpoint_key()
        if checkpoint is not None and checkpoint != self._checkpoint_at_pause:
            return True  # the pause's checkpoint is recorded: the job resumes from it
        return waited_s >= _PAUSE_GRACE_S and not self._safely(self.training_started, True)

    def _checkpoint_key(self) -> tuple[int, str] | None:
        latest = self._safely(self.latest_checkpoint, None)
        return None if latest is None else (latest.step, latest.location)

    @staticmethod
    def _safely(read: Callable[[], T], when_redis_is_away: T) -> T:
        try:
            return read()
        except _REDIS_DOWN:
            return when_redis_is_away


def _caused_by_redis_outage(error: BaseException) -> bool:
    """Whether Redis being unreachable is anywhere in `error`'s chain (Ray wraps worker errors)."""
    return any(isinstance(e, _REDIS_DOWN) for e in error_chain(error))


# ------------------------------------------------------------------------------------ dispatcher
class Dispatcher:
    """Claims and runs jobs until `stop()`; see the module docstring for one job's life."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        client = make_redis(settings)
        self.store = make_object_store(settings)
        self.jobs = JobStore(client, max_attempts=settings.max_attempts, events_max_len=settings.events_max_len,
                             fair_share_half_life_s=settings.fair_share_half_life_s,
                             starvation_guard_s=settings.starvation_guard_s,
                             legacy_job_gpus=settings.train_workers_per_job)
        self.files = FileStore(client, self.store, max_upload_bytes=settings.max_upload_bytes)
        self.registry = AdapterRegistry(client, self.store)
        self.catalog = load_catalog(settings)
        self.work_root = Path(settings.data_dir).resolve() / "work" / self.worker_id.replace(":", "-")
        self._stop = threading.Event()
        self._abandoned: list[threading.Thread] = []

    def stop(self) -> None:
        self._stop.set()

    def connect_ray(self) -> None:
        """Join the Ray cluster at `ray_address`, or start a private local one when it is unset (never
        the cluster a past `ray start` recorded on this machine). Ray installs its own signal handlers:
        callers that want theirs install them after this."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.settings.ray_address or "local", include_dashboard=False,
                     configure_logging=False, log_to_driver=False)
            logger.info("dispatcher %s joined Ray at %s", self.worker_id, ray.get_runtime_context().gcs_address)

    def run_forever(self) -> None:
        """The dispatcher's main loop: claim, run, repeat; the maintenance thread reclaims expired leases.

        Redis being unreachable is waited out (with backoff), not fatal: the jobs are safe in Redis,
        and whatever this dispatcher held is requeued by lease expiry if the outage outlasts it.
        """
        self.connect_ray()
        maintenance = self.start_maintenance()
        backoff_s = 0.5
        try:
            while not self._stop.is_set():
                try:
                    self.step()
                    backoff_s = 0.5
                except _REDIS_DOWN as e:
                    logger.warning("Redis unreachable (%s); retrying in %.1fs", e, backoff_s)
                    self._stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, 30.0)
        finally:
            maintenance.stop()

    def start_maintenance(self) -> MaintenanceThread:
        """Claim this dispatcher's work dir and start the thread that reclaims expired leases every
        ~lease_ms/3 and runs `run_housekeeping` (see workers/maintenance.py); stop it when done."""
        claim_work_dir(self.work_root)
        grace_ms = self.settings.lease_ms + self.settings.heartbeat_ms  # after a Redis restart: let leases renew
        return MaintenanceThread(reclaim=functools.partial(self.jobs.leases.requeue_expired_leases,
                                                           restart_grace_ms=grace_ms),
                                 housekeeping=self.run_housekeeping,
                                 interval_s=self.settings.lease_ms / 3000,
                                 name=f"maintenance-{self.worker_id}").start()

    def run_housekeeping(self) -> None:
        """Periodic chores, on the maintenance thread (at most every HOUSEKEEPING_INTERVAL_S): show this
        dispatcher's work dir is alive, remove those of dispatchers that are gone, and apply the
        retention policy to jobs that finished long enough ago (fleet.retention; idempotent, so every
        dispatcher may run it)."""
        claim_work_dir(self.work_root)
        sweep_work_dirs(self.work_root.parent, keep=self.work_root)
        run_retention(self.jobs.redis, self.store, self.settings)

    def step(self) -> None:
        """One turn of the main loop: run one job, or wait for one to be queued."""
        claim = self.jobs.leases.claim_next_job(self.worker_id, self.settings.lease_ms)
        if claim is None:
            self.jobs.leases.wait_for_work(max(0.2, min(5.0, self.settings.lease_ms / 2000)))  # woken when queued
            return
        self.run_claim(claim)

    def run_claim(self, claim: Claim) -> None:
        """Run one claimed attempt to its end; never raises for a job's own failure.

        Nothing slow may run between the claim and the heartbeat's start: the lease runs from the claim
        (workers.ray_train, which imports torch, is imported with this module for that reason).
        """
        job, attempt, fence = claim.job, claim.attempt, claim.fence
        work_dir = self.work_root / job.id / f"attempt-{attempt}"
        logger.info("running %s attempt %d in %s", job.id, attempt, work_dir)
        try:
            with _Heartbeat(self.jobs, claim, self.settings) as heartbeat:
                self._run_attempt(job, fence, work_dir, heartbeat)
        except FencedOut as e:
            logger.warning("%s: %s", job.id, e)
        except _AlreadyFinished as e:
            logger.info("%s", e)
        except StopRequested as e:
            self._finish_quietly(fence, JobStatus.CANCELLED if e.signal == "cancel" else JobStatus.PAUSED)
        except CancelRequested:
            # Cancelled after training ended, before the version became visible: publish nothing.
            self._finish_quietly(fence, JobStatus.CANCELLED)
        except KeyboardInterrupt:
            # Stopping the dispatcher: hand the job back so another one resumes it from its checkpoint.
            self._finish_quietly(fence, JobStatus.QUEUED)
            raise
        except InvalidRequest as e:
            self._finish_quietly(fence, JobStatus.FAILED,
                                 error=JobError(code="invalid_request", message=str(e), param=e.param))
        except TrainingSetupError as e:
            logger.warning("job %s attempt %d: training cannot run: %s", job.id, attempt, e)
            message = (f"Training cannot run with this job's configuration or data: {scrub_paths(str(e))}. "
                       "Retrying would fail the same way; fix it and create a new job.")
            self._finish_quietly(fence, JobStatus.FAILED,
                                 error=JobError(code="invalid_training_config", message=message[:2000]),
                                 last_failure=full_text(e)[:_LAST_FAILURE_MAX_CHARS])
        except Exception as e:
            if _caused_by_redis_outage(e):
                # Not the job's fault: hand it back to resume from its checkpoint. If Redis is still
                # away this write fails too, and the lease expiring requeues the job instead.
                logger.warning("job %s attempt %d: Redis unreachable (%s); handing it back", job.id, attempt, e)
                self._finish_quietly(fence, JobStatus.QUEUED)
                return
            if is_infrastructure_fault(e):
                self._hand_back_after_fault(claim, e)
                return
            logger.exception("job %s attempt %d failed", job.id, attempt)
            # The tenant reads a short summary without server paths; the whole story is the operator's.
            self._finish_quietly(fence, JobStatus.FAILED,
                                 error=JobError(code="training_error", message=f"Training failed: {tenant_summary(e)}"),
                                 last_failure=full_text(e)[:_LAST_FAILURE_MAX_CHARS])
        finally:
            # Checkpoints that matter live in the object store; Ray's copies and the work dir go.
            self._join_abandoned()
            shutil.rmtree(work_dir, ignore_errors=True)
            shutil.rmtree(self._ray_storage / self._ray_run_name(job, attempt), ignore_errors=True)
            with contextlib.suppress(OSError):
                work_dir.parent.rmdir()  # the job's folder, once no attempt of it runs here

    def _hand_back_after_fault(self, claim: Claim, error: Exception) -> None:
        """An object-store or Ray node fault is not the job's: hand it back to resume from its checkpoint,
        at most `max_infra_faults` times; the fault after that fails it (infrastructure_error)."""
        job, fence = claim.job, claim.fence
        faults = job.infra_faults + 1
        details = full_text(error)[:_LAST_FAILURE_MAX_CHARS]
        if faults <= self.settings.max_infra_faults:
            logger.warning("job %s attempt %d: infrastructure fault %d of %d allowed, handing it back: %s",
                           job.id, claim.attempt, faults, self.settings.max_infra_faults, details)
            self._finish_quietly(fence, JobStatus.QUEUED, last_failure=details, infra_faults=faults)
            return
        logger.error("job %s attempt %d: infrastructure fault %d, over the %d allowed; failing it: %s",
                     job.id, claim.attempt, faults, self.settings.max_infra_faults, details)
        message = (f"Training was interrupted by {faults} infrastructure faults (object store or compute "
                   f"node unavailable); the last: {tenant_summary(error)}. Nothing is wrong with the job "
                   "itself: create it again once the service is healthy, or contact the operator.")
        self._finish_quietly(fence, JobStatus.FAILED, error=JobError(code="infrastructure_error", message=message),
                             last_failure=details, infra_faults=faults)

    def _finish_quietly(self, fence: Fence, status: JobStatus, error: JobError | None = None,
                        last_failure: str | None = None, infra_faults: int | None = None) -> None:
        """End the attempt as `status`, logging (not raising) a refusal; a pause the user withdrew
        before the attempt stopped hands the job back instead, to resume from its last checkpoint.
        `last_failure` is the operator-only account of an error (fleet.jobs.Job.last_failure)."""
        try:
            try:
                self.jobs.leases.finish_job(fence, status, error=error, last_failure=last_failure,
                                            infra_faults=infra_faults)
            except PauseWithdrawn:
                self.jobs.leases.finish_job(fence, JobStatus.QUEUED)
        except (FleetError, *_REDIS_DOWN) as e:
            logger.warning("could not mark %s %s: %s", fence.job_id, status.value, e)

    def _in_phase(self, heartbeat: _Heartbeat, what: str, work: Callable[[], T]) -> T:
        """Run one blocking phase (`what`: "download", "checks") on a helper thread, so that a cancel,
        pause or lost lease stops the attempt within _POLL_S instead of after the phase. A phase so
        stopped is left to end by itself; its output lands in a work dir about to be removed."""
        heartbeat.raise_if_stopped()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["value"] = work()
            except BaseException as e:  # handed to the dispatcher thread below
                outcome["error"] = e

        thread = threading.Thread(target=run, name=f"{what}-{heartbeat.claim.job.id}", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=_POLL_S)
            if thread.is_alive():
                try:
                    heartbeat.raise_if_stopped()
                except (FencedOut, StopRequested):
                    self._abandoned.append(thread)
                    logger.info("%s: stopped waiting for %s", heartbeat.claim.job.id, what)
                    raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _join_abandoned(self, timeout_s: float = 5.0) -> None:
        """Give phases stopped midway a moment to end before their work dir is removed."""
        deadline = time.monotonic() + timeout_s
        for thread in self._abandoned:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._abandoned = [t for t in self._abandoned if t.is_alive()]

    def _run_attempt(self, job: Job, fence: Fence, work_dir: Path, heartbeat: _Heartbeat) -> None:
        try:
            done = self.registry.complete_committed_publication(fence)
        except (FleetError, redis.ConnectionError, redis.TimeoutError):
            raise  # fenced out, cancelled, Redis away: handled by run_claim
        except Exception as e:  # the object store is down, say: wait a little, then hand the job back
            logger.warning("%s: completing its committed version failed: %s; handing it back", job.id, e)
            heartbeat.lost.wait(min(30.0, self.settings.lease_ms / 1000))  # no hot loop on a lone job
            why = JobError(code="completion_failed", message=f"Completing the committed version failed: {e}"[:2000])
            self.jobs.leases.finish_job(fence, JobStatus.QUEUED, error=why)  # tail of its queue; why: last_failure
            return
        if done is not None:  # an earlier attempt committed its version, then died: finish with it
            used = hyperparameters_used(job.hyperparameters, done.hyperparameters) if done.hyperparameters else None
            self.jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, fine_tuned_model=done.ref,
                                        trained_tokens=done.trained_tokens, hyperparameters=used)
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        base_name = job.base_model or job.model
        base = self.catalog.get(base_name)
        self.jobs.leases.append_event(fence, "info", "Downloading the job's files.")
        training, validation_path, init_adapter = self._in_phase(
            heartbeat, "download", lambda: self._download_inputs(job, work_dir))
        spec = build_training_spec(
            job, base_model=Path(base.path), quantization=job.lora.get("quantization", base.quantization),
            work_dir=work_dir, training_file=work_dir / "train.jsonl", validation_file=validation_path,
            init_adapter=init_adapter,
        )
        self.jobs.leases.append_event(fence, "info", f"Checking the datasets with {base_name}'s tokenizer.")
        spec = self._in_phase(heartbeat, "checks", lambda: self._check_datasets(job, fence, spec))
        resume_from = self._in_phase(
            heartbeat, "download", lambda: self._fetch_latest_checkpoint(job, work_dir / "resume"))
        if resume_from is not None:
            self.jobs.leases.append_event(fence, "info", f"Resuming from the checkpoint at step {resume_from[1]}.")
        result = self._train(job, fence, spec, work_dir, heartbeat, resume_from[0] if resume_from else None)
        if result.status == "cancelled":
            self.jobs.leases.finish_job(fence, JobStatus.CANCELLED)
            return
        if result.status == "paused":
            try:
                self.jobs.leases.finish_job(fence, JobStatus.PAUSED)
            except PauseWithdrawn:  # resumed before we stopped: hand back, resume from the pause's checkpoint
                self.jobs.leases.finish_job(fence, JobStatus.QUEUED)
            return
        # A cancel from here on publishes nothing (and once the version is committed, cannot undo it);
        # a pause of a job whose training is done lets it complete.
        heartbeat.raise_if_stopped(honour_pause=False)
        assert result.adapter_dir is not None
        manifest_fields: dict[str, Any] = {
            "base_model": base_name,  # the catalog name; the server's path to it stays private
            "parent": job.init_adapter,  # the version this one continued from, if any
            "lora_config": job.lora,
            "hyperparameters": result.hyperparameters,
            "dataset": {"file_id": job.training_file, "sha256": training.sha256,
                        "validation_file_id": job.validation_file},
            "final_metrics": result.metrics,
            "trained_tokens": result.tokens_trained,
        }
        ref = self.registry.publish_adapter_version(
            job.tenant_id, self._adapter_name(job, base_name), result.adapter_dir, manifest_fields,
            fence=fence,
        )
        self.jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, fine_tuned_model=ref,
                                    trained_tokens=result.tokens_trained,
                                    hyperparameters=hyperparameters_used(job.hyperparameters, result.hyperparameters))
        logger.info("job %s succeeded: published %s", job.id, ref)

    def _train(self, job: Job, fence: Fence, spec: TrainingSpec, work_dir: Path, heartbeat: _Heartbeat,
               resume_from: Path | None):
        """Run the training phase on Ray; a cancel, pause or lost lease stops the run wherever it is
        (waiting for resources, training, hung): the job is ended first, then the run torn down."""
        heartbeat.raise_if_stopped()
        attempt, n = fence.attempt, self.settings.train_workers_per_job
        self.jobs.leases.append_event(fence, "info",
                                      f"Starting training on Ray ({n} worker(s)); waiting for resources.")

        def end_job(signal: ControlSignal) -> None:
            status = JobStatus.CANCELLED if signal == "cancel" else JobStatus.PAUSED
            self._finish_quietly(fence, status)

        progress_at_start = self.jobs.load_job(job.id).progress  # changes once this attempt's loop reports

        stop = _TrainingStop(heartbeat, end_job, latest_checkpoint=lambda: self.jobs.latest_checkpoint(job.id),
                             training_started=lambda: self.jobs.load_job(job.id).progress != progress_at_start,
                             pause_grace_s=self.settings.pause_grace_s)
        try:
            result = run_training_on_ray(
                spec,
                output_dir=work_dir / "out",
                reporter_factory=JobReporterFactory(self.settings, job.tenant_id, fence),
                num_workers=n,
                use_gpu=self.settings.use_gpu,
                resources_per_worker=self.settings.train_resources_per_worker or None,
                storage_path=self._ray_storage,
                name=self._ray_run_name(job, attempt),
                max_failures=self.settings.train_max_failures,
                resume_from=resume_from,
                should_stop=stop,
            )
        except TrainingAborted:
            if stop.reason == "fenced":
                raise FencedOut(f"attempt {attempt} of {job.id} lost its lease while training") from None
            raise _AlreadyFinished(f"{job.id}: {stop.reason} honoured while training") from None
        if heartbeat.lost.is_set():
            raise FencedOut(f"attempt {attempt} of {job.id} lost its lease while training")
        return result

    def _download_inputs(self, job: Job, work_dir: Path) -> tuple[Any, Path | None, Path | None]:
        """Fetch the training file, the validation file and the adapter to continue from, if any."""
        training = self._download_dataset(job, "training_file", work_dir / "train.jsonl")
        validation_path = None
        if job.validation_file:
            validation_path = work_dir / "validation.jsonl"
            self._download_dataset(job, "validation_file", validation_path)
        init_adapter = None
        if job.init_adapter:  # continuing a published version: start from its weights
            init_adapter = self.registry.download_version(job.tenant_id, job.init_adapter, work_dir / "init")
        return training, validation_path, init_adapter

    @property
    def _ray_storage(self) -> Path:
        return self.work_root / "ray"

    @staticmethod
    def _ray_run_name(job: Job, attempt: int) -> str:
        return f"{job.id}-attempt-{attempt}"

    def _download_dataset(self, job: Job, param: str, path: Path):
        """Fetch one of the job's files; a file deleted since the job was queued fails the job on `param`."""
        file_id = getattr(job, param)
        try:
            return self.files.download(job.tenant_id, file_id, path)
        except NotFound as e:
            raise InvalidRequest(f"{param} {file_id} no longer exists (was it deleted after the job was "
                                 "created?); upload it again and create a new job.", param=param) from e

    @staticmethod
    def _adapter_name(job: Job, base_name: str) -> str:
        """Where the job publishes: its suffix; else, continuing a version, that adapter (a new version
        of it); else a name from the base model and the job id."""
        if not job.suffix and job.init_adapter:
            return parse_adapter_ref(job.init_adapter)[0]
        return adapter_name_for_job(base_name, job.suffix, job.id)

    def _check_datasets(self, job: Job, fence: Fence, spec: TrainingSpec) -> TrainingSpec:
        """The checks that need the base model's tokenizer (the API checked the format at upload):
        chat template errors, token counts, examples over max_seq_len. Errors fail the job with the
        file as `param` and the line numbers; warnings (e.g. truncated examples) become job events.
        The tokenization done here is stored next to each file (`workers.pretokenized`): the spec
        returned names it, and the ranks read it instead of tokenizing the dataset again."""
        from transformers import AutoTokenizer

        from workers.datasets import validate_dataset
        from workers.pretokenized import key_for, write_pretokenized

        tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model))
        files = [("training_file", spec.training_file, 10), ("validation_file", spec.validation_file, 1)]
        stored: dict[str, Path] = {}
        for param, path, min_examples in files:
            if path is None:
                continue
            examples: list = []
            report = validate_dataset(path, tokenizer=tokenizer, max_seq_len=spec.max_seq_len,
                                      overflow="truncate", train_on_inputs=spec.train_on_inputs,
                                      min_examples=min_examples, examples_out=examples)
            if not report.ok:
                problems = "; ".join(str(issue) for issue in report.errors[:20])
                raise InvalidRequest(f"{param} {getattr(job, param)} is not usable for {job.model}: "
                                     f"{report.n_errors} problem(s): {problems}", param=param)
            for issue in report.warnings[:20]:
                self.jobs.leases.append_event(fence, "warn", f"{param}: {issue}")
            if report.token_stats is not None:
                self.jobs.leases.append_event(fence, "info", f"{param}: {report.summary().splitlines()[0]}")
            key = key_for(path, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=spec.train_on_inputs)
            stored[f"pretokenized_{param}"] = write_pretokenized(path.with_suffix(".tokens.npz"), examples, key)
        return TrainingSpec.model_validate({**spec.model_dump(), **stored})

    def _fetch_latest_checkpoint(self, job: Job, dest: Path) -> tuple[Path, int] | None:
        """Download the job's newest checkpoint (from any earlier attempt), or None if there is none."""
        latest: Checkpoint | None = self.jobs.latest_checkpoint(job.id)
        if latest is None:
            return None
        local = download_checkpoint(self.store, latest.location, dest / f"step-{latest.step:08d}")
        return local, latest.step
