"""The training loop, written out in one place: setup → train → save (torchtune-recipe style, no Trainer).

One optimizer step takes `gradient_accumulation_steps` micro-batches on every rank. Its loss is
the sum of per-token cross-entropies divided by the number of loss tokens of the whole step on all
ranks (all-reduced before the backward passes), so every target token weighs the same whatever the
accumulation, the ranks or the padding. Logits are computed only at positions that carry loss, a
chunk of positions at a time (workers/token_loss.py): with a large vocabulary the (tokens × vocab)
logits would be most of the memory and much of the time.

`train()` runs alone, or as one rank of a torch.distributed group (workers/ray_train.py sets that
up and passes a `Runtime`); only rank 0 writes files and talks to the Reporter. Its pieces (setup_job,
planned_steps, end_step, after_step, end) are also what workers/cotrain.py runs for each job of a
group co-trained on one base, so a job behaves the same alone and in a group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from workers.attention import use_varlen_attention
from workers.checkpoints import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    write_checkpoint,
)
from workers.datasets import read_examples
from workers.memory_plan import DecoderShape, plan_micro_batch, query_size
from workers.packing import Batch, DataPosition, count_batches, make_batches, plan_epoch
from workers.pretokenized import key_for, read_pretokenized
from workers.reporting import Control, Reporter
from workers.reporting_thread import ThreadedReporter
from workers.schedule import lr_lambda
from workers.spec import ResolvedHyperparameters, TrainingSpec, lora_config, resolve_hyperparameters
from workers.token_loss import TokenLoss
from workers.tokenization import TokenizedExample, tokenize_dataset

logger = logging.getLogger(__name__)

__all__ = [
    # one job
    "Runtime",
    "TrainState",
    "TrainingResult",
    "rank_seed",
    "train",
    # the pieces of train() that workers/cotrain.py runs per job of a group
    "JobRun",
    "Progress",
    "StepCounts",
    "add_job_adapter",
    "after_step",
    "begin",
    "claim_device",
    "end",
    "end_step",
    "initial_state",
    "load_base",
    "micro_batch_dropout_seed",
    "planned_steps",
    "route",
    "setup_job",
    "step_counts",
    "uses_bf16",
]

Status = Literal["succeeded", "cancelled", "paused"]
_CONTROL_CODES: dict[Control, int] = {None: 0, "cancel": 1, "pause": 2}
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Runtime:
    """How this process takes part in a run: alone (the default) or as one rank of a process group.

    `on_checkpoint(step, path, metrics)` is called on every rank each time a checkpoint is written
    (`path` is None except on rank 0); Ray Train uses it to report the checkpoint.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    on_checkpoint: Callable[[int, Path | None, dict[str, float]], None] | None = None
    # spec.bf16 applies on CUDA only (CPU bf16 kernels are slow without AMX); True takes the same
    # path on a CPU (bf16 base, bf16 autocast), which is how the tests exercise the GPU precision path.
    bf16_on_cpu: bool = False
    # "varlen": attention by segment lengths (workers/attention.py); "dense_mask": the block-diagonal
    # (B, 1, T, T) mask with transformers' sdpa, kept as the reference the tests and bench compare with.
    attention: Literal["varlen", "dense_mask"] = "varlen"
    # A stand-in for a device's memory on a CPU: a micro-batch of more tokens (rows × width) raises
    # torch.OutOfMemoryError in the step, as a too-large micro-batch does on a GPU; it exists so that
    # tests can run the real out-of-memory back-off. None (the default): no such limit.
    max_micro_batch_tokens: int | None = None
    # Steps between reads of the metrics back to the host (one read per interval) and checks of
    # control(); None: 10 on CUDA, where each read makes the host wait for the device, else 1.
    log_every_steps: int | None = None
    # Deliver log/metrics/checkpoint from a background thread (workers/reporting_thread.py), so the
    # reporter's round trips never stall a step; None: on CUDA.
    report_in_background: bool | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainingResult:
    """What a run produced. `adapter_dir` is set when status is "succeeded"; `checkpoint` when "paused"."""

    status: Status
    step: int
    total_steps: int
    adapter_dir: Path | None
    checkpoint: Path | None
    checkpoints: list[Path]
    metrics: dict[str, float]  # final: train_loss, val_loss, val_token_accuracy, ...
    hyperparameters: dict[str, Any]  # ResolvedHyperparameters.to_dict(): the values actually used
    history: list[dict[str, float]] = field(default_factory=list)  # evaluation rows
    stopped_early: bool = False
    best_step: int | None = None
    tokens_trained: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("adapter_dir", "checkpoint"):
            out[key] = str(out[key]) if out[key] is not None else None
        out["checkpoints"] = [str(p) for p in self.checkpoints]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingResult:
        data = dict(data)
        for key in ("adapter_dir", "checkpoint"):
            data[key] = Path(data[key]) if data[key] is not None else None
        data["checkpoints"] = [Path(p) for p in data["checkpoints"]]
        return cls(**data)


# ------------------------------------------------------------------------------------------- state


