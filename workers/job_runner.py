"""One claimed attempt of one job, from its heartbeat's start to the job's end (the dispatcher's JobRunner).

See workers.dispatcher's docstring for a job's life. Here: the job → TrainingSpec mapping, the heartbeat
that holds the lease and keeps the control signal, the training run's stop rule, and `JobRunner`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import redis

from fleet.exceptions import CancelRequested, FencedOut, FleetError, InvalidRequest, NotFound, PauseWithdrawn
from fleet.fencing import Fence
from fleet.job_spec import Hyperparameters
from fleet.jobs import Checkpoint, ControlSignal, Job, JobError, JobStatus
from fleet.log_format import WorkerLogging, set_job_log_context
from fleet.queue import Claim, JobStore
from fleet.registry import AdapterRegistry, adapter_name_for_job, parse_adapter_ref
from fleet.settings import Settings
from fleet.sweeps import SweepStore
from fleet.throughput import record_job_throughput
from lora_core.report import adapter_rank_report
from workers.errors import error_chain, full_text, is_infrastructure_fault, scrub_paths, tenant_summary
from workers.input_staging import check_and_store_datasets, checkpoint_objects, stored_inputs, version_objects
from workers.job_inputs import StoredInputs, StoredObject
from workers.job_reporter import REDIS_DOWN as _REDIS_DOWN
from workers.job_reporter import JobReporterFactory
from workers.loop import TrainingResult
from workers.placement import Gang, GangNotPlaced, gang_for, reserve_gang
from workers.ray_storage import RayStorage, ray_storage_for
from workers.ray_train import TrainingAborted, TrainingSetupError, run_training_on_ray
from workers.runner_thread import RunnerThread
from workers.spec import AUTO_BASE_LEARNING_RATE, TrainingHyperparameters, TrainingSpec

if TYPE_CHECKING:
    from workers.dispatcher import Dispatcher

__all__ = ["Heartbeat", "JobRunner", "StagedJob", "StopRequested", "StopSignal", "build_training_spec",
           "hyperparameters_used", "publish_version"]

logger = logging.getLogger(__name__)

# How long a pause lets a run whose training loop has not started yet end by itself before it is killed;
# a training loop gets up to settings.pause_grace_s to write and record its checkpoint.
_PAUSE_GRACE_S = 2.0
_POLL_S = 0.25  # how often a waiting dispatcher looks at the heartbeat's control signal
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


@dataclass(frozen=True)
class StagedJob:
    """A job's attempt ready to train: the inputs its training process fetches, and what publishing needs."""

    inputs: StoredInputs
    training_sha256: str
    base_name: str  # the catalog base model


def _adapter_name(job: Job, base_name: str) -> str:
    """Where the job publishes: its suffix; else, continuing a version, that adapter (a new version
    of it); else a name from the base model and the job id."""
    if not job.suffix and job.init_adapter:
        return parse_adapter_ref(job.init_adapter)[0]
    return adapter_name_for_job(base_name, job.suffix, job.id)


