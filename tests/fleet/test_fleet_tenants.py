"""Tenants and API keys against a real redis-server: keys shown once, stored hashed, revocable."""

from __future__ import annotations

import hashlib
import time

import pytest

from fleet import keys
from fleet.exceptions import Conflict, InvalidRequest, NotFound
from fleet.tenants import PRINCIPAL_CACHE_TTL_S, TenantStore


@pytest.fixture
def tenants(r) -> TenantStore:
    return TenantStore(r, admin_key="operator-secret")


def test_first_key_authenticates_as_tenant_admin_and_is_stored_only_hashed(tenants, r):
    tenant, raw_key = tenants.create_tenant("team-nlp")
    assert raw_key.startswith("lf-") and len(raw_key) > 40
    principal = tenants.authenticate(raw_key)
    assert (principal.tenant_id, principal.role) == (tenant.id, "admin")
    dump = "".join(str(r.dump(k)) for k in r.keys("*"))
    assert raw_key not in dump
    assert hashlib.sha256(raw_key.encode()).hexdigest() in r.hget(keys.api_key(principal.key_id), "sha256")


def test_issued_member_key_and_listing(tenants):
    tenant, _ = tenants.create_tenant("team-a")
    record, raw = tenants.issue_key(tenant.id, "member")
    assert tenants.authenticate(raw).role == "member"
    assert {k.id for k in tenants.list_keys(tenant.id)} >= {record.id}
    assert [t.name for t in tenants.list_tenants()] == ["team-a"]


def test_revoked_key_no_longer_authenticates(tenants):
    tenant, raw = tenants.create_tenant("team-a")
    key_id = tenants.authenticate(raw).key_id
    assert tenants.revoke_key(key_id).revoked_at is not None
    assert tenants.authenticate(raw) is None
    assert tenants.revoke_key(key_id).revoked_at is not None  # idempotent


def test_a_key_revoked_by_another_process_is_refused_at_once_by_one_that_used_it(tenants, r):
    """API processes cache a key's id by its hash; the revocation is still seen on the next request."""
    tenant, raw = tenants.create_tenant("team-a")
    assert tenants.authenticate(raw) is not None  # cached here
    other_api = TenantStore(r, admin_key="operator-secret")
    other_api.revoke_key(other_api.authenticate(raw).key_id)
    assert tenants.authenticate(raw) is None



def test_a_key_answered_without_redis_is_refused_within_the_ttl_after_another_process_revokes_it(tenants, r):
    tenant, raw = tenants.create_tenant("team-a")
    assert tenants.recently_authenticated(raw) is None  # never authenticated here: ask Redis
    accepted = tenants.authenticate(raw)
    assert tenants.recently_authenticated(raw) == accepted
    assert tenants.recently_authenticated("operator-secret").is_operator
    other_api = TenantStore(r, admin_key="operator-secret")
    revoked_at = time.monotonic()
    other_api.revoke_key(accepted.key_id)
    time.sleep(max(0.0, revoked_at + PRINCIPAL_CACHE_TTL_S - time.monotonic()))
    assert tenants.recently_authenticated(raw) is None
    assert tenants.authenticate(raw) is None


def test_the_revoking_process_stops_answering_for_the_key_at_once(tenants):
    tenant, raw = tenants.create_tenant("team-a")
    tenants.revoke_key(tenants.authenticate(raw).key_id)
    assert tenants.recently_authenticated(raw) is None

def test_tenant_admin_cannot_revoke_another_tenants_key(tenants):
    a, raw_a = tenants.create_tenant("team-a")
    b, _ = tenants.create_tenant("team-b")
    with pytest.raises(NotFound):
        tenants.revoke_key(tenants.authenticate(raw_a).key_id, tenant_id=b.id)
    assert tenants.authenticate(raw_a) is not None


def test_operator_key_and_garbage_keys(tenants):
    assert tenants.authenticate("operator-secret").is_operator
    for raw in ("", "operator-secre", "lf-not-a-key", "Bearer x"):
        assert tenants.authenticate(raw) is None
    assert TenantStore(tenants.redis).authenticate("operator-secret") is None  # no operator key configured


def test_tenant_names_are_validated_and_unique(tenants):
    tenants.create_tenant("team-a")
    with pytest.raises(Conflict):
        tenants.create_tenant("team-a")
    for bad in ("", "../x", "a b", "x" * 65):
        with pytest.raises(InvalidRequest):
            tenants.create_tenant(bad)
    with pytest.raises(NotFound):
        tenants.issue_key("tenant-missing")


@pytest.mark.parametrize("crafted", ["tenant-x:keys", "x:jobs", "../x", ""])
def test_crafted_ids_are_not_found(tenants, crafted):
    tenant, _ = tenants.create_tenant("team-a")
    with pytest.raises(NotFound):
        tenants.get_tenant(f"{tenant.id}:keys" if crafted == "tenant-x:keys" else crafted)
    with pytest.raises(NotFound):
        tenants.get_key(crafted)
    with pytest.raises(NotFound):
        tenants.revoke_key(crafted)
