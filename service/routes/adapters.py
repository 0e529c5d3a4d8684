"""`/v1/adapters` (lorafleet extension): list adapters and versions, read manifests, download, delete, import.

A version is addressed as `/v1/adapters/{name}/versions/{version}` with `version` = `v3`, `3` or
`latest`; its public name (`fine_tuned_model`) is `<name>:v<N>`.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from fleet.exceptions import InvalidRequest
from fleet.registry import AdapterRegistry, AdapterSummary, format_adapter_ref, validate_adapter_name
from service.deps import CurrentTenant, RegistryDep, SettingsDep
from service.errors import APIError
from service.objects import adapter_object, list_envelope, version_object
from service.openapi import ADAPTER_NAME_SCHEMA, TENANT_ERRORS, VERSION_SCHEMA, multipart_body
from service.uploads import receive_upload

__all__ = ["router"]

logger = logging.getLogger(__name__)

AdapterName = Annotated[str, PathParam(json_schema_extra=ADAPTER_NAME_SCHEMA)]
VersionPath = Annotated[str, PathParam(json_schema_extra=VERSION_SCHEMA)]

router = APIRouter(prefix="/adapters", tags=["adapters"], responses=TENANT_ERRORS)

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
_CHUNK = 1024 * 1024
_VERSION_DIGITS = re.compile(r"[0-9]{1,18}")


def version_ref(name: str, version: str) -> str:
    """`("mine", "v3")` / `("mine", "3")` → "mine:v3"; `("mine", "latest")` → "mine" (latest version)."""
    validate_adapter_name(name, param="name")
    if version == "latest":
        return name
    digits = version[1:] if version.startswith("v") else version
    # A regex, not str.isdigit(): that also accepts "²" and "①", which int() then rejects (a 500); and
    # 18 digits bound int()'s work while allowing any version a counter can reach.
    if not _VERSION_DIGITS.fullmatch(digits) or int(digits) < 1:
        raise InvalidRequest(
            f"Invalid version {version!r}: use 'v<N>' (e.g. 'v1'), '<N>' or 'latest'.", param="version"
        )
    return format_adapter_ref(name, int(digits))


def _archive_filename(filename: str, suffix: str) -> str:
    """A safe local name for the uploaded archive: the last path component of the client's file name
    (which ends in `suffix`), or "adapter<suffix>" where that is unusable as a file name."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    if base in ("", ".", "..") or "\x00" in base or len(base.encode()) > 200:
        return "adapter" + suffix
    return base


@router.get("")
def list_adapters(tenant: CurrentTenant, registry: RegistryDep) -> dict:
    """The tenant's adapters with at least one live version, most recently updated first."""
    return list_envelope([adapter_object(s) for s in registry.list_adapters(tenant.tenant_id)], has_more=False)


@router.post("", openapi_extra=multipart_body(
    {"file": {"type": "string", "format": "binary",
              "description": "The PEFT adapter directory as .tar.gz, .tgz, .tar or .zip."},
     "name": {"type": "string", **ADAPTER_NAME_SCHEMA},
     "base_model": {"type": "string", "description": "The catalog base model (default: the adapter's own)."}},
    required=["file", "name"],
))
async def import_adapter(
    request: Request, tenant: CurrentTenant, registry: RegistryDep, settings: SettingsDep
) -> dict:
    """Import a PEFT adapter made elsewhere: multipart with `file` (.tar.gz/.tgz/.tar/.zip of the adapter
    directory) and `name`; optional `base_model`. It becomes the adapter's next version."""
    spool_dir = Path(settings.data_dir) / "tmp" / "uploads"
    upload = await receive_upload(request, max_bytes=settings.max_upload_bytes, spool_dir=spool_dir)
    try:
        name = upload.fields.get("name")
        if not name:
            raise APIError(400, "Missing required parameter: 'name' (the adapter name).", param="name",
                           code="missing_required_parameter")
        validate_adapter_name(name, param="name")
        suffix = next((s for s in _ARCHIVE_SUFFIXES if upload.filename.lower().endswith(s)), None)
        if suffix is None:
            raise APIError(
                400,
                f"Unsupported adapter archive {upload.filename!r}: upload the PEFT adapter directory as "
                ".tar.gz, .tgz, .tar or .zip.",
                param="file",
                code="unsupported_archive",
            )
        extra = {"imported_filename": upload.filename}
        if upload.fields.get("base_model"):
            extra["base_model"] = upload.fields["base_model"]
        # The archive keeps the uploaded file's own name (in a directory of its own), so an error about
        # it names the file the user sent, not the spool file.
        with tempfile.TemporaryDirectory(prefix="import-", dir=upload.path.parent) as tmp:
            archive = Path(tmp) / _archive_filename(upload.filename, suffix)
            upload.path.rename(archive)
            upload.path = archive
            version = await anyio.to_thread.run_sync(
                lambda: registry.import_adapter(tenant.tenant_id, name, archive, extra_manifest=extra)
            )
    finally:
        upload.remove()
    logger.info("tenant %s imported adapter %s", tenant.tenant_id, version.ref)
    return version_object(version)


