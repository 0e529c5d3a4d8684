"""Request bodies of the API as pydantic models: the shape checks done before any Redis call.

Field names and limits follow OpenAI's fine-tuning API (metadata: ≤16 keys, keys ≤64 chars, values
≤512 chars; suffix ≤64 chars) so the official SDK's requests validate unchanged. Our own extensions are
the `lora` block, `resources`, `priority` and `rank_sweep`. Unknown fields are rejected (`Unrecognized request
argument supplied: ...`) so a typo is never silently ignored.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from fleet.files import FILE_ID_PATTERN
from fleet.job_spec import Alpha, Dropout, Hyperparameters, Quantization, Rank
from fleet.quotas import TenantQuota
from fleet.resources import PriorityClass, Resources

__all__ = [
    "Hyperparameters",
    "SupervisedMethod",
    "Method",
    "LoraRequest",
    "RESOURCES_SCHEMA",
    "JobCreateRequest",
    "QuotaRequest",
    "TenantCreateRequest",
    "KeyCreateRequest",
    "NAME_PATTERN",
    "check_name",
]

METADATA_MAX_KEYS = 16
METADATA_MAX_KEY_CHARS = 64
METADATA_MAX_VALUE_CHARS = 512

# Names that end up in object-store paths and Redis keys: no slashes, no "..", no leading dot.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(value: str, *, what: str) -> str:
    """Return `value` if it is a safe name for paths and keys; ValueError explaining the rule if not."""
    if not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit, without '..' or '/'"
        )
    return value


# A module name as the engine accepts it (fleet.job_spec.LoraSpec): letters, digits, '_' and '.'.
_MODULE_NAME = r"^[A-Za-z0-9_.]+$"
_ONE_TARGET = r"^([A-Za-z0-9_.]+|all-linear)$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # 1e999 parses as inf: refuse it


class SupervisedMethod(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    """OpenAI's `method` block; only supervised fine-tuning is offered."""

    type: Literal["supervised"] = Field(
        description="Fine-tuning method. Only 'supervised' is supported (no 'dpo' or 'reinforcement')."
    )
    supervised: SupervisedMethod | None = None


class LoraRequest(_Strict):
    """Our extension: the LoRA adapter to train. Omitted fields take fleet.job_spec.LoraSpec's defaults
    (target modules: the base model's linear layers); service.lora_request turns it into that spec."""

    r: Rank | None = Field(default=None, description="LoRA rank; at most the base model's max_rank.")
    alpha: Alpha | None = Field(default=None, description="Scale numerator α.")
    dropout: Dropout | None = None
    target_modules: list[str] | str | None = Field(
        default=None, description="Module names to adapt, one name, or 'all-linear'.",
        json_schema_extra={"anyOf": [{"type": "array", "minItems": 1,
                                      "items": {"type": "string", "pattern": _MODULE_NAME}},
                                     {"type": "string", "pattern": _ONE_TARGET}, {"type": "null"}]},
    )
    use_rslora: bool | None = Field(default=None, description="Scale by α/√r instead of α/r.")
    use_dora: bool | None = Field(default=None, description="Weight-decomposed LoRA (DoRA).")
    quantization: Quantization | None = Field(
        default=None, description="Base model quantization; default: the catalog entry's."
    )

    @field_validator("target_modules")
    @classmethod
    def _as_list(cls, value: list[str] | str | None) -> list[str] | None:
        if value is None:
            return None
        names = [value] if isinstance(value, str) else list(value)
        cleaned = [n.strip() for n in names]
        if any(not n for n in cleaned):
            raise ValueError("module names must be non-empty strings")
        return list(dict.fromkeys(cleaned))


def _upper_bound(model: type[BaseModel], field: str) -> int:
    """The `le` bound pydantic enforces on `model.field`, so the schema states the same limit."""
    return next(m.le for m in model.model_fields[field].metadata if getattr(m, "le", None) is not None)


