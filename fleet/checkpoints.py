"""Training checkpoints in the object store, so an attempt on any machine can resume another's work.

Layout: tenants/<tid>/jobs/<job_id>/checkpoints/a<attempt>-<token>/step-<N>/<files>. Each claim writes
under its own prefix (`Fence.writer`, as the registry does with v<N>/a<attempt>-<token>/), so a stale
attempt that uploads late, or a claim a Redis failover rolled back that shares its attempt number, can
never overwrite the files a newer claim recorded for the same step. The upload is committed by
`JobStore.record_checkpoint` (a fenced Redis write) only after every file is stored, so a checkpoint
listed for a job is always complete; a half-uploaded one is never referenced.
"""

from __future__ import annotations

from pathlib import Path

from fleet.exceptions import NotFound
from fleet.fencing import Fence
from fleet.objectstore import ObjectStore

__all__ = ["checkpoint_prefix", "upload_checkpoint", "download_checkpoint", "delete_job_checkpoints"]


def checkpoint_prefix(tenant_id: str, job_id: str, step: int, *, fence: Fence) -> str:
    """The object-store prefix of one claim's checkpoint (ends with "/"); also its `location`."""
    return f"tenants/{tenant_id}/jobs/{job_id}/checkpoints/{fence.writer}/step-{step:08d}/"


def upload_checkpoint(
    store: ObjectStore, tenant_id: str, job_id: str, step: int, local_dir: Path, *, fence: Fence
) -> str:
    """Upload every regular file under `local_dir`; returns the location to pass to record_checkpoint."""
    prefix = checkpoint_prefix(tenant_id, job_id, step, fence=fence)
    local_dir = Path(local_dir)
    for path in sorted(local_dir.rglob("*")):
        if path.is_file() and not path.is_symlink():
            store.put_file(prefix + path.relative_to(local_dir).as_posix(), path)
    return prefix


def download_checkpoint(store: ObjectStore, location: str, dest_dir: Path) -> Path:
    """Fetch the checkpoint at `location` into `dest_dir` (created); NotFound if nothing is there."""
    keys = store.list(location)
    if not keys:
        raise NotFound(f"Checkpoint {location!r} has no files in {store!r}.")
    dest_dir = Path(dest_dir)
    for key in keys:
        store.download_file(key, dest_dir / key[len(location) :])
    return dest_dir


def delete_job_checkpoints(store: ObjectStore, tenant_id: str, job_id: str) -> int:
    """Delete every checkpoint object of a job (after it finished); returns how many were removed."""
    keys = store.list(f"tenants/{tenant_id}/jobs/{job_id}/checkpoints/")
    for key in keys:
        store.delete(key)
    return len(keys)
