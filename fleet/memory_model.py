"""The memory of a LoRA training step, term by term, from a decoder's shape: pure arithmetic, no torch.

Both the GPU's micro-batch planner (workers.memory_plan) and the cost estimate before a job runs
(fleet.estimate) take their numbers from here, so the two cannot drift. Bytes, for a micro-batch of
n tokens on one device:

    weights          the frozen base as it sits on the device (`base_weight_bytes`, by quantization)
    adapter state    P trainable parameters · (4 fp32 weight + 4 gradient + 8 AdamW's two moments)
    activations      n · per_token                                       (`activation_bytes_per_token`)
    per_token        a·(L·H [checkpointing; without it L·layer] + layer) + 4·(2·H) + dropout
    layer            a·(6·H + 2·kv + 4·I)       one decoder layer's saved activations per token
    dropout          Σ over one layer's adapted matrices of in·(a + 1) (LoRA dropout's output and its
                     bool mask; every layer's without checkpointing), 0 when dropout is 0
    loss logits      `loss_logits_bytes`: the chunked loss's live (rows × V) logits, at most 64 MiB of
                     fp32 a chunk (workers/token_loss.py): 1 copy in fp32, 3 with bf16 activations
                     (the bf16 logits, their fp32 copy and the bf16 softmax for ∂ℓ/∂h, rounded up)
    reserve          the CUDA context, cuBLAS/flash workspaces and allocator fragmentation (1 GiB)

a: bytes of an activation (2 in bf16, 4 in fp32). H hidden size, kv = n_kv_heads · head_dim, I the MLP
width, L layers. With gradient checkpointing each layer keeps only its input (H per token) and one
layer's activations are rebuilt at a time in backward. A layer keeps, per token: its two norms' outputs
and the attention input/output (≈ 4H), q and o (2H), k and v (2·kv), and the MLP's gate, up,
activation and product (4I). The fp32 term is the final norm and the hidden-state gradient of the loss
positions. Attention is O(n): varlen flash attention on a GPU, per-example SDPA on the CPU.

NF4 weights (QLoRA, double quantization, blocks of 64): 4 bits a weight, one 8-bit absmax per block,
one fp32 absmax per 256 blocks of those, and two small code tables per matrix; int8 (LLM.int8()): a byte a weight and an
fp32 scale per output row. Embeddings, the output head and the norms stay in the compute dtype.
An int8 base also keeps every layer's linear inputs through checkpointing (`int8_kept_input_bytes_per_token`:
bitsandbytes holds them on its autograd context, out of checkpointing's reach).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADAPTER_BYTES_PER_PARAM",
    "ADAMW_BYTES_PER_PARAM",
    "GRADIENT_BYTES_PER_PARAM",
    "LLAMA_STYLE_LINEARS",
    "LOSS_CHUNK_BYTES",
    "RESERVE_BYTES",
    "WEIGHT_BYTES_PER_PARAM",
    "BaseModelShape",
    "DecoderShape",
    "activation_bytes_per_token",
    "base_weight_bytes",
    "dora_activation_bytes",
    "dropout_bytes_per_token",
    "int8_kept_input_bytes_per_token",
    "loss_logits_bytes",
]

WEIGHT_BYTES_PER_PARAM = 4  # adapters are fp32 whatever the base dtype (lora_core.layers)
GRADIENT_BYTES_PER_PARAM = 4
ADAMW_BYTES_PER_PARAM = 8  # exp_avg and exp_avg_sq, fp32
ADAPTER_BYTES_PER_PARAM = WEIGHT_BYTES_PER_PARAM + GRADIENT_BYTES_PER_PARAM + ADAMW_BYTES_PER_PARAM
LOSS_CHUNK_BYTES = 64 * 2**20  # fp32 logits of one chunk (workers.token_loss._CHUNK_LOGITS_BYTES)
RESERVE_BYTES = 2**30

_NF4_BLOCK = 64  # weights per absmax (bitsandbytes' 4-bit blocksize)
_NF4_BLOCKS_PER_STAT = 256  # absmaxes per second-level fp32 absmax (double quantization)
_NF4_CODE_TABLES_BYTES = 4 * (16 + 256)  # quant_map and nested_quant_map, fp32, per matrix

# A Llama-style decoder block's linear layers: name → (in, out) in terms of the shape.
LLAMA_STYLE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderShape:
    """What the activation estimate needs of a decoder-only transformer."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    kv_size: int  # n_key_value_heads × head_dim

    @classmethod
    def from_config(cls, config: Any) -> DecoderShape:
        """From a transformers config (Llama-style field names; an MLP width of 4H where none is given)."""
        hidden, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
        return cls(config.num_hidden_layers, hidden, intermediate, kv_heads * head_dim)

    def layer_bytes_per_token(self, activation_bytes: int) -> int:
        return activation_bytes * (6 * self.hidden_size + 2 * self.kv_size + 4 * self.intermediate_size)


