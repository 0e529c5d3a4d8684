"""A job's event log: a capped Redis Stream per job (log lines and metrics), read paged or live."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import redis

from fleet import keys
from fleet.exceptions import InvalidRequest
from fleet.jobs import Event
from fleet.settings import MAX_BLOCK_S

__all__ = ["EventLog", "EVENT_LEVELS", "EVENT_TYPES", "event_fields", "event_from_stream", "event_stream_id"]

EVENT_LEVELS = ("info", "warn", "error")
EVENT_TYPES = ("message", "metrics")
_STREAM_ID = re.compile(r"^([0-9]{1,20})(?:-([0-9]{1,20}))?$")
# Both parts of a Redis stream id are unsigned 64-bit integers; Redis refuses anything larger.
_MAX_ID_PART = 2**64 - 1
_FIRST_ID = "0-0"  # nothing comes before it
_LAST_ID = f"{_MAX_ID_PART}-{_MAX_ID_PART}"  # nothing comes after it


def event_stream_id(event_id: str, *, param: str = "after") -> str:
    """The Redis stream id inside an event id ("ftevent-<ms>-<seq>" or the bare stream id).

    Raises InvalidRequest naming `param` unless both parts are integers Redis accepts (at most 2^64-1),
    so a cursor from a client can never reach Redis as an id it rejects.
    """
    stream_id = event_id.removeprefix("ftevent-")
    match = _STREAM_ID.fullmatch(stream_id)
    parts = [int(part) for part in match.groups() if part is not None] if match else []
    if not parts or any(part > _MAX_ID_PART for part in parts):
        raise InvalidRequest(
            f"{event_id!r} is not an event id of this job: expected 'ftevent-<ms>-<seq>' with both numbers "
            f"at most {_MAX_ID_PART}.",
            param=param,
        )
    return "-".join(str(part) for part in parts)  # canonical: "007-0" and "7-0" are the same id


def event_fields(level: str, message: str, data: dict[str, Any] | None = None, *, type: str = "message") -> dict:
    """The stream fields of one event; ValueError unless `level` is info|warn|error and `type` message|metrics."""
    if level not in EVENT_LEVELS or type not in EVENT_TYPES:
        raise ValueError(f"Event level must be one of {EVENT_LEVELS} and type one of {EVENT_TYPES}.")
    fields = {"created_at": str(int(time.time())), "level": level, "message": message, "type": type}
    if data is not None:
        fields["data"] = json.dumps(data, default=str)
    return fields


def event_from_stream(stream_id: str, fields: dict[str, str]) -> Event:
    """An Event from a stream entry (its id and fields)."""
    return Event(
        id=f"ftevent-{stream_id}",
        stream_id=stream_id,
        created_at=int(fields.get("created_at", 0)),
        level=fields.get("level", "info"),  # type: ignore[arg-type]
        message=fields.get("message", ""),
        type=fields.get("type", "message"),  # type: ignore[arg-type]
        data=json.loads(fields["data"]) if "data" in fields else None,
    )


class EventLog:
    """Appends to and reads from job event streams; each stream keeps about `max_len` newest events."""

    def __init__(self, client: redis.Redis, *, max_len: int = 10_000) -> None:
        self.redis = client
        self.max_len = max_len

    def append(
        self,
        job_id: str,
        level: str,
        message: str,
        data: dict[str, Any] | None = None,
        *,
        type: str = "message",
    ) -> Event:
        """Append one event, unfenced (API side); `level` is info|warn|error, `type` message|metrics.

        Returns it as stored. A worker appends through `Leases.append_event`, fenced by its claim.
        """
        fields = event_fields(level, message, data, type=type)
        stream_id = self.redis.xadd(keys.job_events(job_id), fields, maxlen=self.max_len, approximate=True)
        return event_from_stream(stream_id, fields)

    def read(self, job_id: str, *, after: str | None = None, limit: int = 100) -> list[Event]:
        """Events oldest first, strictly after the event id `after` (from the start when None)."""
        start = event_stream_id(after) if after else None
        if start == _LAST_ID:
            return []  # Redis rejects an exclusive start with nothing after it
        rows = self.redis.xrange(keys.job_events(job_id), f"({start}" if start else "-", "+", count=limit)
        return [event_from_stream(i, f) for i, f in rows]

    def list(self, job_id: str, *, after: str | None = None, limit: int = 20) -> tuple[list[Event], bool]:
        """Events newest first as OpenAI pages them: (page, has_more); `after` = last id of the last page."""
        end = event_stream_id(after) if after else None
        if end == _FIRST_ID:
            return [], False  # Redis rejects an exclusive end with nothing before it
        rows = self.redis.xrevrange(keys.job_events(job_id), f"({end}" if end else "+", "-", count=limit + 1)
        return [event_from_stream(i, f) for i, f in rows[:limit]], len(rows) > limit

    def wait(self, job_id: str, *, after: str | None, block_ms: int, limit: int = 100) -> list[Event]:
        """Block up to `block_ms` for events after `after` (None: only events appended from now on)."""
        start = event_stream_id(after) if after else "$"
        block_ms = min(block_ms, int(MAX_BLOCK_S * 1000))  # stay inside the client's socket timeout
        reply = self.redis.xread({keys.job_events(job_id): start}, count=limit, block=block_ms)
        return [event_from_stream(i, f) for i, f in reply[0][1]] if reply else []
