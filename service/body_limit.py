"""A size cap on non-upload request bodies (JSON), answered with 413 in OpenAI's error shape.

Uploads (multipart/form-data) are streamed to disk under their own limit by `service.uploads`; every
other body is small (a job request is a few hundred bytes), so it is read here up to `max_bytes` and
handed to the app from memory. A client can therefore never make the API buffer a huge JSON body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response

__all__ = ["BodyLimitMiddleware", "MAX_JSON_BODY_BYTES"]

MAX_JSON_BODY_BYTES = 1024 * 1024


class BodyLimitMiddleware:
    """Pure ASGI middleware: reject non-multipart bodies over `max_bytes` with 413."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data"):
            await self.app(scope, receive, send)
            return
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
