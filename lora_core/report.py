"""What an adapter trains and what it learned: the trainable-parameter report and the rank report.

Trainable parameters: for W0 of shape out×in, A (r×in) and B (out×r) hold r·(in+out) parameters against
out·in for full fine-tuning: 4096×4096 at r=16 is 131,072 trainable numbers, 0.78 % of 16,777,216.

Rank report: ΔW = s·B·A has rank ≤ r, and its singular values come from the small factors. With
B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR), ΔW = s·Q_B·(R_B·R_Aᵀ)·Q_Aᵀ, and Q_B, Q_A have orthonormal columns,
so σ(ΔW) = s·σ(R_B·R_Aᵀ), an r×r SVD. The effective rank at e % is the smallest k whose σ₁²+…+σ_k²
reach e % of Σσ²: how many of the r directions the update actually uses. The seeds' advice reads off
it: an update that uses every direction says the rank is too small; one whose 90 % lies in a quarter
of them says a smaller rank would do.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lora_core.exceptions import AdapterFileError, AdapterNotFoundError
from lora_core.inject import active_adapters, adapter_configs, lora_layers
from lora_core.io import read_adapter_config, read_adapter_tensors

Verdict = Literal["too_small", "adequate", "larger_than_needed", "untrained"]

# What each verdict says to the user, the words first ("rank looks too small", ...).
VERDICT_ADVICE: dict[str, str] = {
    "too_small": "rank looks too small; try a larger r",
    "adequate": "rank looks adequate",
    "larger_than_needed": "rank looks larger than needed; a smaller r would do",
    "untrained": "adapter is untrained (ΔW = 0)",
}
_PEFT_PREFIX = "base_model.model."


# --- trainable parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainableParameterReport:
    trainable: int
    total: int
    by_module: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable%: {self.percent:.4f}")


def trainable_parameter_report(model: nn.Module) -> TrainableParameterReport:
    """Counts of trainable vs all parameters (4-bit packed weights counted as their unpacked size)."""
    trainable = 0
    total = 0
    by_module: dict[str, int] = {}
    for name, param in model.named_parameters():
        count = _logical_numel(param)
        total += count
        if param.requires_grad:
            trainable += count
            module = name.split(".lora_")[0] if ".lora_" in name else name.rsplit(".", 1)[0]
            by_module[module] = by_module.get(module, 0) + count
    return TrainableParameterReport(trainable, total, by_module)


def _logical_numel(param: nn.Parameter) -> int:
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        numel = 1
        for d in state.shape:
            numel *= int(d)
        return numel
    return param.numel()


# --- rank report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleRank:
    """Spectrum of ΔW for one adapted module; `verdict` is one of VERDICT_ADVICE's keys, `note` says why."""

    module: str
    r: int
    singular_values: tuple[float, ...]
    effective_rank_90: int
    effective_rank_99: int
    verdict: Verdict
    note: str


@dataclass(frozen=True)
class RankReport:
    adapter: str
    modules: tuple[ModuleRank, ...]
    verdict: Verdict | Literal["no_modules"]
    summary: str

    def __str__(self) -> str:
        lines = [f"rank report for adapter {self.adapter!r}: {self.summary}",
                 f"{'module':<48} {'r':>4} {'eff90':>6} {'eff99':>6}  verdict"]
        for m in self.modules:
            lines.append(f"{m.module:<48} {m.r:>4} {m.effective_rank_90:>6} {m.effective_rank_99:>6}  {m.verdict}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """The report as a version manifest carries it (docs/api.md, "Rank report"): a summary and one
        entry per module, singular values to 6 significant digits."""
        eff90 = [m.effective_rank_90 for m in self.modules]
        counts: dict[str, int] = {}
        for m in self.modules:
            counts[m.verdict] = counts.get(m.verdict, 0) + 1
        return {
            "energy": 0.9,
            "summary": {
                "verdict": self.verdict,
                "message": self.summary,
                "modules": len(self.modules),
                "r": max((m.r for m in self.modules), default=0),
                "effective_rank_90": {"min": min(eff90), "median": statistics.median_low(eff90),
                                      "max": max(eff90)} if eff90 else None,
                "verdicts": dict(sorted(counts.items())),
            },
            "modules": [
                {"module": m.module, "r": m.r, "singular_values": [float(f"{v:.6g}") for v in m.singular_values],
                 "effective_rank_90": m.effective_rank_90, "effective_rank_99": m.effective_rank_99,
                 "verdict": m.verdict, "note": m.note}
                for m in self.modules
            ],
        }


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
            modules.append(_module_rank(path, layer.lora_A[adapter_name], layer.lora_B[adapter_name],
                                        layer.scale[adapter_name]))
    return _report(adapter_name, modules)


def adapter_rank_report(path: str | os.PathLike) -> RankReport:
    """The rank report of a saved PEFT adapter directory, from its factors alone (no base model needed).

    This is what a worker computes for every version it publishes. AdapterFileError if a module has
    only one of its two factors.
    """
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        for factor in ("lora_A", "lora_B"):
            suffix = f".{factor}.weight"
            if key.endswith(suffix):
                module = key[: -len(suffix)].removeprefix(_PEFT_PREFIX)
                factors.setdefault(module, {})[factor] = tensor
    modules = []
    with torch.no_grad():
        for module in sorted(factors):
            pair = factors[module]
            if set(pair) != {"lora_A", "lora_B"}:
                raise AdapterFileError(f"{path}: module {module!r} has only {sorted(pair)}; a LoRA module needs "
                                       "lora_A and lora_B")
            A, B = pair["lora_A"], pair["lora_B"]
            r = A.shape[0]
            scale = config.alpha / r**0.5 if config.use_rslora else config.alpha / r
            modules.append(_module_rank(module, A, B, scale))
    return _report(os.fspath(path), modules)


def _module_rank(module: str, A: torch.Tensor, B: torch.Tensor, scale: float) -> ModuleRank:
    r, max_rank = A.shape[0], min(A.shape[1], B.shape[0])
    sv = singular_values_of_delta(A, B, scale)
    e90, e99 = effective_rank(sv, 0.90), effective_rank(sv, 0.99)
    verdict, note = _module_verdict(r, e90, e99, max_rank)
    return ModuleRank(module, r, tuple(float(v) for v in sv), e90, e99, verdict, note)


def _module_verdict(r: int, e90: int, e99: int, max_rank: int) -> tuple[Verdict, str]:
    if e99 == 0:
        return "untrained", "ΔW = 0"
    if e99 >= r and r < max_rank:
        return "too_small", f"all {r} directions carry energy; a larger r may help"
    suggestion = 1 << max(0, (e99 - 1).bit_length())  # the smallest power of two holding 99 % of ΔW
    if e90 <= max(1, r // 4) and suggestion < r:  # only when a smaller rank would really do
        return "larger_than_needed", f"90% of ΔW lies in {e90} of {r} directions; r={suggestion} would do"
    return "adequate", f"90% of ΔW lies in {e90} of {r} directions"


def _report(adapter: str, modules: list[ModuleRank]) -> RankReport:
    """The overall verdict is the most common module verdict (ties: the first in VERDICT_ADVICE's order)."""
    if not modules:
        return RankReport(adapter, (), "no_modules", "no adapted modules")
    counts = {v: sum(m.verdict == v for m in modules) for v in VERDICT_ADVICE}
    worst = max(counts, key=lambda v: counts[v])
    detail = ", ".join(f"{n} {v.replace('_', ' ')}" for v, n in counts.items() if n)
    return RankReport(adapter, tuple(modules), worst, f"{VERDICT_ADVICE[worst]} ({detail} of {len(modules)} modules)")
