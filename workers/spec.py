"""TrainingSpec, the engine's validated description of one fine-tuning run, and the rules that resolve "auto".

Its `lora` and the limits of OpenAI's hyperparameters are the job's (fleet.job_spec); what is added
here (paths, the engine's optimisation knobs, checkpointing) only the engine sets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fleet.job_spec import Auto, Hyperparameters, LoraSpec

__all__ = [
    "AUTO_BASE_LEARNING_RATE",
    "ResolvedHyperparameters",
    "TrainingHyperparameters",
    "TrainingSpec",
    "lora_config",
    "resolve_hyperparameters",
]

# The learning rate that `learning_rate_multiplier` multiplies and the centre of the auto rule:
# the usual LoRA/QLoRA rate for 7B-class models with r = 8..64 (QLoRA paper, Axolotl, torchtune).
AUTO_BASE_LEARNING_RATE = 2e-4
# That rate is tuned at the width of those models. A narrower base gets a proportionally larger rate
# (muP: Adam's rate for hidden matrices scales as 1/width), up to 32x; a wider one keeps the base rate.
_AUTO_RATE_REFERENCE_HIDDEN_SIZE = 4096
_MAX_AUTO_WIDTH_FACTOR = 32.0

# OpenAI's published auto rule for n_epochs: aim for 3 epochs, but see at least 100 and at most
# 25 000 examples in total, never fewer than 1 or more than 25 epochs.
_TARGET_EPOCHS = 3
_MIN_TARGET_EXAMPLES = 100
_MAX_TARGET_EXAMPLES = 25_000
_MIN_AUTO_EPOCHS = 1
_MAX_AUTO_EPOCHS = 25

# OpenAI's auto batch size is ~0.2% of the training set, at most 256 examples. Ours counts
# sequences (packed blocks or padded examples) per optimizer step per worker, at most 16; what does
# not fit the device's memory in one micro-batch is accumulated (`max_micro_batch_sequences`).
_AUTO_BATCH_FRACTION = 0.002
_MAX_AUTO_BATCH_SEQUENCES = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingHyperparameters(Hyperparameters):
    """The job's hyperparameters (fleet.job_spec, OpenAI's three and their limits) plus the engine's own
    optimisation settings, which the API does not take. `learning_rate` may be "auto" (or None: the
    same) and is exclusive with a numeric `learning_rate_multiplier`, which scales the auto rate."""

    learning_rate: Annotated[float, Field(gt=0.0, le=1.0)] | Auto | None = None
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # caps optimizer steps; None: n_epochs decides

    @model_validator(mode="after")
    def _one_way_to_set_the_rate(self) -> TrainingHyperparameters:
        if self.learning_rate not in (None, "auto") and self.learning_rate_multiplier != "auto":
            raise ValueError(
                "set either learning_rate or learning_rate_multiplier, not both "
                "(the multiplier scales the auto learning rate)"
            )
        return self


def lora_config(lora: LoraSpec):  # -> lora_core.LoraConfig
    """The `lora_core.LoraConfig` a job's LoRA block describes: the one place the spec becomes the
    library's config (imported here, not at module level: lora_core pulls in torch)."""
    from lora_core import LoraConfig

    targets = lora.target_modules
    return LoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets),
                      use_rslora=lora.use_rslora, use_dora=lora.use_dora)


