"""What a dead Ray node looks like to the dispatcher: an infrastructure fault that hands the job back."""

from __future__ import annotations


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