@dataclass
class BestEvaluation:
    """The lowest validation loss so far; its adapter weights are kept only when early stopping is on."""

    val_loss: float = math.inf
    step: int | None = None
    bad_evals: int = 0
    weights: dict[str, torch.Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"val_loss": self.val_loss, "step": self.step, "bad_evals": self.bad_evals, "weights": self.weights}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BestEvaluation:
        return cls(**data)


@dataclass
class TrainState:
    """Where a run stands: with the adapter, optimizer, scheduler and RNG, exactly what a checkpoint holds."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)  # the next global micro-batch
    tokens_trained: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # evaluation rows
    best: BestEvaluation = field(default_factory=BestEvaluation)
    metrics: dict[str, float] = field(default_factory=dict)  # the last step's (or evaluation's)
    stopped_early: bool = False
    # The current split of a step into micro-batches: the resolved values, until an out-of-memory
    # error halves the micro-batch and doubles the accumulation (the rows of a step stay the same).
    batch_size: int = 0
    gradient_accumulation_steps: int = 0


@dataclass(frozen=True)
class _Data:
    """The tokenized examples and the plan made from them, fixed for the run."""

    train_examples: list[TokenizedExample]
    val_examples: list[TokenizedExample]
    hp: ResolvedHyperparameters  # total_steps and warmup_steps from the exact plan
    micro_per_epoch: list[int]  # global micro-batches in each epoch
    batch_args: dict[str, Any]  # make_batches arguments other than the examples and position


@dataclass(frozen=True)
class JobRun:
    """Everything set up once and only read while training: the spec, data, model and optimizer."""

    spec: TrainingSpec
    runtime: Runtime
    device: torch.device
    output_dir: Path
    say: Reporter | None  # the reporter on rank 0, None elsewhere
    data: _Data
    model: nn.Module
    loss_module: nn.Module  # TokenLoss, wrapped in DDP when world_size > 1
    params: list[nn.Parameter]  # the adapter's trainable parameters
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    autocast: Callable[[], contextlib.AbstractContextManager]
    adapter_name: str = "default"  # this job's adapter on `model` (a co-trained model holds several)

    @property
    def hp(self) -> ResolvedHyperparameters:
        return self.data.hp

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"


# ------------------------------------------------------------------------------------------- setup


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s random stream (dropout): distinct per rank, a pure function of both."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def micro_batch_dropout_seed(seed: int, rank: int, position: DataPosition) -> int:
    """The dropout seed of the micro-batch at `position` (lora_core.TokenRoute): a pure function of the job's
    seed, the rank and the data position, so that a resumed or co-trained run draws the same masks."""
    return int(np.random.SeedSequence([seed, rank, position.epoch, position.batch_index]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tokenize(
    path: Path, tokenizer: Any, spec: TrainingSpec, pretokenized: Path | None, say: Reporter | None
) -> list[TokenizedExample]:
    """The examples of dataset `path`: read from `pretokenized` when the dispatcher stored them (its
    key must match this file, tokenizer and options), else tokenized here."""
    if pretokenized is not None:
        key = key_for(path, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=spec.train_on_inputs)
        examples = read_pretokenized(pretokenized, key)
        if say:
            say.log(f"read {len(examples)} pre-tokenized examples of {path.name} from {pretokenized.name}")
    else:
        records = read_examples(path)
        examples = tokenize_dataset(
            records, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=spec.train_on_inputs
        )
    return [e for e in examples if len(e) >= 2]


def _setup_data(
    spec: TrainingSpec,
    runtime: Runtime,
    say: Reporter | None,
    mask_dtype: torch.dtype,
    max_micro_batch_sequences: int | None = None,
    base_hidden_size: int | None = None,
) -> _Data:
    """Tokenize (or read the pre-tokenized examples), plan the epochs and resolve the hyperparameters
    (total steps and warmup, once)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples = _tokenize(spec.training_file, tokenizer, spec, spec.pretokenized_training_file, say)
    if not train_examples:
        raise ValueError(f"training_file: {spec.training_file} has no example with at least 2 tokens")
    val_examples = (
        _tokenize(spec.validation_file, tokenizer, spec, spec.pretokenized_validation_file, say)
        if spec.validation_file
        else []
    )
    lengths = [len(e) for e in train_examples]
    n_rows = sum(
        len(mb)
        for mb in plan_epoch(
            lengths, block_len=spec.max_seq_len, batch_size=1, packing=spec.packing, seed=spec.seed
        )
    )
    planned: list[int] = []

    def count_micro_batches(batch_size: int, n_epochs: int) -> list[int]:
        # Global micro-batches in each epoch (packing makes the count vary a little between epochs).
        planned[:] = [
            count_batches(
                lengths,
                block_len=spec.max_seq_len,
                batch_size=batch_size,
                packing=spec.packing,
                seed=spec.seed,
                epoch=epoch,
                world_size=runtime.world_size,
            )
            for epoch in range(n_epochs)
        ]
        return planned

    hp = resolve_hyperparameters(
        spec,
        n_train_examples=len(train_examples),
        n_train_tokens=sum(lengths),
        n_train_sequences=n_rows,
        world_size=runtime.world_size,
        count_micro_batches=count_micro_batches,
        max_micro_batch_sequences=max_micro_batch_sequences,
        base_hidden_size=base_hidden_size,
    )
    if say:
        say.log(
            f"{len(train_examples)} training examples ({sum(lengths)} tokens, {n_rows} sequences), "
            f"{len(val_examples)} validation examples; hyperparameters: {hp.to_dict()}"
        )
    batch_args = dict(
        block_len=spec.max_seq_len,
        batch_size=hp.batch_size,
        packing=spec.packing,
        pad_id=pad_id,
        seed=spec.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        block_mask="varlen" if runtime.attention == "varlen" else "4d",
        mask_dtype=mask_dtype,
    )
    return _Data(train_examples, val_examples, hp, planned, batch_args)


