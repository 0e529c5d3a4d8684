"""MemberEnds: each co-trained member's end on a thread of its own, so the group's training goes on meanwhile.

When a member of a co-training group ends (finished, paused, cancelled, failed), its end — waiting for
its checkpoint uploads, then publishing its version or recording its pause — talks to the object store
and Redis for as long as they take (JobReporter.close alone waits up to 600 s). Run inline in the
group's loop, that time would stall the shared base and every other member. `submit` starts the end on
its own thread and returns at once; `wait` is called before the group's task returns (the task holds the
group's GPUs, and the driver renews every member's lease until it returns), and gives each member's
outcome: what its end returned, or the error it raised or a MemberEndTimedOut naming the job and what it
was waiting for (an infrastructure fault: the job goes back to the queue). An error is that member's
alone; the others' ends go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["MEMBER_END_TIMEOUT_S", "MemberEndTimedOut", "MemberEnds"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long one member's end may take, from the moment it is handed over: its checkpoint uploads
# (JobReporter waits up to 600 s for them), then publishing its version and recording its end.
MEMBER_END_TIMEOUT_S = 900.0


class MemberEndTimedOut(TimeoutError):
    """A member's end ran past its timeout: the object store or Redis stalled, not the job
    (workers.errors counts it as an infrastructure fault: the job is handed back to resume from its checkpoint)."""


class _End(Generic[T]):
    """One member's end on its thread: what it returned, or the error it raised."""

    def __init__(self, job_id: str, end: Callable[[], T]) -> None:
        self.job_id = job_id
        self.started = time.monotonic()
        self.value: T | None = None
        self.error: BaseException | None = None
        self._end = end
        self.thread = threading.Thread(target=self._run, name=f"member-end-{job_id}", daemon=True)

    def _run(self) -> None:
        try:
            self.value = self._end()
        except BaseException as error:  # this member's outcome; the others' ends go on
            logger.exception("%s: ending the co-trained job failed", self.job_id)
            self.error = error


class MemberEnds(Generic[T]):
    """The ends handed over so far, each running on its own thread; `wait()` once the group's training is over."""

    def __init__(self, timeout_s: float = MEMBER_END_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._ends: dict[str, _End[T]] = {}

    def submit(self, job_id: str, end: Callable[[], T]) -> None:
        """Start `end()` for `job_id` on a thread of its own and return at once; one end per member."""
        if job_id in self._ends:
            raise ValueError(f"the end of co-trained job {job_id} was already handed over: a member ends once")
        started = _End(job_id, end)
        started.thread.start()  # registered once running: wait() joins only threads that started
        self._ends[job_id] = started

    def wait(self) -> dict[str, T | BaseException]:
        """Each member's outcome once its end is over: its value, or the error it raised, or a MemberEndTimedOut
        when it ran past `timeout_s` after it was handed over (its thread is then left behind)."""
        outcomes: dict[str, T | BaseException] = {}
        for job_id, end in self._ends.items():
            end.thread.join(max(0.0, end.started + self.timeout_s - time.monotonic()))
            if end.thread.is_alive():
                logger.error("%s: its end did not complete within %g s", job_id, self.timeout_s)
                outcomes[job_id] = MemberEndTimedOut(
                    f"the end of co-trained job {job_id} (its checkpoint uploads, then publishing its version or "
                    f"recording its end) did not complete within {self.timeout_s:g} s: is the object store "
                    "or Redis reachable from the group's worker?")
            else:
                outcomes[job_id] = end.error if end.error is not None else end.value
        return outcomes
