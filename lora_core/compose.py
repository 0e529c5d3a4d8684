"""Several adapters on one base: add, switch, disable, delete, merge; combining adapters; the rank report.

Linear combination is exact because ranks concatenate: Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …]·[A₁; A₂; …],
so the result is one adapter of rank Σrᵢ with scale 1. TIES (Yadav et al. 2023, arXiv:2306.01708) works on
the dense updates τᵢ = wᵢ·ΔWᵢ of each module: trim every τᵢ to its largest-magnitude fraction ``density``,
elect a sign per entry (sign of Σᵢ trimmed τᵢ), average only the entries that agree with it, then factor
the result back to rank k by SVD (approximate unless k reaches the rank of the merged update).

Rank report: ΔW = s·B·A has rank ≤ r, and its singular values come from the small factors. With
B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), ΔW = s·Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, and Q_B, Q_A have orthonormal columns,
so σ(ΔW) = s·σ(R_B·R_Aᵀ), an r×r SVD. The effective rank at e % is the smallest k whose σ₁²+…+σ_k²
reach e % of Σσ²: how many of the r directions the update actually uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

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


# --- rank report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleRank:
    """Spectrum of ΔW for one adapted module."""

    module: str
    r: int
    singular_values: tuple[float, ...]
    effective_rank_90: int
    effective_rank_99: int
    verdict: str


@dataclass(frozen=True)
class RankReport:
    adapter: str
    modules: tuple[ModuleRank, ...]
    verdict: str

    def __str__(self) -> str:
        lines = [f"rank report for adapter {self.adapter!r}: {self.verdict}",
                 f"{'module':<48} {'r':>4} {'eff90':>6} {'eff99':>6}  verdict"]
        for m in self.modules:
            lines.append(f"{m.module:<48} {m.r:>4} {m.effective_rank_90:>6} {m.effective_rank_99:>6}  {m.verdict}")
        return "\n".join(lines)


def singular_values_of_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """σ(s·B·A) from the factors alone: s·σ(R_B·R_Aᵀ) with B = Q_B·R_B, Aᵀ = Q_A·R_A. O((in+out)·r²)."""
    R_B = torch.linalg.qr(B.double(), mode="r").R  # (r, r)
    R_A = torch.linalg.qr(A.double().T, mode="r").R  # (r, r)
    return abs(scale) * torch.linalg.svdvals(R_B @ R_A.T)


def effective_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k with σ₁²+…+σ_k² ≥ energy·Σσ² (0 for a zero update)."""
    power = singular_values.double() ** 2
    total = power.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1


def rank_report(model: nn.Module, adapter_name: str | None = None) -> RankReport:
    """Per adapted module: σ(ΔW), effective rank at 90 %/99 % energy and a verdict; plus an overall verdict.

    For DoRA adapters it describes the direction update s·B·A (the magnitude rescaling is not included).
    """
    configs = adapter_configs(model)
    if adapter_name is None:
        active = active_adapters(model)
        if len(active) != 1:
            raise AdapterNotFoundError(f"name the adapter to report on; active adapters: {list(active)}")
        adapter_name = active[0]
    if adapter_name not in configs:
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
    modules = []
    with torch.no_grad():
        for path, layer in lora_layers(model):
            if adapter_name not in layer.lora_A:
                continue
            r = layer.rank[adapter_name]
            sv = singular_values_of_delta(layer.lora_A[adapter_name], layer.lora_B[adapter_name],
                                          layer.scale[adapter_name])
            e90, e99 = effective_rank(sv, 0.90), effective_rank(sv, 0.99)
            modules.append(ModuleRank(path, r, tuple(float(v) for v in sv), e90, e99,
                                      _module_verdict(r, e90, e99, min(layer.in_features, layer.out_features))))
    return RankReport(adapter_name, tuple(modules), _overall_verdict(modules))


def _module_verdict(r: int, e90: int, e99: int, max_rank: int) -> str:
    if e99 == 0:
        return "untrained: ΔW = 0"
    if e99 >= r and r < max_rank:
        return "saturated: every direction carries energy; a larger r may help"
    if e90 <= max(1, r // 4):
        suggestion = 1 << max(0, (e99 - 1).bit_length())
        return f"oversized: 90% of ΔW lies in {e90} of {r} directions; r={min(suggestion, r)} would do"
    return "fits"


def _overall_verdict(modules: list[ModuleRank]) -> str:
    if not modules:
        return "no adapted modules"
    counts: dict[str, int] = {}
    for m in modules:
        key = m.verdict.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    worst = max(counts, key=counts.get)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    advice = {"saturated": "rank looks saturated; try a larger r",
              "oversized": "rank looks oversized; a smaller r would do",
              "untrained": "adapter is untrained (B = 0)",
              "fits": "rank fits the update"}[worst]
    return f"{advice} ({summary} of {len(modules)} modules)"
