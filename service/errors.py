"""Every HTTP error as OpenAI's error object `{"error": {"message", "type", "param", "code"}}`.

Routes raise `APIError` (or let a fleet domain exception surface); the handlers registered by
`install_error_handlers` turn those, request-validation failures, malformed JSON and unknown routes
into that one shape. Bad input is always a 4xx naming the field; a 5xx only ever means a bug or an
unavailable dependency, and it is logged with its traceback.

`LastResortMiddleware`, the outermost layer, catches whatever no handler took, so no exception ever
leaves the app for the server: the client gets a clean 500 in the same shape and the process keeps
serving (Starlette's own last-resort handler answers, then re-raises into uvicorn).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.exceptions import (
    Conflict,
    FencedOut,
    FleetError,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
)

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"


class APIError(Exception):
    """An error answered to the client as it is: status code plus OpenAI's error fields."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers
        self.details = details


def error_body(
    message: str,
    *,
    type: str,
    param: str | None = None,
    code: str | None = None,
    details: list[dict[str, Any]] | None = None,
) -> dict:
    """The JSON body of an error response, as OpenAI writes it; `details` (ours) lists every problem."""
    error: dict[str, Any] = {"message": message, "type": type, "param": param, "code": code}
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(
    status_code: int,
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    details: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, type=type, param=param, code=code, details=details),
        status_code=status_code,
        headers=headers,
    )


# Most specific first: the first matching class decides the status code.
_FLEET_STATUS: tuple[tuple[type[FleetError], int], ...] = (
    (NotFound, 404),
    (PayloadTooLarge, 413),
    (Conflict, 409),
    (InvalidRequest, 400),
    (QuotaExceeded, 429),
)


def fleet_status_code(exc: FleetError) -> int:
    """The HTTP status for a fleet domain exception; 500 for ones that must never reach a client."""
    for cls, status in _FLEET_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


_UNION_TAG_CHARS = set("[](-'\",")
_UNION_TAG_NAMES = {"int", "str", "float", "bool", "list", "dict", "none", "bytes", "literal"}


def _is_union_tag(part: str) -> bool:
    """pydantic names the member of a union in `loc` ("constrained-int", "literal['auto']", "str")."""
    return part in _UNION_TAG_NAMES or any(c in _UNION_TAG_CHARS for c in part)


