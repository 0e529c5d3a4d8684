"""Peak of live torch tensor bytes while a function runs, from the profiler's memory events (CPU benches)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def peak_live_tensor_bytes(fn: Callable[[], T]) -> tuple[int, T]:
    """(peak of live tensor bytes above what was live when `fn` started, `fn`'s result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # allocations positive, frees negative
        peak = max(peak, live)
    return peak, result
