"""The Reporter protocol through which a training run emits logs, metrics and checkpoints and is steered."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

__all__ = ["Control", "FileReporter", "ListReporter", "LoggingReporter", "Reporter", "read_events"]

Control = Literal["cancel", "pause"] | None


@runtime_checkable
class Reporter(Protocol):
    """What the loop calls. The service implements it over Redis; tests use `ListReporter`.

    `control()` is polled once per optimizer step (on rank 0 only under Ray); returning "cancel"
    stops without publishing, "pause" writes a checkpoint and stops with status "paused".
    """

    def log(self, message: str, level: str = "info") -> None: ...

    def metrics(self, step: int, values: dict[str, float]) -> None: ...

    def checkpoint(self, step: int, path: Path) -> None: ...

    def control(self) -> Control: ...


@dataclass
class ListReporter:
    """Keeps everything in lists; `control_at` maps a step to the control answer given at that step."""

    control_at: dict[int, Control] = field(default_factory=dict)
    logs: list[tuple[str, str]] = field(default_factory=list)
    metric_rows: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    _last_step: int = 0

    def log(self, message: str, level: str = "info") -> None:
        self.logs.append((level, message))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._last_step = step
        self.metric_rows.append((step, dict(values)))

    def checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append((step, Path(path)))

    def control(self) -> Control:
        return self.control_at.get(self._last_step)

    def series(self, name: str) -> list[tuple[int, float]]:
        """(step, value) for every row that has metric `name`."""
        return [(s, row[name]) for s, row in self.metric_rows if name in row]


class LoggingReporter:
    """Sends everything to a `logging` logger; never asks to stop unless `should_stop` says so."""

    def __init__(self, name: str = "lorafleet.training", should_stop: Callable[[], Control] | None = None):
        self._log = logging.getLogger(name)
        self._should_stop = should_stop

    def log(self, message: str, level: str = "info") -> None:
        self._log.log(logging.getLevelName(level.upper()), message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        shown = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        self._log.info("step %d %s", step, shown)

    def checkpoint(self, step: int, path: Path) -> None:
        self._log.info("checkpoint at step %d: %s", step, path)

    def control(self) -> Control:
        return self._should_stop() if self._should_stop else None


class FileReporter:
    """Appends every event as a JSON line to `events_path`; `control()` reads `control_path`.

    Picklable and dependency-free, so it works as a Ray `reporter_factory` for local runs and tests:
    `functools.partial(FileReporter, events_path, control_path)`. Writing "cancel" or "pause" into
    the control file steers the run from any process.
    """

    def __init__(self, events_path: Path | str, control_path: Path | str | None = None):
        self.events_path = Path(events_path)
        self.control_path = Path(control_path) if control_path is not None else None
        self.events_path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, event: dict) -> None:
        with self.events_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **event}) + "\n")

    def log(self, message: str, level: str = "info") -> None:
        self._append({"type": "log", "level": level, "message": message})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self._append({"type": "metrics", "step": step, "values": values})

    def checkpoint(self, step: int, path: Path) -> None:
        self._append({"type": "checkpoint", "step": step, "path": str(path)})

    def control(self) -> Control:
        if self.control_path is None or not self.control_path.is_file():
            return None
        answer = self.control_path.read_text().strip() or None
        if answer not in (None, "cancel", "pause"):
            raise ValueError(f"{self.control_path} must hold 'cancel' or 'pause', not {answer!r}")
        return answer


def read_events(events_path: Path | str, kind: str | None = None) -> list[dict]:
    """The events a FileReporter wrote, optionally only those of one type ("log", "metrics", "checkpoint")."""
    path = Path(events_path)
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in events if kind is None or e["type"] == kind]
