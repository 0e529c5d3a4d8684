"""A dispatcher's Prometheus metrics: its running jobs, step time, tokens trained, checkpoint upload time.

Training runs in Ray workers, maybe on other nodes, whose rank 0 holds the job's `JobReporter`; the
reporter already writes each logged step to the job's event stream in Redis. It adds its timings
there (`StepClock`, checkpoint upload seconds), and `TrainingTelemetry`, a thread of the dispatcher
that runs the job, tails the event streams of the jobs running here (one blocking XREAD for all of
them) and turns them into series on the dispatcher's own /metrics (`Settings.metrics_port`). So
every dispatcher is one scrape target, wherever its jobs' workers run (docs/operations.md).

Label cardinality stays bounded: only the per-job gauge carries `tenant` and `job` labels, and its
series are removed when the job stops running here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fleet import keys
from fleet.events import event_from_stream

__all__ = ["StepClock", "TrainingMetrics", "TrainingTelemetry", "serve_metrics"]

logger = logging.getLogger(__name__)

# Step times from tiny CPU models (tens of ms) to large GPU ones (a minute).
_STEP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_UPLOAD_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


@dataclass
class StepClock:
    """Seconds per optimizer step, as the training loop's reports show them.

    The loop reads a logging interval's steps back from the device at once (one sync) and reports
    them in a burst, so one step's time is not visible; the interval's is: the time between the end of
    one burst and the start of the next, over the steps the next burst reports (it includes any
    evaluation or checkpoint save in that interval). A burst's step count is known when the next
    burst begins, so each interval is returned one burst late; the first burst (from the reporter's
    start, which includes set-up) is never timed. Times are `time.monotonic()` seconds.
    """

    gap_s: float = 0.005  # rows of one burst follow each other at once; a pause this long starts a new one
    _done_at: float | None = None  # when the reporter last finished with a row
    _burst: list[float] | None = field(default=None)  # [seconds, steps] of the timed burst under way

    def row_arrived(self, now: float) -> tuple[float, int] | None:
        """A step's row arrives; returns (seconds per step, steps) of the burst it ends, if timed."""
        if self._done_at is None:
            return None
        idle_s = now - self._done_at
        if idle_s < self.gap_s:
            if self._burst is not None:
                self._burst[1] += 1
            return None
        ended, self._burst = self._burst, [idle_s, 1]
        return (ended[0] / ended[1], int(ended[1])) if ended else None

    def row_done(self, now: float) -> None:
        self._done_at = now


class TrainingMetrics:
    """The series one dispatcher serves, in their own registry."""

    def __init__(self, running_jobs: Callable[[], dict[str, str]]) -> None:
        self.registry = CollectorRegistry()
        self.jobs_running = Gauge("lorafleet_dispatcher_jobs_running", "Jobs this dispatcher runs now.",
                                  registry=self.registry)
        self.jobs_running.set_function(lambda: len(running_jobs()))
        self.step_seconds = Histogram(
            "lorafleet_training_step_seconds",
            "Wall time per optimizer step: a logging interval's time over its steps.",
            buckets=_STEP_BUCKETS_S, registry=self.registry,
        )
        self.tokens = Counter("lorafleet_training_tokens", "Tokens trained by the jobs this dispatcher ran.",
                              registry=self.registry)
        self.tokens_per_second = Gauge(
            "lorafleet_training_tokens_per_second",
            "A running job's training throughput since its attempt started (all its workers).",
            ["tenant", "job"], registry=self.registry,
        )
        self.checkpoint_upload_seconds = Histogram(
            "lorafleet_checkpoint_upload_seconds", "Time to upload one checkpoint to the object store.",
            buckets=_UPLOAD_BUCKETS_S, registry=self.registry,
        )


@dataclass
class _Followed:
    tenant_id: str
    last_id: str  # events after this stream id are read
    tokens: int | None = None  # tokens_trained last seen (a resumed attempt starts from its checkpoint's)


class TrainingTelemetry:
    """A thread that tails the event streams of the jobs running here and feeds `TrainingMetrics`.

    `running_jobs()` returns {job id: tenant id}. It blocks at most `block_ms` per read, so a job that
    starts is followed, and one that ends is dropped with its series, within about that time.
    """

    def __init__(self, client: redis.Redis, metrics: TrainingMetrics, running_jobs: Callable[[], dict[str, str]],
                 *, block_ms: int = 1000) -> None:
        self._redis, self._metrics, self._running_jobs = client, metrics, running_jobs
        self._block_ms = block_ms
        self._followed: dict[str, _Followed] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-telemetry", daemon=True)

    def start(self) -> TrainingTelemetry:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except (RedisConnectionError, RedisTimeoutError) as e:
                logger.warning("training metrics: Redis unreachable (%s); retrying in 2 s", e)
                self._stop.wait(2.0)

    def poll(self) -> None:
        """Follow the jobs running now, then read (blocking up to block_ms) and record their new events."""
        running = self._running_jobs()
        for job_id in set(self._followed) - set(running):
            self._forget(job_id)
        new = [job_id for job_id in running if job_id not in self._followed]
        if new:  # followed from its newest event on: "$" in every read would miss events between reads
            pipe = self._redis.pipeline(transaction=False)
            for job_id in new:
                pipe.xrevrange(keys.job_events(job_id), count=1)
            for job_id, newest in zip(new, pipe.execute(), strict=True):
                self._followed[job_id] = _Followed(running[job_id], newest[0][0] if newest else "0-0")
        if not self._followed:
            self._stop.wait(self._block_ms / 1000)
            return
        job_of = {keys.job_events(j): j for j in self._followed}
        reply = self._redis.xread({k: self._followed[j].last_id for k, j in job_of.items()}, count=500,
                                  block=self._block_ms)
        for stream, rows in reply or []:
            job_id = job_of[stream]
            followed = self._followed[job_id]
            for stream_id, fields in rows:
                followed.last_id = stream_id
                event = event_from_stream(stream_id, fields)
                if event.type == "metrics" and event.data:
                    self._record(job_id, followed, event.data)

    def _record(self, job_id: str, followed: _Followed, data: dict[str, Any]) -> None:
        m = self._metrics
        if "step_time_s" in data:
            for _ in range(int(data.get("steps_timed", 1))):
                m.step_seconds.observe(float(data["step_time_s"]))
        for seconds in data.get("checkpoint_upload_s", ()):
            m.checkpoint_upload_seconds.observe(float(seconds))
        if "tokens_per_s" in data:
            m.tokens_per_second.labels(followed.tenant_id, job_id).set(float(data["tokens_per_s"]))
        if "tokens_trained" in data:
            tokens = int(data["tokens_trained"])
            if followed.tokens is not None and tokens > followed.tokens:
                m.tokens.inc(tokens - followed.tokens)
            followed.tokens = tokens

    def _forget(self, job_id: str) -> None:
        followed = self._followed.pop(job_id)
        try:
            self._metrics.tokens_per_second.remove(followed.tenant_id, job_id)
        except KeyError:
            pass  # it never reported a step here


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> Callable[[], None]:
    """Serve `registry` as Prometheus text on http://addr:port/metrics; returns the function that stops it."""
    server, thread = start_http_server(port, addr=addr, registry=registry)
    logger.info("dispatcher metrics on http://%s:%d/metrics", addr, port)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5.0)

    return stop
