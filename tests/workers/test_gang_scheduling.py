"""Gang admission, capacity and node faults on a real multi-node Ray cluster on this machine.

One module-scoped cluster (tests/workers/ray_nodes.py): a head without GPUs and two worker nodes of two
logical GPUs each, as separate `ray start` processes; training runs on the CPU. One `lorafleet worker`
dispatcher process per test runs every job (many jobs per dispatcher). The tests run in order: the
last one kills a node.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.capacity import CapacityStore
from fleet.files import FileStore
from fleet.job_spec import JobSpec
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.resources import Resources
from fleet.settings import Settings, make_object_store, make_redis
from tests.reliability.conftest import wait_for
from tests.workers.ray_nodes import RayCluster, RayNode, start_cluster
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow

LEASE_MS, HEARTBEAT_MS = 3000, 250


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    # A short temp dir: Ray's socket paths under it must stay within AF_UNIX's 107 bytes, which pytest's
    # per-worker temp dirs (…/pytest-N/popen-gw0/…) exceed.
    temp_dir = Path(tempfile.mkdtemp(prefix="lf-gang-"))
    started = start_cluster(temp_dir, worker_gpus=[2, 2])
    yield started
    started.stop()
    shutil.rmtree(temp_dir, ignore_errors=True)



class Fleet:
    """One test's Redis, settings, uploaded training file and dispatcher process on the cluster."""

    def __init__(self, cluster: RayCluster, redis_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
        self.cluster = cluster
        catalog = {"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none", "max_rank": 8}}
        self.settings = Settings(redis_url=redis_url, data_dir=tmp_path / "var", catalog=catalog,
                                 ray_address=cluster.address, lease_ms=LEASE_MS, heartbeat_ms=HEARTBEAT_MS,
                                 max_concurrent_jobs=4, placement_timeout_s=3.0, train_max_failures=0)
        client = make_redis(self.settings)
        self.jobs, self.capacity = JobStore(client), CapacityStore(client)
        train, _ = write_synthetic_splits(tmp_path / "data", n_train=24, n_val=4, seed=1)
        files = FileStore(client, make_object_store(self.settings), max_upload_bytes=self.settings.max_upload_bytes)
        self.file_id = files.create_file("t1", filename="train.jsonl", purpose="fine-tune",
                                         content=train.read_bytes()).id
        self.log = tmp_path / "dispatcher.log"
        self.proc: subprocess.Popen | None = None

    def start_dispatcher(self) -> None:
        env = {**self.cluster.env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        for name, value in self.settings.model_dump(mode="json").items():
            if value is not None and name not in ("admin_key", "s3_secret_access_key"):
                env[f"LORAFLEET_{name.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--worker-id", "gang"],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop_dispatcher(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def create(self, resources: dict, *, n_epochs: int = 2) -> str:
        return self.jobs.create_job(
            "t1", model="tiny-llama", training_file=self.file_id, seed=1, resources=Resources(**resources),
            spec=JobSpec(hyperparameters={"n_epochs": n_epochs, "batch_size": 4},
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})).job.id

    def wait_for(self, predicate: Callable[[], Any], what: str, *job_ids: str, timeout_s: float = 180.0) -> Any:
        """`wait_for`, failing with the jobs' events and the dispatcher's log."""
        try:
            return wait_for(predicate, what, timeout_s)
        except AssertionError as e:
            events = {job_id: self.messages(job_id)[-15:] for job_id in job_ids}
            raise AssertionError(f"{e}\nevents: {events}\ndispatcher log: {self.log.read_text()[-4000:]}") from None

    def training(self, job_id: str) -> bool:
        job = self.jobs.load_job(job_id)
        return job.status == JobStatus.RUNNING and job.progress is not None and job.progress.step >= 1

    def wait_succeeded(self, job_id: str, timeout_s: float = 240.0) -> None:
        def ended() -> Any:
            job = self.jobs.load_job(job_id)
            return job if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED) else None

        job = self.wait_for(ended, f"{job_id} to end", job_id, timeout_s=timeout_s)
        assert job.status == JobStatus.SUCCEEDED, (job.error, self.messages(job_id), self.log.read_text()[-3000:])

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.jobs.read_events(job_id, limit=1000)]


