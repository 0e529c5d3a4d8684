"""fleet records rendered as API objects: OpenAI's (job, event, checkpoint, model, list envelope) and our
adapter and adapter version objects.

Pure functions from fleet's models to JSON-ready dicts. OpenAI's field names come first; our
extensions (`progress`, `queue_position`, `lora`, `resources`, `priority`, `attempt`) are extra keys
the SDK keeps as attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fleet.job_spec import OPENAI_HYPERPARAMETERS
from fleet.jobs import Checkpoint, Event, Job
from fleet.registry import AdapterSummary, AdapterVersion

__all__ = [
    "list_envelope",
    "job_object",
    "event_object",
    "checkpoint_object",
    "model_object",
    "checkpoint_model_name",
    "adapter_object",
    "version_object",
]

# Metric names the training loop reports → OpenAI's checkpoint metric names.
_CHECKPOINT_METRIC_NAMES = {
    "train_loss": "train_loss",
    "loss": "train_loss",
    "train_mean_token_accuracy": "train_mean_token_accuracy",
    "valid_loss": "valid_loss",
    "eval_loss": "valid_loss",
    "val_loss": "valid_loss",
    "valid_mean_token_accuracy": "valid_mean_token_accuracy",
    "full_valid_loss": "full_valid_loss",
    "full_valid_mean_token_accuracy": "full_valid_mean_token_accuracy",
}


def list_envelope(data: Sequence[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """OpenAI's list object; `first_id`/`last_id` help cursor pagination by hand."""
    return {
        "object": "list",
        "data": list(data),
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _hyperparameters(job: Job) -> dict[str, Any]:
    """OpenAI's three: the values used once the job succeeded, the requested ones ("auto" too) before."""
    if job.hyperparameters_used is not None:
        return {name: job.hyperparameters_used.get(name, "auto") for name in OPENAI_HYPERPARAMETERS}
    return job.spec.hyperparameters.model_dump(mode="json")


def _progress(job: Job) -> dict[str, Any] | None:
    p = job.progress
    if p is None:
        return None
    percent = p.percent
    if percent is None and p.total_steps:
        percent = round(100.0 * p.step / p.total_steps, 2)
    return {
        "step": p.step,
        "total_steps": p.total_steps,
        "percent": percent,
        "eta_seconds": p.eta_s,
        "epoch": p.epoch,
        "metrics": dict(p.metrics),
    }


def job_object(job: Job, *, queue_position: int | None = None) -> dict[str, Any]:
    """The `fine_tuning.job` object for `job`; `organization_id` is the owning tenant."""
    hyperparameters = _hyperparameters(job)
    return {
        "object": "fine_tuning.job",
        "id": job.id,
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant_id,
        "result_files": list(job.result_files),
        "status": job.status.value,
        "validation_file": job.validation_file,
        "training_file": job.training_file,
        "hyperparameters": hyperparameters,
        "trained_tokens": job.trained_tokens,
        "error": job.error.model_dump() if job.error else None,
        "seed": job.seed,
        "metadata": dict(job.metadata) or None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "estimated_finish": job.estimated_finish,
        "integrations": [],
        "user_provided_suffix": job.suffix,
        # lorafleet extensions
        "progress": _progress(job),
        "queue_position": queue_position,
        "lora": job.spec.lora_block(),
        "resources": job.resources.model_dump(),
        "priority": job.priority,
        "co_training": job.spec.co_training,
        "base_model": job.base_model or job.model,
        "init_adapter": job.init_adapter,
        "attempt": job.attempt,
        "started_at": job.started_at,
        "parent": job.parent,  # a rank-sweep child: its sweep's parent job
        "rank_sweep": job.rank_sweep.model_dump(mode="json") if job.rank_sweep else None,
    }


def event_object(event: Event) -> dict[str, Any]:
    """The `fine_tuning.job.event` object."""
    return {
        "object": "fine_tuning.job.event",
        "id": event.id,
        "created_at": event.created_at,
        "level": event.level,
        "message": event.message,
        "type": event.type,
        "data": event.data,
    }


def checkpoint_model_name(job: Job, step: int) -> str:
    """How a checkpoint is named as a model: `<fine-tuned model or job id>:ckpt-step-<N>`."""
    return f"{job.fine_tuned_model or job.id}:ckpt-step-{step}"


def checkpoint_object(job: Job, checkpoint: Checkpoint) -> dict[str, Any]:
    """The `fine_tuning.job.checkpoint` object; unknown metric names are kept as they are."""
    metrics: dict[str, float] = {"step": checkpoint.step}
    for name, value in checkpoint.metrics.items():
        metrics[_CHECKPOINT_METRIC_NAMES.get(name, name)] = value
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": checkpoint.id,
        "created_at": checkpoint.created_at,
        "fine_tuned_model_checkpoint": checkpoint_model_name(job, checkpoint.step),
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": metrics,
        "step_number": checkpoint.step,
    }


def model_object(model_id: str, *, created: int, owned_by: str, **extra: Any) -> dict[str, Any]:
    """OpenAI's `model` object, plus any lorafleet fields in `extra`."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, **extra}


def adapter_object(summary: AdapterSummary) -> dict[str, Any]:
    """An adapter (all its versions) as `/v1/adapters` lists it."""
    return {
        "object": "adapter",
        "id": summary.name,
        "name": summary.name,
        "latest_version": summary.latest_version,
        "latest_ref": summary.latest_ref,
        "version_count": summary.n_versions,
        "created_at": summary.created_at,
        "updated_at": summary.updated_at,
    }


def version_object(version: AdapterVersion) -> dict[str, Any]:
    """One immutable adapter version; `id` is its public name "<name>:v<N>"."""
    return {
        "object": "adapter.version",
        "id": version.ref,
        "name": version.name,
        "version": version.version,
        "created_at": version.created_at,
        "source": version.source,
        "job_id": version.job_id,
        "base_model": version.base_model,
        "bytes": version.bytes_total,
        "rank_report_summary": version.rank_report_summary,
    }
