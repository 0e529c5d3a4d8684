"""What every dispatcher does besides running jobs: reclaim expired leases, sweep dead dispatchers' work dirs.

Reclaiming runs on its own thread every ~lease_ms/3 (jittered, so dispatchers do not line up), whether
or not the dispatcher is busy with a job: a dead dispatcher's job is requeued within about
lease_ms * 1.4, not when some dispatcher happens to be idle. Housekeeping (the work-dir sweep, and any
later periodic chore) runs on the same thread, at most every HOUSEKEEPING_INTERVAL_S.

Work dirs: each dispatcher owns `<data_dir>/work/<worker id>/` and writes `owner.json` there (host, pid,
the pid's start time). A dir whose owner ran on this host and is no longer alive (SIGKILL leaves it
behind), or whose owner file was not refreshed for WORK_DIR_GRACE_S (an owner on another host sharing
the data dir), is removed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

__all__ = ["HOUSEKEEPING_INTERVAL_S", "WORK_DIR_GRACE_S", "MaintenanceThread", "claim_work_dir",
           "sweep_work_dirs"]

logger = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 60.0
WORK_DIR_GRACE_S = 24 * 3600.0
OWNER_FILE = "owner.json"
_LEGACY_NAME = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)$")  # host-pid, as dirs were named before owner.json


def _process_started_at(pid: int) -> float | None:
    """The start time of process `pid`, or None if no such process runs."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, ValueError):
        return None
    except psutil.AccessDenied:
        return 0.0  # it exists, we may not look closer


def claim_work_dir(work_dir: Path) -> Path:
    """Create this process's work dir and (re)write its owner file; call again to show it is alive."""
    work_dir.mkdir(parents=True, exist_ok=True)
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": _process_started_at(os.getpid())}
    tmp = work_dir / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(owner))
    tmp.replace(work_dir / OWNER_FILE)
    return work_dir


def _owner_is_gone(path: Path, now: float, grace_s: float) -> bool:
    owner_file = path / OWNER_FILE
    host = socket.gethostname()
    try:
        owner = json.loads(owner_file.read_text())
        owner_host, pid, started_at = owner["host"], int(owner["pid"]), owner.get("started_at")
        age_s = now - owner_file.stat().st_mtime
    except FileNotFoundError:
        legacy = _LEGACY_NAME.match(path.name)
        if legacy is None:
            return now - path.stat().st_mtime > grace_s
        owner_host, pid, started_at = legacy["host"], int(legacy["pid"]), None
        age_s = now - path.stat().st_mtime
    except (ValueError, KeyError, TypeError):
        return now - path.stat().st_mtime > grace_s  # unreadable owner file: only age can tell
    if owner_host == host:
        running_since = _process_started_at(pid)
        if running_since is None:
            return True
        # The pid was reused by another process: the owner is gone.
        return bool(started_at) and bool(running_since) and abs(running_since - started_at) > 1.0
    return age_s > grace_s


def sweep_work_dirs(work_parent: Path, *, keep: Path, grace_s: float = WORK_DIR_GRACE_S) -> list[Path]:
    """Remove the work dirs under `work_parent` whose dispatcher is gone (see the module docstring)."""
    removed = []
    if not work_parent.is_dir():
        return removed
    now = time.time()
    for path in sorted(work_parent.iterdir()):
        if not path.is_dir() or path.resolve() == keep.resolve():
            continue
        try:
            gone = _owner_is_gone(path, now, grace_s)
        except OSError:  # removed by another sweeper meanwhile
            continue
        if gone:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.info("removed the work dir %s of a dispatcher that is gone", path)
    return removed


class MaintenanceThread:
    """Calls `reclaim()` every ~interval_s (jittered ±20%) and `housekeeping()` every HOUSEKEEPING_INTERVAL_S.

    Both run once at start. Redis being unreachable is logged and retried next round; any other
    error is logged with its traceback and does not stop the thread.
    """

    def __init__(self, *, reclaim: Callable[[], object], housekeeping: Callable[[], object],
                 interval_s: float, name: str = "maintenance") -> None:
        self._reclaim, self._housekeeping, self.interval_s = reclaim, housekeeping, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> MaintenanceThread:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        next_housekeeping = 0.0
        while True:
            self._guarded("reclaiming expired leases", self._reclaim)
            if time.monotonic() >= next_housekeeping:
                self._guarded("housekeeping", self._housekeeping)
                next_housekeeping = time.monotonic() + HOUSEKEEPING_INTERVAL_S
            if self._stop.wait(self.interval_s * random.uniform(0.8, 1.2)):
                return

    @staticmethod
    def _guarded(what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            logger.warning("%s: Redis unreachable (%s); retrying next round", what, e)
        except Exception:
            logger.exception("%s failed; retrying next round", what)
