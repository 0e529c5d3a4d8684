"""One dispatcher, many jobs: each claim on its own runner thread, all handed back on shutdown; and the
worker side of preemption (checkpoint now, back to the queue, resume from that checkpoint, ending with
the adapter an uninterrupted run gives)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.files import FileStore
from fleet.job_spec import JobSpec
from fleet.jobs import JobStatus
from fleet.leases import PREEMPTED_MESSAGE
from fleet.queue import JobStore
from fleet.quotas import QuotaStore, TenantQuota
from fleet.registry import AdapterRegistry
from fleet.resources import Resources
from fleet.settings import Settings, make_object_store, make_redis
from tests.reliability.conftest import wait_for
from workers.dispatcher import Dispatcher
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow



class Setup:
    """Settings with the tiny model and short leases, a JobStore, and an uploaded training file per tenant."""

    def __init__(self, redis_url: str, tmp_path: Path, tiny_model_dir: Path, **overrides: Any) -> None:
        catalog = {"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none", "max_rank": 8}}
        # Co-training off: these tests are about jobs that train alone (one runner per claimed job, the
        # preemption of a lone job, its adapter equal to an uninterrupted lone run's). Groups under the
        # same faults: tests/reliability/test_group_faults.py; a group's preemption: workers.group_runner's.
        overrides.setdefault("co_training_max_group", 1)
        self.settings = Settings(redis_url=redis_url, data_dir=tmp_path / "var", catalog=catalog, lease_ms=3000,
                                 heartbeat_ms=250, **overrides)
        self.client = make_redis(self.settings)
        self.jobs = JobStore(self.client)
        self.files = FileStore(self.client, make_object_store(self.settings),
                               max_upload_bytes=self.settings.max_upload_bytes)
        self.train, _ = write_synthetic_splits(tmp_path / "data", n_train=24, n_val=4, seed=1)

    def create(self, tenant: str, *, n_epochs: int = 1) -> str:
        file = self.files.create_file(tenant, filename="train.jsonl", purpose="fine-tune",
                                      content=self.train.read_bytes())
        return self.jobs.create_job(
            tenant, model="tiny-llama", training_file=file.id, seed=1, resources=Resources(gpus=1),
            spec=JobSpec(hyperparameters={"n_epochs": n_epochs, "batch_size": 4},
                         lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})).job.id

    def step(self, job_id: str) -> int:
        progress = self.jobs.load_job(job_id).progress
        return progress.step if progress is not None else 0

    def adapter_weights(self, job_id: str, dest: Path) -> dict[str, torch.Tensor]:
        """The tensors of the adapter version the job published."""
        from safetensors.torch import load_file

        job = self.jobs.load_job(job_id)
        registry = AdapterRegistry(self.client, make_object_store(self.settings))
        folder = registry.download_version(job.tenant_id, job.fine_tuned_model, dest)
        return load_file(str(folder / "adapter_model.safetensors"))

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.jobs.read_events(job_id, limit=1000)]

    def waiting_for_ray(self, job_id: str) -> bool:
        return any("waiting for resources" in m for m in self.messages(job_id))

    def reclaimable_cluster(self) -> None:
        """A cluster of one GPU in Redis (Ray has more): a borrower's job fills it, and the owner of
        that GPU (nominal quota 1) reclaims it by preemption."""
        CapacityStore(self.client).record_nodes([NodeCapacity(node_id="n1", gpus=1)])
        QuotaStore(self.client, default=TenantQuota()).set("owner", TenantQuota(nominal_gpus=1))


def test_one_dispatcher_runs_several_jobs_and_hands_them_all_back_when_stopped(redis_server, tmp_path,
                                                                               tiny_model_dir, ray_cluster):
    # A resource no node has: each job waits in its gang reservation, holding its claim, as on a full cluster.
    setup = Setup(redis_server.url, tmp_path, tiny_model_dir, max_concurrent_jobs=2, placement_timeout_s=300,
                  train_resources_per_worker={"unobtainium": 1})
    first, second, third = (setup.create("t1") for _ in range(3))
    dispatcher = Dispatcher(setup.settings, worker_id="many")
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    wait_for(lambda: setup.waiting_for_ray(first) and setup.waiting_for_ray(second), "two jobs running at once")
    assert sorted(dispatcher.running_jobs) == sorted([first, second])
    assert setup.jobs.load_job(third).status == JobStatus.QUEUED  # max_concurrent_jobs bounds this process

    dispatcher.stop()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the dispatcher did not stop"
    assert [setup.jobs.load_job(j).status for j in (first, second, third)] == [JobStatus.QUEUED] * 3


def test_a_job_preempted_while_waiting_for_ray_is_handed_back_at_once(redis_server, tmp_path, tiny_model_dir,
                                                                      ray_cluster):
    setup = Setup(redis_server.url, tmp_path, tiny_model_dir, max_concurrent_jobs=2, placement_timeout_s=300,
                  train_resources_per_worker={"unobtainium": 1})
    setup.reclaimable_cluster()
    borrowed = setup.create("borrower")
    dispatcher = Dispatcher(setup.settings, worker_id="preempt-waiting")
    assert dispatcher.admit() == 1
    wait_for(lambda: setup.waiting_for_ray(borrowed), "the borrower's job to wait for Ray")

    owners = setup.create("owner")
    assert dispatcher.admit() == 0  # the scheduler asks the borrower's job to stop instead
    wait_for(lambda: setup.jobs.load_job(borrowed).status == JobStatus.QUEUED, "the preempted job to be requeued",
             timeout_s=10)
    assert PREEMPTED_MESSAGE in setup.messages(borrowed)
    assert setup.jobs.latest_checkpoint(borrowed) is None  # it never trained: nothing to save
    wait_for(lambda: dispatcher.admit() == 1, "the owner's job to be admitted")
    assert dispatcher.running_jobs == [owners]
    dispatcher.hand_back_running_jobs()


def test_a_preempted_job_checkpoints_now_and_resumes_from_that_checkpoint(redis_server, tmp_path, tiny_model_dir,
                                                                          ray_cluster):
    setup = Setup(redis_server.url, tmp_path, tiny_model_dir, max_concurrent_jobs=2)
    setup.reclaimable_cluster()
    borrowed = setup.create("borrower", n_epochs=30)  # 30 steps: periodic checkpoints at 10 and 20
    dispatcher = Dispatcher(setup.settings, worker_id="preempt-training")
    assert dispatcher.admit() == 1
    wait_for(lambda: setup.step(borrowed) >= 2, "the borrower's job to train")

    owners = setup.create("owner")
    assert dispatcher.admit() == 0  # the owner reclaims its GPU: the borrower's job is asked to stop
    wait_for(lambda: setup.jobs.load_job(borrowed).status == JobStatus.QUEUED, "the preempted job to be requeued",
             timeout_s=60)
    checkpoint = setup.jobs.latest_checkpoint(borrowed)
    assert checkpoint is not None and checkpoint.step < 10, checkpoint  # saved on preemption, not periodically
    messages = setup.messages(borrowed)
    assert PREEMPTED_MESSAGE in messages and "The job was paused." not in messages

    wait_for(lambda: dispatcher.admit() == 1, "the owner's job to be admitted")
    setup.jobs.request_cancel("owner", owners)  # give the GPU back early
    wait_for(lambda: dispatcher.admit() == 1, "the preempted job to be admitted again", timeout_s=60)
    wait_for(lambda: setup.jobs.load_job(borrowed).status == JobStatus.SUCCEEDED, "the resumed job to succeed",
             timeout_s=240)
    assert f"Resuming from the checkpoint at step {checkpoint.step}." in setup.messages(borrowed)

    # The same job run without interruption (same data, same seed, CPU) ends with the same adapter.
    straight = setup.create("borrower", n_epochs=30)
    wait_for(lambda: dispatcher.admit() == 1, "the uninterrupted job to be admitted", timeout_s=60)
    wait_for(lambda: setup.jobs.load_job(straight).status == JobStatus.SUCCEEDED,
             "the uninterrupted job to succeed", timeout_s=240)
    resumed, uninterrupted = (setup.adapter_weights(j, tmp_path / j) for j in (borrowed, straight))
    assert resumed.keys() == uninterrupted.keys()
    for name, weight in uninterrupted.items():
        torch.testing.assert_close(resumed[name], weight, rtol=0, atol=1e-6, msg=name)