class TrainingSpec(_Strict):
    """Everything a worker needs to run one job. Paths are local to the worker."""

    base_model: Path
    quantization: Literal["nf4", "int8"] | None = None
    lora: LoraSpec = Field(default_factory=LoraSpec)
    hyperparameters: TrainingHyperparameters = Field(default_factory=TrainingHyperparameters)
    training_file: Path
    validation_file: Path | None = None
    init_adapter: Path | None = None  # continue training from this adapter dir (PEFT layout)
    # The datasets already tokenized (workers.pretokenized, written by the dispatcher's checks): the
    # ranks read them instead of tokenizing. None: each rank tokenizes the file itself.
    pretokenized_training_file: Path | None = None
    pretokenized_validation_file: Path | None = None
    max_seq_len: int = Field(1024, ge=16, le=131_072)
    packing: bool = True
    train_on_inputs: bool = False
    seed: int = Field(0, ge=0, le=2**31 - 1)
    eval_every_steps: int | None = Field(None, ge=1)  # None: evaluate once per epoch (if validation)
    early_stopping_patience: int | None = Field(None, ge=1)  # evaluations without improvement
    n_checkpoints: int = Field(1, ge=0, le=100)  # spread evenly over the run; the latest are kept
    gradient_checkpointing: bool = True
    bf16: bool = True  # autocast to bfloat16 on CUDA; ignored on CPU

    @model_validator(mode="after")
    def _paths_exist(self) -> TrainingSpec:
        problems = []
        if not self.base_model.is_dir():
            problems.append(f"base_model: {self.base_model} is not a directory with a model")
        if not self.training_file.is_file():
            problems.append(f"training_file: {self.training_file} does not exist")
        if self.validation_file is not None and not self.validation_file.is_file():
            problems.append(f"validation_file: {self.validation_file} does not exist")
        for name in ("pretokenized_training_file", "pretokenized_validation_file"):
            value = getattr(self, name)
            if value is not None and not value.is_file():
                problems.append(f"{name}: {value} does not exist")
        if self.pretokenized_validation_file is not None and self.validation_file is None:
            problems.append("pretokenized_validation_file: given without a validation_file")
        if self.init_adapter is not None and not (self.init_adapter / "adapter_config.json").is_file():
            problems.append(f"init_adapter: {self.init_adapter} has no adapter_config.json")
        if self.early_stopping_patience is not None and self.validation_file is None:
            problems.append("early_stopping_patience: needs a validation_file to watch")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class ResolvedHyperparameters:
    """The values a job actually trains with, after "auto" is resolved; reported back to the user."""

    n_epochs: int
    batch_size: int
    learning_rate: float
    gradient_accumulation_steps: int
    warmup_ratio: float
    warmup_steps: int
    lr_scheduler: str
    weight_decay: float
    max_grad_norm: float | None
    steps_per_epoch: int
    total_steps: int
    world_size: int

    @property
    def global_batch_sequences(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps * self.world_size

    def to_dict(self) -> dict:
        return asdict(self)


def _auto_epochs(n_train_examples: int) -> int:
    if n_train_examples * _TARGET_EPOCHS < _MIN_TARGET_EXAMPLES:
        return min(_MAX_AUTO_EPOCHS, max(_MIN_AUTO_EPOCHS, _MIN_TARGET_EXAMPLES // n_train_examples))
    if n_train_examples * _TARGET_EPOCHS > _MAX_TARGET_EXAMPLES:
        return max(_MIN_AUTO_EPOCHS, _MAX_TARGET_EXAMPLES // n_train_examples)
    return _TARGET_EPOCHS


def _auto_batch_size(n_train_sequences: int) -> int:
    # Largest power of two not above 0.2% of the sequences, in [1, 16].
    target = max(1.0, _AUTO_BATCH_FRACTION * n_train_sequences)
    return int(min(_MAX_AUTO_BATCH_SEQUENCES, 2 ** math.floor(math.log2(target))))


def _auto_learning_rate(global_batch_sequences: int, base_hidden_size: int | None) -> float:
    # Square-root scaling with the batch around 16 sequences, clamped to [0.5x, 2x] of the base rate.
    factor = min(2.0, max(0.5, math.sqrt(global_batch_sequences / 16)))
    if base_hidden_size is not None:
        factor *= min(_MAX_AUTO_WIDTH_FACTOR, max(1.0, _AUTO_RATE_REFERENCE_HIDDEN_SIZE / base_hidden_size))
    return AUTO_BASE_LEARNING_RATE * factor


def resolve_hyperparameters(
    spec: TrainingSpec,
    *,
    n_train_examples: int,
    n_train_tokens: int,
    n_train_sequences: int | None = None,
    world_size: int = 1,
    count_micro_batches: Callable[[int, int], Sequence[int]] | None = None,
    max_micro_batch_sequences: int | None = None,
    base_hidden_size: int | None = None,
) -> ResolvedHyperparameters:
    """Turn "auto" into numbers from the dataset's size (pure; see docs/training.md for the rules).

    `n_train_tokens` is the number of tokens after truncation; with packing it sets how many
    sequences of `max_seq_len` the data fills, which is what `batch_size` counts. A caller that has
    already packed the data passes the exact `n_train_sequences` instead of that estimate.
    `count_micro_batches(batch_size, n_epochs)`, when given, returns the exact number of global
    micro-batches of each epoch (the training loop plans them); the steps and warmup then follow
    from those counts instead of an estimate. It is called once.
    `max_micro_batch_sequences` (from workers.memory_plan: what fits the device) splits an "auto"
    batch that does not fit into micro-batches of a power of two sequences and accumulates them:
    the sequences per optimizer step, hence the learning rate, stay what the data asks for.
    `base_hidden_size` (the base model's width) scales an "auto" learning rate up for narrow models;
    None leaves it at the rate for 7B-class widths.
    """
    if n_train_examples < 1:
        raise ValueError("training_file: has no usable examples")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    hp = spec.hyperparameters
    if n_train_sequences is not None:
        n_sequences = max(1, n_train_sequences)
    elif spec.packing:
        n_sequences = max(1, math.ceil(n_train_tokens / spec.max_seq_len))
    else:
        n_sequences = n_train_examples

    n_epochs = _auto_epochs(n_train_examples) if hp.n_epochs == "auto" else hp.n_epochs
    batch_size = _auto_batch_size(n_sequences) if hp.batch_size == "auto" else hp.batch_size
    accumulation = hp.gradient_accumulation_steps
    if hp.batch_size == "auto" and max_micro_batch_sequences is not None and batch_size > max_micro_batch_sequences:
        micro = 2 ** math.floor(math.log2(max(1, max_micro_batch_sequences)))  # divides the power-of-two batch
        batch_size, accumulation = micro, accumulation * (batch_size // micro)
    global_batch = batch_size * accumulation * world_size
    if hp.learning_rate in (None, "auto"):
        multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
        learning_rate = _auto_learning_rate(global_batch, base_hidden_size) * multiplier
    else:
        learning_rate = float(hp.learning_rate)

    # A last partial step still counts: its loss is normalised by its own token count.
    if count_micro_batches is not None:
        epoch_steps = [math.ceil(n / accumulation) for n in count_micro_batches(batch_size, n_epochs)]
        steps_per_epoch, total_steps = max(1, epoch_steps[0]), sum(epoch_steps)
    else:
        steps_per_epoch = max(1, math.ceil(n_sequences / global_batch))
        total_steps = n_epochs * steps_per_epoch
    if hp.max_steps is not None:
        total_steps = min(total_steps, hp.max_steps)
    warmup_steps = math.floor(hp.warmup_ratio * total_steps)
    return ResolvedHyperparameters(
        n_epochs=n_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        gradient_accumulation_steps=accumulation,
        warmup_ratio=hp.warmup_ratio,
        warmup_steps=warmup_steps,
        lr_scheduler=hp.lr_scheduler,
        weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        world_size=world_size,
    )
