"""Learning-rate schedules: linear warmup, then linear decay, cosine decay or a constant rate."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["lr_factor", "lr_lambda"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak rate for optimizer step `step` (0-based), as in HF/torchtune schedules.

    Warmup rises linearly from 1/(warmup+1) so the first step already moves; decay reaches 0 at
    `total_steps` (linear) or follows half a cosine to 0 (cosine); "constant" stays at 1 after warmup.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr_scheduler: unknown schedule {kind!r}; use 'linear', 'cosine' or 'constant'")


def lr_lambda(*, warmup_steps: int, total_steps: int, kind: str) -> Callable[[int], float]:
    """`lr_factor` bound to one run, for `torch.optim.lr_scheduler.LambdaLR`."""
    lr_factor(0, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind)  # reject bad kinds now
    return lambda step: lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind)
