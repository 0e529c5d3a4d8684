"""A committed job whose completion fails (object store down) is handed back, not failed as training."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.registry import AdapterRegistry
from fleet.settings import Settings, make_object_store, make_redis
from workers.dispatcher import Dispatcher


def _adapter(path):
    path.mkdir()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": np.ones((2, 8), np.float32),
               f"{prefix}.lora_B.weight": np.zeros((8, 2), np.float32)}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}')
    return path


def test_a_failing_completion_hands_the_job_back_with_its_reason(redis_server, tmp_path):
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path / "var", lease_ms=1000, heartbeat_ms=200)
    jobs, store = JobStore(make_redis(settings)), make_object_store(settings)
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-gone").job  # nothing to train on
    first = jobs.leases.claim_next_job("dead-worker", lease_ms=60_000)

    def store_down(key, data):  # the manifest is the only put_bytes of a publish or a completion
        raise RuntimeError("object store unreachable")

    store.put_bytes = store_down
    registry = AdapterRegistry(make_redis(settings), store)
    with pytest.raises(RuntimeError):
        registry.publish_adapter_version("t1", "a", _adapter(tmp_path / "adapter"), {"base_model": "tiny-llama"},
                                         fence=first.fence)
    jobs.leases.requeue_expired_leases(now_ms=10**13)

    dispatcher = Dispatcher(settings, worker_id="next-attempt")
    real_put_bytes = dispatcher.registry.store.put_bytes
    dispatcher.registry.store.put_bytes = store_down
    dispatcher.step()
    handed_back = jobs.load_job(job.id)
    assert (handed_back.status, handed_back.attempt, handed_back.error) == (JobStatus.QUEUED, 2, None)
    assert "Completing the committed version failed: object store unreachable" in handed_back.last_failure

    dispatcher.registry.store.put_bytes = real_put_bytes  # the store is back
    dispatcher.step()
    done = jobs.load_job(job.id)
    assert (done.status, done.fine_tuned_model) == (JobStatus.SUCCEEDED, "a:v1")
