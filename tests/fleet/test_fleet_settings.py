"""Settings from the environment, the base model catalog, and the pure fair-share formulas."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fleet.catalog import Catalog, read_catalog_file
from fleet.exceptions import InvalidRequest
from fleet.fair_share import BORROWING, RECLAIMING, WITHIN_NOMINAL, decayed_usage, share, tier
from fleet.objectstore import LocalObjectStore, S3ObjectStore
from fleet.quotas import TenantQuota
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


def test_decayed_usage_composes_exactly_so_updates_only_on_usage_changes():
    h = 1000.0
    one_step = decayed_usage(8.0, 0, 2, 3000, h)
    two_steps = decayed_usage(decayed_usage(8.0, 0, 2, 1000, h), 1000, 2, 3000, h)
    assert one_step == pytest.approx(two_steps) == pytest.approx(2 + 6 / 8)
    # the recurrence consumed <- (1 - a) consumed + a current, a = 1 - 0.5^(dt/H), step by step
    consumed = 8.0
    for _ in range(3):
        alpha = 1 - 0.5 ** (1000 / h)
        consumed = (1 - alpha) * consumed + alpha * 2
    assert consumed == pytest.approx(one_step)
    assert decayed_usage(8.0, 0, 2, 3000, 0) == 2  # half-life 0: current usage only


def test_tiers_follow_nominal_and_borrowing_limit():
    q = TenantQuota(nominal_gpus=4, borrowing_limit_gpus=2)
    assert tier(q, 0, 4) == WITHIN_NOMINAL
    assert tier(q, 2, 3) == RECLAIMING  # starts below nominal, ends borrowing
    assert tier(q, 4, 2) == BORROWING
    assert tier(q, 4, 3) is None  # over nominal + borrowing limit
    assert tier(TenantQuota(), 0, 64) == BORROWING  # no nominal, no limit: borrows idle capacity
    assert share(q, 6) == 2 and share(TenantQuota(nominal_gpus=4, weight=2), 8) == 2 and share(q, 3) == 0
