"""JobSpec: a job's training settings (LoRA, hyperparameters, quantization, resources, priority), typed once.

The API builds it from the request (service.routes.jobs), the job stores it as it is (`Job.spec`, JSON
in the job hash), the dispatcher maps it to the engine's TrainingSpec (workers.dispatcher) and the
engine builds its `lora_core.LoraConfig` from the LoRA block (workers.spec.lora_config). Every limit
on these fields is stated here and nowhere else; the request models in service.schemas reuse the
annotated types below.
No torch, no Ray: the API process imports this.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fleet.resources import PriorityClass, Resources

__all__ = [
    "ALL_LINEAR",
    "Auto",
    "Epochs",
    "BatchSize",
    "LearningRateMultiplier",
    "Rank",
    "Alpha",
    "Dropout",
    "Quantization",
    "OPENAI_HYPERPARAMETERS",
    "DEFAULT_TARGET_MODULES",
    "Hyperparameters",
    "LoraSpec",
    "JobSpec",
]

Auto = Literal["auto"]
ALL_LINEAR = "all-linear"

# Limits. Where the API's and the engine's models disagreed, the tighter one is kept: OpenAI's
# published maxima (n_epochs ≤ 50, batch_size ≤ 256), which every job the API accepted already met.
Epochs = Annotated[int, Field(ge=1, le=50)]
BatchSize = Annotated[int, Field(ge=1, le=256)]  # sequences per micro-batch per worker
LearningRateMultiplier = Annotated[float, Field(gt=0, le=100)]
Rank = Annotated[int, Field(gt=0, le=1024)]  # and at most the base model's max_rank (fleet.catalog)
Alpha = Annotated[float, Field(gt=0)]
Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]
Quantization = Literal["nf4", "int8", "none"]

OPENAI_HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
# Every linear layer of a Llama-style block: the engine's default when a job names no target modules
# and the API could not read the base model's layer names.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # 1e999 parses as inf


class Hyperparameters(_Strict):
    """OpenAI's supervised hyperparameters; each may be "auto" (the engine picks from the dataset).

    This is both the request's `hyperparameters` / `method.supervised.hyperparameters` block and what
    the job stores; the engine's own knobs (warmup, schedule, ...) extend it in workers.spec.
    """

    n_epochs: Epochs | Auto = "auto"
    batch_size: BatchSize | Auto = "auto"
    learning_rate_multiplier: LearningRateMultiplier | Auto = "auto"


class LoraSpec(_Strict):
    """The adapter's shape: the fields of `lora_core.LoraConfig` a job sets."""

    r: Rank = 8
    alpha: Alpha = 16.0
    dropout: Dropout = 0.05
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1
    )
    use_rslora: bool = False
    use_dora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _names_are_plain(cls, names: list[str] | str) -> list[str] | str:
        if isinstance(names, str):
            return names
        bad = [n for n in names if not n or not n.replace("_", "").replace(".", "").isalnum()]
        if bad:
            raise ValueError(f"module names must be plain identifiers like 'q_proj', got {bad}")
        return names


class JobSpec(_Strict):
    """How a job trains and what it asks the cluster for; stored on the job as it is.

    `quantization` None means the base model's catalog default, resolved by the dispatcher (the API
    always resolves it at submit; a job created directly through fleet may leave it open).
    `co_training` False keeps the job out of co-training groups: it always trains alone.
    """

    lora: LoraSpec = Field(default_factory=LoraSpec)
    quantization: Quantization | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    resources: Resources = Field(default_factory=Resources)
    priority: PriorityClass = "normal"
    # May the scheduler train it in one process with other jobs on the same base (docs/scheduling.md)?
    co_training: bool = True

    def lora_block(self) -> dict[str, Any]:
        """The job object's and the adapter manifest's `lora` dict: LoraSpec's fields plus `quantization`."""
        block = self.lora.model_dump(mode="json")
        if self.quantization is not None:
            block["quantization"] = self.quantization
        return block

    @classmethod
    def from_legacy_fields(cls, *, hyperparameters: dict[str, Any] | None, lora: dict[str, Any] | None,
                           method: dict[str, Any] | None, resources: Any = None,
                           priority: str | None = None) -> JobSpec:
        """The spec of a job stored by a version before JobSpec: its `hyperparameters`, `lora` and `method`
        dicts (and `resources`, `priority` as they were stored beside them).

        The method block's hyperparameters win over the top-level ones (they were written equal). Only
        OpenAI's three are read: a finished job's `hyperparameters` were replaced by the values used,
        which also carry the engine's (learning_rate, warmup_steps, ...).
        """
        nested = ((method or {}).get("supervised") or {}).get("hyperparameters")
        given = nested if nested is not None else (hyperparameters or {})
        lora = dict(lora or {})
        quantization = lora.pop("quantization", None)
        fields: dict[str, Any] = {
            "lora": {k: v for k, v in lora.items() if k in LoraSpec.model_fields},
            "quantization": quantization,
            "hyperparameters": {k: v for k, v in given.items() if k in OPENAI_HYPERPARAMETERS},
        }
        if resources is not None:
            fields["resources"] = resources
        if priority is not None:
            fields["priority"] = priority
        return cls.model_validate(fields)
