"""`/v1/models`: the catalog's base models and the tenant's fine-tuned adapter versions, as OpenAI models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from fleet.catalog import BaseModelSpec
from fleet.exceptions import InvalidRequest, NotFound
from fleet.registry import AdapterVersion
from service.deps import CatalogDep, CurrentTenant, RegistryDep
from service.objects import list_envelope, model_object
from service.openapi import TENANT_ERRORS

__all__ = ["router"]

router = APIRouter(prefix="/models", tags=["models"], responses=TENANT_ERRORS)

BASE_MODEL_OWNER = "lorafleet"


def _base_model(name: str, spec: BaseModelSpec, created: int) -> dict[str, Any]:
    return model_object(
        name,
        created=created,
        owned_by=BASE_MODEL_OWNER,
        kind="base",
        max_rank=spec.max_rank,
        quantization=spec.quantization,
        resources=spec.default_resources().model_dump(),
        description=spec.description,
    )


def _adapter_model(version: AdapterVersion) -> dict[str, Any]:
    return model_object(
        version.ref,
        created=version.created_at,
        owned_by=version.tenant_id,
        kind="adapter",
        root=version.base_model,
        parent=version.base_model,
        job_id=version.job_id,
    )


@router.get("")
def list_models(request: Request, tenant: CurrentTenant, catalog: CatalogDep, registry: RegistryDep) -> dict:
    """Base models first (sorted), then every live version of the tenant's adapters (newest first)."""
    created = request.app.state.started_at
    data = [_base_model(name, spec, created) for name, spec in catalog.items()]
    for summary in registry.list_adapters(tenant.tenant_id):
        data.extend(_adapter_model(v) for v in registry.list_versions(tenant.tenant_id, summary.name))
    return list_envelope(data, has_more=False)


@router.get("/{model:path}")
def retrieve_model(
    model: str, request: Request, tenant: CurrentTenant, catalog: CatalogDep, registry: RegistryDep
) -> dict:
    """A base model by name, or an adapter version by `<name>:v<N>`."""
    if model in catalog:
        return _base_model(model, catalog.get(model), request.app.state.started_at)
    try:
        return _adapter_model(registry.get_version(tenant.tenant_id, model))
    except InvalidRequest:
        raise NotFound(f"The model {model!r} does not exist.", param="model", code="model_not_found") from None


@router.delete("/{model:path}")
def delete_model(model: str, tenant: CurrentTenant, catalog: CatalogDep, registry: RegistryDep) -> dict:
    """Delete a fine-tuned model (soft-deletes the adapter version); base models cannot be deleted."""
    if model in catalog:
        raise InvalidRequest(f"{model!r} is a base model of the catalog; it cannot be deleted.", param="model")
    try:
        record = registry.delete_version(tenant.tenant_id, model)
    except (NotFound, InvalidRequest):  # not a version reference at all: no such model either, as for GET
        raise NotFound(f"The model {model!r} does not exist.", param="model", code="model_not_found") from None
    return {"id": record.ref, "object": "model", "deleted": True}
