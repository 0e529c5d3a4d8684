"""The fine-tuning job: its states, allowed transitions, the Job record and its Redis hash form."""

from __future__ import annotations

import json
import re
import secrets
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fleet.job_spec import JobSpec
from fleet.resources import PriorityClass, Resources, priority_value

__all__ = [
    "JobStatus",
    "TERMINAL_STATUSES",
    "ALLOWED_TRANSITIONS",
    "ControlSignal",
    "JobError",
    "Progress",
    "Job",
    "Checkpoint",
    "Event",
    "RankSweep",
    "SweepChild",
    "new_job_id",
    "is_job_id",
]


class JobStatus(str, Enum):
    """A job's state; the values are OpenAI's fine-tuning job statuses plus `paused`.

    OpenAI's `validating_files` never occurs: files are validated at upload, so a job is created queued.
    """

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# from → the states it may move to. The Lua scripts in fleet.queue_scripts implement these moves, and
# tests/fleet/test_fleet_transitions.py checks that they make exactly these; running → queued is a
# requeue (lease expired, or a worker handed the job back).
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED}
    ),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


# "preempt": the scheduler reclaims the job's GPUs for a tenant below its nominal quota; the worker
# checkpoints now and hands the job back with finish_job(fence, QUEUED, preempted=True).
ControlSignal = Literal["cancel", "pause", "preempt"]


_JOB_ID = re.compile(r"^ftjob-[A-Za-z0-9]{1,64}$")


def new_job_id() -> str:
    """A fresh job id, "ftjob-" + 24 random alphanumerics like OpenAI's."""
    return "ftjob-" + secrets.token_hex(12)


def is_job_id(value: str) -> bool:
    """Whether `value` is shaped like a job id (checked before it goes into a Redis key name)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


class JobError(BaseModel):
    """Why a job failed, shaped as OpenAI's job error `{code, message, param}`."""

    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    """Training progress as last reported by the worker."""

    step: int = 0
    total_steps: int | None = None
    percent: float | None = None
    eta_s: float | None = None
    epoch: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)


class SweepChild(BaseModel):
    """One child job of a rank sweep. The results (status onwards) are filled in when the sweep ends."""

    id: str
    rank: int
    status: JobStatus | None = None
    val_loss: float | None = None
    steps: int | None = None
    rank_report: dict[str, Any] | None = None  # the summary of the child's rank report
    error: str | None = None


class RankSweep(BaseModel):
    """A rank sweep's parent job: the ranks asked for, its children, and which child was published."""

    ranks: list[int]
    children: list[SweepChild] = Field(default_factory=list)
    chosen: str | None = None  # the child whose adapter became the parent's version


# A job is a Redis hash: scalar fields as plain strings (the Lua scripts in fleet.queue_scripts read and write
# those), structured fields as JSON. A field that is None is absent from the hash. The hash also carries
# scalars only the Lua reads: `gpus` (spec.resources.total_gpus) and `priority_value`, written with the job.
_JOB_JSON_FIELDS = frozenset({"metadata", "spec", "error", "result_files", "progress", "rank_sweep"})
# `hyperparameters_used` lives in the hash field fleet.leases.finish_job writes: "hyperparameters".
_USED_FIELD = "hyperparameters"
# What a version before JobSpec stored instead of `spec` (JSON, except `priority`): read by `_legacy_spec`.
_LEGACY_JSON_FIELDS = ("hyperparameters", "lora", "method", "resources")


