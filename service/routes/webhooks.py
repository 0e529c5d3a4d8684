"""`/v1/webhooks/endpoints`: a tenant's webhook endpoints (create, list, retrieve, delete, rotate the
secret, send a test event) and each endpoint's delivery log. Secrets are shown at create and rotate only."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

from fleet.webhook_delivery import send_test_event
from fleet.webhooks import EVENT_TYPES, MAX_URL_LENGTH, Endpoint, EndpointStore, validate_event_types, validate_url
from service.deps import CurrentTenant, RedisDep, SettingsDep
from service.objects import list_envelope
from service.openapi import TENANT_ERRORS

__all__ = ["router", "endpoint_object"]

router = APIRouter(prefix="/webhooks", tags=["webhooks"], responses=TENANT_ERRORS)

EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]  # the tuple's members, as the schema's enum
EndpointId = Annotated[str, PathParam(json_schema_extra={"pattern": r"^we_[0-9a-f]{24}$"})]


class EndpointCreateRequest(BaseModel):
    """`POST /v1/webhooks/endpoints`: where to send which events (all types when `event_types` is omitted)."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=MAX_URL_LENGTH, json_schema_extra={"format": "uri"})
    event_types: list[EventType] | None = Field(default=None, min_length=1)


def endpoint_object(endpoint: Endpoint, *, with_secret: bool = False) -> dict[str, Any]:
    """The `webhook_endpoint` object; the secret only in the answers to create and rotate."""
    body: dict[str, Any] = {
        "id": endpoint.id,
        "object": "webhook_endpoint",
        "url": endpoint.url,
        "event_types": list(endpoint.event_types),
        "created_at": endpoint.created_at,
    }
    if with_secret:
        body["secret"] = endpoint.secret
    return body


@router.post("/endpoints")
def create_endpoint(
    body: EndpointCreateRequest, tenant: CurrentTenant, client: RedisDep, settings: SettingsDep
) -> dict:
    """Register an endpoint; the answer holds its `whsec_…` secret, shown this once."""
    url = validate_url(body.url, allow_private=settings.webhook_allow_private)
    event_types = validate_event_types(list(body.event_types) if body.event_types is not None else None)
    endpoint = EndpointStore(client).create(tenant.tenant_id, url, event_types)
    return endpoint_object(endpoint, with_secret=True)


@router.get("/endpoints")
def list_endpoints(tenant: CurrentTenant, client: RedisDep) -> dict:
    """The tenant's endpoints, oldest first (without secrets)."""
    endpoints = EndpointStore(client).list(tenant.tenant_id)
    return list_envelope([endpoint_object(e) for e in endpoints], has_more=False)


@router.get("/endpoints/{endpoint_id}")
def retrieve_endpoint(endpoint_id: EndpointId, tenant: CurrentTenant, client: RedisDep) -> dict:
    return endpoint_object(EndpointStore(client).get(tenant.tenant_id, endpoint_id))


@router.delete("/endpoints/{endpoint_id}")
def delete_endpoint(endpoint_id: EndpointId, tenant: CurrentTenant, client: RedisDep) -> dict:
    """Delete the endpoint; its pending deliveries are dropped."""
    EndpointStore(client).delete(tenant.tenant_id, endpoint_id)
    return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


@router.post("/endpoints/{endpoint_id}/rotate_secret")
def rotate_secret(endpoint_id: EndpointId, tenant: CurrentTenant, client: RedisDep) -> dict:
    """A new secret, shown this once; every later attempt (retries too) is signed with it."""
    endpoint = EndpointStore(client).rotate_secret(tenant.tenant_id, endpoint_id)
    return endpoint_object(endpoint, with_secret=True)


@router.post("/endpoints/{endpoint_id}/test")
def send_test(endpoint_id: EndpointId, tenant: CurrentTenant, client: RedisDep) -> dict:
    """Send a `webhook.test` event to this endpoint alone, delivered (and retried) like any event."""
    endpoint = EndpointStore(client).get(tenant.tenant_id, endpoint_id)
    return {"object": "webhook.test", "event_id": send_test_event(client, endpoint), "endpoint_id": endpoint.id}


@router.get("/endpoints/{endpoint_id}/deliveries")
def list_deliveries(
    endpoint_id: EndpointId,
    tenant: CurrentTenant,
    client: RedisDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict:
    """The endpoint's latest delivery attempts, newest first (at most `webhook_log_max_len` are kept)."""
    entries = EndpointStore(client).delivery_log(tenant.tenant_id, endpoint_id, limit)
    return list_envelope(entries, has_more=False)
