"""Retention: what a finished job leaves in Redis and the object store, and when it goes.

The Lua scripts index every job as it becomes terminal (succeeded/failed/cancelled) in three sorted
sets scored by finished_at (fleet.keys.retention_indexes). `run_retention`, called periodically by a
dispatcher, takes from each index only the jobs whose delay has passed (removing each from the index
first: the caller whose ZREM removed it handles it, and puts it back should handling fail), so a run
costs O(jobs due), never a scan of every job:

- after `retention_upload_grace_s` (default 1 h): adapter uploads of the job that no committed
  manifest names (`v<N>/a<k>-<token>/` of attempts that lost, or a whole version that never committed) are
  deleted; a published version's files and manifest are never touched;
- after `retention_checkpoint_days` (default 7): every checkpoint but the last (highest step) is
  deleted, records and objects, and the event stream is trimmed to `retention_events_max_len`;
- after `retention_job_days` (default 30): the job is gone: its record, events, checkpoint records,
  publication record, idempotency key and every object under its job prefix. Adapter versions it
  published stay (they belong to the adapter, not the job).

A rank sweep's child (fleet.sweeps) is left alone while its sweep runs, whatever its age: its candidate
adapter lies under its job prefix until the sweep publishes the best one. It is due again a full delay
later (each stage re-indexes it at the time of the run).

Several dispatchers may run this at once: each job is handled by one of them, and every step is
idempotent. A dispatcher killed while handling a job leaves that stage of it undone (a leak, never a loss).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis

from fleet import keys
from fleet.jobs import Checkpoint
from fleet.objectstore import ObjectStore
from fleet.registry import MANIFEST_FILE, AdapterRegistry, Manifest

if TYPE_CHECKING:
    from fleet.settings import Settings

__all__ = ["RetentionReport", "run_retention", "job_objects_prefix"]

log = logging.getLogger(__name__)
_DAY_S = 86_400


@dataclass
class RetentionReport:
    """What one `run_retention` call removed."""

    jobs_expired: int = 0
    checkpoints_deleted: int = 0
    uploads_swept: int = 0  # objects
    objects_deleted: int = 0  # every object deleted, uploads and checkpoints included
    events_trimmed: int = 0


def job_objects_prefix(tenant_id: str, job_id: str) -> str:
    """The object-store prefix holding everything of one job (its checkpoints, whatever their layout)."""
    return f"tenants/{tenant_id}/jobs/{job_id}/"


def run_retention(
    client: redis.Redis, store: ObjectStore, settings: Settings, *, now: float | None = None
) -> RetentionReport:
    """Apply the retention policy of `settings` to jobs that finished long enough ago; see the module doc.

    `now` (Unix seconds) defaults to the Redis server clock, the clock finished_at was taken from.
    Each stage handles at most `retention_batch_size` jobs per call; call again (e.g. every minute).
    """
    if now is None:
        seconds, _ = client.time()
        now = float(seconds)
    report = RetentionReport()
    batch = settings.retention_batch_size
    stages: list[tuple[str, float, Callable[[str], None]]] = [
        (keys.uploads_to_sweep(), now - settings.retention_upload_grace_s,
         lambda job_id: _sweep_uncommitted_uploads(client, store, job_id, report)),
        (keys.checkpoints_to_prune(), now - settings.retention_checkpoint_days * _DAY_S,
         lambda job_id: _prune_checkpoints(client, store, job_id, settings.retention_events_max_len, report)),
        (keys.finished_jobs(), now - settings.retention_job_days * _DAY_S,
         lambda job_id: _expire_job(client, store, job_id, report)),
    ]
    for index, cutoff_s, handle in stages:
        for job_id, score in _due(client, index, cutoff_s, batch):
            if not client.zrem(index, job_id):
                continue  # another dispatcher took it first
            if _child_of_running_sweep(client, job_id):
                client.zadd(index, {job_id: now}, nx=True)  # due again a full delay from now
                continue
            try:
                handle(job_id)
            except BaseException:
                client.zadd(index, {job_id: score}, nx=True)  # put it back: the next call retries it
                raise
    if report != RetentionReport():
        log.info("retention: %s", report)
    return report


def _due(client: redis.Redis, index: str, cutoff_s: float, batch: int) -> list[tuple[str, float]]:
    """(job id, score) in `index` of jobs that finished at or before `cutoff_s`, oldest first, at most `batch`.

    Every dispatcher runs retention: each job is taken (ZREM) before it is handled, and only by the
    caller whose ZREM removed it, so no two dispatchers handle the same job."""
    return client.zrangebyscore(index, "-inf", cutoff_s, start=0, num=batch, withscores=True)


def _child_of_running_sweep(client: redis.Redis, job_id: str) -> bool:
    """Whether the job is a rank sweep's child whose sweep has not ended (fleet.sweeps): its candidate
    adapter, under its job prefix, may still be published, and its record tells the sweep how it ended."""
    parent = client.hget(keys.job(job_id), "parent")
    return parent is not None and bool(client.sismember(keys.active_sweeps(), parent))


def _delete_objects(store: ObjectStore, object_keys: list[str], report: RetentionReport) -> int:
    for key in object_keys:
        store.delete(key)
    report.objects_deleted += len(object_keys)
    return len(object_keys)


def _sweep_uncommitted_uploads(client: redis.Redis, store: ObjectStore, job_id: str, report: RetentionReport) -> None:
    """Delete the job's adapter uploads that no committed manifest names (a version that never committed:
    all of it; a committed one: the other claims' `a<k>-<token>/` folders)."""
    name, version, state, manifest_json = client.hmget(
        keys.job_publication(job_id), "name", "version", "state", "manifest"
    )
    tenant_id = client.hget(keys.job(job_id), "tenant_id")
    if name is None or version is None or tenant_id is None:
        return  # the job never reserved a version
    prefix = AdapterRegistry.version_prefix(tenant_id, name, int(version))
    keep = {prefix + MANIFEST_FILE}
    if state in ("committed", "ready") and manifest_json is not None:
        keep |= {prefix + entry.stored_at for entry in Manifest.model_validate_json(manifest_json).files}
    orphans = [key for key in store.list(prefix) if key not in keep]
    report.uploads_swept += _delete_objects(store, orphans, report)


