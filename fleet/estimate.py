"""What a job will cost before it runs: trainable parameters, adapter file, peak memory, tokens, duration.

Pure: the API gathers the inputs (the base model's config.json, the training file's text, the measured
speed) and this module does the arithmetic, with the memory terms of fleet.memory_model (the same the
GPU planner uses). Each figure carries the assumption it rests on, because each is an estimate:

    trainable parameters   Σ over adapted matrices of r·(in + out)  (+ out for DoRA's magnitude)
    adapter file           those parameters in fp32 plus the safetensors header, as lora_core saves them
    peak memory            weights + adapter (weight, gradient, AdamW) + activations + loss logits + reserve
    training tokens        the file's examples, each cut at max_seq_len, times the epochs
    duration               training tokens ÷ (measured tokens/s per worker × workers)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from fleet.job_spec import ALL_LINEAR, LoraSpec
from fleet.memory_model import (
    ADAMW_BYTES_PER_PARAM,
    GRADIENT_BYTES_PER_PARAM,
    LLAMA_STYLE_LINEARS,
    RESERVE_BYTES,
    WEIGHT_BYTES_PER_PARAM,
    BaseModelShape,
    activation_bytes_per_token,
    base_weight_bytes,
    dora_activation_bytes,
    dropout_bytes_per_token,
    int8_kept_input_bytes_per_token,
    loss_logits_bytes,
)
from fleet.throughput import MeasuredThroughput

__all__ = [
    "CHARS_PER_TOKEN",
    "NO_THROUGHPUT_YET",
    "DatasetTokens",
    "Figure",
    "JobEstimate",
    "MemoryEstimate",
    "RankEstimate",
    "RunShape",
    "adapter_tensors",
    "estimate_job",
    "estimate_sweep",
    "estimated_example_tokens",
    "peak_memory",
    "safetensors_file_bytes",
]

CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text with a BPE tokenizer
_TEMPLATE_TOKENS_PER_MESSAGE = 4  # role header and end-of-turn marker of a chat template
_TEMPLATE_TOKENS_PER_EXAMPLE = 2  # begin/end of text
NO_THROUGHPUT_YET = "unknown: no finished job on this base model yet"


class Figure(BaseModel):
    """One estimated number (None when it cannot be estimated) and the assumption behind it."""

    value: int | float | None
    assumption: str


class MemoryEstimate(BaseModel):
    """Peak accelerator memory of one worker, in bytes, and the terms it sums."""

    value: int | None = Field(description="Bytes at the peak of a training step on one worker.")
    assumption: str
    base_weights: Figure
    adapter_weights: Figure
    gradients: Figure
    optimizer_state: Figure
    activations: Figure
    loss_logits: Figure
    reserve: Figure


class RankEstimate(BaseModel):
    """One child of a rank sweep: the figures of the same job trained at that rank."""

    rank: int
    trainable_parameters: Figure
    adapter_file_bytes: Figure
    peak_memory_bytes: MemoryEstimate
    training_tokens: Figure
    duration_s: Figure


class JobEstimate(BaseModel):
    """`POST /v1/fine_tuning/jobs/estimate`: what the job in the body would cost; nothing is created."""

    object: Literal["fine_tuning.job.estimate"] = "fine_tuning.job.estimate"
    model: str
    base_model: str
    quantization: str
    lora: dict[str, Any]
    hyperparameters: dict[str, Any] = Field(description="The values the estimate assumed (\"auto\" resolved).")
    workers: int
    trainable_parameters: Figure
    adapter_file_bytes: Figure
    peak_memory_bytes: MemoryEstimate
    training_tokens: Figure
    duration_s: Figure
    rank_sweep: list[RankEstimate] | None = Field(default=None, description=(
        "For a rank sweep: each child's figures, in the order of the ranks. The figures above are then the "
        "sweep's: the largest rank's parameters, adapter file and peak memory (what a worker must fit), and "
        "the training tokens and duration of all the children together."))


@dataclass(frozen=True)
class DatasetTokens:
    """The training file's size in tokens as estimated from its text (the API has no tokenizer)."""

    n_examples: int
    n_tokens: int  # after cutting each example at max_seq_len
    n_truncated: int


