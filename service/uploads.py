"""Receiving a multipart upload: the file part streamed to a temporary file under a byte limit.

Starlette's own form parsing spools files without a size limit; here the body is counted as it
arrives, so an oversize upload is refused with 413 after at most `max_bytes` (plus the multipart
envelope) have been read, and a large file never sits in memory.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import APIError

__all__ = ["ReceivedUpload", "receive_upload", "format_bytes", "remove_stale_spool_files"]

# Room for the multipart boundaries, part headers and the small text fields around the file.
_ENVELOPE_BYTES = 64 * 1024
_MAX_FIELD_BYTES = 16 * 1024
_MAX_PARTS = 16


@dataclass
class ReceivedUpload:
    """The parsed form: the one file (saved at `path`) and the text fields."""

    field_name: str
    filename: str
    path: Path
    bytes: int
    fields: dict[str, str] = field(default_factory=dict)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def format_bytes(n: int) -> str:
    """`1536` → `"1.5 KiB"`: sizes in error messages a user can read."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} bytes"


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"The uploaded file is larger than this server's limit of {format_bytes(max_bytes)} "
        f"({max_bytes} bytes). Split the dataset or ask the operator to raise LORAFLEET_MAX_UPLOAD_BYTES.",
        param="file",
        code="file_too_large",
    )


class _FormCollector:
    """python-multipart callbacks that write the file part to disk and keep small text fields."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out = out
        self.max_bytes = max_bytes
        self.fields: dict[str, str] = {}
        self.file_field: str | None = None
        self.filename: str | None = None
        self.file_bytes = 0
        self._fh = None
        self._parts = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._in_file = False
        self._name = ""
        self._value = bytearray()
        self.ended = False  # the closing boundary was seen (python-multipart's finalize() never checks)

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda d, s, e: self._append_header("name", d[s:e]),
            "on_header_value": lambda d, s, e: self._append_header("value", d[s:e]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
            "on_end": self._on_end,
        }

    def _append_header(self, which: str, data: bytes) -> None:
        if which == "name":
            self._header_name += data
        else:
            self._header_value += data

    def _on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise APIError(400, f"Too many form fields (at most {_MAX_PARTS}).", code="invalid_multipart")
        self._disposition = b""
        self._in_file = False
        self._name = ""
        self._value = bytearray()

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise APIError(400, "A multipart part has no name in its Content-Disposition header.",
                           code="invalid_multipart")
        self._name = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if self.file_field is not None:
                raise APIError(400, "Upload exactly one file per request.", param=self._name,
                               code="invalid_multipart")
            self._in_file = True
            self.file_field = self._name
            self.filename = options[b"filename"].decode("utf-8", "replace")
            self._fh = open(self.out, "wb")  # closed in _on_part_end, or by close() on any failure

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._in_file:
            self.file_bytes += len(chunk)
            if self.file_bytes > self.max_bytes:
                raise _too_large(self.max_bytes)
            self._fh.write(chunk)
        else:
            self._value.extend(chunk)
            if len(self._value) > _MAX_FIELD_BYTES:
                raise APIError(400, f"Form field '{self._name}' is too long.", param=self._name,
                               code="invalid_multipart")

    def _on_part_end(self) -> None:
        if self._in_file:
            self.close()
            self._in_file = False
        else:
            self.fields[self._name] = self._value.decode("utf-8", "replace")

    def _on_end(self) -> None:
        self.ended = True

    @property
    def complete(self) -> bool:
        """Whether the body reached its closing boundary with no part left open."""
        return self.ended and not self._in_file

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def remove_stale_spool_files(spool_root: Path, *, max_age_s: float = 3600.0) -> int:
    """Delete spooled uploads/downloads older than `max_age_s` (left by a crash); returns how many."""
    if not spool_root.is_dir():
        return 0
    cutoff = time.time() - max_age_s
    removed = 0
    for path in spool_root.rglob("*.part"):
        try:
            if path.is_file() and path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue  # another process cleaned it first
    return removed


async def _limited(stream: AsyncIterator[bytes], limit: int, max_bytes: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise _too_large(max_bytes)
        yield chunk


async def receive_upload(request: Request, *, max_bytes: int, spool_dir: Path) -> ReceivedUpload:
    """Parse a `multipart/form-data` request holding one file part and a few text fields.

    The file lands in a new temporary file under `spool_dir`; the caller owns it (`.remove()`).
    Raises APIError: 413 when the file (or the declared body) exceeds `max_bytes`, 400 when the body
    is not multipart, is cut off before its closing boundary, or holds no file.
    """
    content_type = request.headers.get("content-type", "")
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or b"boundary" not in params:
        raise APIError(
            400,
            "Upload files as multipart/form-data with a 'file' part and a 'purpose' field "
            f"(got Content-Type {content_type or 'none'!r}).",
            code="invalid_content_type",
        )
    limit = max_bytes + _ENVELOPE_BYTES
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _too_large(max_bytes)

    spool_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=spool_dir)
    os.close(fd)
    out = Path(name)
    collector = _FormCollector(out, max_bytes)
    parser = MultipartParser(params[b"boundary"], collector.callbacks())
    try:
        async for chunk in _limited(request.stream(), limit, max_bytes):
            # The callbacks write to disk; keep that off the event loop.
            await anyio.to_thread.run_sync(parser.write, chunk)
        parser.finalize()
        if not collector.complete:
            # A body cut off at a line end would otherwise be stored as a shorter, valid-looking file.
            raise APIError(
                400,
                "The multipart body ended before its closing boundary: the upload was cut off. Send the "
                "whole request again.",
                code="invalid_multipart",
            )
    except FormParserError as e:
        out.unlink(missing_ok=True)
        raise APIError(400, f"The multipart body could not be parsed: {e}.", code="invalid_multipart") from e
    except BaseException:  # 413, a client that went away, cancellation: never leave the part behind
        out.unlink(missing_ok=True)
        raise
    finally:
        collector.close()
    if collector.file_field is None:
        out.unlink(missing_ok=True)
        raise APIError(400, "Missing required parameter: 'file' (a multipart file part).", param="file",
                       code="missing_file")
    return ReceivedUpload(
        field_name=collector.file_field,
        filename=collector.filename or "",
        path=out,
        bytes=collector.file_bytes,
        fields=collector.fields,
    )
