"""Tenants (teams) and their API keys in Redis; keys are random, shown once, and stored only as sha256."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import redis
from pydantic import BaseModel

from fleet import keys
from fleet.exceptions import Conflict, InvalidRequest, NotFound
from fleet.settings import check_redis_client

__all__ = [
    "Role",
    "PRINCIPAL_CACHE_TTL_S",
    "Tenant",
    "ApiKey",
    "Principal",
    "TenantStore",
    "OPERATOR_KEY_ID",
    "validate_tenant_name",
]

Role = Literal["admin", "member"]
KEY_PREFIX = "lf-"
OPERATOR_KEY_ID = "operator"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_ID_CACHE_SIZE = 10_000
# How long a process may keep answering for a key it authenticated without asking Redis again: a key
# revoked elsewhere (another API process) stops working within this bound; in the revoking process at once.
PRINCIPAL_CACHE_TTL_S = 2.0
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")  # ids end up in key names: no ':' ever


class Tenant(BaseModel):
    id: str
    name: str
    created_at: int


class ApiKey(BaseModel):
    """An API key's record; the raw key itself is never stored."""

    id: str
    tenant_id: str
    role: Role
    created_at: int
    revoked_at: int | None = None
    hint: str = ""  # first characters of the raw key, to tell keys apart in listings


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant's key (role admin|member) or the operator (tenant_id None)."""

    tenant_id: str | None
    key_id: str
    role: Literal["operator", "admin", "member"]

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


