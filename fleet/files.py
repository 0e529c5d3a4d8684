"""Uploaded files (OpenAI File objects): metadata in Redis per tenant, bytes in the object store."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO, BinaryIO, Literal

import redis
from pydantic import BaseModel

from fleet import keys
from fleet.exceptions import InvalidRequest, NotFound, PayloadTooLarge
from fleet.objectstore import ObjectStore
from fleet.settings import check_redis_client

__all__ = ["FILE_ID_PATTERN", "FileObject", "FileStore", "FilePurpose", "FileStatus", "file_object_key"]

FilePurpose = Literal["fine-tune", "fine-tune-results"]
FileStatus = Literal["uploaded", "processed", "error"]
_PURPOSES = ("fine-tune", "fine-tune-results")
_MAX_FILENAME = 255
FILE_ID_PATTERN = r"^file-[A-Za-z0-9]{1,64}$"
_FILE_ID_RE = re.compile(FILE_ID_PATTERN)


class FileObject(BaseModel):
    """An uploaded file, with OpenAI's fields (`object`, `bytes`, ...) plus our sha256 and tenant."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: FilePurpose
    status: FileStatus = "uploaded"
    status_details: str | None = None
    sha256: str
    tenant_id: str


def file_object_key(tenant_id: str, file_id: str) -> str:
    """Where a file's bytes live in the object store."""
    return f"tenants/{tenant_id}/files/{file_id}"


