"""Adapter registry: immutable, numbered adapter versions per tenant in the object store.

Layout: tenants/<tid>/adapters/<name>/v<N>/ holds a manifest.json (sha256, size and stored key of
each PEFT file, base model, LoRA config, hyperparameters, dataset, job id, final metrics, the rank
report, created_at);
the files themselves lie under v<N>/a<attempt>-<token>/ (training: one folder per claim, `Fence.writer`)
or v<N>/import/ (import), so no two writers ever share a key. Publishing a version:
  1. reserve N (Redis INCR) and record job → version, fenced by the claim (attempt and token); a job
     that already reserved a version gets the same N back, so a retried attempt never makes a second one;
  2. upload the files under the claim's own prefix;
  3. commit the manifest in Redis (fenced, atomic): the first attempt to commit decides the version's
     bytes for good, and any later publish of the job reuses that manifest instead of its own;
  4. write manifest.json LAST, always the committed bytes; 5. mark the version ready in Redis.
A stale attempt (its lease lost to a newer one that reserved the same N) can therefore never change a
published version: its files sit under its own prefix, which no manifest names unless it committed
(after its upload had finished), and every write of manifest.json, late or repeated, on either backend,
writes the same committed bytes. No conditional put is needed from the object store.
A version without a manifest is invisible. A pending cancel refuses steps 1 and 3 (CancelRequested).
Step 3 is the job's point of no return: from then on a cancel or pause changes nothing (the job
completes, and an event says so), and a job whose worker dies is requeued whatever was requested;
its next attempt finishes it with `complete_committed_publication`, without training again.
Deletion is soft: the version disappears from listings and downloads, its number is never reused.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Literal

import redis
from pydantic import BaseModel, ConfigDict, Field

from fleet import keys
from fleet import queue_scripts as lua
from fleet.adapter_archives import manifest_fields_from_peft, unpack_adapter, write_folder_archive
from fleet.exceptions import InvalidRequest, NotFound
from fleet.fencing import Fence, raise_for_refusal
from fleet.objectstore import ObjectStore
from fleet.peft_format import validate_peft_adapter_dir
from fleet.settings import check_redis_client

__all__ = [
    "AdapterRegistry",
    "CompletedPublication",
    "AdapterVersion",
    "AdapterSummary",
    "Manifest",
    "ManifestFile",
    "validate_adapter_name",
    "adapter_name_for_job",
    "parse_adapter_ref",
    "format_adapter_ref",
    "MANIFEST_FILE",
    "sha256_file",
]

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
IMPORT_RESERVATION_TTL_S = 24 * 3600  # a reservation outlives any retry of the script that made it
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MAX_NAME = 96
_REF_RE = re.compile(r"^(?P<name>[^:]+)(?::v(?P<version>[0-9]+))?$")

def validate_adapter_name(name: str, *, param: str = "name") -> str:
    """Return `name` if it is a valid adapter name, else InvalidRequest saying what is allowed."""
    if not isinstance(name, str) or not name:
        raise InvalidRequest("Adapter name must be a non-empty string.", param=param)
    if len(name) > _MAX_NAME:
        raise InvalidRequest(f"Adapter name is {len(name)} characters long; the limit is {_MAX_NAME}.", param=param)
    if ".." in name or not _NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"Invalid adapter name {name!r}: use letters, digits, '.', '_' and '-', start with a letter or "
            "digit, and no '..'.",
            param=param,
        )
    return name


def adapter_name_for_job(model: str, suffix: str | None, job_id: str) -> str:
    """The adapter a job publishes into: its `suffix` if given (jobs sharing a suffix add versions to
    one adapter), else "<model>-<job id tail>". Characters outside the name charset become '-'.
    """
    if suffix:
        return validate_adapter_name(suffix, param="suffix")
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip(".-_") or "adapter"
    base = re.sub(r"\.{2,}", ".", base)
    tail = job_id.removeprefix("ftjob-")[-8:]
    return f"{base[: _MAX_NAME - len(tail) - 1]}-{tail}"


def format_adapter_ref(name: str, version: int) -> str:
    """The public name of a version, used as the job's `fine_tuned_model`: "<name>:v<N>"."""
    return f"{name}:v{version}"


def parse_adapter_ref(ref: str, *, param: str = "model") -> tuple[str, int | None]:
    """Split "<name>:v<N>" (or a bare "<name>", meaning its latest version) into (name, N|None)."""
    match = _REF_RE.fullmatch(ref or "")
    if match is None:
        raise InvalidRequest(f"Invalid adapter reference {ref!r}; expected '<name>' or '<name>:v<N>'.", param=param)
    name = validate_adapter_name(match["name"], param=param)
    return name, int(match["version"]) if match["version"] else None