class Job(BaseModel):
    """One fine-tuning job: the request as accepted plus everything the system learned since.

    `spec` holds how it trains (LoRA, hyperparameters, quantization, resources, priority) as the API
    validated it; `hyperparameters_used` the values training resolved them to, once it succeeded.
    `attempt` counts claims; with `claim_token` (random, drawn at each claim) it forms the fence
    (fleet.fencing.Fence) a worker passes back on every write.
    Times are Unix seconds except `lease_expires_at_ms`.
    """

    model_config = ConfigDict(use_enum_values=False, extra="forbid")  # a stale field name fails loudly

    id: str
    tenant_id: str
    seq: int = 0
    created_at: int
    updated_at: int | None = None
    model: str  # as requested: a catalog base model, or an adapter version "<name>:v<N>" to continue
    base_model: str | None = None  # the catalog base model the adapter trains on (None: `model`)
    init_adapter: str | None = None  # the adapter version training starts from, when continuing one
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    spec: JobSpec = Field(default_factory=JobSpec)
    hyperparameters_used: dict[str, Any] | None = None  # set by finish_job on success (workers.dispatcher)
    status: JobStatus = JobStatus.QUEUED
    error: JobError | None = None
    fine_tuned_model: str | None = None
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    progress: Progress | None = None
    started_at: int | None = None
    finished_at: int | None = None
    estimated_finish: int | None = None
    attempt: int = 0
    lease_expirations: int = 0
    infra_faults: int = 0  # attempts handed back after an object-store or Ray node fault (operator data)
    worker_id: str | None = None
    claim_token: str | None = None
    lease_expires_at_ms: int | None = None
    control: ControlSignal | None = None
    last_failure: str | None = None
    idempotency_key: str | None = None
    request_sha256: str | None = None
    parent: str | None = None  # a rank-sweep child: its parent job (fleet.sweeps)
    rank_sweep: RankSweep | None = None  # a rank sweep's parent job: its children and results (fleet.sweeps)

    @property
    def resources(self) -> Resources:
        """What the job asks the cluster for (its spec's)."""
        return self.spec.resources

    @property
    def priority(self) -> PriorityClass:
        """Its priority class within the tenant (its spec's)."""
        return self.spec.priority

    def to_redis_hash(self) -> dict[str, str]:
        """The hash fields to HSET; None-valued fields are left out."""
        data = self.model_dump(mode="json")
        out: dict[str, str] = {}
        for name, value in data.items():
            if value is None:
                continue
            if name == "hyperparameters_used":
                out[_USED_FIELD] = json.dumps(value, separators=(",", ":"), sort_keys=True)
            elif name in _JOB_JSON_FIELDS:
                out[name] = json.dumps(value, separators=(",", ":"), sort_keys=True)
            else:
                out[name] = str(value)
        out["gpus"] = str(self.resources.total_gpus)
        out["priority_value"] = str(priority_value(self.priority))
        return out

    @classmethod
    def from_redis_hash(cls, fields: dict[str, str]) -> Job:
        """Rebuild a Job from HGETALL output (a client with decode_responses=True).

        A hash written before JobSpec (no `spec` field) is read through `_legacy_spec`.
        """
        data: dict[str, Any] = {}
        for name, value in fields.items():
            if name not in cls.model_fields or name == "hyperparameters_used":
                continue  # written by a newer version; ignore rather than fail reads
            data[name] = json.loads(value) if name in _JOB_JSON_FIELDS else value
        used = json.loads(fields[_USED_FIELD]) if _USED_FIELD in fields else None
        if "spec" not in fields:
            data["spec"] = _legacy_spec(fields)
            # Before JobSpec, `hyperparameters` held the request until finish_job replaced it on success.
            used = used if fields.get("status") == JobStatus.SUCCEEDED.value else None
        data["hyperparameters_used"] = used
        return cls.model_validate(data)


def _legacy_spec(fields: dict[str, str]) -> JobSpec:
    """The JobSpec of a hash stored by a version before JobSpec (dict fields `hyperparameters`, `lora`,
    `method`, `resources` beside the scalar `priority`)."""
    parsed = {name: json.loads(fields[name]) if name in fields else None for name in _LEGACY_JSON_FIELDS}
    return JobSpec.from_legacy_fields(**parsed, priority=fields.get("priority"))


class Checkpoint(BaseModel):
    """A training checkpoint a worker saved; OpenAI's `fine_tuning.job.checkpoint` carries these fields."""

    id: str
    job_id: str
    step: int
    location: str = Field(description="Where the checkpoint lives (object-store key or shared path).")
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: int
    attempt: int


class Event(BaseModel):
    """One entry of a job's event stream.

    `id` is "ftevent-" + the Redis stream id; `stream_id` is the raw stream id (usable as a cursor).
    `type` is "message" for log lines and "metrics" for training metrics, as in OpenAI's API.
    """

    id: str
    stream_id: str
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None