def _build_model(
    spec: TrainingSpec, device: torch.device, compute_dtype: torch.dtype, attention: str = "varlen"
) -> nn.Module:
    model = load_base(spec, device, compute_dtype, attention)
    add_job_adapter(model, spec, "default")
    return model


def load_base(
    spec: TrainingSpec, device: torch.device, compute_dtype: torch.dtype, attention: str = "varlen"
) -> nn.Module:
    """The frozen base model of `spec` on `device`, prepared for training (no adapter yet)."""
    from lora_core import load_base_model, prepare_for_training

    # Straight onto this rank's device, dense or quantized: no CPU copy first, never spread over GPUs.
    model = load_base_model(
        str(spec.base_model), quantization=spec.quantization, compute_dtype=compute_dtype, device=device
    )
    model = prepare_for_training(model, gradient_checkpointing=spec.gradient_checkpointing)
    if attention == "varlen":
        use_varlen_attention(model)
    return model


def add_job_adapter(model: nn.Module, spec: TrainingSpec, adapter_name: str) -> None:
    """Add the job's adapter to `model` and make it active: initialised from `spec.seed` alone (the global
    RNG is seeded right before, so it does not matter what else the model holds), or `spec.init_adapter`."""
    from lora_core import add_adapter, read_adapter_config, set_active_adapter

    _seed_everything(spec.seed)  # the adapter's initial weights
    if spec.init_adapter is not None:
        # Continue a published adapter: its own shape wins over spec.lora, its weights are the start.
        add_adapter(model, read_adapter_config(spec.init_adapter), adapter_name)
        _load_lora_weights(model, spec.init_adapter, adapter_name)
    else:
        add_adapter(model, lora_config(spec.lora), adapter_name)
    set_active_adapter(model, adapter_name)


def _load_lora_weights(model: nn.Module, adapter_dir: Path, adapter_name: str = "default") -> None:
    from lora_core import set_lora_state_dict

    set_lora_state_dict(model, load_file(str(adapter_dir / _ADAPTER_WEIGHTS)), adapter_name)


def claim_device(runtime: Runtime) -> torch.device:
    """This rank's device (its own GPU under Ray), made current on CUDA, with TF32 allowed there."""
    device = runtime.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)  # NCCL and bitsandbytes use the current device
        # fp32 matmuls outside autocast (a job with bf16 off) may use TF32 tensor cores.
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    return device


def _max_micro_batch_sequences(
    spec: TrainingSpec, model: nn.Module, device: torch.device, compute_dtype: torch.dtype, say: Reporter | None
) -> int | None:
    """On CUDA, the sequences of max_seq_len tokens that one micro-batch may hold (workers/memory_plan.py)."""
    if device.type != "cuda":
        return None  # host memory is not planned; a CPU run takes the data's batch size
    frozen = [t for t in (*model.parameters(), *model.buffers()) if not t.requires_grad]
    plan = plan_micro_batch(
        device_bytes=torch.cuda.get_device_properties(device).total_memory,
        weights_bytes=sum(t.numel() * t.element_size() for t in frozen),
        n_adapter_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        shape=DecoderShape.from_config(model.config),
        activation_bytes=torch.finfo(compute_dtype).bits // 8,
        gradient_checkpointing=spec.gradient_checkpointing,
        quantization=spec.quantization,
        q_size=query_size(model.config),
    )
    if say:
        say.log(f"memory plan: {plan}; at most {plan.max_sequences(spec.max_seq_len)} sequences per micro-batch")
    return plan.max_sequences(spec.max_seq_len)


def uses_bf16(spec: TrainingSpec, runtime: Runtime, device: torch.device) -> bool:
    return spec.bf16 and (device.type == "cuda" or runtime.bf16_on_cpu)


def _setup(
    spec: TrainingSpec, output_dir: Path, reporter: Reporter | None, runtime: Runtime
) -> JobRun:
    """Data, model (adapters in fp32, DDP-wrapped on several ranks), optimizer and schedule."""
    device = claim_device(runtime)
    compute_dtype = torch.bfloat16 if uses_bf16(spec, runtime, device) else torch.float32
    model = _build_model(spec, device, compute_dtype, runtime.attention)
    return setup_job(spec, output_dir, reporter, runtime, device, model, "default")