@dataclass(frozen=True)
class RunShape:
    """How the job will run: what the engine resolves "auto" to and its fixed settings (workers.spec)."""

    n_epochs: int
    micro_batch_sequences: int  # rows of one micro-batch on one worker
    gradient_accumulation_steps: int
    max_seq_len: int
    workers: int
    gradient_checkpointing: bool = True
    activation_bytes: int = 2  # bf16 autocast on a GPU
    dense_bytes: int = 2  # the unquantized weights, in the compute dtype
    reserve_bytes: int = RESERVE_BYTES  # the CUDA context; 0 for a CPU run


def estimated_example_tokens(record: dict[str, Any]) -> int:
    """Tokens of one example (chat or prompt/completion) from its characters, before truncation."""
    if "messages" in record:
        texts = [str(m.get("content") or "") for m in record["messages"]]
        overhead = _TEMPLATE_TOKENS_PER_MESSAGE * len(texts)
    else:
        texts = [str(record.get("prompt") or ""), str(record.get("completion") or "")]
        overhead = 0
    return sum(math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts) + overhead + _TEMPLATE_TOKENS_PER_EXAMPLE


def _target_names(lora: LoraSpec) -> list[str]:
    return list(LLAMA_STYLE_LINEARS) if lora.target_modules == ALL_LINEAR else list(lora.target_modules)


def adapter_tensors(shape: BaseModelShape, lora: LoraSpec) -> list[tuple[str, tuple[int, ...]]]:
    """The adapter's tensors as lora_core.io saves them (PEFT keys, shapes); ValueError naming the
    target modules whose shape a Llama-style block does not tell."""
    names = _target_names(lora)
    shapes = shape.linear_shapes(names)
    tensors: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(shape.decoder.n_layers):
        for name, (fan_in, fan_out) in zip(names, shapes, strict=True):
            block = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}."
            tensors += [(prefix + "lora_A.weight", (lora.r, fan_in)), (prefix + "lora_B.weight", (fan_out, lora.r))]
            if lora.use_dora:
                tensors.append((prefix + "lora_magnitude_vector", (fan_out,)))
    return tensors


def safetensors_file_bytes(tensors: Sequence[tuple[str, tuple[int, ...]]], *, dtype: str = "F32",
                           itemsize: int = 4, metadata: dict[str, str] | None = None) -> int:
    """Size of the safetensors file of these tensors: 8 bytes of header length, the JSON header (tensors
    sorted by name, compact, padded with spaces to a multiple of 8) and the data."""
    header: dict[str, Any] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offset = 0
    for name, dims in sorted(tensors):
        size = itemsize * math.prod(dims)
        header[name] = {"dtype": dtype, "shape": list(dims), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text) / 8) * 8 + offset


