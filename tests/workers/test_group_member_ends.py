"""A co-trained member's end does not hold up the group (workers.member_ends): while one member waits for
its object store (its pause's checkpoint upload), the others train on; the group's task still waits
for that end before it returns, so the paused job is recorded paused, with its checkpoint, once. Each
end's outcome is its own, and one that overruns its time is named."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.files import FileStore
from fleet.job_spec import JobSpec
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.resources import Resources
from fleet.settings import Settings, make_object_store, make_redis
from tests.conftest import S3Endpoint, free_port, wait_for_port
from tests.reliability.conftest import wait_for
from workers.dispatcher import Dispatcher
from workers.errors import is_infrastructure_fault
from workers.group_runner import GroupRunner
from workers.member_ends import MemberEnds
from workers.synthetic import write_synthetic_splits


class StoppableS3:
    """A moto S3 server of this test's own, which `stop()` freezes (SIGSTOP: connections are accepted,
    nothing is answered, as a stalled object store) until `resume()`."""

    def __init__(self) -> None:
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, timeout_s=60, proc=self.proc)
        self.endpoint = S3Endpoint(endpoint_url=f"http://127.0.0.1:{port}", bucket="member-ends")
        self.endpoint.client().create_bucket(Bucket=self.endpoint.bucket)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def stoppable_s3() -> Iterator[StoppableS3]:
    s3 = StoppableS3()
    try:
        yield s3
    finally:
        s3.close()


@pytest.mark.slow
def test_a_member_waiting_on_its_object_store_does_not_stop_the_others_steps(
        redis_server, tmp_path: Path, tiny_model_dir: Path, ray_cluster, stoppable_s3: StoppableS3):
    catalog = {"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none", "max_rank": 8}}
    s3 = stoppable_s3.endpoint
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", catalog=catalog, lease_ms=3000,
                        heartbeat_ms=300, co_training_max_group=2, object_store="s3", s3_bucket=s3.bucket,
                        s3_endpoint_url=s3.endpoint_url, s3_access_key_id="test", s3_secret_access_key="test")
    jobs = JobStore(make_redis(settings))
    files = FileStore(jobs.redis, make_object_store(settings), max_upload_bytes=settings.max_upload_bytes)
    train, _ = write_synthetic_splits(tmp_path / "data", n_train=12, n_val=2, seed=1)
    paused, goes_on = (
        jobs.create_job(tenant, model="tiny-llama", seed=seed, resources=Resources(gpus=1),
                        training_file=files.create_file(tenant, filename="train.jsonl", purpose="fine-tune",
                                                        content=train.read_bytes()).id,
                        spec=JobSpec(hyperparameters={"n_epochs": 50, "batch_size": 2},
                                     lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})).job.id
        for tenant, seed in (("t-paused", 1), ("t-goes-on", 2)))

    def step(job_id: str) -> int:
        progress = jobs.load_job(job_id).progress
        return progress.step if progress is not None else 0

    dispatcher = Dispatcher(settings, worker_id="member-ends-test")
    assert dispatcher.admit() == 2
    runner = next(iter({id(r): r for r in dispatcher._runners.values()}.values()))
    assert isinstance(runner, GroupRunner) and len(runner.claims) == 2, "the two jobs did not form one group"
    ended_as_specified = False
    try:
        for job_id in (paused, goes_on):  # inputs are fetched from the store: it is frozen only once both train
            wait_for(lambda j=job_id: step(j) >= 1, f"job {job_id} to train in its group", timeout_s=180)
        stoppable_s3.stop()
        jobs.request_pause("t-paused", paused)
        before = step(goes_on)
        # The paused member leaves at its next step and waits for its checkpoint's upload, which the
        # frozen store does not answer; the other member's steps go on meanwhile.
        wait_for(lambda: step(goes_on) >= before + 12, "the other member to train on while the paused one waits "
                 "for its object store", timeout_s=60)
        assert jobs.load_job(paused).status == JobStatus.RUNNING  # its end is still waiting for the store
        jobs.request_cancel("t-goes-on", goes_on)
        wait_for(lambda: jobs.load_job(goes_on).status == JobStatus.CANCELLED, "the other member to be cancelled",
                 timeout_s=30)
        assert jobs.load_job(paused).status == JobStatus.RUNNING  # the task waits for its end; its lease holds
        ended_as_specified = True
    finally:
        stoppable_s3.resume()
        if not ended_as_specified:  # leave no group running on the session's Ray cluster
            stopper = threading.Thread(target=dispatcher.hand_back_running_jobs, daemon=True)
            stopper.start()
            stopper.join(timeout=30)
    runner.join(timeout_s=120)
    assert not runner.is_alive(), "the group did not end once the store answered again"
    job = jobs.load_job(paused)
    assert (job.status, job.attempt) == (JobStatus.PAUSED, 1)  # ended once, by its own end, never requeued
    checkpoints = jobs.list_checkpoints(paused)
    assert checkpoints and checkpoints[0].step == step(paused), "the pause's checkpoint was not recorded first"



def test_each_members_end_has_its_own_outcome_and_one_that_overruns_is_named():
    class EndFailed(Exception):
        pass

    def fail() -> int:
        raise EndFailed("the object store refused the version")

    release = threading.Event()
    ends: MemberEnds[int] = MemberEnds(timeout_s=0.5)
    ends.submit("job-stuck", lambda: release.wait(30) and 0)
    ends.submit("job-fails", fail)
    ends.submit("job-ok", lambda: 7)
    with pytest.raises(ValueError, match="job-ok was already handed over"):
        ends.submit("job-ok", lambda: 8)
    try:
        outcomes = ends.wait()
    finally:
        release.set()

    assert outcomes["job-ok"] == 7
    assert isinstance(outcomes["job-fails"], EndFailed)
    stuck = outcomes["job-stuck"]
    assert isinstance(stuck, TimeoutError) and "co-trained job job-stuck" in str(stuck)
    assert "checkpoint uploads" in str(stuck) and "within 0.5 s" in str(stuck)
    # A stalled store is the machinery's fault, not the job's: the dispatcher hands the job back to resume.
    assert is_infrastructure_fault(stuck) and not is_infrastructure_fault(outcomes["job-fails"])


def test_a_group_task_leaves_the_files_of_members_whose_ends_still_run(tmp_path):
    from workers.ray_train import remove_group_work_dir

    root = tmp_path / "group"
    for job_id in ("job-done", "job-stuck"):
        (root / job_id / "out" / "adapter").mkdir(parents=True)
        (root / job_id / "out" / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    remove_group_work_dir(root, stalled=["job-stuck"])
    assert not (root / "job-done").exists()
    assert (root / "job-stuck" / "out" / "adapter" / "adapter_model.safetensors").read_bytes() == b"weights"

    remove_group_work_dir(root, stalled=[])
    assert not root.exists()