@dataclass(frozen=True)
class BaseModelShape:
    """A Llama-style base model's sizes, as its config.json states them (what the estimate needs)."""

    decoder: DecoderShape
    q_size: int  # n_attention_heads × head_dim
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config_json(cls, config: dict[str, Any]) -> BaseModelShape:
        """From config.json's fields; ValueError naming every field it lacks."""
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [name for name in required if not isinstance(config.get(name), int)]
        if missing:
            raise ValueError(f"its config.json has no {', '.join(missing)}")
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        kv_heads = config.get("num_key_value_heads") or heads
        decoder = DecoderShape(config["num_hidden_layers"], hidden, config["intermediate_size"], kv_heads * head_dim)
        return cls(decoder, heads * head_dim, config["vocab_size"], bool(config.get("tie_word_embeddings", False)))

    def linear_shapes(self, names: list[str] | tuple[str, ...]) -> list[tuple[int, int]]:
        """(in, out) of each named linear layer of a decoder block; ValueError naming those a Llama-style
        block does not have."""
        d = self.decoder
        known = {
            "q_proj": (d.hidden_size, self.q_size),
            "k_proj": (d.hidden_size, d.kv_size),
            "v_proj": (d.hidden_size, d.kv_size),
            "o_proj": (self.q_size, d.hidden_size),
            "gate_proj": (d.hidden_size, d.intermediate_size),
            "up_proj": (d.hidden_size, d.intermediate_size),
            "down_proj": (d.intermediate_size, d.hidden_size),
        }
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"the shape of target module(s) {', '.join(unknown)} is not known for a Llama-style block")
        return [known[n] for n in names]

    def other_params(self) -> int:
        """Embeddings, the output head (unless tied) and the norms: what no quantization touches."""
        d = self.decoder
        embeddings = self.vocab_size * d.hidden_size * (1 if self.tie_word_embeddings else 2)
        return embeddings + (2 * d.n_layers + 1) * d.hidden_size


def base_weight_bytes(shape: BaseModelShape, quantization: str | None, dense_bytes: int = 2) -> int:
    """The frozen base on the device: the decoder's linear weights in `quantization` ("nf4", "int8", or
    None/"none": dense), everything else in the compute dtype (`dense_bytes` a parameter)."""
    matrices = shape.linear_shapes(LLAMA_STYLE_LINEARS) * shape.decoder.n_layers
    if quantization == "nf4":
        quantized = sum(_nf4_bytes(i * o) for i, o in matrices)
    elif quantization == "int8":
        quantized = sum(i * o + 4 * o for i, o in matrices)
    elif quantization in (None, "none"):
        quantized = sum(dense_bytes * i * o for i, o in matrices)
    else:
        raise ValueError(f"quantization must be 'nf4', 'int8' or 'none', got {quantization!r}")
    return quantized + dense_bytes * shape.other_params()


def _nf4_bytes(n_weights: int) -> int:
    """One NF4 matrix as bitsandbytes stores it: two weights a byte, a uint8 absmax per block of 64,
    an fp32 absmax per 256 of those, and the two code tables (16 and 256 fp32 values)."""
    blocks = math.ceil(n_weights / _NF4_BLOCK)
    return math.ceil(n_weights / 2) + blocks + 4 * math.ceil(blocks / _NF4_BLOCKS_PER_STAT) + _NF4_CODE_TABLES_BYTES


def activation_bytes_per_token(shape: DecoderShape, activation_bytes: int, gradient_checkpointing: bool) -> int:
    """Saved activations per token of the micro-batch, without LoRA dropout (see the module docstring)."""
    layer = shape.layer_bytes_per_token(activation_bytes)
    kept = activation_bytes * shape.hidden_size * shape.n_layers if gradient_checkpointing else layer * shape.n_layers
    return kept + layer + 4 * 2 * shape.hidden_size


def dropout_bytes_per_token(adapted_in_features_per_layer: int, *, n_layers: int, activation_bytes: int,
                            dropout: float, gradient_checkpointing: bool) -> int:
    """LoRA dropout's saved output and bool mask per token: one layer's adapted inputs with
    checkpointing, every layer's without; 0 when there is no dropout (the branch reuses x)."""
    if dropout <= 0:
        return 0
    layers = 1 if gradient_checkpointing else n_layers
    return layers * adapted_in_features_per_layer * (activation_bytes + 1)


def int8_kept_input_bytes_per_token(shape: BaseModelShape, activation_bytes: int, gradient_checkpointing: bool) -> int:
    """What an int8 base adds per token: bitsandbytes' int8 matmul keeps its input on its autograd
    context (not as a saved tensor), so gradient checkpointing cannot drop it, and every layer's inputs
    of its quantized linears stay until backward: one for q/k/v, one for gate/up, o's and down's.
    Without checkpointing they are among a layer's saved activations already (0 here)."""
    if not gradient_checkpointing:
        return 0
    d = shape.decoder
    return d.n_layers * activation_bytes * (2 * d.hidden_size + shape.q_size + d.intermediate_size)


def dora_activation_bytes(n_tokens: int, adapted_per_layer: list[tuple[int, int]], *, n_layers: int,
                          gradient_checkpointing: bool) -> int:
    """DoRA's extra: each adapted layer builds its dense weight in fp32 (in·out) and fp32 copies of its
    input and of three output-sized terms per token; one layer at a time with checkpointing."""
    layers = 1 if gradient_checkpointing else n_layers
    per_layer = sum(4 * i * o + 4 * n_tokens * (i + 3 * o) for i, o in adapted_per_layer)
    return layers * per_layer


def loss_logits_bytes(activation_bytes: int, *, n_positions: int | None = None, vocab_size: int | None = None) -> int:
    """The chunked loss's live logits: a full 64 MiB fp32 chunk, or less when the micro-batch's
    `n_positions` × `vocab_size` fp32 logits are smaller; 1 copy in fp32, 3 with bf16 activations."""
    copies = 1 if activation_bytes >= 4 else 3
    chunk = LOSS_CHUNK_BYTES
    if n_positions is not None and vocab_size is not None:
        chunk = min(chunk, 4 * n_positions * vocab_size)
    return copies * chunk