@router.get("/{name}")
def retrieve_adapter(name: AdapterName, tenant: CurrentTenant, registry: RegistryDep) -> dict:
    versions = registry.list_versions(tenant.tenant_id, validate_adapter_name(name, param="name"))
    summary = AdapterSummary(
        name=name,
        latest_version=versions[0].version,
        latest_ref=versions[0].ref,
        n_versions=len(versions),
        created_at=versions[-1].created_at,
        updated_at=versions[0].created_at,
    )
    return adapter_object(summary)


@router.delete("/{name}")
def delete_adapter(name: AdapterName, tenant: CurrentTenant, registry: RegistryDep) -> dict:
    """Soft-delete every version of the adapter (their numbers are never reused)."""
    deleted = registry.delete_adapter(tenant.tenant_id, validate_adapter_name(name, param="name"))
    return {"id": name, "object": "adapter", "deleted": True, "versions": [v.ref for v in deleted]}


@router.get("/{name}/versions")
def list_versions(name: AdapterName, tenant: CurrentTenant, registry: RegistryDep) -> dict:
    """The adapter's live versions, newest first."""
    versions = registry.list_versions(tenant.tenant_id, validate_adapter_name(name, param="name"))
    return list_envelope([version_object(v) for v in versions], has_more=False)


@router.get("/{name}/versions/{version}")
def retrieve_version(name: AdapterName, version: VersionPath, tenant: CurrentTenant, registry: RegistryDep) -> dict:
    """One version with its manifest (files with sha256 and size, base model, LoRA config, job, metrics)."""
    ref = version_ref(name, version)
    record = registry.get_version(tenant.tenant_id, ref)
    manifest = registry.read_manifest(tenant.tenant_id, record.ref)
    return {**version_object(record), "rank_report": manifest.rank_report, "manifest": manifest.model_dump(mode="json")}


@router.get("/{name}/versions/{version}/manifest")
def retrieve_manifest(name: AdapterName, version: VersionPath, tenant: CurrentTenant, registry: RegistryDep) -> dict:
    """The version's manifest.json exactly as stored."""
    return registry.read_manifest(tenant.tenant_id, version_ref(name, version)).model_dump(mode="json")


@router.delete("/{name}/versions/{version}")
def delete_version(name: AdapterName, version: VersionPath, tenant: CurrentTenant, registry: RegistryDep) -> dict:
    """Soft-delete one version: gone from listings and downloads; its number is never reused."""
    if version == "latest":
        raise InvalidRequest("Name the version to delete (e.g. 'v1'), not 'latest'.", param="version")
    record = registry.delete_version(tenant.tenant_id, version_ref(name, version))
    return {"id": record.ref, "object": "adapter.version", "deleted": True}


def _build_archive(registry: AdapterRegistry, tenant_id: str, ref: str, fmt: str, spool_dir: Path) -> tuple[Path, str]:
    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="download-", suffix=".part", dir=spool_dir)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            filename = registry.write_archive(tenant_id, ref, out, fmt)  # type: ignore[arg-type]
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, filename


def _stream_and_remove(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
    finally:
        path.unlink(missing_ok=True)


@router.get("/{name}/versions/{version}/download")
async def download_version(
    name: AdapterName,
    version: VersionPath,
    tenant: CurrentTenant,
    registry: RegistryDep,
    settings: SettingsDep,
    format: Literal["tar.gz", "zip"] = "tar.gz",
) -> StreamingResponse:
    """The version's PEFT directory (plus manifest.json) as one archive `<name>-v<N>.tar.gz` (or .zip)."""
    ref = version_ref(name, version)
    spool_dir = Path(settings.data_dir) / "tmp" / "downloads"
    path, filename = await anyio.to_thread.run_sync(
        _build_archive, registry, tenant.tenant_id, ref, format, spool_dir
    )
    media_type = "application/gzip" if format == "tar.gz" else "application/zip"
    return StreamingResponse(
        _stream_and_remove(path),
        media_type=media_type,
        headers={
            "Content-Length": str(path.stat().st_size),
            "Content-Disposition": f'attachment; filename="{filename}"',
        },
    )
