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
"""

from __future__ import annotations

import json
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

__all__ = ["group_memory"]

_BF16 = 2


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