def setup_job(
    spec: TrainingSpec,
    output_dir: Path,
    reporter: Reporter | None,
    runtime: Runtime,
    device: torch.device,
    model: nn.Module,
    adapter_name: str,
    loss_module: TokenLoss | None = None,
) -> JobRun:
    """A job's run on `model`, which holds its adapter `adapter_name`: data, optimizer and schedule.

    `loss_module` (a TokenLoss over `model`) is shared by the jobs co-trained on one model; None: a new one.
    """
    from lora_core import adapter_parameters

    say = reporter if (runtime.is_main and reporter is not None) else None
    use_bf16 = uses_bf16(spec, runtime, device)
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
    max_micro = _max_micro_batch_sequences(spec, model, device, compute_dtype, say)
    data = _setup_data(spec, runtime, say, mask_dtype=compute_dtype, max_micro_batch_sequences=max_micro,
                       base_hidden_size=getattr(model.config, "hidden_size", None))
    _seed_everything(rank_seed(spec.seed, runtime.rank))  # each rank's own stream (dropout has its own seeds)
    params = adapter_parameters(model, adapter_name)
    for param in params:
        # Adapter weights and their AdamW state stay fp32 under bf16 autocast (as PEFT does by default):
        # bf16 updates of lr * m / sqrt(v) round away at small learning rates.
        param.data = param.data.float()
    loss_module = loss_module if loss_module is not None else TokenLoss(model)
    if runtime.world_size > 1:
        frozen = [n for n, p in loss_module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in loss_module.named_buffers()]
        # Only adapters are trained: do not broadcast or bucket the frozen (possibly 4-bit) base.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module, frozen)
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    hp = data.hp
    # One fused kernel for the whole update instead of a dozen per-tensor ops per step; it also keeps
    # the step count off the host (the unfused AdamW reads it back with .item() for every parameter).
    optimizer = torch.optim.AdamW(
        params, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=device.type in ("cuda", "cpu")
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_steps=hp.warmup_steps, total_steps=hp.total_steps, kind=hp.lr_scheduler)
    )

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    return JobRun(
        spec=spec,
        runtime=runtime,
        device=device,
        output_dir=output_dir,
        say=say,
        data=data,
        model=model,
        loss_module=loss_module,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        autocast=autocast,
        adapter_name=adapter_name,
    )


def _restore(run: JobRun, resume_from: Path, fresh: TrainState) -> TrainState:
    """Load a checkpoint's adapter, optimizer, schedule and RNG into `run`; return its TrainState."""
    ckpt = load_checkpoint(Path(resume_from))
    _load_lora_weights(run.model, ckpt.adapter_dir, run.adapter_name)
    run.optimizer.load_state_dict(ckpt.training_state["optimizer"])
    run.scheduler.load_state_dict(ckpt.training_state["scheduler"])
    restore_rng_state(ckpt.rng_state(run.runtime.rank, run.runtime.world_size))
    state = TrainState(
        step=ckpt.step,
        position=DataPosition.from_dict(ckpt.trainer_state["position"]),
        tokens_trained=int(ckpt.trainer_state["tokens_trained"]),
        history=list(ckpt.trainer_state["history"]),
        best=BestEvaluation.from_dict(ckpt.training_state["best"]),
        batch_size=fresh.batch_size,
        gradient_accumulation_steps=fresh.gradient_accumulation_steps,
    )
    split = ckpt.trainer_state.get("micro_batch")  # absent before the out-of-memory back-off existed
    if split is not None:
        state.batch_size, state.gradient_accumulation_steps = split["batch_size"], split["gradient_accumulation_steps"]
    if run.say:
        run.say.log(f"resumed from {ckpt.path} at step {state.step} ({state.position})")
    return state


# -------------------------------------------------------------------------------- step, evaluation


def _on_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (copied without waiting for the device); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _batch_loss(run: JobRun, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ token loss, n_correct) of one micro-batch on the run's device."""
    positions = batch.loss_positions.to(run.device, non_blocking=True) if batch.loss_positions is not None else None
    return run.loss_module(_on_device(batch.inputs, run.device), positions)


def _all_reduce_sum(values: list[float], runtime: Runtime, device: torch.device) -> list[float]:
    if runtime.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _agreed_control(reporter: Reporter | None, runtime: Runtime, device: torch.device) -> Control:
    """Rank 0 asks the reporter; every rank gets the same answer, so DDP ranks stop together."""
    answer = reporter.control() if (runtime.is_main and reporter is not None) else None
    if answer not in _CONTROL_CODES:
        raise ValueError(f"Reporter.control() must return None, 'cancel' or 'pause', got {answer!r}")
    if runtime.world_size == 1:
        return answer
    code = torch.tensor([_CONTROL_CODES[answer]], dtype=torch.int64, device=device)
    dist.broadcast(code, src=0)
    return {v: k for k, v in _CONTROL_CODES.items()}[int(code.item())]


