"""Liveness (/healthz), readiness (/readyz: Redis answers) and Prometheus metrics (/metrics)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.deps import RedisDep

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process is up and serving HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(redis: RedisDep) -> JSONResponse:
    """Ready to take requests: Redis answers a PING."""
    try:
        redis.ping()
    except (RedisConnectionError, RedisTimeoutError) as e:
        logger.warning("readiness check failed: Redis did not answer PING: %s", e)
        return JSONResponse({"status": "unavailable", "redis": f"unreachable: {e}"}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok"})


@router.get("/metrics")
def metrics(request: Request) -> Response:
    """Prometheus text exposition of the API's metrics."""
    return request.app.state.metrics.render()
