"""`/v1/admin`: tenants, API keys, quotas and the cluster view. The operator manages every tenant; a
tenant's admin key its own keys. Quotas and the cluster view are the operator's alone.

Raw API keys appear exactly once, in the response that creates them; only their sha256 is stored.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from fleet.exceptions import NotFound
from fleet.quotas import QuotaStore, TenantQuota
from fleet.scheduler_view import cluster_view
from fleet.tenants import ApiKey, Principal, Tenant
from service.deps import AdminPrincipal, OperatorPrincipal, QuotasDep, RedisDep, TenantsDep
from service.errors import APIError
from service.objects import list_envelope
from service.openapi import TENANT_ERRORS
from service.schemas import KeyCreateRequest, QuotaRequest, TenantCreateRequest

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/admin", tags=["admin"], responses=TENANT_ERRORS)


def _tenant_object(tenant: Tenant) -> dict[str, Any]:
    return {"id": tenant.id, "object": "tenant", "name": tenant.name, "created_at": tenant.created_at}


def _key_object(key: ApiKey, raw_key: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": key.id,
        "object": "api_key",
        "tenant_id": key.tenant_id,
        "role": key.role,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "hint": key.hint,
    }
    if raw_key is not None:
        obj["api_key"] = raw_key
    return obj


def _check_scope(principal: Principal, tenant_id: str) -> None:
    """A tenant admin sees only its own tenant: another one is 404, exactly like a missing one."""
    if not principal.is_operator and principal.tenant_id != tenant_id:
        raise NotFound(f"No tenant with id {tenant_id!r}.", param="tenant_id")


@router.post("/tenants")
def create_tenant(body: TenantCreateRequest, principal: AdminPrincipal, tenants: TenantsDep) -> dict:
    """Create a tenant and its first (admin-role) API key, returned once as `api_key`."""
    if not principal.is_operator:
        raise APIError(403, "Only the operator's admin key can create tenants.", type="permission_error",
                       code="operator_required")
    tenant, raw_key = tenants.create_tenant(body.name)
    first_key = tenants.list_keys(tenant.id)[0]
    logger.info("created tenant %s (%s)", tenant.id, tenant.name)
    return {**_tenant_object(tenant), "api_key": raw_key, "key_id": first_key.id}


@router.get("/tenants")
def list_tenants(principal: AdminPrincipal, tenants: TenantsDep) -> dict:
    """Every tenant for the operator; a tenant admin sees its own."""
    if principal.is_operator:
        found = tenants.list_tenants()
    else:
        found = [tenants.get_tenant(principal.tenant_id)]
    return list_envelope([_tenant_object(t) for t in found], has_more=False)


@router.get("/tenants/{tenant_id}")
def retrieve_tenant(tenant_id: str, principal: AdminPrincipal, tenants: TenantsDep) -> dict:
    _check_scope(principal, tenant_id)
    return _tenant_object(tenants.get_tenant(tenant_id))


@router.get("/tenants/{tenant_id}/keys")
def list_keys(tenant_id: str, principal: AdminPrincipal, tenants: TenantsDep) -> dict:
    """The tenant's keys (revoked ones with `revoked_at`); never the secrets."""
    _check_scope(principal, tenant_id)
    tenants.get_tenant(tenant_id)
    return list_envelope([_key_object(k) for k in tenants.list_keys(tenant_id)], has_more=False)


@router.post("/tenants/{tenant_id}/keys")
def issue_key(
    tenant_id: str, principal: AdminPrincipal, tenants: TenantsDep, body: KeyCreateRequest | None = None
) -> dict:
    """Issue another API key for the tenant; the raw key is in `api_key`, shown once."""
    _check_scope(principal, tenant_id)
    record, raw_key = tenants.issue_key(tenant_id, (body or KeyCreateRequest()).role)
    logger.info("issued key %s (%s) for tenant %s", record.id, record.role, tenant_id)
    return _key_object(record, raw_key)


@router.delete("/keys/{key_id}")
def revoke_key(key_id: str, principal: AdminPrincipal, tenants: TenantsDep) -> dict:
    """Revoke a key; requests with it answer 401 from now on. Revoking twice is harmless."""
    record = tenants.revoke_key(key_id, tenant_id=None if principal.is_operator else principal.tenant_id)
    logger.info("revoked key %s of tenant %s", key_id, record.tenant_id)
    return {**_key_object(record), "revoked": True}


# --- quotas (operator only) ------------------------------------------------------------------------------
def _quota_object(tenant_id: str | None, quota: TenantQuota, *, is_default: bool) -> dict[str, Any]:
    """A tenant's quota (or the default one: `tenant_id` None, id "default") as the admin API shows it."""
    return {"object": "tenant.quota", "id": tenant_id or "default", "tenant_id": tenant_id, "is_default": is_default,
            **quota.model_dump()}


def _tenant_quota(quotas: QuotaStore, tenant_id: str) -> dict[str, Any]:
    own = quotas.list().get(tenant_id)
    return _quota_object(tenant_id, own or quotas.default, is_default=own is None)


@router.get("/quotas")
def list_quotas(principal: OperatorPrincipal, quotas: QuotasDep) -> dict:
    """The quotas set per tenant, and `default`: what every other tenant gets (LORAFLEET_DEFAULT_QUOTA)."""
    page = [_quota_object(tenant_id, quota, is_default=False) for tenant_id, quota in quotas.list().items()]
    return {**list_envelope(page, has_more=False), "default": _quota_object(None, quotas.default, is_default=True)}


@router.get("/tenants/{tenant_id}/quota")
def retrieve_quota(tenant_id: str, principal: OperatorPrincipal, tenants: TenantsDep, quotas: QuotasDep) -> dict:
    """The tenant's quota; `is_default` when none was set for it (then it is the default quota)."""
    tenants.get_tenant(tenant_id)
    return _tenant_quota(quotas, tenant_id)


@router.put("/tenants/{tenant_id}/quota")
def set_quota(
    tenant_id: str, body: QuotaRequest, principal: OperatorPrincipal, tenants: TenantsDep, quotas: QuotasDep
) -> dict:
    """Replace the tenant's quota (omitted fields take their defaults: no limit, weight 1); the next
    submission and scheduling decision use it."""
    tenants.get_tenant(tenant_id)
    quota = quotas.set(tenant_id, TenantQuota.model_validate(body.model_dump()))
    logger.info("quota of tenant %s set to %s", tenant_id, quota.model_dump())
    return _quota_object(tenant_id, quota, is_default=False)


@router.delete("/tenants/{tenant_id}/quota")
def reset_quota(tenant_id: str, principal: OperatorPrincipal, tenants: TenantsDep, quotas: QuotasDep) -> dict:
    """Back to the default quota. Resetting twice is harmless."""
    tenants.get_tenant(tenant_id)
    quotas.reset(tenant_id)
    logger.info("quota of tenant %s reset to the default", tenant_id)
    return _quota_object(tenant_id, quotas.default, is_default=True)


# --- the cluster (operator only) -------------------------------------------------------------------------
@router.get("/cluster")
def retrieve_cluster(principal: OperatorPrincipal, client: RedisDep, tenants: TenantsDep) -> dict:
    """Nodes and their GPUs, GPU totals, and per tenant that runs or waits: its quota, running jobs and
    GPUs, borrowed GPUs, queued jobs, share score and why its next job waits."""
    view = cluster_view(client)
    names = {t.id: t.name for t in tenants.list_tenants()}
    body = view.model_dump(mode="json")
    for tenant in body["tenants"]:
        tenant["tenant_name"] = names.get(tenant["tenant_id"])
    return {"object": "cluster", **body}
