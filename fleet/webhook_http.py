"""One webhook POST to a checked address: resolve the host, refuse non-public addresses, connect to the
address that was checked (no second lookup, so DNS rebinding cannot swap it), time out, follow no redirect."""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from fleet.webhooks import address_allowed

__all__ = ["PostResult", "AddressRefused", "resolve_checked", "post"]

_TOTAL_TIMEOUT_FACTOR = 2  # a whole attempt (after resolving) takes at most twice the per-read timeout


def _shut(sock: socket.socket, fired: threading.Event) -> None:
    fired.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class AddressRefused(Exception):
    """The URL's host resolves to an address deliveries may not reach (or does not resolve)."""


@dataclass(frozen=True)
class PostResult:
    """What one attempt got: the status code (None when no answer came) and an error message."""

    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def resolve_checked(host: str, port: int, *, allow_private: bool) -> str:
    """The first address of `host` after checking every one it resolves to; AddressRefused otherwise."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise AddressRefused(f"cannot resolve {host!r}: {e}") from e
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not address_allowed(ip, allow_private=allow_private):
            raise AddressRefused(
                f"{host!r} resolves to {address}, a private, loopback or link-local address; the operator "
                "allows those with LORAFLEET_WEBHOOK_ALLOW_PRIVATE=true"
            )
    if not addresses:
        raise AddressRefused(f"{host!r} resolves to no address")
    return addresses[0]


def post(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float, allow_private: bool) -> PostResult:
    """POST `body` to `url` once. Never raises for network trouble: the error is in the result."""
    started = time.monotonic()

    def result(status: int | None, error: str | None) -> PostResult:
        return PostResult(status, error, int((time.monotonic() - started) * 1000))

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fired = threading.Event()
    too_slow = f"no complete answer within {_TOTAL_TIMEOUT_FACTOR * timeout_s:g} s"
    try:
        address = resolve_checked(host, port, allow_private=allow_private)
        sock = socket.create_connection((address, port), timeout=timeout_s)
        # The socket timeout bounds each read; this bounds the whole exchange, so a receiver trickling
        # bytes cannot hold a sender: the socket is shut down under the request when it fires.
        deadline = threading.Timer(_TOTAL_TIMEOUT_FACTOR * timeout_s, _shut, args=(sock, fired))
        deadline.start()
        try:
            if parts.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            # http.client uses a socket already set and never follows redirects (a 3xx is a failed attempt).
            conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            conn.sock = sock
            try:
                conn.request("POST", path, body=body, headers={**headers, "Content-Type": "application/json"})
                status = conn.getresponse().status  # the status line is all we need; the body is not read
            finally:
                conn.close()
        finally:
            deadline.cancel()
        if fired.is_set():  # what was read before the shutdown may look complete: it is not an answer
            return result(None, too_slow)
    except AddressRefused as e:
        return result(None, f"refused: {e}")
    except (OSError, http.client.HTTPException) as e:
        if fired.is_set():
            return result(None, too_slow)
        return result(None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    if 200 <= status < 300:
        return result(status, None)
    return result(status, f"the receiver answered HTTP {status}")
