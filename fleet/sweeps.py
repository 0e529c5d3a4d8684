"""Rank sweeps: one child job per rank, then the best child by validation loss becomes the parent's version.

The seeds' advice ("start at r=16; bracket 8/16/32") run for the user. A sweep is a parent job and one
ordinary child job per rank (queued, fair-shared, cancellable; `Job.parent` names the parent). The
parent is `running` from its creation, but no worker ever claims it: it is never queued and holds no
lease. Its life:
1. create (the API, `create_sweep`): one atomic step (CREATE_SWEEP) writes the Idempotency-Key, the
   parent's record listing every child, the sweep hash and each child, queued; or, refused by a quota,
   nothing. An API process dying around it leaves the whole sweep or none of it.
2. a child that trains to the end uploads its adapter under its own job prefix and records it as its
   candidate (`submit_candidate`, fenced by its claim: a stale attempt records nothing), with its
   validation loss, steps and rank report; then it finishes succeeded and publishes no version.
3. whoever sees a child end calls `finish_if_done`: its dispatcher, or housekeeping (every minute: children
   failed by lost leases). The API's cancel of a child only hands the sweep over (`hand_over`): each
   dispatcher's maintenance tick (every ~lease_ms/3, a few seconds) finishes it, so the API never
   downloads or uploads an adapter, and a failure there loses nothing.
   CLAIM_FINISH is the one atomic step that decides: when every child is terminal it hands the finish
   to exactly one caller, as a new attempt and claim token of the parent (a `Fence`). Two dispatchers
   ending the last two children at once get one 'finish' between them.
4. the finisher picks the best succeeded child by validation loss (ties → the smaller rank), publishes
   its adapter as the parent's version through the registry (fenced by the parent's claim, idempotent
   per job) with every child's result in the manifest's `rank_sweep`, and ends the parent (END_PARENT,
   fenced): succeeded; failed when no child succeeded; cancelled when the parent was cancelled.
A live finisher renews its claim every finish_lease_ms/3 (30 s by default) however long the publish takes;
one that dies leaves its claim to expire within finish_lease_ms, and the next maintenance tick of any
dispatcher (a claimed sweep stays handed over until it ends) claims the finish again under a new attempt,
which fences the old finisher out; the registry's per-job publication makes the retry reuse whatever
the first one had committed.
No torch, no Ray: the API and the dispatchers both import this.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, Field

from fleet import keys
from fleet.exceptions import CancelRequested, FencedOut, IdempotencyConflict, InvalidRequest, NotFound, QuotaExceeded
from fleet.fencing import Fence, new_claim_token, raise_for_refusal
from fleet.job_spec import JobSpec
from fleet.jobs import TERMINAL_STATUSES, Job, JobError, JobStatus, RankSweep, SweepChild, new_job_id
from fleet.queue import QUEUED_QUOTA_RETRY_AFTER_S, JobStore, request_sha256
from fleet.registry import AdapterRegistry, adapter_name_for_job, sha256_file
from fleet.retention import job_objects_prefix
from fleet.sweep_scripts import CLAIM_FINISH, CREATE_SWEEP, END_PARENT, RENEW_FINISH, SUBMIT_CANDIDATE

__all__ = ["MIN_RANKS", "MAX_RANKS", "SweepCandidate", "SweepStore", "rank_sweep_problems", "with_live_children"]

logger = logging.getLogger(__name__)

MIN_RANKS, MAX_RANKS = 2, 8
# A finisher renews its claim every third of this while it publishes (a download and an upload of the
# chosen adapter, however long they take); a dead one's claim expires this long after its last renewal.
DEFAULT_FINISH_LEASE_MS = 30_000


class CandidateFile(BaseModel):
    """One file of a child's adapter: its name in the adapter dir, where it is stored, its checksum."""

    path: str
    key: str
    sha256: str
    size: int


