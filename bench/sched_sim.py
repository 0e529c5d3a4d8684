"""Discrete-event simulation of the cluster scheduler, driven through the real admission code on a real Redis.

    python bench/sched_sim.py [--quick] [--seed 0] [--only fair,weights,mixed,reclaim,decision]

Every decision is the real one: jobs are created with `JobStore.create_job`, admitted with
`jobs.leases.claim_next_job` and ended with `finish_job`, all with a simulated clock (`now_ms`), against
a throwaway redis-server; the simulation only decides *when* things happen (arrivals, job ends, the
checkpoint a preempted job writes before it hands its GPUs back). The cluster is 8 nodes x 8 GPUs.

Scenarios (each prints its figures; targets from issue 10 in brackets):
- fair:     tenants with equal weights and no nominal quota, each keeping a backlog (saturation); Jain's
            fairness index of the GPU-time shares after a warm-up [>= 0.99].
- weights:  the same with weights 1:2:3:4; each tenant's share against weight / sum of weights [within 5 %].
- mixed:    tenants with different weights, quotas, borrowing limits, sizes and Poisson arrivals at
            ~110 % of capacity: utilization while jobs wait [>= 95 %], GPU-time left idle while a waiting
            job would have fit, p50/p95 wait per tenant.
- reclaim:  a tenant at nominal 32 GPUs arrives while another borrows the whole cluster; time until
            it holds its nominal quota [one checkpoint-on-preempt + restart].
- decision: time of one claim_next_job at 1k/10k/100k queued jobs x 10/100/1000 tenants [<= 2 ms at
            100k, <= 3x the time at 1k].

`--quick` runs small versions of all of them in seconds (tests/bench/test_sched_sim.py runs it).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis  # noqa: E402

from bench.local_redis import local_redis  # noqa: E402
from fleet import keys  # noqa: E402
from fleet.capacity import CapacityStore, NodeCapacity  # noqa: E402
from fleet.jobs import JobStatus  # noqa: E402
from fleet.leases import Claim  # noqa: E402
from fleet.queue import JobStore  # noqa: E402
from fleet.quotas import QuotaStore, TenantQuota  # noqa: E402
from fleet.resources import Resources  # noqa: E402

NODES, GPUS_PER_NODE = 8, 8
TOTAL_GPUS = NODES * GPUS_PER_NODE
S, MIN, H = 1000, 60_000, 3_600_000  # ms


@dataclass
class SimJob:
    id: str
    tenant: str
    gpus: int
    work_ms: float  # training time still to do
    submitted_ms: int
    first_start_ms: int | None = None


@dataclass
class Running:
    claim: Claim
    job: SimJob
    started_ms: int  # this attempt's admission
    restart_ms: int  # start-up before training resumes (model load, checkpoint restore)
    preempting_at: int | None = None


@dataclass
class Stats:
    """What the simulation measured between `since_ms` and the end."""

    since_ms: int
    gpu_ms: Counter = field(default_factory=Counter)  # tenant -> GPU-ms held
    waits_ms: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    busy_while_waiting: float = 0.0  # GPU-ms allocated while some job waited
    total_while_waiting: float = 0.0  # GPU-ms of capacity while some job waited
    idle_while_fit: float = 0.0  # GPU-ms free while a waiting job was no larger than the free GPUs
    preemptions: int = 0
    preemption_gpu_ms: float = 0.0  # GPU-ms a preemption costs: the victim's checkpoint and its restart later


class Sim:
    """The cluster: the real JobStore on Redis, plus the simulation's clock and event queue."""

    def __init__(self, client: redis.Redis, quotas: dict[str, TenantQuota], *, half_life_s: float = 3600,
                 checkpoint_s: float = 60, restart_s: float = 90, since_ms: int = 0) -> None:
        client.flushall()
        self.r = client
        self.jobs = JobStore(client, fair_share_half_life_s=half_life_s)
        store = QuotaStore(client, default=TenantQuota())
        for tenant, quota in quotas.items():
            store.set(tenant, quota)
        CapacityStore(client).record_nodes(
            [NodeCapacity(node_id=f"node-{i}", gpus=GPUS_PER_NODE) for i in range(NODES)])
        self.checkpoint_ms, self.restart_ms = int(checkpoint_s * S), int(restart_s * S)
        self.now = 0
        self.events: list[tuple[int, int, str, object]] = []
        self._seq = itertools.count()
        self.queued: dict[str, SimJob] = {}
        self.running: dict[str, Running] = {}
        self.held: Counter = Counter()
        self.stats = Stats(since_ms=since_ms)
        self.on_admit = None  # callback(SimJob) for closed-loop tenants

    # --- events ------------------------------------------------------------------------------------------
    def at(self, t_ms: int, kind: str, payload: object) -> None:
        heapq.heappush(self.events, (int(t_ms), next(self._seq), kind, payload))

    def submit(self, tenant: str, gpus: int, work_ms: float, t_ms: int | None = None) -> None:
        self.at(self.now if t_ms is None else t_ms, "arrive", (tenant, gpus, work_ms))

    def run(self, until_ms: int) -> None:
        while self.events and self.events[0][0] <= until_ms:
            t = self.events[0][0]
            self._account(t)
            while self.events and self.events[0][0] == t:
                _, _, kind, payload = heapq.heappop(self.events)
                getattr(self, f"_on_{kind}")(payload)
            self._admit()
            self._notice_preemptions()
        self._account(until_ms)

    def _on_arrive(self, payload: tuple[str, int, float]) -> None:
        tenant, gpus, work_ms = payload
        created = self.jobs.create_job(tenant, model="m", training_file="f", resources=Resources(workers=gpus),
                                       now_ms=self.now)
        self.queued[created.job.id] = SimJob(created.job.id, tenant, gpus, work_ms, self.now)

    def _on_end(self, payload: tuple[str, int]) -> None:
        job_id, attempt = payload
        run = self.running.get(job_id)
        if run is None or run.claim.fence.attempt != attempt:
            return  # preempted meanwhile: this attempt's end is void
        self.jobs.leases.finish_job(run.claim.fence, JobStatus.SUCCEEDED, now_ms=self.now)
        self._release(job_id)

    def _on_checkpointed(self, payload: tuple[str, int]) -> None:
        job_id, attempt = payload
        run = self.running.get(job_id)
        if run is None or run.claim.fence.attempt != attempt:
            return  # it finished before its checkpoint completed
        done = max(0, (run.preempting_at or self.now) - run.started_ms - run.restart_ms)
        run.job.work_ms = max(run.job.work_ms - done, 0)
        self.jobs.leases.finish_job(run.claim.fence, JobStatus.QUEUED, preempted=True, now_ms=self.now)
        self._release(job_id)
        self.queued[job_id] = run.job
        self.stats.preemptions += 1
        self.stats.preemption_gpu_ms += run.job.gpus * (self.checkpoint_ms + self.restart_ms)

    # --- the scheduler's side ------------------------------------------------------------------------------
    def _admit(self) -> None:
        while (claim := self.jobs.leases.claim_next_job("sim", 10 * 24 * H, now_ms=self.now)) is not None:
            job = self.queued.pop(claim.job.id)
            if job.first_start_ms is None:
                job.first_start_ms = self.now
                if job.submitted_ms >= self.stats.since_ms:
                    self.stats.waits_ms[job.tenant].append(self.now - job.submitted_ms)
            run = Running(claim, job, self.now, self.restart_ms)
            self.running[job.id] = run
            self.held[job.tenant] += job.gpus
            self.at(self.now + run.restart_ms + job.work_ms, "end", (job.id, claim.fence.attempt))
            if self.on_admit is not None:
                self.on_admit(job)

    def _notice_preemptions(self) -> None:
        """The dispatcher's side of a preemption: a job asked to stop checkpoints, then hands back."""
        candidates = [run for run in self.running.values() if run.preempting_at is None]
        if not candidates:
            return
        pipe = self.r.pipeline(transaction=False)
        for run in candidates:
            pipe.hget(keys.job(run.job.id), "control")
        for run, control in zip(candidates, pipe.execute(), strict=True):
            if control == "preempt":
                run.preempting_at = self.now
                self.at(self.now + self.checkpoint_ms, "checkpointed", (run.job.id, run.claim.fence.attempt))

    def _release(self, job_id: str) -> None:
        run = self.running.pop(job_id)
        self.held[run.job.tenant] -= run.job.gpus

    def _account(self, t: int) -> None:
        """Integrate what was held over [now, t), from the warm-up on."""
        start = max(self.now, self.stats.since_ms)
        if t > start:
            dt = t - start
            for tenant, gpus in self.held.items():
                self.stats.gpu_ms[tenant] += gpus * dt
            if self.queued:
                allocated = sum(self.held.values())
                self.stats.busy_while_waiting += allocated * dt
                self.stats.total_while_waiting += TOTAL_GPUS * dt
                free = TOTAL_GPUS - allocated
                if min(j.gpus for j in self.queued.values()) <= free:
                    self.stats.idle_while_fit += free * dt
        self.now = max(self.now, t)