def _grouped(batches: Iterator[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of `size` micro-batches of one epoch; the last group may be shorter."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


@dataclass(frozen=True)
class _StepRecord:
    """A finished step's metrics before they are read back: host values, and device values read later."""

    step: int
    epoch: float
    learning_rate: float
    ended: float  # time.perf_counter() when the step's work was queued
    device_values: torch.Tensor  # (4,) float64: Σ loss, loss tokens, tokens (all ranks), gradient norm


def route(run: JobRun, batch: Batch | None, start: int = 0, end: int | None = None):  # -> lora_core.TokenRoute
    """Where the job's adapter applies in a forward pass, and its dropout seed for training micro-batch `batch`
    (None: evaluation, no dropout)."""
    from lora_core import TokenRoute

    seed = None if batch is None else micro_batch_dropout_seed(run.spec.seed, run.runtime.rank, batch.position)
    return TokenRoute(start, end, dropout_seed=seed)


def _routed(run: JobRun, batch: Batch | None) -> contextlib.AbstractContextManager:
    """The job's adapter alone on every token of the pass (forward and, under checkpointing, backward)."""
    from lora_core import route_tokens

    return route_tokens(run.model, {run.adapter_name: route(run, batch)})


@dataclass
class StepCounts:
    """A step's token counts (on the device) and the factor its summed loss is multiplied by before backward."""

    counts: torch.Tensor  # (2,) float64: loss tokens, tokens (all ranks)
    scale: float | torch.Tensor


def step_counts(run: JobRun, micro: list[Batch]) -> StepCounts:
    """Normalise by the step's loss tokens on all ranks, so that the gradient is the mean over every
    target token of the global batch; DDP then averages over ranks, hence * world_size."""
    runtime = run.runtime
    n_loss_local = sum(b.n_loss_tokens for b in micro)
    counts = torch.tensor([float(n_loss_local), float(sum(b.n_tokens for b in micro))], dtype=torch.float64)
    counts = counts.to(run.device, non_blocking=True)
    if runtime.world_size == 1:
        return StepCounts(counts, 1.0 / max(n_loss_local, 1))
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)  # stays on the device: nobody waits for it here
    return StepCounts(counts, (runtime.world_size / counts[0].clamp(min=1.0)).float())


def _train_step(run: JobRun, state: TrainState, micro: list[Batch]) -> _StepRecord:
    """One optimizer step over the micro-batches `micro`; advances `state`'s step and position.

    Nothing is read back from the device here: the loss, token counts and gradient norm stay device
    tensors in the returned record (read with the other steps of the logging interval, `_read_records`).
    """
    runtime = run.runtime
    counts = step_counts(run, micro)
    loss_total = torch.zeros((), dtype=torch.float64, device=run.device)  # summed on device: no sync
    for i, batch in enumerate(micro):
        _check_token_cap(runtime, batch)
        sync = i == len(micro) - 1 or runtime.world_size == 1
        with run.loss_module.no_sync() if not sync else contextlib.nullcontext(), _routed(run, batch):
            with run.autocast():
                loss_sum, _ = _batch_loss(run, batch)
            (loss_sum * counts.scale).backward()
        loss_total += loss_sum.detach()
    return end_step(run, state, micro, loss_total, counts)


def end_step(
    run: JobRun, state: TrainState, micro: list[Batch], loss_total: torch.Tensor, counts: StepCounts
) -> _StepRecord:
    """The optimizer step once the gradients of every micro-batch of `micro` are in; advances `state`."""
    runtime, hp = run.runtime, run.hp
    if hp.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, hp.max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.params]))
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if runtime.world_size > 1:
        dist.all_reduce(loss_total, op=dist.ReduceOp.SUM)

    state.step += 1
    state.position = micro[-1].next_position
    per_epoch = run.data.micro_per_epoch[min(state.position.epoch, hp.n_epochs - 1)]
    epoch_fraction = state.position.batch_index * state.batch_size / (per_epoch * hp.batch_size)
    values = torch.stack([loss_total, counts.counts[0], counts.counts[1], grad_norm.detach().to(torch.float64)])
    return _StepRecord(state.step, state.position.epoch + epoch_fraction, lr, time.perf_counter(), values)


def _read_records(
    run: JobRun, state: TrainState, records: list[_StepRecord], started: float, tokens_at_start: int
) -> list[dict[str, float]]:
    """The metrics rows of `records`, read back from the device at once; updates state.tokens_trained."""
    rows = []
    for record, (loss, n_loss, n_tokens, grad_norm) in zip(
        records, torch.stack([r.device_values for r in records]).tolist(), strict=True  # the one host read
    ):
        state.tokens_trained += int(n_tokens)
        elapsed = record.ended - started
        rows.append({
            "step": record.step,
            "total_steps": run.hp.total_steps,
            "epoch": record.epoch,
            "train_loss": loss / max(n_loss, 1.0),
            "learning_rate": record.learning_rate,
            "grad_norm": grad_norm,
            "tokens_trained": state.tokens_trained,
            "tokens_per_s": (state.tokens_trained - tokens_at_start) / elapsed if elapsed > 0 else 0.0,
        })
    return rows


