"""Which jobs a co-training group may hold (fleet CO_JOIN, workers.dispatcher): a group trains in one
process on one device, so a job holding more than one GPU never leads or joins one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from fleet.co_training import group_of, join_group
from fleet.job_spec import JobSpec
from fleet.resources import Resources
from tests.fleet.sched_harness import Cluster


@pytest.fixture
def r(redis_server) -> Iterator[redis.Redis]:
    client = redis_server.client(decode_responses=True)
    yield client
    client.close()


def _submit(c: Cluster, tenant: str, gpus_per_worker: int) -> str:
    return c.jobs.create_job(tenant, model="llama", training_file="f", spec=JobSpec(quantization="nf4"),
                             resources=Resources(workers=1, gpus_per_worker=gpus_per_worker), now_ms=0).job.id


def test_jobs_of_several_gpus_per_worker_train_alone(r):
    c = Cluster(r, 8)
    leader, *others = (_submit(c, t, gpus_per_worker=2) for t in "abc")
    assert c.admit(at=0, limit=1) == [leader]
    assert join_group(c.jobs, c.claims[leader].fence, "w", 60_000, max_members=4, now_ms=0) is None
    assert group_of(r, leader) is None
    assert sorted(c.admit()) == sorted(others)  # each admitted as a job of its own, with its own 2 GPUs