# --- scenarios ---------------------------------------------------------------------------------------------
def _work_ms(rng: random.Random, mean_min: float) -> float:
    return min(max(rng.expovariate(1 / (mean_min * MIN)), 5 * MIN), 6 * H)


def closed_loop(client: redis.Redis, weights: dict[str, float], hours: float, rng: random.Random, *,
                 half_life_s: float = 3600, backlog: int = 4) -> Stats:
    """Each tenant keeps `backlog` jobs waiting (1-8 GPUs, ~30 min): the cluster is always saturated."""
    sim = Sim(client, {t: TenantQuota(weight=w) for t, w in weights.items()}, half_life_s=half_life_s,
              since_ms=int(2 * H))

    def refill(job: SimJob) -> None:
        sim.submit(job.tenant, rng.randint(1, 8), _work_ms(rng, 30))

    sim.on_admit = refill
    for tenant in weights:
        for _ in range(backlog):
            sim.submit(tenant, rng.randint(1, 8), _work_ms(rng, 30), 0)
    sim.run(int(hours * H))
    return sim.stats


def jain(values: list[float]) -> float:
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def scenario_fair(client: redis.Redis, quick: bool, rng: random.Random) -> None:
    tenants = {f"team-{i}": 1.0 for i in range(3 if quick else 6)}
    hours = 6 if quick else 72
    stats = closed_loop(client, tenants, hours, rng)
    shares = [stats.gpu_ms[t] / weight for t, weight in tenants.items()]
    total = sum(stats.gpu_ms.values())
    print(f"fair: {len(tenants)} tenants, equal weights, {hours} h simulated (first 2 h warm-up): "
          f"Jain's index {jain(shares):.4f} [>= 0.99]; shares "
          + " ".join(f"{stats.gpu_ms[t] / total:.3f}" for t in tenants)
          + f"; utilization {stats.busy_while_waiting / max(stats.total_while_waiting, 1):.3f}")


