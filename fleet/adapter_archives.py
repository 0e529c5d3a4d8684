"""Adapter archives: safe unpacking of an uploaded adapter (.zip/.tar/.tar.gz) and writing a version as one."""

from __future__ import annotations

import io
import lzma
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, Literal

from fleet.exceptions import InvalidRequest
from fleet.peft_format import PeftAdapterInfo

__all__ = ["unpack_adapter", "manifest_fields_from_peft", "write_folder_archive"]

_MAX_ARCHIVE_MEMBERS = 1000

# What zipfile/tarfile and their codecs raise for a malformed archive. zipfile raises RuntimeError for an
# encrypted member and NotImplementedError for an unknown compression method; corrupt compressed data
# surfaces as zlib.error / lzma.LZMAError (bz2 and gzip raise OSError / EOFError).
_UNREADABLE_ARCHIVE_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    zlib.error,
    lzma.LZMAError,
)


def unpack_adapter(source: Path, tmp_dir: Path, max_bytes: int) -> Path:
    """The adapter root of `source` (a directory, or an archive extracted into `tmp_dir`, at most
    `max_bytes` expanded): the folder holding adapter_config.json. Not yet validated as PEFT.
    """
    adapter_dir = source if source.is_dir() else _extract_archive(source, tmp_dir, max_bytes)
    return _find_adapter_root(adapter_dir)


def manifest_fields_from_peft(info: PeftAdapterInfo) -> dict[str, Any]:
    """The manifest fields an imported adapter's own adapter_config.json supplies."""
    return {"base_model": info.base_model_name_or_path, "lora_config": info.config}


def write_folder_archive(
    out: BinaryIO,
    fmt: Literal["tar.gz", "zip"],
    folder: str,
    files: Sequence[tuple[str, int]],
    open_file: Callable[[str], BinaryIO],
    extra_files: Mapping[str, bytes],
    *,
    mtime: int,
) -> str:
    """Write one folder "<folder>/" to `out`: each (path, size) of `files`, read via `open_file(path)`,
    then `extra_files` (path → bytes). Returns the archive's file name "<folder>.<fmt>".
    """
    if fmt == "tar.gz":
        with tarfile.open(fileobj=out, mode="w:gz") as tar:
            for rel, size in files:
                with open_file(rel) as stream:
                    _add_to_tar(tar, f"{folder}/{rel}", size, mtime, stream)
            for rel, data in extra_files.items():
                _add_to_tar(tar, f"{folder}/{rel}", len(data), mtime, io.BytesIO(data))
    elif fmt == "zip":
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for rel, _ in files:
                with open_file(rel) as stream, zf.open(f"{folder}/{rel}", "w") as dst:
                    shutil.copyfileobj(stream, dst, 1024 * 1024)
            for rel, data in extra_files.items():
                zf.writestr(f"{folder}/{rel}", data)
    else:
        raise InvalidRequest(f"Unknown archive format {fmt!r}; use 'tar.gz' or 'zip'.", param="format")
    return f"{folder}.{fmt}"


def _add_to_tar(tar: tarfile.TarFile, name: str, size: int, mtime: int, stream: BinaryIO) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    tar.addfile(info, stream)


def _find_adapter_root(path: Path) -> Path:
    """The directory holding adapter_config.json: `path` itself or its single subdirectory."""
    if (path / "adapter_config.json").is_file():
        return path
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    if len(children) == 1 and children[0].is_dir() and (children[0] / "adapter_config.json").is_file():
        return children[0]
    raise InvalidRequest(
        "No adapter_config.json found at the top of the adapter (or in its single top-level folder).",
        param="adapter",
    )


def _write_member(target: Path, src: IO[bytes]) -> None:
    """Copy one archive member (already checked for path and size) to `target`, closing `src`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with src, open(target, "wb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)


def _extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Extract a .zip/.tar(.gz) safely: regular files only, no absolute or '..' paths, size-capped."""

    count = 0

    def check(member_name: str, size: int, total: int) -> None:
        nonlocal count
        count += 1
        if count > _MAX_ARCHIVE_MEMBERS:
            raise InvalidRequest(
                f"Archive holds more than {_MAX_ARCHIVE_MEMBERS} files; an adapter has a handful.", param="adapter"
            )
        parts = Path(member_name).parts
        if member_name.startswith(("/", "\\")) or ".." in parts or "\\" in member_name:
            raise InvalidRequest(f"Archive member {member_name!r} has an unsafe path.", param="adapter")
        if total + size > max_bytes:
            raise InvalidRequest(f"Archive expands to more than {max_bytes} bytes.", param="adapter")

    total = 0
    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if info.is_dir():
                        continue
                    if info.flag_bits & 0x1:
                        raise InvalidRequest(
                            f"Adapter archive {archive.name!r} is encrypted (member {info.filename!r}); upload it "
                            "without a password.",
                            param="adapter",
                        )
                    check(info.filename, info.file_size, total)
                    total += info.file_size
                    _write_member(dest / info.filename, zf.open(info))
        elif name.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise InvalidRequest(
                            f"Archive member {member.name!r} is a link or special file; only regular files "
                            "are accepted.",
                            param="adapter",
                        )
                    check(member.name, member.size, total)
                    total += member.size
                    src = tar.extractfile(member)
                    assert src is not None  # a regular file, checked above
                    _write_member(dest / member.name, src)
        else:
            raise InvalidRequest(
                f"Unsupported adapter archive {archive.name!r}; upload a .zip, .tar or .tar.gz.",
                param="adapter",
            )
    except _UNREADABLE_ARCHIVE_ERRORS as e:
        raise InvalidRequest(f"Adapter archive {archive.name!r} is unreadable: {e}.", param="adapter") from e
    return dest
