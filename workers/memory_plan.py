"""How many tokens a micro-batch may hold on a device: the token budget from a LoRA step's memory, kept pure.

The terms come from fleet.memory_model (shared with the estimate a user gets before a job runs):

    fixed       = weights + 16 · P_adapter + loss_logits + reserve
    memory(n)   = fixed + n · per_token  ≤  usable_fraction · device_bytes

- weights: the loaded base as it sits on the device (bf16, or NF4/int8 with their scales), measured.
- P_adapter: trainable parameters, fp32 weight + gradient + AdamW's two moments = 16 bytes each.
- loss_logits: the chunked loss's live logits at a full chunk (about 3 × 64 MiB in bf16).
- reserve: the CUDA context, cuBLAS/flash workspaces and allocator fragmentation (1 GiB).
- per_token: the activations a token keeps, with or without gradient checkpointing; on an int8 base also
  every layer's inputs of its quantized linears, which bitsandbytes keeps out of checkpointing's reach
  (`int8_kept_input_bytes_per_token`, the term the estimate before a job runs counts too).

The estimate is deliberately simple; the loop backs off on a real out-of-memory error (halving the
micro-batch, doubling accumulation), so an optimistic plan costs one retried step, not the job.

Co-training (workers/cotrain.py) runs every member's micro-batch in one forward pass, so the pass's
token budget — `plan_micro_batch` with the one base and every member's adapter state in `fixed` — is
shared: `plan_group_micro_batches` splits it max-min fairly (equal shares; a member that needs less
than its share leaves the rest to the others), each member's share a divisor of its step's sequences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fleet.memory_model import (
    ADAPTER_BYTES_PER_PARAM,
    RESERVE_BYTES,
    BaseModelShape,
    DecoderShape,
    activation_bytes_per_token,
    int8_kept_input_bytes_per_token,
    loss_logits_bytes,
)

__all__ = ["DecoderShape", "MemberSplit", "MemoryPlan", "plan_group_micro_batches", "plan_micro_batch", "query_size"]

USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class MemoryPlan:
    """The result: how many tokens fit, and the terms they came from (logged with the plan)."""

    device_bytes: int
    fixed_bytes: int
    bytes_per_token: int
    max_tokens: int  # per micro-batch; 0 when not even the fixed part fits

    def max_sequences(self, seq_len: int) -> int:
        """Rows of `seq_len` tokens per micro-batch (at least 1: the loop backs off if even that fails)."""
        return max(1, self.max_tokens // seq_len)


def plan_micro_batch(
    *,
    device_bytes: int,
    weights_bytes: int,
    n_adapter_params: int,
    shape: DecoderShape,
    activation_bytes: int = 2,
    gradient_checkpointing: bool = True,
    quantization: str | None = None,
    q_size: int | None = None,
    usable_fraction: float = USABLE_FRACTION,
) -> MemoryPlan:
    """The token budget of one micro-batch on a device of `device_bytes` (see the module docstring).

    `quantization` is the base's ("nf4", "int8" or None); `q_size` (n_attention_heads × head_dim, the
    hidden size when None) sizes the int8 base's kept o_proj inputs.
    """
    fixed = (weights_bytes + ADAPTER_BYTES_PER_PARAM * n_adapter_params + loss_logits_bytes(activation_bytes)
             + RESERVE_BYTES)
    per_token = activation_bytes_per_token(shape, activation_bytes, gradient_checkpointing)
    if quantization == "int8":
        # vocab_size and tied embeddings do not enter this term
        base = BaseModelShape(shape, q_size or shape.hidden_size, vocab_size=0, tie_word_embeddings=True)
        per_token += int8_kept_input_bytes_per_token(base, activation_bytes, gradient_checkpointing)
    budget = math.floor(usable_fraction * device_bytes) - fixed
    return MemoryPlan(device_bytes, fixed, per_token, max(0, budget // per_token))


def query_size(config: Any) -> int:
    """n_attention_heads × head_dim of a transformers config (Llama-style names; head_dim = H / heads if absent)."""
    heads = config.num_attention_heads
    return heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)


@dataclass(frozen=True)
class MemberSplit:
    """What the group plan needs of one co-trained member (sequences are rows of up to `seq_len` tokens)."""

    seq_len: int  # its max_seq_len: the tokens one of its sequences may hold
    step_sequences: int  # sequences per optimizer step (micro-batch × accumulation): a micro-batch divides it
    least: int  # fewest sequences per micro-batch it takes (its current split where that may not change)
    most: int  # most sequences per micro-batch (its batch as planned alone; lowered by an out-of-memory back-off)

    def options(self) -> list[int]:
        """Its micro-batch sizes, smallest first: the divisors of its step's sequences in [least, most]
        (only those keep the rows of every step, hence the loss, whatever the split); `least` if none."""
        found = [d for d in range(self.least, min(self.most, self.step_sequences) + 1) if self.step_sequences % d == 0]
        return found or [self.least]


def plan_group_micro_batches(budget_tokens: int, members: Sequence[MemberSplit]) -> list[int]:
    """Sequences per micro-batch of each member, so that one pass over all their micro-batches holds at
    most `budget_tokens` tokens (as far as each member's `least` allows: below it the out-of-memory
    back-off decides).

    Max-min fair (water-filling): every member starts at its `least`, then the member holding the fewest
    tokens grows to its next option while that fits, until none can. So the members get equal shares of
    the pass, except that one needing less than its share (`most`) leaves the rest to the others, and
    none grows while a smaller one still could. Equal shares, not shares in proportion to need: each
    member is charged an equal part of the group's GPU (docs/scheduling.md, "Accounting"), and a small
    job is not slowed down for a large one's sake; since each pass takes one micro-batch of every member,
    a large job pays for its own size with more accumulation steps.
    """
    options = [m.options() for m in members]
    chosen = [0] * len(members)  # index into each member's options
    tokens = [opts[0] * m.seq_len for opts, m in zip(options, members, strict=True)]
    left = budget_tokens - sum(tokens)
    while True:
        growable = [i for i, m in enumerate(members)
                    if chosen[i] + 1 < len(options[i])
                    and options[i][chosen[i] + 1] * m.seq_len - tokens[i] <= left]
        if not growable:
            return [opts[i] for opts, i in zip(options, chosen, strict=True)]
        i = min(growable, key=lambda j: (tokens[j], j))
        chosen[i] += 1
        grown = options[i][chosen[i]] * members[i].seq_len
        left -= grown - tokens[i]
        tokens[i] = grown
