"""A real webhook receiver for tests: an `http.server` on 127.0.0.1 in a thread that verifies every request
with the `standardwebhooks` package, as a tenant's receiver would, and answers the statuses it is told."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError


@dataclass
class Received:
    """One request: its headers, body, status answered, and the event if the signature verified."""

    headers: dict[str, str]
    body: bytes
    status: int
    event: dict[str, Any] | None


class Receiver:
    """`url` takes POSTs; `secret` (set after the endpoint is created) verifies them; `fail_next` lists
    statuses to answer before answering 200 again."""

    def __init__(self) -> None:
        self.secret: str | None = None
        self.fail_next: list[int] = []
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    event = Webhook(receiver.secret or "whsec_AAAA").verify(body, headers)
                except WebhookVerificationError:
                    event = None
                with receiver._lock:
                    status = receiver.fail_next.pop(0) if receiver.fail_next else 200
                    receiver.received.append(Received(headers, body, status, event))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hooks"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def verified_events(self) -> list[dict[str, Any]]:
        """Events that arrived with a valid signature and were answered 2xx."""
        with self._lock:
            return [r.event for r in self.received if r.event is not None and 200 <= r.status < 300]

    def wait_for(self, what: str, predicate: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 20.0) -> list:
        """Wait until `predicate(verified events)` holds; fail naming `what` and what did arrive."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = self.verified_events()
            if predicate(events):
                return events
            time.sleep(0.05)
        with self._lock:
            seen = [(r.status, r.event is not None, json.loads(r.body).get("type")) for r in self.received]
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; "
                             f"received (status, verified, type): {seen}")


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]
