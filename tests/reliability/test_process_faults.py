"""Processes die under running jobs: a dispatcher (SIGKILL) while the others are busy, and redis-server
(SIGKILL, restarted on its AOF) while two jobs train. No job is lost, none publishes twice."""

from __future__ import annotations

import signal
import time

import pytest

from fleet import keys
from tests.reliability.conftest import LEASE_MS, wait_for
from tests.service.test_end_to_end import _download_version

pytestmark = pytest.mark.slow

REQUEUE_WITHIN_S = LEASE_MS / 1000 + 5.0


def _running(stack, job_id: str) -> bool:
    return stack.job(job_id).status == "running"


def _resumed_from(stack, job_id: str) -> int | None:
    resumed = [m for m in stack.messages(job_id) if m.startswith("Resuming from the checkpoint at step")]
    return int(resumed[0].rsplit(" ", 1)[1].rstrip(".")) if resumed else None


def test_a_killed_dispatchers_jobs_are_reclaimed_while_every_other_dispatcher_is_busy(fleet_stack, redis_server):
    stack = fleet_stack(n_train=400)
    procs = {name: stack.start_dispatcher(name) for name in ("dispatcher-a", "dispatcher-b", "dispatcher-c")}
    survivor_job = stack.create_job(n_epochs=3, suffix="survivor")
    to_cancel_job = stack.create_job(n_epochs=3, suffix="to-cancel")
    busy = stack.create_job(n_epochs=20, suffix="long")  # keeps the dispatcher that is left busy
    jobs = [survivor_job.id, to_cancel_job.id, busy.id]
    wait_for(lambda: all(_running(stack, j) for j in jobs), "each dispatcher to take a job", timeout_s=180)
    owners = {j: redis_server.client(decode_responses=True).hget(keys.job(j), "worker_id") for j in jobs}
    assert sorted(owners.values()) == sorted(procs), owners
    # The two that die: the survivor's and the to-cancel job's dispatchers.
    doomed = {"survivor": (procs[owners[survivor_job.id]], survivor_job.id),
              "to-cancel": (procs[owners[to_cancel_job.id]], to_cancel_job.id)}
    survivor = doomed["survivor"][1]
    wait_for(lambda: stack.checkpoint_steps(survivor), "a first checkpoint of the survivor", timeout_s=180)

    for proc, _ in doomed.values():
        proc.send_signal(signal.SIGKILL)
    for proc, _ in doomed.values():
        proc.wait(timeout=10)
    killed = time.monotonic()
    checkpoint_step = max(stack.checkpoint_steps(survivor))
    stack.client.fine_tuning.jobs.cancel(doomed["to-cancel"][1])

    wait_for(lambda: stack.job(survivor).status == "queued", "the killed dispatcher's job to be requeued",
             timeout_s=60)
    wait_for(lambda: stack.job(doomed["to-cancel"][1]).status == "cancelled",
             "the cancel of a dead dispatcher's job to complete", timeout_s=60)
    took_s = time.monotonic() - killed
    assert took_s <= REQUEUE_WITHIN_S, f"reclaiming took {took_s:.1f}s (lease {LEASE_MS} ms)"
    assert stack.job(busy.id).status == "running", "the other dispatcher was not busy: the test proves nothing"

    stack.client.fine_tuning.jobs.cancel(busy.id)  # frees the busy dispatcher, which takes the survivor
    done = wait_for(lambda: (j := stack.job(survivor)).status in ("succeeded", "failed", "cancelled") and j,
                    "the requeued job to finish elsewhere", timeout_s=300)
    assert done.status == "succeeded", done.error
    assert (done.model_extra or {}).get("attempt") == 2  # its first dispatcher is dead: it ran elsewhere
    assert (_resumed_from(stack, survivor) or 0) >= checkpoint_step
    assert stack.versions("survivor") == [1]
    assert stack.versions("to-cancel") == []


def test_both_running_jobs_survive_a_redis_kill_and_restart_on_its_aof(fleet_stack, redis_server, tmp_path,
                                                                        tiny_model_dir):
    stack = fleet_stack(n_train=400)
    jobs = []
    for i in (1, 2):
        stack.start_dispatcher(f"dispatcher-{i}")
        jobs.append(stack.create_job(n_epochs=2, suffix=f"outage-{i}").id)
    for job_id in jobs:
        wait_for(lambda j=job_id: stack.checkpoint_steps(j), f"a first checkpoint of {job_id}", timeout_s=240)
    steps_before = {job_id: max(stack.checkpoint_steps(job_id)) for job_id in jobs}

    redis_server.kill()
    time.sleep(LEASE_MS / 1000 + 2.0)  # longer than a lease: the attempts' leases run out meanwhile
    redis_server.start()  # same port, same AOF directory

    for job_id in jobs:
        done = wait_for(lambda j=job_id: (x := stack.job(j)).status in ("succeeded", "failed", "cancelled") and x,
                        f"{job_id} to finish after the outage", timeout_s=300)
        assert done.status == "succeeded", done.error
        attempt = (done.model_extra or {}).get("attempt")
        if attempt != 1:  # handed back or reclaimed: the next attempt resumed, it did not start over
            assert (_resumed_from(stack, job_id) or 0) >= steps_before[job_id], stack.messages(job_id)
        assert stack.versions(done.fine_tuned_model.split(":")[0]) == [1]
    messages = [m for job_id in jobs for m in stack.messages(job_id)]
    assert not any("training_error" in m or "The job failed" in m for m in messages), messages

    # The tenant-readable manifest names the base model, never the server's path to it.
    version_dir = _download_version(stack.server, stack.tenant.api_key, done.fine_tuned_model, tmp_path / "v")
    manifest = (version_dir / "manifest.json").read_text()
    assert "base_model_path" not in manifest and str(tiny_model_dir) not in manifest, manifest