class ManifestFile(BaseModel):
    """One PEFT file of a version.

    `path` is its name in the adapter dir (and in downloads and archives); `key` is where it is
    stored, relative to the version's prefix ("a2/adapter_model.safetensors"). Manifests written
    before files got per-writer prefixes have no `key`: the file is stored at `path`.
    """

    path: str
    sha256: str
    size: int
    key: str | None = None

    @property
    def stored_at(self) -> str:
        return self.key or self.path


class Manifest(BaseModel):
    """manifest.json of a version. Known fields are typed; publishers may add more (kept as given)."""

    model_config = ConfigDict(extra="allow")

    format_version: int = 1
    name: str
    version: int
    ref: str
    tenant_id: str
    created_at: int
    source: Literal["training", "import"]
    job_id: str | None = None
    attempt: int | None = None
    base_model: str | None = None
    lora_config: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    final_metrics: dict[str, Any] = Field(default_factory=dict)
    # What the adapter learned (lora_core.report.RankReport.to_json: per-module singular values, effective
    # rank at 90 % energy, verdicts, a summary); computed by the worker at publish. None on imports.
    rank_report: dict[str, Any] | None = None
    # A rank sweep's version (fleet.sweeps): the ranks tried, every child's result, the one chosen.
    rank_sweep: dict[str, Any] | None = None
    files: list[ManifestFile]


class AdapterVersion(BaseModel):
    """A ready version as listed (the manifest holds the full record)."""

    name: str
    version: int
    ref: str
    tenant_id: str
    created_at: int
    source: Literal["training", "import"]
    job_id: str | None = None
    base_model: str | None = None
    bytes_total: int
    rank_report_summary: dict[str, Any] | None = None  # the manifest's rank_report["summary"]
    deleted_at: int | None = None


class CompletedPublication(BaseModel):
    """A job's version as its committed manifest records it: what the job's record must say when it finishes."""

    ref: str
    trained_tokens: int | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)


