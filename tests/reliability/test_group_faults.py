"""Faults under a co-training group (workers.group_runner): Redis killed and restarted on its AOF, the
Ray worker running the group killed (a member already published, one being paused), a cancel and a pause
sent to members of a group whose dispatcher then dies, a dispatcher frozen (SIGSTOP) past its leases
while another takes its members, two dispatchers forming groups from the same queue. No member is
failed, lost, trained twice or published twice; each requeued member resumes from its own checkpoint;
once all have ended the scheduler holds no GPU and no group for any of them.

The SIGKILL of a dispatcher under a healthy group is tests/service/test_co_training_end_to_end.py's
test_a_killed_dispatcher_requeues_every_member_once_and_each_resumes_from_its_checkpoint; the cancel and
pause of members of a healthy group its test_a_cancelled_and_a_paused_member_leave_the_group_...
"""
from __future__ import annotations

import re
import signal
import time
from collections import Counter
from typing import Any

import psutil
import pytest

from fleet import keys
from tests.reliability.conftest import LEASE_MS, Stack, wait_for

pytestmark = pytest.mark.slow

MAX_GROUP = 4
_GROUP = re.compile(r"Co-training with (\d+) other job\(s\) on tiny-llama \(group (\S+)\)")
_RESUMED = re.compile(r"Resuming from the checkpoint at step (\d+)")
_ENDED = ("succeeded", "failed", "cancelled")


def _group_stack(fleet_stack: Any, **overrides: Any) -> Stack:
    """The reliability stack with co-training on (groups of up to MAX_GROUP)."""
    return fleet_stack(n_train=48, co_training_max_group=MAX_GROUP, **overrides)


def _groups(stack: Stack, job_id: str) -> list[tuple[int, str]]:
    """(other members, group id) of every group the job trained in, oldest first."""
    found = [_GROUP.search(m) for m in stack.messages(job_id)]
    return [(int(m[1]), m[2]) for m in reversed(found) if m]


def _wait_for_group(stack: Stack, job_ids: list[str]) -> str:
    """Wait until every job has a checkpoint, all trained in one group with each other; the group's id."""
    for job_id in job_ids:
        wait_for(lambda j=job_id: stack.checkpoint_steps(j),
                 f"a first checkpoint of co-trained job {job_id}", timeout_s=240)
    groups = {job_id: _groups(stack, job_id) for job_id in job_ids}
    assert all(g and g[-1] == (len(job_ids) - 1, groups[job_ids[0]][-1][1]) for g in groups.values()), (
        f"the jobs did not train as one group of {len(job_ids)}: {groups}")
    return groups[job_ids[0]][-1][1]


def _assert_succeeded_once(stack: Stack, job_id: str, suffix: str, *, checkpoint_step: int | None = None) -> Any:
    """The job succeeded, published exactly one version, its events tell one story (one start per
    attempt, one success, no failure); an attempt after the first resumed from `checkpoint_step` or later."""
    done = wait_for(lambda: (j := stack.job(job_id)).status in _ENDED and j, f"job {job_id} to finish",
                    timeout_s=300)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"{suffix}:v1", done.fine_tuned_model
    assert stack.versions(suffix) == [1]
    messages = stack.messages(job_id)
    attempt = (done.model_extra or {}).get("attempt")
    starts = [m for m in messages if m.startswith("Job started (attempt ")]
    assert len(starts) == attempt, (attempt, starts)
    assert Counter(messages)["The job has successfully completed."] == 1, messages
    assert not any(m.startswith("The job failed") for m in messages), messages
    if attempt != 1 and checkpoint_step is not None:  # requeued: the next attempt resumed, it did not start over
        resumed = [int(m[1]) for m in map(_RESUMED.search, messages) if m]
        assert resumed and max(resumed) >= checkpoint_step, (checkpoint_step, messages)
    return done


def _assert_no_gpu_held(redis_server: Any) -> None:
    """Once every job has ended, the scheduler holds nothing for any of them: no co-training group, no
    member, no running attempt, no allocated GPU, no tenant charged for a GPU (fleet.sched_scripts)."""
    client = redis_server.client(decode_responses=True)
    assert client.hgetall(keys.sched_co_member_of()) == {}
    assert list(client.scan_iter(keys.sched_co_group("") + "*")) == []
    assert client.zrange(keys.sched_running_jobs(), 0, -1) == []
    assert client.hgetall(keys.sched_running_holders()) == {}
    assert float(client.hget(keys.sched_cluster(), "allocated") or 0) == 0
    held = {k: client.hget(k, "gpus") for k in client.scan_iter(keys.sched_tenant("") + "*")}
    assert all(float(v or 0) == 0 for v in held.values()), held


