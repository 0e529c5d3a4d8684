"""Tenants, API keys and isolation over real HTTP: 401 for missing/revoked keys, 404 across tenants."""

from __future__ import annotations

import time

import openai
import pytest

from fleet.tenants import PRINCIPAL_CACHE_TTL_S


def _upload(api_server, api_key, path):
    with open(path, "rb") as fh:
        return api_server.openai(api_key).files.create(file=fh, purpose="fine-tune")


def test_tenant_b_gets_404_for_everything_of_tenant_a(api_server, tenant_a, tenant_b, dataset_path,
                                                      peft_adapter_archive):
    file_a = _upload(api_server, tenant_a.api_key, dataset_path)
    job_a = api_server.openai(tenant_a.api_key).fine_tuning.jobs.create(model="tiny-llama", training_file=file_a.id)
    with api_server.client(tenant_a.api_key) as a:
        r = a.post("/v1/adapters", files={"file": ("a.tar.gz", peft_adapter_archive)}, data={"name": "secret"})
        assert r.status_code == 200, r.text

    not_found = [
        ("GET", f"/v1/files/{file_a.id}"),
        ("GET", f"/v1/files/{file_a.id}/content"),
        ("DELETE", f"/v1/files/{file_a.id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_a.id}"),
        ("POST", f"/v1/fine_tuning/jobs/{job_a.id}/cancel"),
        ("POST", f"/v1/fine_tuning/jobs/{job_a.id}/pause"),
        ("POST", f"/v1/fine_tuning/jobs/{job_a.id}/resume"),
        ("GET", f"/v1/fine_tuning/jobs/{job_a.id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_a.id}/events?stream=true"),
        ("GET", f"/v1/fine_tuning/jobs/{job_a.id}/events/stream"),
        ("GET", f"/v1/fine_tuning/jobs/{job_a.id}/checkpoints"),
        ("GET", "/v1/adapters/secret"),
        ("GET", "/v1/adapters/secret/versions"),
        ("GET", "/v1/adapters/secret/versions/v1"),
        ("GET", "/v1/adapters/secret/versions/v1/manifest"),
        ("GET", "/v1/adapters/secret/versions/v1/download"),
        ("DELETE", "/v1/adapters/secret/versions/v1"),
        ("DELETE", "/v1/adapters/secret"),
        ("GET", "/v1/models/secret:v1"),
    ]
    with api_server.client(tenant_b.api_key) as b:
        for method, path in not_found:
            r = b.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error"
        # ... worded exactly like an id that never existed
        missing_file = b.get("/v1/files/file-000000000000000000000000").json()["error"]["message"]
        assert b.get(f"/v1/files/{file_a.id}").json()["error"]["message"] == missing_file.replace(
            "file-000000000000000000000000", file_a.id)
        r = b.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_a.id})
        assert r.status_code == 400 and r.json()["error"]["param"] == "training_file"
        assert b.get("/v1/files").json()["data"] == []
        assert b.get("/v1/fine_tuning/jobs").json()["data"] == []
        assert b.get("/v1/adapters").json()["data"] == []

    # ... and tenant A's things are untouched.
    client_a = api_server.openai(tenant_a.api_key)
    assert client_a.fine_tuning.jobs.retrieve(job_a.id).status == "queued"
    assert client_a.files.retrieve(file_a.id).id == file_a.id


def test_missing_malformed_and_unknown_keys_get_401(api_server):
    with api_server.client() as c:
        r = c.get("/v1/fine_tuning/jobs")
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization" in r.json()["error"]["message"]
        r = c.get("/v1/fine_tuning/jobs", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        r = c.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer lf-not-a-real-key-123456"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "lf-not-a-real-key-123456" not in r.json()["error"]["message"]  # never echo a secret back
    with pytest.raises(openai.AuthenticationError):
        api_server.openai("lf-wrong").models.list()


def test_a_revoked_key_gets_401_and_other_keys_keep_working(api_server, tenant_a):
    with api_server.admin() as admin:
        issued = admin.post(f"/v1/admin/tenants/{tenant_a.id}/keys", json={"role": "member"}).json()
    assert issued["role"] == "member" and issued["api_key"].startswith("lf-")
    client = api_server.openai(issued["api_key"])
    assert client.models.list().data  # works before revocation
    with api_server.admin() as admin:
        revoked = admin.delete(f"/v1/admin/keys/{issued['id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        assert admin.delete(f"/v1/admin/keys/{issued['id']}").status_code == 200  # idempotent
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert api_server.openai(tenant_a.api_key).models.list().data



def test_a_key_revoked_through_another_api_process_stops_working_there_within_the_cache_bound(
        api_server, api_settings, start_api_server, tenant_a):
    other_api = start_api_server(api_settings)  # a second API process on the same Redis
    with api_server.admin() as admin:
        issued = admin.post(f"/v1/admin/tenants/{tenant_a.id}/keys", json={"role": "member"}).json()
    other_api.openai(issued["api_key"]).models.list()  # authenticated there, so answered from its cache
    revoked_at = time.monotonic()
    with api_server.admin() as admin:
        assert admin.delete(f"/v1/admin/keys/{issued['id']}").status_code == 200
    time.sleep(max(0.0, revoked_at + PRINCIPAL_CACHE_TTL_S - time.monotonic()))
    with pytest.raises(openai.AuthenticationError):
        other_api.openai(issued["api_key"]).models.list()
    assert other_api.openai(tenant_a.api_key).models.list().data

def test_admin_api_scopes(api_server, tenant_a, tenant_b):
    with api_server.admin() as admin:
        listed = admin.get("/v1/admin/tenants").json()["data"]
        assert {t["name"] for t in listed} == {"team-a", "team-b"}
        assert admin.post("/v1/admin/tenants", json={"name": "team-a"}).status_code == 409
        r = admin.post("/v1/admin/tenants", json={"name": "../root"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"
        assert admin.post("/v1/admin/tenants", json={}).json()["error"]["param"] == "name"
        assert admin.post("/v1/admin/tenants/tenant-nope/keys", json={}).status_code == 404
        assert admin.delete("/v1/admin/keys/key-nope").status_code == 404
        r = admin.get("/v1/files")  # the operator key has no tenant
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"

    # A tenant's first key is its admin: it manages its own keys, nothing else.
    with api_server.client(tenant_a.api_key) as a:
        assert a.post("/v1/admin/tenants", json={"name": "team-c"}).status_code == 403
        assert [t["id"] for t in a.get("/v1/admin/tenants").json()["data"]] == [tenant_a.id]
        own = a.post(f"/v1/admin/tenants/{tenant_a.id}/keys", json={"role": "member"})
        assert own.status_code == 200
        assert a.post(f"/v1/admin/tenants/{tenant_b.id}/keys", json={}).status_code == 404
        assert a.delete(f"/v1/admin/keys/{tenant_b.key_id}").status_code == 404
        keys = a.get(f"/v1/admin/tenants/{tenant_a.id}/keys").json()["data"]
        assert {k["id"] for k in keys} == {tenant_a.key_id, own.json()["id"]}
        assert all("api_key" not in k for k in keys)
    with api_server.client(own.json()["api_key"]) as member:
        r = member.get("/v1/admin/tenants")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
