"""What the OpenAPI schema says about answers: OpenAI's error object, the error responses of each route
group, and the schema itself without FastAPI's 422 (this API answers bad input with 400, never 422).

A generated client or a fuzzer (the schemathesis run in tests/service/test_api_schema_fuzz.py) reads
the schema as the contract: every status a route can answer is listed here with its body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from fleet.files import FILE_ID_PATTERN
from service.schemas import NAME_PATTERN

__all__ = [
    "ErrorObject",
    "ErrorResponse",
    "error_responses",
    "AUTH_ERRORS",
    "TENANT_ERRORS",
    "install_openapi",
    "multipart_body",
    "NAME_SCHEMA",
    "ADAPTER_NAME_SCHEMA",
    "VERSION_SCHEMA",
    "FILE_ID_SCHEMA",
]

# Patterns the routes check themselves (with their own messages); declared here so the schema says so.
NAME_SCHEMA = {"pattern": NAME_PATTERN.pattern}
ADAPTER_NAME_SCHEMA = {"pattern": r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"}
VERSION_SCHEMA = {"pattern": r"^(latest|v?[0-9]{1,18})$"}
FILE_ID_SCHEMA = {"pattern": FILE_ID_PATTERN}


class ErrorObject(BaseModel):
    """OpenAI's error fields; `details` (ours) lists every problem when there are several."""

    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, permission_error, rate_limit_error or server_error"
    )
    param: str | None = None
    code: str | None = None
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    """Every error answer: `{"error": {...}}`."""

    error: ErrorObject


_DESCRIPTIONS = {
    400: "Invalid request: the message names the field (or dataset line) and what to do.",
    401: "Missing, malformed, unknown or revoked API key.",
    403: "The key may not do this (the operator key on tenant routes, a member key on admin routes).",
    404: "No such resource for this tenant (or no such URL).",
    409: "Conflicts with the current state (a name taken, a job in the wrong state, an idempotency key reused).",
    413: "The request body or uploaded file is over the limit.",
    429: "Over one of the tenant's quotas (e.g. max_queued_jobs); the message names it. Retry after "
         "`Retry-After` seconds.",
    500: "A bug: logged with its traceback on the server.",
    503: "Redis (the service's state store) is unreachable; retry after `Retry-After` seconds.",
}


# Answers that say when to try again.
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route or router: each status with its description and OpenAI's error body."""
    return {
        code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code],
               **({"headers": _RETRY_AFTER} if code in (429, 503) else {})}
        for code in codes
    }


# Any route: a body over the cap (413) or nested too deep (400), a bug (500), Redis down (503).
_ANY = (400, 413, 500, 503)
AUTH_ERRORS = error_responses(*_ANY, 401, 403)
TENANT_ERRORS = error_responses(*_ANY, 401, 403, 404, 409)


def multipart_body(fields: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its multipart body itself (`service.uploads`)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": fields, "required": required,
                               "additionalProperties": False},
                }
            },
        }
    }


def _without_validation_422(schema: dict[str, Any]) -> dict[str, Any]:
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            if isinstance(operation, dict):
                operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (served at /openapi.json) the schema without FastAPI's unused 422 answers."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = _without_validation_422(schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to customise the schema
