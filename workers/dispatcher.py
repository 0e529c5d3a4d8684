"""The dispatcher: claims jobs from Redis, runs them on Ray Train, streams progress back, publishes adapters.

One dispatcher runs many jobs at once: it claims while claims succeed (the scheduler in Redis admits
only what fits the cluster; at most `max_concurrent_jobs` here) and runs each claim on its own
`JobRunner` thread, which:
1. holds the job's lease by heartbeat; losing it (fenced out) means another attempt owns the job;
2. fetches the dataset files to check them with the base model's tokenizer, stores their tokenization
   in the object store, and names the inputs the training workers fetch themselves: those files, the
   adapter to continue from and the latest checkpoint of earlier attempts (workers.input_staging; no
   path on the dispatcher's disk reaches a worker, which may run on any node);
3. reserves all the job's workers on Ray at once (gang admission, workers.placement), or hands the
   job back to the queue when they do not fit within `placement_timeout_s`;
4. runs `workers.ray_train.run_training_on_ray`; inside the rank-0 worker a `JobReporter` writes
   progress and events to Redis, uploads each checkpoint to the object store, and relays cancel/pause;
5. publishes the adapter through the registry (idempotent per job, fenced by the claim) and finishes
   the job. Every write carries the claim's fence (attempt + token), so a stale attempt can never
   change the job.
A dispatcher that dies leaves its lease to expire; the maintenance thread of any other dispatcher
(workers/maintenance.py, busy or not) requeues the job and the next attempt resumes from the last
checkpoint.

Cancel and pause reach every phase: the heartbeat keeps the latest control signal RENEW returns, each
blocking phase (downloads, dataset checks) runs on a helper thread the dispatcher stops waiting for,
and training runs as a Ray task the dispatcher kills (workers.ray_train). A cancel ends the job
`cancelled` at once; a pause first lets the training loop write and record its checkpoint (at most
settings.pause_grace_s), then ends it `paused`, to resume from that checkpoint. A preemption (control
"preempt", set by the scheduler to return borrowed capacity) is a pause to the training loop, after
which the job goes back to the queue at its place (`finish_job(..., preempted=True)`); outside training
it hands the job back at once. Stopping the dispatcher hands every running job back. Redis being
unreachable never fails a job: the reporter rides it out, and a longer outage hands the job back to
resume from its checkpoint.
An object-store or Ray node fault hands the job back too, at most `max_infra_faults` times
(workers.errors says which errors are faults of the machinery, and what of an error a tenant sees).
"""

from __future__ import annotations

import contextlib
import contextvars
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
from typing import Any, Literal, TypeVar

import redis

from fleet.checkpoints import upload_checkpoint
from fleet.exceptions import CancelRequested, FencedOut, FleetError, InvalidRequest, NotFound, PauseWithdrawn
from fleet.fencing import Fence
from fleet.files import FileStore
from fleet.job_spec import Hyperparameters
from fleet.jobs import Checkpoint, ControlSignal, Job, JobError, JobStatus
from fleet.log_format import WorkerLogging, set_job_log_context
from fleet.queue import Claim, JobStore
from fleet.registry import AdapterRegistry, adapter_name_for_job, parse_adapter_ref
from fleet.retention import run_retention
from fleet.settings import Settings, load_catalog, make_object_store, make_redis
from fleet.sweeps import SweepStore
from fleet.throughput import record_job_throughput
from lora_core.report import adapter_rank_report
from workers.checkpoint_uploader import CheckpointUploader
from workers.errors import error_chain, full_text, is_infrastructure_fault, scrub_paths, tenant_summary
from workers.input_staging import check_and_store_datasets, checkpoint_objects, stored_inputs, version_objects
from workers.job_inputs import StoredInputs, StoredObject
from workers.maintenance import MaintenanceThread, claim_work_dir, sweep_work_dirs
from workers.metrics import StepClock, TrainingMetrics, TrainingTelemetry, serve_metrics
from workers.placement import Gang, GangNotPlaced, gang_for, reserve_gang
from workers.ray_storage import RayStorage, ray_storage_for
from workers.ray_train import TrainingAborted, TrainingSetupError, run_training_on_ray
from workers.reporting import Control
from workers.spec import AUTO_BASE_LEARNING_RATE, TrainingHyperparameters, TrainingSpec

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
    """The training engine's spec for a job: its JobSpec (validated by the API) plus what the dispatcher
    resolved (local paths, and `quantization`: the job's, else its base model's catalog default)."""
    return TrainingSpec(
        base_model=base_model,
        quantization=None if quantization in (None, "none") else quantization,
        lora=job.spec.lora,
        hyperparameters=TrainingHyperparameters(**job.spec.hyperparameters.model_dump()),
        training_file=training_file,
        validation_file=validation_file,
        init_adapter=init_adapter,
        seed=job.seed or 0,
        n_checkpoints=3,
    )


