"""One co-training group's attempts, from their heartbeats' start to each job's end (docs/scheduling.md#co-training).

The dispatcher claimed a leader and the jobs that joined its group (fleet.co_training); each member
is a claim of its own, and keeps its own lease by its own heartbeat. A GroupRunner stages each
member's inputs exactly as a job alone (JobRunner.stage_inputs), then runs the whole group as ONE Ray
task holding the group's GPUs (workers.ray_train.run_group_on_ray → workers.cotrain.train_group),
with one JobReporter per member, fenced by that member's claim. As soon as a member ends, it is ended
where it trained (`MemberEnd`: its version published and the job finished `succeeded` exactly as a
job alone, or paused / handed back preempted / cancelled), while the others go on. A member's
error ends that member as JobRunner would (end_after_error). A cancel seen by a member's heartbeat
ends that job at once; its reporter, fenced out, takes it out of the group at the next step. While the
group still waits for its gang, a pause or preemption ends the member at once too (nothing trained
since its last checkpoint); a group left with no member stops waiting. A
dispatcher that stops hands every member back; one that dies leaves each member's lease to expire,
and each job is requeued by itself (fleet.leases), none lost, none run twice (the fences).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.exceptions import FencedOut, PauseWithdrawn
from fleet.fencing import Fence
from fleet.jobs import Job, JobStatus
from fleet.log_format import WorkerLogging
from fleet.queue import Claim, JobStore
from fleet.registry import AdapterRegistry
from fleet.settings import Settings, make_object_store, make_redis
from workers.job_reporter import JobReporterFactory
from workers.job_runner import Heartbeat, JobRunner, StagedJob, publish_version
from workers.loop import TrainingResult
from workers.placement import Gang, GangNotPlaced, gang_for, reserve_gang
from workers.ray_train import GroupEntry, TrainingAborted, run_group_on_ray
from workers.runner_thread import RunnerThread

if TYPE_CHECKING:
    from workers.dispatcher import Dispatcher

__all__ = ["GroupRunner", "MemberEnd"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemberEnd:
    """Picklable: ends one co-trained job inside the group's process as soon as its training ends, as
    JobRunner ends a job alone after its run: publish and succeed, pause (or hand back, preempted), or
    cancel. Every write is fenced by the member's claim; an error is raised to the group's task."""

    settings: Settings
    job: Job
    fence: Fence
    staged: StagedJob

    def __call__(self, result: TrainingResult) -> None:
        client = make_redis(self.settings)
        try:
            jobs = JobStore(client, max_attempts=self.settings.max_attempts,
                            events_max_len=self.settings.events_max_len)
            if result.status == "succeeded":
                registry = AdapterRegistry(client, make_object_store(self.settings))
                publish_version(registry, jobs, self.job, self.fence, result, self.staged, settings=self.settings,
                                alone=False)
            elif result.status == "paused":
                preempted = jobs.leases.control_signal(self.fence) == "preempt"
                try:
                    jobs.leases.finish_job(self.fence, JobStatus.QUEUED if preempted else JobStatus.PAUSED,
                                           **({"preempted": True} if preempted else {}))
                except PauseWithdrawn:
                    jobs.leases.finish_job(self.fence, JobStatus.QUEUED)
            else:
                jobs.leases.finish_job(self.fence, JobStatus.CANCELLED)
        finally:
            client.close()


class GroupRunner(RunnerThread):
    """The claimed attempts of one co-training group, on their own thread (`start`) or the caller's
    (`run`); `shut_down()` hands every member back (dispatcher shutdown)."""

    def __init__(self, dispatcher: Dispatcher, claims: list[Claim], group_id: str, *,
                 on_exit: Callable[[], object] | None = None) -> None:
        self.group_id = group_id  # the leader's job id and attempt (fleet.co_training): operators' logs only
        # What tenants read: the group id names another tenant's job, so their events carry an opaque one.
        self.public_id = f"cog-{secrets.token_hex(6)}"
        self.settings, self.jobs = dispatcher.settings, dispatcher.jobs
        self.members = [JobRunner(dispatcher, claim) for claim in claims]
        super().__init__(f"group-{group_id}", on_exit)  # shut_down(): every member handed back, its Ray task killed

    @property
    def claims(self) -> list[Claim]:
        return [m.claim for m in self.members]

    def _work_dir(self, member: JobRunner) -> Path:
        return member.work_root / member.claim.job.id / f"attempt-{member.claim.attempt}"

    def run(self) -> None:
        """Run the group to each member's end; never raises for a job's own failure."""
        logger.info("running co-training group %s (tenants see %s): %s", self.group_id, self.public_id,
                    [c.job.id for c in self.claims])
        try:
            with contextlib.ExitStack() as stack:
                beats = {m.claim.job.id: stack.enter_context(Heartbeat(self.jobs, m.claim, self.settings,
                                                                        self._shutdown))
                         for m in self.members}
                self._run_group(beats)
        except KeyboardInterrupt:
            for member in self.members:
                member.finish_quietly(member.claim.fence, JobStatus.QUEUED)
            raise
        except FencedOut as e:  # one member's attempt ended under the group: not the others' error
            logger.warning("co-training group %s stopped: %s; handing the members back", self.group_id, e)
            for member in self.members:  # fenced: a member that already ended is left as it is
                member.finish_quietly(member.claim.fence, JobStatus.QUEUED)
        except Exception as e:  # outside any one member (Redis away, Ray refusing the reservation): each as alone
            logger.warning("co-training group %s stopped: %s", self.group_id, e)
            for member in self.members:  # fenced: a member that already ended is left as it is
                member.end_after_error(e)
        finally:
            for member in self.members:
                member.join_abandoned()
                work_dir = self._work_dir(member)
                shutil.rmtree(work_dir, ignore_errors=True)
                with contextlib.suppress(OSError):
                    work_dir.parent.rmdir()
                member.end_sweep_if_done()

    def _say(self, member: JobRunner, level: str, message: str) -> None:
        """One event in `member`'s log, fenced by its claim: a member whose attempt already ended (a
        cancel, a lost lease) is left as it is; the others go on."""
        try:
            member.jobs.leases.append_event(member.claim.fence, level, message)
        except FencedOut as e:
            logger.info("co-training group %s: %s: %s", self.group_id, member.claim.job.id, e)

    def _run_group(self, beats: dict[str, Heartbeat]) -> None:
        staged: dict[str, tuple[JobRunner, StagedJob]] = {}
        for member in self.members:  # one after another: each member's checks are its own
            job_id = member.claim.job.id
            try:
                ready = member.stage_inputs(beats[job_id], self._work_dir(member))
            except Exception as e:
                member.end_after_error(e)
                continue
            if ready is not None:
                staged[job_id] = (member, ready)
        if not staged:
            return
        entries = []
        for job_id, (member, ready) in staged.items():
            claim = member.claim
            self._say(member, "info", f"Co-training with {len(staged) - 1} other job(s) on {ready.base_name} "
                      f"(group {self.public_id}): one process holds one copy of the base.")
            entries.append(GroupEntry(job_id, ready.inputs, JobReporterFactory(self.settings, claim.job.tenant_id,
                                                                               claim.fence),
                                      MemberEnd(self.settings, claim.job, claim.fence, ready)))
        gang = gang_for(self.members[0].claim.job.resources, self.settings)
        ended: set[str] = set()

        def members_left(placing: bool) -> str | None:
            """Ends the members whose control asks it, the others going on; "every member has ended" once
            none is left. `placing`: the group still waits for its gang, so nothing has trained since the
            member's last checkpoint and a pause or preemption ends it now, as a job alone waiting for Ray
            (JobRunner._reserve_gang); once training, the engine takes it out at its next step, checkpoint
            first, and MemberEnd ends it."""
            if self._shutdown.is_set():
                return "shutdown"
            for job_id, (member, _) in staged.items():  # a cancel ends that job now; the others go on
                if job_id in ended:
                    continue
                control = beats[job_id].control
                if beats[job_id].lost.is_set():  # requeued (maybe running elsewhere) or ended: no write
                    ended.add(job_id)
                elif control == "cancel":
                    ended.add(job_id)
                    member.finish_quietly(member.claim.fence, JobStatus.CANCELLED)
                elif placing and control in ("pause", "preempt"):
                    ended.add(job_id)
                    self._say(member, "info", f"Left the co-training group before it started: {control} requested.")
                    if control == "preempt":  # back to its place, to resume from its last checkpoint
                        member.finish_quietly(member.claim.fence, JobStatus.QUEUED, preempted=True)
                    else:
                        member.finish_quietly(member.claim.fence, JobStatus.PAUSED)
            # Each member leaves the Ray task at its next step (its reporter is fenced out); once none
            # is left, the task is stopped so that it does not hold the GPU for nobody.
            return "every member has ended" if len(ended) == len(staged) else None

        def should_stop() -> str | None:
            return members_left(placing=False)

        if not self._reserve(gang, staged, ended, lambda: members_left(placing=True)):
            return
        for job_id, (member, _) in staged.items():
            if job_id not in ended:
                self._say(member, "info", f"Starting training on Ray ({gang.describe()}, co-trained).")
        try:
            outcomes = run_group_on_ray(entries, resources=gang.bundle, train_on_cpu=gang.train_on_cpu,
                                        name=f"{self.group_id}-group", should_stop=should_stop,
                                        worker_logging=WorkerLogging(self.settings.log_format, self.group_id, ""))
        except TrainingAborted:
            for member, _ in staged.values():
                member.finish_quietly(member.claim.fence, JobStatus.QUEUED)
            return
        except Exception as e:  # the task itself failed (a node died, say): each member as a job alone would
            for member, _ in staged.values():
                member.end_after_error(e)
            return
        for job_id, (member, _) in staged.items():
            outcome = outcomes.get(job_id)
            if isinstance(outcome, Exception):
                member.end_after_error(outcome)
            elif outcome is None:  # never reported: hand it back to resume from its checkpoint
                member.finish_quietly(member.claim.fence, JobStatus.QUEUED)

    def _reserve(self, gang: Gang, staged: dict[str, tuple[JobRunner, StagedJob]], ended: set[str],
                 should_stop: Callable[[], str | None]) -> bool:
        """Gang admission on Ray for the group, as for a job alone (JobRunner._reserve_gang): the group's
        gang fits within placement_timeout_s, or every member goes back to the queue, parked for that
        long. False when the group does not go on (handed back, the dispatcher stops, or every member
        ended while it waited: `ended`, kept by `should_stop`, which also ends a member cancelled, paused
        or preempted while the group waits, within a heartbeat)."""
        timeout_s = self.settings.placement_timeout_s
        for member, _ in staged.values():
            self._say(member, "info", f"Reserving {gang.describe()} on Ray; waiting for resources.")

        def check_stop() -> None:
            reason = should_stop()
            if reason is not None:
                raise GangNotPlaced(f"the group stopped waiting: {reason}")

        try:
            reserve_gang(gang, timeout_s=timeout_s, check_stop=check_stop, name=f"{self.group_id}-group")
        except GangNotPlaced as e:
            shutting_down = self._shutdown.is_set()
            for job_id, (member, _) in staged.items():
                if job_id in ended:  # cancelled or lost while the group waited: its attempt is over
                    continue
                if not shutting_down:
                    self._say(member, "warn", f"{e}; requeued.")
                retry = {} if shutting_down else {"retry_after_ms": int(timeout_s * 1000)}
                member.finish_quietly(member.claim.fence, JobStatus.QUEUED, **retry)
            return False
        return True

