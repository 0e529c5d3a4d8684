"""Importing an adapter: a failed import leaves no trace, not even a used-up version number."""

from __future__ import annotations

import secrets

import pytest

from fleet.objectstore import LocalObjectStore, S3ObjectStore
from fleet.registry import AdapterRegistry
from tests.service.conftest import write_peft_adapter


def _store_that_fails_then_recovers(kind: str, request, tmp_path):
    """(a real store whose writes fail, and a function that makes them work): a local store whose
    "tenants" directory is a file, or an S3 bucket not created yet."""
    if kind == "local":
        store = LocalObjectStore(tmp_path / "objects")
        blocker = tmp_path / "objects" / "tenants"
        blocker.write_text("not a directory")
        return store, blocker.unlink
    s3 = request.getfixturevalue("s3_endpoint")
    bucket = f"not-yet-{secrets.token_hex(4)}"
    return S3ObjectStore(bucket=bucket, client=s3.client()), lambda: s3.client().create_bucket(Bucket=bucket)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_failed_import_leaves_the_next_version_number_unchanged(r, request, tmp_path, kind):
    store, recover = _store_that_fails_then_recovers(kind, request, tmp_path)
    registry = AdapterRegistry(r, store)
    adapter = write_peft_adapter(tmp_path / "adapter")
    for _ in range(2):
        with pytest.raises(Exception):  # noqa: B017 - whatever the backend raises for a failed write
            registry.import_adapter("tenant-1", "mine", adapter)
    recover()
    assert registry.import_adapter("tenant-1", "mine", adapter).version == 1
    assert registry.import_adapter("tenant-1", "mine", adapter).version == 2
    assert [v.version for v in registry.list_versions("tenant-1", "mine")] == [2, 1]
