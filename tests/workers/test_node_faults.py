"""What a dead Ray node looks like to the dispatcher: an infrastructure fault that hands the job back."""

from __future__ import annotations

import time


def test_a_rank_unreachable_on_a_dead_node_is_an_infrastructure_fault():
    import ray.exceptions
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from workers.errors import is_infrastructure_fault

    # As Ray Train reports a rank whose node was killed: its health check found the actor unreachable.
    unreachable = ray.exceptions.ActorUnavailableError("The actor is temporarily unavailable: RpcError", None)
    failed = WorkerGroupError("rank 0 failed", {0: WorkerHealthCheckFailedError("A worker health check failed.",
                                                                                 unreachable)})
    outer = RuntimeError("training job 'j' failed on Ray")
    outer.__cause__ = failed
    assert is_infrastructure_fault(outer)
    assert not is_infrastructure_fault(WorkerGroupError("rank 0 failed", {0: ValueError("bad config")}))


def test_a_killed_runs_placement_groups_are_told_apart_from_other_runs_and_reservations(ray_cluster):
    """A run killed whole leaves the placement group its controller made; the dispatcher removes that
    one only, not those of the other runs it drives at the same time nor its own gang reservations."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from workers.ray_train import _orphaned_placement_groups, _placement_groups_of_this_job, _remove_placement_groups

    @ray.remote(num_cpus=0)
    class Controller:  # as Ray Train's controller makes its worker group's placement group
        def make_group(self) -> str:
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready(), timeout=30)
            return group.id.hex()

    before = _placement_groups_of_this_job()
    killed, alive = Controller.remote(), Controller.remote()
    killed_group, alive_group = ray.get([killed.make_group.remote(), alive.make_group.remote()], timeout=60)
    reservation = placement_group([{"CPU": 0.01}])
    ray.get(reservation.ready(), timeout=30)
    try:
        ray.kill(killed, no_restart=True)
        deadline = time.monotonic() + 30
        while killed_group not in _orphaned_placement_groups(since=before):
            assert time.monotonic() < deadline, "the killed controller's group never showed as orphaned"
            time.sleep(0.2)
        assert _orphaned_placement_groups(since=before) == {killed_group}
        assert {killed_group, alive_group} <= _placement_groups_of_this_job()
    finally:
        _remove_placement_groups({killed_group, alive_group})  # as the dispatcher removes a killed run's
        remove_placement_group(reservation)
        ray.kill(alive)
    assert not {killed_group, alive_group} & _placement_groups_of_this_job()
