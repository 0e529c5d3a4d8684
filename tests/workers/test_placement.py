"""What a job's gang asks of Ray, and how Ray's node table becomes the cluster's capacity (pure parts)."""

from __future__ import annotations

from fleet.resources import Resources
from fleet.settings import Settings
from workers.capacity_watch import node_capacities
from workers.placement import gang_for, local_node_resources


def test_a_gang_is_one_bundle_of_accelerators_per_worker():
    gang = gang_for(Resources(workers=2, gpus_per_worker=2), Settings(train_resources_per_worker={"CPU": 1}))
    assert (gang.workers, gang.bundle, gang.accelerators) == (2, {"CPU": 1, "GPU": 2.0}, 4)
    # Logical GPUs (CPU mode): Ray Train must be told use_gpu to accept "GPU", and the ranks train on CPU.
    assert gang.use_gpu and gang.train_on_cpu


def test_a_custom_accelerator_resource_is_asked_for_by_name():
    logical = gang_for(Resources(gpus=3), Settings(accelerator_resource="accel"))
    assert (logical.workers, logical.bundle, logical.use_gpu, logical.train_on_cpu) == (3, {"accel": 1.0}, False, True)
    real = gang_for(Resources(gpus=1), Settings(accelerator_resource="a100", use_gpu=True))
    assert real.bundle == {"a100": 1.0, "GPU": 1.0} and real.use_gpu and not real.train_on_cpu


def test_a_local_node_declares_logical_accelerators():
    assert local_node_resources("GPU", 4) == {"num_gpus": 4}
    assert local_node_resources("accel", 2) == {"resources": {"accel": 2.0}}


def test_rays_node_table_becomes_capacity_with_dead_nodes_holding_nothing():
    nodes = [
        {"NodeID": "head", "Alive": True, "NodeManagerAddress": "10.0.0.1", "Resources": {"CPU": 4.0}},
        {"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.0.0.2", "Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.0.0.3", "Resources": {"GPU": 2.0}},
    ]
    got = [(n.node_id, n.gpus, n.alive) for n in node_capacities(nodes, "GPU")]
    assert got == [("head", 0, True), ("a", 2, True), ("b", 0, False)]
