"""The whole local stack in one foreground process: Redis, Ray, the API, a dispatcher, a tiny model.

`lorafleet up` calls `run_local_stack`. Each piece is a real process (redis-server with AOF under the
data dir, a local Ray cluster, uvicorn, a dispatcher), so what runs locally is what runs in production,
only smaller. Ctrl-C or SIGTERM stops everything, children first, at any moment, start-up included.
Ray is always a private local cluster (`address="local"`), never one a past `ray start` recorded under
the temp dir, unless `ray_address` names one to join. Every start-up wait has a timeout and says what
it waits for.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["StackOptions", "run_local_stack"]

logger = logging.getLogger(__name__)

TINY_MODEL_NAME = "tiny-llama"


@dataclass(frozen=True)
class StackOptions:
    """What `lorafleet up` was asked for."""

    port: int = 8000
    host: str = "127.0.0.1"
    data_dir: Path = Path("./var")
    redis_port: int | None = None  # None: a free port
    ray_num_cpus: int | None = None  # None: every core
    tenant_name: str = "default"
    ray_address: str | None = None  # None: start a private local Ray cluster
    # Logical accelerators the private local Ray node declares (training itself runs on CPU), so a
    # laptop is scheduled like a small GPU cluster; the dispatcher runs up to that many jobs at once.
    local_accelerators: int = 4
    accelerator_resource: str = "GPU"


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived: unwind whatever start-up step runs, then stop every child."""


