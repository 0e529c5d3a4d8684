"""Object storage: the `ObjectStore` Protocol and its two backends, local filesystem and S3.

Keys are "/"-separated relative paths ("tenants/<tid>/files/<id>"). A key with an empty segment,
".", "..", a backslash or a leading "/" is rejected with InvalidRequest, so no backend can be led
outside its root. Missing objects raise NotFound.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, runtime_checkable

from fleet.exceptions import InvalidRequest, NotFound

__all__ = ["ObjectStore", "LocalObjectStore", "S3ObjectStore", "validate_key"]

log = logging.getLogger(__name__)
_CHUNK = 1024 * 1024


def validate_key(key: str) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidRequest."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise InvalidRequest(f"Invalid object key {key!r}: must be a relative path without '\\' or NUL.")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidRequest(f"Invalid object key {key!r}: empty, '.' and '..' segments are not allowed.")
    return key


@runtime_checkable
class ObjectStore(Protocol):
    """Where bytes live (uploaded files, checkpoints, adapter versions)."""

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def put_stream(self, key: str, stream: IO[bytes]) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def open(self, key: str) -> BinaryIO:
        """A readable binary stream of the object; the caller closes it."""
        ...

    def iter_chunks(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix` (a "directory" prefix, e.g. "tenants/t1/files/"), sorted."""
        ...

    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error."""
        ...

    def size(self, key: str) -> int: ...


def _iter_stream(stream: IO[bytes], chunk_size: int) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(chunk_size):
            yield chunk


class LocalObjectStore:
    """Objects as files under `root`; every write goes to a temp file then an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidRequest(f"Invalid object key {key!r}: it leaves the store's root.")
        return path

    def _write(self, key: str, write: Any) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                write(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda out: out.write(data))

    def put_file(self, key: str, path: Path) -> None:
        def copy(out: BinaryIO) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, _CHUNK)

        self._write(key, copy)

    def put_stream(self, key: str, stream: IO[bytes]) -> None:
        self._write(key, lambda out: shutil.copyfileobj(stream, out, _CHUNK))

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except (FileNotFoundError, IsADirectoryError) as e:
            raise NotFound(f"No object {key!r} in {self!r}.") from e

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def download_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.open(key) as src, open(path, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)

    def iter_chunks(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        return _iter_stream(self.open(key), chunk_size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix if prefix else self.root
        # a prefix may end mid-name ("files/fi"): walk its directory and filter by the string prefix
        start = base if prefix.endswith("/") or not prefix else base.parent
        if not start.resolve().is_relative_to(self.root) or not start.is_dir():
            return []
        found = []
        for path in start.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError as e:
            raise NotFound(f"No object {key!r} in {self!r}.") from e


class S3ObjectStore:
    """Objects in an S3 bucket under `prefix` (MinIO, moto or AWS via `endpoint_url`).

    Credentials are given explicitly or come from boto3's usual chain (AWS_ACCESS_KEY_ID/..., instance profile).
    A single PUT is atomic in S3, so readers never see half an object.
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        client: Any = None,
    ) -> None:
        import boto3

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
        )

    def __repr__(self) -> str:
        return f"S3ObjectStore(s3://{self.bucket}/{self.prefix})"

    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _not_found(self, key: str, error: Exception) -> Exception:
        from botocore.exceptions import ClientError

        if isinstance(error, ClientError):
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return NotFound(f"No object {key!r} in {self!r}.")
        return error

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(str(path), self.bucket, self._key(key))

    def put_stream(self, key: str, stream: IO[bytes]) -> None:
        self.client.upload_fileobj(stream, self.bucket, self._key(key))

    def open(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as e:
            raise self._not_found(key, e) from e
        return response["Body"]

    def get_bytes(self, key: str) -> bytes:
        body = self.open(key)
        try:
            return body.read()
        finally:
            body.close()

    def download_file(self, key: str, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except Exception as e:
            raise self._not_found(key, e) from e

    def iter_chunks(self, key: str, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        return _iter_stream(self.open(key), chunk_size)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except NotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        found = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            for obj in page.get("Contents", []):
                found.append(obj["Key"][len(self.prefix) :])
        return sorted(found)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as e:
            raise self._not_found(key, e) from e
