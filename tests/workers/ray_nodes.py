"""A multi-node Ray cluster on this machine: a head and worker nodes as separate `ray start` processes.

Each worker node declares logical GPUs (`--num-gpus`; Ray accepts them without hardware) and one CPU;
training itself runs on the CPU. Every node runs with a private temp dir (TMPDIR and `--temp-dir`),
so no cluster file is left under /tmp/ray, and `stop()` kills every process the cluster started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from tests.conftest import free_port, wait_for_port

_START_ATTEMPTS = 3
_REGISTRATION_TIMED_OUT = "timed out during startup"  # ray start's words when its raylet missed the GCS


def _ray_cli() -> str:
    """The `ray` command of the interpreter running the tests (its venv's bin)."""
    return str(Path(sys.executable).parent / "ray")


@dataclass
class RayNode:
    """One `ray start --block` process and everything it started (raylet, its workers)."""

    name: str
    gpus: int
    proc: subprocess.Popen

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def runs_train_workers(self) -> bool:
        """Whether a Ray Train worker (a rank) runs on this node now."""
        for process in self.processes():
            try:
                if "RayTrainWorker" in " ".join(process.cmdline()):
                    return True
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return False

    def kill(self) -> None:
        """SIGKILL the node and every process it started, as a machine that dies would."""
        for process in reversed(self.processes()):
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait(timeout=30)


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    env: dict[str, str]
    nodes: list[RayNode] = field(default_factory=list)

    def add_node(self, name: str, *, gpus: int, cpus: int = 1) -> RayNode:
        """Start a worker node declaring `gpus` logical GPUs; returns once `ray start` has joined it.

        `ray start` gives a raylet 30 s (fixed in ray._private.node) to register with the GCS; on a
        loaded CI machine it can miss that, and exits: what it started is killed and it starts again,
        up to _START_ATTEMPTS times."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            log_path = self.temp_dir / (f"{name}.log" if attempt == 1 else f"{name}-attempt{attempt}.log")
            proc = _start(["--address", self.address, f"--num-cpus={cpus}", f"--num-gpus={gpus}",
                           f"--dashboard-agent-listen-port={free_port()}",
                           f"--temp-dir={self.temp_dir}"], self.env, log_path)
            node = RayNode(name, gpus, proc)
            try:
                _wait_until_joined(node, log_path)
            except RuntimeError as e:
                if attempt == _START_ATTEMPTS or _REGISTRATION_TIMED_OUT not in str(e):
                    raise
                with contextlib.suppress(ProcessLookupError):  # its raylet, if it outlived `ray start`
                    os.killpg(proc.pid, signal.SIGKILL)
                continue
            self.nodes.append(node)
            return node
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - the process keeps it
    return subprocess.Popen([_ray_cli(), "start", "--block", "--disable-usage-stats",
                             "--object-store-memory=80000000", *args],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until_joined(node: RayNode, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "Ray runtime started" not in log_path.read_text(errors="replace"):
        if node.proc.poll() is not None:
            raise RuntimeError(f"ray node {node.name} exited ({node.proc.returncode}): {log_path.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ray node {node.name} did not start within {timeout_s:.0f}s; see {log_path}")
        time.sleep(0.2)


def start_cluster(temp_dir: Path, *, worker_gpus: list[int]) -> RayCluster:
    """A head node (no GPUs, one CPU) and one worker node per entry of `worker_gpus`."""
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(temp_dir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}
    port = free_port()
    # Every port Ray would otherwise take at a fixed default is drawn free, so that this cluster can start
    # while another Ray runs on the machine (make test runs two test files at once).
    head = _start(["--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0", "--include-dashboard=false",
                   f"--dashboard-agent-listen-port={free_port()}",
                   f"--temp-dir={temp_dir}"], env, temp_dir / "head.log")
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, env=env)
    cluster.nodes.append(RayNode("head", 0, head))
    try:
        wait_for_port(port, timeout_s=60, proc=head)
        _wait_until_joined(cluster.nodes[0], temp_dir / "head.log")
        for i, gpus in enumerate(worker_gpus):
            cluster.add_node(f"worker-{i}", gpus=gpus)
    except BaseException:
        cluster.stop()
        raise
    return cluster
