"""LoraLinear: a frozen linear layer plus named low-rank adapters, h = W0·x + s·B·A·dropout(x).

LoRA (Hu et al. 2021, arXiv:2106.09685) with PEFT's numerics, so adapters move between PEFT and us:
    A: r×in,  kaiming_uniform(a=√5) (PEFT's default) or N(0, (1/r)²) ("gaussian")
    B: out×r, zeros, so a fresh adapter leaves the output bit-identical
    s = α/r, or α/√r with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732)
    h = W0·x + s·B·(A·dropout(x))        dropout on the adapter branch input only
The branch is computed as ((dropout(x)·Aᵀ)·s)·Bᵀ and added in place to W0·x: the scale touches the
r-wide intermediate and the addition is one fused addmm, so no extra output-sized tensor is made.
Adapter parameters are fp32 whatever the base dtype. Without autocast the branch is computed in fp32
and the sum is rounded once to the base output's dtype, as PEFT does; under `torch.autocast` (bf16 on
a GPU) the branch's matmuls run in the autocast dtype like the rest of the model, and the adapter
gradients still come back fp32 (see _LoraDelta). Dropout runs in the base dtype, and the input is
saved for backward in the base dtype rather than as an fp32 copy.

DoRA (Liu et al. 2024, arXiv:2402.09353), as PEFT computes it:
    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row      m: out, initialised to ‖W0‖_row
    h  = W0·x + (m/n - 1)·(W0·x̃) + (m/n)·s·B·A·x̃    n = ‖W0 + s·B·A‖_row, detached (paper §4.3)
where x̃ = dropout(x). Merging writes W' (DoRA) or W0 + s·B·A (LoRA) into a dense base weight;
quantized (bitsandbytes 4-bit / 8-bit) weights refuse to merge rather than silently re-quantize.

Token routing (co-training several adapters on one base in one forward pass): with `routes` set
(lora_core.inject.route_tokens), adapter a applies only to the tokens start_a:end_a of the flattened
(B·T) input, h_t = W0·x_t + s_a·B_a·A_a·dropout_a(x_t) for t in a's range and W0·x_t elsewhere, so no
adapter sees another's tokens. A route may also carry a dropout seed: the mask is then drawn from a
generator seeded by it alone (not the global RNG), so it is the same however many other adapters share
the pass, and the same again when gradient checkpointing recomputes the forward in the backward pass.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora_core.config import LoraConfig
from lora_core.exceptions import AdapterNotFoundError, QuantizedMergeError

_ADAPTER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D (transformers.pytorch_utils.Conv1D): a linear layer stored as W0ᵀ (in×out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def quantization_of(module: nn.Module) -> str | None:
    """'nf4'/'fp4' for a bitsandbytes Linear4bit, 'int8' for Linear8bitLt, None for a dense layer."""
    name = type(module).__name__
    if type(module).__module__.startswith("bitsandbytes"):
        if name.startswith("Linear4bit") or name in ("LinearNF4", "LinearFP4"):
            state = getattr(module.weight, "quant_state", None)
            return getattr(state, "quant_type", "nf4") if state is not None else "nf4"
        if name.startswith("Linear8bit"):
            return "int8"
    return None


def is_supported_linear(module: nn.Module) -> bool:
    """Layers LoraLinear can wrap: nn.Linear (incl. bitsandbytes Linear4bit / Linear8bitLt) and Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def keep_trainable_4bit_layout(module: nn.Module) -> None:
    """Stop bitsandbytes from repacking a Linear4bit weight for CPU inference.

    On a CPU with AVX512-BF16, bitsandbytes ≥ 0.49 repacks a Linear4bit's weight in place on its first
    eval-mode forward without grad. The repacked weight goes through an inference-only kernel (a later
    training step would get no input gradient through the layer), undoing it re-quantizes the absmax
    (the base changes), and it fails outright when in_features is not a multiple of the block size.
    A training stack evaluates between steps, so it keeps the trainable layout.
    """
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a dense (out, in) tensor; dequantized for bitsandbytes layers (a new tensor)."""
    weight = base.weight
    kind = quantization_of(base)
    if kind in ("nf4", "fp4"):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "int8":
        scale = getattr(weight, "SCB", None)
        if scale is None:
            scale = base.state.SCB
        return weight.data.float() * (scale.float().view(-1, 1) / 127.0)
    return weight.T if is_conv1d(base) else weight


@dataclass(frozen=True)
class TokenRoute:
    """Where one adapter applies in a routed forward pass: tokens start:end of the flattened (B·T) input.

    `dropout_seed`: seeds this adapter's dropout mask (one generator per layer and forward, see
    route_tokens), so the mask depends on the seed and the shape of the range only; None: nn.Dropout
    on the global RNG.
    """

    start: int = 0
    end: int | None = None  # None: to the last token
    dropout_seed: int | None = None


def _dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """A bool keep-mask of `shape` ((N, in): drawn over the elements in order), each True with probability 1-p.

    Drawn from a generator seeded by `seed` alone: the same seed and shape give the same mask whatever
    else runs, which is what makes a checkpointed recomputation, or an adapter trained alone and in a
    group, see the same dropout.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=generator)


