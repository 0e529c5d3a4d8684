"""Webhook endpoints (per tenant), event types and payloads, and Standard Webhooks signatures.

Events follow OpenAI's thin payload `{"id": "evt_…", "object": "event", "created_at", "type",
"data": {"id": "ftjob-…"}}`; requests carry the Standard Webhooks headers `webhook-id`,
`webhook-timestamp` and `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, keyed
with the endpoint's `whsec_<base64>` secret. Delivery itself lives in fleet.webhook_delivery.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fleet import keys
from fleet.exceptions import InvalidRequest, NotFound
from fleet.settings import check_redis_client

if TYPE_CHECKING:
    import redis

__all__ = [
    "EVENT_TYPES",
    "TEST_EVENT_TYPE",
    "Endpoint",
    "EndpointStore",
    "new_secret",
    "sign",
    "event_payload",
    "event_id_for",
    "validate_url",
    "validate_event_types",
    "address_allowed",
    "MAX_URL_LENGTH",
]

# Every type an endpoint may subscribe to. `preempted` is reserved for the scheduler (not sent yet).
EVENT_TYPES: tuple[str, ...] = (
    "fine_tuning.job.succeeded",
    "fine_tuning.job.failed",
    "fine_tuning.job.cancelled",
    "fine_tuning.job.queued",
    "fine_tuning.job.running",
    "fine_tuning.job.paused",
    "fine_tuning.job.preempted",
    "fine_tuning.job.checkpoint.created",
    "adapter.version.published",
)
TEST_EVENT_TYPE = "webhook.test"  # sent by "send a test event" to that one endpoint only
MAX_ENDPOINTS_PER_TENANT = 20
MAX_URL_LENGTH = 2048
_SECRET_PREFIX = "whsec_"
_SECRET_BYTES = 32


@dataclass(frozen=True)
class Endpoint:
    """A tenant's webhook endpoint; `secret` is only shown to the tenant at create and rotate."""

    id: str
    tenant_id: str
    url: str
    event_types: tuple[str, ...]
    secret: str
    created_at: int

    def wants(self, event_type: str) -> bool:
        return event_type in self.event_types


