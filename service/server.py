"""Running the API under uvicorn for given settings (used by `lorafleet serve` and `lorafleet up`)."""

from __future__ import annotations

import uvicorn

from fleet.settings import Settings
from service.app import create_app

__all__ = ["make_server", "run_server"]


def make_server(
    settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"
) -> uvicorn.Server:
    """A uvicorn Server for the app built from `settings`, not yet started.

    Call `.run()` to serve in the foreground (it installs SIGINT/SIGTERM handlers when run on the main
    thread), or run `.serve()` in a thread/event loop and set `.should_exit = True` to stop it.
    `port=0` binds a free port; read it back from `server.servers[0].sockets[0]` once `.started`.
    """
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        # Errors are logged by the app's own handlers; no uvicorn access log noise per request by default.
        access_log=log_level == "debug",
        proxy_headers=True,
        # JSON logs: uvicorn's loggers propagate to the root handler (fleet.log_format) instead of its own.
        log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)


def run_server(settings: Settings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve the API in the foreground until SIGINT/SIGTERM."""
    make_server(settings, host=host, port=port, log_level=log_level).run()