def _add_into(out: torch.Tensor, t: torch.Tensor, B: torch.Tensor) -> None:
    """out ← out + t·Bᵀ in place (t: N×r, B: out×r, both in the branch dtype), summed in the wider dtype."""
    if out.dtype == t.dtype:
        out.addmm_(t, B.T)
    else:  # e.g. a bf16 base without autocast: sum in fp32 as PEFT does, round once into the output
        wide = torch.promote_types(out.dtype, t.dtype)
        out.copy_(torch.addmm(out.to(wide), t.to(wide), B.to(wide).T))


class _LoraDelta(torch.autograd.Function):
    """out ← out + ((x·Aᵀ)·s)·Bᵀ in place, saving x in its own dtype. One autograd node.

    Precision: the branch's matmuls run in the *branch dtype*: the autocast dtype when the forward
    runs under `torch.autocast` (bf16 on a GPU, as every other matmul of the model and as PEFT's
    branch does), otherwise the adapters' dtype (fp32). Autograd runs backward outside autocast, so
    both passes cast explicitly to the dtype the forward chose (kept as t's dtype); A and B stay fp32
    and their gradients are returned in fp32. The sum with the base output is taken in the wider of
    the two dtypes and rounded once into the base output (a bf16 base without autocast: fp32, as PEFT).

    Forward: t = (x·Aᵀ)·s (N×r, the scale costs r multiplies per row, not out) and one addmm into the
    base output, so no output-sized temporary exists when the dtypes agree. Saved for backward: x as
    it came (the same tensor the base layer saved, so no extra memory; a bf16 x stays bf16 instead of
    an fp32 copy per adapted layer) and t (N×r). Backward with g = ∂L/∂out:
        ∂L/∂t = g·B·s   ∂L/∂B = gᵀ·t   ∂L/∂A = (∂L/∂t)ᵀ·x   ∂L/∂x += (∂L/∂t)·A   ∂L/∂out_base = g
    The base output is modified in place: linear and 4-bit matmul backward never read their output,
    and autograd raises (never miscomputes) if something did.
    """

    @staticmethod
    def forward(ctx, out, x, A, B, scale):
        device_type = x.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else A.dtype  # the branch dtype
        with torch.autocast(device_type, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in); a no-op when x has the branch dtype
            t = (rows @ A.to(dtype).T).mul_(scale)  # (N, r)
            flat = out.view(-1, out.shape[-1])  # (N, out)
            wide = torch.promote_types(out.dtype, dtype)
            if out.dtype == dtype:
                flat.addmm_(t, B.to(dtype).T)
            else:  # e.g. a bf16 base without autocast: sum in fp32 as PEFT does, round once into the output
                flat.copy_(torch.addmm(flat.to(wide), t.to(wide), B.to(wide).T))
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, A, B, t)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, t = ctx.saved_tensors
        dtype = t.dtype  # the branch dtype the forward ran in
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)  # (N, out)
            grad_t = (g @ B.to(dtype)).mul_(ctx.scale)  # (N, r)
            grad_A = grad_B = grad_x = None
            if ctx.needs_input_grad[2]:
                grad_A = (grad_t.T @ x.reshape(-1, x.shape[-1]).to(dtype)).to(A.dtype)
            if ctx.needs_input_grad[3]:
                grad_B = (g.T @ t).to(B.dtype)
            if ctx.needs_input_grad[1]:
                grad_x = (grad_t @ A.to(dtype)).to(x.dtype).view(x.shape)
        return grad_out, grad_x, grad_A, grad_B, None


