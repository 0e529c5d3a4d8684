"""Prometheus metrics of the API: request counts and latencies per route, and queue gauges at scrape time.

Each app gets its own CollectorRegistry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["APIMetrics", "MetricsMiddleware", "QueueCollector"]


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


class QueueCollector:
    """Gauges read from Redis when Prometheus scrapes: `stats()` returns {name: (help, value)}."""

    def __init__(self, stats: Callable[[], dict[str, tuple[str, float]]]) -> None:
        self._stats = stats

    def collect(self) -> Any:
        for name, (help_text, value) in self._stats().items():
            family = GaugeMetricFamily(name, help_text)
            family.add_metric([], value)
            yield family


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
