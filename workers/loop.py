"""The training loop, written out in one place: setup → train → save (torchtune-recipe style, no Trainer).

One optimizer step takes `gradient_accumulation_steps` micro-batches on every rank. Its loss is
the sum of per-token cross-entropies divided by the number of loss tokens of the whole step on all
ranks (all-reduced before the backward passes), so every target token weighs the same whatever the
accumulation, the ranks or the padding. Logits are computed only at positions that carry loss:
with a large vocabulary the (tokens × vocab) logits are most of the memory and much of the time.

`train()` runs alone, or as one rank of a torch.distributed group (workers/ray_train.py sets that
up and passes a `Runtime`); only rank 0 writes files and talks to the Reporter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from workers.checkpoints import (
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    write_checkpoint,
)
from workers.datasets import read_examples
from workers.packing import Batch, DataPosition, count_batches, make_batches, plan_epoch
from workers.reporting import Control, Reporter
from workers.schedule import lr_lambda
from workers.spec import ResolvedHyperparameters, TrainingSpec, resolve_hyperparameters
from workers.tokenization import IGNORE_INDEX, TokenizedExample, tokenize_dataset

logger = logging.getLogger(__name__)

__all__ = ["Runtime", "TrainingResult", "train"]

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


class _TokenLoss(nn.Module):
    """Sum of cross-entropies and of correct argmaxes over the loss tokens of a batch.

    Runs the decoder, then the output head only on the positions whose next token carries loss.
    Wrapping the whole computation in one module lets DDP see a single forward per backward.
    """

    def __init__(self, causal_lm: nn.Module):
        super().__init__()
        self.causal_lm = causal_lm

    def forward(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = self.causal_lm.get_decoder()(**model_inputs, use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        keep = targets != IGNORE_INDEX
        logits = self.causal_lm.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (N, V)
        picked = targets[keep]
        loss_sum = nn.functional.cross_entropy(logits, picked, reduction="sum")
        n_correct = (logits.argmax(dim=-1) == picked).sum()
        return loss_sum, n_correct


@contextlib.contextmanager
def _evaluation_mode(module: nn.Module) -> Iterator[None]:
    """eval() for dropout, except bitsandbytes 4-bit layers, which have no dropout to turn off.

    In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit weight in place into
    an inference layout (which needs the output size divisible by 32) at its first no-grad forward;
    evaluating in the middle of training must not change the base weights' storage.
    """
    module.eval()
    for m in module.modules():
        if type(m).__name__ == "Linear4bit":
            m.train()
    try:
        yield
    finally:
        module.train()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _load_dataset(path: Path, tokenizer: Any, spec: TrainingSpec) -> list[TokenizedExample]:
    records = read_examples(path)
    examples = tokenize_dataset(
        records, tokenizer, max_seq_len=spec.max_seq_len, train_on_inputs=spec.train_on_inputs
    )
    return [e for e in examples if len(e) >= 2]


def _build_model(spec: TrainingSpec, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    from lora_core import apply_lora, load_base_model, prepare_for_training, read_adapter_config

    model = load_base_model(str(spec.base_model), quantization=spec.quantization, compute_dtype=compute_dtype)
    if spec.quantization is None:
        model.to(device)  # bitsandbytes models are placed by load_base_model's device_map
    model = prepare_for_training(model, gradient_checkpointing=spec.gradient_checkpointing)
    if spec.init_adapter is not None:
        # Continue a published adapter: its own shape wins over spec.lora, its weights are the start.
        apply_lora(model, read_adapter_config(spec.init_adapter))
        _load_lora_weights(model, spec.init_adapter)
    else:
        apply_lora(model, spec.lora.to_lora_config())
    return model


def _load_lora_weights(model: nn.Module, adapter_dir: Path) -> None:
    from lora_core import set_lora_state_dict

    set_lora_state_dict(model, load_file(str(adapter_dir / _ADAPTER_WEIGHTS)))


def _micro_batches_per_epoch(
    lengths: list[int], spec: TrainingSpec, hp: ResolvedHyperparameters
) -> list[int]:
    """Global micro-batches in each epoch (packing makes the count vary a little between epochs)."""
    return [
        count_batches(
            lengths,
            block_len=spec.max_seq_len,
            batch_size=hp.batch_size,
            packing=spec.packing,
            seed=spec.seed,
            epoch=epoch,
            world_size=hp.world_size,
        )
        for epoch in range(hp.n_epochs)
    ]


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


def _track_best(
    best: dict[str, Any], val_loss: float, step: int, spec: TrainingSpec, model: nn.Module
) -> bool:
    """Update the best evaluation so far; True when early stopping's patience has run out."""
    from lora_core import lora_state_dict

    if val_loss < best["val_loss"]:
        best.update(val_loss=val_loss, step=step, bad_evals=0)
        if spec.early_stopping_patience is not None:
            best["weights"] = {k: v.detach().clone() for k, v in lora_state_dict(model).items()}
        return False
    best["bad_evals"] += 1
    return spec.early_stopping_patience is not None and best["bad_evals"] >= spec.early_stopping_patience


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
    """
    from transformers import AutoTokenizer

    from lora_core import save_adapter, set_lora_state_dict, trainable_parameters

    runtime = runtime or Runtime()
    output_dir = Path(output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    say = reporter if (runtime.is_main and reporter is not None) else None
    device = runtime.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = device.type == "cuda" and spec.bf16
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32

    # ---------------------------------------------------------------- setup: data
    _seed_everything(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(spec.base_model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train_examples = _load_dataset(spec.training_file, tokenizer, spec)
    if not train_examples:
        raise ValueError(f"training_file: {spec.training_file} has no example with at least 2 tokens")
    val_examples = _load_dataset(spec.validation_file, tokenizer, spec) if spec.validation_file else []
    lengths = [len(e) for e in train_examples]
    n_rows = sum(
        len(mb)
        for mb in plan_epoch(
            lengths, block_len=spec.max_seq_len, batch_size=1, packing=spec.packing, seed=spec.seed
        )
    )
    hp = resolve_hyperparameters(
        spec,
        n_train_examples=len(train_examples),
        n_train_tokens=sum(lengths),
        n_train_sequences=n_rows,
        world_size=runtime.world_size,
    )
    micro_per_epoch = _micro_batches_per_epoch(lengths, spec, hp)
    total_steps = sum(math.ceil(n / hp.gradient_accumulation_steps) for n in micro_per_epoch)
    if spec.hyperparameters.max_steps is not None:
        total_steps = min(total_steps, spec.hyperparameters.max_steps)
    hp = replace(hp, total_steps=total_steps, warmup_steps=math.floor(hp.warmup_ratio * total_steps))
    if say:
        say.log(
            f"{len(train_examples)} training examples ({sum(lengths)} tokens, {n_rows} sequences), "
            f"{len(val_examples)} validation examples; hyperparameters: {hp.to_dict()}"
        )

    # ---------------------------------------------------------------- setup: model, optimizer
    _seed_everything(spec.seed)  # adapter init does not depend on how much RNG data loading used
    model = _build_model(spec, device, compute_dtype)
    params = trainable_parameters(model)
    for param in params:
        # Adapter weights and their AdamW state stay fp32 under bf16 autocast (as PEFT does by default):
        # bf16 updates of lr * m / sqrt(v) round away at small learning rates.
        param.data = param.data.float()
    loss_module: nn.Module = _TokenLoss(model)
    if runtime.world_size > 1:
        frozen = [n for n, p in loss_module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in loss_module.named_buffers()]
        # Only adapters are trained: do not broadcast or bucket the frozen (possibly 4-bit) base.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss_module, frozen)
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(warmup_steps=hp.warmup_steps, total_steps=hp.total_steps, kind=hp.lr_scheduler)
    )

    step = 0
    position = DataPosition()
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"val_loss": math.inf, "step": None, "weights": None, "bad_evals": 0}
    tokens_trained = 0
    if resume_from is not None:
        ckpt = load_checkpoint(Path(resume_from))
        _load_lora_weights(model, ckpt.adapter_dir)
        optimizer.load_state_dict(ckpt.training_state["optimizer"])
        scheduler.load_state_dict(ckpt.training_state["scheduler"])
        restore_rng_state(ckpt.training_state["rng"])
        best = dict(ckpt.training_state["best"])
        step = ckpt.step
        position = DataPosition.from_dict(ckpt.trainer_state["position"])
        history = list(ckpt.trainer_state["history"])
        tokens_trained = int(ckpt.trainer_state["tokens_trained"])
        if say:
            say.log(f"resumed from {ckpt.path} at step {step} ({position})")

    every_ckpt = math.ceil(hp.total_steps / spec.n_checkpoints) if spec.n_checkpoints else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    batch_args = dict(
        block_len=spec.max_seq_len,
        batch_size=hp.batch_size,
        packing=spec.packing,
        pad_id=pad_id,
        seed=spec.seed,
        rank=runtime.rank,
        world_size=runtime.world_size,
        mask_dtype=compute_dtype,
    )

    def evaluate() -> dict[str, float]:
        sums = [0.0, 0.0, 0.0]  # loss, correct, tokens
        with _evaluation_mode(loss_module), torch.no_grad(), autocast:
            for batch in make_batches(val_examples, shuffle=False, **batch_args):
                loss_sum, n_correct = loss_module({k: v.to(device) for k, v in batch.inputs.items()})
                sums = [sums[0] + loss_sum.item(), sums[1] + n_correct.item(), sums[2] + batch.n_loss_tokens]
        loss_total, correct_total, n_total = _all_reduce_sum(sums, runtime, device)
        n_total = max(n_total, 1.0)
        return {"val_loss": loss_total / n_total, "val_token_accuracy": correct_total / n_total}

    def save_checkpoint(metrics: dict[str, float]) -> Path | None:
        path = None
        if runtime.is_main:
            path = write_checkpoint(
                checkpoints_dir,
                step=step,
                save_adapter_to=lambda d: save_adapter(
                    model, d, base_model_name_or_path=str(spec.base_model)
                ),
                training_state={
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": capture_rng_state(),
                    "best": best,
                },
                trainer_state={
                    "position": position.to_dict(),
                    "history": history,
                    "tokens_trained": tokens_trained,
                    "hyperparameters": hp.to_dict(),
                    "metrics": metrics,
                },
            )
            prune_checkpoints(checkpoints_dir, keep=max(spec.n_checkpoints, 1) + 1)
            if say:
                say.checkpoint(step, path)
        if runtime.on_checkpoint is not None:
            runtime.on_checkpoint(step, path, metrics)
        return path

    def finish(status: Status, checkpoint: Path | None, metrics: dict[str, float]) -> TrainingResult:
        adapter_dir = None
        if status == "succeeded" and runtime.is_main:
            if best["weights"] is not None:  # early stopping on: publish the best evaluation's adapter
                set_lora_state_dict(model, best["weights"])
            adapter_dir = output_dir / "adapter"
            save_adapter(model, adapter_dir, base_model_name_or_path=str(spec.base_model))
        result = TrainingResult(
            status=status,
            step=step,
            total_steps=hp.total_steps,
            adapter_dir=adapter_dir,
            checkpoint=checkpoint,
            checkpoints=list_checkpoints(checkpoints_dir) if runtime.is_main else [],
            metrics=metrics,
            hyperparameters=hp.to_dict(),
            history=history,
            stopped_early=stopped_early,
            best_step=best["step"],
            tokens_trained=tokens_trained,
        )
        if runtime.is_main:
            (output_dir / "training_result.json").write_text(json.dumps(result.to_dict(), indent=1))
            if say:
                say.log(f"training {status} at step {step}/{hp.total_steps}")
        return result

    # ---------------------------------------------------------------- train
    output_dir.mkdir(parents=True, exist_ok=True)
    loss_module.train()
    metrics: dict[str, float] = {}
    stopped_early = False
    if val_examples and step == 0:
        metrics = {"step": 0, **evaluate()}
        history.append(metrics)
        if say:
            say.metrics(0, metrics)
    started, tokens_at_start = time.perf_counter(), tokens_trained
    while step < hp.total_steps and position.epoch < hp.n_epochs:
        batches = make_batches(train_examples, position=position, **batch_args)
        for micro in _grouped(batches, hp.gradient_accumulation_steps):
            # Normalise by the step's loss tokens on all ranks, so that the gradient is the mean over
            # every target token of the global batch; DDP then averages over ranks, hence * world_size.
            n_loss_local = sum(b.n_loss_tokens for b in micro)
            n_tokens_local = sum(b.n_tokens for b in micro)
            n_loss, n_tokens = _all_reduce_sum([float(n_loss_local), float(n_tokens_local)], runtime, device)
            scale = runtime.world_size / max(n_loss, 1.0)
            loss_total = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no sync
            for i, batch in enumerate(micro):
                sync = i == len(micro) - 1 or runtime.world_size == 1
                no_sync = loss_module.no_sync() if not sync else contextlib.nullcontext()
                with no_sync:
                    with autocast:
                        loss_sum, _ = loss_module({k: v.to(device) for k, v in batch.inputs.items()})
                    (loss_sum * scale).backward()
                loss_total += loss_sum.detach()
            if hp.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm))
            else:
                grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position = micro[-1].next_position
            tokens_trained += int(n_tokens)
            (loss_all,) = _all_reduce_sum([loss_total.item()], runtime, device)
            elapsed = time.perf_counter() - started
            metrics = {
                "step": step,
                "total_steps": hp.total_steps,
                "epoch": position.epoch
                + position.batch_index / micro_per_epoch[min(position.epoch, hp.n_epochs - 1)],
                "train_loss": loss_all / max(n_loss, 1.0),
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "tokens_trained": tokens_trained,
                "tokens_per_s": (tokens_trained - tokens_at_start) / elapsed if elapsed > 0 else 0.0,
            }
            end_of_epoch = position.batch_index == 0
            due_eval = val_examples and (
                (spec.eval_every_steps and step % spec.eval_every_steps == 0)
                or (spec.eval_every_steps is None and end_of_epoch)
                or step == hp.total_steps
            )
            if due_eval:
                metrics.update(evaluate())
                history.append(
                    {
                        "step": step,
                        "val_loss": metrics["val_loss"],
                        "val_token_accuracy": metrics["val_token_accuracy"],
                    }
                )
                stopped_early = _track_best(best, metrics["val_loss"], step, spec, model)
            if say:
                say.metrics(step, metrics)
            # Decided the same way on every rank (only rank 0 gets a path back), so that a pause right
            # after a checkpoint step does not make the other ranks save and report a second time.
            saved_this_step = bool(every_ckpt and step % every_ckpt == 0 and step < hp.total_steps)
            last_ckpt = save_checkpoint(metrics) if saved_this_step else None
            if stopped_early:
                if say:
                    say.log(
                        f"early stopping at step {step}: val_loss did not improve for "
                        f"{spec.early_stopping_patience} evaluations (best at step {best['step']})"
                    )
                return finish("succeeded", None, metrics)
            control = _agreed_control(reporter, runtime, device)
            if control == "cancel":
                return finish("cancelled", None, metrics)
            if control == "pause":
                path = last_ckpt if saved_this_step else save_checkpoint(metrics)
                return finish("paused", path, metrics)
            if step >= hp.total_steps:
                break
    return finish("succeeded", None, metrics)
