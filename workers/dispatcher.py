"""The dispatcher: claims jobs from Redis, runs them on Ray Train, streams progress back, publishes adapters.

One dispatcher runs many jobs at once: it claims while claims succeed (the scheduler in Redis admits
only what fits the cluster; at most `max_concurrent_jobs` here) and runs each claim on its own
`JobRunner` thread, which:
1. holds the job's lease by heartbeat; losing it (fenced out) means another attempt owns the job;
2. fetches the dataset files to check them with the base model's tokenizer, stores their tokenization
   in the object store, and names the inputs the training workers fetch themselves: those files, the
   adapter to continue from and the latest checkpoint of earlier attempts (workers.input_staging; no
   path on the dispatcher's disk reaches a worker, which may run on any node);
3. reserves all the job's workers on Ray at once (gang admission, workers.placement), or hands the
   job back to the queue when they do not fit within `placement_timeout_s`;
4. runs `workers.ray_train.run_training_on_ray`; inside the rank-0 worker a `JobReporter` writes
   progress and events to Redis, uploads each checkpoint to the object store, and relays cancel/pause;
5. publishes the adapter through the registry (idempotent per job, fenced by the claim) and finishes
   the job. Every write carries the claim's fence (attempt + token), so a stale attempt can never
   change the job.
A dispatcher that dies leaves its lease to expire; the maintenance thread of any other dispatcher
(workers/maintenance.py, busy or not) requeues the job and the next attempt resumes from the last
checkpoint.

Cancel and pause reach every phase: the heartbeat keeps the latest control signal RENEW returns, each
blocking phase (downloads, dataset checks) runs on a helper thread the dispatcher stops waiting for,
and training runs as a Ray task the dispatcher kills (workers.ray_train). A cancel ends the job
`cancelled` at once; a pause first lets the training loop write and record its checkpoint (at most
settings.pause_grace_s), then ends it `paused`, to resume from that checkpoint. A preemption (control
"preempt", set by the scheduler to return borrowed capacity) is a pause to the training loop, after
which the job goes back to the queue at its place (`finish_job(..., preempted=True)`); outside training
it hands the job back at once. Stopping the dispatcher hands every running job back. Redis being
unreachable never fails a job: the reporter rides it out, and a longer outage hands the job back to
resume from its checkpoint.
An object-store or Ray node fault hands the job back too, at most `max_infra_faults` times
(workers.errors says which errors are faults of the machinery, and what of an error a tenant sees).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fleet.co_training import GroupJoin, MemberMemory, join_group, set_max_group
from fleet.exceptions import InvalidRequest
from fleet.files import FileStore
from fleet.jobs import Job
from fleet.queue import Claim, JobStore
from fleet.registry import AdapterRegistry
from fleet.retention import run_retention
from fleet.settings import Settings, load_catalog, make_object_store, make_redis
from fleet.sweeps import SweepStore
from workers.co_training_plan import group_device_bytes, group_memory
from workers.group_runner import GroupRunner
from workers.job_reporter import REDIS_DOWN as _REDIS_DOWN
from workers.job_reporter import JobReporter, JobReporterFactory
from workers.job_runner import JobRunner, build_training_spec, hyperparameters_used
from workers.maintenance import MaintenanceThread, claim_work_dir, sweep_work_dirs
from workers.metrics import TrainingMetrics, TrainingTelemetry, serve_metrics

# JobReporter, JobReporterFactory, build_training_spec and hyperparameters_used live in
# workers.job_reporter and workers.job_runner; they are named here too, where callers found them first.
__all__ = ["Dispatcher", "JobReporter", "JobReporterFactory", "build_training_spec", "hyperparameters_used"]

logger = logging.getLogger(__name__)


def _resolve_lazy_imports() -> None:
    """Resolve, on one thread, the lazily imported names the runner threads use: transformers' lazy
    module is not thread-safe, and two jobs checking their datasets at once failed with "cannot import
    name 'AutoTokenizer' from 'transformers'"."""
    import transformers

    transformers.AutoTokenizer  # noqa: B018 - the attribute access is the import



