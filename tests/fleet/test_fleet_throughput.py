"""The measured training speed finished jobs leave in Redis for estimates: an EWMA per base model and accelerator."""

from __future__ import annotations

import pytest

from fleet.settings import Settings
from fleet.throughput import EWMA_WEIGHT, ThroughputStore, accelerator_kind, record_job_throughput


def test_the_first_job_sets_the_speed_and_later_ones_move_it_by_the_ewma_weight(r):
    store = ThroughputStore(r)
    assert store.get("cpu", "tiny-llama") is None
    first = store.record("cpu", "tiny-llama", tokens_per_s=800.0, workers=2)  # 400 per worker
    assert first.tokens_per_s_per_worker == 400.0 and first.jobs == 1 and first.updated_at > 0
    second = store.record("cpu", "tiny-llama", tokens_per_s=1000.0, workers=1)
    assert second.tokens_per_s_per_worker == pytest.approx((1 - EWMA_WEIGHT) * 400.0 + EWMA_WEIGHT * 1000.0)
    assert second.jobs == 2 and store.get("cpu", "tiny-llama") == second


def test_base_models_and_accelerator_kinds_are_kept_apart(r):
    store = ThroughputStore(r)
    store.record("GPU", "llama-8b", tokens_per_s=5000.0, workers=1)
    store.record("cpu", "llama-8b", tokens_per_s=50.0, workers=1)
    assert store.get("GPU", "llama-8b").tokens_per_s_per_worker == 5000.0
    assert store.get("cpu", "llama-8b").tokens_per_s_per_worker == 50.0
    assert store.get("GPU", "llama-70b") is None


def test_a_job_without_a_measured_speed_records_nothing(r, tmp_path):
    settings = Settings(redis_url="redis://unused", data_dir=tmp_path, use_gpu=True, accelerator_resource="H100")
    assert accelerator_kind(settings) == "H100"
    for speed in (None, 0.0):
        record_job_throughput(r, settings, "tiny-llama", tokens_per_s=speed, workers=1)
    assert ThroughputStore(r).get("H100", "tiny-llama") is None
    record_job_throughput(r, settings, "tiny-llama", tokens_per_s=300.0, workers=3)
    assert ThroughputStore(r).get("H100", "tiny-llama").tokens_per_s_per_worker == 100.0
    with pytest.raises(ValueError, match="positive speed"):
        ThroughputStore(r).record("H100", "tiny-llama", tokens_per_s=-1.0, workers=1)
