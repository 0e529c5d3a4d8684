"""How much accelerator memory a co-training group leaves for more members: an estimate from config.json.

On workers/memory_plan.py's terms, for a group on one base (no torch: it reads the base's config.json):

    base        = embeddings·2 + linear weights·b(quantization)          (bf16: b = 2, int8 ≈ 1.06, nf4 ≈ 0.56)
    member(r)   = 16 · r · L · (9H + 2·kv + 3I)  +  loss_chunk  +  seq_len · per_token
    budget      = usable_fraction · device_bytes − base − reserve − member(r_leader)

16 bytes per adapter parameter (fp32 weight, gradient, AdamW's two moments), for every linear layer of
a block (the worst case of `target_modules`); a member's activations are one sequence of `seq_len`
tokens with gradient checkpointing (memory_plan's per-token term). A member of rank r joins while
member(r) ≤ what is left (fleet.co_training.MemberMemory; the Lua does the sum). It is an estimate: the
training loop backs off on a real out-of-memory error.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from fleet.co_training import MemberMemory
from workers.memory_plan import _LOSS_CHUNK_BYTES, _RESERVE_BYTES, USABLE_FRACTION, DecoderShape

__all__ = ["group_memory"]

_WEIGHT_BYTES = {"nf4": 0.56, "int8": 1.06, None: 2.0, "none": 2.0}  # per parameter, with quantization scales
_ADAPTER_BYTES_PER_PARAM = 16


def group_memory(base_model: Path, quantization: str | None, *, device_bytes: int, leader_rank: int,
                 seq_len: int = 2048) -> MemberMemory:
    """The memory a group on `base_model` leaves for joining members on `device_bytes` of accelerator
    memory, its leader (of LoRA rank `leader_rank`) in. A base without a readable config.json leaves
    nothing: its jobs train alone."""
    try:
        config = json.loads((Path(base_model) / "config.json").read_text(encoding="utf-8"))
        shape = DecoderShape.from_config(SimpleNamespace(**config))
        vocab = int(config["vocab_size"])
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return MemberMemory(budget_bytes=0, member_fixed_bytes=1, bytes_per_rank=0)
    h, kv, inter, layers = shape.hidden_size, shape.kv_size, shape.intermediate_size, shape.n_layers
    linear = layers * (h * (2 * h + 2 * kv) + 3 * h * inter)  # q, o: H×H; k, v: H×kv; gate, up, down: H×I
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    base = int(embeddings * 2 + linear * _WEIGHT_BYTES.get(quantization, 2.0))
    per_rank = _ADAPTER_BYTES_PER_PARAM * layers * (9 * h + 2 * kv + 3 * inter)
    per_token = 2 * h * layers + shape.layer_bytes_per_token(2) + 4 * 2 * h
    fixed = _LOSS_CHUNK_BYTES + seq_len * per_token
    budget = int(USABLE_FRACTION * device_bytes) - base - _RESERVE_BYTES - (fixed + per_rank * leader_rank)
    return MemberMemory(budget_bytes=max(budget, 0), member_fixed_bytes=fixed, bytes_per_rank=per_rank)
