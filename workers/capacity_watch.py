"""Capacity from Ray: a dispatcher thread that keeps the cluster's nodes and their accelerators in Redis.

Every `interval_s` it reads Ray's node table (`ray.nodes()`: alive and dead nodes, each with its
resources) and hands it to `fleet.capacity.CapacityStore.record_nodes`, which the scheduler admits
against: a node that joins adds its accelerators at the next read; a node that dies takes them away
(its jobs' Ray workers die with it, their runs fail, and the dispatcher hands them back to resume from
their checkpoints: the infrastructure-fault path). Every dispatcher runs one. Each report names its
Ray cluster (the GCS address) and replaces only that cluster's nodes, so dispatchers that each run a
private Ray cluster add up instead of overwriting each other; a cluster nobody reports for 15 intervals
leaves the table.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.settings import Settings

__all__ = ["CapacityWatch", "node_capacities"]

logger = logging.getLogger(__name__)

_INTERVAL_S = 2.0
_EXPIRY_INTERVALS = 15  # a cluster's nodes outlive its last report by this many intervals


def node_capacities(ray_nodes: list[dict[str, Any]], accelerator_resource: str) -> list[NodeCapacity]:
    """Ray's node table (`ray.nodes()` rows) as NodeCapacity rows: each node's whole amount of
    `accelerator_resource` (0 for a node without any, e.g. a CPU-only head), dead ones marked so."""
    return [
        NodeCapacity(node_id=node["NodeID"], address=node.get("NodeManagerAddress", ""),
                     gpus=int(node.get("Resources", {}).get(accelerator_resource, 0)) if node["Alive"] else 0,
                     alive=bool(node["Alive"]))
        for node in ray_nodes
    ]


class CapacityWatch:
    """Calls `record_nodes` with Ray's nodes now and every `interval_s` until `stop()`."""

    def __init__(self, client: redis.Redis, settings: Settings, *, interval_s: float = _INTERVAL_S) -> None:
        self.store = CapacityStore(client)
        self.accelerator_resource = settings.accelerator_resource
        self.interval_s = interval_s
        self.expiry_ms = int(_EXPIRY_INTERVALS * interval_s * 1000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capacity-watch", daemon=True)

    def start(self) -> CapacityWatch:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def record_once(self) -> list[NodeCapacity]:
        """Read Ray's nodes and record them; returns what was recorded."""
        import ray

        nodes = node_capacities(ray.nodes(), self.accelerator_resource)
        gone = self.store.record_nodes(nodes, source=ray.get_runtime_context().gcs_address,
                                       expiry_ms=self.expiry_ms)
        if gone:
            logger.warning("Ray node(s) gone: %s; capacity now %d", ", ".join(gone), self.store.total_gpus())
        return nodes

    def _run(self) -> None:
        while True:
            try:
                self.record_once()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                logger.warning("recording Ray's nodes: Redis unreachable (%s); retrying", e)
            except Exception:
                logger.exception("recording Ray's nodes failed; retrying")
            if self._stop.wait(self.interval_s):
                return