def _check_token_cap(runtime: Runtime, batch: Batch) -> None:
    """Raise torch.OutOfMemoryError for a micro-batch above `Runtime.max_micro_batch_tokens` (the CPU stand-in)."""
    cap, n = runtime.max_micro_batch_tokens, batch.inputs["input_ids"].numel()
    if cap is not None and n > cap:
        raise torch.OutOfMemoryError(f"micro-batch of {n} tokens > Runtime.max_micro_batch_tokens={cap}")


def _train_step_or_back_off(run: JobRun, state: TrainState, micro: list[Batch]) -> _StepRecord | None:
    """`_train_step`; or, when it runs out of memory, split the micro-batch further and return None.

    The step is then retried from its first micro-batch by the caller, with micro-batches of
    batch_size / f rows and f times the accumulation (f the smallest prime factor of batch_size, 2 for
    the usual powers of two): the same rows per step, so the same loss up to rounding. Alone only: on
    several ranks one rank cannot change the split without the others, so the error ends the attempt.
    """
    try:
        return _train_step(run, state, micro)
    except torch.OutOfMemoryError as error:
        if run.runtime.world_size > 1:
            raise
        if state.batch_size == 1:
            raise one_sequence_does_not_fit(run, error) from error
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    # Outside the except block: the traceback, and the activations its frames hold, are released.
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    back_off(run, state, reason)
    return None


def one_sequence_does_not_fit(run: JobRun, error: object) -> torch.OutOfMemoryError:
    """The error of a step that runs out of memory with one sequence per micro-batch: what to change."""
    return torch.OutOfMemoryError(
        f"{error} — even one sequence of up to max_seq_len={run.spec.max_seq_len} tokens per micro-batch "
        "does not fit: lower max_seq_len, quantize the base (quantization 'nf4') or keep "
        "gradient_checkpointing on"
    )


def back_off(run: JobRun, state: TrainState, reason: str) -> None:
    """Split the micro-batch (state.batch_size > 1) by its smallest prime factor after an out-of-memory
    error (`reason`), keeping the rows of a step; the step is to be retried from its first micro-batch
    (`planned_steps` re-plans it). The caller has dropped the step's gradients."""
    factor = next(f for f in range(2, state.batch_size + 1) if state.batch_size % f == 0)
    state.batch_size //= factor
    state.gradient_accumulation_steps *= factor
    state.position = DataPosition(state.position.epoch, state.position.batch_index * factor)
    if run.say:
        run.say.log(
            f"out of memory at step {state.step + 1} ({reason}): retrying it with micro-batches of "
            f"{state.batch_size} sequences and {state.gradient_accumulation_steps} accumulation steps",
            "warning",
        )


def _evaluate(run: JobRun, batch_size: int) -> dict[str, float]:
    """Validation loss and token accuracy over every rank's share of the validation set."""
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss, correct: read once at the end
    n_tokens = 0
    run.loss_module.eval()
    try:
        with torch.no_grad(), run.autocast(), _routed(run, None):
            batch_args = {**run.data.batch_args, "batch_size": batch_size}  # as training's, after any back-off
            for batch in make_batches(run.data.val_examples, shuffle=False, **batch_args):
                loss_sum, n_correct = _batch_loss(run, batch)
                sums += torch.stack([loss_sum.to(torch.float64), n_correct.to(torch.float64)])
                n_tokens += batch.n_loss_tokens
    finally:
        run.loss_module.train()
    loss_total, correct_total, n_total = _all_reduce_sum([*sums.tolist(), float(n_tokens)], run.runtime, run.device)
    n_total = max(n_total, 1.0)
    return {"val_loss": loss_total / n_total, "val_token_accuracy": correct_total / n_total}


def _eval_is_due(run: JobRun, state: TrainState) -> bool:
    every = run.spec.eval_every_steps
    end_of_epoch = state.position.batch_index == 0
    return bool(run.data.val_examples) and (
        (every is not None and state.step % every == 0)
        or (every is None and end_of_epoch)
        or state.step == run.hp.total_steps
    )


def _record_evaluation(run: JobRun, state: TrainState, *, track_best: bool = True) -> None:
    """Evaluate, add the row to the history and the metrics, and update the best / early stopping."""
    from lora_core import lora_state_dict

    evaluation = _evaluate(run, state.batch_size)
    state.metrics.update(evaluation)
    state.history.append({"step": state.step, **evaluation})
    if not track_best:
        return
    best, patience = state.best, run.spec.early_stopping_patience
    if evaluation["val_loss"] < best.val_loss:
        best.val_loss, best.step, best.bad_evals = evaluation["val_loss"], state.step, 0
        if patience is not None:
            best.weights = {k: v.detach().clone() for k, v in lora_state_dict(run.model, run.adapter_name).items()}
    else:
        best.bad_evals += 1
        state.stopped_early = patience is not None and best.bad_evals >= patience