def scenario_weights(client: redis.Redis, quick: bool, rng: random.Random) -> None:
    tenants = {"w1": 1.0, "w2": 2.0, "w3": 3.0, "w4": 4.0}
    hours = 6 if quick else 72
    weight_sum = sum(tenants.values())
    for half_life_h in (1, 24):  # the default half-life, and a long memory
        stats = closed_loop(client, tenants, hours, rng, half_life_s=half_life_h * 3600)
        total = sum(stats.gpu_ms.values())
        parts, worst = [], 0.0
        for tenant, weight in tenants.items():
            share, expected = stats.gpu_ms[tenant] / total, weight / weight_sum
            worst = max(worst, abs(share / expected - 1))
            parts.append(f"{tenant} {share:.3f}/{expected:.1f}")
        print(f"weights 1:2:3:4, half-life {half_life_h} h, {hours} h simulated: share/weight share "
              + " ".join(parts) + f"; largest deviation {100 * worst:.1f} % of the weight share [<= 5 %]")


def _percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


def scenario_mixed(client: redis.Redis, quick: bool, rng: random.Random) -> None:
    # tenant: (quota, job sizes, mean minutes, share of the offered load)
    tenants = {
        "research": (TenantQuota(nominal_gpus=16, weight=2), (4, 8), 60, 0.30),
        "product": (TenantQuota(nominal_gpus=16, borrowing_limit_gpus=16, weight=2), (1, 4), 20, 0.25),
        "interns": (TenantQuota(nominal_gpus=0, borrowing_limit_gpus=16, weight=1), (1, 2), 15, 0.10),
        "batch": (TenantQuota(nominal_gpus=8, weight=1), (2, 8), 90, 0.25),
        "eval": (TenantQuota(nominal_gpus=8, borrowing_limit_gpus=8, weight=1), (1, 1), 10, 0.10),
    }
    hours = 4 if quick else 24
    sim = Sim(client, {t: spec[0] for t, spec in tenants.items()}, since_ms=int(1 * H))
    offered = 1.1 * TOTAL_GPUS  # GPUs demanded on average
    for tenant, (_, (lo, hi), mean_min, part) in tenants.items():
        rate_per_ms = part * offered / ((lo + hi) / 2 * mean_min * MIN)  # arrivals per ms
        t = 0.0
        while t < hours * H:
            t += rng.expovariate(rate_per_ms)
            sim.submit(tenant, rng.randint(lo, hi), _work_ms(rng, mean_min), int(t))
    sim.run(int(hours * H))
    st = sim.stats
    print(f"mixed: {len(tenants)} tenants, Poisson arrivals at ~110 % of {TOTAL_GPUS} GPUs, {hours} h simulated: "
          f"utilization while jobs wait {st.busy_while_waiting / max(st.total_while_waiting, 1):.3f} [>= 0.95]; "
          f"GPU-time idle while a waiting job would fit {st.idle_while_fit / max(st.total_while_waiting, 1):.3f}; "
          f"{st.preemptions} preemptions costing {st.preemption_gpu_ms / max(st.total_while_waiting, 1):.3f} of the "
          "GPU-time (checkpoint + restart)")
    for tenant in tenants:
        waits = st.waits_ms[tenant]
        print(f"  {tenant:9s} GPU share {st.gpu_ms[tenant] / max(sum(st.gpu_ms.values()), 1):.3f}, "
              f"wait p50 {_percentile(waits, 0.5) / MIN:6.1f} min, p95 {_percentile(waits, 0.95) / MIN:6.1f} min "
              f"({len(waits)} jobs)")


