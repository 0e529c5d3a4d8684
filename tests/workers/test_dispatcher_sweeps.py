"""A dispatcher's share of rank sweeps without training: its maintenance tick finishes a sweep whose last
child the API cancelled, within seconds (not at the next minute's housekeeping)."""

from __future__ import annotations

from pathlib import Path

from fleet.job_spec import JobSpec
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.registry import AdapterRegistry
from fleet.settings import Settings, make_object_store, make_redis
from fleet.sweeps import SweepStore
from service.rank_sweeps import after_cancel
from tests.reliability.conftest import wait_for
from tests.service.conftest import write_peft_adapter
from workers.dispatcher import Dispatcher
from workers.maintenance import HOUSEKEEPING_INTERVAL_S


def test_a_busy_dispatchers_maintenance_tick_finishes_a_sweep_the_api_handed_over(redis_server, tmp_path: Path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", lease_ms=1500, heartbeat_ms=300)
    client = make_redis(settings)
    jobs = JobStore(client)
    registry = AdapterRegistry(client, make_object_store(settings))
    sweeps = SweepStore(jobs, registry)
    fields = {"model": "tiny-llama", "base_model": "tiny-llama", "init_adapter": None, "training_file": "file-t",
              "validation_file": "file-v", "suffix": "ticked", "seed": 1, "metadata": {},
              "spec": JobSpec(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})}
    parent, _ = sweeps.create_sweep("t1", [4, 8], fields=fields)
    r4, r8 = (c.id for c in parent.rank_sweep.children)

    # The dispatcher's main thread is busy elsewhere: only its maintenance thread runs (housekeeping
    # once at its start, then not for HOUSEKEEPING_INTERVAL_S).
    maintenance = Dispatcher(settings, worker_id="ticker").start_maintenance()
    try:
        claim = jobs.leases.claim_next_job("another-dispatcher", settings.lease_ms)
        assert claim.job.id == r4
        adapter = write_peft_adapter(tmp_path / "adapter", r=4)
        assert sweeps.submit_candidate(claim.job, claim.fence, adapter, {
            "rank": 4, "val_loss": 1.0, "steps": 2, "manifest_fields": {"base_model": "tiny-llama"}})
        jobs.leases.finish_job(claim.fence, JobStatus.SUCCEEDED)
        after_cancel(jobs, registry, "t1", jobs.request_cancel("t1", r8))  # the API: the last child ends
        # Well within the housekeeping interval: only the tick (every ~lease_ms/3) can have done it.
        wait_for(lambda: jobs.load_job(parent.id).status == JobStatus.SUCCEEDED,
                 "a maintenance tick to finish the sweep the API handed over", timeout_s=HOUSEKEEPING_INTERVAL_S / 2)
    finally:
        maintenance.stop()
    assert jobs.load_job(parent.id).fine_tuned_model == "ticked:v1"