# ------------------------------------------------------------------------------------- save, finish


def _gather_rng_states(run: JobRun) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order, on rank 0 (empty elsewhere), so each rank's stream resumes."""
    own = capture_rng_state()
    if run.runtime.world_size == 1:
        return [own]
    gathered: list[Any] | None = [None] * run.runtime.world_size if run.runtime.is_main else None
    dist.gather_object(own, gathered, dst=0)
    return gathered or []


def _save_checkpoint(run: JobRun, state: TrainState) -> Path | None:
    """Write a checkpoint of `state` (rank 0) and tell `runtime.on_checkpoint` (every rank)."""
    from lora_core import save_adapter

    rng_states = _gather_rng_states(run)
    path = None
    if run.runtime.is_main:
        path = write_checkpoint(
            run.checkpoints_dir,
            step=state.step,
            save_adapter_to=lambda d: save_adapter(
                run.model, d, adapter_name=run.adapter_name, base_model_name_or_path=str(run.spec.base_model)
            ),
            training_state={
                "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(),
                "best": state.best.to_dict(),
            },
            rng_states=rng_states,
            trainer_state={
                "position": state.position.to_dict(),
                "history": state.history,
                "tokens_trained": state.tokens_trained,
                "hyperparameters": run.hp.to_dict(),
                "micro_batch": {
                    "batch_size": state.batch_size,
                    "gradient_accumulation_steps": state.gradient_accumulation_steps,
                },
                "metrics": state.metrics,
            },
        )
        prune_checkpoints(run.checkpoints_dir, keep=max(run.spec.n_checkpoints, 1) + 1)
        if run.say:
            run.say.checkpoint(state.step, path)
    if run.runtime.on_checkpoint is not None:
        run.runtime.on_checkpoint(state.step, path, state.metrics)
    return path


def _finish(run: JobRun, state: TrainState, status: Status, checkpoint: Path | None) -> TrainingResult:
    """Save the adapter when the run succeeded (rank 0), write training_result.json, return the result."""
    from lora_core import save_adapter, set_lora_state_dict

    is_main = run.runtime.is_main
    adapter_dir = None
    if status == "succeeded" and is_main:
        if state.best.weights is not None:  # early stopping on: publish the best evaluation's adapter
            set_lora_state_dict(run.model, state.best.weights, run.adapter_name)
        adapter_dir = run.output_dir / "adapter"
        save_adapter(
            run.model, adapter_dir, adapter_name=run.adapter_name, base_model_name_or_path=str(run.spec.base_model)
        )
    result = TrainingResult(
        status=status,
        step=state.step,
        total_steps=run.hp.total_steps,
        adapter_dir=adapter_dir,
        checkpoint=checkpoint,
        checkpoints=list_checkpoints(run.checkpoints_dir) if is_main else [],
        metrics=state.metrics,
        hyperparameters={
            **run.hp.to_dict(),  # the split actually used last (an out-of-memory back-off changes it)
            "batch_size": state.batch_size,
            "gradient_accumulation_steps": state.gradient_accumulation_steps,
        },
        history=state.history,
        stopped_early=state.stopped_early,
        best_step=state.best.step,
        tokens_trained=state.tokens_trained,
    )
    if is_main:
        (run.output_dir / "training_result.json").write_text(json.dumps(result.to_dict(), indent=1))
        if run.say:
            run.say.log(f"training {status} at step {state.step}/{run.hp.total_steps}")
    return result


# ------------------------------------------------------------------------------------------- train


