"""Rank sweeps in fleet (no Ray, no torch): the request's checks, choosing the best child, the exactly-once
finish when two dispatchers end the last two children at the same time, failures, cancel, a finisher
that died."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from fleet import keys
from fleet.exceptions import FencedOut
from fleet.fencing import Fence
from fleet.job_spec import JobSpec
from fleet.jobs import JobError, JobStatus
from fleet.objectstore import LocalObjectStore
from fleet.queue import Claim, JobStore
from fleet.registry import AdapterRegistry
from fleet.sweeps import SweepStore, rank_sweep_problems
from tests.service.conftest import write_peft_adapter

LEASE_MS = 60_000


class Sweeps:
    """A JobStore, a registry on a local object store and a SweepStore over one Redis."""

    def __init__(self, r: redis.Redis, tmp_path: Path, *, finish_lease_ms: int = 60_000) -> None:
        self.tmp_path = tmp_path
        self.jobs = JobStore(r)
        self.registry = AdapterRegistry(r, LocalObjectStore(tmp_path / "objects"))
        self.sweeps = SweepStore(self.jobs, self.registry, finish_lease_ms=finish_lease_ms)

    def create(self, ranks: list[int], **extra: Any) -> tuple[str, dict[int, str]]:
        fields = {"model": "tiny-llama", "base_model": "tiny-llama", "init_adapter": None, "training_file": "file-t",
                  "validation_file": "file-v", "suffix": "swept", "seed": 5, "metadata": {},
                  "spec": JobSpec(lora={"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}), **extra}
        parent, created = self.sweeps.create_sweep("t1", ranks, fields=fields)
        assert created and parent.status == JobStatus.RUNNING
        children = {c.rank: c.id for c in parent.rank_sweep.children}
        assert list(children) == ranks
        return parent.id, children

    def claim_all(self) -> dict[str, Claim]:
        claims = {}
        while (claim := self.jobs.leases.claim_next_job("w", LEASE_MS)) is not None:
            claims[claim.job.id] = claim
        return claims

    def succeed(self, claim: Claim, val_loss: float) -> None:
        """What a dispatcher does for a child that trained to the end: its candidate, then succeeded."""
        job, rank = claim.job, claim.job.spec.lora.r
        adapter = write_peft_adapter(self.tmp_path / f"adapter-{job.id}", r=rank, seed=rank)
        fields = {"base_model": "tiny-llama", "lora_config": job.spec.lora_block(), "final_metrics":
                  {"val_loss": val_loss}, "rank_report": {"summary": {"verdict": "adequate", "r": rank}}}
        assert self.sweeps.submit_candidate(job, claim.fence, adapter, {
            "rank": rank, "val_loss": val_loss, "steps": 3, "trained_tokens": 100,
            "hyperparameters_used": {"n_epochs": 1}, "manifest_fields": fields})
        self.jobs.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, trained_tokens=100)

    def fail(self, claim: Claim, message: str = "out of memory") -> None:
        self.jobs.leases.finish_job(claim.fence, JobStatus.FAILED,
                                    error=JobError(code="training_error", message=message))

    def manifest(self, parent_id: str) -> Any:
        parent = self.jobs.load_job(parent_id)
        return self.registry.read_manifest("t1", parent.fine_tuned_model)


@pytest.fixture
def s(r: redis.Redis, tmp_path: Path) -> Sweeps:
    return Sweeps(r, tmp_path)


def test_a_rank_sweep_request_names_every_problem_at_once():
    fine = rank_sweep_problems([8, 16, 32], max_rank=64, has_validation_file=True, lora_r_given=False,
                               continuing=None)
    assert fine == []
    problems = rank_sweep_problems([8, 8, 128], max_rank=64, has_validation_file=False, lora_r_given=True,
                                   continuing="mine:v1")
    text = " | ".join(problems)
    assert len(problems) == 5, problems
    for expected in ("distinct", "from 1 to 64", "validation_file", "omit lora.r", "continuing mine:v1"):
        assert expected in text
    assert "give 2 to 8 ranks" in rank_sweep_problems([8], max_rank=64, has_validation_file=True,
                                                      lora_r_given=False, continuing=None)[0]
    assert rank_sweep_problems(list(range(1, 10)), max_rank=64, has_validation_file=True, lora_r_given=False,
                               continuing=None)


def test_the_best_child_by_validation_loss_is_the_parents_one_version_with_every_result(s: Sweeps):
    parent_id, children = s.create([8, 16, 32])
    claims = s.claim_all()
    assert sorted(claims) == sorted(children.values())  # ordinary queued jobs, each claimed like any other
    assert all(c.job.parent == parent_id for c in claims.values())
    s.succeed(claims[children[8]], val_loss=1.5)
    s.succeed(claims[children[16]], val_loss=1.2)
    assert s.sweeps.finish_if_done(parent_id) is None  # r=32 still runs
    s.succeed(claims[children[32]], val_loss=1.3)
    assert s.sweeps.finish_if_done(parent_id) == JobStatus.SUCCEEDED

    parent = s.jobs.load_job(parent_id)
    assert parent.status == JobStatus.SUCCEEDED and parent.fine_tuned_model == "swept:v1"
    assert parent.rank_sweep.chosen == children[16]
    assert parent.spec.lora.r == 16  # the parent's LoRA shape is its version's
    assert [(c.rank, c.status, c.val_loss) for c in parent.rank_sweep.children] == [
        (8, JobStatus.SUCCEEDED, 1.5), (16, JobStatus.SUCCEEDED, 1.2), (32, JobStatus.SUCCEEDED, 1.3)]
    manifest = s.manifest(parent_id)
    assert manifest.job_id == parent_id and manifest.lora_config["r"] == 16
    assert manifest.rank_report == {"summary": {"verdict": "adequate", "r": 16}}
    assert manifest.rank_sweep["chosen"] == {"job_id": children[16], "rank": 16}
    assert [c["rank"] for c in manifest.rank_sweep["children"]] == [8, 16, 32]
    assert [v.ref for v in s.registry.list_versions("t1", "swept")] == ["swept:v1"]  # children published none
    assert all(s.jobs.load_job(c).fine_tuned_model is None for c in children.values())
    assert not s.sweeps.redis.sismember(keys.active_sweeps(), parent_id)
    assert s.sweeps.finish_if_done(parent_id) is None  # ended once, for good


def test_a_tie_goes_to_the_smaller_rank(s: Sweeps):
    parent_id, children = s.create([16, 4])
    claims = s.claim_all()
    s.succeed(claims[children[16]], val_loss=0.75)
    s.succeed(claims[children[4]], val_loss=0.75)
    assert s.sweeps.finish_if_done(parent_id) == JobStatus.SUCCEEDED
    assert s.jobs.load_job(parent_id).rank_sweep.chosen == children[4]


def test_two_dispatchers_ending_the_last_two_children_at_once_publish_once(s: Sweeps):
    for round_ in range(5):  # the race, several times over
        _race_to_end_the_last_two_children(s, f"race{round_}")


def _race_to_end_the_last_two_children(s: Sweeps, suffix: str) -> None:
    parent_id, children = s.create([4, 8, 16], suffix=suffix)
    claims = s.claim_all()
    s.succeed(claims[children[4]], val_loss=2.0)
    barrier = threading.Barrier(2)
    outcomes: list[JobStatus | None] = []

    def end_child(rank: int, loss: float) -> None:  # one dispatcher's runner thread
        barrier.wait(timeout=10)
        s.succeed(claims[children[rank]], val_loss=loss)
        outcomes.append(s.sweeps.finish_if_done(parent_id))

    threads = [threading.Thread(target=end_child, args=a) for a in ((8, 1.0), (16, 1.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes, key=str) == sorted([JobStatus.SUCCEEDED, None], key=str), outcomes
    assert [v.ref for v in s.registry.list_versions("t1", suffix)] == [f"{suffix}:v1"]
    parent = s.jobs.load_job(parent_id)
    assert parent.attempt == 1, "the finish was claimed more than once"
    assert parent.rank_sweep.chosen == children[8]
    ended = [e for e in s.jobs.read_events(parent_id) if e.message.startswith("Rank sweep done")]
    assert len(ended) == 1, ended


def test_a_failed_child_is_recorded_and_the_sweep_picks_among_the_others(s: Sweeps):
    parent_id, children = s.create([4, 8, 16])
    claims = s.claim_all()
    s.succeed(claims[children[4]], val_loss=1.4)
    s.fail(claims[children[8]], "CUDA out of memory")
    s.succeed(claims[children[16]], val_loss=1.6)
    assert s.sweeps.finish_if_done(parent_id) == JobStatus.SUCCEEDED
    results = {c["rank"]: c for c in s.manifest(parent_id).rank_sweep["children"]}
    assert results[8]["status"] == "failed" and "CUDA out of memory" in results[8]["error"]
    assert s.manifest(parent_id).rank_sweep["chosen"]["rank"] == 4


def test_when_every_child_fails_the_parent_fails_saying_why(s: Sweeps):
    parent_id, children = s.create([4, 8])
    claims = s.claim_all()
    s.fail(claims[children[4]], "bad data on line 3")
    s.fail(claims[children[8]], "bad data on line 3")
    assert s.sweeps.finish_if_done(parent_id) == JobStatus.FAILED
    parent = s.jobs.load_job(parent_id)
    assert parent.error.code == "rank_sweep_failed"
    assert "No child of the rank sweep succeeded" in parent.error.message
    assert "r=4" in parent.error.message and "bad data on line 3" in parent.error.message
    assert parent.fine_tuned_model is None
    with pytest.raises(Exception, match="No adapter"):
        s.registry.list_versions("t1", "swept")


def test_cancelling_the_parent_cancels_its_children_and_publishes_nothing(s: Sweeps):
    parent_id, children = s.create([4, 8, 16])
    claim = s.jobs.leases.claim_next_job("w", LEASE_MS)  # one child runs, two wait
    s.jobs.request_cancel("t1", parent_id)
    s.sweeps.cancel("t1", s.jobs.load_job(parent_id))
    waiting = [c for c in children.values() if c != claim.job.id]
    assert [s.jobs.load_job(c).status for c in waiting] == [JobStatus.CANCELLED] * 2
    assert s.jobs.load_job(parent_id).status == JobStatus.RUNNING  # until its running child stops
    assert s.jobs.load_job(claim.job.id).control == "cancel"
    s.jobs.leases.finish_job(claim.fence, JobStatus.CANCELLED)  # the dispatcher honours the cancel
    assert s.sweeps.finish_if_done(parent_id) == JobStatus.CANCELLED
    parent = s.jobs.load_job(parent_id)
    assert parent.status == JobStatus.CANCELLED and parent.fine_tuned_model is None
    assert [c.status for c in parent.rank_sweep.children] == [JobStatus.CANCELLED] * 3


def _finished_children_and_a_dead_finisher(s: Sweeps) -> tuple[str, dict[int, str], list]:
    """A sweep of ranks 4 and 8 whose children both succeeded, and whose finish a finisher claimed (token
    "deadbeef", 300 ms) before dying without publishing anything: (parent id, children by rank, the claim's reply)."""
    parent_id, children = s.create([4, 8])
    claims = s.claim_all()
    s.succeed(claims[children[4]], val_loss=1.0)
    s.succeed(claims[children[8]], val_loss=2.0)
    reply = s.sweeps._claim(keys=[keys.sweep(parent_id), keys.job(parent_id),
                                  *[keys.job(c) for c in children.values()]], args=["deadbeef", 300])
    assert reply[0] == "finish"
    return parent_id, children, reply


def test_a_finisher_that_died_is_taken_over_once_its_claim_expires(r: redis.Redis, tmp_path: Path):
    s = Sweeps(r, tmp_path, finish_lease_ms=300)
    parent_id, children, reply = _finished_children_and_a_dead_finisher(s)
    dead = Fence(parent_id, int(reply[1]), "deadbeef")
    assert s.sweeps.finish_if_done(parent_id) is None  # its claim still holds
    time.sleep(0.4)
    assert s.sweeps.finish_ended_sweeps() == [parent_id]  # housekeeping takes it over
    assert s.jobs.load_job(parent_id).fine_tuned_model == "swept:v1"
    with pytest.raises(FencedOut):  # the dead finisher, were it to wake, is fenced out
        s.registry.publish_adapter_version("t1", "swept", write_peft_adapter(tmp_path / "late"), {}, fence=dead)


class _ProcessDied(BaseException):
    """The API process dying at a Redis command: nothing after it runs, no `except Exception` catches it."""


class _DyingRedis(redis.Redis):
    """A real Redis client whose process 'dies' just after its `die_after`-th command reached Redis."""

    def __init__(self, *args: Any, die_after: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.die_after, self.sent = die_after, 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = super().execute_command(*args, **options)
        self.sent += 1
        if self.sent >= self.die_after:
            raise _ProcessDied(f"died after command {self.sent}: {args[0]}")
        return reply


def test_an_api_process_dying_at_any_point_of_a_sweep_create_leaves_all_of_it_or_none(r: redis.Redis, tmp_path: Path):
    ranks = [4, 8, 16]
    kwargs = r.connection_pool.connection_kwargs
    # How many commands a whole create sends; then die after each of them in turn.
    counting = _DyingRedis(host=kwargs["host"], port=kwargs["port"], decode_responses=True, die_after=10**9)
    counting_sweeps = Sweeps(counting, tmp_path)
    counting_sweeps.create(ranks, suffix="count")
    total = counting.sent
    for k in range(1, total + 1):
        tenant = f"crash{k}"
        dying = _DyingRedis(host=kwargs["host"], port=kwargs["port"], decode_responses=True, die_after=k)
        s = Sweeps(dying, tmp_path)
        fields = {"model": "tiny-llama", "base_model": "tiny-llama", "init_adapter": None, "training_file": "file-t",
                  "validation_file": "file-v", "suffix": None, "seed": 5, "metadata": {},
                  "spec": JobSpec(lora={"r": 8, "target_modules": ["q_proj"]})}
        try:
            s.sweeps.create_sweep(tenant, ranks, fields=fields, idempotency_key="k", request_body={"k": k})
        except _ProcessDied:
            pass
        jobs = JobStore(r)
        listed = r.zrange(keys.tenant_jobs(tenant), 0, -1)
        if listed:  # the sweep exists: then all of it, its children queued and listed on the parent
            parents = [j for j in map(jobs.load_job, listed) if j.rank_sweep is not None]
            assert len(parents) == 1, f"died after command {k}: {len(parents)} parents"
            children = parents[0].rank_sweep.children
            assert [c.rank for c in children] == ranks, f"died after command {k}: the parent lists {children}"
            assert sorted(listed) == sorted([parents[0].id, *(c.id for c in children)]), f"died after command {k}"
            assert all(jobs.load_job(c.id).status == JobStatus.QUEUED for c in children)
        # The client retries (same Idempotency-Key): one whole sweep, nothing twice.
        retry = SweepStore(jobs, AdapterRegistry(r, LocalObjectStore(tmp_path / "objects")))
        parent, _ = retry.create_sweep(tenant, ranks, fields=fields, idempotency_key="k", request_body={"k": k})
        assert [c.rank for c in parent.rank_sweep.children] == ranks, f"died after command {k}"
        assert r.zcard(keys.tenant_jobs(tenant)) == len(ranks) + 1, f"died after command {k}: jobs made twice"
        assert len(r.zrange(keys.queue(tenant), 0, -1)) == len(ranks), f"died after command {k}"
        dying.close()
    counting.close()


def test_a_sweep_over_the_queued_jobs_quota_creates_nothing_and_keeps_its_idempotency_key(r: redis.Redis,
                                                                                         tmp_path: Path):
    from fleet.exceptions import QuotaExceeded
    from fleet.quotas import QuotaStore, TenantQuota

    s = Sweeps(r, tmp_path)
    QuotaStore(r, default=TenantQuota()).set("t1", TenantQuota(max_queued_jobs=2))
    fields = {"model": "tiny-llama", "base_model": "tiny-llama", "init_adapter": None, "training_file": "file-t",
              "validation_file": "file-v", "suffix": None, "seed": 5, "metadata": {}, "spec": JobSpec()}
    s.jobs.create_job("t1", model="tiny-llama", training_file="file-t")  # one queued already: 1 slot left
    with pytest.raises(QuotaExceeded, match="max_queued_jobs"):
        s.sweeps.create_sweep("t1", [4, 8], fields=fields, idempotency_key="q", request_body={})
    assert r.zcard(keys.tenant_jobs("t1")) == 1, "a refused sweep left jobs behind"
    assert not r.exists(keys.idempotency("t1", "q")), "a refused sweep used up its Idempotency-Key"


def test_retention_keeps_a_finished_childs_candidate_until_its_sweep_ends(r: redis.Redis, tmp_path: Path):
    from fleet.retention import job_objects_prefix, run_retention
    from fleet.settings import Settings

    s = Sweeps(r, tmp_path)
    settings = Settings(data_dir=tmp_path / "var")
    parent_id, children = s.create([4, 8])
    claims = s.claim_all()
    s.succeed(claims[children[4]], val_loss=1.0)
    candidate_prefix = job_objects_prefix("t1", children[4]) + "sweep/"
    assert s.registry.store.list(candidate_prefix)
    months_later = time.time() + 400 * 86_400  # past every retention delay (checkpoints, uploads, the job)
    run_retention(r, s.registry.store, settings, now=months_later)
    assert s.registry.store.list(candidate_prefix), "retention deleted a candidate its running sweep needs"
    assert s.jobs.load_job(children[4]).status == JobStatus.SUCCEEDED, "retention expired a child of a running sweep"

    s.succeed(claims[children[8]], val_loss=2.0)
    assert s.sweeps.finish_if_done(parent_id) == JobStatus.SUCCEEDED
    assert s.jobs.load_job(parent_id).rank_sweep.chosen == children[4]  # r=4's adapter was there to publish
    # Once the sweep has ended, the child goes as any job does (deferred from the run above).
    run_retention(r, s.registry.store, settings, now=months_later + 400 * 86_400)
    assert not s.registry.store.list(candidate_prefix)
    assert not r.exists(keys.job(children[4]))
    assert s.registry.list_versions("t1", "swept")[0].ref == "swept:v1"  # the published copy stays


def test_the_api_cancelling_the_last_waiting_child_hands_the_publish_to_the_dispatchers(r: redis.Redis,
                                                                                        tmp_path: Path):
    from service.rank_sweeps import after_cancel

    s = Sweeps(r, tmp_path)
    parent_id, children = s.create([4, 8])
    claim = s.jobs.leases.claim_next_job("w", LEASE_MS)
    assert claim.job.id == children[4]  # r=8 waits in the queue
    s.succeed(claim, val_loss=1.0)
    # The API process cannot reach the object store: cancelling r=8 must not need it.
    broken = tmp_path / "gone"
    api_registry = AdapterRegistry(r, LocalObjectStore(broken))
    broken.rmdir()
    broken.write_text("")  # its root is now a file: every read and write fails
    cancelled = after_cancel(s.jobs, api_registry, "t1", s.jobs.request_cancel("t1", children[8]))
    assert cancelled.status == JobStatus.CANCELLED
    assert s.jobs.load_job(parent_id).status == JobStatus.RUNNING  # the finish is the dispatchers'
    assert s.sweeps.finish_handed_over() == [parent_id]  # a dispatcher's next maintenance tick
    parent = s.jobs.load_job(parent_id)
    assert parent.status == JobStatus.SUCCEEDED and parent.rank_sweep.chosen == children[4]
    assert s.sweeps.finish_handed_over() == []


class _SlowStore(LocalObjectStore):
    """A real local store whose downloads take `delay_s` (a large adapter over a slow link)."""

    delay_s = 0.0

    def download_file(self, key: str, path: Path) -> None:
        time.sleep(self.delay_s)
        super().download_file(key, path)


def test_a_finisher_publishing_for_longer_than_its_lease_keeps_it_and_publishes_once(r: redis.Redis, tmp_path: Path):
    s = Sweeps(r, tmp_path, finish_lease_ms=600)
    slow = _SlowStore(tmp_path / "objects")
    s.registry = AdapterRegistry(r, slow)
    s.sweeps = SweepStore(s.jobs, s.registry, finish_lease_ms=600)
    parent_id, children = s.create([4, 8])
    claims = s.claim_all()
    s.succeed(claims[children[4]], val_loss=1.0)
    s.succeed(claims[children[8]], val_loss=2.0)
    slow.delay_s = 0.8  # each of the adapter's two files: 1.6 s in all, more than twice the lease
    outcome: list[JobStatus | None] = []
    finisher = threading.Thread(target=lambda: outcome.append(s.sweeps.finish_if_done(parent_id)))
    finisher.start()
    others = SweepStore(JobStore(r), AdapterRegistry(r, LocalObjectStore(tmp_path / "objects")), finish_lease_ms=600)
    while finisher.is_alive():  # every other dispatcher's maintenance tick, meanwhile
        assert others.finish_handed_over() == [], "a live finisher's sweep was taken over"
        time.sleep(0.1)
    finisher.join()
    assert outcome == [JobStatus.SUCCEEDED]
    assert s.jobs.load_job(parent_id).attempt == 1, "the finish was claimed more than once"
    assert [v.ref for v in s.registry.list_versions("t1", "swept")] == ["swept:v1"]


def test_a_dead_finisher_is_taken_over_by_the_next_maintenance_tick_after_its_lease(r: redis.Redis, tmp_path: Path):
    s = Sweeps(r, tmp_path, finish_lease_ms=300)
    parent_id, children, reply = _finished_children_and_a_dead_finisher(s)
    assert s.sweeps.finish_handed_over() == []  # its claim still holds
    time.sleep(0.4)
    assert s.sweeps.finish_handed_over() == [parent_id]  # no housekeeping round needed
    assert s.jobs.load_job(parent_id).fine_tuned_model == "swept:v1"
