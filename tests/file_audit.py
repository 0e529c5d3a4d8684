"""Records which files a process touches under given roots, with Python's audit hooks (PEP 578).

Installed at interpreter start-up in every Python process of a test Ray node (tests/cluster.py writes a
`sitecustomize.py` that calls `install_from_env`), so a test can tell which paths the Ray workers on
that node opened, created, listed or removed: e.g. that no training worker read or wrote the
dispatcher's data dir. Only Python-level calls are seen (open, os.*, shutil.*); that is every file
access of lorafleet's own code, numpy, torch.save/load and the object stores. Each process appends
`<event>\t<path>` lines to `<dir>/audit-<pid>.log` with unbuffered os.write, so a process killed with
SIGKILL loses nothing it recorded.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

__all__ = ["AUDIT_DIR_ENV", "AUDIT_ROOTS_ENV", "install_from_env", "read_audit"]

AUDIT_DIR_ENV = "LORAFLEET_TEST_AUDIT_DIR"
AUDIT_ROOTS_ENV = "LORAFLEET_TEST_AUDIT_ROOTS"  # os.pathsep-separated; only paths under these are logged
# The audit events that name a path in their first argument (and, for renames/copies, the second).
_EVENTS = {"open", "os.mkdir", "os.remove", "os.rmdir", "os.listdir", "os.scandir", "os.rename",
           "shutil.copyfile", "shutil.copytree", "shutil.rmtree", "shutil.move"}
_TWO_PATHS = {"os.rename", "shutil.copyfile", "shutil.copytree", "shutil.move"}


def install_from_env() -> None:
    """Install the hook if AUDIT_DIR_ENV is set (a no-op otherwise)."""
    log_dir, roots = os.environ.get(AUDIT_DIR_ENV), os.environ.get(AUDIT_ROOTS_ENV, "")
    if not log_dir:
        return
    watched = tuple(os.path.join(os.path.realpath(r), "") for r in roots.split(os.pathsep) if r)
    fd = os.open(os.path.join(log_dir, f"audit-{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def record(event: str, path: object) -> None:
        if isinstance(path, int) or path is None:
            return  # a file descriptor: its opening was recorded
        try:
            text = os.fsdecode(path)
        except TypeError:
            return
        absolute = os.path.realpath(text) if os.path.isabs(text) else os.path.realpath(os.path.join(os.getcwd(), text))
        if os.path.join(absolute, "").startswith(watched):
            os.write(fd, f"{event}\t{absolute}\n".encode())

    state = threading.local()  # state.busy while recording: what the hook itself does is not recorded

    def hook(event: str, args: tuple) -> None:
        if event not in _EVENTS or not args or getattr(state, "busy", False):
            return
        state.busy = True
        try:
            record(event, args[0])
            if event in _TWO_PATHS and len(args) > 1:
                record(event, args[1])
        finally:
            state.busy = False

    sys.addaudithook(hook)


def read_audit(log_dir: Path) -> list[tuple[str, Path]]:
    """Every (event, path) the processes logging to `log_dir` recorded."""
    records = []
    for log in sorted(Path(log_dir).glob("audit-*.log")):
        for line in log.read_text().splitlines():
            event, _, path = line.partition("\t")
            records.append((event, Path(path)))
    return records