def publish_version(registry: AdapterRegistry, jobs: JobStore, job: Job, fence: Fence, result: TrainingResult,
                    staged: StagedJob, *, settings: Settings, alone: bool = True) -> str | None:
    """Publish a succeeded attempt's adapter as the job's version and finish the job `succeeded`, both
    fenced by the claim (a cancel pending refuses: CancelRequested). The same for a job trained alone
    (JobRunner, after the run) and one co-trained (inside the group's process, as soon as it ends).

    A rank-sweep child publishes nothing: its adapter becomes a candidate of its sweep (fleet.sweeps),
    which publishes the best child once every child has ended (None is returned). A job trained
    `alone` records its training speed for estimates (fleet.throughput); a co-trained member's speed
    is its share of a shared process, not what it would run at, so it is not recorded."""
    assert result.adapter_dir is not None
    manifest_fields: dict[str, Any] = {
        "base_model": staged.base_name,  # the catalog name; the server's path to it stays private
        "parent": job.init_adapter,  # the version this one continued from, if any
        "lora_config": job.spec.lora_block(),
        "hyperparameters": result.hyperparameters,
        "dataset": {"file_id": job.training_file, "sha256": staged.training_sha256,
                    "validation_file_id": job.validation_file},
        "final_metrics": result.metrics,
        "trained_tokens": result.tokens_trained,
        "rank_report": adapter_rank_report(result.adapter_dir).to_json(),  # what the adapter learned
    }
    used = hyperparameters_used(job.spec.hyperparameters, result.hyperparameters)
    if job.parent is not None:  # a rank-sweep child: its sweep publishes the best child (fleet.sweeps)
        SweepStore(jobs, registry).submit_candidate(job, fence, result.adapter_dir, {
            "rank": job.spec.lora.r, "val_loss": result.metrics.get("val_loss"), "steps": result.step,
            "trained_tokens": result.tokens_trained, "hyperparameters_used": used,
            "manifest_fields": manifest_fields})
        jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, trained_tokens=result.tokens_trained, hyperparameters=used)
        _record_speed(jobs, settings, staged, result, alone)
        logger.info("job %s succeeded: a candidate of rank sweep %s", job.id, job.parent)
        return None
    ref = registry.publish_adapter_version(job.tenant_id, _adapter_name(job, staged.base_name), result.adapter_dir,
                                           manifest_fields, fence=fence)
    jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, fine_tuned_model=ref, trained_tokens=result.tokens_trained,
                           hyperparameters=used)
    _record_speed(jobs, settings, staged, result, alone)
    logger.info("job %s succeeded: published %s", job.id, ref)
    return ref


def _record_speed(jobs: JobStore, settings: Settings, staged: StagedJob, result: TrainingResult, alone: bool) -> None:
    """Once the job's success is recorded (an attempt fenced out before it records nothing), fold its
    training speed into its base model's mean for estimates (fleet.throughput); alone only."""
    if alone:
        record_job_throughput(jobs.redis, settings, staged.base_name, tokens_per_s=result.metrics.get("tokens_per_s"),
                              workers=int(result.hyperparameters.get("world_size", 1)))


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


