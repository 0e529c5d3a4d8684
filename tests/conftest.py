"""Shared test fixtures: a real redis-server, a real S3 endpoint (moto server), a tiny model, local Ray,
and a multi-node Ray cluster of separate node processes (`ray_nodes`, tests/cluster.py)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# pytest-xdist workers inherit COLUMNS=80 and LINES=24. Rich fixes a console's width from COLUMNS when
# the console is made (service.console, at import), which would override the width the CLI tests give
# each call; without them, the consoles size themselves per call from the environment the test sets.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The test models are tiny: one intra-op thread is as fast as two, and on a busy 2-core machine two
# OpenMP threads spin-wait for each other (lora_core tests measured 10-40x slower). Set before torch
# is imported here, and inherited by the dispatcher/API subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout_s}s")


# --------------------------------------------------------------------------------------------- Redis
@dataclass
class RedisServer:
    """A real redis-server on a free loopback port, AOF on with fsync on every write."""

    dir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make test` (it installs it with apt-get)")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--protected-mode", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        client = self.client()
        deadline = time.monotonic() + 20
        while True:  # the port opens before the AOF is loaded; wait until commands are served
            try:
                client.ping()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown hooks, no final save."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, **kwargs):
        import redis

        return redis.Redis.from_url(self.url, **kwargs)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(dir=tmp_path / "redis")
    server.dir.mkdir()
    server.start()
    yield server
    server.stop()


# ------------------------------------------------------------------------------------------------ S3
@dataclass
class S3Endpoint:
    """A local S3-compatible endpoint (moto server in its own process), reached over HTTP by boto3."""

    endpoint_url: str
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(name, value)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout_s=60, proc=proc)
        endpoint = S3Endpoint(endpoint_url=f"http://127.0.0.1:{port}", bucket="lorafleet-test")
        endpoint.client().create_bucket(Bucket=endpoint.bucket)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), seed=0)


# ----------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the whole session (start-up costs seconds; CPU workers, gloo). It
    declares 4 logical GPUs, as `lorafleet up` does: jobs hold them (workers.placement), training runs on CPU."""
    import ray

    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, object_store_memory=300 * 1024**2,
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Ray cluster of separate node processes on this machine (tests/cluster.py): a head with no
    `trainer` resource and two worker nodes with `{"trainer": 1}` each, every node with its own TMPDIR
    (hence its own Ray temp dir and lorafleet work dir), shared by the tests of one module. Each worker
    node's Python processes record the paths they touch under pytest's base temp dir (`node.audit()`).
    The test process does not join it: point a dispatcher process at `ray_nodes.address`."""
    from tests.cluster import start_cluster

    cluster = start_cluster(workers=[{"trainer": 1}, {"trainer": 1}],
                            audit_roots=[tmp_path_factory.getbasetemp()])
    yield cluster
    cluster.stop()
