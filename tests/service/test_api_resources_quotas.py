"""Resources, priority and co_training on job create, the submit-time limits (400s, the 429 with Retry-After), and the
operator's quota API, over real HTTP on a real redis-server."""

from __future__ import annotations

import openai
import pytest

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.queue import JobStore
from fleet.settings import make_redis
from tests.service.conftest import make_api_settings, write_tiny_llama_config


@pytest.fixture
def training_file(api_server, tenant_a, dataset_path) -> str:
    with open(dataset_path, "rb") as fh:
        return api_server.openai(tenant_a.api_key).files.create(file=fh, purpose="fine-tune").id


def _create(api_server, tenant, training_file, **extra):
    with api_server.client(tenant.api_key) as c:
        return c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file, **extra})


def test_a_job_holds_the_resources_and_priority_it_asked_for(api_server, tenant_a, training_file):
    client = api_server.openai(tenant_a.api_key)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training_file,
                                         extra_body={"resources": {"gpus": 4}, "priority": "high"})
    assert job.model_extra["resources"] == {"workers": 4, "gpus_per_worker": 1}
    assert job.model_extra["priority"] == "high"
    gang = _create(api_server, tenant_a, training_file, resources={"workers": 2, "gpus_per_worker": 2})
    assert gang.status_code == 200, gang.text
    assert gang.json()["resources"] == {"workers": 2, "gpus_per_worker": 2}
    again = client.fine_tuning.jobs.retrieve(gang.json()["id"])
    assert again.model_extra["resources"] == {"workers": 2, "gpus_per_worker": 2}
    assert again.model_extra["priority"] == "normal"


def test_a_job_without_resources_gets_its_base_models_default_from_the_catalog(
    tmp_path, redis_server, start_api_server, dataset_path
):
    model_dir = write_tiny_llama_config(tmp_path / "tiny-llama")
    settings = make_api_settings(tmp_path, redis_server.url, catalog={
        "tiny-llama": {"path": str(model_dir), "max_rank": 64, "resources": {"workers": 2, "gpus_per_worker": 2}},
        "tiny-one": {"path": str(model_dir), "max_rank": 64},
    })
    server = start_api_server(settings)
    tenant = server.create_tenant("team-a")
    with open(dataset_path, "rb") as fh:
        file_id = server.openai(tenant.api_key).files.create(file=fh, purpose="fine-tune").id
    defaulted = _create(server, tenant, file_id)
    assert defaulted.status_code == 200, defaulted.text
    assert defaulted.json()["resources"] == {"workers": 2, "gpus_per_worker": 2}
    with server.client(tenant.api_key) as c:
        plain = c.post("/v1/fine_tuning/jobs", json={"model": "tiny-one", "training_file": file_id}).json()
    assert plain["resources"] == {"workers": 1, "gpus_per_worker": 1}
    models = {m.id: m.model_extra for m in server.openai(tenant.api_key).models.list().data}
    assert models["tiny-llama"]["resources"] == {"workers": 2, "gpus_per_worker": 2}  # what a job gets
    assert models["tiny-one"]["resources"] == {"workers": 1, "gpus_per_worker": 1}


@pytest.mark.parametrize("resources, param", [
    ({"gpus": 2, "workers": 2}, "resources"),  # both forms at once
    ({"workers": 0}, "resources.workers"),
    ({"workers": 1, "gpus_per_worker": 17}, "resources.gpus_per_worker"),
    ({"cpus": 2}, "resources.cpus"),
    ({"gpus": 0}, "resources"),  # named 'gpus' in the message, not the 'workers' it stands for
    ({"gpus": 65}, "resources"),
    ("four", "resources"),
])
def test_malformed_resources_are_a_400_naming_the_field(api_server, tenant_a, training_file, resources, param):
    response = _create(api_server, tenant_a, training_file, resources=resources)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if isinstance(resources, dict) and list(resources) == ["gpus"]:
        assert "'gpus' must be a whole number from 1 to 64" in response.json()["error"]["message"]


def test_an_unknown_priority_is_a_400(api_server, tenant_a, training_file):
    response = _create(api_server, tenant_a, training_file, priority="urgent")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "priority" and "'low', 'normal' or 'high'" in error["message"]


