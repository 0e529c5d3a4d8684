"""CheckpointUploader: uploads checkpoints from a background thread, so no rank waits on the object store.

The training loop saves a checkpoint locally and carries on; `submit` hands the uploader its own copy
(hard links in a hidden `.upload-staging-*` dir beside the checkpoint, so it costs no bytes and
little time; a copy where links fail), which the loop may then prune at will. One thread uploads one
checkpoint at a time, in the order submitted; a checkpoint submitted while an older one is still
queued (not started) replaces it, since only the newest is worth resuming from. `upload(step, dir)`
does the upload and the record (the caller decides what "recorded" means and fences it); an error it
raises is never lost: the next `submit`, `wait` or `close` raises it. `wait` returns once everything
submitted is uploaded (or raises TimeoutError naming the steps it waited for), so a pause's
checkpoint is recorded before the job is marked paused.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["CheckpointUploader"]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # checkpoint files are written once, never changed in place: a link is a snapshot
    except OSError:
        shutil.copy2(src, dst)


class CheckpointUploader:
    """Uploads submitted checkpoint dirs in order from one background thread; `close()` when done."""

    def __init__(self, upload: Callable[[int, Path], None], *, name: str = "lorafleet-checkpoint-upload"):
        self._upload = upload
        self._cond = threading.Condition()
        self._queued: tuple[int, Path] | None = None  # staged, not started
        self._uploading: int | None = None  # the step being uploaded now
        self._error: BaseException | None = None
        self._closed = False
        self._staging: Path | None = None  # made next to the first checkpoint: same filesystem, so links work
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, step: int, path: Path) -> None:
        """Queue the checkpoint at `path` for upload and return at once; `path` is the caller's to delete."""
        self._raise_if_failed()
        path = Path(path)
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=".upload-staging-", dir=path.parent))
        staged = self._staging / f"step-{step:08d}-{time.monotonic_ns()}"
        shutil.copytree(path, staged, copy_function=_link_or_copy)
        with self._cond:
            if self._closed:
                shutil.rmtree(staged, ignore_errors=True)
                raise RuntimeError("the checkpoint uploader is closed; no more checkpoints can be submitted")
            superseded, self._queued = self._queued, (step, staged)
            self._cond.notify_all()
        if superseded is not None:
            logger.info("checkpoint of step %d superseded by step %d before its upload started", superseded[0], step)
            shutil.rmtree(superseded[1], ignore_errors=True)

    def wait(self, timeout_s: float = 600.0) -> None:
        """Block until every submitted checkpoint is uploaded; raises the upload's error, or TimeoutError."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._queued is not None or self._uploading is not None) and self._error is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    steps = [s for s in (self._uploading, self._queued and self._queued[0]) if s is not None]
                    raise TimeoutError(
                        f"the upload of checkpoint step(s) {steps} did not finish within {timeout_s} s: "
                        "is the object store reachable?"
                    )
                self._cond.wait(min(remaining, 0.5))
        self._raise_if_failed()

    def close(self, timeout_s: float = 600.0) -> None:
        """Wait for the uploads (see `wait`), then stop the thread and remove the staging dir."""
        try:
            self.wait(timeout_s)
        finally:
            with self._cond:
                self._closed = True
                queued, self._queued = self._queued, None
                self._cond.notify_all()
            if queued is not None:
                logger.warning("checkpoint of step %d was never uploaded (the uploader closed first)", queued[0])
            self._thread.join(timeout=5.0)
            if not self._thread.is_alive() and self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"uploading a checkpoint failed: {self._error!r}") from self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._queued is None and not self._closed:
                    self._cond.wait()
                if self._queued is None:
                    return
                (step, staged), self._queued = self._queued, None
                self._uploading = step
            try:
                self._upload(step, staged)
            except BaseException as error:  # handed to the loop by the next submit/wait/close
                logger.exception("uploading the checkpoint of step %d failed", step)
                with self._cond:
                    self._error = error
            finally:
                shutil.rmtree(staged, ignore_errors=True)
                with self._cond:
                    self._uploading = None
                    self._cond.notify_all()
            if self._error is not None:
                return