def peak_memory(shape: BaseModelShape, lora: LoraSpec, quantization: str | None, run: RunShape,
                n_trainable: int, row_tokens: int) -> MemoryEstimate:
    """One worker's peak memory in a step of `run.micro_batch_sequences` rows of `row_tokens` tokens
    (at most max_seq_len: packing fills rows up to it when the data has that many), from
    fleet.memory_model's terms."""
    a, d = run.activation_bytes, shape.decoder
    micro_batch_tokens = run.micro_batch_sequences * row_tokens
    adapted = shape.linear_shapes(_target_names(lora))
    per_token = activation_bytes_per_token(d, a, run.gradient_checkpointing) + dropout_bytes_per_token(
        sum(i for i, _ in adapted), n_layers=d.n_layers, activation_bytes=a, dropout=lora.dropout,
        gradient_checkpointing=run.gradient_checkpointing)
    if quantization == "int8":
        per_token += int8_kept_input_bytes_per_token(shape, a, run.gradient_checkpointing)
    activations = micro_batch_tokens * per_token
    if lora.use_dora:
        activations += dora_activation_bytes(micro_batch_tokens, adapted, n_layers=d.n_layers,
                                             gradient_checkpointing=run.gradient_checkpointing)
    checkpointing = "with" if run.gradient_checkpointing else "without"
    dtype = {2: "bf16", 4: "fp32"}.get(a, f"{a}-byte")
    parts = {
        "base_weights": Figure(value=base_weight_bytes(shape, quantization, run.dense_bytes), assumption=(
            f"decoder linear weights in {_quantization_words(quantization)}; embeddings, head and norms in "
            f"{run.dense_bytes}-byte floats")),
        "adapter_weights": Figure(value=WEIGHT_BYTES_PER_PARAM * n_trainable, assumption="fp32 adapter parameters"),
        "gradients": Figure(value=GRADIENT_BYTES_PER_PARAM * n_trainable, assumption="fp32, one per parameter"),
        "optimizer_state": Figure(value=ADAMW_BYTES_PER_PARAM * n_trainable,
                                  assumption="AdamW's two fp32 moments per parameter"),
        "activations": Figure(value=activations, assumption=(
            f"{run.micro_batch_sequences} packed sequence(s) of {row_tokens} tokens per micro-batch "
            f"(max_seq_len {run.max_seq_len}), {dtype} "
            f"activations, {checkpointing} gradient checkpointing"
            + (f", LoRA dropout {lora.dropout} keeping its output and mask" if lora.dropout > 0 else "")
            + (", every layer's int8 linear inputs (bitsandbytes keeps them past checkpointing)"
               if quantization == "int8" and run.gradient_checkpointing else "")
            + (", DoRA's dense fp32 weights of a layer" if lora.use_dora else ""))),
        "loss_logits": Figure(
            value=loss_logits_bytes(a, n_positions=micro_batch_tokens, vocab_size=shape.vocab_size),
            assumption=f"the chunked loss's logits over a {shape.vocab_size}-token vocabulary, at most 64 MiB "
                       "of fp32 a chunk"),
        "reserve": Figure(value=run.reserve_bytes, assumption=(
            "CUDA context, kernel workspaces and fragmentation" if run.reserve_bytes
            else "none: the workers train on the CPU")),
    }
    total = sum(int(p.value or 0) for p in parts.values())
    return MemoryEstimate(value=total, assumption="the sum of the parts below, on each worker", **parts)


def _quantization_words(quantization: str | None) -> str:
    return {"nf4": "NF4 (4 bits, double-quantized absmax per 64)", "int8": "int8 with an fp32 scale per row"}.get(
        str(quantization), "the compute dtype (no quantization)")


