"""Several adapters on one base: add, switch, disable, delete, merge; combining adapters.

Linear combination is exact because ranks concatenate: Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …]·[A₁; A₂; …],
so the result is one adapter of rank Σrᵢ with scale 1. TIES (Yadav et al. 2023, arXiv:2306.01708) works on
the dense updates τᵢ = wᵢ·ΔWᵢ of each module: trim every τᵢ to its largest-magnitude fraction ``density``,
elect a sign per entry (sign of Σᵢ trimmed τᵢ), average only the entries that agree with it, then factor
the result back to rank k by SVD (approximate unless k reaches the rank of the merged update).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from lora_core.config import LoraConfig
from lora_core.exceptions import AdapterNotFoundError, LoraError
from lora_core.inject import active_adapters, adapter_configs, add_adapter, lora_layers, replace_submodule

# --- adapters on one base -------------------------------------------------------------------------


def list_adapters(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapters by name (a copy)."""
    return dict(adapter_configs(model))


def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
    """Remove an adapter from every layer; a layer left with no adapter is unwrapped back to its base."""
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    for path, layer in list(lora_layers(model)):
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)
        if not layer.lora_A:
            replace_submodule(model, path, layer.base_layer)
    del configs[adapter_name]
    return model


def disable_adapters(model: nn.Module) -> nn.Module:
    """Pure base output from now on (merged adapters are unmerged first); enable_adapters() undoes it."""
    for _, layer in lora_layers(model):
        layer.unmerge()
        layer.adapters_disabled = True
    return model


def enable_adapters(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.adapters_disabled = False
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with adapters_disabled(model): base_logits = model(x).logits``"""
    disable_adapters(model)
    try:
        yield model
    finally:
        enable_adapters(model)


def merge_adapter(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """W ← W + s·B·A (DoRA: the rescaled W') for the active (or the named) adapter; its branch is skipped.

    Raises QuantizedMergeError on a 4-bit/8-bit base (use export_merged_model instead).
    """
    names = active_adapters(model) if adapter_name is None else (adapter_name,)
    if adapter_name is not None and adapter_name not in adapter_configs(model):
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r}; the model has {sorted(adapter_configs(model))}")
    layers = list(lora_layers(model))
    for _, layer in layers:  # check every layer before touching any weight
        if layer.quantization is not None:
            layer.merge(())  # raises QuantizedMergeError with the remedy
    for _, layer in layers:
        layer.merge(tuple(n for n in names if n in layer.lora_A))
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and replace every LoraLinear by its (now merged) base layer."""
    merge_adapter(model)
    for path, layer in list(lora_layers(model)):
        replace_submodule(model, path, layer.base_layer)
    adapter_configs(model).clear()
    return model


# --- combining adapters ---------------------------------------------------------------------------


def combine_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    new_adapter_name: str,
    *,
    method: str = "linear",
    density: float = 0.2,
    rank: int | None = None,
) -> nn.Module:
    """Add adapter ``new_adapter_name`` combining the given adapters ({name: weight}); not activated.

    method "linear": ΔW = Σ wᵢ·ΔWᵢ exactly (rank Σrᵢ). method "ties": TIES merging of wᵢ·ΔWᵢ with the
    given ``density``, factored to ``rank`` (default Σrᵢ, capped by the layer size). DoRA adapters
    cannot be combined (their magnitude rescaling does not add up).
    """
    configs = adapter_configs(model)
    problems = [f"no adapter named {n!r}" for n in weights if n not in configs]
    problems += [f"adapter {n!r} uses DoRA, which cannot be combined" for n in weights
                 if n in configs and configs[n].use_dora]
    if method not in ("linear", "ties"):
        problems.append(f"method must be 'linear' or 'ties', got {method!r}")
    if method == "linear" and rank is not None:
        problems.append("rank applies to method 'ties' only; a linear combination has rank Σrᵢ")
    if not weights:
        problems.append("weights is empty; give {adapter name: weight}")
    if not 0.0 < density <= 1.0:
        problems.append(f"density must be in (0, 1], got {density}")
    if problems:
        raise LoraError("cannot combine adapters: " + "; ".join(problems))
    layers = [(p, layer) for p, layer in lora_layers(model) if any(n in layer.lora_A for n in weights)]
    total_rank = sum(configs[n].r for n in weights)
    new_rank = rank or total_rank
    config = LoraConfig(r=new_rank, alpha=new_rank, target_modules=tuple(p for p, _ in layers))  # scale 1
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for path, layer in layers:
            present = [n for n in weights if n in layer.lora_A]
            if method == "linear":
                A = torch.zeros(new_rank, layer.in_features)
                B = torch.zeros(layer.out_features, new_rank)
                row = 0
                for name in weights:  # absent adapters leave zero rows/columns: still exact
                    r = configs[name].r
                    if name in present:
                        A[row:row + r] = layer.lora_A[name].float().cpu()
                        B[:, row:row + r] = layer.lora_B[name].float().cpu() * (weights[name] * layer.scale[name])
                    row += r
            else:
                deltas = [layer.delta_weight(n).float().cpu() * weights[n] for n in present]
                B, A = _factor(ties_merge(deltas, density), new_rank)
            factors[path] = (A, B)
    add_adapter(model, config, new_adapter_name)
    with torch.no_grad():
        for path, (A, B) in factors.items():
            layer = model.get_submodule(path)
            layer.lora_A[new_adapter_name].copy_(A)
            layer.lora_B[new_adapter_name].copy_(B)
    return model


def ties_merge(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES: trim each update to its top ``density`` fraction by |value|, elect signs, disjoint mean."""
    stacked = torch.stack(deltas)  # (n, out, in)
    flat = stacked.reshape(len(deltas), -1)
    keep = max(1, int(round(density * flat.shape[1])))
    threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
    trimmed = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(trimmed.sum(dim=0))  # elected sign per entry
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return (total / count).reshape(stacked.shape[1:])


def _factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out×k), A (k×in) with B·A the best rank-k approximation of delta; k = min(rank, layer size)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    B = torch.zeros(delta.shape[0], rank)
    A = torch.zeros(rank, delta.shape[1])
    B[:, :k] = U[:, :k] * root
    A[:k] = root[:, None] * Vh[:k]
    return B, A
