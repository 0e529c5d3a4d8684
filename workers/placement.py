"""Gang admission on Ray: a job's workers are reserved all at once (one placement group) or not at all.

A job holds `Resources(workers, gpus_per_worker)`; each Ray Train worker (rank) is one bundle
`{accelerator_resource: gpus_per_worker, **train_resources_per_worker}`. `reserve_gang` asks Ray for a
placement group of all the bundles (strategy PACK, as Ray Train's own) and waits for it at most
`placement_timeout_s`. A placement group is all-or-nothing in Ray: while it waits it holds nothing,
so two large jobs waiting at once can never deadlock each other. On a timeout it is removed and the
caller hands the job back to the queue (`finish_job(..., retry_after_ms=...)`).

Ray Train v2 cannot train inside a placement group made by someone else: its WorkerGroup always
creates its own (`worker_group.py: _create_placement_group`; there is no parameter for an existing
one, and a group created from inside a captured task is a new top-level group, not a child). So the
reservation verifies the gang and is released just before `fit()`, whose own group of the same
bundles takes the freed resources at once; that second wait is bounded by Ray Train's worker-group
start timeout (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default), after which the run fails and
the job is handed back like any node fault. Admission itself is decided in Redis (fleet's scheduler
counts the GPUs every running job holds), so a second job racing for the freed resources is rare.

"GPUs" in CPU mode are Ray logical accelerators: Ray accepts `num_gpus` on a node without hardware,
and Ray Train places workers by them; the ranks then train on the CPU with gloo (`Gang.train_on_cpu`),
since Ray Train would otherwise pick NCCL and hand each rank a cuda device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleet.resources import Resources
from fleet.settings import Settings

__all__ = ["Gang", "GangNotPlaced", "gang_for", "local_node_resources", "reserve_gang"]

logger = logging.getLogger(__name__)

_POLL_S = 0.25  # how often a waiting reservation checks whether the attempt was stopped


class GangNotPlaced(Exception):
    """Ray could not place all of a job's workers within the placement timeout; nothing is held."""


@dataclass(frozen=True)
class Gang:
    """How a job's workers are asked of Ray: `workers` bundles of `bundle` each."""

    workers: int
    bundle: dict[str, float]  # the Ray resources of one worker (rank)
    accelerators: int  # in all: workers × gpus_per_worker
    use_gpu: bool  # ScalingConfig.use_gpu: Ray Train rejects "GPU" in a bundle without it
    train_on_cpu: bool  # logical accelerators (CPU mode): ranks train on the CPU, gloo

    def describe(self) -> str:
        per = self.accelerators // self.workers
        return f"{self.accelerators} GPU(s) ({self.workers} worker(s) × {per})"


def gang_for(resources: Resources, settings: Settings) -> Gang:
    """The gang a job with `resources` asks Ray for under `settings` (pure)."""
    per = float(resources.gpus_per_worker)
    bundle = {**settings.train_resources_per_worker, settings.accelerator_resource: per}
    if settings.use_gpu:
        bundle["GPU"] = per  # a custom accelerator name on real GPUs: each rank holds its devices too
    return Gang(workers=resources.workers, bundle=bundle, accelerators=resources.total_gpus,
                use_gpu="GPU" in bundle, train_on_cpu=not settings.use_gpu)


def local_node_resources(accelerator_resource: str, count: int) -> dict[str, Any]:
    """`ray.init` arguments for a private local node declaring `count` logical accelerators."""
    if accelerator_resource == "GPU":
        return {"num_gpus": count}
    return {"resources": {accelerator_resource: float(count)}}


def reserve_gang(gang: Gang, *, timeout_s: float, check_stop: Callable[[], None], name: str = "") -> None:
    """Reserve every bundle of `gang` at once, wait for the reservation at most `timeout_s`, then
    release it for Ray Train's own placement group (see the module docstring); raise GangNotPlaced
    when it could not be placed in time. `check_stop` is called every _POLL_S and may raise to stop
    waiting (a cancel, pause, preemption, lost lease); the reservation is removed however this ends."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([dict(gang.bundle)] * gang.workers, strategy="PACK", name=name)
    started = time.monotonic()
    try:
        ready = group.ready()  # once: each call schedules a task into the group
        while not ray.wait([ready], timeout=min(_POLL_S, timeout_s))[0]:
            check_stop()
            if time.monotonic() - started >= timeout_s:
                raise GangNotPlaced(f"Could not reserve {gang.accelerators} GPUs on one gang within "
                                    f"{timeout_s:g}s")
        logger.info("reserved %s for %s in %.1fs", gang.describe(), name or "a job", time.monotonic() - started)
    finally:
        remove_placement_group(group)
