"""A multi-node Ray cluster on this machine: a head plus worker nodes, each its own `ray start` process.

Use the `ray_nodes` fixture (tests/conftest.py, module-scoped) or `start_cluster` directly:

    cluster = start_cluster(base_dir, workers=[{"trainer": 1}, {"trainer": 1}], audit_roots=[...])
    ... LORAFLEET_RAY_ADDRESS=cluster.address for a dispatcher process ...
    cluster.stop()

Each node has its own directory `<base>/<name>/`: `tmp/` is its TMPDIR (Ray's `--temp-dir` is
`tmp/ray`, so Ray's session files and the `ray_current_cluster` file a head writes stay there, never in
/tmp/ray) and the temp dir its workers see (`tempfile.gettempdir()`, hence lorafleet's node-local work
dirs, workers.job_inputs); `audit/` holds what tests/file_audit.py records when `audit_roots` is given:
each Python process of a worker node logs the paths it touches under those roots and the cluster's
own directory. The head declares `head_resources` (default: none, and 1 CPU for Ray's own actors),
each worker node the resources given (plus 1 CPU), so work that asks for a custom resource, e.g.
`{"trainer": 1}`, runs on worker nodes only. Nothing here joins the test process to the cluster:
drivers are the processes a test starts (e.g. `lorafleet worker` with LORAFLEET_RAY_ADDRESS), so the
session's local Ray (`ray_cluster`) is untouched. `RayNode.kill()` SIGKILLs one node (a machine
dying); `stop()` kills every node's process group by pid and any process still running from the
cluster's directory, and removes the directory. The base directory should be short (Unix socket
paths under it are limited to ~100 characters): `start_cluster` makes one under the system temp dir
when none is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests import file_audit
from tests.file_audit import AUDIT_DIR_ENV, AUDIT_ROOTS_ENV, read_audit

__all__ = ["RayNode", "RayNodes", "start_cluster"]

_RAY = str(Path(sys.executable).with_name("ray"))
_START_TIMEOUT_S = 120.0
_STOP_TIMEOUT_S = 20.0
# Started in every Python process of an audited node; imports a copy of tests/file_audit.py placed next
# to it, so it needs nothing else on the node's PYTHONPATH.
_SITECUSTOMIZE = "from lorafleet_file_audit import install_from_env\n\ninstall_from_env()\n"


@dataclass
class RayNode:
    """One `ray start --block` process and its private directories."""

    name: str
    dir: Path
    resources: dict[str, float]
    proc: subprocess.Popen | None = None

    @property
    def tmp_dir(self) -> Path:
        """The node's TMPDIR: Ray's temp dir and lorafleet's node work dirs live under it."""
        return self.dir / "tmp"

    @property
    def work_dir(self) -> Path:
        """Where lorafleet's training workers on this node keep a job's files (workers.job_inputs)."""
        return self.tmp_dir / "lorafleet-work"

    @property
    def audit_dir(self) -> Path:
        return self.dir / "audit"

    def audit(self) -> list[tuple[str, Path]]:
        """Every (event, path) this node's Python processes recorded under the audit roots."""
        return read_audit(self.audit_dir)

    def kill(self) -> None:
        """SIGKILL the node's whole process group, as a machine dying would."""
        _signal_node(self, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=_STOP_TIMEOUT_S)


@dataclass
class RayNodes:
    """A running cluster: `address` (host:port of the head's GCS), the head, the worker nodes."""

    dir: Path
    address: str
    head: RayNode
    workers: list[RayNode] = field(default_factory=list)

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head, *self.workers]

    def stop(self) -> None:
        # SIGKILL, not Ray's graceful stop (20-40 s for three nodes here): the cluster is thrown away,
        # and whatever left a node's process group is found by its directory below.
        for node in self.nodes:
            node.kill()
        _kill_leftovers(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_cluster(base_dir: Path | None = None, *, workers: list[dict[str, float]],
                  head_resources: dict[str, float] | None = None, cpus_per_node: int = 1,
                  audit_roots: list[Path] | None = None) -> RayNodes:
    """Start a head and one worker node per entry of `workers` (its custom resources); wait until every
    node has joined. On any failure, whatever was started is stopped again."""
    base = Path(base_dir) if base_dir is not None else Path(tempfile.mkdtemp(prefix="lf-ray-"))
    port = _free_port()
    cluster = RayNodes(dir=base, address=f"127.0.0.1:{port}",
                       head=RayNode("head", base / "head", head_resources or {}))
    try:
        _start_node(cluster.head, ["--head", f"--port={port}", "--include-dashboard=false",
                                  f"--dashboard-port={_free_port()}"], cpus_per_node, audit_roots=None)
        for i, resources in enumerate(workers):
            node = RayNode(f"worker{i + 1}", base / f"worker{i + 1}", resources)
            cluster.workers.append(node)
            _start_node(node, [f"--address={cluster.address}"], cpus_per_node,
                        audit_roots=[*audit_roots, base] if audit_roots else None)
        _wait_for_nodes(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_node(node: RayNode, role: list[str], cpus: int, audit_roots: list[Path] | None) -> None:
    node.tmp_dir.mkdir(parents=True)
    env = {**os.environ, "TMPDIR": str(node.tmp_dir), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if audit_roots:
        hook_dir = node.dir / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
        shutil.copy(file_audit.__file__, hook_dir / "lorafleet_file_audit.py")
        node.audit_dir.mkdir()
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(hook_dir), env.get("PYTHONPATH", "")) if p)
        env[AUDIT_DIR_ENV] = str(node.audit_dir)
        env[AUDIT_ROOTS_ENV] = os.pathsep.join(str(r) for r in audit_roots)
    command = [_RAY, "start", "--block", *role, f"--temp-dir={node.tmp_dir / 'ray'}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
               f"--resources={json.dumps(node.resources)}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={_free_port()}"]
    log = open(node.dir / "ray-start.log", "wb")  # noqa: SIM115 - the process keeps it
    node.proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(cluster: RayNodes) -> None:
    """Wait until the GCS lists every node alive (asked from a short-lived process, so this one never
    becomes a Ray driver)."""
    probe = ("import json, sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False);"
             "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))")
    deadline = time.monotonic() + _START_TIMEOUT_S
    alive = 0
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": str(cluster.head.tmp_dir)}
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"ray node {node.name} exited with {node.proc.returncode}: "
                                   f"{(node.dir / 'ray-start.log').read_text()[-3000:]}")
        result = subprocess.run([sys.executable, "-c", probe, cluster.address], env=env, capture_output=True,
                                text=True, timeout=_START_TIMEOUT_S)
        if result.returncode == 0:
            alive = int(result.stdout.strip().splitlines()[-1])
            if alive == len(cluster.nodes):
                return
        time.sleep(1.0)
    raise TimeoutError(f"only {alive} of {len(cluster.nodes)} Ray nodes joined {cluster.address} "
                       f"within {_START_TIMEOUT_S:.0f}s")


def _signal_node(node: RayNode, signum: int) -> None:
    if node.proc is not None and node.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signum)


def _kill_leftovers(base: Path) -> None:
    """SIGKILL any process still running from the cluster's directory (a Ray process that left the
    node's process group): found by its command line or environment naming `base`, never by name."""
    marker = str(base).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "cmdline").read_bytes() or marker in (proc / "environ").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