# fleet.resources.Resources validates both forms; the schema says which two shapes it accepts.
_WORKERS = {"type": "integer", "minimum": 1, "maximum": _upper_bound(Resources, "workers")}
_PER_WORKER = {"type": "integer", "minimum": 1, "maximum": _upper_bound(Resources, "gpus_per_worker")}
RESOURCES_SCHEMA = {
    "anyOf": [
        {"type": "object", "title": "GPUs", "properties": {"gpus": _WORKERS}, "required": ["gpus"],
         "additionalProperties": False},
        {"type": "object", "title": "WorkersAndGPUs",
         "properties": {"workers": _WORKERS, "gpus_per_worker": _PER_WORKER}, "additionalProperties": False},
        {"type": "null"},
    ],
    "description": 'What the job asks the cluster for: {"gpus": N} (N workers of one GPU each) or '
                   '{"workers": W, "gpus_per_worker": G}. Default: the base model\'s, from the catalog.',
}


class JobCreateRequest(_Strict):
    """`POST /v1/fine_tuning/jobs`, as the OpenAI SDK sends it, plus `lora`, `resources`, `priority`
    and `rank_sweep` (fleet.sweeps)."""

    model: str = Field(min_length=1)
    training_file: str = Field(min_length=1, json_schema_extra={"pattern": FILE_ID_PATTERN})
    validation_file: str | None = Field(default=None, json_schema_extra={"pattern": FILE_ID_PATTERN})
    suffix: str | None = Field(default=None, max_length=64, json_schema_extra={"pattern": f"{NAME_PATTERN.pattern}|^$"})
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None
    integrations: list[dict] | None = None
    lora: LoraRequest | None = None
    resources: Resources | None = Field(default=None, json_schema_extra=RESOURCES_SCHEMA)
    priority: PriorityClass = Field(
        default="normal", description="Order among the tenant's own jobs: high ones start first, low ones are "
                                      "preempted first.",
    )
    rank_sweep: list[StrictInt] | None = Field(
        default=None, description="Train one child job per LoRA rank (2-8 distinct ranks, e.g. [8, 16, 32]) and "
                                  "publish only the best by validation loss (needs validation_file; omit lora.r).",
    )
    co_training: bool = Field(
        default=True, description="Whether the job may be co-trained with other jobs on the same base model, "
                                  "in one process holding one copy of the base (false: it always trains alone).",
    )

    @field_validator("resources", mode="before")
    @classmethod
    def _gpus_in_range(cls, value: object) -> object:
        # Resources turns {"gpus": N} into N workers; without this a bad N would be reported as 'workers'.
        if isinstance(value, dict) and "gpus" in value:
            gpus, most = value["gpus"], _upper_bound(Resources, "workers")
            if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= most:
                raise ValueError(f"'gpus' must be a whole number from 1 to {most} (got {gpus!r})")
        return value

    @field_validator("suffix")
    @classmethod
    def _safe_suffix(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return check_name(value, what="suffix")

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        problems = []
        if len(value) > METADATA_MAX_KEYS:
            problems.append(f"at most {METADATA_MAX_KEYS} keys are allowed (got {len(value)})")
        for key, item in value.items():
            if len(key) > METADATA_MAX_KEY_CHARS:
                problems.append(f"key {key[:20]!r}... is longer than {METADATA_MAX_KEY_CHARS} characters")
            if len(item) > METADATA_MAX_VALUE_CHARS:
                problems.append(f"value of {key!r} is longer than {METADATA_MAX_VALUE_CHARS} characters")
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[dict] | None) -> list[dict] | None:
        if value:
            raise ValueError("integrations (e.g. Weights & Biases) are not supported by this server")
        return None

    @model_validator(mode="after")
    def _one_place_for_hyperparameters(self) -> JobCreateRequest:
        nested = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        if nested is not None and self.hyperparameters is not None:
            raise ValueError(
                "give hyperparameters either in method.supervised.hyperparameters or in the older "
                "top-level hyperparameters, not both"
            )
        return self

    def effective_hyperparameters(self) -> Hyperparameters:
        """The hyperparameters wherever they were given (method block first), defaults otherwise."""
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


class TenantCreateRequest(_Strict):
    """`POST /v1/admin/tenants`."""

    name: str = Field(json_schema_extra={"pattern": NAME_PATTERN.pattern})

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        return check_name(value, what="tenant name")


class KeyCreateRequest(_Strict):
    """`POST /v1/admin/tenants/{id}/keys`."""

    role: Literal["member", "admin"] = "member"


class QuotaRequest(TenantQuota):
    """`PUT /v1/admin/tenants/{id}/quota`: the tenant's whole quota (omitted fields take their defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
