"""Attention over packed rows by cumulative segment lengths, never a (T × T) mask: each example attends to itself.

A micro-batch of B rows of T tokens holds segments laid end to end: the packed examples of each row
and, at its end, the row's padding. Flattened to B·T tokens, segment s covers the tokens
cu_seq_lens[s] : cu_seq_lens[s + 1], and for a token t of segment s

    out_t = softmax(q_t · K_sᵀ · scale, causal within s) · V_s

which is what the block-diagonal causal mask computed, without building that mask or computing the
blocks it zeroes. The collator (`workers.packing`, `block_mask="varlen"`) computes `cu_seq_lens_q`
(int32, length n_segments + 1) and `max_length_q` once per micro-batch; transformers passes them
through every decoder layer to the attention function registered here (the same keyword names as its
own flash-attention kwargs). Two kernels, the same math:

- CUDA, bf16/fp16 activations, head_dim ≤ 256, no attention dropout: torch's
  `torch.nn.attention.varlen.varlen_attn`, FlashAttention's variable-length kernel. GQA is native (the
  KV heads are not repeated) and only the diagonal blocks are computed.
- Anywhere else (the CPU, fp32): `scaled_dot_product_attention` on each segment, causal, with GQA —
  exact, and what the tests compare against examples run one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VARLEN_ATTENTION", "use_varlen_attention", "varlen_attention_forward"]

VARLEN_ATTENTION = "lorafleet_varlen"  # the name registered with transformers' AttentionInterface
_FLASH_DTYPES = (torch.bfloat16, torch.float16)
_FLASH_MAX_HEAD_DIM = 256


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    cu_seq_lens_host: tuple[int, ...] | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment of the flattened rows; transformers' attention-function signature.

    query (B, Hq, T, D), key and value (B, Hkv, T, D) → (B, T, Hq, D), as the model's `o_proj` expects.
    """
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError(
            f"the {VARLEN_ATTENTION!r} attention needs cu_seq_lens_q and max_length_q with each batch: "
            "build batches with workers.packing.make_batches(block_mask='varlen')"
        )
    if attention_mask is not None:
        raise ValueError(f"the {VARLEN_ATTENTION!r} attention takes segment lengths, not an attention_mask")
    batch, n_heads, width, head_dim = query.shape
    q = query.transpose(1, 2).reshape(batch * width, n_heads, head_dim)  # (B·T, Hq, D)
    k = key.transpose(1, 2).reshape(batch * width, key.shape[1], head_dim)  # (B·T, Hkv, D)
    v = value.transpose(1, 2).reshape(batch * width, value.shape[1], head_dim)
    gqa = key.shape[1] != n_heads
    p = dropout if module.training else 0.0
    if q.is_cuda and q.dtype in _FLASH_DTYPES and head_dim <= _FLASH_MAX_HEAD_DIM and p == 0.0:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(
            q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q,
            scale=scaling, window_size=(-1, 0), enable_gqa=gqa,
        )
    else:
        # The segment bounds as ints: from the collator when it gave them, else read back (a device sync on CUDA).
        bounds = cu_seq_lens_host if cu_seq_lens_host is not None else tuple(cu_seq_lens_q.tolist())
        out = _per_segment_attention(q, k, v, bounds, scale=scaling, dropout_p=p, gqa=gqa)
    return out.view(batch, width, n_heads, head_dim), None


def _per_segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: tuple[int, ...], *,
    scale: float | None, dropout_p: float, gqa: bool,
) -> torch.Tensor:
    """(N, Hq, D) from one causal SDPA per segment; the exact path (CPU, fp32, attention dropout)."""
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, L, D)
        o = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))  # (L, Hq, D)
    return torch.cat(outs)


def use_varlen_attention(model: nn.Module) -> None:
    """Make `model` (a transformers model) attend with `varlen_attention_forward`; its batches must carry
    `cu_seq_lens_q` and `max_length_q` (make_batches(block_mask="varlen")), and no attention_mask."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    model.set_attn_implementation(VARLEN_ATTENTION)
