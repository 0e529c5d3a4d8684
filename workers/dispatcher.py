"""The dispatcher: claims jobs from Redis, runs them on Ray Train, streams progress back, publishes adapters.

One dispatcher runs one job at a time (run several for more). For each claim it:
1. holds the job's lease by heartbeat; losing it (fenced out) means another attempt owns the job;
2. fetches the dataset files and the latest checkpoint of earlier attempts from the object store;
3. runs `workers.ray_train.run_training_on_ray`; inside the rank-0 worker a `JobReporter` writes
   progress and events to Redis, uploads each checkpoint to the object store, and relays cancel/pause;
4. publishes the adapter through the registry (idempotent per job, fenced by the claim) and finishes
   the job. Every write carries the claim's fence (attempt + token), so a stale attempt can never
   change the job.
A dispatcher that dies leaves its lease to expire; any other dispatcher requeues the job and the next
attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.checkpoints import download_checkpoint, upload_checkpoint
from fleet.exceptions import CancelRequested, FencedOut, FleetError, InvalidRequest, NotFound, PauseWithdrawn
from fleet.fencing import Fence
from fleet.files import FileStore
from fleet.jobs import Checkpoint, Job, JobError, JobStatus
from fleet.queue import Claim, JobStore
from fleet.registry import AdapterRegistry, adapter_name_for_job, parse_adapter_ref
from fleet.settings import Settings, load_catalog, make_object_store, make_redis
from workers.reporting import Control
from workers.spec import AUTO_BASE_LEARNING_RATE, Hyperparameters, LoraSpec, TrainingSpec

__all__ = ["Dispatcher", "JobReporter", "JobReporterFactory", "build_training_spec"]

logger = logging.getLogger(__name__)

_LEVELS = {"warning": "warn", "warn": "warn", "error": "error", "critical": "error"}


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
    """The training loop's Reporter for one attempt of one job: Redis for state, object store for files."""

    def __init__(self, settings: Settings, tenant_id: str, fence: Fence) -> None:
        self.job_id, self.tenant_id, self.fence = fence.job_id, tenant_id, fence
        self.jobs = JobStore(make_redis(settings), max_attempts=settings.max_attempts,
                             events_max_len=settings.events_max_len)
        self.store = make_object_store(settings)
        self.fenced = False
        self._control: Control = None
        self._started = time.monotonic()
        self._first_step: int | None = None

    def log(self, message: str, level: str = "info") -> None:
        if self.fenced:
            return  # another attempt owns the job's log now
        try:
            self.jobs.leases.append_event(self.fence, _LEVELS.get(level, "info"), message)
        except FencedOut:
            self.fenced = True

    def metrics(self, step: int, values: dict[str, float]) -> None:
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
        self._control = control
        parts = [f"Step {step}/{total}" if total else f"Step {step}"]
        for name, label in (("train_loss", "training loss"), ("val_loss", "validation loss"),
                            ("val_token_accuracy", "validation token accuracy")):
            if name in shown:
                parts.append(f"{label}={shown[name]:.4f}")
        try:
            self.jobs.leases.append_event(self.fence, "info", ", ".join(parts), {"step": step, **shown},
                                          type="metrics")
        except FencedOut:
            self.fenced = True

    def checkpoint(self, step: int, path: Path) -> None:
        # Every file is stored before the fenced Redis write commits it, so a listed checkpoint is whole.
        prefix = upload_checkpoint(self.store, self.tenant_id, self.job_id, step, path)
        try:
            self.jobs.leases.record_checkpoint(self.fence, step, prefix)
        except FencedOut:
            self.fenced = True

    def control(self) -> Control:
        if self.fenced:
            return "cancel"  # another attempt owns the job: stop without writing anything
        try:
            return self.jobs.leases.control_signal(self.fence)
        except FencedOut:
            self.fenced = True
            return "cancel"


@dataclass(frozen=True)
class JobReporterFactory:
    """Picklable: Ray ships it to the rank-0 worker, which calls it to build its JobReporter."""

    settings: Settings
    tenant_id: str
    fence: Fence

    def __call__(self) -> JobReporter:
        return JobReporter(self.settings, self.tenant_id, self.fence)