class _RoutedLoraDelta(torch.autograd.Function):
    """For every routed adapter i: out[sᵢ] ← out[sᵢ] + ((dropoutᵢ(x[sᵢ])·Aᵢᵀ)·scaleᵢ)·Bᵢᵀ, in place, one node.

    The math and precision of _LoraDelta, for several adapters on their own row ranges sᵢ of the
    flattened input at once. One node instead of one per adapter on a view of `out`: in-place updates
    of views would make autograd copy the whole output gradient once per adapter (CopySlices), and
    each slice of x would get a zero-filled input gradient of its own. Dropout (the seeded mask,
    `_dropout_mask`) is applied here too; the mask is saved, and x̃ᵢ recomputed from x in backward.
    Arguments after x: spans ((start, stop) per adapter), scales, drops ((p, seed) or None), then
    A₀, B₀, A₁, B₁, ...
    """

    @staticmethod
    def forward(ctx, out, x, spans, scales, drops, *weights):
        device_type = x.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast_on else weights[0].dtype  # the branch dtype
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        flat = out.view(-1, out.shape[-1])  # (N, out)
        ts, masks = [], []
        with torch.autocast(device_type, enabled=False):
            for i, ((start, stop), scale, drop) in enumerate(zip(spans, scales, drops, strict=True)):
                A, B = weights[2 * i], weights[2 * i + 1]
                x_i = rows[start:stop]  # (Nᵢ, in)
                if drop is not None:
                    masks.append(_dropout_mask(x_i.shape, drop[0], drop[1], x_i.device))
                    x_i = x_i * masks[-1] * (1.0 / (1.0 - drop[0]))  # the base dtype, as nn.Dropout
                t = (x_i.to(dtype) @ A.to(dtype).T).mul_(scale)  # (Nᵢ, r)
                _add_into(flat[start:stop], t, B.to(dtype))
                ts.append(t)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, *weights, *ts, *masks)
        ctx.spans, ctx.scales, ctx.drops = spans, scales, drops
        ordered = sorted(spans)
        ctx.covers_all = ordered[0][0] == 0 and ordered[-1][1] == rows.shape[0] and all(
            a[1] == b[0] for a, b in zip(ordered, ordered[1:], strict=False))  # each row exactly once
        return out

    @staticmethod
    def backward(ctx, grad_out):
        n = len(ctx.spans)
        x, *saved = ctx.saved_tensors
        weights, ts, masks = saved[: 2 * n], saved[2 * n : 3 * n], iter(saved[3 * n :])
        dtype = ts[0].dtype
        rows = x.reshape(-1, x.shape[-1])
        g_out = grad_out.reshape(-1, grad_out.shape[-1])
        grad_rows = None
        if ctx.needs_input_grad[1]:
            grad_rows = torch.empty_like(rows) if ctx.covers_all else torch.zeros_like(rows)
        grads: list[torch.Tensor | None] = []
        with torch.autocast(grad_out.device.type, enabled=False):
            for i, ((start, stop), scale, drop) in enumerate(zip(ctx.spans, ctx.scales, ctx.drops, strict=True)):
                A, B, t = weights[2 * i], weights[2 * i + 1], ts[i]
                mask = next(masks) if drop is not None else None
                g = g_out[start:stop].to(dtype)  # (Nᵢ, out)
                grad_t = (g @ B.to(dtype)).mul_(scale)  # (Nᵢ, r)
                grad_A = grad_B = None
                if ctx.needs_input_grad[5 + 2 * i]:
                    x_i = rows[start:stop] if mask is None else rows[start:stop] * mask * (1.0 / (1.0 - drop[0]))
                    grad_A = (grad_t.T @ x_i.to(dtype)).to(A.dtype)
                if ctx.needs_input_grad[6 + 2 * i]:
                    grad_B = (g.T @ t).to(B.dtype)
                grads += [grad_A, grad_B]
                if grad_rows is not None:
                    grad_x = grad_t @ A.to(dtype)  # (Nᵢ, in)
                    if mask is not None:
                        grad_x = grad_x * mask * (1.0 / (1.0 - drop[0]))
                    if ctx.covers_all:
                        grad_rows[start:stop] = grad_x
                    else:
                        grad_rows[start:stop] += grad_x
        grad_x = grad_rows.view(x.shape) if grad_rows is not None else None
        return grad_out, grad_x, None, None, None, *grads