def train(
    spec: TrainingSpec,
    *,
    output_dir: Path,
    reporter: Reporter | None,
    resume_from: Path | None = None,
    runtime: Runtime | None = None,
) -> TrainingResult:
    """Run one job: fine-tune an adapter on `spec.training_file` and save it to `output_dir/adapter`.

    Checkpoints go to `output_dir/checkpoints/step-NNNNNNNN`. `resume_from` (a checkpoint of the same
    spec) continues exactly where it stopped: same data order, RNG, optimizer and schedule.
    Everything sent to `reporter` has been delivered when this returns (or raises).
    """
    runtime = runtime or Runtime()
    on_cuda = (runtime.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
    background = runtime.report_in_background if runtime.report_in_background is not None else on_cuda
    if not (background and reporter is not None and runtime.is_main):
        return _train(spec, Path(output_dir), reporter, resume_from, runtime)
    threaded = ThreadedReporter(reporter)
    try:
        result = _train(spec, Path(output_dir), threaded, resume_from, runtime)
    except BaseException:
        try:
            threaded.close()
        except Exception:  # the training error is the one to raise; this one is logged
            logger.exception("delivering the last reports of a failed run")
        raise
    threaded.close()
    return result


def _train(
    spec: TrainingSpec, output_dir: Path, reporter: Reporter | None, resume_from: Path | None, runtime: Runtime
) -> TrainingResult:
    run = _setup(spec, output_dir, reporter, runtime)
    state = initial_state(run, resume_from)
    progress = begin(run, state)
    for micro in planned_steps(run, state):
        record = _train_step_or_back_off(run, state, micro)
        if record is None:
            continue  # the micro-batch was split further: planned_steps re-plans from the same step
        result = after_step(run, state, progress, record)
        if result is not None:
            return result
    return end(run, state, progress)


def initial_state(run: JobRun, resume_from: Path | None) -> TrainState:
    """A fresh TrainState, or the one checkpoint `resume_from` holds (adapter, optimizer, RNG restored)."""
    hp = run.hp
    state = TrainState(batch_size=hp.batch_size, gradient_accumulation_steps=hp.gradient_accumulation_steps)
    return _restore(run, resume_from, state) if resume_from is not None else state


@dataclass
class Progress:
    """A running job's bookkeeping between its steps: the intervals, timers and metrics not yet read back."""

    every_checkpoint: int | None  # steps between checkpoints
    log_every: int
    started: float
    tokens_at_start: int
    records: list[_StepRecord] = field(default_factory=list)  # steps whose metrics are still on the device


def begin(run: JobRun, state: TrainState) -> Progress:
    """Before the first step: the output directory, train mode and the untrained adapter's evaluation."""
    hp, say = run.hp, run.say
    run.output_dir.mkdir(parents=True, exist_ok=True)
    run.loss_module.train()
    if run.data.val_examples and state.step == 0:
        state.metrics = {"step": 0}
        _record_evaluation(run, state, track_best=False)  # the untrained adapter is no candidate
        if say:
            say.metrics(0, state.metrics)
    return Progress(
        every_checkpoint=math.ceil(hp.total_steps / run.spec.n_checkpoints) if run.spec.n_checkpoints else None,
        log_every=run.runtime.log_every_steps or (10 if run.device.type == "cuda" else 1),
        started=time.perf_counter(),
        tokens_at_start=state.tokens_trained,
    )


def planned_steps(run: JobRun, state: TrainState) -> Iterator[list[Batch]]:
    """The micro-batches of each next step, planned from `state.position` until the run is done.

    Lazy: each step is planned after the previous one has advanced `state`; a changed split (the
    out-of-memory back-off) re-plans from the position the back-off left.
    """
    hp = run.hp
    while state.step < hp.total_steps and state.position.epoch < hp.n_epochs:
        split = (state.batch_size, state.gradient_accumulation_steps)
        batch_args = {**run.data.batch_args, "batch_size": state.batch_size}
        batches = make_batches(run.data.train_examples, position=state.position, **batch_args)
        for micro in _grouped(batches, state.gradient_accumulation_steps):
            yield micro
            if state.step >= hp.total_steps or split != (state.batch_size, state.gradient_accumulation_steps):
                break


def after_step(run: JobRun, state: TrainState, progress: Progress, record: _StepRecord) -> TrainingResult | None:
    """After a step: metrics, evaluation, checkpoint, early stopping and control; the result if the run ends."""
    hp, say, spec = run.hp, run.say, run.spec
    progress.records.append(record)
    eval_due = _eval_is_due(run, state)
    # Decided the same way on every rank (only rank 0 gets a path back), so that a pause right
    # after a checkpoint step does not make the other ranks save and report a second time.
    every = progress.every_checkpoint
    saved_this_step = bool(every and state.step % every == 0 and state.step < hp.total_steps)
    last = state.step >= hp.total_steps
    if not (eval_due or saved_this_step or last or state.step % progress.log_every == 0):
        return None  # the GPU keeps working: metrics and control wait for the end of the interval
    *earlier, state.metrics = _read_records(run, state, progress.records, progress.started, progress.tokens_at_start)
    progress.records.clear()
    if say:
        for row in earlier:
            say.metrics(row["step"], row)
    if eval_due:
        _record_evaluation(run, state)
    if say:
        say.metrics(state.step, state.metrics)
    checkpoint = _save_checkpoint(run, state) if saved_this_step else None
    if state.stopped_early:
        if say:
            say.log(
                f"early stopping at step {state.step}: val_loss did not improve for "
                f"{spec.early_stopping_patience} evaluations (best at step {state.best.step})"
            )
        return _finish(run, state, "succeeded", None)
    control = _agreed_control(say, run.runtime, run.device)
    if control == "cancel":
        return _finish(run, state, "cancelled", None)
    if control == "pause":
        return _finish(run, state, "paused", checkpoint if saved_this_step else _save_checkpoint(run, state))
    return None


def end(run: JobRun, state: TrainState, progress: Progress) -> TrainingResult:
    """The run is done (total_steps reached, or the data ran out): report what is left and save the adapter."""
    say = run.say
    if progress.records:  # the data ran out before total_steps (it should not): still report those steps
        *earlier, state.metrics = _read_records(
            run, state, progress.records, progress.started, progress.tokens_at_start
        )
        progress.records.clear()
        for row in earlier if say else []:
            say.metrics(row["step"], row)
        if say:
            say.metrics(state.step, state.metrics)
    return _finish(run, state, "succeeded", None)
