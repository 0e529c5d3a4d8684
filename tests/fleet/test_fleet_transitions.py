"""ALLOWED_TRANSITIONS against the Lua: every script driven from every state on a real redis-server.

Each observed move must be allowed, and each allowed move must be observed: the table and the scripts
cannot drift apart.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from fleet.exceptions import FleetError
from fleet.fencing import Fence
from fleet.jobs import ALLOWED_TRANSITIONS, JobError, JobStatus
from fleet.queue import JobStore

FAR_FUTURE_MS = 10**13
Setup = Callable[[JobStore], tuple[str, Fence]]


def _queued(jobs: JobStore) -> str:
    return jobs.create_job("t1", model="m", training_file="f").job.id


def _running(control: str | None = None) -> Setup:
    def setup(jobs: JobStore) -> tuple[str, Fence]:
        job_id = _queued(jobs)
        claim = jobs.leases.claim_next_job("w", 60_000)
        if control == "cancel":
            jobs.request_cancel("t1", job_id)
        elif control == "pause":
            jobs.request_pause("t1", job_id)
        return job_id, claim.fence

    return setup


def _finished(status: str) -> Setup:
    def setup(jobs: JobStore) -> tuple[str, Fence]:
        job_id, fence = _running()(jobs)
        jobs.leases.finish_job(fence, status, error=JobError(code="x", message="x"))
        return job_id, fence

    return setup


def _not_running(then: Callable[[JobStore, str], object] | None = None) -> Setup:
    def setup(jobs: JobStore) -> tuple[str, Fence]:
        job_id = _queued(jobs)
        if then is not None:
            then(jobs, job_id)
        return job_id, Fence(job_id, 1, "no-claim")

    return setup


SETUPS: dict[str, Setup] = {
    "queued": _not_running(),
    "paused": _not_running(lambda jobs, job_id: jobs.request_pause("t1", job_id)),
    "cancelled": _not_running(lambda jobs, job_id: jobs.request_cancel("t1", job_id)),
    "running": _running(),
    "running, cancel requested": _running("cancel"),
    "running, pause requested": _running("pause"),
    "succeeded": _finished("succeeded"),
    "failed": _finished("failed"),
}

ACTIONS: dict[str, Callable[[JobStore, str, Fence], object]] = {
    "cancel": lambda jobs, job_id, fence: jobs.request_cancel("t1", job_id),
    "pause": lambda jobs, job_id, fence: jobs.request_pause("t1", job_id),
    "resume": lambda jobs, job_id, fence: jobs.resume("t1", job_id),
    "claim": lambda jobs, job_id, fence: jobs.leases.claim_next_job("w2", 60_000),
    "renew": lambda jobs, job_id, fence: jobs.leases.renew_lease(fence, 60_000),
    "control": lambda jobs, job_id, fence: jobs.leases.control_signal(fence),
    "progress": lambda jobs, job_id, fence: jobs.leases.record_progress(fence, step=1),
    "checkpoint": lambda jobs, job_id, fence: jobs.leases.record_checkpoint(fence, 1, "ckpt/1"),
    "event": lambda jobs, job_id, fence: jobs.leases.append_event(fence, "info", "hello"),
    "expire lease": lambda jobs, job_id, fence: jobs.leases.requeue_expired_leases(now_ms=FAR_FUTURE_MS),
    **{
        f"finish {status.value}": (
            lambda jobs, job_id, fence, status=status: jobs.leases.finish_job(
                fence, status, error=JobError(code="x", message="x")
            )
        )
        for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED)
    },
}


@pytest.fixture
def observed_moves(r) -> dict[tuple[JobStatus, JobStatus], str]:
    """(from, to) → "<setup> / <action>" for every status change any script makes from any state."""
    moves: dict[tuple[JobStatus, JobStatus], str] = {}
    for (setup_name, setup), (action_name, action) in itertools.product(SETUPS.items(), ACTIONS.items()):
        r.flushdb()
        jobs = JobStore(r, max_attempts=3)
        job_id, fence = setup(jobs)
        before = jobs.load_job(job_id).status
        try:
            action(jobs, job_id, fence)
        except FleetError:
            pass  # a refusal changes nothing; the status comparison below still checks that
        after = jobs.load_job(job_id).status
        if after != before:
            moves.setdefault((before, after), f"{setup_name} / {action_name}")
    return moves


def test_the_scripts_make_exactly_the_allowed_transitions(observed_moves):
    forbidden = {move: how for move, how in observed_moves.items() if move[1] not in ALLOWED_TRANSITIONS[move[0]]}
    assert forbidden == {}, "a script makes a move ALLOWED_TRANSITIONS does not list"
    allowed = {(a, b) for a, targets in ALLOWED_TRANSITIONS.items() for b in targets}
    assert allowed - set(observed_moves) == set(), "ALLOWED_TRANSITIONS lists a move no script makes"