def new_secret() -> str:
    """`whsec_` + base64 of 32 random bytes, as Standard Webhooks libraries expect."""
    return _SECRET_PREFIX + base64.b64encode(secrets.token_bytes(_SECRET_BYTES)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`."""
    key = base64.b64decode(secret.removeprefix(_SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def event_id_for(stream_entry_id: str) -> str:
    """A stable event id from the outbox entry id ("1700000000000-3" → "evt_1700000000000_3")."""
    return "evt_" + stream_entry_id.replace("-", "_")


def event_payload(event_id: str, event_type: str, created_at: int, data: dict) -> bytes:
    """The request body every endpoint receives for an event (OpenAI's event object)."""
    event = {"id": event_id, "object": "event", "created_at": created_at, "type": event_type, "data": data}
    return json.dumps(event, separators=(",", ":")).encode()


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, *, allow_private: bool) -> bool:
    """Whether a delivery may connect to `ip`: only public unicast addresses unless private ones are allowed."""
    if allow_private:
        return not ip.is_unspecified and not ip.is_multicast
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def validate_url(url: str, *, allow_private: bool) -> str:
    """`url` if it is an http(s) URL with a host; a host written as a non-public address (or
    `localhost`) is refused unless private addresses are allowed. Names are checked again, resolved,
    at every delivery."""
    if not isinstance(url, str) or len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"'url' must be a string of at most {MAX_URL_LENGTH} characters.", param="url")
    try:
        parts = urlsplit(url)
        _port = parts.port  # raises ValueError on a port that is not a number in range
    except ValueError as e:
        raise InvalidRequest(f"'url' is not a valid URL: {e}.", param="url") from e
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest("'url' must be an http:// or https:// URL with a host name.", param="url")
    if allow_private:
        return url
    host = parts.hostname
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if host.lower() == "localhost" or host.lower().endswith(".localhost") or (
        ip is not None and not address_allowed(ip, allow_private=False)
    ):
        raise InvalidRequest(
            f"'url' points at a private, loopback or link-local address ({host}); webhooks go to public "
            "addresses only unless the operator sets LORAFLEET_WEBHOOK_ALLOW_PRIVATE=true.",
            param="url",
        )
    return url


def validate_event_types(event_types: list[str] | None) -> tuple[str, ...]:
    """The subscribed types (all of EVENT_TYPES when None); unknown or empty lists are refused."""
    if event_types is None:
        return EVENT_TYPES
    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown or not event_types:
        raise InvalidRequest(
            f"'event_types' must be a non-empty list of: {', '.join(EVENT_TYPES)}"
            + (f" (unknown: {', '.join(map(repr, unknown))})." if unknown else "."),
            param="event_types",
        )
    return tuple(dict.fromkeys(event_types))


def _endpoint_from(record: dict[str, str]) -> Endpoint:
    return Endpoint(
        id=record["id"],
        tenant_id=record["tenant_id"],
        url=record["url"],
        event_types=tuple(json.loads(record["event_types"])),
        secret=record["secret"],
        created_at=int(record["created_at"]),
    )


def _valid_endpoint_id(endpoint_id: str) -> bool:
    return endpoint_id.startswith("we_") and endpoint_id[3:].isalnum() and len(endpoint_id) <= 40


class EndpointStore:
    """Tenants' webhook endpoints in Redis: create, list, get, delete, rotate the secret."""

    def __init__(self, client: redis.Redis) -> None:
        check_redis_client(client)
        self._r = client

    def create(self, tenant_id: str, url: str, event_types: tuple[str, ...]) -> Endpoint:
        if self._r.zcard(keys.tenant_webhooks(tenant_id)) >= MAX_ENDPOINTS_PER_TENANT:
            raise InvalidRequest(
                f"A tenant has at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints; delete one first.",
                param="url",
            )
        now = time.time()
        endpoint = Endpoint(
            id="we_" + secrets.token_hex(12), tenant_id=tenant_id, url=url, event_types=event_types,
            secret=new_secret(), created_at=int(now),
        )
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.webhook_endpoint(endpoint.id), mapping={
                "id": endpoint.id, "tenant_id": tenant_id, "url": url,
                "event_types": json.dumps(list(event_types)), "secret": endpoint.secret,
                "created_at": endpoint.created_at,
            })
            pipe.zadd(keys.tenant_webhooks(tenant_id), {endpoint.id: int(now * 1000)})
            pipe.execute()
        return endpoint

    def get(self, tenant_id: str | None, endpoint_id: str) -> Endpoint:
        """The endpoint (any tenant's when `tenant_id` is None); NotFound if missing or another tenant's."""
        record = self._r.hgetall(keys.webhook_endpoint(endpoint_id)) if _valid_endpoint_id(endpoint_id) else {}
        if not record or (tenant_id is not None and record.get("tenant_id") != tenant_id):
            raise NotFound(f"No webhook endpoint with id {endpoint_id!r}.", param="endpoint_id")
        return _endpoint_from(record)

    def list(self, tenant_id: str) -> list[Endpoint]:
        """The tenant's endpoints, oldest first."""
        ids = self._r.zrange(keys.tenant_webhooks(tenant_id), 0, -1)
        found = []
        for endpoint_id in ids:
            record = self._r.hgetall(keys.webhook_endpoint(endpoint_id))
            if record:
                found.append(_endpoint_from(record))
        return found

    def delete(self, tenant_id: str, endpoint_id: str) -> None:
        self.get(tenant_id, endpoint_id)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.webhook_endpoint(endpoint_id), keys.webhook_log(endpoint_id))
            pipe.zrem(keys.tenant_webhooks(tenant_id), endpoint_id)
            pipe.execute()

    def rotate_secret(self, tenant_id: str, endpoint_id: str) -> Endpoint:
        """A new secret, used from the next attempt on (pending retries are signed with it too)."""
        endpoint = self.get(tenant_id, endpoint_id)
        secret = new_secret()
        self._r.hset(keys.webhook_endpoint(endpoint_id), "secret", secret)
        return dataclasses.replace(endpoint, secret=secret)

    def delivery_log(self, tenant_id: str, endpoint_id: str, limit: int) -> list[dict]:
        """The endpoint's latest delivery attempts, newest first."""
        self.get(tenant_id, endpoint_id)
        return [json.loads(line) for line in self._r.lrange(keys.webhook_log(endpoint_id), 0, limit - 1)]
