"""How much accelerator memory a co-training group leaves for more members: an estimate from config.json.

On the shared memory model (fleet/memory_model.py, the GPU micro-batch planner's and the estimate
endpoint's terms), for a group on one base (no torch: it reads the base's config.json):

    base        = base_weight_bytes(shape, quantization)                 (bf16 for what is not quantized)
    member(r)   = 16 · r · L · Σ(in + out) over a block's linear layers  +  loss chunk  +  seq_len · per_token
    budget      = usable_fraction · device_bytes − base − reserve − member(r_leader)

16 bytes per adapter parameter (fp32 weight, gradient, AdamW's two moments), for every linear layer of
a block (the worst case of `target_modules`); a member's activations are one sequence of `seq_len`
tokens with gradient checkpointing in bf16. A member of rank r joins while member(r) ≤ what is left
(fleet.co_training.MemberMemory; the Lua does the sum). It is an estimate: the training loop backs off
on a real out-of-memory error.

The device: `co_training_memory_gib` where set; unset, on real GPUs (`use_gpu`) the smallest GPU the
dispatcher's process sees (`group_device_bytes`), and on CPU logical accelerators none (not checked).
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from fleet.co_training import MemberMemory
from fleet.memory_model import (
    ADAPTER_BYTES_PER_PARAM,
    LLAMA_STYLE_LINEARS,
    RESERVE_BYTES,
    BaseModelShape,
    activation_bytes_per_token,
    base_weight_bytes,
    loss_logits_bytes,
)
from workers.memory_plan import USABLE_FRACTION

__all__ = ["group_device_bytes", "group_memory", "visible_gpu_bytes"]

logger = logging.getLogger(__name__)

_BF16 = 2


@functools.cache
def visible_gpu_bytes() -> tuple[int, ...]:
    """The total memory of each CUDA device this process sees (none without CUDA, said once in a warning)."""
    import torch

    if not torch.cuda.is_available():
        logger.warning("co-training: this process sees no GPU to size its groups by; set "
                       "LORAFLEET_CO_TRAINING_MEMORY_GIB to the memory of one GPU (GiB) to check it")
        return ()
    return tuple(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))


def group_device_bytes(memory_gib: float | None, use_gpu: bool,
                       visible: Callable[[], Sequence[int]] = visible_gpu_bytes) -> int | None:
    """The accelerator memory of a co-training group's one device, or None for "not checked".

    `memory_gib` (settings `co_training_memory_gib`) where set. Unset, on real GPUs (`use_gpu`) the
    smallest of the GPUs `visible()` lists (the dispatcher's node: its groups may land on any of them);
    on CPU logical accelerators, or a dispatcher that sees no GPU, None: the group size limit alone
    bounds a group, and the engine still shares the device it gets among the members' micro-batches
    (workers.cotrain). CPU groups train in host memory, which is not planned for a lone job either.
    """
    if memory_gib is not None:
        return int(memory_gib * 2**30)
    if not use_gpu:
        return None
    sizes = list(visible())
    return min(sizes) if sizes else None


def group_memory(base_model: Path, quantization: str | None, *, device_bytes: int, leader_rank: int,
                 seq_len: int = 2048) -> MemberMemory:
    """The memory a group on `base_model` leaves for joining members on `device_bytes` of accelerator
    memory, its leader (of LoRA rank `leader_rank`) in. A base without a readable config.json leaves
    nothing: its jobs train alone."""
    try:
        config = json.loads((Path(base_model) / "config.json").read_text(encoding="utf-8"))
        shape = BaseModelShape.from_config_json(config)
        base = base_weight_bytes(shape, quantization, dense_bytes=_BF16)
    except (OSError, ValueError, TypeError):
        return MemberMemory(budget_bytes=0, member_fixed_bytes=1, bytes_per_rank=0)
    in_out = sum(i + o for i, o in shape.linear_shapes(LLAMA_STYLE_LINEARS))
    per_rank = ADAPTER_BYTES_PER_PARAM * shape.decoder.n_layers * in_out
    per_token = activation_bytes_per_token(shape.decoder, _BF16, gradient_checkpointing=True)
    fixed = loss_logits_bytes(_BF16) + seq_len * per_token
    budget = int(USABLE_FRACTION * device_bytes) - base - RESERVE_BYTES - (fixed + per_rank * leader_rank)
    return MemberMemory(budget_bytes=max(budget, 0), member_fixed_bytes=fixed, bytes_per_rank=per_rank)