def hyperparameters_used(requested: Hyperparameters, resolved: dict[str, Any]) -> dict[str, Any]:
    """The job's `hyperparameters` after training: OpenAI's three with "auto" replaced by the values
    used, plus every other value the engine resolved (the actual learning_rate, warmup, schedule, ...).
    An auto multiplier is reported as the chosen rate over the base rate (AUTO_BASE_LEARNING_RATE)."""
    multiplier = requested.learning_rate_multiplier
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
        # Timings for the dispatcher's /metrics (workers.metrics), carried by the metrics events.
        self._step_clock = StepClock()
        self._upload_s: list[float] = []  # appended by the uploader's thread, taken by the next metrics event

    def log(self, message: str, level: str = "info") -> None:
        if self.fenced:
            return
        self._append_event(_LEVELS.get(level, "info"), message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        timed = self._step_clock.row_arrived(time.monotonic())
        try:
            self._report_step(step, values, timed)
        finally:
            self._step_clock.row_done(time.monotonic())

    def _report_step(self, step: int, values: dict[str, float], timed: tuple[float, int] | None) -> None:
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
        self._control = _loop_control(control)
        parts = [f"Step {step}/{total}" if total else f"Step {step}"]
        for name, label in (("train_loss", "training loss"), ("val_loss", "validation loss"),
                            ("val_token_accuracy", "validation token accuracy")):
            if name in shown:
                parts.append(f"{label}={shown[name]:.4f}")
        timings: dict[str, Any] = {}
        if timed is not None:
            timings.update(step_time_s=round(timed[0], 6), steps_timed=timed[1])
        if self._upload_s:  # pop() is atomic: an upload ending meanwhile goes with the next event
            timings["checkpoint_upload_s"] = [self._upload_s.pop(0) for _ in range(len(self._upload_s))]
        self._append_event("info", ", ".join(parts), {"step": step, **shown, **timings}, type="metrics")

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
        started = time.monotonic()
        prefix = upload_checkpoint(self.store, self.tenant_id, self.job_id, step, path, fence=self.fence)
        self._upload_s.append(round(time.monotonic() - started, 3))
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
        return _loop_control(self._control)

    def _append_event(self, level: str, message: str, data: dict | None = None, **kwargs: Any) -> None:
        try:
            self.jobs.leases.append_event(self.fence, level, message, data, **kwargs)
        except FencedOut:
            self.fenced = True  # another attempt owns the job's log now
        except _REDIS_DOWN as e:
            logger.warning("%s: Redis unreachable, event dropped: %s (%s)", self.job_id, message, e)


def _loop_control(signal: str | None) -> Control:
    """The training loop's answer for a job's control signal: a preemption is a pause to the loop
    (checkpoint now, stop); the dispatcher then requeues the job instead of pausing it."""
    return "pause" if signal == "preempt" else signal  # type: ignore[return-value]


@dataclass(frozen=True)
class JobReporterFactory:
    """Picklable: Ray ships it to the rank-0 worker, which calls it to build its JobReporter."""

    settings: Settings
    tenant_id: str
    fence: Fence

    def __call__(self) -> JobReporter:
        return JobReporter(self.settings, self.tenant_id, self.fence)


# ------------------------------------------------------------------------------------ heartbeat
# What stops an attempt: the job's control signal, or this dispatcher shutting down ("shutdown").
StopSignal = Literal["cancel", "pause", "preempt", "shutdown"]
# Signals that let a training loop write its checkpoint first: the job resumes from it.
_CHECKPOINT_FIRST = ("pause", "preempt")


class StopRequested(Exception):
    """A cancel, pause, preemption or shutdown reached the dispatcher outside the training loop;
    `signal` says which."""

    def __init__(self, signal: StopSignal) -> None:
        super().__init__(f"{signal} requested")
        self.signal = signal


class _AlreadyFinished(Exception):
    """The attempt already wrote the job's end (a cancel or pause during training); nothing is left to do."""


class _Heartbeat:
    """Renews a claim's lease every heartbeat_ms on its own thread; keeps the latest control signal
    RENEW returns (`control`) and notes when the claim is lost (`lost`). `shutdown` is set when the
    dispatcher stops: the attempt hands its job back."""

    def __init__(self, jobs: JobStore, claim: Claim, settings: Settings,
                 shutdown: threading.Event | None = None) -> None:
        self.jobs, self.claim, self.settings = jobs, claim, settings
        self.shutdown = shutdown or threading.Event()
        self.lost = threading.Event()
        self.control: ControlSignal | None = None
        self._stop = threading.Event()
        # Started on the job's runner thread: its log context (the job, fleet.log_format) goes along.
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name=f"heartbeat-{claim.job.id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def raise_if_stopped(self, *, honour_pause: bool = True) -> None:
        """Raise FencedOut if the claim was lost, StopRequested if a cancel (or pause, or preemption)
        is pending or the dispatcher shuts down. A job whose training is done (`honour_pause` False)
        completes despite a pause or preemption."""
        if self.lost.is_set():
            raise FencedOut(f"attempt {self.claim.attempt} of {self.claim.job.id} lost its lease")
        if self.shutdown.is_set():
            raise StopRequested("shutdown")
        if self.control == "cancel" or (self.control in _CHECKPOINT_FIRST and honour_pause):
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
    """`should_stop` for a training run: at once when fenced out, cancelled or shut down. For a pause
    or a preemption (both checkpoint now, and resume later from that checkpoint), once the
    pause's checkpoint is recorded (a checkpoint newer than the one recorded when the pause was seen),
    at most `pause_grace_s` after the pause was seen; a run whose training loop has not reported
    progress yet (waiting for resources, loading the model) has nothing to save and is stopped after
    _PAUSE_GRACE_S. A withdrawn pause restarts the clock. A run that ends "paused" by itself is
    finished by the caller.

    `latest_checkpoint` and `training_started` read the job in Redis; while Redis is away they count
    as "nothing new" and the wait is bounded by `pause_grace_s` alone.

    On a cancel, pause, preemption or shutdown it first calls `end_job(signal)`, so the job ends as asked at once,
    while the run is still being torn down (its late writes are fenced out)."""

    def __init__(self, heartbeat: _Heartbeat, end_job: Callable[[StopSignal], None], *,
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
        elif self.heartbeat.shutdown.is_set():
            self.reason = "shutdown"
        elif self.heartbeat.control == "cancel":
            self.reason = "cancel"
        elif self.heartbeat.control in _CHECKPOINT_FIRST:
            if self._pause_seen_at is None:
                self._pause_seen_at = time.monotonic()
                self._checkpoint_at_pause = self._checkpoint_key()
            elif self._pause_may_end(time.monotonic() - self._pause_seen_at):
                self.reason = self.heartbeat.control
        else:
            self._pause_seen_at = None
        if self.reason in ("cancel", "shutdown", *_CHECKPOINT_FIRST):
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


def _resolve_lazy_imports() -> None:
    """Resolve, on one thread, the lazily imported names the runner threads use: transformers' lazy
    module is not thread-safe, and two jobs checking their datasets at once failed with "cannot import
    name 'AutoTokenizer' from 'transformers'"."""
    import transformers

    transformers.AutoTokenizer  # noqa: B018 - the attribute access is the import


# ------------------------------------------------------------------------------------ dispatcher
class Dispatcher:
    """Claims jobs and runs each on its own JobRunner thread until `stop()`; see the module docstring
    for one job's life. It keeps claiming while claims succeed and fewer than `max_concurrent_jobs`
    run here: the scheduler in Redis decides what fits the cluster, the bound keeps one process sane."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        client = make_redis(settings)
        self.store = make_object_store(settings)
        self.jobs = JobStore(client, max_attempts=settings.max_attempts, events_max_len=settings.events_max_len,
                             fair_share_half_life_s=settings.fair_share_half_life_s,
                             starvation_guard_s=settings.starvation_guard_s,
                             legacy_job_gpus=settings.legacy_job_gpus)
        self.files = FileStore(client, self.store, max_upload_bytes=settings.max_upload_bytes)
        self.registry = AdapterRegistry(client, self.store)
        self.sweeps = SweepStore(self.jobs, self.registry)
        self.catalog = load_catalog(settings)
        self.work_root = Path(settings.data_dir).resolve() / "work" / self.worker_id.replace(":", "-")
        self._stop = threading.Event()
        self._runner_done = threading.Event()  # set by a runner's thread as it ends: a slot is free
        self._runners: dict[str, JobRunner] = {}  # job id → its runner, while it runs

    def stop(self) -> None:
        """Stop claiming; `run_forever` hands the jobs running here back (to resume from their checkpoints)."""
        self._stop.set()

    @property
    def running_jobs(self) -> list[str]:
        """Ids of the jobs whose runners are still running here."""
        return [job_id for job_id, runner in self._runners.items() if runner.is_alive()]

    def running_job_tenants(self) -> dict[str, str]:
        """{job id: tenant id} of the jobs running here (for the metrics thread: a copy, read safely)."""
        return {job_id: r.claim.job.tenant_id for job_id, r in list(self._runners.items()) if r.is_alive()}

    def connect_ray(self) -> None:
        """Join the Ray cluster at `ray_address`, or start a private local one when it is unset (never
        the cluster a past `ray start` recorded on this machine), which declares
        `local_accelerators` logical accelerators (workers.placement.local_node_resources). Ray installs
        its own signal handlers: callers that want theirs install them after this."""
        import ray

        from workers.placement import local_node_resources

        if not ray.is_initialized():
            local = {}
            if not self.settings.ray_address and not self.settings.use_gpu:  # real GPUs: Ray detects them
                local = local_node_resources(self.settings.accelerator_resource, self.settings.local_accelerators)
            ray.init(address=self.settings.ray_address or "local", include_dashboard=False,
                     configure_logging=False, log_to_driver=False, **local)
            logger.info("dispatcher %s joined Ray at %s", self.worker_id, ray.get_runtime_context().gcs_address)

    def run_forever(self) -> None:
        """The dispatcher's main loop: claim while claims succeed, run each job on its own runner thread,
        wait for the queue's wakeup (or a runner ending) when nothing more is admitted. The maintenance
        thread reclaims expired leases; the capacity watch keeps the cluster's nodes current in Redis.

        Redis being unreachable is waited out (with backoff), not fatal: the jobs are safe in Redis,
        and whatever this dispatcher held is requeued by lease expiry if the outage outlasts it.
        On `stop()` or KeyboardInterrupt every running job is handed back, as a lost lease would.
        """
        from workers.capacity_watch import CapacityWatch

        self.connect_ray()
        maintenance = self.start_maintenance()
        capacity = CapacityWatch(self.jobs.redis, self.settings).start()
        stop_metrics = self.serve_metrics() if self.settings.metrics_port else None
        backoff_s = 0.5
        try:
            while not self._stop.is_set():
                try:
                    if self.admit() == 0:
                        self._wait_for_work_or_a_free_slot()
                    backoff_s = 0.5
                except _REDIS_DOWN as e:
                    logger.warning("Redis unreachable (%s); retrying in %.1fs", e, backoff_s)
                    self._stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, 30.0)
        finally:
            self.hand_back_running_jobs()
            if stop_metrics is not None:
                stop_metrics()
            capacity.stop()
            maintenance.stop()

    def serve_metrics(self) -> Callable[[], None]:
        """Serve this dispatcher's training series on `metrics_port` (workers.metrics); returns the stop."""
        metrics = TrainingMetrics(self.running_job_tenants)
        client = make_redis(self.settings)
        telemetry = TrainingTelemetry(client, metrics, self.running_job_tenants).start()
        stop_server = serve_metrics(metrics.registry, self.settings.metrics_port)

        def stop() -> None:
            stop_server()
            telemetry.stop()
            client.close()

        return stop

    def admit(self) -> int:
        """Claim jobs while claims succeed and fewer than `max_concurrent_jobs` run here; start a
        JobRunner thread for each. Returns how many were started."""
        _resolve_lazy_imports()  # before any claim: the first call imports transformers (seconds)
        self._forget_finished_runners()
        started = 0
        while not self._stop.is_set() and len(self._runners) < self.settings.max_concurrent_jobs:
            claim = self.jobs.leases.claim_next_job(self.worker_id, self.settings.lease_ms)
            if claim is None:
                break
            runner = JobRunner(self, claim, on_exit=self._runner_done.set)
            self._runners[claim.job.id] = runner
            runner.start()
            started += 1
        return started

    def hand_back_running_jobs(self, timeout_s: float = 60.0) -> None:
        """Stop every runner here, each handing its job back to the queue, and wait for them (at most
        `timeout_s` in all; a runner still busy then is left to its lease)."""
        runners = list(self._runners.values())
        for runner in runners:
            runner.shut_down()
        deadline = time.monotonic() + timeout_s
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))
            if runner.is_alive():
                logger.warning("%s: its runner did not end within %.0fs of the shutdown; its lease will "
                               "expire and requeue it", runner.claim.job.id, timeout_s)
        self._forget_finished_runners()

    def _forget_finished_runners(self) -> None:
        self._runners = {job_id: r for job_id, r in self._runners.items() if r.is_alive()}

    def _wait_for_work_or_a_free_slot(self) -> None:
        """Wait for the queue's wakeup when a slot is free here, else for a runner to end; a short poll
        either way, since capacity freed elsewhere in the cluster wakes nobody."""
        poll_s = max(0.2, min(2.0, self.settings.lease_ms / 2000))
        if len(self._runners) < self.settings.max_concurrent_jobs:
            self.jobs.leases.wait_for_work(poll_s)  # woken when queued
        else:
            self._runner_done.wait(poll_s)
        self._runner_done.clear()

    def start_maintenance(self) -> MaintenanceThread:
        """Claim this dispatcher's work dir and start the thread that reclaims expired leases (and finishes
        handed-over rank sweeps) every ~lease_ms/3 and runs `run_housekeeping` (see workers/maintenance.py);
        stop it when done."""
        claim_work_dir(self.work_root)
        grace_ms = self.settings.lease_ms + self.settings.heartbeat_ms  # after a Redis restart: let leases renew
        return MaintenanceThread(reclaim=functools.partial(self._maintenance_tick, grace_ms),
                                 housekeeping=self.run_housekeeping,
                                 interval_s=self.settings.lease_ms / 3000,
                                 name=f"maintenance-{self.worker_id}").start()

    def _maintenance_tick(self, restart_grace_ms: int) -> None:
        """Every ~lease_ms/3: requeue expired leases, then finish the rank sweeps handed over to the
        dispatchers (the API cancelled their last child, or their finisher died: fleet.sweeps)."""
        self.jobs.leases.requeue_expired_leases(restart_grace_ms=restart_grace_ms)
        self.sweeps.finish_handed_over()

    def run_housekeeping(self) -> None:
        """Periodic chores, on the maintenance thread (at most every HOUSEKEEPING_INTERVAL_S): show this
        dispatcher's work dir is alive, remove those of dispatchers that are gone, and apply the
        retention policy to jobs that finished long enough ago (fleet.retention; idempotent, so every
        dispatcher may run it), and end the rank sweeps whose children have all ended (fleet.sweeps)."""
        claim_work_dir(self.work_root)
        sweep_work_dirs(self.work_root.parent, keep=self.work_root)
        run_retention(self.jobs.redis, self.store, self.settings)
        self.sweeps.finish_ended_sweeps()  # sweeps whose last child ended without a dispatcher (fleet.sweeps)

    def step(self) -> None:
        """Claim one job and run it to its end on this thread, or wait a little for one to be queued."""
        claim = self.jobs.leases.claim_next_job(self.worker_id, self.settings.lease_ms)
        if claim is None:
            self.jobs.leases.wait_for_work(max(0.2, min(5.0, self.settings.lease_ms / 2000)))  # woken when queued
            return
        self.run_claim(claim)

    def run_claim(self, claim: Claim) -> None:
        """Run one claimed attempt to its end on this thread (JobRunner.run)."""
        JobRunner(self, claim).run()


