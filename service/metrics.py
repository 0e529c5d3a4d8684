"""Prometheus metrics of the API: request counts and latencies per route, and the scheduler's state
(queues, jobs by state, GPUs per tenant and in the cluster) read from Redis at scrape time.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never collide.
Every series is listed in docs/operations.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fleet import keys
from fleet.scheduler_view import cluster_view

__all__ = ["APIMetrics", "MetricsMiddleware", "SchedulerCollector", "scheduler_families"]

logger = logging.getLogger(__name__)


class APIMetrics:
    """The metrics one app exposes on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lorafleet_http_requests_total",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "lorafleet_http_request_duration_seconds",
            "Time to the response's first byte, by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class SchedulerCollector:
    """The scheduler's state as gauges, read from Redis when Prometheus scrapes.

    Bounded whatever the number of jobs: `cluster_view` (a few pipelined round trips over the tenants
    that wait or hold GPUs, one queued job each), then two pipelines: the job counts, and each waiting
    tenant's head job. Nothing is yielded while Redis is unreachable, so request metrics still are.
    `client()` returns None until the API has set up the scheduler's state in Redis.
    """

    def __init__(self, client: Callable[[], redis.Redis | None]) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        client = self._client()
        if client is None:
            return
        try:
            families = scheduler_families(client)
        except RedisError as e:
            logger.warning("scheduler metrics skipped: Redis error: %s", e)
            return
        yield from families


def _gauge(name: str, help_text: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, labels=list(labels))


def scheduler_families(client: redis.Redis) -> list[Metric]:
    """Every scheduler series (docs/operations.md), read now."""
    view = cluster_view(client)
    waiting = [t.tenant_id for t in view.tenants if t.queued_jobs > 0]
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.hgetall(keys.job_status_counts())
    pipe.zcard(keys.sched_running_jobs())
    pipe.zcard(keys.sched_backoff())
    for tenant in waiting:
        pipe.zrange(keys.queue(tenant), 0, 0)
    (seconds, micros), changes, running, parked, *heads = pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    pipe = client.pipeline(transaction=False)
    for head in heads:
        pipe.hget(keys.job(head[0] if head else ""), "queued_at_ms")
    queued_at = pipe.execute() if heads else []

    tenant = ("tenant",)
    depth = _gauge("lorafleet_queue_depth", "Jobs waiting in the tenant's queue.", tenant)
    wait = _gauge("lorafleet_queue_oldest_wait_seconds",
                  "How long the tenant's next job (its queue head: highest priority, then oldest) has waited.", tenant)
    for t in view.tenants:
        depth.add_metric([t.tenant_id], t.queued_jobs)
    for tenant_id, since in zip(waiting, queued_at, strict=True):
        if since is not None:
            wait.add_metric([tenant_id], max(now_ms - int(since), 0) / 1000)
    jobs = _gauge("lorafleet_jobs", "Jobs queued (in a queue, or parked for a retry or set aside) or running now.",
                  ("state",))
    jobs.add_metric(["queued"], sum(t.queued_jobs for t in view.tenants) + parked)
    jobs.add_metric(["running"], running)
    entered = CounterMetricFamily(
        "lorafleet_job_status_changes",
        "Times jobs entered each status (a preempted job's return to the queue is not one).", labels=["status"],
    )
    for status in sorted(changes):
        entered.add_metric([status], int(changes[status]))
    running_jobs = _gauge("lorafleet_tenant_jobs_running", "Jobs the tenant runs.", tenant)
    allocated = _gauge("lorafleet_tenant_gpus_allocated", "GPUs the tenant's running jobs hold.", tenant)
    borrowed = _gauge("lorafleet_tenant_gpus_borrowed", "GPUs the tenant holds above its nominal quota.", tenant)
    nominal = _gauge("lorafleet_tenant_gpus_nominal_quota", "The tenant's nominal (guaranteed) GPUs.", tenant)
    for t in view.tenants:
        running_jobs.add_metric([t.tenant_id], t.running_jobs)
        allocated.add_metric([t.tenant_id], t.running_gpus)
        borrowed.add_metric([t.tenant_id], t.borrowed_gpus)
        nominal.add_metric([t.tenant_id], t.quota.nominal_gpus)
    totals = view.totals
    cluster = [
        _gauge("lorafleet_cluster_gpus_allocated", "GPUs held by running jobs."),
        _gauge("lorafleet_cluster_gpus_being_preempted", "GPUs of jobs asked to stop to return borrowed capacity."),
    ]
    cluster[0].add_metric([], totals.allocated)
    cluster[1].add_metric([], totals.being_preempted)
    if totals.gpus is not None:  # known once a dispatcher has reported the nodes
        cluster.append(_gauge("lorafleet_cluster_gpus", "GPUs in the cluster, as the dispatchers read them from Ray."))
        cluster[-1].add_metric([], totals.gpus)
        cluster.append(_gauge("lorafleet_cluster_gpus_free", "GPUs neither held by running jobs nor reserved."))
        cluster[-1].add_metric([], totals.free or 0)
    return [depth, wait, jobs, entered, running_jobs, allocated, borrowed, nominal, *cluster]


def _route_template(scope: Scope) -> str:
    """The request path with its path parameters put back as `{name}` (`/v1/files/{file_id}`), so
    labels stay few; "unmatched" when no route matched (the router records the match in the scope)."""
    if scope.get("route") is None:
        return "unmatched"
    path: str = scope.get("path", "")
    for name, value in scope.get("path_params", {}).items():
        value = str(value)
        if not value:
            continue
        segments = path.split("/")
        if value in segments:
            segments[segments.index(value)] = f"{{{name}}}"
            path = "/".join(segments)
        else:
            path = path.replace(value, f"{{{name}}}", 1)
    return path


class MetricsMiddleware:
    """Pure ASGI middleware (streams pass through untouched) counting requests and timing them."""

    def __init__(self, app: ASGIApp, metrics: APIMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                elapsed = time.perf_counter() - start
                self.metrics.latency.labels(scope["method"], _route_template(scope)).observe(elapsed)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(scope["method"], _route_template(scope), str(status["code"])).inc()