def validate_tenant_name(name: str) -> str:
    """Return `name` if valid (1-64 chars of [A-Za-z0-9._-], starting alphanumeric), else InvalidRequest."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"Invalid tenant name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit.",
            param="name",
        )
    return name


def _hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


class TenantStore:
    """Tenants and API keys. `admin_key` is the operator's key from settings (or None: no operator key)."""

    def __init__(self, client: redis.Redis, *, admin_key: str | None = None) -> None:
        check_redis_client(client)
        self.redis = client
        self._admin_key = admin_key
        self._key_ids: dict[str, str] = {}  # sha256 of a raw key -> its key id (immutable once issued)
        # sha256 of a raw key -> (its principal, time.monotonic() until which it may be answered unread)
        self._principals: dict[str, tuple[Principal, float]] = {}

    def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """Create a tenant and its first admin key; returns (tenant, raw key). The key is shown only once."""
        validate_tenant_name(name)
        tenant = Tenant(id="tenant-" + secrets.token_hex(8), name=name, created_at=int(time.time()))
        if not self.redis.hsetnx(keys.tenant_names(), name, tenant.id):
            raise Conflict(f"A tenant named {name!r} already exists.", param="name", code="tenant_exists")
        pipe = self.redis.pipeline()
        pipe.hset(keys.tenant(tenant.id), mapping=tenant.model_dump(mode="json"))
        pipe.zadd(keys.tenants(), {tenant.id: tenant.created_at})
        pipe.execute()
        _, raw_key = self.issue_key(tenant.id, "admin")
        return tenant, raw_key

    def get_tenant(self, tenant_id: str) -> Tenant:
        fields = self.redis.hgetall(keys.tenant(tenant_id)) if _ID_RE.fullmatch(tenant_id) else None
        if not fields:
            raise NotFound(f"No tenant with id {tenant_id!r}.", param="tenant_id")
        return Tenant.model_validate(fields)

    def list_tenants(self) -> list[Tenant]:
        """Every tenant, oldest first."""
        ids = self.redis.zrange(keys.tenants(), 0, -1)
        pipe = self.redis.pipeline(transaction=False)
        for tenant_id in ids:
            pipe.hgetall(keys.tenant(tenant_id))
        return [Tenant.model_validate(f) for f in pipe.execute() if f]

    def issue_key(self, tenant_id: str, role: Role = "member") -> tuple[ApiKey, str]:
        """Issue a new API key for a tenant; returns (record, raw key "lf-..."). The raw key is shown once."""
        if role not in ("admin", "member"):
            raise InvalidRequest(f"Unknown role {role!r}; use 'admin' or 'member'.", param="role")
        self.get_tenant(tenant_id)
        raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(
            id="key-" + secrets.token_hex(8),
            tenant_id=tenant_id,
            role=role,
            created_at=int(time.time()),
            hint=raw_key[:7],
        )
        fields = record.model_dump(mode="json", exclude_none=True)
        fields["sha256"] = _hash_key(raw_key)
        pipe = self.redis.pipeline()
        pipe.hset(keys.api_key(record.id), mapping=fields)
        pipe.set(keys.api_key_by_hash(fields["sha256"]), record.id)
        pipe.sadd(keys.tenant_keys(tenant_id), record.id)
        pipe.execute()
        return record, raw_key

    def get_key(self, key_id: str) -> ApiKey:
        fields = self.redis.hgetall(keys.api_key(key_id)) if _ID_RE.fullmatch(key_id) else None
        if not fields:
            raise NotFound(f"No API key with id {key_id!r}.", param="key_id")
        return ApiKey.model_validate(fields)

    def list_keys(self, tenant_id: str) -> list[ApiKey]:
        """A tenant's keys (revoked ones included, with revoked_at), oldest first."""
        self.get_tenant(tenant_id)
        pipe = self.redis.pipeline(transaction=False)
        for key_id in self.redis.smembers(keys.tenant_keys(tenant_id)):
            pipe.hgetall(keys.api_key(key_id))
        records = [ApiKey.model_validate(f) for f in pipe.execute() if f]
        return sorted(records, key=lambda k: (k.created_at, k.id))

    def revoke_key(self, key_id: str, *, tenant_id: str | None = None) -> ApiKey:
        """Revoke a key at once (later requests with it authenticate as nobody). Idempotent.

        With `tenant_id`, a key of another tenant raises NotFound (for tenant admins revoking their own).
        """
        fields = self.redis.hgetall(keys.api_key(key_id)) if _ID_RE.fullmatch(key_id) else None
        if not fields or (tenant_id is not None and fields.get("tenant_id") != tenant_id):
            raise NotFound(f"No API key with id {key_id!r}.", param="key_id")
        pipe = self.redis.pipeline()
        pipe.delete(keys.api_key_by_hash(fields["sha256"]))
        if "revoked_at" not in fields:
            pipe.hset(keys.api_key(key_id), "revoked_at", int(time.time()))
        pipe.execute()
        self._principals.pop(fields["sha256"], None)  # this process refuses it from now on
        return self.get_key(key_id)

    def authenticate(self, raw_key: str) -> Principal | None:
        """The principal a raw bearer key stands for, or None (unknown, revoked or malformed)."""
        if not raw_key:
            return None
        if self._admin_key is not None and hmac.compare_digest(raw_key.encode(), self._admin_key.encode()):
            return Principal(tenant_id=None, key_id=OPERATOR_KEY_ID, role="operator")
        if not raw_key.startswith(KEY_PREFIX):
            return None
        digest = _hash_key(raw_key)
        # A key's id never changes for its hash, so it is cached: one Redis read per request, the key's
        # record, which still says at once whether it was revoked (by any process).
        key_id = self._key_ids.get(digest)
        if key_id is None:
            key_id = self.redis.get(keys.api_key_by_hash(digest))
            if key_id is None:
                return None
            if len(self._key_ids) >= _KEY_ID_CACHE_SIZE:
                self._key_ids.clear()
            self._key_ids[digest] = key_id
        fields = self.redis.hgetall(keys.api_key(key_id))
        if not fields or "revoked_at" in fields or fields.get("sha256") != digest:
            self._principals.pop(digest, None)
            return None
        principal = Principal(tenant_id=fields["tenant_id"], key_id=key_id, role=fields["role"])  # type: ignore[arg-type]
        if len(self._principals) >= _KEY_ID_CACHE_SIZE:
            self._principals.clear()
        self._principals[digest] = (principal, time.monotonic() + PRINCIPAL_CACHE_TTL_S)
        return principal

    def recently_authenticated(self, raw_key: str) -> Principal | None:
        """The principal for `raw_key` without touching Redis: the operator's key, or a key `authenticate`
        accepted in this process less than PRINCIPAL_CACHE_TTL_S ago (and this process has not revoked
        since). None means "ask `authenticate`", not "refused"."""
        if self._admin_key is not None and hmac.compare_digest(raw_key.encode(), self._admin_key.encode()):
            return Principal(tenant_id=None, key_id=OPERATOR_KEY_ID, role="operator")
        cached = self._principals.get(_hash_key(raw_key))
        if cached is None or time.monotonic() >= cached[1]:
            return None
        return cached[0]
