"""lorafleet's HTTP edge: the OpenAI-compatible FastAPI app, its server, and the `lorafleet` CLI.

Entry points: `service.app.create_app(settings)`, `service.server.make_server / run_server`,
`service.cli.app` (the console script). Imported lazily so `lorafleet --help` stays fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "make_server", "run_server"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from service.app import create_app

        return create_app
    if name in ("make_server", "run_server"):
        from service import server

        return getattr(server, name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