# ------------------------------------------------------------------------------------ heartbeat
class _Heartbeat:
    """Renews a claim's lease every heartbeat_ms on its own thread; notes when the claim is lost."""

    def __init__(self, jobs: JobStore, claim: Claim, settings: Settings) -> None:
        self.jobs, self.claim, self.settings = jobs, claim, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{claim.job.id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_ms / 1000):
            try:
                self.jobs.leases.renew_lease(self.claim.fence, self.settings.lease_ms)
            except FencedOut:
                logger.warning("lost the lease of %s (attempt %d)", self.claim.job.id, self.claim.attempt)
                self.lost.set()
                return
            except Exception:  # Redis blip: keep trying until the lease would run out
                logger.exception("heartbeat for %s failed; retrying", self.claim.job.id)


# ------------------------------------------------------------------------------------ dispatcher
class Dispatcher:
    """Claims and runs jobs until `stop()`; see the module docstring for one job's life."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        redis = make_redis(settings)
        self.store = make_object_store(settings)
        self.jobs = JobStore(redis, max_attempts=settings.max_attempts, events_max_len=settings.events_max_len)
        self.files = FileStore(redis, self.store, max_upload_bytes=settings.max_upload_bytes)
        self.registry = AdapterRegistry(redis, self.store)
        self.catalog = load_catalog(settings)
        self.work_root = Path(settings.data_dir).resolve() / "work" / self.worker_id.replace(":", "-")
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def connect_ray(self) -> None:
        """Join the configured Ray cluster (or start a local one). Ray installs its own signal handlers:
        callers that want theirs install them after this."""
        import ray

        if not ray.is_initialized():
            ray.init(address=self.settings.ray_address, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
            logger.info("dispatcher %s joined Ray at %s", self.worker_id, ray.get_runtime_context().gcs_address)

    def run_forever(self) -> None:
        """The dispatcher's main loop: recover dead owners' jobs, claim, run, repeat.

        Redis being unreachable is waited out (with backoff), not fatal: the jobs are safe in Redis,
        and whatever this dispatcher held is requeued by lease expiry if the outage outlasts it.
        """
        import redis

        self.connect_ray()
        backoff_s = 0.5
        while not self._stop.is_set():
            try:
                self.step()
                backoff_s = 0.5
            except (redis.ConnectionError, redis.TimeoutError) as e:
                logger.warning("Redis unreachable (%s); retrying in %.1fs", e, backoff_s)
                self._stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 30.0)

    def step(self) -> None:
        """One turn of the main loop: requeue expired leases, then run one job or wait for one."""
        self.jobs.leases.requeue_expired_leases()
        claim = self.jobs.leases.claim_next_job(self.worker_id, self.settings.lease_ms)
        if claim is None:
            self.jobs.leases.wait_for_work(max(0.2, min(5.0, self.settings.lease_ms / 2000)))  # woken when queued
            return
        self.run_claim(claim)

    def run_claim(self, claim: Claim) -> None:
        """Run one claimed attempt to its end; never raises for a job's own failure."""
        job, attempt, fence = claim.job, claim.attempt, claim.fence
        work_dir = self.work_root / job.id / f"attempt-{attempt}"
        logger.info("running %s attempt %d in %s", job.id, attempt, work_dir)
        try:
            with _Heartbeat(self.jobs, claim, self.settings) as heartbeat:
                self._run_attempt(job, fence, work_dir, heartbeat)
        except FencedOut as e:
            logger.warning("%s: %s", job.id, e)
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
        except Exception as e:
            logger.exception("job %s attempt %d failed", job.id, attempt)
            message = f"Training failed: {type(e).__name__}: {e}"
            if e.__cause__ is not None:
                message += f" (caused by {type(e.__cause__).__name__}: {e.__cause__})"
            self._finish_quietly(fence, JobStatus.FAILED,
                                 error=JobError(code="training_error", message=message[:2000]))
        finally:
            # Checkpoints that matter live in the object store; Ray's copies and the work dir go.
            shutil.rmtree(work_dir, ignore_errors=True)
            shutil.rmtree(self._ray_storage / self._ray_run_name(job, attempt), ignore_errors=True)
            with contextlib.suppress(OSError):
                work_dir.parent.rmdir()  # the job's folder, once no attempt of it runs here

    def _finish_quietly(self, fence: Fence, status: JobStatus, error: JobError | None = None) -> None:
        try:
            self.jobs.leases.finish_job(fence, status, error=error)
        except FleetError as e:
            logger.warning("could not mark %s %s: %s", fence.job_id, status.value, e)

    def _run_attempt(self, job: Job, fence: Fence, work_dir: Path, heartbeat: _Heartbeat) -> None:
        from workers.ray_train import run_training_on_ray

        attempt = fence.attempt

        done = self.registry.complete_committed_publication(fence)
        if done is not None:  # an earlier attempt committed its version, then died: finish with it
            used = hyperparameters_used(job.hyperparameters, done.hyperparameters) if done.hyperparameters else None
            self.jobs.leases.finish_job(fence, JobStatus.SUCCEEDED, fine_tuned_model=done.ref,
                                        trained_tokens=done.trained_tokens, hyperparameters=used)
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        base_name = job.base_model or job.model
        base = self.catalog.get(base_name)
        training = self._download_dataset(job, "training_file", work_dir / "train.jsonl")
        validation_path = None
        if job.validation_file:
            validation_path = work_dir / "validation.jsonl"
            self._download_dataset(job, "validation_file", validation_path)
        init_adapter = None
        if job.init_adapter:  # continuing a published version: start from its weights
            init_adapter = self.registry.download_version(job.tenant_id, job.init_adapter, work_dir / "init")
        spec = build_training_spec(
            job, base_model=Path(base.path), quantization=job.lora.get("quantization", base.quantization),
            work_dir=work_dir, training_file=work_dir / "train.jsonl", validation_file=validation_path,
            init_adapter=init_adapter,
        )
        self._check_datasets(job, fence, spec)
        resume_from = self._fetch_latest_checkpoint(job, work_dir / "resume")
        if resume_from is not None:
            self.jobs.leases.append_event(fence, "info", f"Resuming from the checkpoint at step {resume_from[1]}.")
        result = run_training_on_ray(
            spec,
            output_dir=work_dir / "out",
            reporter_factory=JobReporterFactory(self.settings, job.tenant_id, fence),
            num_workers=self.settings.train_workers_per_job,
            use_gpu=self.settings.use_gpu,
            storage_path=self._ray_storage,
            name=self._ray_run_name(job, attempt),
            max_failures=self.settings.train_max_failures,
            resume_from=resume_from[0] if resume_from else None,
        )
        if heartbeat.lost.is_set():
            raise FencedOut(f"attempt {attempt} of {job.id} lost its lease while training")
        if result.status == "cancelled":
            self.jobs.leases.finish_job(fence, JobStatus.CANCELLED)
            return
        if result.status == "paused":
            try:
                self.jobs.leases.finish_job(fence, JobStatus.PAUSED)
            except PauseWithdrawn:  # resumed before we stopped: hand back, resume from the pause's checkpoint
                self.jobs.leases.finish_job(fence, JobStatus.QUEUED)
            return
        assert result.adapter_dir is not None
        manifest_fields: dict[str, Any] = {
            "base_model": base_name,
            "parent": job.init_adapter,  # the version this one continued from, if any
            "base_model_path": base.path,
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

    def _check_datasets(self, job: Job, fence: Fence, spec: TrainingSpec) -> None:
        """The checks that need the base model's tokenizer (the API checked the format at upload):
        chat template errors, token counts, examples over max_seq_len. Errors fail the job with the
        file as `param` and the line numbers; warnings (e.g. truncated examples) become job events."""
        from transformers import AutoTokenizer

        from workers.datasets import validate_dataset

        tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model))
        files = [("training_file", spec.training_file, 10), ("validation_file", spec.validation_file, 1)]
        for param, path, min_examples in files:
            if path is None:
                continue
            report = validate_dataset(path, tokenizer=tokenizer, max_seq_len=spec.max_seq_len,
                                      overflow="truncate", train_on_inputs=spec.train_on_inputs,
                                      min_examples=min_examples)
            if not report.ok:
                problems = "; ".join(str(issue) for issue in report.errors[:20])
                raise InvalidRequest(f"{param} {getattr(job, param)} is not usable for {job.model}: "
                                     f"{report.n_errors} problem(s): {problems}", param=param)
            for issue in report.warnings[:20]:
                self.jobs.leases.append_event(fence, "warn", f"{param}: {issue}")
            if report.token_stats is not None:
                self.jobs.leases.append_event(fence, "info", f"{param}: {report.summary().splitlines()[0]}")

    def _fetch_latest_checkpoint(self, job: Job, dest: Path) -> tuple[Path, int] | None:
        """Download the job's newest checkpoint (from any earlier attempt), or None if there is none."""
        latest: Checkpoint | None = self.jobs.latest_checkpoint(job.id)
        if latest is None:
            return None
        local = download_checkpoint(self.store, latest.location, dest / f"step-{latest.step:08d}")
        return local, latest.step
