"""Settings from the environment, the base model catalog, and the pure claim policy."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fleet.catalog import Catalog, read_catalog_file
from fleet.exceptions import InvalidRequest
from fleet.objectstore import LocalObjectStore, S3ObjectStore
from fleet.scheduling import QueueSnapshot, TenantQueue, estimate_queue_position, round_robin
from fleet.settings import Settings, load_catalog, make_object_store, make_redis


def test_settings_read_the_lorafleet_environment(monkeypatch, tmp_path):
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text(
        json.dumps({"from-file": {"path": "/models/a", "max_rank": 16}, "tiny-llama": {"path": "/old"}})
    )
    monkeypatch.setenv("LORAFLEET_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("LORAFLEET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("LORAFLEET_LEASE_MS", "9000")
    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "s3cret")
    monkeypatch.setenv("LORAFLEET_CATALOG_FILE", str(catalog_file))
    monkeypatch.setenv(
        "LORAFLEET_CATALOG", json.dumps({"tiny-llama": {"path": "/models/tiny", "quantization": "none"}})
    )
    settings = Settings()
    assert settings.redis_url == "redis://example:6380/2" and settings.lease_ms == 9000
    assert settings.admin_key.get_secret_value() == "s3cret"
    catalog = load_catalog(settings)
    assert catalog.names() == ["from-file", "tiny-llama"]
    assert catalog.get("tiny-llama").path == "/models/tiny"  # inline entries win
    store = make_object_store(settings)
    assert isinstance(store, LocalObjectStore) and store.root == (tmp_path / "data" / "objects").resolve()
    assert make_redis(settings).connection_pool.connection_kwargs["decode_responses"] is True


def test_inconsistent_settings_fail_with_every_reason(monkeypatch):
    with pytest.raises(ValidationError, match="heartbeat_ms.*s3_bucket|S3_BUCKET"):
        Settings(heartbeat_ms=20_000, lease_ms=15_000, object_store="s3")


def test_s3_settings_build_an_s3_store(s3_endpoint):
    settings = Settings(
        object_store="s3",
        s3_bucket=s3_endpoint.bucket,
        s3_endpoint_url=s3_endpoint.endpoint_url,
        s3_prefix="prod",
    )
    store = make_object_store(settings)
    assert isinstance(store, S3ObjectStore)
    store.put_bytes("k", b"v")
    assert s3_endpoint.client().get_object(Bucket=s3_endpoint.bucket, Key="prod/k")["Body"].read() == b"v"


def test_catalog_errors_list_available_models_and_rank_limits(tmp_path):
    catalog = Catalog({"tiny-llama": {"path": "/m", "max_rank": 16}, "llama-8b": {"path": "meta/x"}})
    with pytest.raises(InvalidRequest, match="llama-8b, tiny-llama") as err:
        catalog.get("gpt-5")
    assert err.value.param == "model"
    catalog.check_rank("tiny-llama", 16)
    with pytest.raises(InvalidRequest, match="maximum rank 16"):
        catalog.check_rank("tiny-llama", 32)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"a": {"max_rank": 0}, "b": {"path": "/b", "quantization": "fp3"}}))
    with pytest.raises(ValueError) as err:
        read_catalog_file(bad)
    assert "a.path" in str(err.value) and "a.max_rank" in str(err.value) and "b.quantization" in str(err.value)


def _snap(lengths: dict[str, int], cursor=None) -> QueueSnapshot:
    return QueueSnapshot(tenants=[TenantQueue(t, f"{t}-head", n) for t, n in sorted(lengths.items())], cursor=cursor)


def test_round_robin_serves_the_tenant_after_the_cursor_and_wraps():
    assert round_robin(_snap({})) is None
    assert round_robin(_snap({"a": 1, "b": 1, "c": 1})) == "a"
    assert round_robin(_snap({"a": 1, "b": 1, "c": 1}, cursor="a")) == "b"
    assert round_robin(_snap({"a": 1, "c": 1}, cursor="b")) == "c"  # cursor tenant has drained
    assert round_robin(_snap({"a": 1, "b": 1}, cursor="b")) == "a"


def test_queue_position_estimate_interleaves_tenants():
    snap = _snap({"a": 3, "b": 1, "c": 2}, cursor=None)
    # claim order a0 b0 c0 a1 c1 a2
    assert [estimate_queue_position(snap, "a", i) for i in range(3)] == [1, 4, 6]
    assert estimate_queue_position(snap, "b", 0) == 2
    assert [estimate_queue_position(snap, "c", i) for i in range(2)] == [3, 5]
