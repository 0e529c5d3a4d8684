"""Fixtures for fleet tests: a str-decoding Redis client, both object store backends, and a job hash as
the version before JobSpec wrote it."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from fleet import keys
from fleet.objectstore import LocalObjectStore, ObjectStore, S3ObjectStore
from fleet.queue import JobStore
from fleet.resources import Resources


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


# What the version before JobSpec wrote for a job created through the API (its to_redis_hash).
PRE_JOBSPEC_HYPERPARAMETERS = {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": 0.5}
_PRE_JOBSPEC_FIELDS = {
    "hyperparameters": json.dumps(PRE_JOBSPEC_HYPERPARAMETERS),
    "method": json.dumps({"type": "supervised", "supervised": {"hyperparameters": PRE_JOBSPEC_HYPERPARAMETERS}}),
    "lora": json.dumps({"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                        "use_rslora": True, "use_dora": False, "quantization": "nf4"}),
    "resources": json.dumps({"workers": 2, "gpus_per_worker": 1}),
    "priority": "high",
}


def write_pre_jobspec_job(jobs: JobStore, r: redis.Redis, **old_fields: str) -> str:
    """A queued job whose hash holds the dict fields a version before JobSpec wrote, and no `spec`."""
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-x", resources=Resources(gpus=2),
                          priority="high").job
    r.hdel(keys.job(job.id), "spec")
    r.hset(keys.job(job.id), mapping={**_PRE_JOBSPEC_FIELDS, **old_fields})
    return job.id