# ------------------------------------------------------------------------------------ dispatcher
class Dispatcher:
    """Claims jobs and runs each on its own JobRunner thread until `stop()`; see the module docstring
    for one job's life. It keeps claiming while claims succeed and fewer than `max_concurrent_jobs`
    run here: the scheduler in Redis decides what fits the cluster, the bound keeps one process sane."""

    def __init__(self, settings: Settings, *, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        client = make_redis(settings)
        self.store = make_object_store(settings)
        self.jobs = JobStore(client, max_attempts=settings.max_attempts, events_max_len=settings.events_max_len,
                             fair_share_half_life_s=settings.fair_share_half_life_s,
                             starvation_guard_s=settings.starvation_guard_s,
                             legacy_job_gpus=settings.legacy_job_gpus)
        self.files = FileStore(client, self.store, max_upload_bytes=settings.max_upload_bytes)
        self.registry = AdapterRegistry(client, self.store)
        self.sweeps = SweepStore(self.jobs, self.registry)
        self.catalog = load_catalog(settings)
        self.work_root = Path(settings.data_dir).resolve() / "work" / self.worker_id.replace(":", "-")
        self._stop = threading.Event()
        self._runner_done = threading.Event()  # set by a runner's thread as it ends: a slot is free
        self._runners: dict[str, JobRunner | GroupRunner] = {}  # job id → its runner (a group: one for all)

    def stop(self) -> None:
        """Stop claiming; `run_forever` hands the jobs running here back (to resume from their checkpoints)."""
        self._stop.set()

    @property
    def running_jobs(self) -> list[str]:
        """Ids of the jobs whose runners are still running here."""
        return [job_id for job_id, runner in self._runners.items() if runner.is_alive()]

    def running_job_tenants(self) -> dict[str, str]:
        """{job id: tenant id} of the jobs running here (for the metrics thread: a copy, read safely)."""
        return {c.job.id: c.job.tenant_id for r in list(self._runners.values()) if r.is_alive()
                for c in _claims_of(r)}

    def connect_ray(self) -> None:
        """Join the Ray cluster at `ray_address`, or start a private local one when it is unset (never
        the cluster a past `ray start` recorded on this machine), which declares
        `local_accelerators` logical accelerators (workers.placement.local_node_resources). Ray installs
        its own signal handlers: callers that want theirs install them after this."""
        import ray

        from workers.placement import local_node_resources

        if not ray.is_initialized():
            local = {}
            if not self.settings.ray_address and not self.settings.use_gpu:  # real GPUs: Ray detects them
                local = local_node_resources(self.settings.accelerator_resource, self.settings.local_accelerators)
            ray.init(address=self.settings.ray_address or "local", include_dashboard=False,
                     configure_logging=False, log_to_driver=False, **local)
            logger.info("dispatcher %s joined Ray at %s", self.worker_id, ray.get_runtime_context().gcs_address)

    def run_forever(self) -> None:
        """The dispatcher's main loop: claim while claims succeed, run each job on its own runner thread,
        wait for the queue's wakeup (or a runner ending) when nothing more is admitted. The maintenance
        thread reclaims expired leases; the capacity watch keeps the cluster's nodes current in Redis.

        Redis being unreachable is waited out (with backoff), not fatal: the jobs are safe in Redis,
        and whatever this dispatcher held is requeued by lease expiry if the outage outlasts it.
        On `stop()` or KeyboardInterrupt every running job is handed back, as a lost lease would.
        """
        from workers.capacity_watch import CapacityWatch

        self.connect_ray()
        maintenance = self.start_maintenance()
        capacity = CapacityWatch(self.jobs.redis, self.settings).start()
        stop_metrics = self.serve_metrics() if self.settings.metrics_port else None
        backoff_s = 0.5
        try:
            set_max_group(self.jobs.redis, self.settings.co_training_max_group)  # for the queue estimates
        except _REDIS_DOWN as e:  # estimates then show no co-training until the next start
            logger.warning("could not record co_training_max_group: %s", e)
        try:
            while not self._stop.is_set():
                try:
                    if self.admit() == 0:
                        self._wait_for_work_or_a_free_slot()
                    backoff_s = 0.5
                except _REDIS_DOWN as e:
                    logger.warning("Redis unreachable (%s); retrying in %.1fs", e, backoff_s)
                    self._stop.wait(backoff_s)
                    backoff_s = min(backoff_s * 2, 30.0)
        finally:
            self.hand_back_running_jobs()
            if stop_metrics is not None:
                stop_metrics()
            capacity.stop()
            maintenance.stop()

    def serve_metrics(self) -> Callable[[], None]:
        """Serve this dispatcher's training series on `metrics_port` (workers.metrics); returns the stop."""
        metrics = TrainingMetrics(self.running_job_tenants)
        client = make_redis(self.settings)
        telemetry = TrainingTelemetry(client, metrics, self.running_job_tenants).start()
        stop_server = serve_metrics(metrics.registry, self.settings.metrics_port)

        def stop() -> None:
            stop_server()
            telemetry.stop()
            client.close()

        return stop

    def admit(self) -> int:
        """Claim jobs while claims succeed and fewer than `max_concurrent_jobs` run here; start a
        JobRunner thread for each. Returns how many were started."""
        _resolve_lazy_imports()  # before any claim: the first call imports transformers (seconds)
        self._forget_finished_runners()
        started = 0
        while not self._stop.is_set() and self._running_count() < self.settings.max_concurrent_jobs:
            claim = self.jobs.leases.claim_next_job(self.worker_id, self.settings.lease_ms)
            if claim is None:
                break
            joined = self._join_co_training_group(claim)
            runner: JobRunner | GroupRunner
            if joined:
                group_id, members = joined[0].group_id, [claim, *(j.claim for j in joined)]
                runner = GroupRunner(self, members, group_id, on_exit=self._runner_done.set)
            else:
                members = [claim]
                runner = JobRunner(self, claim, on_exit=self._runner_done.set)
            for member in members:
                self._runners[member.job.id] = runner
            runner.start()
            started += len(members)
        return started

    def _running_count(self) -> int:
        """Runners here (a co-training group counts once: it is one process)."""
        return len({id(r) for r in self._runners.values()})

    def _join_co_training_group(self, leader: Claim) -> list[GroupJoin]:
        """Claim the jobs that join the just-claimed `leader` in a co-training group (fleet.co_training;
        none when co-training is off, the leader opted out or holds more than one GPU: a group trains on
        one device)."""
        job, most = leader.job, self.settings.co_training_max_group
        if most < 2 or not job.spec.co_training or job.resources.total_gpus != 1:  # one process, one device
            return []
        memory = self._co_training_memory(job)
        joined: list[GroupJoin] = []
        while len(joined) + 1 < most:
            try:
                join = join_group(self.jobs, leader.fence, self.worker_id, self.settings.lease_ms,
                                  max_members=most, memory=memory)
            except _REDIS_DOWN as e:  # the claims made so far stand; the group trains with them
                logger.warning("%s: could not grow its co-training group (%s)", job.id, e)
                break
            if join is None:
                break
            joined.append(join)
        return joined

    def _co_training_memory(self, job: Job) -> MemberMemory | None:
        """What the group's device memory leaves for members (workers.co_training_plan), or None when
        unchecked: CPU logical accelerators without `co_training_memory_gib` set (group_device_bytes)."""
        device_bytes = group_device_bytes(self.settings.co_training_memory_gib, self.settings.use_gpu)
        if device_bytes is None:
            return None
        try:
            base = self.catalog.get(job.base_model or job.model)
        except InvalidRequest:  # not in the catalog: the job fails on its own; nothing joins it
            return MemberMemory(budget_bytes=0, member_fixed_bytes=1, bytes_per_rank=0)
        return group_memory(Path(base.path), job.spec.quantization or base.quantization,
                            device_bytes=device_bytes, leader_rank=job.spec.lora.r)

    def hand_back_running_jobs(self, timeout_s: float = 60.0) -> None:
        """Stop every runner here, each handing its job back to the queue, and wait for them (at most
        `timeout_s` in all; a runner still busy then is left to its lease)."""
        runners = list({id(r): r for r in self._runners.values()}.values())
        for runner in runners:
            runner.shut_down()
        deadline = time.monotonic() + timeout_s
        for runner in runners:
            runner.join(max(0.0, deadline - time.monotonic()))
            if runner.is_alive():
                logger.warning("%s: its runner did not end within %.0fs of the shutdown; its lease will "
                               "expire and requeue it", [c.job.id for c in _claims_of(runner)], timeout_s)
        self._forget_finished_runners()

    def _forget_finished_runners(self) -> None:
        self._runners = {job_id: r for job_id, r in self._runners.items() if r.is_alive()}

    def _wait_for_work_or_a_free_slot(self) -> None:
        """Wait for the queue's wakeup when a slot is free here, else for a runner to end; a short poll
        either way, since capacity freed elsewhere in the cluster wakes nobody."""
        poll_s = max(0.2, min(2.0, self.settings.lease_ms / 2000))
        if self._running_count() < self.settings.max_concurrent_jobs:
            self.jobs.leases.wait_for_work(poll_s)  # woken when queued
        else:
            self._runner_done.wait(poll_s)
        self._runner_done.clear()

    def start_maintenance(self) -> MaintenanceThread:
        """Claim this dispatcher's work dir and start the thread that reclaims expired leases (and finishes
        handed-over rank sweeps) every ~lease_ms/3 and runs `run_housekeeping` (see workers/maintenance.py);
        stop it when done."""
        claim_work_dir(self.work_root)
        grace_ms = self.settings.lease_ms + self.settings.heartbeat_ms  # after a Redis restart: let leases renew
        return MaintenanceThread(reclaim=functools.partial(self._maintenance_tick, grace_ms),
                                 housekeeping=self.run_housekeeping,
                                 interval_s=self.settings.lease_ms / 3000,
                                 name=f"maintenance-{self.worker_id}").start()

    def _maintenance_tick(self, restart_grace_ms: int) -> None:
        """Every ~lease_ms/3: requeue expired leases, then finish the rank sweeps handed over to the
        dispatchers (the API cancelled their last child, or their finisher died: fleet.sweeps)."""
        self.jobs.leases.requeue_expired_leases(restart_grace_ms=restart_grace_ms)
        self.sweeps.finish_handed_over()

    def run_housekeeping(self) -> None:
        """Periodic chores, on the maintenance thread (at most every HOUSEKEEPING_INTERVAL_S): show this
        dispatcher's work dir is alive, remove those of dispatchers that are gone, and apply the
        retention policy to jobs that finished long enough ago (fleet.retention; idempotent, so every
        dispatcher may run it), and end the rank sweeps whose children have all ended (fleet.sweeps)."""
        claim_work_dir(self.work_root)
        sweep_work_dirs(self.work_root.parent, keep=self.work_root)
        run_retention(self.jobs.redis, self.store, self.settings)
        self.sweeps.finish_ended_sweeps()  # sweeps whose last child ended without a dispatcher (fleet.sweeps)

    def step(self) -> None:
        """Claim one job and run it to its end on this thread, or wait a little for one to be queued."""
        claim = self.jobs.leases.claim_next_job(self.worker_id, self.settings.lease_ms)
        if claim is None:
            self.jobs.leases.wait_for_work(max(0.2, min(5.0, self.settings.lease_ms / 2000)))  # woken when queued
            return
        self.run_claim(claim)

    def run_claim(self, claim: Claim) -> None:
        """Run one claimed attempt to its end on this thread (JobRunner.run)."""
        JobRunner(self, claim).run()


def _claims_of(runner: JobRunner | GroupRunner) -> list[Claim]:
    return runner.claims if isinstance(runner, GroupRunner) else [runner.claim]