class LoraLinear(nn.Module):
    """A frozen base linear layer with zero or more named adapters; one or more of them active.

    Holds per adapter: lora_A[name] (r×in), lora_B[name] (out×r), scale[name], lora_dropout[name] and,
    for DoRA, lora_magnitude[name] (out). Output of the forward pass:
        base(x) + Σ_active (dropout(x) @ A.T @ B.T) * scale
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_supported_linear(base_layer):
            raise TypeError(f"LoraLinear wraps nn.Linear, bitsandbytes Linear4bit/8bitLt or Conv1D, "
                            f"not {type(base_layer).__name__}")
        self.base_layer = base_layer
        keep_trainable_4bit_layout(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base_layer.weight.shape
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scale: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.adapters_disabled = False
        self.merged_adapters: list[str] = []
        self._merged_dora_norms: dict[str, torch.Tensor] = {}
        # Set by lora_core.inject.route_tokens: which adapters apply to which tokens; None: all active, everywhere.
        self.routes: dict[str, TokenRoute] | None = None

    # The wrapped layer still looks like a linear layer to code that inspects it.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def quantization(self) -> str | None:
        return quantization_of(self.base_layer)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.lora_A.keys())

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Create adapter ``name`` (A random, B zero, so it starts as an exact no-op); not activated."""
        if not _ADAPTER_NAME.match(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-' (no dots), "
                             "starting with a letter or '_'")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        device = self.base_layer.weight.device
        A = torch.empty(config.r, self.in_features, device=device, dtype=torch.float32)
        if config.init == "gaussian":
            nn.init.normal_(A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        B = torch.zeros(self.out_features, config.r, device=device, dtype=torch.float32)  # B = 0: exact no-op
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scale[name] = config.scale
        self.rank[name] = config.r
        if config.use_dora:
            with torch.no_grad():
                magnitude = self._row_norm(name)
            self.lora_magnitude[name] = nn.Parameter(magnitude)

    def delete_adapter(self, name: str) -> None:
        self._require(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weight; unmerge it before deleting it")
        for store in (self.lora_A, self.lora_B, self.lora_magnitude, self.lora_dropout):
            if name in store:
                del store[name]
        del self.scale[name], self.rank[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def set_active_adapters(self, names: tuple[str, ...]) -> None:
        for name in names:
            self._require(name)
        self.active_adapters = tuple(names)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.adapters_disabled:
            return out
        if self.routes is not None:
            return self._add_routed(out, x)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue  # already inside the base weight
            if name in self.lora_magnitude:
                out = self._add_dora(out, x, name)
            else:
                out = self._add_lora(out, x, name)
        return out

    def _add_routed(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out with each routed adapter's branch added on its own tokens only (the rows of the flattened input)."""
        if not out.is_contiguous():
            out = out.contiguous()
        rows = x.reshape(-1, x.shape[-1])  # (N, in), N = B·T
        # Kept a tensor of its own, never a view: an in-place update of a view makes autograd copy the
        # whole output gradient in backward.
        target = out
        spans, scales, drops, weights = [], [], [], []
        for name, route in self.routes.items():
            if name not in self.lora_A:
                continue  # this adapter does not target this layer
            start, stop = route.start, rows.shape[0] if route.end is None else route.end
            dropout = self.lora_dropout[name]
            active_dropout = isinstance(dropout, nn.Dropout) and dropout.training
            if name in self.lora_magnitude:  # DoRA is computed out of place: put its rows back between the others
                flat = target.view(-1, self.out_features)
                part = self._add_dora(flat[start:stop], rows[start:stop], name, route.dropout_seed)
                target = torch.cat([flat[:start], part, flat[stop:]])  # (N, out)
            elif active_dropout and route.dropout_seed is None:  # nn.Dropout on the global RNG: on its own
                self._add_lora(target.view(-1, self.out_features)[start:stop], rows[start:stop], name)
            else:  # the usual case: every such adapter of the layer in one node, below
                spans.append((start, stop))
                scales.append(self.scale[name])
                drops.append((dropout.p, route.dropout_seed) if active_dropout else None)
                weights += [self.lora_A[name], self.lora_B[name]]
        if spans:
            target = _RoutedLoraDelta.apply(target, x, tuple(spans), tuple(scales), tuple(drops), *weights)
        return target.view(out.shape)

    def _dropout(self, x: torch.Tensor, name: str, seed: int | None) -> torch.Tensor:
        """The adapter's dropout of its branch input: nn.Dropout, or a mask drawn from `seed` (see TokenRoute)."""
        dropout = self.lora_dropout[name]
        if seed is None or not isinstance(dropout, nn.Dropout) or not dropout.training:
            return dropout(x)
        rows = x.reshape(-1, x.shape[-1])  # (N, in): the mask is drawn over the flattened rows
        return (rows * _dropout_mask(rows.shape, dropout.p, seed, x.device) * (1.0 / (1.0 - dropout.p))).view(x.shape)

    def _add_lora(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """out + (dropout(x) @ A.T @ B.T) * scale, computed by _LoraDelta (see there for how)."""
        x_tilde = self.lora_dropout[name](x)  # (..., in), the base dtype: dropout on the branch input only
        if not out.is_contiguous():
            out = out.contiguous()
        return _LoraDelta.apply(out, x_tilde, self.lora_A[name], self.lora_B[name], self.scale[name])

    def _add_dora(self, out: torch.Tensor, x: torch.Tensor, name: str, seed: int | None = None) -> torch.Tensor:
        A, B, m, s = self.lora_A[name], self.lora_B[name], self.lora_magnitude[name], self.scale[name]
        dropout = self.lora_dropout[name]
        x_tilde = self._dropout(x.to(A.dtype), name, seed)  # (..., in)
        weight = dense_weight(self.base_layer).to(A.dtype)  # (out, in)
        with torch.no_grad():  # n is a constant for the gradient (DoRA §4.3)
            norm = torch.linalg.vector_norm(weight + s * (B @ A), dim=1)  # (out,)
        gain = m / norm  # (out,)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = out.to(A.dtype) if bias is None else out.to(A.dtype) - bias.to(A.dtype)  # W0·x
        else:
            base = F.linear(x_tilde, weight)  # W0·x̃
        lora = (x_tilde @ A.T @ B.T) * s  # (..., out)
        result = out.to(A.dtype) + (gain - 1) * base + gain * lora
        return result.to(out.dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = s·B·A as an fp32 (out, in) tensor."""
        self._require(name)
        return (self.lora_B[name] @ self.lora_A[name]) * self.scale[name]

    def _row_norm(self, name: str) -> torch.Tensor:
        weight = dense_weight(self.base_layer).to(torch.float32)
        return torch.linalg.vector_norm(weight + self.delta_weight(name).detach(), dim=1)

    @torch.no_grad()
    def merge(self, names: tuple[str, ...] | None = None) -> None:
        """Write the given (default: active) adapters into the base weight: W ← W + s·B·A (DoRA: W').

        A DoRA adapter takes its norm on the unmerged base weight (as its forward does, and as PEFT
        does), even when other adapters were merged before it: W ← (m/‖W0 + ΔW‖)·(W + ΔW).
        """
        names = self.active_adapters if names is None else names
        if self.quantization is not None:
            raise QuantizedMergeError(
                f"cannot merge into a {self.quantization} quantized weight: it would be silently "
                "re-quantized and lose precision. Export a dense merged model instead with "
                "lora_core.export_merged_model(model, out_dir, dtype=torch.bfloat16)."
            )
        for name in names:
            self._require(name)
            if name in self.merged_adapters:
                continue
            weight = self._dense_weight_view()  # (out, in) view of the base parameter
            merged = weight.float() + self.delta_weight(name)
            if name in self.lora_magnitude:
                base = self._unmerged_weight() if self.merged_adapters else weight.float()  # W0
                norm = torch.linalg.vector_norm(base + self.delta_weight(name), dim=1)
                self._merged_dora_norms[name] = norm
                merged = (self.lora_magnitude[name] / norm).view(-1, 1) * merged
            weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (exact up to floating-point rounding)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self._dense_weight_view()
            restored = self._take_out(weight.float(), name)
            self._merged_dora_norms.pop(name, None)
            weight.copy_(restored.to(weight.dtype))

    def _take_out(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """`weight` (fp32, (out, in)) with merged adapter `name` taken back out."""
        if name in self.lora_magnitude:
            norm = self._merged_dora_norms[name]
            weight = weight / (self.lora_magnitude[name] / norm).view(-1, 1)
        return weight - self.delta_weight(name)

    def _unmerged_weight(self) -> torch.Tensor:
        """W0 in fp32: a copy of the base weight with every merged adapter taken out, newest first."""
        weight = self._dense_weight_view().float().clone()
        for name in reversed(self.merged_adapters):
            weight = self._take_out(weight, name)
        return weight

    def _dense_weight_view(self) -> torch.Tensor:
        weight = self.base_layer.weight.data
        return weight.T if self.fan_in_fan_out else weight

    def _require(self, name: str) -> None:
        if name not in self.lora_A:
            raise AdapterNotFoundError(f"no adapter {name!r} on this layer; it has {list(self.lora_A.keys())}")

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank[n]}" for n in self.lora_A)
        active = list(self.active_adapters)
        return f"in={self.in_features}, out={self.out_features}, adapters=[{ranks}], active={active}"