def scenario_reclaim(client: redis.Redis, quick: bool, rng: random.Random) -> None:
    checkpoint_s, restart_s = 60, 90
    quotas = {"owner": TenantQuota(nominal_gpus=32), "borrower": TenantQuota(nominal_gpus=32)}
    sim = Sim(client, quotas, checkpoint_s=checkpoint_s, restart_s=restart_s)
    for _ in range(TOTAL_GPUS // 8 + 2):  # the borrower fills all 64 GPUs with long 8-GPU jobs
        sim.submit("borrower", 8, 8 * H, 0)
    sim.run(int(1 * H))
    assert sim.held["borrower"] == TOTAL_GPUS, sim.held
    arrival = sim.now = int(1 * H)
    for _ in range(4):
        sim.submit("owner", 8, 2 * H, arrival)
    back_at = None
    while back_at is None and sim.events:
        sim.run(sim.events[0][0])
        if sim.held["owner"] >= 32:
            back_at = sim.now
    training_at = back_at + restart_s * S if back_at is not None else None
    print(f"reclaim: owner (nominal 32) arrives while borrower holds all {TOTAL_GPUS} GPUs: holds its 32 GPUs "
          f"after {(back_at - arrival) / S:.0f} s (preempted borrower jobs checkpoint in {checkpoint_s} s), "
          f"training after {(training_at - arrival) / S:.0f} s [one checkpoint + restart = "
          f"{checkpoint_s + restart_s} s]; {sim.stats.preemptions} jobs preempted")


def scenario_decision(client: redis.Redis, quick: bool, rng: random.Random) -> None:
    sizes = (1_000, 2_000) if quick else (1_000, 10_000, 100_000)
    tenant_counts = (10,) if quick else (10, 100, 1_000)
    samples = 50 if quick else 200
    print(f"decision: one claim_next_job (admits; the job is then handed back to its place), median / p95 of "
          f"{samples}, client wall time incl. the Redis round trip:")
    for n_tenants in tenant_counts:
        sim = Sim(client, {})
        created, row = 0, []
        base = None
        for size in sizes:
            while created < size:
                sim.jobs.create_job(f"t{created % n_tenants}", model="m", training_file="f",
                                    resources=Resources(workers=rng.randint(1, 8)), now_ms=0)
                created += 1
            times = []
            for i in range(samples):
                t = (i + 1) * S
                start = time.perf_counter()
                claim = sim.jobs.leases.claim_next_job("sim", H, now_ms=t)
                times.append((time.perf_counter() - start) * 1000)
                assert claim is not None, "nothing admitted on an idle cluster"
                sim.jobs.leases.finish_job(claim.fence, JobStatus.QUEUED, now_ms=t)
            median = statistics.median(times)
            base = base or median
            row.append(f"{size:,} queued {median:.2f} / {_percentile(times, 0.95):.2f} ms "
                       f"({median / base:.2f}x)")
        print(f"  {n_tenants:5d} tenants: " + "; ".join(row))


SCENARIOS = {"fair": scenario_fair, "weights": scenario_weights, "mixed": scenario_mixed,
             "reclaim": scenario_reclaim, "decision": scenario_decision}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small versions of every scenario (a smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios to run")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(wanted) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    with local_redis() as url:
        client = redis.Redis.from_url(url, decode_responses=True)
        for name in wanted:
            start = time.perf_counter()
            SCENARIOS[name](client, args.quick, random.Random(args.seed))
            print(f"  ({name}: {time.perf_counter() - start:.1f} s wall)")
        client.close()


if __name__ == "__main__":
    main()