class Heartbeat:
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

    def __enter__(self) -> Heartbeat:
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
                self._log_lost()
                self.lost.set()
                return
            except Exception:  # Redis away: keep trying until the lease would run out
                logger.exception("heartbeat for %s failed; retrying", self.claim.job.id)
                continue
            self.control = lease.control


    def _log_lost(self) -> None:
        """Say why the lease is gone: this attempt ended the job itself (a co-trained member's end is
        written where it trained, while the group's other members keep the heartbeats going), or the
        lease was lost (the job handed back, requeued or claimed again)."""
        job_id, attempt = self.claim.job.id, self.claim.attempt
        try:
            ended = self.jobs.load_job(job_id)
        except Exception:  # Redis away or the job gone: the plain fact is all there is
            ended = None
        by_itself = ended is not None and ended.attempt == attempt and (
            ended.status.is_terminal or ended.status == JobStatus.PAUSED)
        if by_itself:
            logger.info("attempt %d of %s ended (%s): its heartbeat stops", attempt, job_id, ended.status.value)
        else:
            logger.warning("lost the lease of %s (attempt %d)", job_id, attempt)


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

    def __init__(self, heartbeat: Heartbeat, end_job: Callable[[StopSignal], None], *,
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



# ------------------------------------------------------------------------------------ one job
class JobRunner(RunnerThread):
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
        super().__init__(f"job-{claim.job.id}", on_exit)  # shut_down(): hand the job back, the run on Ray torn down

    def _run_then_signal(self) -> None:
        set_job_log_context(self.claim.job.id, self.claim.job.tenant_id)  # this thread's lines name the job
        super()._run_then_signal()

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
            with Heartbeat(self.jobs, claim, self.settings, self._shutdown) as heartbeat:
                self._run_attempt(job, fence, work_dir, heartbeat)
        except KeyboardInterrupt:
            # Stopping the dispatcher: hand the job back so another one resumes it from its checkpoint.
            self.finish_quietly(fence, JobStatus.QUEUED)
            raise
        except Exception as e:
            self.end_after_error(e)
        finally:
            # Checkpoints that matter live in the object store; Ray's copies and the work dir go.
            self.join_abandoned()
            shutil.rmtree(work_dir, ignore_errors=True)
            self._ray_storage.remove_run(self._ray_run_name(job, attempt))
            with contextlib.suppress(OSError):
                work_dir.parent.rmdir()  # the job's folder, once no attempt of it runs here
            self.end_sweep_if_done()

    def end_sweep_if_done(self) -> None:
        """A rank-sweep child that ended may end its sweep; housekeeping retries what fails here
        (fleet.sweeps.SweepStore.finish_ended_sweeps)."""
        job = self.claim.job
        if job.parent is None:
            return
        try:
            self.sweeps.after_job_ended(job)
        except Exception:
            logger.exception("job %s: ending its rank sweep %s failed; housekeeping retries it", job.id, job.parent)

    def end_after_error(self, e: Exception) -> None:
        """End the attempt as the error that stopped it says (a lost lease, a stop signal, a cancel after
        training, the job's own failure, an infrastructure fault); never raises for a job's own failure."""
        claim = self.claim
        job, attempt, fence = claim.job, claim.attempt, claim.fence
        if isinstance(e, FencedOut):
            logger.warning("%s: %s", job.id, e)
        elif isinstance(e, _AlreadyFinished):
            logger.info("%s", e)
        elif isinstance(e, StopRequested):
            self._end_on_signal(fence, e.signal)
        elif isinstance(e, CancelRequested):
            # Cancelled after training ended, before the version became visible: publish nothing.
            self.finish_quietly(fence, JobStatus.CANCELLED)
        elif isinstance(e, InvalidRequest):
            self.finish_quietly(fence, JobStatus.FAILED,
                                 error=JobError(code="invalid_request", message=str(e), param=e.param))
        elif isinstance(e, TrainingSetupError):
            logger.warning("job %s attempt %d: training cannot run: %s", job.id, attempt, e)
            message = (f"Training cannot run with this job's configuration or data: {scrub_paths(str(e))}. "
                       "Retrying would fail the same way; fix it and create a new job.")
            self.finish_quietly(fence, JobStatus.FAILED,
                                 error=JobError(code="invalid_training_config", message=message[:2000]),
                                 last_failure=full_text(e)[:_LAST_FAILURE_MAX_CHARS])
        elif _caused_by_redis_outage(e):
            # Not the job's fault: hand it back to resume from its checkpoint. If Redis is still
            # away this write fails too, and the lease expiring requeues the job instead.
            logger.warning("job %s attempt %d: Redis unreachable (%s); handing it back", job.id, attempt, e)
            self.finish_quietly(fence, JobStatus.QUEUED)
        elif is_infrastructure_fault(e):
            self._hand_back_after_fault(claim, e)
        else:
            logger.error("job %s attempt %d failed", job.id, attempt, exc_info=e)
            # The tenant reads a short summary without server paths; the whole story is the operator's.
            self.finish_quietly(fence, JobStatus.FAILED,
                                 error=JobError(code="training_error", message=f"Training failed: {tenant_summary(e)}"),
                                 last_failure=full_text(e)[:_LAST_FAILURE_MAX_CHARS])

    def _hand_back_after_fault(self, claim: Claim, error: Exception) -> None:
        """An object-store or Ray node fault is not the job's: hand it back to resume from its checkpoint,
        at most `max_infra_faults` times; the fault after that fails it (infrastructure_error)."""
        job, fence = claim.job, claim.fence
        faults = job.infra_faults + 1
        details = full_text(error)[:_LAST_FAILURE_MAX_CHARS]
        if faults <= self.settings.max_infra_faults:
            logger.warning("job %s attempt %d: infrastructure fault %d of %d allowed, handing it back: %s",
                           job.id, claim.attempt, faults, self.settings.max_infra_faults, details)
            self.finish_quietly(fence, JobStatus.QUEUED, last_failure=details, infra_faults=faults)
            return
        logger.error("job %s attempt %d: infrastructure fault %d, over the %d allowed; failing it: %s",
                     job.id, claim.attempt, faults, self.settings.max_infra_faults, details)
        message = (f"Training was interrupted by {faults} infrastructure faults (object store or compute "
                   f"node unavailable); the last: {tenant_summary(error)}. Nothing is wrong with the job "
                   "itself: create it again once the service is healthy, or contact the operator.")
        self.finish_quietly(fence, JobStatus.FAILED, error=JobError(code="infrastructure_error", message=message),
                             last_failure=details, infra_faults=faults)

    def _end_on_signal(self, fence: Fence, signal: StopSignal) -> None:
        """End the attempt as `signal` asks: cancelled, paused, or handed back to the queue (a
        preemption, at its place and marked preempted; a shutdown, like a lost lease)."""
        if signal == "preempt":
            logger.info("%s: preempted; handing it back to resume from its checkpoint", fence.job_id)
            self.finish_quietly(fence, JobStatus.QUEUED, preempted=True)
        elif signal == "shutdown":
            self.finish_quietly(fence, JobStatus.QUEUED)
        else:
            self.finish_quietly(fence, JobStatus.CANCELLED if signal == "cancel" else JobStatus.PAUSED)

    def _reserve_gang(self, job: Job, fence: Fence, heartbeat: Heartbeat) -> Gang:
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
            self.finish_quietly(fence, JobStatus.QUEUED, retry_after_ms=int(timeout_s * 1000))
            raise _AlreadyFinished(f"{job.id}: handed back, its gang did not fit") from None
        return gang

    def finish_quietly(self, fence: Fence, status: JobStatus, error: JobError | None = None,
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

    def _in_phase(self, heartbeat: Heartbeat, what: str, work: Callable[[], T]) -> T:
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

    def join_abandoned(self, timeout_s: float = 5.0) -> None:
        """Give phases stopped midway a moment to end before their work dir is removed."""
        deadline = time.monotonic() + timeout_s
        for thread in self._abandoned:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._abandoned = [t for t in self._abandoned if t.is_alive()]

    def _run_attempt(self, job: Job, fence: Fence, work_dir: Path, heartbeat: Heartbeat) -> None:
        staged = self.stage_inputs(heartbeat, work_dir)
        if staged is None:
            return
        result = self._train(job, fence, staged.inputs, work_dir, heartbeat)
        if result.status == "cancelled":
            self.jobs.leases.finish_job(fence, JobStatus.CANCELLED)
            return
        if result.status == "paused":  # the loop checkpointed and stopped for a pause or a preemption
            self._end_on_signal(fence, "preempt" if self.jobs.leases.control_signal(fence) == "preempt" else "pause")
            return
        # A cancel from here on publishes nothing (and once the version is committed, cannot undo it);
        # a pause of a job whose training is done lets it complete.
        heartbeat.raise_if_stopped(honour_pause=False)
        publish_version(self.registry, self.jobs, job, fence, result, staged, settings=self.settings)

    def stage_inputs(self, heartbeat: Heartbeat, work_dir: Path) -> StagedJob | None:
        """Everything before training: complete a version an earlier attempt committed (then the job is
        finished: None), fetch and check the datasets, find the checkpoint to resume from, and name the
        inputs the training process fetches itself (workers.input_staging)."""
        job, fence = self.claim.job, self.claim.fence
        try:
            done = self.registry.complete_committed_publication(fence)
        except (FleetError, redis.ConnectionError, redis.TimeoutError):
            raise  # fenced out, cancelled, Redis away: handled by run_claim
        except Exception as e:  # the object store is down, say: wait a little, then hand the job back
            logger.warning("%s: completing its committed version failed: %s; handing it back", job.id, e)
            heartbeat.lost.wait(min(30.0, self.settings.lease_ms / 1000))  # no hot loop on a lone job
            why = JobError(code="completion_failed", message=f"Completing the committed version failed: {e}"[:2000])
            self.jobs.leases.finish_job(fence, JobStatus.QUEUED, error=why)  # tail of its queue; why: last_failure
            return None
        if done is not None:  # an earlier attempt committed its version, then died: finish with it
            used = (hyperparameters_used(job.spec.hyperparameters, done.hyperparameters)
                    if done.hyperparameters else None)
            self.jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, fine_tuned_model=done.ref,
                                        trained_tokens=done.trained_tokens, hyperparameters=used)
            return None
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
        return StagedJob(inputs=inputs, training_sha256=training.sha256, base_name=base_name)

    def _train(self, job: Job, fence: Fence, inputs: StoredInputs, work_dir: Path, heartbeat: Heartbeat):
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
