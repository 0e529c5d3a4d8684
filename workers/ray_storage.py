"""Where Ray Train persists a run (checkpoints, the final adapter): storage every Ray node reaches.

Ray Train copies each reported checkpoint to `RunConfig(storage_path, storage_filesystem)` and reads it
back there, on whichever node restores a worker group or collects the result; a directory on the
dispatcher's own disk would exist on no training node. `settings.ray_storage_path` picks the place:
- `s3://BUCKET/PREFIX`: that bucket, reached with the object store's endpoint and credentials
  (`s3_endpoint_url`, `s3_access_key_id`, ...) through pyarrow's S3FileSystem, which Ray accepts as
  `storage_filesystem`;
- any other string: a filesystem path mounted at the same place on every node (NFS, a one-machine setup);
- unset: `<s3_prefix>ray/` in the object store's bucket with object_store="s3", else `ray/` under the
  local object store's root (`<data_dir>/objects/ray`), which is what one machine or an NFS mount shares.
A run's folder is `<root>/<run name>`; the dispatcher removes it when the attempt ends (the checkpoints
that matter are in the object store, under the job's prefix).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleet.settings import Settings

__all__ = ["RayStorage", "ray_storage_for"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayStorage:
    """`path` and `filesystem` as Ray's RunConfig takes them (`filesystem` None: a local/shared path)."""

    path: str
    filesystem: Any = None  # pyarrow.fs.S3FileSystem for a bucket

    def run_path(self, name: str) -> str:
        return f"{self.path.rstrip('/')}/{name}"

    def remove_run(self, name: str) -> None:
        """Remove what Ray persisted for run `name`; a run that persisted nothing is fine. A failure is
        logged, not raised: the run is over, and what is left costs only space."""
        path = self.run_path(name)
        try:
            if self.filesystem is None:
                shutil.rmtree(path, ignore_errors=True)
                return
            from pyarrow.fs import FileType

            if self.filesystem.get_file_info(path).type != FileType.NotFound:
                self.filesystem.delete_dir(path)
        except OSError as e:
            logger.warning("could not remove Ray's storage of run %s at %s: %s", name, path, e)


def ray_storage_for(settings: Settings) -> RayStorage:
    """The Ray storage `settings` configure (see the module docstring)."""
    configured = settings.ray_storage_path
    if configured is None and settings.object_store == "s3":
        return RayStorage(f"{settings.s3_bucket}/{settings.s3_prefix}ray", _s3_filesystem(settings))
    if configured is None:
        return RayStorage(str((Path(settings.data_dir) / "objects" / "ray").resolve()))
    if configured.startswith("s3://"):
        return RayStorage(configured.removeprefix("s3://").rstrip("/"), _s3_filesystem(settings))
    return RayStorage(str(Path(configured).resolve()))


def _s3_filesystem(settings: Settings) -> Any:
    """pyarrow's S3 filesystem for the object store's endpoint, region and credentials (boto3's usual
    chain, which pyarrow follows too, when no explicit keys are set)."""
    from pyarrow.fs import S3FileSystem

    kwargs: dict[str, Any] = {"region": settings.s3_region}
    if settings.s3_endpoint_url:
        url = urlsplit(settings.s3_endpoint_url)
        kwargs["endpoint_override"] = url.netloc + url.path.rstrip("/")
        kwargs["scheme"] = url.scheme or "https"
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        kwargs["access_key"] = settings.s3_access_key_id
        kwargs["secret_key"] = settings.s3_secret_access_key.get_secret_value()
    return S3FileSystem(**kwargs)
