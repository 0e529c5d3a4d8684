"""docs/scheduling.md's worked example, replayed through the real scheduler on a real redis-server: the
admissions, the preemption, the scores and the waiting reasons the page quotes. If the policy changes,
this fails and the page must change with it."""

from __future__ import annotations

import pytest

from fleet import fair_share
from fleet.capacity import CapacityStore, NodeCapacity
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.quotas import QuotaStore, TenantQuota
from fleet.resources import Resources
from fleet.scheduler_view import cluster_view

MIN = 60_000  # ms


@pytest.fixture
def r(redis_server):
    client = redis_server.client(decode_responses=True)
    yield client
    client.close()


def test_the_worked_example_of_docs_scheduling_md(r):
    jobs = JobStore(r, fair_share_half_life_s=3600)
    quotas = QuotaStore(r, default=TenantQuota())
    quotas.set("team-a", TenantQuota(nominal_gpus=4))
    quotas.set("team-b", TenantQuota(nominal_gpus=4))
    quotas.set("team-c", TenantQuota(nominal_gpus=0, borrowing_limit_gpus=4, weight=2))
    CapacityStore(r).record_nodes([NodeCapacity(node_id="n1", gpus=4), NodeCapacity(node_id="n2", gpus=4)])
    claims = {}

    def submit(tenant: str, gpus: int, at: int) -> str:
        return jobs.create_job(tenant, model="m", training_file="f", resources=Resources(gpus=gpus), now_ms=at).job.id

    def admit(at: int) -> list[str]:
        admitted = []
        while (claim := jobs.leases.claim_next_job("w", 10**9, now_ms=at)) is not None:
            claims[claim.job.id] = claim
            admitted.append(claim.job.id)
        return admitted

    def tenants(at: int) -> dict:
        return {t.tenant_id: t for t in cluster_view(r, now_ms=at).tenants}

    # 0 min: team-a's three 2-GPU jobs; a2 borrows.
    a0, a1, a2 = (submit("team-a", 2, 0) for _ in range(3))
    assert admit(0) == [a0, a1, a2]
    assert (tenants(0)["team-a"].running_gpus, tenants(0)["team-a"].borrowed_gpus) == (6, 2)
    # 10 min: b0 (4 GPUs) reclaims 2: a2, the most recently admitted borrower job, is asked to stop.
    b0 = submit("team-b", 4, 10 * MIN)
    assert admit(10 * MIN) == []
    assert jobs.leases.control_signal(claims[a2].fence) == "preempt"
    assert jobs.leases.control_signal(claims[a0].fence) is None
    view = tenants(10 * MIN)
    assert cluster_view(r, now_ms=10 * MIN).totals.being_preempted == 2
    assert view["team-b"].waiting_reason == ("waiting for 4 GPUs; 2 free; within the tenant's nominal quota; "
                                             "reclaiming borrowed GPUs")
    assert round(view["team-a"].share_score, 2) == 0.65
    # 11 min: c0 waits behind team-b's reclaim; a2's checkpoint is done and b0 starts.
    c0 = submit("team-c", 2, 11 * MIN)
    assert admit(11 * MIN) == []
    assert (tenants(11 * MIN)["team-c"].waiting_reason or "").startswith("waiting for its turn")
    jobs.leases.finish_job(claims.pop(a2).fence, JobStatus.QUEUED, preempted=True, now_ms=11 * MIN)
    assert admit(11 * MIN) == [b0]
    assert tenants(11 * MIN)["team-a"].waiting_reason == "waiting for 2 GPUs; 0 free; tenant at nominal quota"
    # 40 min: a0 ends; a2 (within nominal) goes before c0 (borrowing) and resumes.
    jobs.leases.finish_job(claims.pop(a0).fence, JobStatus.SUCCEEDED, now_ms=40 * MIN)
    assert admit(40 * MIN) == [a2]
    assert round(tenants(40 * MIN)["team-a"].share_score, 2) == 1.65
    # the page's aside: had a2 been borrowing too, c0 would have gone first (entry scores 2.24 vs 0.25)
    consumed_a = tenants(40 * MIN)["team-a"].share_score  # weight 1
    assert round(fair_share.entry_score(consumed_a, 2, 2, 1.0, 3_600_000), 2) == 2.24
    assert round(fair_share.entry_score(0.0, 0, 2, 2.0, 3_600_000), 2) == 0.25
    # 50 min: a1 ends; c0 borrows the 2 GPUs.
    jobs.leases.finish_job(claims.pop(a1).fence, JobStatus.SUCCEEDED, now_ms=50 * MIN)
    assert admit(50 * MIN) == [c0]
    held = {t: v.running_gpus for t, v in tenants(50 * MIN).items()}
    assert held == {"team-a": 2, "team-b": 4, "team-c": 2}
