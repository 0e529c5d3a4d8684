"""The scheduler test harness shared by tests/fleet: a JobStore on a simulated cluster, driven at
simulated times, and the check that the scheduler's index agrees with the jobs."""

from __future__ import annotations

import redis

from fleet import keys
from fleet.capacity import CapacityStore, NodeCapacity
from fleet.jobs import JobStatus
from fleet.leases import Claim
from fleet.queue import JobStore
from fleet.quotas import QuotaStore, TenantQuota
from fleet.resources import Resources
from fleet.scheduler_view import cluster_view


class Cluster:
    """A JobStore on a cluster of `gpus`, with quotas, driven at simulated times (ms)."""

    def __init__(self, r: redis.Redis, gpus: int | None, half_life_s: float = 0, **quotas: TenantQuota) -> None:
        self.r = r
        self.jobs = JobStore(r, fair_share_half_life_s=half_life_s)
        self.quotas = QuotaStore(r, default=TenantQuota())
        for tenant, quota in quotas.items():
            self.quotas.set(tenant, quota)
        if gpus is not None:
            CapacityStore(r).record_nodes([NodeCapacity(node_id="n1", gpus=gpus)])
        self.claims: dict[str, Claim] = {}

    def submit(self, tenant: str, n: int = 1, gpus: int = 1, priority: str = "normal", at: int = 0) -> list[str]:
        return [
            self.jobs.create_job(
                tenant, model="m", training_file="f", resources=Resources(workers=gpus), priority=priority, now_ms=at
            ).job.id
            for _ in range(n)
        ]

    def admit(self, at: int = 0, limit: int = 100) -> list[str]:
        """Claim until nothing is admissible; the admitted job ids in order."""
        out = []
        while len(out) < limit and (claim := self.jobs.leases.claim_next_job("w", 60_000, now_ms=at)) is not None:
            self.claims[claim.job.id] = claim
            out.append(claim.job.id)
        return out

    def tenant_of(self, job_ids: list[str]) -> list[str]:
        return [self.jobs.load_job(j).tenant_id for j in job_ids]

    def finish(self, job_id: str, at: int, status: JobStatus = JobStatus.SUCCEEDED, **kwargs) -> None:
        self.jobs.leases.finish_job(self.claims.pop(job_id).fence, status, now_ms=at, **kwargs)

    def preempting(self) -> list[str]:
        return sorted(j for j in self.claims if self.r.hget(keys.job(j), "control") == "preempt")

    def held(self) -> dict[str, int]:
        view = cluster_view(self.r, now_ms=0)
        return {t.tenant_id: t.running_gpus for t in view.tenants if t.running_gpus}

    def allocated(self) -> int:
        return int(self.r.hget(keys.sched_cluster(), "allocated") or 0)


def index_problems(r: redis.Redis, tenants: list[str]) -> list[str]:
    """Every way the scheduler's state disagrees with the jobs themselves (an empty list: consistent)."""
    problems = []
    job_keys = [k for k in r.keys(keys.job("*")) if ":" not in k[len(keys.job("")):]]
    running = [k for k in job_keys if r.hget(k, "status") == "running"]
    gpus_by_tenant: dict[str, int] = {}
    for key in running:
        tenant, gpus = r.hmget(key, "tenant_id", "gpus")
        gpus_by_tenant[tenant] = gpus_by_tenant.get(tenant, 0) + int(gpus)
    allocated = int(r.hget(keys.sched_cluster(), "allocated") or 0)
    if allocated != sum(gpus_by_tenant.values()):
        problems.append(f"allocated {allocated} != running jobs' GPUs {sum(gpus_by_tenant.values())}")
    incoming = int(r.hget(keys.sched_cluster(), "incoming") or 0)
    being_preempted = sum(int(r.hget(k, "preempting_gpus") or 0) for k in running)
    if incoming != being_preempted:
        problems.append(f"incoming {incoming} != GPUs of jobs being preempted {being_preempted}")
    if set(r.smembers(keys.sched_holding())) != set(gpus_by_tenant):
        problems.append(f"holding {r.smembers(keys.sched_holding())} != {set(gpus_by_tenant)}")
    buckets = {b: set(r.zrange(b, 0, -1)) for b in r.zrange(keys.sched_buckets(), 0, -1)}
    for tenant in tenants:
        state = r.hgetall(keys.sched_tenant(tenant))
        if int(state.get("gpus") or 0) != gpus_by_tenant.get(tenant, 0):
            problems.append(f"{tenant}: gpus {state.get('gpus')} != {gpus_by_tenant.get(tenant, 0)}")
        head = r.zrange(keys.queue(tenant), 0, 0)
        if (state.get("head") or "") != (head[0] if head else ""):
            problems.append(f"{tenant}: cached head {state.get('head')} != {head}")
        in_buckets = [b for b, members in buckets.items() if tenant in members]
        if head and tenant not in gpus_by_tenant:
            g = r.hget(keys.job(head[0]), "gpus")
            if len(in_buckets) > 1 or (in_buckets and not in_buckets[0].endswith(f":{g}")):
                problems.append(f"{tenant}: head needs {g} GPUs, indexed in {in_buckets}")
            if not in_buckets and float(state["borrow"] or "inf") >= int(g) - float(state["nominal"]):
                problems.append(f"{tenant}: admissible head {head[0]} in no bucket")
        elif in_buckets:
            problems.append(f"{tenant}: holds GPUs or has no queue, yet indexed in {in_buckets}")
    return problems
