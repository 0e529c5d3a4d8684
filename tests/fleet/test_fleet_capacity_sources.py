"""The node table with several Ray clusters reporting (one per dispatcher, or shared), on real Redis:
each report replaces only its own cluster's nodes, unreported clusters expire, totals add up."""

from __future__ import annotations

import json
import time

from fleet import keys
from fleet.capacity import CapacityStore, NodeCapacity

CLUSTER_A, CLUSTER_B = "10.0.0.1:6379", "10.0.0.2:6379"


def _node(node_id: str, gpus: int, *, alive: bool = True) -> NodeCapacity:
    return NodeCapacity(node_id=node_id, gpus=gpus if alive else 0, alive=alive)


def _table(capacity: CapacityStore) -> list[tuple[str, str, bool]]:
    return [(n.node_id, n.source, n.alive) for n in capacity.nodes()]


def test_two_clusters_reports_add_up_and_each_replaces_only_its_own_nodes(r):
    capacity = CapacityStore(r)
    assert capacity.record_nodes([_node("a1", 2), _node("a2", 2)], source=CLUSTER_A) == []
    assert capacity.record_nodes([_node("b1", 4)], source=CLUSTER_B) == []
    assert capacity.total_gpus() == 8  # B's report did not overwrite A's nodes
    assert capacity.record_nodes([_node("a1", 2), _node("a2", 2)], source=CLUSTER_A) == []
    assert capacity.total_gpus() == 8  # nor A's report B's

    assert capacity.record_nodes([_node("a1", 2)], source=CLUSTER_A) == ["a2"]  # absent from its cluster: lost
    assert capacity.total_gpus() == 6
    assert capacity.record_nodes([_node("b1", 4, alive=False)], source=CLUSTER_B) == ["b1"]
    assert capacity.total_gpus() == 2
    assert _table(capacity) == [("a1", CLUSTER_A, True), ("b1", CLUSTER_B, False)]


def test_reports_are_stamped_with_the_redis_clock(r):
    capacity = CapacityStore(r)
    before_s, _ = r.time()
    capacity.record_nodes([_node("a1", 2)], source=CLUSTER_A)
    after_s, _ = r.time()
    [node] = capacity.nodes()
    assert before_s * 1000 <= node.reported_at_ms <= (after_s + 1) * 1000


def test_a_cluster_nobody_reports_expires_and_counts_as_lost(r):
    capacity = CapacityStore(r)
    capacity.record_nodes([_node("a1", 2)], source=CLUSTER_A, expiry_ms=300)
    capacity.record_nodes([_node("b1", 4)], source=CLUSTER_B, expiry_ms=300)
    assert capacity.total_gpus() == 6
    time.sleep(0.2)
    capacity.record_nodes([_node("a1", 2)], source=CLUSTER_A, expiry_ms=300)
    assert capacity.total_gpus() == 6  # B reported 0.2 s ago: kept
    time.sleep(0.2)
    assert capacity.record_nodes([_node("a1", 2)], source=CLUSTER_A, expiry_ms=300) == ["b1"]
    assert capacity.total_gpus() == 2 and _table(capacity) == [("a1", CLUSTER_A, True)]


def test_records_written_before_sources_existed_are_replaced_by_the_first_report(r):
    r.hset(keys.capacity_nodes(), "old", json.dumps({"node_id": "old", "address": "", "gpus": 8, "alive": True}))
    r.hset(keys.capacity(), "total_gpus", 8)
    capacity = CapacityStore(r)
    assert capacity.record_nodes([_node("a1", 2)], source=CLUSTER_A) == ["old"]
    assert capacity.total_gpus() == 2 and _table(capacity) == [("a1", CLUSTER_A, True)]