def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""


def _group_task(job_ids: list[str]) -> tuple[psutil.Process, str]:
    """The Ray worker process running the co-training group task of these jobs, and its title: Ray
    titles it `ray::<task name>`, and workers.group_runner names the task `<leader>-a<attempt>-group`."""
    def find() -> tuple[psutil.Process, str] | None:
        for proc in psutil.process_iter():
            title = _title(proc)
            if title.startswith("ray::") and "-group" in title and any(j in title for j in job_ids):
                return proc, title
        return None
    return wait_for(find, f"the Ray worker running the group of {job_ids}", timeout_s=30, every_s=0.2)


def _still_runs(task: tuple[psutil.Process, str]) -> bool:
    """Whether that worker still runs that task (an idle worker may be kept, or given another task)."""
    proc, title = task
    return _title(proc) == title


def test_a_group_survives_a_redis_kill_and_restart_on_its_aof(fleet_stack, redis_server):
    stack = _group_stack(fleet_stack)
    suffixes = [f"outage-{i}" for i in range(3)]
    jobs = [stack.create_job(n_epochs=6, suffix=s).id for s in suffixes]
    stack.start_dispatcher("dispatcher-group")  # after the three are queued: one group of three
    _wait_for_group(stack, jobs)
    steps_before = {job_id: max(stack.checkpoint_steps(job_id)) for job_id in jobs}

    redis_server.kill()
    time.sleep(LEASE_MS / 1000 + 2.0)  # longer than a lease: every member's lease runs out meanwhile
    redis_server.start()  # same port, same AOF directory

    for job_id, suffix in zip(jobs, suffixes, strict=True):
        _assert_succeeded_once(stack, job_id, suffix, checkpoint_step=steps_before[job_id])
    _assert_no_gpu_held(redis_server)


def test_the_ray_worker_of_a_group_dying_hands_back_only_the_members_still_training(fleet_stack, redis_server):
    stack = _group_stack(fleet_stack)
    suffixes = ["short", "crash-a", "crash-b", "paused-c"]
    jobs = dict(zip(suffixes, (stack.create_job(n_epochs=1 if s == "short" else 6, suffix=s).id for s in suffixes),
                    strict=True))
    dispatcher = stack.start_dispatcher("dispatcher-group")
    _wait_for_group(stack, list(jobs.values()))
    wait_for(lambda: stack.job(jobs["short"]).status == "succeeded", "the short member to publish in the group",
             timeout_s=120)
    steps_before = {s: max(stack.checkpoint_steps(j)) for s, j in jobs.items()}
    worker, _ = _group_task(list(jobs.values()))
    assert all(stack.job(jobs[s]).status == "running" for s in suffixes[1:]), "a member ended before the fault"

    stack.client.fine_tuning.jobs.pause(jobs["paused-c"])  # its checkpoint may or may not be written in time
    worker.send_signal(signal.SIGKILL)

    for suffix in ("crash-a", "crash-b"):
        done = _assert_succeeded_once(stack, jobs[suffix], suffix, checkpoint_step=steps_before[suffix])
        assert (done.model_extra or {}).get("attempt") == 2, "the member was not handed back once"
    wait_for(lambda: stack.job(jobs["paused-c"]).status == "paused", "the paused member to pause", timeout_s=60)
    stack.client.fine_tuning.jobs.resume(jobs["paused-c"])
    _assert_succeeded_once(stack, jobs["paused-c"], "paused-c", checkpoint_step=steps_before["paused-c"])
    done = _assert_succeeded_once(stack, jobs["short"], "short")  # its version stands; it is not trained again
    assert (done.model_extra or {}).get("attempt") == 1
    assert dispatcher.poll() is None, "the dispatcher died with its group's Ray worker"
    _assert_no_gpu_held(redis_server)


