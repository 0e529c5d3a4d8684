"""End to end over real HTTP, real Redis, real Ray (CPU) and real dispatcher processes.

The OpenAI SDK drives the API; dispatchers run as separate `lorafleet worker` processes joined to the
test session's Ray cluster, so they can be killed like a crashed machine would be.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fleet.catalog import BaseModelSpec
from fleet.settings import Settings
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow

APIServer = Any  # tests/service/conftest.py's live server (fixtures `api_settings`, `start_api_server`)


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    return write_synthetic_splits(tmp_path / "data", n_train=160, n_val=24, seed=3)


class Dispatchers:
    """`lorafleet worker` processes for one API's settings, stopped (SIGKILL if need be) at teardown."""

    def __init__(self, settings: Settings, ray_address: str, log_dir: Path) -> None:
        self.settings, self.ray_address, self.log_dir = settings, ray_address, log_dir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str) -> subprocess.Popen:
        env = dict(os.environ)
        env.update(_settings_env(self.settings))
        env["LORAFLEET_RAY_ADDRESS"] = self.ray_address
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--worker-id", name],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _settings_env(settings: Settings) -> dict[str, str]:
    env = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is None:
            continue
        if name in ("admin_key", "s3_secret_access_key"):
            value = getattr(settings, name).get_secret_value()
        env[f"LORAFLEET_{name.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return env


@pytest.fixture
def e2e(tmp_path: Path, api_settings: Settings, tiny_model_dir: Path, ray_cluster: None,
        start_api_server: Callable[[Settings], APIServer]) -> Iterator[Callable[..., tuple[APIServer, Dispatchers]]]:
    import ray

    made: list[Dispatchers] = []

    def make(**overrides: Any) -> tuple[APIServer, Dispatchers]:
        tiny = BaseModelSpec(path=str(tiny_model_dir), quantization="nf4", max_rank=64)
        settings = Settings(**{
            **api_settings.model_dump(), "admin_key": api_settings.admin_key.get_secret_value(),
            "catalog": {"tiny-llama": tiny}, "lease_ms": 4000, "heartbeat_ms": 500,
            "max_upload_bytes": 64 * 1024 * 1024, **overrides,
        })
        server = start_api_server(settings)
        dispatchers = Dispatchers(settings, ray.get_runtime_context().gcs_address, tmp_path)
        made.append(dispatchers)
        return server, dispatchers

    yield make
    for dispatchers in made:
        dispatchers.stop_all()


def _wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 240.0, every_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def _create_job(client: Any, train_id: str, val_id: str | None, *, n_epochs: int, suffix: str) -> Any:
    return client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=train_id,
        validation_file=val_id,
        suffix=suffix,
        seed=11,
        method={"type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": n_epochs, "batch_size": 2}}},
        extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    )


def _finished(client: Any, job_id: str) -> Any:
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def _download_version(server: APIServer, api_key: str, ref: str, dest: Path) -> Path:
    name, version = ref.split(":")
    with server.client(api_key) as http:
        response = http.get(f"/v1/adapters/{name}/versions/{version}/download")
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:*") as archive:
        archive.extractall(dest, filter="data")
    manifests = list(dest.rglob("manifest.json"))
    return manifests[0].parent if manifests else next(p.parent for p in dest.rglob("adapter_config.json"))


def _assert_loads_in_ours_and_peft(adapter_dir: Path, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_core import load_adapter

    ids = torch.tensor([[1, 5, 9, 23, 42, 7, 3]])
    ours = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        ours_logits, peft_logits, base_logits = ours(ids).logits, theirs(ids).logits, base(ids).logits
    torch.testing.assert_close(ours_logits, peft_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours_logits, base_logits), "the trained adapter changes nothing"


def _assert_manifest_matches_files(version_dir: Path) -> dict:
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["files"], "manifest lists no files"
    for entry in manifest["files"]:
        data = (version_dir / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
        assert len(data) == entry["size"], entry["path"]
    return manifest


def test_openai_sdk_fine_tunes_cancels_and_publishes_a_loadable_version(e2e, synthetic, tiny_model_dir, tmp_path):
    server, dispatchers = e2e()
    tenant = server.create_tenant("team-e2e")
    client = server.openai(tenant.api_key)
    dispatchers.start("dispatcher-1")

    train_path, val_path = synthetic
    train = client.files.create(file=train_path.open("rb"), purpose="fine-tune")
    val = client.files.create(file=val_path.open("rb"), purpose="fine-tune")
    job = _create_job(client, train.id, val.id, n_epochs=2, suffix="reverser")
    assert job.status in ("queued", "running")

    done = _wait_for(lambda: _finished(client, job.id), f"job {job.id} to finish")
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "reverser:v1"
    assert done.trained_tokens and done.trained_tokens > 0
    # "auto" is replaced by the value the engine used.
    assert done.hyperparameters.n_epochs == 2 and done.hyperparameters.batch_size == 2
    assert isinstance(done.hyperparameters.learning_rate_multiplier, float)

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    messages = [e.message for e in events]
    assert any("training loss" in m for m in messages), messages
    assert any("successfully completed" in m for m in messages), messages
    assert any("pre-tokenized" in m for m in messages), messages  # the check's tokenization, not the rank's
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints, "no checkpoint was recorded"
    assert all(c.step_number > 0 for c in checkpoints)

    version_dir = _download_version(server, tenant.api_key, done.fine_tuned_model, tmp_path / "download")
    manifest = _assert_manifest_matches_files(version_dir)
    assert manifest["job_id"] == job.id and manifest["base_model"] == "tiny-llama"
    assert manifest["dataset"]["sha256"] == hashlib.sha256(train_path.read_bytes()).hexdigest()
    _assert_loads_in_ours_and_peft(version_dir, tiny_model_dir)

    # Naming a published version as the model continues training from it, into its next version.
    continued = client.fine_tuning.jobs.create(
        model="reverser:v1", training_file=train.id, seed=12,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
    )
    assert (continued.model_extra or {}).get("base_model") == "tiny-llama"
    done_again = _wait_for(lambda: _finished(client, continued.id), "the continued job to finish")
    assert done_again.status == "succeeded", done_again.error
    assert done_again.fine_tuned_model == "reverser:v2"
    v2_dir = _download_version(server, tenant.api_key, "reverser:v2", tmp_path / "download-v2")
    v2_manifest = _assert_manifest_matches_files(v2_dir)
    assert v2_manifest["parent"] == "reverser:v1" and v2_manifest["lora_config"]["r"] == 4
    _assert_loads_in_ours_and_peft(v2_dir, tiny_model_dir)

    # A second, longer job is cancelled mid-run: it stops and publishes nothing.
    long_job = _create_job(client, train.id, None, n_epochs=20, suffix="cancelled")
    _wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(long_job.id)).status == "running"
              and (j.model_extra or {}).get("progress", {}) and j.model_extra["progress"].get("step", 0) >= 1,
              "the long job to make progress")
    client.fine_tuning.jobs.cancel(long_job.id)
    cancelled = _wait_for(lambda: _finished(client, long_job.id), "the cancel to take effect", timeout_s=60)
    assert cancelled.status == "cancelled"
    assert cancelled.fine_tuned_model is None
    with server.client(tenant.api_key) as http:
        listed = http.get("/v1/adapters").json()["data"]
    assert [a["name"] for a in listed] == ["reverser"]


