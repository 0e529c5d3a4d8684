"""Bounds on every request body but the two upload routes: size (413) and JSON nesting (400), OpenAI-shaped.

The upload routes (POST /v1/files, POST /v1/adapters) stream their multipart body to disk under their
own limit (`service.uploads`); every other body is small (a job request is a few hundred bytes), so it
is read here up to `max_bytes` and handed to the app from memory. The exemption goes by method and
path, never by Content-Type: FastAPI reads a multipart body whole (before auth) on any route that
parses a form, so a client could otherwise make the API buffer a huge body anywhere.

A buffered body nested deeper than `MAX_JSON_DEPTH` arrays/objects is refused before FastAPI parses
it (`fleet.bounded_json`): Python's JSON parser would recurse once per level. No request body of
ours nests more than a few levels.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleet.bounded_json import MAX_JSON_DEPTH, JsonTooDeep, check_depth
from service.errors import error_response

__all__ = ["BodyLimitMiddleware", "MAX_JSON_BODY_BYTES", "MAX_JSON_DEPTH", "UPLOAD_ROUTES"]

MAX_JSON_BODY_BYTES = 1024 * 1024

# (method, path) of the routes that receive a file through `service.uploads.receive_upload`.
UPLOAD_ROUTES = frozenset({("POST", "/v1/files"), ("POST", "/v1/adapters")})


class BodyLimitMiddleware:
    """Pure ASGI middleware: reject bodies over `max_bytes` with 413, except on `upload_routes`."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = MAX_JSON_BODY_BYTES,
        upload_routes: frozenset[tuple[str, str]] = UPLOAD_ROUTES,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_routes = upload_routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if (scope["method"], _route_path(scope)) in self.upload_routes:
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return

        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        try:
            check_depth(b"".join(chunks), MAX_JSON_DEPTH)
        except JsonTooDeep as e:
            await error_response(400, f"The request body is {e}.", code="json_too_deep")(scope, receive, send)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # later calls wait for http.disconnect, as streaming responses expect

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"The request body is larger than {self.max_bytes} bytes. JSON requests are small; upload "
            "datasets and adapters as multipart/form-data to /v1/files or /v1/adapters.",
            code="request_too_large",
        )
        await response(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the router matches: `path` without the `root_path` a proxy mounted the app under."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