def test_a_cancel_and_a_pause_sent_to_a_group_whose_dispatcher_dies_end_only_those_members(fleet_stack,
                                                                                            redis_server):
    stack = _group_stack(fleet_stack)
    suffixes = ["stays-a", "cancelled-b", "paused-c", "stays-d"]
    jobs = dict(zip(suffixes, (stack.create_job(n_epochs=6, suffix=s).id for s in suffixes), strict=True))
    doomed = stack.start_dispatcher("dispatcher-doomed")
    _wait_for_group(stack, list(jobs.values()))
    steps_before = {s: max(stack.checkpoint_steps(j)) for s, j in jobs.items()}
    orphan = _group_task(list(jobs.values()))

    doomed.send_signal(signal.SIGKILL)  # the cancel and pause reach nobody: no heartbeat reads them
    doomed.wait(timeout=10)
    # Ray ends the task of a dead owner: the group does not train on where nobody will finish it.
    wait_for(lambda: not _still_runs(orphan), "the dead dispatcher's group task to end", timeout_s=30)
    stack.client.fine_tuning.jobs.cancel(jobs["cancelled-b"])
    stack.client.fine_tuning.jobs.pause(jobs["paused-c"])
    stack.start_dispatcher("dispatcher-rescuer")

    cancelled = wait_for(lambda: (j := stack.job(jobs["cancelled-b"])).status in _ENDED and j,
                         "the cancelled member to end", timeout_s=60)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    wait_for(lambda: stack.job(jobs["paused-c"]).status == "paused", "the paused member to pause", timeout_s=60)
    for suffix in ("stays-a", "stays-d"):
        done = _assert_succeeded_once(stack, jobs[suffix], suffix, checkpoint_step=steps_before[suffix])
        assert (done.model_extra or {}).get("attempt") == 2
    assert stack.versions("cancelled-b") == [] and stack.versions("paused-c") == []

    stack.client.fine_tuning.jobs.resume(jobs["paused-c"])  # resumes from its own checkpoint, alone
    _assert_succeeded_once(stack, jobs["paused-c"], "paused-c", checkpoint_step=steps_before["paused-c"])
    _assert_no_gpu_held(redis_server)


def test_two_dispatchers_forming_groups_from_one_queue_never_share_or_repeat_a_job(fleet_stack, redis_server):
    stack = _group_stack(fleet_stack)
    suffixes = [f"race-{i}" for i in range(8)]
    jobs = [stack.create_job(n_epochs=1, suffix=s).id for s in suffixes]
    for name in ("dispatcher-a", "dispatcher-b"):  # both claim and grow groups from the same queue at once
        stack.start_dispatcher(name)

    members: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for job_id, suffix in zip(jobs, suffixes, strict=True):
        done = _assert_succeeded_once(stack, job_id, suffix)
        assert (done.model_extra or {}).get("attempt") == 1, "a member was requeued: the race lost its lease"
        groups = _groups(stack, job_id)
        assert len(groups) <= 1, f"{job_id} trained in several groups: {groups}"
        for others, group_id in groups:
            members.setdefault(group_id, set()).add(job_id)
            assert sizes.setdefault(group_id, others + 1) == others + 1, (group_id, sizes[group_id], others)
    assert {g: len(m) for g, m in members.items()} == sizes, "a group's members disagree on its size"
    assert all(n <= MAX_GROUP for n in sizes.values()), sizes
    assert members, "no group formed: the test proves nothing"
    _assert_no_gpu_held(redis_server)


def test_a_frozen_dispatchers_group_is_retrained_elsewhere_and_its_stale_attempts_write_nothing(fleet_stack,
                                                                                                redis_server):
    """A dispatcher cut off (SIGSTOP, as a partitioned node) longer than a lease: its group's Ray task
    trains on, but every member is requeued and trained by another dispatcher; when the frozen one
    wakes, its stale attempts publish nothing, end nothing, and its group's task is stopped."""
    stack = _group_stack(fleet_stack)
    suffixes = [f"frozen-{i}" for i in range(3)]
    jobs = [stack.create_job(n_epochs=6, suffix=s).id for s in suffixes]
    frozen = stack.start_dispatcher("dispatcher-frozen")
    _wait_for_group(stack, jobs)
    steps_before = {job_id: max(stack.checkpoint_steps(job_id)) for job_id in jobs}
    stale_task = _group_task(jobs)

    frozen.send_signal(signal.SIGSTOP)
    try:
        stack.start_dispatcher("dispatcher-rescuer")
        for job_id in jobs:
            wait_for(lambda j=job_id: (stack.job(j).model_extra or {}).get("attempt") == 2,
                     f"{job_id} to be requeued and claimed again while its dispatcher is frozen", timeout_s=60)
    finally:
        frozen.send_signal(signal.SIGCONT)
    wait_for(lambda: not _still_runs(stale_task), "the stale group's task to end (its members fenced "
             "out, or stopped by the woken dispatcher)", timeout_s=60)

    for job_id, suffix in zip(jobs, suffixes, strict=True):
        done = _assert_succeeded_once(stack, job_id, suffix, checkpoint_step=steps_before[job_id])
        assert (done.model_extra or {}).get("attempt") == 2
    assert frozen.poll() is None, "the woken dispatcher died"
    _assert_no_gpu_held(redis_server)

