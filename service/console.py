"""The CLI's terminal conventions: rich consoles, the shared --base-url/--api-key/--json options, failing
with a clear message, and how times, durations and job statuses are printed."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from service.client import APIClientError, LorafleetClient

__all__ = [
    "console",
    "err_console",
    "DEFAULT_BASE_URL",
    "BaseUrl",
    "ApiKey",
    "AdminKey",
    "JsonOutput",
    "connect",
    "fail",
    "call",
    "print_json",
    "when",
    "duration",
    "status_text",
]

console = Console()
err_console = Console(stderr=True)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"

BaseUrl = Annotated[
    str, typer.Option("--base-url", envvar="LORAFLEET_BASE_URL", help="URL of the lorafleet API.")
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LORAFLEET_API_KEY", help="Your tenant's API key.", show_default=False),
]
AdminKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar=["LORAFLEET_ADMIN_KEY", "LORAFLEET_API_KEY"],
        help="The operator's admin key (or an admin-role tenant key).",
        show_default=False,
    ),
]
JsonOutput = Annotated[bool, typer.Option("--json", help="Print the raw JSON object.")]


def connect(base_url: str, api_key: str | None) -> LorafleetClient:
    """A client for the API; fails with a hint when no key was given."""
    if not api_key:
        fail("no API key: pass --api-key or set LORAFLEET_API_KEY (`lorafleet up` prints one).")
    return LorafleetClient(base_url, api_key)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print `error: message` on stderr and exit with `code`."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def call(fn, *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, turning an API error into `fail` with the server's message and param."""
    try:
        return fn(*args, **kwargs)
    except APIClientError as e:
        fail(str(e))


def print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj))


def when(ts: int | None) -> str:
    """A Unix time as local "YYYY-MM-DD HH:MM:SS"; "-" when unset."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def duration(seconds: float | None) -> str:
    """95.2 → "1m35s"; "-" when unknown."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


_STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
                 "queued": "blue", "paused": "magenta"}


def status_text(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"