class AdapterSummary(BaseModel):
    name: str
    latest_version: int
    latest_ref: str
    n_versions: int
    created_at: int
    updated_at: int


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks (what manifests record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _new_manifest(
    tenant_id: str, name: str, version: int, fields: Mapping[str, Any], entries: list[ManifestFile]
) -> Manifest:
    return Manifest(
        **{
            **fields,
            "name": name,
            "version": version,
            "ref": format_adapter_ref(name, version),
            "tenant_id": tenant_id,
            "created_at": int(time.time()),
            "files": entries,
        }
    )


def _adapter_files(local_dir: Path) -> list[Path]:
    """Regular files under `local_dir` to publish (hidden files and any old manifest.json left out)."""
    files = []
    for path in sorted(Path(local_dir).rglob("*")):
        rel = path.relative_to(local_dir)
        if path.is_symlink() or not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.as_posix() == MANIFEST_FILE:
            continue
        files.append(path)
    return files


class AdapterRegistry:
    """Adapter versions of every tenant; another tenant's adapter raises NotFound like a missing one."""

    def __init__(self, client: redis.Redis, store: ObjectStore, *, max_import_bytes: int = 2 * 1024**3) -> None:
        check_redis_client(client)
        self.redis = client
        self.store = store
        self.max_import_bytes = max_import_bytes
        self._reserve = client.register_script(lua.RESERVE_VERSION)
        self._commit = client.register_script(lua.COMMIT_VERSION)
        self._control = client.register_script(lua.CONTROL)
        self._ready = client.register_script(lua.READY_VERSION)
        self._reserve_import = client.register_script(lua.RESERVE_IMPORT_VERSION)

    @staticmethod
    def version_prefix(tenant_id: str, name: str, version: int) -> str:
        return f"tenants/{tenant_id}/adapters/{name}/v{version}/"

    # -- publishing ---------------------------------------------------------------------------------
    def publish_adapter_version(
        self,
        tenant_id: str,
        name: str,
        local_dir: Path,
        manifest_fields: Mapping[str, Any],
        *,
        fence: Fence,
    ) -> str:
        """Publish `local_dir` (a PEFT adapter dir) as the version of the job `fence` names; returns "<name>:v<N>".

        Idempotent per job: calling again (same or a later attempt) returns the same version, with the
        bytes of the first attempt that committed. Raises FencedOut when `fence` is not the job's
        running claim, CancelRequested (reserving or committing nothing) while a cancel request for
        the job is pending, InvalidRequest for a bad name/dir.
        `manifest_fields` supplies base_model, lora_config, hyperparameters, dataset {file_id, sha256},
        final_metrics (and any extra keys to keep in the manifest).
        """
        validate_adapter_name(name)
        validate_peft_adapter_dir(local_dir)
        job_id, attempt = fence.job_id, fence.attempt
        job_key, publication_key = keys.job(job_id), keys.job_publication(job_id)
        reply = self._reserve(
            keys=[job_key, publication_key, keys.adapter_version_seq(tenant_id, name)],
            args=[job_id, attempt, fence.token, name],
        )
        raise_for_refusal(reply, fence, "publish")
        name, version, state = reply[1], int(reply[2]), reply[3]
        prefix = self.version_prefix(tenant_id, name, version)
        if state == "ready":
            self._mark_ready(tenant_id, name, version, job_id)
            return format_adapter_ref(name, version)
        if state == "committed":  # an attempt committed, then died before writing manifest.json
            manifest_json = self.redis.hget(publication_key, "manifest")
        else:
            entries = self._upload_files(
                prefix, f"{fence.writer}/", Path(local_dir), before_each_write=lambda: self._check_owner(fence)
            )
            fields = {**manifest_fields, "source": "training", "job_id": job_id, "attempt": attempt}
            manifest = _new_manifest(tenant_id, name, version, fields, entries)
            reply = self._commit(
                keys=[job_key, publication_key], args=[attempt, fence.token, manifest.model_dump_json(indent=2)]
            )
            raise_for_refusal(reply, fence, "publish")
            manifest_json = reply[1]  # ours, or the one another attempt of this job committed first
        self.store.put_bytes(prefix + MANIFEST_FILE, manifest_json.encode())  # LAST; always the committed bytes
        self._mark_ready(tenant_id, name, version, job_id)
        return format_adapter_ref(name, version)

    def _check_owner(self, fence: Fence) -> None:
        """Stop a stale or cancelled attempt before each upload. Only saves work: the fenced commit is what
        keeps a stale attempt's files out of a version."""
        reply = self._control(keys=[keys.job(fence.job_id)], args=[fence.attempt, fence.token])
        raise_for_refusal(reply, fence, "publish")
        if reply[1] == "cancel":
            raise_for_refusal(["cancel_requested"], fence, "publish")

    def complete_committed_publication(self, fence: Fence) -> CompletedPublication | None:
        """For a job whose version an earlier attempt committed: make it ready and say what it holds.

        Writes the committed manifest.json (idempotent: always the committed bytes) and marks the version
        ready, then returns its ref with the manifest's trained_tokens and hyperparameters, so the
        attempt finishes the job succeeded without training again. None when nothing is committed
        (train as usual). Raises FencedOut when `fence` is not the job's running claim.
        """
        reply = self._control(keys=[keys.job(fence.job_id)], args=[fence.attempt, fence.token])
        raise_for_refusal(reply, fence, "complete the job's publication")
        name, version, state, manifest_json = self.redis.hmget(
            keys.job_publication(fence.job_id), "name", "version", "state", "manifest"
        )
        if state not in ("committed", "ready") or manifest_json is None:
            return None
        manifest = Manifest.model_validate_json(manifest_json)
        prefix = self.version_prefix(manifest.tenant_id, name, int(version))
        if state == "committed":
            self.store.put_bytes(prefix + MANIFEST_FILE, manifest_json.encode())
        self._mark_ready(manifest.tenant_id, name, int(version), fence.job_id)
        trained_tokens = (manifest.model_extra or {}).get("trained_tokens")
        return CompletedPublication(
            ref=format_adapter_ref(name, int(version)),
            trained_tokens=int(trained_tokens) if trained_tokens is not None else None,
            hyperparameters=manifest.hyperparameters,
        )

    def published_version(self, job_id: str) -> str | None:
        """The "<name>:v<N>" a job published, if its manifest is written (lets a new attempt skip work)."""
        name, version, state = self.redis.hmget(keys.job_publication(job_id), "name", "version", "state")
        return format_adapter_ref(name, int(version)) if state == "ready" else None

    def import_adapter(
        self, tenant_id: str, name: str, source: Path, *, extra_manifest: Mapping[str, Any] | None = None
    ) -> AdapterVersion:
        """Import a PEFT adapter made elsewhere (a directory, .zip, .tar, .tar.gz/.tgz) as a new version."""
        validate_adapter_name(name)
        source = Path(source)
        with tempfile.TemporaryDirectory(prefix="lf-import-") as tmp:
            adapter_dir = unpack_adapter(source, Path(tmp), self.max_import_bytes)
            info = validate_peft_adapter_dir(adapter_dir)
            fields = {**manifest_fields_from_peft(info), **(extra_manifest or {}), "source": "import"}
            version = self._reserve_import_version(tenant_id, name, secrets.token_hex(8))  # N is this import's alone
            prefix = self.version_prefix(tenant_id, name, version)
            try:
                entries = self._upload_files(prefix, "import/", adapter_dir)
                manifest = _new_manifest(tenant_id, name, version, fields, entries)
                self.store.put_bytes(prefix + MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())  # LAST
                self._mark_ready(tenant_id, name, version, None)
            except BaseException:
                self._release_import_version(tenant_id, name, version)
                raise
        return self.get_version(tenant_id, format_adapter_ref(name, version))

    def _reserve_import_version(self, tenant_id: str, name: str, import_id: str) -> int:
        """The next version number, reserved for the import `import_id` (drawn once per import): a retried
        call (make_redis retries a script whose reply was lost) returns the same number, spending none."""
        reply = self._reserve_import(
            keys=[keys.adapter_version_seq(tenant_id, name),
                  keys.adapter_import_reservation(tenant_id, name, import_id)],
            args=[IMPORT_RESERVATION_TTL_S],
        )
        return int(reply)

    def _release_import_version(self, tenant_id: str, name: str, version: int) -> None:
        """Undo a failed import's number, so the next version is N again: remove what it uploaded, then
        step the counter back unless someone took a later number meanwhile. A leftover object cannot
        surface: a version is listed only once its Redis record exists, and the next import of N writes
        its own manifest over any old one. Best effort on a failure path: what cannot be undone is
        logged, and the import's own error is what the caller sees."""
        prefix = self.version_prefix(tenant_id, name, version)
        try:
            for key in self.store.list(prefix):
                self.store.delete(key)
        except Exception as e:  # the store may be what failed the import
            logger.warning("failed import of %s:v%d left objects under %s: %s", name, version, prefix, e)
        seq_key = keys.adapter_version_seq(tenant_id, name)
        try:
            with self.redis.pipeline() as pipe:
                pipe.watch(seq_key)
                if int(pipe.get(seq_key) or 0) == version:
                    pipe.multi()
                    pipe.decr(seq_key)
                    pipe.execute()
        except redis.RedisError as e:  # WatchError included: a later number was taken after all
            logger.warning("failed import of %s:v%d: its version number stays used: %s", name, version, e)

    def _upload_files(
        self, prefix: str, subdir: str, local_dir: Path, before_each_write: Callable[[], None] | None = None
    ) -> list[ManifestFile]:
        """Upload the adapter files of `local_dir` to `prefix + subdir`; their manifest entries."""
        entries = []
        for path in _adapter_files(local_dir):
            rel = path.relative_to(local_dir).as_posix()
            if before_each_write:
                before_each_write()
            self.store.put_file(prefix + subdir + rel, path)
            entries.append(
                ManifestFile(path=rel, sha256=sha256_file(path), size=path.stat().st_size, key=subdir + rel)
            )
        return entries

    def _mark_ready(self, tenant_id: str, name: str, version: int, job_id: str | None) -> None:
        manifest = self._load_manifest(tenant_id, name, version)
        record = AdapterVersion(
            name=name,
            version=version,
            ref=manifest.ref,
            tenant_id=tenant_id,
            created_at=manifest.created_at,
            source=manifest.source,
            job_id=manifest.job_id,
            base_model=manifest.base_model,
            bytes_total=sum(f.size for f in manifest.files),
            rank_report_summary=(manifest.rank_report or {}).get("summary"),
        )
        publication = [keys.job_publication(job_id)] if job_id is not None else []
        self._ready(  # one step, which also sends adapter.version.published (once) to the webhook outbox
            keys=[keys.adapter_versions(tenant_id, name), keys.adapters(tenant_id), *publication],
            args=[version, record.model_dump_json(), name, time.time_ns() // 1_000_000, tenant_id,
                  format_adapter_ref(name, version), job_id or ""],
        )

    # -- reading ------------------------------------------------------------------------------------
    def _load_manifest(self, tenant_id: str, name: str, version: int) -> Manifest:
        raw = self.store.get_bytes(self.version_prefix(tenant_id, name, version) + MANIFEST_FILE)
        return Manifest.model_validate_json(raw)

    def _records(self, tenant_id: str, name: str) -> list[AdapterVersion]:
        raw = self.redis.hvals(keys.adapter_versions(tenant_id, name))
        return sorted((AdapterVersion.model_validate_json(r) for r in raw), key=lambda v: v.version)

    def list_versions(self, tenant_id: str, name: str) -> list[AdapterVersion]:
        """Ready, undeleted versions of an adapter, newest first. NotFound if there are none."""
        validate_adapter_name(name)
        versions = [v for v in self._records(tenant_id, name) if v.deleted_at is None]
        if not versions:
            raise NotFound(f"No adapter named {name!r}.", param="name")
        return versions[::-1]

    def list_adapters(self, tenant_id: str) -> list[AdapterSummary]:
        """A tenant's adapters that have at least one live version, most recently created first."""
        out = []
        for name in self.redis.zrange(keys.adapters(tenant_id), 0, -1):
            live = [v for v in self._records(tenant_id, name) if v.deleted_at is None]
            if live:
                out.append(
                    AdapterSummary(
                        name=name,
                        latest_version=live[-1].version,
                        latest_ref=live[-1].ref,
                        n_versions=len(live),
                        created_at=live[0].created_at,
                        updated_at=live[-1].created_at,
                    )
                )
        return sorted(out, key=lambda s: (s.updated_at, s.name), reverse=True)

    def get_version(self, tenant_id: str, ref: str) -> AdapterVersion:
        """Resolve "<name>:v<N>" (or "<name>" = latest) to a live version; NotFound otherwise."""
        name, version = parse_adapter_ref(ref)
        if version is None:
            return self.list_versions(tenant_id, name)[0]
        raw = self.redis.hget(keys.adapter_versions(tenant_id, name), str(version))
        record = AdapterVersion.model_validate_json(raw) if raw else None
        if record is None or record.deleted_at is not None:
            raise NotFound(f"No adapter version {ref!r}.", param="model")
        return record

    def read_manifest(self, tenant_id: str, ref: str) -> Manifest:
        record = self.get_version(tenant_id, ref)
        return self._load_manifest(tenant_id, record.name, record.version)

    def download_version(self, tenant_id: str, ref: str, dest_dir: Path) -> Path:
        """Copy a version's PEFT files (and manifest.json) into `dest_dir`, checking sha256 and size."""
        manifest = self.read_manifest(tenant_id, ref)
        prefix = self.version_prefix(tenant_id, manifest.name, manifest.version)
        dest_dir = Path(dest_dir)
        for entry in manifest.files:
            target = dest_dir / entry.path
            self.store.download_file(prefix + entry.stored_at, target)
            if target.stat().st_size != entry.size or sha256_file(target) != entry.sha256:
                raise RuntimeError(
                    f"{manifest.ref}/{entry.path} does not match its manifest (size/sha256); the stored "
                    "version is corrupt."
                )
        (dest_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
        return dest_dir

    def write_archive(self, tenant_id: str, ref: str, out: BinaryIO, fmt: Literal["tar.gz", "zip"] = "tar.gz") -> str:
        """Write a version as an archive of one folder "<name>-v<N>/" to `out`; returns the file name."""
        manifest = self.read_manifest(tenant_id, ref)
        prefix = self.version_prefix(tenant_id, manifest.name, manifest.version)
        stored_at = {e.path: e.stored_at for e in manifest.files}
        return write_folder_archive(
            out,
            fmt,
            f"{manifest.name}-v{manifest.version}",
            [(e.path, e.size) for e in manifest.files],
            lambda rel: self.store.open(prefix + stored_at[rel]),
            {MANIFEST_FILE: manifest.model_dump_json(indent=2).encode()},
            mtime=manifest.created_at,
        )

    # -- deleting -----------------------------------------------------------------------------------
    def delete_version(self, tenant_id: str, ref: str) -> AdapterVersion:
        """Soft-delete one version (bytes kept; hidden from listings and downloads; N never reused)."""
        record = self.get_version(tenant_id, ref)
        if parse_adapter_ref(ref)[1] is None:
            raise InvalidRequest(f"Name the version to delete, e.g. '{record.ref}'.", param="model")
        record = record.model_copy(update={"deleted_at": int(time.time())})
        self.redis.hset(keys.adapter_versions(tenant_id, record.name), str(record.version), record.model_dump_json())
        return record

    def delete_adapter(self, tenant_id: str, name: str) -> list[AdapterVersion]:
        """Soft-delete every live version of an adapter; returns them."""
        return [self.delete_version(tenant_id, v.ref) for v in self.list_versions(tenant_id, name)]
