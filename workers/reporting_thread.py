"""ThreadedReporter: a Reporter whose calls return at once, delivered in order by a background thread.

The service's Reporter answers each call with a Redis round trip; made from the training loop, every
one would stall the step that made it. Wrapped in a ThreadedReporter, `log`, `metrics` and
`checkpoint` go onto a queue that one thread delivers in order, and `control()` returns the answer the
thread last polled from the wrapped reporter (it polls after delivering each backlog), so a "cancel"
or "pause" is seen at the loop's next check after it was delivered. An error of the wrapped reporter
is never lost: the next call (or `close`) raises it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from workers.reporting import Control, Reporter

logger = logging.getLogger(__name__)

__all__ = ["ThreadedReporter"]

_STOP = object()


class ThreadedReporter:
    """Delivers `log`, `metrics` and `checkpoint` to `inner` from a background thread; `close()` when done."""

    def __init__(self, inner: Reporter):
        self._inner = inner
        self._queue: queue.Queue[Any] = queue.Queue()
        self._control: Control = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._deliver, name="lorafleet-reporter", daemon=True)
        self._thread.start()

    def log(self, message: str, level: str = "info") -> None:
        self._put("log", message, level)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._put("metrics", step, dict(values))

    def checkpoint(self, step: int, path: Path) -> None:
        self._put("checkpoint", step, path)

    def control(self) -> Control:
        """The wrapped reporter's answer as last polled by the thread (no round trip here)."""
        self._raise_if_failed()
        return self._control

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until everything queued so far is delivered (and control polled after it)."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks and self._error is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the reporter did not deliver {self._queue.unfinished_tasks} queued events within "
                        f"{timeout_s} s: is its backend (Redis) reachable?"
                    )
                self._queue.all_tasks_done.wait(0.1)
        self._raise_if_failed()

    def close(self, timeout_s: float = 60.0) -> None:
        """Deliver everything queued, stop the thread; raises what the wrapped reporter raised, if anything."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"the reporter thread did not finish delivering within {timeout_s} s")
        self._raise_if_failed()

    def _put(self, kind: str, *args: Any) -> None:
        self._raise_if_failed()
        self._queue.put((kind, args))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the reporter failed in its background thread: {self._error!r}") from self._error

    def _deliver(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                kind, args = item
                getattr(self._inner, kind)(*args)
                if self._queue.empty():  # the backlog is delivered: ask once for the next answer
                    self._control = self._inner.control()
            except BaseException as error:  # handed to the loop by the next call; the thread stops
                logger.exception("reporter %s failed", type(self._inner).__name__)
                self._error = error
                self._drop_the_rest()
                return
            finally:
                self._queue.task_done()

    def _drop_the_rest(self) -> None:
        """After a failure nothing more is delivered; mark what is queued done so `flush` returns and raises."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._queue.task_done()
