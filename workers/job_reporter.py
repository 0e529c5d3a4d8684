"""The training loop's Reporter for one attempt of one job, built inside the Ray rank-0 worker.

`JobReporter` writes progress and events to Redis and uploads checkpoints to the object store, every
write fenced by the claim (a stale attempt can never change the job), and relays the job's control
signal (cancel, pause; a preemption is a pause to the loop) to the training loop. `JobReporterFactory`
is the picklable recipe Ray ships to the worker. (Moved out of workers.dispatcher; behaviour unchanged.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from fleet.checkpoints import upload_checkpoint
from fleet.exceptions import FencedOut
from fleet.fencing import Fence
from fleet.queue import JobStore
from fleet.settings import Settings, make_object_store, make_redis
from workers.checkpoint_uploader import CheckpointUploader
from workers.metrics import StepClock
from workers.reporting import Control

__all__ = ["JobReporter", "JobReporterFactory", "REDIS_DOWN", "loop_control"]

logger = logging.getLogger(__name__)

_LEVELS = {"warning": "warn", "warn": "warn", "error": "error", "critical": "error"}
# READONLY: a replica answering during a failover, before it is promoted; as transient as an outage.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)
_CHECKPOINT_RECORD_TIMEOUT_S = 60.0  # how long the reporter retries recording an uploaded checkpoint
_CHECKPOINT_UPLOAD_WAIT_S = 600.0  # how long the end of a run waits for its checkpoint uploads


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
        except REDIS_DOWN as e:
            logger.warning("%s: Redis unreachable, progress of step %d not recorded (%s)", self.job_id, step, e)
            return
        self._control = loop_control(control)
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
            except REDIS_DOWN as e:
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
        except REDIS_DOWN:
            pass  # keep training on the last signal seen; the next poll asks again
        return loop_control(self._control)

    def _append_event(self, level: str, message: str, data: dict | None = None, **kwargs: Any) -> None:
        try:
            self.jobs.leases.append_event(self.fence, level, message, data, **kwargs)
        except FencedOut:
            self.fenced = True  # another attempt owns the job's log now
        except REDIS_DOWN as e:
            logger.warning("%s: Redis unreachable, event dropped: %s (%s)", self.job_id, message, e)


def loop_control(signal: str | None) -> Control:
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