def test_a_job_over_the_tenants_max_gpus_per_job_is_a_400_naming_the_limit(api_server, tenant_a, training_file):
    with api_server.admin() as admin:
        assert admin.put(f"/v1/admin/tenants/{tenant_a.id}/quota", json={"max_gpus_per_job": 2}).status_code == 200
    response = _create(api_server, tenant_a, training_file, resources={"gpus": 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("resources", "max_gpus_per_job_exceeded")
    assert "asks for 4 GPUs" in error["message"] and "max_gpus_per_job quota is 2" in error["message"]
    assert _create(api_server, tenant_a, training_file, resources={"gpus": 2}).status_code == 200


def test_a_job_larger_than_the_cluster_is_a_400_once_the_nodes_are_known(api_server, tenant_a, training_file):
    assert _create(api_server, tenant_a, training_file, resources={"gpus": 8}).status_code == 200  # unknown yet
    client = make_redis(api_server.settings)
    try:
        CapacityStore(client).record_nodes([NodeCapacity(node_id="n1", gpus=2), NodeCapacity(node_id="n2", gpus=2)])
    finally:
        client.close()
    response = _create(api_server, tenant_a, training_file, resources={"workers": 4, "gpus_per_worker": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "larger_than_cluster"
    assert "asks for 8 GPUs; the cluster has 4" in error["message"]
    assert _create(api_server, tenant_a, training_file, resources={"gpus": 4}).status_code == 200
    on_one_node = _create(api_server, tenant_a, training_file, resources={"workers": 1, "gpus_per_worker": 4})
    assert on_one_node.status_code == 400  # 4 GPUs in the cluster, but never 4 on one node
    error = on_one_node.json()["error"]
    assert (error["param"], error["code"]) == ("resources.gpus_per_worker", "larger_than_node")
    assert "the largest node has 2" in error["message"]
    spread = _create(api_server, tenant_a, training_file, resources={"workers": 2, "gpus_per_worker": 2})
    assert spread.status_code == 200


def test_a_tenant_at_max_queued_jobs_gets_429_with_retry_after_naming_the_limit(
    api_server, tenant_a, tenant_b, training_file
):
    with api_server.admin() as admin:
        assert admin.put(f"/v1/admin/tenants/{tenant_a.id}/quota", json={"max_queued_jobs": 2}).status_code == 200
    assert [_create(api_server, tenant_a, training_file).status_code for _ in range(2)] == [200, 200]
    refused = _create(api_server, tenant_a, training_file)
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) > 0
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded" and "max_queued_jobs" in error["message"]
    with pytest.raises(openai.RateLimitError):
        api_server.openai(tenant_a.api_key).fine_tuning.jobs.create(model="tiny-llama", training_file=training_file)
    with api_server.client(tenant_a.api_key) as c:
        assert len(c.get("/v1/fine_tuning/jobs").json()["data"]) == 2  # nothing was created by the refusals
        queued = c.get("/v1/fine_tuning/jobs").json()["data"][0]["id"]
        assert c.post(f"/v1/fine_tuning/jobs/{queued}/cancel").status_code == 200
    assert _create(api_server, tenant_a, training_file).status_code == 200  # a slot freed


# --- the admin quota API ---------------------------------------------------------------------------------
def test_the_operator_sets_reads_lists_and_resets_a_tenants_quota(api_server, tenant_a, tenant_b):
    with api_server.admin() as admin:
        before = admin.get(f"/v1/admin/tenants/{tenant_a.id}/quota")
        assert before.status_code == 200
        assert before.json()["is_default"] is True and before.json()["weight"] == 1.0
        quota = {"nominal_gpus": 8, "borrowing_limit_gpus": 4, "max_gpus_per_job": 8, "max_running_jobs": 3,
                 "max_queued_jobs": 50, "weight": 2.0}
        put = admin.put(f"/v1/admin/tenants/{tenant_a.id}/quota", json=quota)
        assert put.status_code == 200, put.text
        assert {k: put.json()[k] for k in quota} == quota and put.json()["is_default"] is False
        got = admin.get(f"/v1/admin/tenants/{tenant_a.id}/quota").json()
        assert {k: got[k] for k in quota} == quota
        listed = admin.get("/v1/admin/quotas").json()
        assert [q["tenant_id"] for q in listed["data"]] == [tenant_a.id]
        assert listed["default"]["is_default"] is True
        assert admin.delete(f"/v1/admin/tenants/{tenant_a.id}/quota").json()["is_default"] is True
        assert admin.delete(f"/v1/admin/tenants/{tenant_a.id}/quota").status_code == 200  # idempotent
        assert admin.get(f"/v1/admin/tenants/{tenant_a.id}/quota").json()["is_default"] is True
        assert admin.get("/v1/admin/quotas").json()["data"] == []


@pytest.mark.parametrize("body, param", [
    ({"nominal_gpus": -1}, "nominal_gpus"),
    ({"weight": 0}, "weight"),
    ({"max_gpus_per_job": 0}, "max_gpus_per_job"),
    ({"nominal_gpu": 4}, "nominal_gpu"),
    ({"max_queued_jobs": "many"}, "max_queued_jobs"),
    ([4], None),
])
def test_a_bad_quota_body_is_a_400_naming_the_field(api_server, tenant_a, body, param):
    with api_server.admin() as admin:
        response = admin.put(f"/v1/admin/tenants/{tenant_a.id}/quota", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert admin.get(f"/v1/admin/tenants/{tenant_a.id}/quota").json()["is_default"] is True


def test_quotas_are_the_operators_alone_and_unknown_tenants_are_404(api_server, tenant_a):
    with api_server.client(tenant_a.api_key) as tenant_admin:  # the tenant's own admin-role key
        assert tenant_admin.get(f"/v1/admin/tenants/{tenant_a.id}/quota").status_code == 403
        assert tenant_admin.put(f"/v1/admin/tenants/{tenant_a.id}/quota", json={"weight": 9}).status_code == 403
        assert tenant_admin.get("/v1/admin/quotas").status_code == 403
    with api_server.admin() as admin:
        assert admin.get("/v1/admin/tenants/tenant-nope/quota").status_code == 404
        assert admin.put("/v1/admin/tenants/tenant-nope/quota", json={}).status_code == 404
        assert admin.delete("/v1/admin/tenants/tenant-nope/quota").status_code == 404


# --- the cluster view ------------------------------------------------------------------------------------
def test_the_cluster_view_shows_nodes_who_runs_borrows_and_why_a_job_waits(api_server, tenant_a, tenant_b,
                                                                           dataset_path):
    client = make_redis(api_server.settings)
    try:
        CapacityStore(client).record_nodes([NodeCapacity(node_id="node-1", address="10.0.0.1", gpus=2),
                                            NodeCapacity(node_id="node-2", address="10.0.0.2", gpus=2)])
        with api_server.admin() as admin:
            for tenant in (tenant_a, tenant_b):
                assert admin.put(f"/v1/admin/tenants/{tenant.id}/quota", json={"nominal_gpus": 2}).status_code == 200
        files = {}
        for tenant in (tenant_a, tenant_b):
            with open(dataset_path, "rb") as fh:
                files[tenant.id] = api_server.openai(tenant.api_key).files.create(file=fh, purpose="fine-tune").id
        for _ in range(2):
            assert _create(api_server, tenant_a, files[tenant_a.id], resources={"gpus": 2}).status_code == 200
        leases = JobStore(client).leases
        assert leases.claim_next_job("dispatcher-1", lease_ms=60_000) is not None  # team-a: 2 GPUs
        assert leases.claim_next_job("dispatcher-1", lease_ms=60_000) is not None  # team-a borrows the rest
        assert _create(api_server, tenant_b, files[tenant_b.id], resources={"gpus": 2}).status_code == 200
        assert leases.claim_next_job("dispatcher-1", lease_ms=60_000) is None  # full: team-b reclaims
    finally:
        client.close()
    with api_server.admin() as admin:
        view = admin.get("/v1/admin/cluster").json()
    assert view["object"] == "cluster"
    assert [(n["node_id"], n["gpus"], n["alive"]) for n in view["nodes"]] == [("node-1", 2, True), ("node-2", 2, True)]
    totals = view["totals"]
    assert (totals["gpus"], totals["allocated"], totals["free"], totals["being_preempted"]) == (4, 4, 0, 2)
    tenants = {t["tenant_name"]: t for t in view["tenants"]}
    a, b = tenants["team-a"], tenants["team-b"]
    assert (a["running_jobs"], a["running_gpus"], a["borrowed_gpus"], a["queued_jobs"]) == (2, 4, 2, 0)
    assert a["waiting_reason"] is None
    assert (b["running_gpus"], b["queued_jobs"]) == (0, 1)
    assert b["waiting_reason"].startswith("waiting for 2 GPUs; 0 free;"), b["waiting_reason"]
    assert "reclaiming borrowed GPUs" in b["waiting_reason"]
    with api_server.client(tenant_a.api_key) as c:
        assert c.get("/v1/admin/cluster").status_code == 403


def test_a_high_priority_job_is_placed_before_the_tenants_earlier_normal_ones(api_server, tenant_a, training_file):
    normal = [_create(api_server, tenant_a, training_file).json()["id"] for _ in range(2)]
    urgent = _create(api_server, tenant_a, training_file, priority="high").json()
    low = _create(api_server, tenant_a, training_file, priority="low").json()
    assert urgent["priority"] == "high"
    with api_server.client(tenant_a.api_key) as c:
        in_order = [urgent["id"], *normal, low["id"]]
        positions = [c.get(f"/v1/fine_tuning/jobs/{j}").json()["queue_position"] for j in in_order]
    assert positions == [1, 2, 3, 4]


def test_a_job_may_opt_out_of_co_training_and_shows_it(api_server, tenant_a, training_file):
    default = _create(api_server, tenant_a, training_file)
    assert default.status_code == 200, default.text
    assert default.json()["co_training"] is True
    alone = _create(api_server, tenant_a, training_file, co_training=False)
    assert alone.status_code == 200, alone.text
    assert alone.json()["co_training"] is False
    again = api_server.openai(tenant_a.api_key).fine_tuning.jobs.retrieve(alone.json()["id"])
    assert again.model_extra["co_training"] is False
    stored = JobStore(make_redis(api_server.settings)).load_job(alone.json()["id"])
    assert stored.spec.co_training is False  # what the scheduler reads


def test_a_non_boolean_co_training_is_a_400_naming_the_field(api_server, tenant_a, training_file):
    response = _create(api_server, tenant_a, training_file, co_training="sometimes")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "co_training"