class SweepCandidate(BaseModel):
    """What a child that trained to the end hands its sweep: its adapter, the manifest fields a version
    of it would carry (rank report included), and what the comparison needs."""

    rank: int
    val_loss: float | None
    steps: int
    trained_tokens: int | None = None
    hyperparameters_used: dict[str, Any] = Field(default_factory=dict)
    manifest_fields: dict[str, Any]
    files: list[CandidateFile]


def rank_sweep_problems(ranks: list[int], *, max_rank: int, has_validation_file: bool, lora_r_given: bool,
                        continuing: str | None) -> list[str]:
    """Everything wrong with a `rank_sweep` request, each naming what to do (empty: it is fine)."""
    problems = []
    if not MIN_RANKS <= len(ranks) <= MAX_RANKS:
        problems.append(f"give {MIN_RANKS} to {MAX_RANKS} ranks, got {len(ranks)}")
    if len(set(ranks)) != len(ranks):
        problems.append(f"the ranks must be distinct, got {ranks}")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= max_rank]
    if bad:
        problems.append(f"each rank must be a whole number from 1 to {max_rank} (the base model's max_rank), "
                        f"got {bad}")
    if not has_validation_file:
        problems.append("a rank sweep picks the best rank by validation loss: give a validation_file")
    if lora_r_given:
        problems.append("lora.r conflicts with rank_sweep (each child trains one of the swept ranks): omit lora.r")
    if continuing:
        problems.append(f"continuing {continuing} keeps its rank; a rank sweep must start from a base model")
    return problems


