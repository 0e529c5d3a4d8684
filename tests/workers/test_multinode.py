"""Nodes share nothing but the object store: training runs on other Ray nodes than the dispatcher's.

A real cluster of three `ray start` node processes (tests/cluster.py, the `ray_nodes` fixture): a head
without the `trainer` resource, where the dispatcher's driver attaches, and two worker nodes with one
`trainer` each, so a job's two ranks run one per worker node. Every node has its own TMPDIR; the
dispatcher is a `lorafleet worker` process with its own data dir; the object store is S3 (moto), which
also holds Ray Train's persistent storage. Every Python process of a worker node records the paths it
touches (tests/file_audit.py): none may lie under the test's directory, which holds the dispatcher's
and the API's data dirs and the uploaded datasets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.catalog import BaseModelSpec
from fleet.resources import Resources
from fleet.settings import Settings
from tests.service.conftest import APIServer, make_api_settings, start_api_server, tar_gz_of  # noqa: F401
from tests.service.test_end_to_end import Dispatchers
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass
class NodeStack:
    """An API, a tenant's OpenAI client with a training and a validation file, one dispatcher process
    attached to the multi-node cluster, all on the S3 object store under `prefix`."""

    dir: Path
    server: APIServer
    api_key: str
    client: Any
    files: tuple[str, str]
    dispatcher_dir: Path
    prefix: str
    s3: Any

    def finished(self, job_id: str) -> Any:
        job = self.client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in ("succeeded", "failed", "cancelled") else None

    def messages(self, job_id: str) -> list[str]:
        return [e.message for e in self.client.fine_tuning.jobs.list_events(job_id, limit=100)]

    def s3_keys(self, under: str) -> list[str]:
        listed = self.s3.client().list_objects_v2(Bucket=self.s3.bucket, Prefix=self.prefix + under)
        return [o["Key"] for o in listed.get("Contents", [])]


@pytest.fixture
def node_stack(tmp_path: Path, redis_server: Any, s3_endpoint: Any, tiny_model_dir: Path, ray_nodes: Any,
               start_api_server: Callable[[Settings], APIServer]) -> Iterator[NodeStack]:  # noqa: F811
    prefix = f"nodes-{time.time_ns()}/"
    settings = make_api_settings(
        tmp_path / "api", redis_server.url, model_dir=tiny_model_dir,
        # Jobs train as gangs of two workers, one per worker node: a node's `trainer` is its accelerator.
        catalog={"tiny-llama": BaseModelSpec(path=str(tiny_model_dir), quantization="none", max_rank=64,
                                             resources=Resources(workers=2, gpus_per_worker=1))},
        object_store="s3", s3_endpoint_url=s3_endpoint.endpoint_url, s3_bucket=s3_endpoint.bucket,
        s3_prefix=prefix, s3_access_key_id="test", s3_secret_access_key="test",
        lease_ms=3000, heartbeat_ms=250, accelerator_resource="trainer")
    server = start_api_server(settings)
    api_key = server.create_tenant("team-nodes").api_key
    client = server.openai(api_key)
    train, val = write_synthetic_splits(tmp_path / "data", n_train=48, n_val=4, seed=3)
    files = tuple(client.files.create(file=f.open("rb"), purpose="fine-tune").id for f in (train, val))
    dispatcher_dir = tmp_path / "dispatcher"
    dispatchers = Dispatchers(settings.model_copy(update={"data_dir": dispatcher_dir}), ray_nodes.address, tmp_path)
    dispatchers.start("dispatcher-nodes")
    try:
        yield NodeStack(tmp_path, server, api_key, client, files, dispatcher_dir, prefix, s3_endpoint)
    finally:
        dispatchers.stop_all()


def _assert_workers_used_only_their_own_dirs(stack: NodeStack, ray_nodes: Any, inputs: list[str]) -> None:
    """Each worker node fetched `inputs` (file or folder names) into its own work dir and left nothing
    there; none touched the test's directory (the dispatcher's and the API's data dirs, the datasets);
    the dispatcher's data dir holds nothing but its owner.json; Ray's runs left the bucket."""
    for node in ray_nodes.workers:
        touched = node.audit()
        foreign = [(event, str(path)) for event, path in touched if path.is_relative_to(stack.dir)]
        assert foreign == [], (node.name, foreign[:20])
        mine = [path for _, path in touched if path.is_relative_to(node.work_dir)]
        for name in inputs:
            assert any(name in p.parts for p in mine), (node.name, name, sorted(set(mine))[:40])
        assert list(node.work_dir.iterdir()) == [], (node.name, list(node.work_dir.rglob("*")))
    leftovers = [p for p in stack.dispatcher_dir.rglob("*") if p.is_file() and p.name != "owner.json"]
    assert leftovers == [], leftovers
    assert set(stack.s3_keys("ray/")) <= {f"{stack.prefix}ray/"}  # at most pyarrow's folder marker


def test_a_job_paused_and_resumed_trains_on_worker_nodes_from_the_object_store_alone(node_stack, ray_nodes):
    stack = node_stack
    train_id, val_id = stack.files
    job = stack.client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=train_id, validation_file=val_id, suffix="nodes", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 2}}},
        extra_body={"lora": LORA})

    _wait_for(lambda: stack.client.fine_tuning.jobs.checkpoints.list(job.id).data, "a first checkpoint")
    stack.client.fine_tuning.jobs.pause(job.id)
    _wait_for(lambda: stack.client.fine_tuning.jobs.retrieve(job.id).status == "paused", "the pause", timeout_s=90)
    paused_step = max(c.step_number for c in stack.client.fine_tuning.jobs.checkpoints.list(job.id).data)
    stack.client.fine_tuning.jobs.resume(job.id)
    done = _wait_for(lambda: stack.finished(job.id), f"job {job.id} to finish")

    assert done.status == "succeeded", (done.error, (stack.dir / "dispatcher-nodes.log").read_text()[-5000:])
    assert done.fine_tuned_model == "nodes:v1"
    messages = stack.messages(job.id)
    assert f"Resuming from the checkpoint at step {paused_step}." in messages, messages
    assert any("pre-tokenized" in m for m in messages), messages  # the ranks read the dispatcher's tokenization
    assert any("tokenized by an earlier attempt" in m for m in messages), messages  # the resumed attempt's checks
    assert any(k.endswith("/adapters/nodes/v1/manifest.json") for k in stack.s3_keys(""))
    _assert_workers_used_only_their_own_dirs(
        stack, ray_nodes, ["train.jsonl", "validation.jsonl", "train.tokens.npz", "validation.tokens.npz", "resume"])


def test_a_job_continuing_a_version_starts_from_it_on_the_worker_nodes(node_stack, ray_nodes, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from lora_core import LoraConfig, apply_lora, save_adapter

    stack = node_stack
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    saved = save_adapter(model, stack.dir / "mine", base_model_name_or_path="tiny-llama")
    with stack.server.client(stack.api_key) as http:
        imported = http.post("/v1/adapters", data={"name": "mine"},
                             files={"file": ("mine.tar.gz", tar_gz_of(saved), "application/gzip")})
    assert imported.status_code == 200, imported.text
    job = stack.client.fine_tuning.jobs.create(
        model="mine:v1", training_file=stack.files[0], seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})

    done = _wait_for(lambda: stack.finished(job.id), f"job {job.id} to finish")

    assert done.status == "succeeded", (done.error, (stack.dir / "dispatcher-nodes.log").read_text()[-5000:])
    assert done.fine_tuned_model == "mine:v2"
    _assert_workers_used_only_their_own_dirs(stack, ray_nodes, ["train.jsonl", "init"])
