"""`/v1/files`: upload (validated on arrival), list, retrieve, delete and download training files."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import anyio
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse

from fleet.files import FileObject, FileStore
from service.deps import CurrentTenant, FilesDep, SettingsDep
from service.errors import APIError
from service.objects import list_envelope
from service.openapi import FILE_ID_SCHEMA, TENANT_ERRORS, multipart_body
from service.uploads import receive_upload
from workers.datasets import DatasetReport, validate_dataset

__all__ = ["router", "file_object", "describe_dataset_errors", "examples_in", "MIN_TRAINING_EXAMPLES"]

logger = logging.getLogger(__name__)

FileId = Annotated[str, PathParam(json_schema_extra=FILE_ID_SCHEMA)]

router = APIRouter(tags=["files"], responses=TENANT_ERRORS)

# OpenAI's minimum for a training file. A validation file may be smaller, and an upload does not say
# which it will be, so uploads need one valid example and job creation checks training files.
MIN_TRAINING_EXAMPLES = 10
_SUMMARY = re.compile(r"^(?P<n>[0-9]+) examples? \((?P<format>[a-z_]+) format\)$")

# Dataset problems quoted in one error message; the rest are counted (all are in `error.details`).
_MAX_QUOTED_ISSUES = 10
_MAX_DETAILS = 100


def file_object(record: FileObject) -> dict[str, Any]:
    """OpenAI's `file` object (plus our `sha256`)."""
    return {
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": record.status,
        "status_details": record.status_details,
        "expires_at": None,
        "sha256": record.sha256,
    }


def describe_dataset_errors(report: DatasetReport, filename: str) -> str:
    """One message naming every problem's line (the first ten quoted), so all are fixed in one round."""
    quoted = []
    for issue in report.errors[:_MAX_QUOTED_ISSUES]:
        where = f"line {issue.line}" if issue.line is not None else "file"
        quoted.append(f"{where}: {issue.message}")
    more = max(report.n_errors, len(report.errors)) - len(quoted)
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else ""
    return f"Invalid dataset {filename!r}: " + "; ".join(quoted) + tail + "."


def _summary(report: DatasetReport) -> str:
    """The file's `status_details` after validation: "<n> examples (<format> format)"."""
    return f"{report.n_examples} example{'s' if report.n_examples != 1 else ''} ({report.format} format)"


def examples_in(record: FileObject) -> int | None:
    """How many valid examples the upload check found (from `status_details`); None if unknown."""
    match = _SUMMARY.match(record.status_details or "")
    return int(match["n"]) if match else None


@router.post("/files", openapi_extra=multipart_body(
    {"file": {"type": "string", "format": "binary", "description": "A JSONL dataset (chat or prompt/completion)."},
     "purpose": {"type": "string", "enum": ["fine-tune"]}},
    required=["file", "purpose"],
))
async def upload_file(request: Request, tenant: CurrentTenant, settings: SettingsDep, files: FilesDep) -> dict:
    """Upload a JSONL dataset as multipart/form-data (`file`, `purpose="fine-tune"`).

    The dataset is validated before it is stored: a broken one is refused with 400 naming the lines
    at fault; a file over the size limit with 413, after reading at most the limit.
    """
    spool_dir = Path(settings.data_dir) / "tmp" / "uploads"
    upload = await receive_upload(request, max_bytes=settings.max_upload_bytes, spool_dir=spool_dir)
    try:
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise APIError(400, "Missing required parameter: 'purpose' (use 'fine-tune').", param="purpose",
                           code="missing_required_parameter")
        if purpose != "fine-tune":
            raise APIError(400, f"Invalid purpose {purpose!r}: lorafleet accepts 'fine-tune' uploads only.",
                           param="purpose", code="invalid_purpose")
        if upload.field_name != "file":
            raise APIError(400, f"The file must be sent in a part named 'file', not {upload.field_name!r}.",
                           param="file", code="missing_file")
        if upload.bytes == 0:
            raise APIError(400, "The uploaded file is empty.", param="file", code="empty_file")
        report = await anyio.to_thread.run_sync(lambda: validate_dataset(upload.path, min_examples=1))
        if not report.ok:
            raise APIError(
                400,
                describe_dataset_errors(report, upload.filename),
                param="file",
                code="invalid_file_format",
                details=[
                    {"line": i.line, "code": i.code, "message": i.message} for i in report.errors[:_MAX_DETAILS]
                ],
            )
        record = await anyio.to_thread.run_sync(_store_validated, files, tenant.tenant_id, upload.filename,
                                                upload.path, report)
    finally:
        upload.remove()
    logger.info("tenant %s uploaded %s (%d bytes, %d examples)", tenant.tenant_id, record.id, record.bytes,
                report.n_examples)
    return file_object(record)


def _store_validated(files: FileStore, tenant_id: str, filename: str, path: Path,
                     report: DatasetReport) -> FileObject:
    with open(path, "rb") as fh:
        record = files.create_file(tenant_id, filename=filename, purpose="fine-tune", content=fh)
    return files.set_status(tenant_id, record.id, "processed", _summary(report))


@router.get("/files")
def list_files(
    tenant: CurrentTenant,
    files: FilesDep,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    """The tenant's files, newest first (cursor pagination with `after`)."""
    page, has_more = files.list_files(tenant.tenant_id, purpose=purpose, after=after, limit=limit, order=order)
    return list_envelope([file_object(f) for f in page], has_more=has_more)


@router.get("/files/{file_id}")
def retrieve_file(file_id: FileId, tenant: CurrentTenant, files: FilesDep) -> dict:
    return file_object(files.get_file(tenant.tenant_id, file_id))


@router.delete("/files/{file_id}")
def delete_file(file_id: FileId, tenant: CurrentTenant, files: FilesDep) -> dict:
    record = files.delete_file(tenant.tenant_id, file_id)
    return {"id": record.id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def file_content(file_id: FileId, tenant: CurrentTenant, files: FilesDep) -> StreamingResponse:
    """The file's bytes, streamed."""
    record = files.get_file(tenant.tenant_id, file_id)
    chunks = files.iter_content(tenant.tenant_id, file_id)
    return StreamingResponse(
        chunks,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(record.bytes),
            "Content-Disposition": _content_disposition(record.filename),
        },
    )


def _content_disposition(filename: str) -> str:
    """An attachment header with an ASCII fallback name and the exact name (RFC 6266 / 5987)."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
