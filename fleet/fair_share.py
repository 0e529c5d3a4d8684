"""Kueue's admission fair sharing in Python: decayed usage, tiers, shares and the order of entry.

The same formulas as the scheduler's Lua (fleet.sched_scripts), for views and estimates:
  consumed(t) = current + (consumed₀ − current)·2^(−(t − t₀)/H)   (H = 0: consumed = current)
  score       = consumed / weight
  entry score = (consumed + ½·α(T)·(current + head − consumed)) / weight,  α(T) = 1 − 2^(−T/H)
  share       = max(usage − nominal, 0) / weight                     (preemption's rule)
Entries (tenants' queue heads) go in the order: within nominal before borrowing, lower entry score,
higher priority, older; between equal scores, the tenant holding fewer GPUs per weight first.
"""

from __future__ import annotations

from fleet.quotas import TenantQuota
from fleet.sched_scripts import ENTRY_HORIZON_MS

__all__ = ["decayed_usage", "tier", "share", "entry_score", "entry_key", "WITHIN_NOMINAL", "RECLAIMING",
           "BORROWING", "ENTRY_HORIZON_MS"]

WITHIN_NOMINAL, RECLAIMING, BORROWING = 0, 1, 2  # RECLAIMING: borrows, but starts below nominal


def decayed_usage(consumed0: float, at_ms: float, current: float, now_ms: float, half_life_ms: float) -> float:
    """Usage at `now_ms`: `consumed0` at `at_ms`, `current` GPUs held since, decaying with half-life H."""
    if half_life_ms <= 0:
        return current
    dt = max(now_ms - at_ms, 0.0)
    return current + (consumed0 - current) * 2.0 ** (-dt / half_life_ms)


def entry_score(consumed: float, current: float, head_gpus: int, weight: float, half_life_ms: float) -> float:
    """The order of a tenant's queue head: its usage per weight halfway (½·α) from now to where admitting
    the head would take it over ENTRY_HORIZON_MS (Kueue's update with current + head GPUs).

    Why not consumed / weight alone: a tenant is admitted while its score is the lowest and one job then
    lifts it by up to head/weight (fully at H = 0, in part at H = 1 h). A weight-1 tenant's job is a large
    part of its share, so it sits above the others' level most of the time yet is still admitted each
    time it dips: weights 1:2:3:4 gave it +46 % (H = 0) and +17.5 % (H = 1 h) of its share. Ordering by
    the share after admission (consumed + head) errs the other way (−31 % at H = 0, and −68 % at H = 24 h,
    where it adds a job's GPUs to a day's average); the midpoint is unbiased at H = 0 and becomes
    consumed / weight as H grows (α → 0). bench/sched_sim.py's weights scenario measures it.
    """
    alpha = 1.0 if half_life_ms <= 0 else 1.0 - 2.0 ** (-ENTRY_HORIZON_MS / half_life_ms)
    return (consumed + 0.5 * alpha * (current + head_gpus - consumed)) / weight


def tier(quota: TenantQuota, usage: float, gpus: int, growth: float = 0.0) -> int | None:
    """Tier of admitting `gpus` more at `usage`; None when over nominal + borrowing limit. `growth`: GPUs
    the tenant's co-trained shares may still grow by as other members leave (its `co_growth`); the
    borrowing limit, a hard one, bounds them too, the tier not (as the Lua's tier_of)."""
    limit = quota.borrowing_limit_gpus
    if limit is not None and usage + growth + gpus > quota.nominal_gpus + limit:
        return None
    if usage + gpus <= quota.nominal_gpus:
        return WITHIN_NOMINAL
    return RECLAIMING if usage < quota.nominal_gpus else BORROWING


def share(quota: TenantQuota, usage: float) -> float:
    """Borrowed GPUs above nominal per unit of weight (0 within nominal)."""
    return max(usage - quota.nominal_gpus, 0) / quota.weight


def entry_key(
    entry_tier: int, score: float, held_per_weight: float, queue_score: float
) -> tuple[int, float, float, float]:
    """Sort key of a queue head: within nominal first, then lower score, then fewer GPUs held per weight
    (equal scores: the same instant, or H = 0), then (priority, age) as the queue score orders them."""
    return (min(entry_tier, 1), score, held_per_weight, queue_score)
