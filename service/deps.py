"""FastAPI dependencies: the app's shared clients and stores, and who is calling (Bearer API keys).

`RedisDep`, `JobsDep`, ... hand routes what the lifespan built; `CurrentTenant` is a tenant's principal
(401 without a valid, unrevoked key), `AdminPrincipal` the operator or a tenant's admin-role key.
"""

from __future__ import annotations

from typing import Annotated

import redis
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from fleet.capacity import CapacityStore
from fleet.catalog import Catalog
from fleet.files import FileStore
from fleet.log_format import set_log_tenant
from fleet.objectstore import ObjectStore
from fleet.queue import JobStore
from fleet.quotas import QuotaStore
from fleet.registry import AdapterRegistry
from fleet.settings import Settings
from fleet.tenants import Principal, TenantStore
from service.errors import APIError

__all__ = [
    "SettingsDep",
    "RedisDep",
    "StoreDep",
    "CatalogDep",
    "JobsDep",
    "TenantsDep",
    "FilesDep",
    "RegistryDep",
    "QuotasDep",
    "CapacityDep",
    "Principal",
    "CallerPrincipal",
    "CurrentTenant",
    "AdminPrincipal",
    "OperatorPrincipal",
]


# The getters only read app state, so they are async: FastAPI runs a sync dependency in its threadpool,
# a hand-off per dependency per request. get_principal is async too: it reads Redis (in the threadpool)
# only when the key was not authenticated in this process within the last PRINCIPAL_CACHE_TTL_S.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store


async def get_catalog(request: Request) -> Catalog:
    return request.app.state.catalog


def _redis_unreachable() -> APIError:
    return APIError(503, "The service's state store (Redis) is unreachable; retry in a few seconds.",
                    type="server_error", code="service_unavailable", headers={"Retry-After": "5"})


async def get_jobs(request: Request) -> JobStore:
    jobs = request.app.state.jobs
    if jobs is None:  # Redis has been unreachable since the API started (service.app)
        raise _redis_unreachable()
    return jobs


async def get_tenants(request: Request) -> TenantStore:
    return request.app.state.tenants


async def get_files(request: Request) -> FileStore:
    return request.app.state.files


async def get_registry(request: Request) -> AdapterRegistry:
    return request.app.state.registry


async def get_quotas(request: Request) -> QuotaStore:
    quotas = request.app.state.quotas
    if quotas is None:  # Redis has been unreachable since the API started (service.app)
        raise _redis_unreachable()
    return quotas


async def get_capacity(request: Request) -> CapacityStore:
    return request.app.state.capacity


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
CatalogDep = Annotated[Catalog, Depends(get_catalog)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
TenantsDep = Annotated[TenantStore, Depends(get_tenants)]
FilesDep = Annotated[FileStore, Depends(get_files)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
QuotasDep = Annotated[QuotaStore, Depends(get_quotas)]
CapacityDep = Annotated[CapacityStore, Depends(get_capacity)]

_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="lorafleet"'}


def _masked(key: str) -> str:
    """`lf-abcdefgh...wxyz` → `lf-abc****wxyz`: enough to recognise a key in an error, never the secret."""
    if len(key) <= 10:
        return "*" * len(key)
    return f"{key[:6]}****{key[-4:]}"


async def get_principal(request: Request, tenants: TenantsDep) -> Principal:
    """The caller behind `Authorization: Bearer <key>`; 401 when missing, malformed, unknown or revoked.

    A key revoked through another API process stops working here within PRINCIPAL_CACHE_TTL_S (2 s);
    through this one, at once."""
    header = request.headers.get("authorization")
    if not header:
        raise APIError(
            401,
            "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
            "(i.e. 'Authorization: Bearer YOUR_KEY'). `lorafleet up` prints one; an operator issues more "
            "with `lorafleet admin issue-key`.",
            type="invalid_request_error",
            code="missing_api_key",
            headers=_WWW_AUTHENTICATE,
        )
    scheme, _, raw_key = header.partition(" ")
    raw_key = raw_key.strip()
    if scheme.lower() != "bearer" or not raw_key:
        raise APIError(
            401,
            "The Authorization header must be 'Bearer YOUR_KEY'.",
            type="invalid_request_error",
            code="invalid_authorization_header",
            headers=_WWW_AUTHENTICATE,
        )
    principal = tenants.recently_authenticated(raw_key)  # no I/O: the event loop is not blocked
    if principal is None:
        principal = await run_in_threadpool(tenants.authenticate, raw_key)
    if principal is None:
        raise APIError(
            401,
            f"Incorrect API key provided: {_masked(raw_key)}. The key is unknown or has been revoked; "
            "ask your tenant admin or the operator for a new one.",
            type="invalid_request_error",
            code="invalid_api_key",
            headers=_WWW_AUTHENTICATE,
        )
    return principal


CallerPrincipal = Annotated[Principal, Depends(get_principal)]


async def get_tenant_principal(principal: CallerPrincipal) -> Principal:
    """A caller acting as a tenant (the tenant's own resources); the operator key has no tenant."""
    if principal.tenant_id is not None:
        set_log_tenant(principal.tenant_id)  # this request's log lines name the tenant (fleet.log_format)
    if principal.tenant_id is None:
        raise APIError(
            403,
            "The operator key manages tenants and keys only; use a tenant's API key for files, jobs, "
            "models and adapters.",
            type="permission_error",
            code="tenant_key_required",
        )
    return principal


def _require_role(principal: Principal, roles: tuple[str, ...], message: str, code: str) -> Principal:
    if principal.role not in roles:
        raise APIError(403, message, type="permission_error", code=code)
    return principal


async def get_admin_principal(principal: CallerPrincipal) -> Principal:
    """The operator, or a tenant's admin-role key (which may only manage its own tenant's keys)."""
    return _require_role(principal, ("operator", "admin"),
                         "This endpoint needs the operator's admin key or an admin-role API key.", "admin_required")


async def get_operator_principal(principal: CallerPrincipal) -> Principal:
    """The operator (the settings' admin key): operator-wide data such as /metrics, never a tenant's key."""
    return _require_role(principal, ("operator",),
                         "This endpoint needs the operator's admin key (LORAFLEET_ADMIN_KEY); tenant keys cannot "
                         "read it.", "operator_required")


CurrentTenant = Annotated[Principal, Depends(get_tenant_principal)]
AdminPrincipal = Annotated[Principal, Depends(get_admin_principal)]
OperatorPrincipal = Annotated[Principal, Depends(get_operator_principal)]
