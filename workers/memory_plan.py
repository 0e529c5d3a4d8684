"""How many tokens a micro-batch may hold on a device: an estimate of a LoRA step's memory, kept pure.

The estimate, in bytes, for a micro-batch of n tokens:

    fixed       = weights + 16 · P_adapter + loss_chunk + reserve
    per_token   = a · (L · H  [with gradient checkpointing; without it: L · layer]  + layer) + 4 · (2 · H)
    layer       = 6 · H + 2 · kv + 4 · I          (one decoder layer's saved activations per token)
    memory(n)   = fixed + n · per_token  ≤  usable_fraction · device_bytes

- weights: the loaded base as it sits on the device (bf16, or NF4/int8 with their scales), measured.
- P_adapter: trainable parameters, fp32 weight + gradient + AdamW's two moments = 16 bytes each.
- loss_chunk: the chunked loss's live logits, about 3 × 64 MiB (workers/token_loss.py).
- reserve: the CUDA context, cuBLAS/flash workspaces and allocator fragmentation (1 GiB).
- a: bytes of an activation (2 in bf16). H hidden size, kv = n_kv_heads · head_dim, I the MLP width,
  L layers. With gradient checkpointing each layer keeps only its input (H per token) and one layer's
  activations are rebuilt at a time in backward; without it every layer keeps its activations. A layer
  keeps, per token: its two norms' outputs and the attention input/output (≈ 4H), q and o (2H), k and
  v (2·kv), and the MLP's gate, up, activation and product (4I). The fp32 term is the final norm and the
  hidden-state gradient of the loss positions. Attention itself is O(n) with varlen flash attention.

The estimate is deliberately simple; the loop backs off on a real out-of-memory error (halving the
micro-batch, doubling accumulation), so an optimistic plan costs one retried step, not the job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DecoderShape", "MemoryPlan", "plan_micro_batch"]

_ADAPTER_BYTES_PER_PARAM = 16  # fp32 weight, gradient, AdamW exp_avg and exp_avg_sq
_LOSS_CHUNK_BYTES = 3 * 64 * 2**20
_RESERVE_BYTES = 2**30
USABLE_FRACTION = 0.9


@dataclass(frozen=True)
class DecoderShape:
    """What the activation estimate needs of a decoder-only transformer."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    kv_size: int  # n_key_value_heads × head_dim

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        """From a transformers config (Llama-style field names; an MLP width of 4H where none is given)."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(config.num_hidden_layers, hidden, intermediate, kv_heads * head_dim)

    def layer_bytes_per_token(self, activation_bytes: int) -> int:
        return activation_bytes * (6 * self.hidden_size + 2 * self.kv_size + 4 * self.intermediate_size)


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
    usable_fraction: float = USABLE_FRACTION,
) -> MemoryPlan:
    """The token budget of one micro-batch on a device of `device_bytes` (see the module docstring)."""
    fixed = weights_bytes + _ADAPTER_BYTES_PER_PARAM * n_adapter_params + _LOSS_CHUNK_BYTES + _RESERVE_BYTES
    layer = shape.layer_bytes_per_token(activation_bytes)
    kept = activation_bytes * shape.hidden_size * shape.n_layers if gradient_checkpointing else layer * shape.n_layers
    per_token = kept + layer + 4 * 2 * shape.hidden_size
    budget = math.floor(usable_fraction * device_bytes) - fixed
    return MemoryPlan(device_bytes, fixed, per_token, max(0, budget // per_token))
