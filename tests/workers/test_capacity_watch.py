"""The capacity watch against a real local Ray and real Redis: its report names its Ray cluster and
leaves the nodes another dispatcher's private cluster reported."""

from __future__ import annotations

import pytest

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.settings import Settings
from workers.capacity_watch import CapacityWatch

pytestmark = pytest.mark.usefixtures("ray_cluster")


def test_a_dispatchers_report_keeps_another_ray_clusters_nodes(redis_server):
    import ray

    client = redis_server.client(decode_responses=True)
    try:
        other_cluster = "10.9.9.9:6379"  # another dispatcher's private Ray cluster
        CapacityStore(client).record_nodes([NodeCapacity(node_id="elsewhere", gpus=8)], source=other_cluster)
        watch = CapacityWatch(client, Settings(redis_url=redis_server.url))
        recorded = watch.record_once()
        recorded_again = watch.record_once()
        table = {n.node_id: n for n in watch.store.nodes()}
        ours = ray.get_runtime_context().gcs_address
        assert {n.node_id for n in recorded} == {n.node_id for n in recorded_again}
        assert all(table[n.node_id].source == ours for n in recorded)
        assert table["elsewhere"].source == other_cluster
        assert watch.store.total_gpus() == 8 + 4  # this session's Ray declares 4 logical GPUs
    finally:
        client.close()
