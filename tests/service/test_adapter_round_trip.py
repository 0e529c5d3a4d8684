"""One set of rules for adapter files: what lora_core saves, the API imports, and a job continues from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from fleet.queue import JobStore
from fleet.registry import AdapterRegistry
from fleet.settings import make_object_store, make_redis
from lora_core import LoraConfig, apply_lora, read_adapter_config, save_adapter
from tests.service.conftest import make_api_settings, tar_gz_of, write_peft_adapter
from workers.dispatcher import build_training_spec
from workers.loop import train
from workers.reporting import ListReporter
from workers.synthetic import write_synthetic_dataset


@pytest.mark.slow
def test_an_all_linear_adapter_saved_by_lora_core_imports_and_trains_further(
    tiny_model_dir, tmp_path, redis_server, start_api_server
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    saved = save_adapter(model, tmp_path / "mine", base_model_name_or_path="tiny-llama")
    saved_targets = json.loads((saved / "adapter_config.json").read_text())["target_modules"]
    assert any("." in t for t in saved_targets)  # full module paths, as save_adapter writes for all-linear

    settings = make_api_settings(tmp_path, redis_server.url, model_dir=tiny_model_dir)
    server = start_api_server(settings)
    tenant = server.create_tenant("roundtrip")
    dataset = write_synthetic_dataset(tmp_path / "train.jsonl", 16, seed=0)
    with server.client(tenant.api_key) as c:
        imported = c.post("/v1/adapters", data={"name": "mine"},
                          files={"file": ("mine.tar.gz", tar_gz_of(saved), "application/gzip")})
        assert imported.status_code == 200, imported.text
        assert imported.json()["id"] == "mine:v1"
        uploaded = c.post("/v1/files", data={"purpose": "fine-tune"},
                          files={"file": ("train.jsonl", dataset.read_bytes())})
        assert uploaded.status_code == 200, uploaded.text
        created = c.post("/v1/fine_tuning/jobs", json={
            "model": "mine:v1", "training_file": uploaded.json()["id"],
            "hyperparameters": {"n_epochs": 1, "batch_size": 4}})
        assert created.status_code == 200, created.text

    # Continue training as a dispatcher does: the job's LoRA block, the version's files as init_adapter.
    client = make_redis(settings)
    try:
        job = JobStore(client).get_job(tenant.id, created.json()["id"])
        init = AdapterRegistry(client, make_object_store(settings)).download_version(
            tenant.id, job.init_adapter, tmp_path / "work" / "init")
    finally:
        client.close()
    spec = build_training_spec(job, base_model=tiny_model_dir, quantization=None, work_dir=tmp_path / "work",
                               training_file=dataset, validation_file=None, init_adapter=init)
    spec = spec.model_copy(update={
        "hyperparameters": spec.hyperparameters.model_copy(update={"max_steps": 1}), "n_checkpoints": 0})
    result = train(spec, output_dir=tmp_path / "work" / "out", reporter=ListReporter())
    assert result.status == "succeeded", result
    assert read_adapter_config(result.adapter_dir).target_modules == read_adapter_config(saved).target_modules


@pytest.mark.parametrize("field, value", [("rank_pattern", {"q_proj": 2}), ("alpha_pattern", {"q_proj": 4}),
                                          ("modules_to_save", ["lm_head"]), ("bias", "all")])
def test_import_refuses_what_lora_core_would_refuse_later(api_server, tenant_a, tmp_path, field, value):
    adapter = write_peft_adapter(tmp_path / "patterned")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
    with api_server.client(tenant_a.api_key) as c:
        r = c.post("/v1/adapters", data={"name": "patterned"},
                   files={"file": ("patterned.tar.gz", tar_gz_of(adapter), "application/gzip")})
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"]
        assert c.get("/v1/adapters").json()["data"] == []


def test_the_api_imports_the_adapter_rules_without_torch():
    code = ("import sys, service.app, fleet.peft_format, lora_core.adapter_config; "
            "heavy = [m for m in ('torch', 'transformers', 'ray') if m in sys.modules]; "
            "assert not heavy, heavy")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