@pytest.fixture
def fleet(cluster: RayCluster, redis_server, tmp_path: Path, tiny_model_dir: Path) -> Iterator[Fleet]:
    made = Fleet(cluster, redis_server.url, tmp_path, tiny_model_dir)
    yield made
    made.stop_dispatcher()


def _node(cluster: RayCluster, name: str) -> RayNode:
    return next(n for n in cluster.nodes if n.name == name)


def test_two_2gpu_jobs_run_side_by_side_then_a_4gpu_job_spans_both_nodes(fleet: Fleet, cluster: RayCluster):
    fleet.start_dispatcher()
    wait_for(lambda: fleet.capacity.total_gpus() == 4, "the dispatcher to record the cluster's 4 GPUs")
    assert sorted(n.gpus for n in fleet.capacity.nodes()) == [0, 2, 2]

    first, second = fleet.create({"gpus": 2}, n_epochs=12), fleet.create({"gpus": 2}, n_epochs=12)
    fleet.wait_for(lambda: fleet.training(first) and fleet.training(second), "both 2-GPU jobs to train at once",
                   first, second)
    workers = [_node(cluster, "worker-0"), _node(cluster, "worker-1")]
    assert all(node.runs_train_workers() for node in workers), "each job should hold one node's 2 GPUs"
    fleet.wait_succeeded(first)
    fleet.wait_succeeded(second)

    spanning = fleet.create({"workers": 2, "gpus_per_worker": 2})
    fleet.wait_for(lambda: fleet.training(spanning), "the 4-GPU job to train", spanning)
    assert all(node.runs_train_workers() for node in workers), "a 2 x 2-GPU gang needs both nodes"
    fleet.wait_succeeded(spanning)
    assert any("Reserving 4 GPU(s) (2 worker(s) × 2)" in m for m in fleet.messages(spanning))


def test_a_job_that_fits_no_node_waits_and_starts_when_a_node_joins(fleet: Fleet, cluster: RayCluster):
    fleet.start_dispatcher()
    wait_for(lambda: fleet.capacity.total_gpus() == 4, "the dispatcher to record the cluster's 4 GPUs")
    big = fleet.create({"workers": 1, "gpus_per_worker": 4}, n_epochs=1)  # no node has 4 GPUs yet
    fleet.wait_for(lambda: any("Could not reserve 4 GPUs on one gang within 3s; requeued." in m
                               for m in fleet.messages(big)), "the gang reservation to time out and requeue", big)
    assert fleet.jobs.load_job(big).status in (JobStatus.QUEUED, JobStatus.RUNNING)

    joined = cluster.add_node("worker-2", gpus=4)
    wait_for(lambda: fleet.capacity.total_gpus() == 8, "the joined node's 4 GPUs to be recorded")
    fleet.wait_for(lambda: fleet.training(big), "the waiting job to start on the joined node", big)
    assert joined.runs_train_workers()
    fleet.wait_succeeded(big)


def test_a_killed_nodes_job_is_requeued_and_resumes_from_its_checkpoint(fleet: Fleet, cluster: RayCluster):
    fleet.start_dispatcher()
    wait_for(lambda: fleet.capacity.total_gpus() >= 4, "the dispatcher to record the cluster")
    job_id = fleet.create({"gpus": 2}, n_epochs=30)
    fleet.wait_for(lambda: fleet.jobs.latest_checkpoint(job_id), "the job's first checkpoint", job_id, timeout_s=240)
    hosts = [n for n in cluster.nodes if n.name != "head" and n.runs_train_workers()]
    assert len(hosts) == 1, [n.name for n in hosts]
    gpus_before = fleet.capacity.total_gpus()
    hosts[0].kill()

    wait_for(lambda: fleet.capacity.total_gpus() == gpus_before - hosts[0].gpus, "the dead node's GPUs to go")
    fleet.wait_for(lambda: fleet.jobs.load_job(job_id).attempt >= 2, "the job to be requeued and claimed again", job_id)
    fleet.wait_succeeded(job_id, timeout_s=300)
    messages = fleet.messages(job_id)
    assert any(m.startswith("Resuming from the checkpoint at step") for m in messages), messages
    assert fleet.jobs.load_job(job_id).infra_faults == 1
