"""Fixtures for fleet tests: a str-decoding Redis client and both object store backends."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fleet.objectstore import LocalObjectStore, ObjectStore, S3ObjectStore


@pytest.fixture
def r(redis_server) -> Iterator[redis.Redis]:
    client = redis_server.client(decode_responses=True)
    yield client
    client.close()


@pytest.fixture(params=["local", "s3"])
def object_store(request, tmp_path: Path) -> ObjectStore:
    """Each test using this runs once per backend: local filesystem and S3 (moto server over HTTP)."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    s3 = request.getfixturevalue("s3_endpoint")
    # a fresh prefix per test keeps tests independent in the shared session bucket
    return S3ObjectStore(bucket=s3.bucket, prefix=f"test-{secrets.token_hex(6)}", client=s3.client())
