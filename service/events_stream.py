"""A job's events as a live Server-Sent Events stream, read from its Redis Stream.

Frames: each job event as a default (`message`) event whose `id:` is the event id (so a client resumes
with `Last-Event-ID`); `event: job` with the job object whenever its status or progress changes;
`event: end` with the final job object once it is finished, after which the stream closes. Comment
lines keep idle connections alive through proxies.

Blocking reads run in worker threads under the app's own `stream_limiter`, so many followers can never
starve the thread pool that serves ordinary requests.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from fleet.jobs import Event, Job
from fleet.queue import JobStore
from service.objects import event_object, job_object

__all__ = ["event_stream_response", "sse_frame"]

logger = logging.getLogger(__name__)

_BLOCK_MS = 1_000
_KEEPALIVE_S = 15.0
_BATCH = 200
# After the job is finished, how long to wait for its closing events (written just after the state).
_FINAL_WAIT_MS = 300


def sse_frame(data: Any, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE frame; `data` is JSON-encoded on a single line."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return ("\n".join(lines) + "\n\n").encode()


def _signature(job: Job) -> tuple:
    progress = job.progress
    return (job.status, job.attempt, progress.step if progress else None, job.fine_tuned_model)


async def _frames(request: Request, jobs: JobStore, job: Job, after: str | None) -> AsyncIterator[bytes]:
    limiter = request.app.state.stream_limiter
    tenant_id = job.tenant_id

    async def call(fn, *args: Any, **kwargs: Any) -> Any:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=limiter)

    def emit(events: list[Event]) -> list[bytes]:
        return [sse_frame(event_object(e), event_id=e.id) for e in events]

    cursor = after or "0-0"
    yield b"retry: 2000\n\n"
    yield sse_frame(job_object(job), event="job")
    seen = _signature(job)
    last_sent = time.monotonic()
    try:
        # The backlog first, oldest first, then live events.
        while True:
            backlog = await call(jobs.read_events, job.id, after=cursor, limit=_BATCH)
            for frame in emit(backlog):
                yield frame
            if backlog:
                cursor = backlog[-1].stream_id
            if len(backlog) < _BATCH:
                break
        while not await request.is_disconnected():
            if job.status.is_terminal:
                final = await call(jobs.wait_for_events, job.id, after=cursor, block_ms=_FINAL_WAIT_MS)
                while final:
                    for frame in emit(final):
                        yield frame
                    cursor = final[-1].stream_id
                    final = await call(jobs.read_events, job.id, after=cursor, limit=_BATCH)
                yield sse_frame(job_object(job), event="end")
                return
            events = await call(jobs.wait_for_events, job.id, after=cursor, block_ms=_BLOCK_MS, limit=_BATCH)
            for frame in emit(events):
                yield frame
            if events:
                cursor = events[-1].stream_id
                last_sent = time.monotonic()
            job = await call(jobs.get_job, tenant_id, job.id)
            if _signature(job) != seen:
                seen = _signature(job)
                position = await call(jobs.queue_position, job.id) if job.status.value == "queued" else None
                yield sse_frame(job_object(job, queue_position=position), event="job")
                last_sent = time.monotonic()
            elif time.monotonic() - last_sent > _KEEPALIVE_S:
                yield b": keep-alive\n\n"
                last_sent = time.monotonic()
    except RedisError as e:
        logger.warning("event stream of job %s ended: Redis error: %s", job.id, e)
        yield sse_frame({"message": f"event stream interrupted: {e}; reconnect with Last-Event-ID"},
                        event="error")


def event_stream_response(request: Request, jobs: JobStore, job: Job, *, after: str | None) -> StreamingResponse:
    """The text/event-stream response following `job` from the event after `after` (from the start if None)."""
    return StreamingResponse(
        _frames(request, jobs, job, after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"},
    )
