"""How every lorafleet process logs (`Settings.log_format`): text, or one JSON object per line, each
line logged while handling a job naming it (`job_id`, `tenant_id`, from a context variable that the
job runner, the training worker and the API's request handling set)."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["JobContextFilter", "JsonFormatter", "WorkerLogging", "configure_logging", "job_log_context",
           "set_job_log_context", "set_log_tenant"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


_current: ContextVar[tuple[str | None, str | None]] = ContextVar("lorafleet_job", default=(None, None))


def set_job_log_context(job_id: str | None, tenant_id: str | None) -> None:
    """Name the job (and tenant) handled from here on in this thread or task. A new thread starts with
    none: set it where the thread starts handling the job."""
    _current.set((job_id, tenant_id))


def set_log_tenant(tenant_id: str) -> None:
    """Name the tenant of the job (if any) handled from here on in this task (an API request)."""
    _current.set((_current.get()[0], tenant_id))


@contextmanager
def job_log_context(job_id: str | None, tenant_id: str | None) -> Iterator[None]:
    token = _current.set((job_id, tenant_id))
    try:
        yield
    finally:
        _current.reset(token)


@dataclass(frozen=True)
class WorkerLogging:
    """How a Ray training worker logs for one job: built by the dispatcher (picklable), applied in the
    worker function. Text leaves Ray's own logging as it is; JSON replaces it."""

    log_format: str
    job_id: str
    tenant_id: str

    def apply(self) -> None:
        if self.log_format == "json":
            configure_logging(logging.INFO, self.log_format)
        set_job_log_context(self.job_id, self.tenant_id)


class JobContextFilter(logging.Filter):
    """Adds `job_id` and `tenant_id` (None outside a job) to every record the handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id, tenant_id = _current.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id
        if getattr(record, "tenant_id", None) is None:
            record.tenant_id = tenant_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, job_id and tenant_id
    when set, and the exception's traceback as `exc_info`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ("job_id", "tenant_id"):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str | int, log_format: str) -> None:
    """Send every logger's records to stderr in `log_format` ("text" or "json"), replacing the root
    logger's handlers (so calling it again, as a reused Ray worker does, never doubles lines)."""
    handler = logging.StreamHandler()
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if isinstance(level, str) else level)
