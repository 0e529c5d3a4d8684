"""What a training worker needs to start, and how it gets it onto its own node.

A Ray Train worker may run on any node of the cluster, and nodes share nothing but the object store:
no path on the dispatcher's disk exists there. So the dispatcher hands the workers object-store keys
(`StoredInputs`), and every worker fetches them into a fresh directory of its own under its node's
temp dir (`node_work_dir`: `$TMPDIR/lorafleet-work/<run>-rank<r>-pid<pid>-*`, removed when the worker ends):
the training and validation files, their pre-tokenized `.tokens.npz` (workers.pretokenized), the
adapter version to continue from, and the checkpoint an earlier attempt left. The base model is the
one exception: the catalog's `path` names a directory every node has (or a hub id each node caches).

`LocalInputs` is the other kind: a TrainingSpec whose paths every worker already sees (tests, benches,
one machine); nothing is fetched.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fleet.objectstore import ObjectStore, validate_key
from fleet.settings import Settings, make_object_store
from workers.pretokenized import file_sha256
from workers.spec import TrainingSpec

__all__ = ["FILE_FIELDS", "LocalInputs", "StoredInputs", "StoredObject", "TrainingInputs", "node_work_dir",
           "remove_work_dir", "stored_file"]

# The fields of TrainingSpec that name files; StoredInputs carries object keys for them instead.
FILE_FIELDS = frozenset({"training_file", "validation_file", "pretokenized_training_file",
                         "pretokenized_validation_file", "init_adapter"})
_NODE_WORK = "lorafleet-work"
_OWNER_PID = re.compile(r"-pid(\d+)-[a-z0-9_]+$")  # node_work_dir's names end "-pid<pid>-<mkdtemp's suffix>"
# Where each input lands in a worker's directory (the checkpoint goes to "resume/").
_FILE_NAMES = {"training_file": "train.jsonl", "validation_file": "validation.jsonl",
               "pretokenized_training_file": "train.tokens.npz",
               "pretokenized_validation_file": "validation.tokens.npz"}


class TrainingInputs(Protocol):
    """A job's inputs as the driver hands them to every training worker (picklable)."""

    @property
    def n_checkpoints(self) -> int: ...

    def fetch(self, dest: Path) -> tuple[TrainingSpec, Path | None]:
        """Make the inputs readable on this node (under `dest`, if anything is fetched); returns the
        spec with local paths and the checkpoint to resume from, if any."""
        ...


@dataclass(frozen=True)
class LocalInputs:
    """A spec whose files every worker can already read, and a checkpoint directory to resume from."""

    spec: TrainingSpec
    resume_from: Path | None = None

    @property
    def n_checkpoints(self) -> int:
        return self.spec.n_checkpoints

    def fetch(self, dest: Path) -> tuple[TrainingSpec, Path | None]:
        return self.spec, self.resume_from


@dataclass(frozen=True)
class StoredObject:
    """One object to fetch: its key, where it goes (a relative path), its sha256 if known."""

    key: str
    path: str
    sha256: str | None = None


@dataclass(frozen=True)
class StoredInputs:
    """A job's inputs as object-store keys; every worker fetches them itself (see the module docstring).

    `spec` holds TrainingSpec's fields but the files (FILE_FIELDS); `files` maps each file field set for
    the job to its object; `init_adapter` and `resume_from` are the objects of a folder each (empty:
    a fresh adapter; no checkpoint). `settings` builds the object store on the worker's node.
    """

    settings: Settings
    spec: dict[str, Any]
    files: dict[str, StoredObject]
    init_adapter: tuple[StoredObject, ...] = ()
    resume_from: tuple[StoredObject, ...] = ()

    def __post_init__(self) -> None:
        problems = [f"spec: {name} is a path; pass it in files"
                    for name in sorted(FILE_FIELDS & set(self.spec)) if self.spec[name] is not None]
        unknown = set(self.files) - set(_FILE_NAMES)
        problems += [f"files: {name} is not a file field of TrainingSpec" for name in sorted(unknown)]
        if "training_file" not in self.files:
            problems.append("files: training_file is required")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def n_checkpoints(self) -> int:
        return int(self.spec.get("n_checkpoints", TrainingSpec.model_fields["n_checkpoints"].default))

    def fetch(self, dest: Path) -> tuple[TrainingSpec, Path | None]:
        store = make_object_store(self.settings)
        local: dict[str, Any] = {}
        for name, stored in self.files.items():
            local[name] = _fetch(store, stored, dest / "inputs")
        if self.init_adapter:
            local["init_adapter"] = _fetch_folder(store, self.init_adapter, dest / "inputs" / "init")
        resume = _fetch_folder(store, self.resume_from, dest / "resume") if self.resume_from else None
        return TrainingSpec.model_validate({**self.spec, **local}), resume


def stored_file(key: str, field_name: str, sha256: str | None = None) -> StoredObject:
    """The object of TrainingSpec file field `field_name` (its local name is fixed: `_FILE_NAMES`)."""
    return StoredObject(key=key, path=_FILE_NAMES[field_name], sha256=sha256)


def node_work_dir(run_name: str, rank: int) -> Path:
    """A fresh directory for one worker of run `run_name` on this node, under the node's temp dir
    (`TMPDIR` of the node's `ray start`); the worker removes it when it ends. The directories of
    workers on this node that died without removing theirs (SIGKILL, the OOM killer) go first: each
    name carries its worker's pid."""
    root = Path(tempfile.gettempdir()) / _NODE_WORK
    root.mkdir(parents=True, exist_ok=True)
    for path in root.iterdir():
        owner = _OWNER_PID.search(path.name)
        if owner is not None and not _alive(int(owner.group(1))):
            remove_work_dir(path)
    return Path(tempfile.mkdtemp(prefix=f"{run_name}-rank{rank}-pid{os.getpid()}-", dir=root))


def remove_work_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _fetch(store: ObjectStore, stored: StoredObject, dest_dir: Path) -> Path:
    """Download one object to `dest_dir/stored.path`, checking its sha256 when one is known."""
    target = dest_dir / validate_key(stored.path)
    store.download_file(stored.key, target)
    if stored.sha256 is not None and (digest := file_sha256(target)) != stored.sha256:
        raise RuntimeError(f"object {stored.key} does not match its sha256 ({digest} != {stored.sha256}): "
                           "the stored object was altered or cut short")
    return target


def _fetch_folder(store: ObjectStore, objects: tuple[StoredObject, ...], dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    for stored in objects:
        _fetch(store, stored, dest_dir)
    return dest_dir
