"""Job resources and priority, tenant quotas and the capacity table, against a real redis-server."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.exceptions import QuotaExceeded
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.quotas import QuotaStore, TenantQuota
from fleet.resources import Resources
from fleet.settings import Settings


def test_resources_accept_both_forms_but_not_mixed():
    assert Resources().total_gpus == 1
    assert Resources.model_validate({"gpus": 4}) == Resources(workers=4, gpus_per_worker=1)
    assert Resources.model_validate({"workers": 2, "gpus_per_worker": 2}).total_gpus == 4
    with pytest.raises(ValidationError, match="not both forms"):
        Resources.model_validate({"gpus": 4, "workers": 2})
    with pytest.raises(ValidationError):
        Resources.model_validate({"gpus": 0})


def test_job_stores_resources_and_priority_with_scalars_for_lua(r):
    jobs = JobStore(r)
    job = jobs.create_job(
        "t1", model="m", training_file="f", resources=Resources(workers=2, gpus_per_worker=2), priority="high"
    ).job
    assert (job.resources.total_gpus, job.priority) == (4, "high")
    assert r.hmget(f"lf:job:{job.id}", "gpus", "priority_value") == ["4", "1"]
    default = jobs.create_job("t1", model="m", training_file="f").job
    assert (default.resources, default.priority) == (Resources(), "normal")


def test_quota_store_falls_back_to_the_default_and_lists_only_set_ones(r):
    quotas = QuotaStore(r, default=TenantQuota(nominal_gpus=2))
    assert quotas.get("t1") == TenantQuota(nominal_gpus=2)
    set_quota = TenantQuota(nominal_gpus=8, borrowing_limit_gpus=4, max_queued_jobs=10, weight=2.5)
    assert quotas.set("t1", set_quota) == set_quota
    assert quotas.get("t1") == set_quota
    assert quotas.list() == {"t1": set_quota}
    quotas.reset("t1")
    assert quotas.get("t1") == TenantQuota(nominal_gpus=2)
    assert quotas.list() == {}


def test_submission_at_max_queued_jobs_is_refused_with_the_limit_named(r):
    jobs = JobStore(r)
    QuotaStore(r, default=TenantQuota()).set("t1", TenantQuota(max_queued_jobs=2))
    for _ in range(2):
        jobs.create_job("t1", model="m", training_file="f")
    with pytest.raises(QuotaExceeded, match="max_queued_jobs") as refused:
        jobs.create_job("t1", model="m", training_file="f")
    assert refused.value.limit == "max_queued_jobs" and refused.value.retry_after_s > 0
    assert jobs.create_job("t2", model="m", training_file="f").job.status == JobStatus.QUEUED  # others unaffected


def test_default_quota_limit_applies_to_tenants_without_their_own(r):
    jobs = JobStore(r)
    QuotaStore(r, default=TenantQuota(max_queued_jobs=1))
    jobs.create_job("t1", model="m", training_file="f")
    with pytest.raises(QuotaExceeded):
        jobs.create_job("t1", model="m", training_file="f")


def test_capacity_store_replaces_nodes_and_reports_the_ones_lost(r):
    capacity = CapacityStore(r)
    assert not capacity.is_known() and capacity.total_gpus() == 0
    assert capacity.record_nodes([NodeCapacity(node_id="a", gpus=2), NodeCapacity(node_id="b", gpus=2)]) == []
    assert capacity.total_gpus() == 4 and capacity.is_known()
    lost = capacity.record_nodes(
        [NodeCapacity(node_id="a", gpus=2, alive=False), NodeCapacity(node_id="c", gpus=8)]
    )
    assert lost == ["a", "b"]
    assert capacity.total_gpus() == 8
    assert [(n.node_id, n.alive) for n in capacity.nodes()] == [("a", False), ("c", True)]


def test_scheduling_settings_read_the_default_quota_as_json(monkeypatch):
    monkeypatch.setenv("LORAFLEET_DEFAULT_QUOTA", '{"nominal_gpus": 4, "max_queued_jobs": 100}')
    monkeypatch.setenv("LORAFLEET_FAIR_SHARE_HALF_LIFE_S", "0")
    settings = Settings()
    assert settings.default_quota == TenantQuota(nominal_gpus=4, max_queued_jobs=100)
    assert settings.fair_share_half_life_s == 0
    assert settings.accelerator_resource == "GPU"
