"""A running API server over real HTTP (uvicorn in a thread) on a real redis-server, for service and e2e tests.

Fixtures:
- `api_settings`: Settings for a server on the `redis_server` fixture, data under tmp_path, a small
  upload limit, the operator key `OPERATOR_KEY` and a catalog with "tiny-llama" (a Llama config.json
  only: the API never loads weights). Override fields with `make_api_settings(...)`.
- `start_api_server(settings) -> APIServer`: start one (stopped at the end of the test).
- `api_server`: a server on `api_settings`.
- `tenant_a`, `tenant_b`: tenants created through the admin API, each with a raw API key.
- `dataset_path` (a valid 12-example chat dataset), `make_chat_dataset(name, n)` (factory).
- `peft_adapter_dir` (a small, structurally complete PEFT LoRA adapter), `peft_adapter_archive` (its .tar.gz).
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.settings import Settings
from service.server import make_server

OPERATOR_KEY = "lf-operator-test-key"
TEST_UPLOAD_LIMIT = 256 * 1024


@dataclass
class Tenant:
    """A tenant created through the admin API, with its first (admin-role) key."""

    id: str
    name: str
    api_key: str
    key_id: str


@dataclass
class APIServer:
    """A live API: `url` (no trailing slash), the settings it runs with, and client helpers."""

    url: str
    settings: Settings
    operator_key: str | None

    def client(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0)

    def admin(self) -> httpx.Client:
        return self.client(self.operator_key)

    def openai(self, api_key: str) -> Any:
        """The official OpenAI SDK pointed at this server (no retries, so failures surface at once)."""
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30.0)

    def create_tenant(self, name: str) -> Tenant:
        with self.admin() as admin:
            response = admin.post("/v1/admin/tenants", json={"name": name})
        assert response.status_code == 200, response.text
        body = response.json()
        return Tenant(id=body["id"], name=body["name"], api_key=body["api_key"], key_id=body["key_id"])


def write_tiny_llama_config(directory: Path) -> Path:
    """A catalog entry's directory holding only config.json (all the API reads of a base model)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def make_api_settings(tmp_path: Path, redis_url: str, *, model_dir: Path | None = None, **overrides: Any) -> Settings:
    """Settings for a test server: local object store under tmp_path, operator key, "tiny-llama" catalog."""
    model_dir = model_dir or write_tiny_llama_config(tmp_path / "tiny-llama")
    fields: dict[str, Any] = {
        "redis_url": redis_url,
        "data_dir": tmp_path / "var",
        "admin_key": OPERATOR_KEY,
        "max_upload_bytes": TEST_UPLOAD_LIMIT,
        "catalog": {"tiny-llama": {"path": str(model_dir), "quantization": "nf4", "max_rank": 64}},
    }
    fields.update(overrides)
    return Settings(**fields)


def write_chat_dataset(path: Path, n: int = 12) -> Path:
    """A valid OpenAI chat-format dataset of `n` examples."""
    lines = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": f"What is {i} + {i}?"},
            {"role": "assistant", "content": f"{2 * i}"},
        ]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _serve_in_thread(settings: Settings) -> tuple[Any, threading.Thread, str]:
    server = make_server(settings, host="127.0.0.1", port=0, log_level="warning")
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the API server thread exited during start-up (see the log above)")
        if time.monotonic() > deadline:
            raise TimeoutError("the API server did not start within 30 s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture
def start_api_server(redis_server: Any) -> Iterator[Callable[[Settings], APIServer]]:
    """Factory: start an API server for given settings; every server started is stopped at teardown.

    It depends on `redis_server` so that Redis outlives the servers: a server stopping after Redis is
    gone spends ~15 s in its clients' outage retries (the webhook deliverer leaving its group)."""
    running: list[tuple[Any, threading.Thread]] = []

    def start(settings: Settings) -> APIServer:
        server, thread, url = _serve_in_thread(settings)
        running.append((server, thread))
        key = settings.admin_key.get_secret_value() if settings.admin_key else None
        return APIServer(url=url, settings=settings, operator_key=key)

    yield start
    for server, _ in running:
        server.should_exit = True
    for _, thread in running:
        thread.join(timeout=15)


@pytest.fixture
def api_settings(tmp_path: Path, redis_server: Any) -> Settings:
    return make_api_settings(tmp_path, redis_server.url)


@pytest.fixture
def api_server(api_settings: Settings, start_api_server: Callable[[Settings], APIServer]) -> APIServer:
    return start_api_server(api_settings)


@pytest.fixture
def tenant_a(api_server: APIServer) -> Tenant:
    return api_server.create_tenant("team-a")


@pytest.fixture
def tenant_b(api_server: APIServer) -> Tenant:
    return api_server.create_tenant("team-b")


@pytest.fixture
def dataset_path(tmp_path: Path) -> Path:
    return write_chat_dataset(tmp_path / "train.jsonl", 12)


@pytest.fixture
def make_chat_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `make_chat_dataset(name="train.jsonl", n=12)` writes a valid chat dataset under tmp_path."""

    def make(name: str = "train.jsonl", n: int = 12) -> Path:
        return write_chat_dataset(tmp_path / name, n)

    return make


def write_peft_adapter(directory: Path, *, r: int = 4, hidden: int = 16, seed: int = 0) -> Path:
    """A small PEFT LoRA adapter directory (q_proj and v_proj of two layers), as PEFT saves one."""
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((r, hidden)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((hidden, r)).astype(np.float32)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
              "base_model_name_or_path": "tiny-llama", "lora_dropout": 0.0, "bias": "none",
              "task_type": "CAUSAL_LM"}
    (directory / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def tar_gz_of(directory: Path) -> bytes:
    """`directory` as a .tar.gz holding one top-level folder of the same name."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    return buffer.getvalue()


@pytest.fixture
def peft_adapter_dir(tmp_path: Path) -> Path:
    return write_peft_adapter(tmp_path / "my-adapter")


@pytest.fixture
def peft_adapter_archive(peft_adapter_dir: Path) -> bytes:
    return tar_gz_of(peft_adapter_dir)
