"""A co-training group while it waits for Ray (workers.group_runner): one member cancelled or lost does
not strand the others, a group whose members all ended stops waiting, and tenants' events name the
group by an opaque id, never by another tenant's job id."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from fleet import keys
from fleet.files import FileStore
from fleet.job_spec import JobSpec
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.resources import Resources
from fleet.settings import Settings, make_object_store, make_redis
from tests.reliability.conftest import wait_for
from workers.dispatcher import Dispatcher
from workers.group_runner import GroupRunner
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow


class Group:
    """Three tenants' jobs claimed as one co-training group by one dispatcher, waiting in their gang
    reservation for a resource no Ray node has (as on a full cluster)."""

    def __init__(self, redis_url: str, tmp_path: Path, tiny_model_dir: Path, **overrides: Any) -> None:
        catalog = {"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none", "max_rank": 8}}
        self.settings = Settings(redis_url=redis_url, data_dir=tmp_path / "var", catalog=catalog, lease_ms=2000,
                                 heartbeat_ms=200, co_training_max_group=3,
                                 train_resources_per_worker={"unobtainium": 1}, **overrides)
        self.client = make_redis(self.settings)
        self.jobs = JobStore(self.client)
        files = FileStore(self.client, make_object_store(self.settings),
                          max_upload_bytes=self.settings.max_upload_bytes)
        train, _ = write_synthetic_splits(tmp_path / "data", n_train=12, n_val=2, seed=1)
        self.ids = []
        for tenant in ("t1", "t2", "t3"):
            file = files.create_file(tenant, filename="train.jsonl", purpose="fine-tune", content=train.read_bytes())
            self.ids.append(self.jobs.create_job(
                tenant, model="tiny-llama", training_file=file.id, seed=1, resources=Resources(gpus=1),
                spec=JobSpec(hyperparameters={"n_epochs": 1, "batch_size": 4},
                             lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})).job.id)
        self.dispatcher = Dispatcher(self.settings, worker_id="group-runner-test")
        assert self.dispatcher.admit() == 3
        runners = {id(r): r for r in self.dispatcher._runners.values()}
        assert len(runners) == 1, "the three jobs did not form one group"
        self.runner: GroupRunner = next(iter(runners.values()))
        self.leader = self.runner.claims[0].job.id  # the first member each per-member loop reaches
        for job_id in self.ids:
            wait_for(lambda j=job_id: any("waiting for resources" in m for m in self.messages(j)),
                     f"job {job_id} to wait for Ray in its group", timeout_s=60)

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.jobs.read_events(job_id, limit=1000)]

    def status(self, job_id: str) -> JobStatus:
        return self.jobs.load_job(job_id).status

    def lose_lease(self, job_id: str) -> None:
        """Expire `job_id`'s lease alone, as if its heartbeats had stopped: it is requeued by itself."""
        def expired() -> bool:
            self.client.zadd(keys.leases(), {job_id: 0})
            return any(e.job_id == job_id for e in self.jobs.leases.requeue_expired_leases())
        wait_for(expired, f"the lease of {job_id} to expire", timeout_s=10)


def test_a_member_cancelled_while_the_group_waits_leaves_and_the_others_are_handed_back(
        redis_server, tmp_path, tiny_model_dir, ray_cluster):
    group = Group(redis_server.url, tmp_path, tiny_model_dir, placement_timeout_s=4)
    others = [j for j in group.ids if j != group.leader]
    group.jobs.request_cancel(group.jobs.load_job(group.leader).tenant_id, group.leader)
    wait_for(lambda: group.status(group.leader) == JobStatus.CANCELLED, "the cancelled member to end", timeout_s=10)

    # The gang does not fit within placement_timeout_s: every member still in the group is handed back
    # at once (not left to its lease), parked for that long.
    group.runner.join(timeout_s=30)
    assert not group.runner.is_alive(), "the group did not end after its placement timeout"
    assert [group.status(j) for j in others] == [JobStatus.QUEUED] * 2
    for job_id in others:
        assert any(m.endswith("; requeued.") for m in group.messages(job_id)), group.messages(job_id)
    assert group.status(group.leader) == JobStatus.CANCELLED


def test_a_group_whose_members_all_lost_their_leases_stops_waiting_and_writes_nothing(
        redis_server, tmp_path, tiny_model_dir, ray_cluster):
    group = Group(redis_server.url, tmp_path, tiny_model_dir, placement_timeout_s=300)
    first, *rest = group.ids
    group.lose_lease(first)
    assert group.runner.is_alive()  # the others still wait; the lost one leaves without a write
    for job_id in rest:
        group.lose_lease(job_id)
    group.runner.join(timeout_s=15)
    assert not group.runner.is_alive(), "a group with no member left kept waiting for Ray"
    for job_id in group.ids:  # requeued by lease expiry alone: the old group wrote nothing after it
        assert group.status(job_id) == JobStatus.QUEUED
        assert not any(m.endswith("; requeued.") for m in group.messages(job_id))


def test_members_paused_or_preempted_while_the_group_waits_leave_at_once_and_then_the_wait_ends(
        redis_server, tmp_path, tiny_model_dir, ray_cluster):
    group = Group(redis_server.url, tmp_path, tiny_model_dir, placement_timeout_s=300)
    paused, preempted, last = group.ids
    group.jobs.request_pause(group.jobs.load_job(paused).tenant_id, paused)
    wait_for(lambda: group.status(paused) == JobStatus.PAUSED, "the paused member to leave the waiting group",
             timeout_s=10)
    # the scheduler's reclaim asks each member of a group to stop as it does here (fleet.sched_scripts)
    group.client.hset(keys.job(preempted), mapping={"control": "preempt", "preempting_gpus": 0})
    wait_for(lambda: group.status(preempted) == JobStatus.QUEUED, "the preempted member to go back to the queue",
             timeout_s=10)
    assert group.runner.is_alive() and group.status(last) == JobStatus.RUNNING  # the last one still waits
    group.jobs.request_pause(group.jobs.load_job(last).tenant_id, last)
    group.runner.join(timeout_s=15)
    assert not group.runner.is_alive(), "a group whose members all left kept waiting for Ray"
    assert [group.status(j) for j in group.ids] == [JobStatus.PAUSED, JobStatus.QUEUED, JobStatus.PAUSED]
    assert any("preempt" in m.lower() for m in group.messages(preempted)), group.messages(preempted)
    for job_id in group.ids:  # none was handed back by the placement timeout
        assert not any(m.endswith("; requeued.") for m in group.messages(job_id)), group.messages(job_id)


def test_tenants_events_name_the_group_by_an_opaque_id(redis_server, tmp_path, tiny_model_dir, ray_cluster):
    group = Group(redis_server.url, tmp_path, tiny_model_dir, placement_timeout_s=300)
    try:
        for job_id in group.ids:
            text = "\n".join(group.messages(job_id))
            assert f"(group {group.runner.public_id})" in text
            for other in group.ids:
                assert other == job_id or other not in text, f"{job_id}'s events name another tenant's job {other}"
    finally:
        stopper = threading.Thread(target=group.dispatcher.hand_back_running_jobs, daemon=True)
        stopper.start()
        stopper.join(timeout=30)
