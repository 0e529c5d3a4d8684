"""Trainable-parameter report: how many numbers an adapter trains, r·(in+out) per adapted matrix.

For W0 of shape out×in, A (r×in) and B (out×r) hold r·(in+out) parameters against out·in for full
fine-tuning: 4096×4096 at r=16 is 131,072 trainable numbers, 0.78 % of 16,777,216.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
