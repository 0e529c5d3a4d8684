"""What the dispatcher holds of each running attempt (JobRunner) or co-training group (GroupRunner)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Self

__all__ = ["RunnerThread"]


class RunnerThread:
    """`run()` on a daemon thread of its own (`start`) or on the caller's; `shut_down()` asks it to hand
    its work back at once (dispatcher shutdown: `_shutdown` is set), and `on_exit` is called when the
    thread ends, however it ends."""

    def __init__(self, name: str, on_exit: Callable[[], object] | None) -> None:
        self._on_exit = on_exit
        self._shutdown = threading.Event()
        self._thread = threading.Thread(target=self._run_then_signal, name=name, daemon=True)

    def run(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    def shut_down(self) -> None:
        self._shutdown.set()

    def _run_then_signal(self) -> None:
        try:
            self.run()
        finally:
            if self._on_exit is not None:
                self._on_exit()
