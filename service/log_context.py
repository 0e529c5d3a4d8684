"""Request middleware naming the job a request is about in its log lines (fleet.log_format); the
tenant is added once its key is resolved (service.deps.get_tenant_principal)."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from fleet.log_format import job_log_context

__all__ = ["LogContextMiddleware"]

# Job ids in paths: /v1/fine_tuning/jobs/ftjob-.../events, .../checkpoints, ...
_JOB_IN_PATH = re.compile(r"/(ftjob-[A-Za-z0-9_-]+)")


class LogContextMiddleware:
    """Pure ASGI middleware: every line logged while handling a request for a job carries its job_id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        match = _JOB_IN_PATH.search(scope.get("path", ""))
        with job_log_context(match.group(1) if match else None, None):
            await self.app(scope, receive, send)