def _progress_step(client: Any, job_id: str) -> int:
    job = client.fine_tuning.jobs.retrieve(job_id)
    return ((job.model_extra or {}).get("progress") or {}).get("step", 0) if job.status == "running" else 0


def test_pause_resume_and_publish_to_s3(e2e, synthetic, s3_endpoint, tmp_path, tiny_model_dir):
    server, dispatchers = e2e(object_store="s3", s3_endpoint_url=s3_endpoint.endpoint_url,
                              s3_bucket=s3_endpoint.bucket, s3_prefix=f"e2e-{time.time_ns()}",
                              s3_access_key_id="test", s3_secret_access_key="test")
    tenant = server.create_tenant("team-s3")
    client = server.openai(tenant.api_key)
    dispatchers.start("dispatcher-s3")
    train_path, _ = synthetic
    train = client.files.create(file=train_path.open("rb"), purpose="fine-tune")
    job = _create_job(client, train.id, None, n_epochs=3, suffix="s3-adapter")

    _wait_for(lambda: _progress_step(client, job.id) >= 2, "the job to make progress")
    client.fine_tuning.jobs.pause(job.id)
    paused = _wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status == "paused" and j,
                       "the pause to take effect", timeout_s=60)
    paused_step = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    assert paused_step >= 2 and paused.fine_tuned_model is None
    client.fine_tuning.jobs.resume(job.id)

    done = _wait_for(lambda: _finished(client, job.id), f"job {job.id} to finish")
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert f"Resuming from the checkpoint at step {paused_step}." in messages, messages
    # Both attempts cleaned up after themselves: work dirs and Ray's checkpoint copies are gone (the
    # dispatcher's own owner.json, which says it is alive, stays while it runs).
    work = Path(server.settings.data_dir) / "work"
    leftovers = [p for p in work.rglob("*") if p.is_file() and p.name != "owner.json"]
    assert leftovers == [], leftovers

    keys = [o["Key"] for o in s3_endpoint.client().list_objects_v2(
        Bucket=s3_endpoint.bucket, Prefix=server.settings.s3_prefix)["Contents"]]
    assert any(k.endswith("/adapters/s3-adapter/v1/manifest.json") for k in keys), keys
    assert any("/adapters/s3-adapter/v1/" in k and k.endswith("/adapter_model.safetensors") for k in keys), keys
    version_dir = _download_version(server, tenant.api_key, done.fine_tuned_model, tmp_path / "download")
    _assert_manifest_matches_files(version_dir)
    _assert_loads_in_ours_and_peft(version_dir, tiny_model_dir)


def test_killed_dispatcher_job_is_taken_over_and_resumes_from_its_checkpoint(e2e, synthetic):
    server, dispatchers = e2e()
    tenant = server.create_tenant("team-kill")
    client = server.openai(tenant.api_key)
    first = dispatchers.start("dispatcher-doomed")
    train_path, _ = synthetic
    train = client.files.create(file=train_path.open("rb"), purpose="fine-tune")
    job = _create_job(client, train.id, None, n_epochs=6, suffix="survivor")

    _wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, "a first checkpoint")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    checkpoint_step = max(c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id).data)
    dispatchers.start("dispatcher-rescuer")

    done = _wait_for(lambda: _finished(client, job.id), "the rescued job to finish", timeout_s=300)
    assert done.status == "succeeded", done.error
    assert (done.model_extra or {}).get("attempt") == 2
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert any("Worker lost" in m for m in messages), messages
    resumed = [m for m in messages if m.startswith("Resuming from the checkpoint at step")]
    assert resumed and int(resumed[0].rsplit(" ", 1)[1].rstrip(".")) >= checkpoint_step, messages
    with server.client(tenant.api_key) as http:
        versions = http.get("/v1/adapters/survivor/versions").json()["data"]
    assert [v["version"] for v in versions] == [1], versions
