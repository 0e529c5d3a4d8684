"""A co-training group on a borrowed GPU, reclaimed through a real dispatcher (fleet.sched_scripts ADMIT,
workers.group_runner): every member checkpoints now and goes back to the queue, the GPU returns to its
owner, and each member later resumes from its own checkpoint and succeeds."""

from __future__ import annotations

import pytest

from fleet import keys
from fleet.jobs import JobStatus
from fleet.leases import PREEMPTED_MESSAGE
from tests.reliability.conftest import wait_for
from tests.workers.test_dispatcher_concurrency import Setup
from workers.dispatcher import Dispatcher

pytestmark = pytest.mark.slow


def test_a_group_on_a_borrowed_gpu_is_preempted_whole_and_its_members_resume_from_their_checkpoints(
        redis_server, tmp_path, tiny_model_dir, ray_cluster):
    setup = Setup(redis_server.url, tmp_path, tiny_model_dir, max_concurrent_jobs=2, co_training_max_group=2)
    setup.reclaimable_cluster()  # one GPU, the owner's (nominal 1): the group borrows it
    members = [setup.create(t, n_epochs=30) for t in ("b1", "b2")]  # 30 steps: periodic checkpoints at 10, 20
    dispatcher = Dispatcher(setup.settings, worker_id="preempt-group")
    assert dispatcher.admit() == 2, "the two borrowers' jobs did not form one group"
    for job_id in members:
        wait_for(lambda j=job_id: setup.step(j) >= 2, f"member {job_id} to train in the group", timeout_s=120)

    owners = setup.create("owner", n_epochs=30)
    assert dispatcher.admit() == 0  # the owner reclaims its GPU: the whole group is asked to stop
    checkpoints = {}
    for job_id in members:
        # finish_job writes the status, then the event (fleet.leases): wait for both
        wait_for(lambda j=job_id: setup.jobs.load_job(j).status == JobStatus.QUEUED
                 and PREEMPTED_MESSAGE in setup.messages(j), f"preempted member {job_id} to be requeued", timeout_s=60)
        checkpoints[job_id] = setup.jobs.latest_checkpoint(job_id)
        assert checkpoints[job_id] is not None and checkpoints[job_id].step < 10, checkpoints[job_id]  # saved now
        messages = setup.messages(job_id)
        assert PREEMPTED_MESSAGE in messages and "The job was paused." not in messages
    assert int(setup.client.hget(keys.sched_cluster(), "incoming") or 0) == 0  # the GPU came back, once

    # The owner's job runs on its GPU (the borrowers' jobs may join it there: joining takes no GPU); each
    # member resumes from its own checkpoint and succeeds.
    def all_done() -> bool:
        dispatcher.admit()
        return all(setup.jobs.load_job(j).status == JobStatus.SUCCEEDED for j in [owners, *members])

    wait_for(all_done, "the owner's job and the resumed members to succeed", timeout_s=300)
    for job_id in members:
        assert f"Resuming from the checkpoint at step {checkpoints[job_id].step}." in setup.messages(job_id)
        assert setup.jobs.load_job(job_id).attempt == 2  # one preemption, one resume: nothing run twice
