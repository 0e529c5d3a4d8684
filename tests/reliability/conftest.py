"""Fault injection over real processes: redis-server, Ray, uvicorn and `lorafleet worker` dispatchers.

Reuses the service fixtures (tests/service/conftest.py) and the end-to-end dispatcher processes
(tests/service/test_end_to_end.py). Fixtures here:
- `fleet_stack(**overrides) -> Stack`: an API server (uvicorn in a thread) on the `redis_server`
  fixture with the tiny model, short leases (lease_ms 3000, heartbeat_ms 250), a tenant and its
  OpenAI client, an uploaded synthetic training file; `start_dispatcher(name, **setting_overrides)`
  starts a `lorafleet worker` process (all stopped at teardown, SIGKILL if need be).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.catalog import BaseModelSpec
from fleet.settings import Settings
from tests.service.conftest import APIServer, Tenant, make_api_settings, start_api_server  # noqa: F401
from tests.service.test_end_to_end import Dispatchers
from workers.synthetic import write_synthetic_splits

LEASE_MS = 3000
HEARTBEAT_MS = 250


@dataclass
class Stack:
    """One test's service: API, tenant, OpenAI client, an uploaded training file, dispatcher processes."""

    server: APIServer
    settings: Settings
    tenant: Tenant
    client: Any
    training_file_id: str
    ray_address: str
    log_dir: Path
    groups: list[Dispatchers]

    def start_dispatcher(self, name: str, **overrides: Any) -> Any:
        """A `lorafleet worker` process with this stack's settings (and `overrides`); returns its Popen."""
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        group = Dispatchers(settings, self.ray_address, self.log_dir)
        self.groups.append(group)
        return group.start(name)

    def create_job(self, *, n_epochs: int = 1, suffix: str | None = None, training_file: str | None = None,
                   **extra: Any) -> Any:
        return self.client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=training_file or self.training_file_id, suffix=suffix, seed=7,
            method={"type": "supervised",
                    "supervised": {"hyperparameters": {"n_epochs": n_epochs, "batch_size": 2}}},
            extra_body={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}, **extra,
        )

    def job(self, job_id: str) -> Any:
        return self.client.fine_tuning.jobs.retrieve(job_id)

    def messages(self, job_id: str) -> list[str]:
        """Every event message of the job, newest first (the SDK pages through all of them)."""
        return [e.message for e in self.client.fine_tuning.jobs.list_events(job_id, limit=100)]

    def checkpoint_steps(self, job_id: str) -> list[int]:
        return [c.step_number for c in self.client.fine_tuning.jobs.checkpoints.list(job_id).data]

    def versions(self, name: str) -> list[int]:
        with self.server.client(self.tenant.api_key) as http:
            response = http.get(f"/v1/adapters/{name}/versions")
        return [v["version"] for v in response.json()["data"]] if response.status_code == 200 else []


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 240.0, every_s: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@pytest.fixture
def fleet_stack(tmp_path: Path, redis_server: Any, tiny_model_dir: Path, ray_cluster: None,
                start_api_server: Callable[[Settings], APIServer]) -> Iterator[Callable[..., Stack]]:  # noqa: F811
    import ray

    made: list[Dispatchers] = []
    n_stacks = 0

    def make(*, n_train: int = 48, **overrides: Any) -> Stack:
        tiny = BaseModelSpec(path=str(tiny_model_dir), quantization="none", max_rank=64)
        # Co-training off unless a test asks for it: test_process_faults.py maps each of three dispatchers to
        # the one job it took, and test_cancel_pause_phases.py walks the phases of a job alone. The same
        # faults under co-training groups are test_group_faults.py's (co_training_max_group=4).
        overrides.setdefault("co_training_max_group", 1)
        settings = make_api_settings(
            tmp_path, redis_server.url, catalog={"tiny-llama": tiny}, lease_ms=LEASE_MS,
            heartbeat_ms=HEARTBEAT_MS, max_upload_bytes=64 * 1024 * 1024, **overrides)
        server = start_api_server(settings)
        nonlocal n_stacks
        n_stacks += 1
        tenant = server.create_tenant(f"team-{n_stacks}")
        client = server.openai(tenant.api_key)
        train, _ = write_synthetic_splits(tmp_path / f"data-{n_stacks}", n_train=n_train, n_val=4, seed=3)
        uploaded = client.files.create(file=train.open("rb"), purpose="fine-tune")
        return Stack(server, settings, tenant, client, uploaded.id, ray.get_runtime_context().gcs_address,
                     tmp_path, made)

    yield make
    for dispatchers in made:
        dispatchers.stop_all()