def _prune_checkpoints(
    client: redis.Redis, store: ObjectStore, job_id: str, events_max_len: int, report: RetentionReport
) -> None:
    """Keep only the job's last checkpoint (record and objects) and trim its event stream."""
    tenant_id = client.hget(keys.job(job_id), "tenant_id")
    if tenant_id is None:
        return
    raw = client.hvals(keys.job_checkpoints(job_id))
    checkpoints = sorted((Checkpoint.model_validate_json(r) for r in raw), key=lambda c: c.step)
    last = checkpoints[-1] if checkpoints else None
    # Objects of earlier checkpoints, and any a stale attempt uploaded but never recorded, all lie under
    # the job's prefix; only the last recorded checkpoint's stay.
    stale = [
        key
        for key in store.list(job_objects_prefix(tenant_id, job_id))
        if last is None or not key.startswith(last.location)
    ]
    _delete_objects(store, stale, report)
    if len(checkpoints) > 1:
        client.hdel(keys.job_checkpoints(job_id), *(str(c.step) for c in checkpoints[:-1]))
        report.checkpoints_deleted += len(checkpoints) - 1
    report.events_trimmed += client.xtrim(keys.job_events(job_id), maxlen=events_max_len, approximate=False)


def _expire_job(client: redis.Redis, store: ObjectStore, job_id: str, report: RetentionReport) -> None:
    """Delete every trace of the job but the adapter versions it published."""
    tenant_id, idempotency_key = client.hmget(keys.job(job_id), "tenant_id", "idempotency_key")
    if tenant_id is not None:
        _delete_objects(store, store.list(job_objects_prefix(tenant_id, job_id)), report)
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.job(job_id), keys.job_events(job_id), keys.job_checkpoints(job_id), keys.job_publication(job_id))
    if tenant_id is not None:
        pipe.zrem(keys.tenant_jobs(tenant_id), job_id)
    for index in keys.retention_indexes():
        pipe.zrem(index, job_id)
    pipe.execute()
    if tenant_id is not None and idempotency_key is not None:
        # a replay of the creating request must not find a key that names a job no longer there
        idem = keys.idempotency(tenant_id, idempotency_key)
        if client.hget(idem, "job_id") == job_id:
            client.delete(idem)
    report.jobs_expired += 1
