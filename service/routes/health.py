"""Liveness (/healthz), readiness (/readyz: Redis answers) and Prometheus metrics (/metrics, operator only)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.deps import OperatorPrincipal, RedisDep
from service.openapi import AUTH_ERRORS, error_responses

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    redis: str


@router.get("/healthz", responses=error_responses(500))
def healthz() -> Liveness:
    """The process is up and serving HTTP."""
    return Liveness(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis does not answer."}, **error_responses(500)},
)
def readyz(redis: RedisDep) -> JSONResponse:
    """Ready to take requests: Redis answers a PING."""
    try:
        redis.ping()
    except (RedisConnectionError, RedisTimeoutError) as e:
        # The address is for the operator's log only: anyone who can reach the port may call /readyz.
        logger.warning("readiness check failed: Redis did not answer PING: %s", e)
        return JSONResponse({"status": "unavailable", "redis": "Redis unreachable"}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text exposition format.",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **AUTH_ERRORS,
    },
)
def metrics(request: Request, operator: OperatorPrincipal) -> Response:
    """Prometheus text exposition of the API's metrics; needs the operator's admin key (operator data)."""
    return request.app.state.metrics.render()