def _param_from_loc(loc: Sequence[Any]) -> str | None:
    """`("body", "lora", "target_modules", 1)` → `"lora.target_modules[1]"`; None for the whole body."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i > 0 and _is_union_tag(str(part)):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def _describe_validation_error(err: dict[str, Any]) -> tuple[str | None, str]:
    """One pydantic/FastAPI error → (param, what is wrong with it)."""
    kind = err.get("type", "")
    loc = err.get("loc", ())
    if kind == "json_invalid":
        position = loc[1] if len(loc) > 1 else None
        detail = err.get("ctx", {}).get("error", "invalid JSON")
        where = f" at character {position}" if position is not None else ""
        return None, (
            f"Could not parse the JSON body of the request ({detail}{where}). "
            "Send a JSON object with 'Content-Type: application/json'."
        )
    param = _param_from_loc(loc)
    msg = str(err.get("msg", "invalid value")).rstrip(".")
    if param is None:
        if kind == "missing":
            return None, "The request body is missing. Send a JSON object with 'Content-Type: application/json'."
        if kind in ("model_attributes_type", "dict_type", "model_type"):
            return None, "The request body must be a JSON object."
        return None, f"Invalid request body: {msg}."
    if kind == "missing":
        return param, f"Missing required parameter: '{param}'."
    if kind == "extra_forbidden":
        return param, f"Unrecognized request argument supplied: '{param}'."
    return param, msg


def _validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str | None, str]:
    """Every problem in one message (so a user fixes them all in one round); param names the first.

    The alternatives of one union field ("an int >= 1, or 'auto'") are merged into one sentence.
    """
    sentences: dict[str | None, list[str]] = {}
    complete: dict[str | None, bool] = {}
    for err in errors:
        param, text = _describe_validation_error(err)
        whole = param is None or text.startswith(("Missing required", "Unrecognized request"))
        bucket = sentences.setdefault(param, [])
        if text not in bucket:
            bucket.append(text)
        complete[param] = whole
    if not sentences:
        return None, "Invalid request."
    parts = []
    for param, texts in sentences.items():
        if complete[param]:
            parts.append(" ".join(texts))
        else:
            parts.append(f"Invalid value for '{param}': " + ", or ".join(texts) + ".")
    return next(iter(sentences)), " ".join(parts)


async def _handle_api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(
        exc.status_code,
        exc.message,
        type=exc.type,
        param=exc.param,
        code=exc.code,
        headers=exc.headers,
        details=exc.details,
    )


async def _handle_fleet_error(request: Request, exc: FleetError) -> JSONResponse:
    status = fleet_status_code(exc)
    if status >= 500 or isinstance(exc, FencedOut):
        logger.error("internal fleet error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "The server had an error processing your request.", type=SERVER)
    if isinstance(exc, QuotaExceeded):  # the OpenAI SDK waits Retry-After seconds and retries a 429
        return error_response(429, exc.message, type=RATE_LIMIT, param=exc.param, code=exc.code,
                              headers={"Retry-After": str(exc.retry_after_s)})
    return error_response(status, exc.message, param=exc.param, code=exc.code)


async def _handle_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    param, message = _validation_message(errors)
    content_type = request.headers.get("content-type", "")
    body_level = any(tuple(e.get("loc", ())) == ("body",) for e in errors)
    if body_level and "json" not in content_type.lower():
        message = (
            f"The request body must be JSON sent with 'Content-Type: application/json' "
            f"(got {content_type or 'no Content-Type'!r})."
        )
    malformed_json = any(e.get("type") == "json_invalid" for e in errors)
    return error_response(400, message, param=param, code="invalid_json" if malformed_json else None)


async def _handle_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = getattr(exc, "headers", None)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})."
        if isinstance(exc.detail, str) and exc.detail != "Not Found":
            message = exc.detail
        return error_response(404, message, code="unknown_url", headers=headers)
    if exc.status_code == 405:
        return error_response(
            405,
            f"Method {request.method} is not allowed on {request.url.path}.",
            code="method_not_allowed",
            headers=headers,
        )
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
        # FastAPI's "There was an error parsing the body" for what json.loads refuses beyond syntax:
        # bytes that are not UTF-8, a number too long to convert. Say which.
        reason = str(exc.__cause__).split(";")[0]
        return error_response(
            400,
            f"Could not parse the JSON body of the request ({reason}). Send UTF-8 JSON with "
            "'Content-Type: application/json'.",
            code="invalid_json",
            headers=headers,
        )
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    error_type = SERVER if exc.status_code >= 500 else INVALID_REQUEST
    return error_response(exc.status_code, detail, type=error_type, headers=headers)


async def _handle_redis_unavailable(request: Request, exc: redis.exceptions.RedisError) -> JSONResponse:
    logger.error("Redis is unreachable while serving %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503,
        "The service's state store (Redis) is unreachable; retry in a few seconds.",
        type=SERVER,
        code="service_unavailable",
        headers={"Retry-After": "5"},
    )


async def _handle_client_disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
    # The client went away mid-request (e.g. an aborted upload): nothing to answer, nothing broken.
    logger.info("client disconnected during %s %s", request.method, request.url.path)
    return error_response(400, "The client disconnected before the request body was complete.",
                          code="client_disconnected")


class LastResortMiddleware:
    """Pure ASGI middleware: any exception from the app becomes a logged 500 in OpenAI's shape, and
    is never re-raised. If the response had already started (a stream), it is ended where it stands."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            logger.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if not started:
                response = error_response(500, "The server had an error processing your request.", type=SERVER)
                await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every known failure into OpenAI's error shape (the app adds
    `LastResortMiddleware` for the rest)."""
    app.add_exception_handler(APIError, _handle_api_error)
    app.add_exception_handler(FleetError, _handle_fleet_error)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
    app.add_exception_handler(redis.exceptions.ConnectionError, _handle_redis_unavailable)
    app.add_exception_handler(redis.exceptions.TimeoutError, _handle_redis_unavailable)
    app.add_exception_handler(ClientDisconnect, _handle_client_disconnect)