class _CountingReader:
    """Wraps a stream: hashes and counts what is read, and stops past `limit` bytes."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self.bytes += len(chunk)
        if self.bytes > self._limit:
            raise PayloadTooLarge(
                f"File is larger than the {self._limit}-byte upload limit (LORAFLEET_MAX_UPLOAD_BYTES).",
                param="file",
            )
        self.sha256.update(chunk)
        return chunk


def _clean_filename(filename: str) -> str:
    # Browsers and SDKs may send a full client-side path; keep the last component only.
    name = PureWindowsPath(PurePosixPath(filename or "").name).name.strip()
    if not name or name in (".", "..") or len(name) > _MAX_FILENAME or any(ord(c) < 32 for c in name):
        raise InvalidRequest(
            f"Invalid filename {filename!r}: give a plain name of 1-{_MAX_FILENAME} printable characters.",
            param="file",
        )
    return name


class FileStore:
    """Files of every tenant. Another tenant's file raises NotFound exactly like a missing one."""

    def __init__(self, client: redis.Redis, store: ObjectStore, *, max_upload_bytes: int) -> None:
        check_redis_client(client)
        self.redis = client
        self.store = store
        self.max_upload_bytes = max_upload_bytes

    def create_file(self, tenant_id: str, *, filename: str, purpose: str, content: bytes | IO[bytes]) -> FileObject:
        """Store an upload (bytes or a readable stream) and return its File object.

        The stream is hashed while it is written; past `max_upload_bytes` the write is abandoned and
        PayloadTooLarge raised, leaving nothing behind.
        """
        if purpose not in _PURPOSES:
            raise InvalidRequest(f"Invalid purpose {purpose!r}; lorafleet accepts 'fine-tune'.", param="purpose")
        name = _clean_filename(filename)
        file_id = "file-" + secrets.token_hex(12)
        object_key = file_object_key(tenant_id, file_id)
        if isinstance(content, bytes | bytearray):
            if len(content) > self.max_upload_bytes:
                raise PayloadTooLarge(
                    f"File is {len(content)} bytes, over the {self.max_upload_bytes}-byte upload limit.",
                    param="file",
                )
            self.store.put_bytes(object_key, bytes(content))
            size, digest = len(content), hashlib.sha256(content).hexdigest()
        else:
            reader = _CountingReader(content, self.max_upload_bytes)
            try:
                self.store.put_stream(object_key, reader)  # type: ignore[arg-type]
            except BaseException:
                self.store.delete(object_key)
                raise
            size, digest = reader.bytes, reader.sha256.hexdigest()
        if size == 0:
            self.store.delete(object_key)
            raise InvalidRequest("The uploaded file is empty.", param="file")
        record = FileObject(
            id=file_id,
            bytes=size,
            created_at=int(time.time()),
            filename=name,
            purpose=purpose,  # type: ignore[arg-type]
            sha256=digest,
            tenant_id=tenant_id,
        )
        pipe = self.redis.pipeline()
        pipe.set(keys.file(file_id), record.model_dump_json())
        pipe.zadd(keys.tenant_files(tenant_id), {file_id: time.time_ns() // 1_000_000})
        pipe.execute()
        return record

    def get_file(self, tenant_id: str, file_id: str) -> FileObject:
        raw = self.redis.get(keys.file(file_id)) if _FILE_ID_RE.fullmatch(file_id) else None
        record = FileObject.model_validate_json(raw) if raw else None
        if record is None or record.tenant_id != tenant_id:
            raise NotFound(f"No file with id {file_id!r}.", param="file_id")
        return record

    def list_files(
        self,
        tenant_id: str,
        *,
        purpose: str | None = None,
        after: str | None = None,
        limit: int = 10_000,
        order: Literal["asc", "desc"] = "desc",
    ) -> tuple[list[FileObject], bool]:
        """A tenant's files: (page, has_more), newest first by default; `after` = last id of the last page.

        Costs O(log n + page): the cursor's rank is looked up in the tenant's sorted set and only the
        ids of the page (one more, to tell `has_more`) are read, never the whole set.
        """
        if limit < 1:
            raise InvalidRequest(f"limit must be at least 1, got {limit}.", param="limit")
        key, desc = keys.tenant_files(tenant_id), order == "desc"
        start = 0
        if after is not None:
            rank = self.redis.zrevrank(key, after) if desc else self.redis.zrank(key, after)
            if rank is None:
                raise InvalidRequest(f"No file with id {after!r} to page after.", param="after")
            start = int(rank) + 1
        page: list[FileObject] = []
        while len(page) <= limit:
            ids = self.redis.zrange(key, start, start + limit, desc=desc)  # limit + 1 ids
            if not ids:
                break
            start += len(ids)
            for raw in self.redis.mget([keys.file(i) for i in ids]):
                record = FileObject.model_validate_json(raw) if raw is not None else None
                if record is not None and (purpose is None or record.purpose == purpose):
                    page.append(record)
                    if len(page) > limit:
                        break
        return page[:limit], len(page) > limit

    def set_status(self, tenant_id: str, file_id: str, status: FileStatus, details: str | None = None) -> FileObject:
        """Record the outcome of validating a file ("processed" or "error" with details)."""
        record = self.get_file(tenant_id, file_id)
        record = record.model_copy(update={"status": status, "status_details": details})
        self.redis.set(keys.file(file_id), record.model_dump_json())
        return record

    def delete_file(self, tenant_id: str, file_id: str) -> FileObject:
        """Delete a file's bytes and metadata; returns the record as it was."""
        record = self.get_file(tenant_id, file_id)
        self.store.delete(file_object_key(tenant_id, file_id))
        pipe = self.redis.pipeline()
        pipe.delete(keys.file(file_id))
        pipe.zrem(keys.tenant_files(tenant_id), file_id)
        pipe.execute()
        return record

    def content(self, tenant_id: str, file_id: str) -> bytes:
        """The whole file (small files; stream large ones with `iter_content`)."""
        self.get_file(tenant_id, file_id)
        return self.store.get_bytes(file_object_key(tenant_id, file_id))

    def iter_content(self, tenant_id: str, file_id: str) -> Iterator[bytes]:
        """The file as chunks, for streaming responses."""
        self.get_file(tenant_id, file_id)
        return self.store.iter_chunks(file_object_key(tenant_id, file_id))

    def open_content(self, tenant_id: str, file_id: str) -> BinaryIO:
        self.get_file(tenant_id, file_id)
        return self.store.open(file_object_key(tenant_id, file_id))

    def download(self, tenant_id: str, file_id: str, path: Path) -> FileObject:
        """Copy a file to local `path` and check its sha256; returns the record."""
        record = self.get_file(tenant_id, file_id)
        self.store.download_file(file_object_key(tenant_id, file_id), Path(path))
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != record.sha256:
            raise RuntimeError(
                f"File {file_id} in the object store does not match its recorded sha256 "
                f"({digest.hexdigest()} != {record.sha256}); the stored object was altered."
            )
        return record
