"""The webhook outbox against the Lua: every status change any script makes appends exactly one
`fine_tuning.job.<new status>` event in the same step; a script that changes nothing appends none."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from fleet import keys
from fleet.exceptions import FleetError
from fleet.objectstore import LocalObjectStore
from fleet.queue import JobStore
from fleet.registry import AdapterRegistry
from tests.fleet.test_fleet_registry import FIELDS, make_peft_dir
from tests.fleet.test_fleet_transitions import ACTIONS, SETUPS


def _outbox(r) -> list[dict[str, str]]:
    return [fields for _, fields in r.xrange(keys.webhook_outbox())]


def test_every_status_change_appends_its_event_and_nothing_else_does(r):
    for (setup_name, setup), (action_name, action) in itertools.product(SETUPS.items(), ACTIONS.items()):
        r.flushdb()
        jobs = JobStore(r, max_attempts=3)
        job_id, fence = setup(jobs)
        before = jobs.load_job(job_id).status
        r.delete(keys.webhook_outbox())
        try:
            action(jobs, job_id, fence)
        except FleetError:
            pass
        after = jobs.load_job(job_id).status
        status_events = [e for e in _outbox(r) if e["type"] != "fine_tuning.job.checkpoint.created"]
        expected = [f"fine_tuning.job.{after.value}"] if after != before else []
        where = f"{setup_name} / {action_name}"
        assert [e["type"] for e in status_events] == expected, where
        for event in status_events:
            assert event["tenant_id"] == "t1" and json.loads(event["data"]) == {"id": job_id}, where


def test_creating_a_job_emits_queued(r):
    job_id = JobStore(r).create_job("t1", model="m", training_file="f").job.id
    [event] = _outbox(r)
    assert event["type"] == "fine_tuning.job.queued" and json.loads(event["data"]) == {"id": job_id}
    assert int(event["created_at"]) > 1_700_000_000


def test_a_new_checkpoint_emits_once_and_a_rewritten_one_not_again(r):
    jobs = JobStore(r)
    job_id = jobs.create_job("t1", model="m", training_file="f").job.id
    claim = jobs.leases.claim_next_job("w", 60_000)
    r.delete(keys.webhook_outbox())
    jobs.leases.record_checkpoint(claim.fence, 7, "ckpt/7")
    jobs.leases.record_checkpoint(claim.fence, 7, "ckpt/7")  # a retried write of the same step
    [event] = _outbox(r)
    assert event["type"] == "fine_tuning.job.checkpoint.created"
    suffix = job_id.removeprefix("ftjob-")
    assert json.loads(event["data"]) == {"id": job_id, "step": 7, "checkpoint_id": f"ftckpt-{suffix}-7"}


def test_a_version_becoming_ready_emits_published_once(r, tmp_path: Path):
    jobs = JobStore(r)
    registry = AdapterRegistry(r, LocalObjectStore(tmp_path / "objects"))
    job_id = jobs.create_job("t1", model="tiny-llama", training_file="file-x").job.id
    claim = jobs.leases.claim_next_job("w", 60_000)
    src = make_peft_dir(tmp_path / "out")
    r.delete(keys.webhook_outbox())
    assert registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence) == "a:v1"
    [event] = _outbox(r)  # sent when the version is listed and downloadable, not before
    assert event["type"] == "adapter.version.published" and event["tenant_id"] == "t1"
    assert json.loads(event["data"]) == {"id": "a:v1", "job_id": job_id}
    assert registry.get_version("t1", "a:v1").job_id == job_id
    assert registry.publish_adapter_version("t1", "a", src, FIELDS, fence=claim.fence) == "a:v1"  # idempotent
    assert len(_outbox(r)) == 1


def test_an_imported_version_emits_published_without_a_job(r, tmp_path: Path):
    registry = AdapterRegistry(r, LocalObjectStore(tmp_path / "objects"))
    version = registry.import_adapter("t1", "imported", make_peft_dir(tmp_path / "imp"))
    [event] = _outbox(r)
    assert event["type"] == "adapter.version.published"
    assert json.loads(event["data"]) == {"id": version.ref}