def estimate_job(*, model: str, base_model: str, lora: LoraSpec, quantization: str,
                 shape: BaseModelShape | None, shape_unknown: str, tokens: DatasetTokens, run: RunShape,
                 throughput: MeasuredThroughput | None, accelerator: str) -> JobEstimate:
    """The estimate of a validated job. `shape` None (config.json unreadable or not Llama-style): the
    figures that need it are None, with `shape_unknown` as their reason."""
    n_trainable = None
    reason = shape_unknown
    if shape is not None:
        try:
            tensors = adapter_tensors(shape, lora)
            n_trainable = sum(math.prod(dims) for _, dims in tensors)
        except ValueError as e:
            reason = f"unknown: {e}"
    if n_trainable is None or shape is None:
        unknown = Figure(value=None, assumption=reason)
        params, file_bytes = unknown, unknown
        memory = MemoryEstimate(value=None, assumption=reason, **{
            part: unknown for part in ("base_weights", "adapter_weights", "gradients", "optimizer_state",
                                       "activations", "loss_logits", "reserve")})
    else:
        dora = " plus DoRA's magnitude vector (out)" if lora.use_dora else ""
        params = Figure(value=n_trainable, assumption=(
            f"r·(in + out) per adapted matrix{dora}: r={lora.r} on {', '.join(_target_names(lora))} in each of "
            f"{shape.decoder.n_layers} layers, shapes from the base model's config.json"))
        file_bytes = Figure(value=safetensors_file_bytes(tensors),
                            assumption="fp32 tensors in adapter_model.safetensors with its header, as lora_core saves")
        memory = peak_memory(shape, lora, quantization, run, n_trainable,
                             row_tokens=min(run.max_seq_len, max(1, tokens.n_tokens)))

    truncated = f", {tokens.n_truncated} cut at max_seq_len={run.max_seq_len}" if tokens.n_truncated else ""
    training_tokens = tokens.n_tokens * run.n_epochs
    trained = Figure(value=training_tokens, assumption=(
        f"{tokens.n_examples} examples ≈ {tokens.n_tokens} tokens{truncated} (about {CHARS_PER_TOKEN} characters "
        f"a token plus {_TEMPLATE_TOKENS_PER_MESSAGE} a message for the chat template: the API does not run the "
        f"tokenizer) × {run.n_epochs} epoch(s)"))
    if throughput is None:
        duration = Figure(value=None, assumption=NO_THROUGHPUT_YET)
    else:
        rate = throughput.tokens_per_s_per_worker * run.workers
        duration = Figure(value=round(training_tokens / rate, 1), assumption=(
            f"{throughput.tokens_per_s_per_worker:.1f} tokens/s per worker on {accelerator}, the running mean of "
            f"{throughput.jobs} finished job(s) on {base_model}, × {run.workers} worker(s); the training loop "
            "only (not the wait in the queue, nor loading the model)"))
    return JobEstimate(
        model=model, base_model=base_model, quantization=quantization, lora=lora.model_dump(mode="json"),
        hyperparameters={"n_epochs": run.n_epochs, "batch_size": run.micro_batch_sequences,
                         "gradient_accumulation_steps": run.gradient_accumulation_steps,
                         "max_seq_len": run.max_seq_len},
        workers=run.workers, trainable_parameters=params, adapter_file_bytes=file_bytes,
        peak_memory_bytes=memory, training_tokens=trained, duration_s=duration,
    )


def estimate_sweep(per_rank: dict[int, JobEstimate]) -> JobEstimate:
    """A rank sweep's estimate from each child's (rank → the job's estimate at that rank, in the order of
    the ranks): the largest child's model figures, and the children's tokens and duration summed (each
    child trains on the whole file; they may run side by side, so the sum is the cluster's work, not the
    wall-clock time)."""
    largest = per_rank[max(per_rank)]
    children = [RankEstimate(rank=r, **e.model_dump(include={"trainable_parameters", "adapter_file_bytes",
                                                             "peak_memory_bytes", "training_tokens", "duration_s"}))
                for r, e in per_rank.items()]
    n = len(children)
    tokens = [c.training_tokens.value for c in children]
    durations = [c.duration_s.value for c in children]
    total_tokens = Figure(value=None if None in tokens else sum(tokens), assumption=(
        f"{n} child jobs, each: {children[0].training_tokens.assumption}"))
    total_duration = Figure(value=None if None in durations else round(sum(durations), 1), assumption=(
        f"the {n} child jobs one after another (they may run side by side), each: {children[0].duration_s.assumption}"
        if None not in durations else largest.duration_s.assumption))
    return largest.model_copy(update={
        "trainable_parameters": _largest(largest.trainable_parameters, n),
        "adapter_file_bytes": _largest(largest.adapter_file_bytes, n),
        "peak_memory_bytes": largest.peak_memory_bytes.model_copy(update={"assumption": (
            f"the largest of the {n} child jobs (r={max(per_rank)}), on each of its workers: "
            + largest.peak_memory_bytes.assumption)}),
        "training_tokens": total_tokens, "duration_s": total_duration, "rank_sweep": children})


def _largest(figure: Figure, n: int) -> Figure:
    return figure.model_copy(update={"assumption": f"the largest of the {n} child jobs: {figure.assumption}"})