class SweepStore:
    """Rank sweeps in Redis and the object store: create, a child's candidate, the exactly-once finish."""

    def __init__(self, jobs: JobStore, registry: AdapterRegistry, *,
                 finish_lease_ms: int = DEFAULT_FINISH_LEASE_MS) -> None:
        self.jobs = jobs
        self.registry = registry
        self.redis = jobs.redis
        self.store = registry.store
        self.finish_lease_ms = finish_lease_ms
        self._create = self.redis.register_script(CREATE_SWEEP)
        self._submit = self.redis.register_script(SUBMIT_CANDIDATE)
        self._claim = self.redis.register_script(CLAIM_FINISH)
        self._end = self.redis.register_script(END_PARENT)
        self._renew = self.redis.register_script(RENEW_FINISH)

    # -- creating (the API) -------------------------------------------------------------------------
    def create_sweep(self, tenant_id: str, ranks: list[int], *, fields: dict[str, Any],
                     idempotency_key: str | None = None, request_body: Any = None) -> tuple[Job, bool]:
        """Create the parent and one queued child per rank in one atomic step (CREATE_SWEEP); (the
        parent, whether it was created now).

        `fields` are JobStore.create_job's keyword arguments as the API validated them (its `spec` holds
        the LoRA shape every child shares but r). With an Idempotency-Key, a replay returns the first
        parent and creates nothing. A sweep the tenant's quotas refuse creates nothing: QuotaExceeded
        (max_queued_jobs cannot take every child now) or InvalidRequest (it never could).
        """
        now = int(time.time())
        spec: JobSpec = fields["spec"]
        common = {k: fields.get(k) for k in ("model", "base_model", "init_adapter", "training_file",
                                              "validation_file", "suffix", "seed")}
        common["base_model"] = common["base_model"] or common["model"]
        if common["seed"] is None:  # drawn once: every child trains from the same seed, so only r differs
            common["seed"] = secrets.randbelow(2**31)
        parent_id = new_job_id()
        children = [Job(id=new_job_id(), tenant_id=tenant_id, created_at=now, updated_at=now,
                        status=JobStatus.QUEUED, metadata=fields.get("metadata") or {}, parent=parent_id,
                        spec=_with_rank(spec, rank), **common) for rank in ranks]
        # Until it ends, the parent's `lora` shows the first rank; then the chosen one.
        parent = Job(id=parent_id, tenant_id=tenant_id, created_at=now, updated_at=now, started_at=now,
                     status=JobStatus.RUNNING, spec=_with_rank(spec, ranks[0]), idempotency_key=idempotency_key,
                     metadata=fields.get("metadata") or {},
                     rank_sweep=RankSweep(ranks=list(ranks), children=[SweepChild(id=c.id, rank=c.spec.lora.r)
                                                                       for c in children]), **common)
        if idempotency_key is not None:
            parent.request_sha256 = request_sha256(request_body)
        message = (f"Created rank sweep {parent.id}: one child job per rank r={', '.join(map(str, ranks))}; "
                   "the best by validation loss is published.")
        self.jobs._prepare()  # the scheduler's state, which CREATE_SWEEP's enqueue updates
        reply = self._create(
            keys=[keys.job(parent.id), keys.tenant_jobs(tenant_id), keys.idempotency(tenant_id, idempotency_key or ""),
                  keys.job_seq(), keys.sweep(parent.id), keys.active_sweeps(), keys.job_events(parent.id),
                  *[keys.job(c.id) for c in children], *[keys.job_events(c.id) for c in children]],
            args=[parent.id, tenant_id, "1" if idempotency_key is not None else "0", parent.request_sha256 or "",
                  self.jobs.idempotency_ttl_s, self.jobs.events.max_len, now, len(children), message,
                  *_flat_fields(parent), *[x for c in children for x in (c.id, *_flat_fields(c))]],
        )
        outcome = reply[0]
        if outcome == "conflict":
            raise IdempotencyConflict(
                f"Idempotency-Key {idempotency_key!r} was already used with a different request body (it created "
                f"job {reply[1]}). Use a new key for a different request.", param="Idempotency-Key")
        if outcome == "never":
            raise InvalidRequest(
                f"A rank sweep of {len(ranks)} ranks queues {len(ranks)} jobs, more than tenant {tenant_id}'s "
                f"max_queued_jobs quota ({reply[1]}) allows: sweep fewer ranks, or ask an admin to raise the quota.",
                param="rank_sweep")
        if outcome == "quota":
            raise QuotaExceeded(
                f"Tenant {tenant_id} has {reply[2]} queued jobs; the rank sweep's {len(ranks)} child jobs would pass "
                f"its max_queued_jobs quota ({reply[1]}). Wait for some to start, or cancel some, then submit again.",
                limit="max_queued_jobs", retry_after_s=QUEUED_QUOTA_RETRY_AFTER_S)
        if outcome == "too_large":
            gpus, nominal, borrow = reply[1:4]
            raise InvalidRequest(
                f"Each child of the sweep asks for {gpus} GPUs, more than tenant {tenant_id}'s nominal quota "
                f"({nominal}) plus its borrowing_limit_gpus ({borrow}) allow: it could never start. Ask for fewer "
                "GPUs, or ask an admin to raise the quota.", param="resources")
        if outcome == "existing" and reply[1] != parent.id:  # an earlier request with this Idempotency-Key
            return self.jobs.load_job(reply[1]), False
        return self.jobs.load_job(parent.id), True

    # -- a child (the dispatcher) -------------------------------------------------------------------
    def submit_candidate(self, job: Job, fence: Fence, adapter_dir: Path, candidate: dict[str, Any]) -> bool:
        """Upload a child's adapter under its own job prefix and record it as its sweep's candidate.

        `candidate` holds SweepCandidate's fields but `files`. Returns False when the sweep is gone (its
        parent ended): the child just finishes. FencedOut / CancelRequested as for a publish.
        """
        assert job.parent is not None, "only a sweep child has a candidate"
        prefix = f"{job_objects_prefix(job.tenant_id, job.id)}sweep/{fence.writer}/"
        files = []
        for path in sorted(p for p in Path(adapter_dir).rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(adapter_dir).as_posix()
            self.store.put_file(prefix + rel, path)
            files.append(CandidateFile(path=rel, key=prefix + rel, sha256=sha256_file(path), size=path.stat().st_size))
        record = SweepCandidate(**candidate, files=files)
        reply = self._submit(keys=[keys.job(job.id), keys.sweep(job.parent)],
                             args=[fence.attempt, fence.token, job.id, record.model_dump_json()])
        raise_for_refusal(reply, fence, "submit its rank-sweep candidate")
        return reply[0] == "ok"

    # -- finishing (whoever saw a child end) --------------------------------------------------------
    def finish_if_done(self, parent_id: str) -> JobStatus | None:
        """End the sweep `parent_id` if every child has ended and no one else is ending it; the parent's
        final status, or None when it is not this caller's to end (yet). Dispatchers call it (it may
        publish); the API only hands over (`hand_over`)."""
        return self._try_finish(parent_id)[1]

    def _try_finish(self, parent_id: str) -> tuple[str, JobStatus | None]:
        """CLAIM_FINISH's outcome ('finish', 'waiting', 'busy', 'none') and, when this caller finished it,
        the parent's final status."""
        parent = self.jobs.load_job(parent_id)
        if parent.rank_sweep is None or parent.status != JobStatus.RUNNING:
            return "none", None
        token = new_claim_token()
        reply = self._claim(
            keys=[keys.sweep(parent_id), keys.job(parent_id), *[keys.job(c.id) for c in parent.rank_sweep.children]],
            args=[token, self.finish_lease_ms],
        )
        if reply[0] != "finish":
            return str(reply[0]), None
        fence = Fence(parent_id, int(reply[1]), token)
        try:
            with self._renewing(fence):
                return "finish", self._finish(self.jobs.load_job(parent_id), fence)
        except FencedOut as e:  # a later finisher took over (this one could not renew its claim in time)
            logger.warning("%s", e)
            return "finish", None

    @contextlib.contextmanager
    def _renewing(self, fence: Fence) -> Iterator[None]:
        """Renew the finish claim every third of finish_lease_ms while the block runs."""
        done = threading.Event()

        def renew() -> None:
            while not done.wait(self.finish_lease_ms / 3000):
                try:
                    if self._renew(keys=[keys.sweep(fence.job_id), keys.job(fence.job_id)],
                                   args=[fence.attempt, fence.token, self.finish_lease_ms])[0] != "ok":
                        return  # fenced out or ended: the publish's own fence check says so
                except redis.RedisError as e:  # retried next beat; the claim outlives a short outage
                    logger.warning("rank sweep %s: renewing the finish claim failed: %s", fence.job_id, e)

        beat = threading.Thread(target=renew, name=f"finish-{fence.job_id}", daemon=True)
        beat.start()
        try:
            yield
        finally:
            done.set()
            beat.join(timeout=10)

    def hand_over(self, parent_id: str) -> None:
        """The API ended a child (a cancel): leave the finish, which may publish, to a dispatcher's next
        maintenance tick (`finish_handed_over`), so the API never downloads or uploads an adapter."""
        self.redis.sadd(keys.sweeps_handed_over(), parent_id)

    def finish_handed_over(self) -> list[str]:
        """A dispatcher's maintenance tick (every few seconds): finish the sweeps handed over, and take over
        those whose finisher died once its claim expires. Returns the parents ended now."""
        ended = []
        for parent_id in sorted(self.redis.smembers(keys.sweeps_handed_over())):
            if not self.redis.srem(keys.sweeps_handed_over(), parent_id):
                continue  # another dispatcher's tick took it
            try:
                outcome, status = self._try_finish(parent_id)
            except NotFound:  # the parent's record is gone: nothing left to end
                continue
            except Exception:  # one sweep's trouble (its store unreachable) must not hold up the others
                logger.exception("rank sweep %s: finishing failed; a later tick retries it", parent_id)
                self.hand_over(parent_id)
                continue
            if outcome == "busy":  # a live finisher holds it; should it die, a later tick takes over
                self.hand_over(parent_id)
            if status is not None:
                ended.append(parent_id)
        return ended

    def finish_ended_sweeps(self) -> list[str]:
        """Housekeeping: try to end every unfinished sweep (children cancelled while queued, failed by
        lost leases, a finisher that died). Returns the parents ended now."""
        ended = []
        for parent_id in sorted(self.redis.smembers(keys.active_sweeps())):
            if not self.redis.exists(keys.job(parent_id)):
                self.redis.srem(keys.active_sweeps(), parent_id)
                continue
            if self.finish_if_done(parent_id) is not None:
                ended.append(parent_id)
        return ended

    def after_job_ended(self, job: Job) -> JobStatus | None:
        """Call when `job` may have ended: if it is a sweep's child, end the sweep should it be done."""
        return self.finish_if_done(job.parent) if job.parent else None

    def cancel(self, tenant_id: str, parent: Job) -> None:
        """Cancelling a sweep's parent cancels its children (the parent has its cancel request already);
        the parent ends cancelled once they have, here when none was running."""
        for child in parent.rank_sweep.children if parent.rank_sweep else []:
            if self.jobs.load_job(child.id).status not in TERMINAL_STATUSES:
                self.jobs.request_cancel(tenant_id, child.id)
        self.finish_if_done(parent.id)

    def _finish(self, parent: Job, fence: Fence) -> JobStatus:
        assert parent.rank_sweep is not None
        raw = self.redis.hgetall(keys.sweep(parent.id))
        candidates = {k.removeprefix("candidate:"): SweepCandidate.model_validate_json(v)
                      for k, v in raw.items() if k.startswith("candidate:")}
        children = [self._child_result(child, candidates.get(child.id)) for child in parent.rank_sweep.children]
        sweep = RankSweep(ranks=parent.rank_sweep.ranks, children=children)
        if self.redis.hget(keys.job(parent.id), "control") == "cancel":
            return self._end_parent(fence, JobStatus.CANCELLED, sweep)
        succeeded = [c for c in children if c.status == JobStatus.SUCCEEDED and c.id in candidates]
        if not succeeded:
            failures = "; ".join(f"r={c.rank} ({c.id}) {c.status.value if c.status else 'gone'}"
                                 + (f": {c.error}" if c.error else "") for c in children)
            error = JobError(code="rank_sweep_failed",
                             message=f"No child of the rank sweep succeeded: {failures}. Fix what they report "
                                     "and create the sweep again."[:2000])
            return self._end_parent(fence, JobStatus.FAILED, sweep, error=error)
        best = min(succeeded, key=lambda c: (c.val_loss if c.val_loss is not None else math.inf, c.rank))
        sweep.chosen = best.id
        chosen = candidates[best.id]
        fields = {**chosen.manifest_fields,
                  "rank_sweep": {"ranks": sweep.ranks, "chosen": {"job_id": best.id, "rank": best.rank},
                                 "selection": "lowest validation loss; ties go to the smaller rank",
                                 "children": [c.model_dump(mode="json") for c in children]}}
        name = adapter_name_for_job(parent.base_model or parent.model, parent.suffix, parent.id)
        try:
            with tempfile.TemporaryDirectory(prefix="lf-sweep-") as tmp:
                for f in chosen.files:
                    target = Path(tmp) / f.path
                    self.store.download_file(f.key, target)
                    if sha256_file(target) != f.sha256:
                        raise RuntimeError(f"{f.key} does not match the sha256 its child recorded; the stored "
                                           "candidate is corrupt.")
                ref = self.registry.publish_adapter_version(parent.tenant_id, name, Path(tmp), fields, fence=fence)
        except CancelRequested:
            return self._end_parent(fence, JobStatus.CANCELLED, sweep)
        trained = [c.trained_tokens for c in candidates.values() if c.trained_tokens is not None]
        logger.info("rank sweep %s: published %s from r=%d (%s)", parent.id, ref, best.rank, best.id)
        # The parent's `lora` now says what its version is: the chosen child's shape.
        spec = parent.spec.model_copy(update={"lora": parent.spec.lora.model_copy(update={"r": best.rank})})
        return self._end_parent(fence, JobStatus.SUCCEEDED, sweep, fine_tuned_model=ref,
                                trained_tokens=sum(trained) if trained else None,
                                hyperparameters=chosen.hyperparameters_used or None, spec=spec)

    def _child_result(self, child: SweepChild, candidate: SweepCandidate | None) -> SweepChild:
        try:
            job = self.jobs.load_job(child.id)
        except NotFound:  # the child's record expired: reported as gone
            return child
        summary = ((candidate.manifest_fields.get("rank_report") or {}).get("summary") if candidate else None)
        return SweepChild(id=child.id, rank=child.rank, status=job.status,
                          val_loss=candidate.val_loss if candidate else None,
                          steps=candidate.steps if candidate else (job.progress.step if job.progress else None),
                          rank_report=summary, error=job.error.message if job.error else None)

    def _end_parent(self, fence: Fence, status: JobStatus, sweep: RankSweep, *, error: JobError | None = None,
                    fine_tuned_model: str | None = None, trained_tokens: int | None = None,
                    hyperparameters: dict[str, Any] | None = None, spec: JobSpec | None = None) -> JobStatus:
        fields: dict[str, str] = {"rank_sweep": sweep.model_dump_json()}
        if spec is not None:
            fields["spec"] = json.dumps(spec.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)
        if error is not None:
            fields["error"] = error.model_dump_json()
        if fine_tuned_model is not None:
            fields["fine_tuned_model"] = fine_tuned_model
        if trained_tokens is not None:
            fields["trained_tokens"] = str(trained_tokens)
        if hyperparameters is not None:
            fields["hyperparameters"] = json.dumps(hyperparameters, separators=(",", ":"), sort_keys=True)
        reply = self._end(
            keys=[keys.job(fence.job_id), keys.sweep(fence.job_id), keys.active_sweeps(), *keys.retention_indexes()],
            args=[fence.job_id, fence.attempt, fence.token, status.value, *[x for p in fields.items() for x in p]],
        )
        raise_for_refusal(reply, fence, "end the rank sweep")
        self.jobs.append_event(fence.job_id, "error" if status == JobStatus.FAILED else "info",
                               _end_message(status, sweep, fine_tuned_model, error))
        return status


def _with_rank(spec: JobSpec, rank: int) -> JobSpec:
    return spec.model_copy(update={"lora": spec.lora.model_copy(update={"r": rank})})


def _flat_fields(job: Job) -> list[str]:
    """A job's hash fields as CREATE_SWEEP takes them: their count, then field, value, ..."""
    fields = job.to_redis_hash()
    fields.pop("seq", None)
    flat = [x for pair in fields.items() for x in pair]
    return [str(len(flat)), *flat]


def with_live_children(client: redis.Redis, parent: Job) -> Job:
    """A running sweep's parent with each child's current status and step filled in (they are recorded
    on the parent only when the sweep ends). Any other job is returned as it is."""
    if parent.rank_sweep is None or parent.status.is_terminal:
        return parent
    children = []
    for child in parent.rank_sweep.children:
        status, progress = client.hmget(keys.job(child.id), "status", "progress")
        children.append(child.model_copy(update={"status": JobStatus(status) if status else None,
                                                 "steps": json.loads(progress).get("step") if progress else None}))
    return parent.model_copy(update={"rank_sweep": parent.rank_sweep.model_copy(update={"children": children})})


def _end_message(status: JobStatus, sweep: RankSweep, ref: str | None, error: JobError | None) -> str:
    results = ", ".join(f"r={c.rank}: {c.status.value if c.status else 'gone'}"
                        + (f" val_loss={c.val_loss:.4g}" if c.val_loss is not None else "") for c in sweep.children)
    if status == JobStatus.SUCCEEDED:
        chosen = next(c for c in sweep.children if c.id == sweep.chosen)
        return f"Rank sweep done ({results}); published {ref} from r={chosen.rank}."
    if status == JobStatus.CANCELLED:
        return f"Rank sweep cancelled ({results}); nothing published."
    return f"Rank sweep failed: {error.message if error else results}"