# ------------------------------------------------------------------------------------ one job
class JobRunner:
    """One claimed attempt of one job, from its heartbeat's start to the job's end, on its own thread
    (`start`) or the caller's (`run`). Everything it holds is this attempt's: the claim, its work dir,
    the phases it stopped waiting for. `shut_down()` hands the job back (dispatcher shutdown)."""

    def __init__(self, dispatcher: Dispatcher, claim: Claim, *, on_exit: Callable[[], object] | None = None) -> None:
        self.claim = claim
        self.settings, self.jobs, self.files = dispatcher.settings, dispatcher.jobs, dispatcher.files
        self.store, self.registry, self.catalog = dispatcher.store, dispatcher.registry, dispatcher.catalog
        self.sweeps = dispatcher.sweeps
        self.work_root = dispatcher.work_root
        self._abandoned: list[threading.Thread] = []
        self._shutdown = threading.Event()
        self._on_exit = on_exit
        self._thread = threading.Thread(target=self._run_then_signal, name=f"job-{claim.job.id}", daemon=True)

    def start(self) -> JobRunner:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    def shut_down(self) -> None:
        """Hand the job back at once, wherever it is (the run on Ray is torn down)."""
        self._shutdown.set()

    def _run_then_signal(self) -> None:
        set_job_log_context(self.claim.job.id, self.claim.job.tenant_id)  # this thread's lines name the job
        try:
            self.run()
        finally:
            if self._on_exit is not None:
                self._on_exit()

    def run(self) -> None:
        """Run the claimed attempt to its end; never raises for a job's own failure.

        Nothing slow may run between the claim and the heartbeat's start: the lease runs from the claim
        (workers.ray_train, which imports torch, is imported with this module for that reason).
        """
        claim = self.claim
        job, attempt, fence = claim.job, claim.attempt, claim.fence
        work_dir = self.work_root / job.id / f"attempt-{attempt}"
        logger.info("running %s attempt %d in %s", job.id, attempt, work_dir)
        try:
            with _Heartbeat(self.jobs, claim, self.settings, self._shutdown) as heartbeat:
                self._run_attempt(job, fence, work_dir, heartbeat)
        except FencedOut as e:
            logger.warning("%s: %s", job.id, e)
        except _AlreadyFinished as e:
            logger.info("%s", e)
        except StopRequested as e:
            self._end_on_signal(fence, e.signal)
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
            self._ray_storage.remove_run(self._ray_run_name(job, attempt))
            with contextlib.suppress(OSError):
                work_dir.parent.rmdir()  # the job's folder, once no attempt of it runs here
            if job.parent is not None:  # a rank-sweep child that ended may end its sweep
                self._end_sweep_if_done(job)

    def _end_sweep_if_done(self, job: Job) -> None:
        """Housekeeping retries what fails here (fleet.sweeps.SweepStore.finish_ended_sweeps)."""
        try:
            self.sweeps.after_job_ended(job)
        except Exception:
            logger.exception("job %s: ending its rank sweep %s failed; housekeeping retries it", job.id, job.parent)

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

    def _end_on_signal(self, fence: Fence, signal: StopSignal) -> None:
        """End the attempt as `signal` asks: cancelled, paused, or handed back to the queue (a
        preemption, at its place and marked preempted; a shutdown, like a lost lease)."""
        if signal == "preempt":
            logger.info("%s: preempted; handing it back to resume from its checkpoint", fence.job_id)
            self._finish_quietly(fence, JobStatus.QUEUED, preempted=True)
        elif signal == "shutdown":
            self._finish_quietly(fence, JobStatus.QUEUED)
        else:
            self._finish_quietly(fence, JobStatus.CANCELLED if signal == "cancel" else JobStatus.PAUSED)

    def _reserve_gang(self, job: Job, fence: Fence, heartbeat: _Heartbeat) -> Gang:
        """Gang admission on Ray (workers.placement): all of the job's workers fit at once, or the job
        goes back to the queue, not to be admitted again for placement_timeout_s."""
        gang = gang_for(job.resources, self.settings)
        timeout_s = self.settings.placement_timeout_s
        self.jobs.leases.append_event(fence, "info", f"Reserving {gang.describe()} on Ray; waiting for resources.")
        try:
            reserve_gang(gang, timeout_s=timeout_s, check_stop=heartbeat.raise_if_stopped,
                         name=self._ray_run_name(job, fence.attempt))
        except GangNotPlaced as e:
            logger.info("%s: %s; requeued", job.id, e)
            self.jobs.leases.append_event(fence, "warn", f"{e}; requeued.")
            self._finish_quietly(fence, JobStatus.QUEUED, retry_after_ms=int(timeout_s * 1000))
            raise _AlreadyFinished(f"{job.id}: handed back, its gang did not fit") from None
        return gang

    def _finish_quietly(self, fence: Fence, status: JobStatus, error: JobError | None = None,
                        last_failure: str | None = None, infra_faults: int | None = None,
                        **requeue: Any) -> None:
        """End the attempt as `status`, logging (not raising) a refusal; a pause the user withdrew
        before the attempt stopped hands the job back instead, to resume from its last checkpoint.
        `last_failure` is the operator-only account of an error (fleet.jobs.Job.last_failure);
        `requeue` carries a hand-back's `preempted=True` or `retry_after_ms=N` (fleet.leases.finish_job)."""
        try:
            try:
                self.jobs.leases.finish_job(fence, status, error=error, last_failure=last_failure,
                                            infra_faults=infra_faults, **requeue)
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

        thread = threading.Thread(target=contextvars.copy_context().run, args=(run,),  # with the job's log context
                                  name=f"{what}-{heartbeat.claim.job.id}", daemon=True)
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
            used = (hyperparameters_used(job.spec.hyperparameters, done.hyperparameters)
                    if done.hyperparameters else None)
            self.jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, fine_tuned_model=done.ref,
                                        trained_tokens=done.trained_tokens, hyperparameters=used)
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        base_name = job.base_model or job.model
        base = self.catalog.get(base_name)
        self.jobs.leases.append_event(fence, "info", "Downloading the job's files.")
        training, validation, init_adapter = self._in_phase(
            heartbeat, "download", lambda: self._download_inputs(job, work_dir))
        spec = build_training_spec(
            job, base_model=Path(base.path), quantization=job.spec.quantization or base.quantization,
            work_dir=work_dir, training_file=work_dir / "train.jsonl",
            validation_file=work_dir / "validation.jsonl" if validation else None,
        )
        self.jobs.leases.append_event(fence, "info", f"Checking the datasets with {base_name}'s tokenizer.")
        pretokenized = self._in_phase(heartbeat, "checks", lambda: self._check_datasets(job, fence, spec))
        resume_from = self._in_phase(heartbeat, "download", lambda: self._fetch_latest_checkpoint(job))
        if resume_from is not None:
            self.jobs.leases.append_event(fence, "info", f"Resuming from the checkpoint at step {resume_from[1]}.")
        inputs = stored_inputs(self.settings, job, spec, training_sha256=training.sha256,
                               validation_sha256=validation.sha256 if validation else None,
                               pretokenized=pretokenized, init_adapter=init_adapter,
                               resume_from=resume_from[0] if resume_from else ())
        result = self._train(job, fence, inputs, work_dir, heartbeat)
        if result.status == "cancelled":
            self.jobs.leases.finish_job(fence, JobStatus.CANCELLED)
            return
        if result.status == "paused":  # the loop checkpointed and stopped for a pause or a preemption
            self._end_on_signal(fence, "preempt" if self.jobs.leases.control_signal(fence) == "preempt" else "pause")
            return
        # A cancel from here on publishes nothing (and once the version is committed, cannot undo it);
        # a pause of a job whose training is done lets it complete.
        heartbeat.raise_if_stopped(honour_pause=False)
        assert result.adapter_dir is not None
        manifest_fields: dict[str, Any] = {
            "base_model": base_name,  # the catalog name; the server's path to it stays private
            "parent": job.init_adapter,  # the version this one continued from, if any
            "lora_config": job.spec.lora_block(),
            "hyperparameters": result.hyperparameters,
            "dataset": {"file_id": job.training_file, "sha256": training.sha256,
                        "validation_file_id": job.validation_file},
            "final_metrics": result.metrics,
            "trained_tokens": result.tokens_trained,
            "rank_report": adapter_rank_report(result.adapter_dir).to_json(),  # what the adapter learned
        }
        used = hyperparameters_used(job.spec.hyperparameters, result.hyperparameters)
        record_job_throughput(self.jobs.redis, self.settings, base_name,  # for estimates (fleet.throughput)
                              tokens_per_s=result.metrics.get("tokens_per_s"),
                              workers=int(result.hyperparameters.get("world_size", 1)))
        if job.parent is not None:  # a rank-sweep child: its sweep publishes the best child (fleet.sweeps)
            self.sweeps.submit_candidate(job, fence, result.adapter_dir, {
                "rank": job.spec.lora.r, "val_loss": result.metrics.get("val_loss"), "steps": result.step,
                "trained_tokens": result.tokens_trained, "hyperparameters_used": used,
                "manifest_fields": manifest_fields})
            self.jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, trained_tokens=result.tokens_trained,
                                        hyperparameters=used)
            return
        ref = self.registry.publish_adapter_version(
            job.tenant_id, self._adapter_name(job, base_name), result.adapter_dir, manifest_fields,
            fence=fence,
        )
        self.jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, fine_tuned_model=ref,
                                    trained_tokens=result.tokens_trained, hyperparameters=used)
        logger.info("job %s succeeded: published %s", job.id, ref)

    def _train(self, job: Job, fence: Fence, inputs: StoredInputs, work_dir: Path, heartbeat: _Heartbeat):
        """Run the training phase on Ray; a cancel, pause or lost lease stops the run wherever it is
        (waiting for resources, training, hung): the job is ended first, then the run torn down."""
        heartbeat.raise_if_stopped()
        attempt, gang = fence.attempt, self._reserve_gang(job, fence, heartbeat)
        self.jobs.leases.append_event(fence, "info", f"Starting training on Ray ({gang.describe()}).")

        def end_job(signal: StopSignal) -> None:
            self._end_on_signal(fence, signal)

        progress_at_start = self.jobs.load_job(job.id).progress  # changes once this attempt's loop reports

        stop = _TrainingStop(heartbeat, end_job, latest_checkpoint=lambda: self.jobs.latest_checkpoint(job.id),
                             training_started=lambda: self.jobs.load_job(job.id).progress != progress_at_start,
                             pause_grace_s=self.settings.pause_grace_s)
        try:
            result = run_training_on_ray(
                inputs,
                output_dir=work_dir / "out",
                reporter_factory=JobReporterFactory(self.settings, job.tenant_id, fence),
                worker_logging=WorkerLogging(self.settings.log_format, job.id, job.tenant_id),
                num_workers=gang.workers,
                use_gpu=gang.use_gpu,
                resources_per_worker=gang.bundle,
                train_on_cpu=gang.train_on_cpu,
                storage_path=self._ray_storage.path,
                storage_filesystem=self._ray_storage.filesystem,
                name=self._ray_run_name(job, attempt),
                max_failures=self.settings.train_max_failures,
                should_stop=stop,
            )
        except TrainingAborted:
            if stop.reason == "fenced":
                raise FencedOut(f"attempt {attempt} of {job.id} lost its lease while training") from None
            raise _AlreadyFinished(f"{job.id}: {stop.reason} honoured while training") from None
        if heartbeat.lost.is_set():
            raise FencedOut(f"attempt {attempt} of {job.id} lost its lease while training")
        return result

    def _download_inputs(self, job: Job, work_dir: Path) -> tuple[Any, Any, tuple[StoredObject, ...]]:
        """Fetch the training and validation files (for the checks; their records carry the sha256 the
        workers check) and name the files of the adapter version to continue from, if any."""
        training = self._download_dataset(job, "training_file", work_dir / "train.jsonl")
        validation = None
        if job.validation_file:
            validation = self._download_dataset(job, "validation_file", work_dir / "validation.jsonl")
        init_adapter: tuple[StoredObject, ...] = ()
        if job.init_adapter:  # continuing a published version: the workers start from its weights
            init_adapter = version_objects(self.registry, job.tenant_id, job.init_adapter)
        return training, validation, init_adapter

    @property
    def _ray_storage(self) -> RayStorage:
        return ray_storage_for(self.settings)

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

    def _check_datasets(self, job: Job, fence: Fence, spec: TrainingSpec) -> dict[str, StoredObject]:
        """Check the datasets with the base model's tokenizer and store their tokenization for the ranks
        (workers.input_staging); errors fail the job on the file, warnings become job events."""
        return check_and_store_datasets(job, spec, self.store,
                                        lambda level, message: self.jobs.leases.append_event(fence, level, message))

    def _fetch_latest_checkpoint(self, job: Job) -> tuple[tuple[StoredObject, ...], int] | None:
        """The files and step of the job's newest checkpoint (from any earlier attempt), or None."""
        latest: Checkpoint | None = self.jobs.latest_checkpoint(job.id)
        if latest is None:
            return None
        return checkpoint_objects(self.store, latest.location), latest.step