@dataclass
class _Children:
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    starting: bool = False  # a child is being forked and recorded: a stop waits until it is on the list
    stop_pending: str | None = None

    def start(self, name: str, argv: list[str], *, env: dict[str, str], log_path: Path) -> subprocess.Popen:
        log = open(log_path, "ab")  # the child owns it for its whole life
        self.starting = True
        try:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append((name, proc))
        finally:
            self.starting = False
        if self.stop_pending:
            raise _StopRequested(self.stop_pending)
    def first_dead(self) -> tuple[str, subprocess.Popen] | None:
        return next(((n, p) for n, p in self.procs if p.poll() is not None), None)

    def stop_all(self, timeout_s: float = 20.0) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0fs; killing it", name, timeout_s)
                proc.kill()
                proc.wait()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_for(predicate, what: str, timeout_s: float, children: _Children) -> None:
    logger.info("waiting for %s (up to %.0fs)", what, timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dead = children.first_dead()
        if dead:
            raise RuntimeError(f"{dead[0]} exited with code {dead[1].returncode} while waiting for {what}; "
                               "see its log under the data dir's logs/ folder")
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{what} was not ready within {timeout_s:.0f}s; see its log under the data dir's logs/ folder")


def _secret_file(path: Path, make) -> str:
    """Read a secret kept under the data dir, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


def _start_redis(opts: StackOptions, children: _Children, logs: Path) -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: `sudo apt-get install redis-server` (make up does it)")
    redis_dir = opts.data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = opts.redis_port or _free_port("127.0.0.1")
    children.start("redis-server", [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(redis_dir.resolve()),
        "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no",
    ], env=dict(os.environ), log_path=logs / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"

    import redis

    client = redis.Redis.from_url(url)

    def ready() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    _wait_for(ready, "redis-server", 30, children)
    return url


def _ensure_tiny_model(opts: StackOptions) -> Path:
    """The demo base model (workers.tiny_model.DEMO_SHAPE), generated on the first `up`, and again
    when the one under the data dir was made with another shape (an older lorafleet's)."""
    from workers.tiny_model import DEMO_SHAPE, make_tiny_model

    model_dir = (opts.data_dir / "models" / TINY_MODEL_NAME).resolve()
    recorded = model_dir / "lorafleet_tiny.json"
    wanted = {"seed": 0, **asdict(DEMO_SHAPE)}
    if not (model_dir / "config.json").exists() or not recorded.exists() or json.loads(recorded.read_text()) != wanted:
        logger.info("generating the tiny base model under %s", model_dir)
        make_tiny_model(model_dir, seed=0, shape=DEMO_SHAPE)
    return model_dir


def _bootstrap_tenant(redis_url: str, opts: StackOptions) -> str:
    """The demo tenant's API key: created on the first `up`, kept under the data dir after that."""
    import redis

    from fleet.tenants import TenantStore

    key_file = opts.data_dir / "demo-api-key"
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    tenants = TenantStore(client)
    if key_file.exists():
        key = key_file.read_text().strip()
        if tenants.authenticate(key) is not None:
            return key
    _, key = tenants.create_tenant(opts.tenant_name)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def _start_ray(opts: StackOptions) -> str:
    """Start a private local Ray cluster declaring `opts.local_accelerators` logical accelerators (or
    join `opts.ray_address`); returns its GCS address."""
    import ray

    from workers.placement import local_node_resources

    where = opts.ray_address or "local"
    local = local_node_resources(opts.accelerator_resource, opts.local_accelerators) if where == "local" else {}
    logger.info("starting Ray (%s)", "a private local cluster" if where == "local" else f"joining {where}")
    # address="local" always starts a new cluster: a bare ray.init() would join the one a past
    # `ray start` recorded under the temp dir and, if that is gone, retry forever without a word.
    ray.init(address=where, num_cpus=opts.ray_num_cpus if where == "local" else None,
             include_dashboard=False, configure_logging=False, log_to_driver=False, **local)
    return ray.get_runtime_context().gcs_address


def run_local_stack(opts: StackOptions) -> int:
    """Start every piece, print how to use it, and block until Ctrl-C/SIGTERM or a piece dies."""
    import ray

    opts.data_dir.mkdir(parents=True, exist_ok=True)
    logs = opts.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    children = _Children()
    stopping = False

    def _on_signal(signum, _frame):
        nonlocal stopping
        if stopping:  # a second signal while stopping must not cut the clean-up short
            return
        stopping = True
        if children.starting:  # raising mid-fork could lose the child: _Children.start raises instead
            children.stop_pending = signal.Signals(signum).name
            return
        raise _StopRequested(signal.Signals(signum).name)

    # Installed first, so a stop during start-up also reaches the `finally` that stops the children.
    handlers = (signal.SIGINT, signal.SIGTERM)
    previous: dict[int, object] = {s: signal.signal(s, _on_signal) for s in handlers}
    try:
        admin_key = os.environ.get("LORAFLEET_ADMIN_KEY") or _secret_file(
            opts.data_dir / "admin-key", lambda: "lf-admin-" + secrets.token_urlsafe(24))
        redis_url = _start_redis(opts, children, logs)
        model_dir = _ensure_tiny_model(opts)
        catalog_file = opts.data_dir / "catalog.json"
        catalog_file.write_text(json.dumps(
            {TINY_MODEL_NAME: {"path": str(model_dir), "quantization": "nf4", "max_rank": 64,
                               "description": "generated offline: random weights, for trying lorafleet out"}},
            indent=2) + "\n")
        tenant_key = _bootstrap_tenant(redis_url, opts)

        ray_address = _start_ray(opts)
        # Again after ray.init, which sets handlers of its own (they raise SystemExit, which also
        # reaches the `finally` below).
        for s in handlers:
            signal.signal(s, _on_signal)

        env = dict(os.environ)
        env.update({
            "LORAFLEET_REDIS_URL": redis_url,
            "LORAFLEET_DATA_DIR": str(opts.data_dir.resolve()),
            "LORAFLEET_CATALOG_FILE": str(catalog_file.resolve()),
            "LORAFLEET_ADMIN_KEY": admin_key,
            "LORAFLEET_RAY_ADDRESS": ray_address,
            "LORAFLEET_ACCELERATOR_RESOURCE": opts.accelerator_resource,
            "LORAFLEET_MAX_CONCURRENT_JOBS": str(max(1, opts.local_accelerators)),
        })
        cli = [sys.executable, "-m", "service.cli"]
        children.start("api", [*cli, "serve", "--host", opts.host, "--port", str(opts.port)],
                       env=env, log_path=logs / "api.log")
        children.start("dispatcher", [*cli, "worker"], env=env, log_path=logs / "dispatcher.log")

        def api_ready() -> bool:
            try:
                with socket.create_connection((opts.host, opts.port), timeout=0.5):
                    return True
            except OSError:
                return False

        _wait_for(api_ready, "the API", 60, children)
        base_url = f"http://{opts.host}:{opts.port}"
        _print_ready(base_url, tenant_key, admin_key, opts.data_dir,
                     None if opts.ray_address else opts.local_accelerators)

        while True:
            dead = children.first_dead()
            if dead:
                logger.error("%s exited with code %s; stopping the stack", dead[0], dead[1].returncode)
                return 1
            time.sleep(0.5)
    except _StopRequested as e:
        logger.info("%s received; stopping the stack", e)
        return 0
    finally:
        stopping = True  # from here on a signal no longer interrupts: the clean-up runs to its end
        children.stop_all()
        if ray.is_initialized():
            ray.shutdown()
        for s, handler in previous.items():
            signal.signal(s, handler)
        logger.info("stack stopped")


def _print_ready(base_url: str, tenant_key: str, admin_key: str, data_dir: Path, accelerators: int | None) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold green]lorafleet is up[/] at {base_url}  (data under {data_dir.resolve()})")
    if accelerators is not None:
        console.print(f"  local Ray      : {accelerators} logical GPUs (training runs on the CPU)")
    console.print(f"  tenant API key : {tenant_key}")
    console.print(f"  admin key      : {admin_key}")
    # soft_wrap: the line is meant to be pasted into a shell, so a narrow terminal must not break it
    console.print(f"  try it         : export LORAFLEET_BASE_URL={base_url} LORAFLEET_API_KEY={tenant_key}",
                  soft_wrap=True, highlight=False)
    console.print("                   lorafleet jobs list")
    console.print("  Ctrl-C stops everything.")
