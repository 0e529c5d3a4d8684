"""Errors always come in OpenAI's shape; bad input is a 4xx, never a 5xx; health, readiness, metrics."""

from __future__ import annotations

import pytest

from service.body_limit import MAX_JSON_BODY_BYTES

ERROR_KEYS = {"message", "type", "param", "code"}


def test_unknown_route_and_wrong_method(api_server, tenant_a):
    with api_server.client(tenant_a.api_key) as c:
        r = c.get("/v1/no-such-thing")
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "Invalid URL (GET /v1/no-such-thing)."
        r = c.put("/v1/fine_tuning/jobs")
        assert r.status_code == 405
        assert set(r.json()["error"]) >= ERROR_KEYS


# (method, path, kwargs): requests a careless or hostile client could send.
BAD_REQUESTS = [
    ("POST", "/v1/fine_tuning/jobs", {"content": b"\x00\x01\x02", "headers": {"Content-Type": "application/json"}}),
    ("POST", "/v1/fine_tuning/jobs", {"content": b"null", "headers": {"Content-Type": "application/json"}}),
    ("POST", "/v1/fine_tuning/jobs", {"content": b'"x"', "headers": {"Content-Type": "application/json"}}),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": ["a"], "training_file": {"x": 1}}}),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny-llama", "training_file": "f", "seed": 2**40}}),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny-llama", "training_file": "f", "lora": []}}),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny-llama", "training_file": "f",
                                               "lora": {"target_modules": [""]}}}),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny-llama", "training_file": "f",
                                               "lora": {"target_modules": ["all-linear", "q_proj"]}}}),
    ("POST", "/v1/fine_tuning/jobs", {"json": {"model": "tiny-llama", "training_file": "f"},
                                      "headers": {"Idempotency-Key": "x" * 300}}),
    ("POST", "/v1/fine_tuning/jobs", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}),
    ("GET", "/v1/fine_tuning/jobs?limit=abc", {}),
    ("GET", "/v1/fine_tuning/jobs?limit=100000", {}),
    ("GET", "/v1/fine_tuning/jobs?status=exploded", {}),
    ("GET", "/v1/fine_tuning/jobs?metadata=null", {}),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/events?after=zzz", {}),
    ("GET", "/v1/fine_tuning/jobs/..%2F..%2Fetc", {}),
    ("GET", "/v1/files?order=sideways", {}),
    ("GET", "/v1/files?after=file-nope", {}),
    ("GET", "/v1/files/..%2F..%2Fetc%2Fpasswd/content", {}),
    ("POST", "/v1/files", {"content": b"--x\r\nbroken",
                           "headers": {"Content-Type": "multipart/form-data; boundary=x"}}),
    ("POST", "/v1/files", {"content": b"hello", "headers": {"Content-Type": "multipart/form-data"}}),
    ("GET", "/v1/adapters/..%2F..%2Fsecret/versions", {}),
    ("GET", "/v1/adapters/ok/versions/v1/download?format=rar", {}),
    ("POST", "/v1/adapters", {"data": {"name": "x"}, "files": {"other": ("a.tgz", b"123")}}),
    ("GET", "/v1/models/..%2F..%2Fx", {}),
    ("POST", "/v1/admin/tenants/x/keys", {"json": {"role": "root"}}),
]


def test_bad_input_is_a_4xx_in_openai_shape(api_server, tenant_a):
    with api_server.client(tenant_a.api_key) as c:
        for method, path, kwargs in BAD_REQUESTS:
            r = c.request(method, path, **kwargs)
            assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
            error = r.json()["error"]
            assert set(error) >= ERROR_KEYS, (method, path)
            assert error["message"]


def test_huge_json_body_is_a_413_not_buffered(api_server, tenant_a):
    body = b'{"model": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    with api_server.client(tenant_a.api_key) as c:
        r = c.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted while it arrives
            yield b'{"model": "'
            for _ in range(40):
                yield b"x" * 65536
            yield b'"}'

        r = c.post("/v1/fine_tuning/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413


def test_redis_outage_is_a_503_and_readyz_reports_it(api_server, tenant_a, redis_server):
    with api_server.client(tenant_a.api_key) as c:
        assert c.get("/readyz").status_code == 200
        redis_server.kill()
        r = c.get("/v1/fine_tuning/jobs")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["type"] == "server_error"
        assert r.headers["retry-after"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert c.get("/healthz").status_code == 200
        redis_server.start()
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/fine_tuning/jobs").status_code == 200


def test_metrics_count_requests_by_route_template_and_report_the_queue(api_server, tenant_a):
    with api_server.client(tenant_a.api_key) as c:
        c.get("/v1/files/file-abc")
        c.get("/v1/files/file-def")
    with api_server.admin() as operator:
        text = operator.get("/metrics").text
    assert 'lorafleet_http_requests_total{method="GET",route="/v1/files/{file_id}",status="404"} 2.0' in text
    assert 'lorafleet_jobs{state="queued"} 0.0' in text
    assert "lorafleet_http_request_duration_seconds_bucket" in text


def test_metrics_need_the_operator_key(api_server, tenant_a):
    admin_role_key = api_server.admin().post(f"/v1/admin/tenants/{tenant_a.id}/keys", json={"role": "admin"})
    assert admin_role_key.status_code == 200, admin_role_key.text
    with api_server.client() as anonymous:
        r = anonymous.get("/metrics")
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    for key in (tenant_a.api_key, admin_role_key.json()["api_key"]):
        with api_server.client(key) as tenant:
            r = tenant.get("/metrics")
            assert r.status_code == 403 and r.json()["error"]["code"] == "operator_required", r.text
    with api_server.admin() as operator:
        r = operator.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def _chunked(n_bytes: int, chunk_bytes: int = 256 * 1024):
    """A generator body: sent chunked, so there is no Content-Length for the server to check up front."""
    for _ in range(n_bytes // chunk_bytes):
        yield b"x" * chunk_bytes


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=zz", "application/json", "text/plain", None])
@pytest.mark.parametrize("path", ["/v1/admin/tenants", "/v1/fine_tuning/jobs", "/v1/files/file-x"])
def test_body_cap_holds_on_every_non_upload_route_whatever_the_content_type(api_server, path, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    with api_server.client() as anonymous:  # no key: the cap applies before (and regardless of) auth
        for body in (b"x" * (3 * 1024 * 1024), _chunked(8 * 1024 * 1024)):
            r = anonymous.post(path, content=body, headers=headers)
            assert r.status_code == 413, (path, content_type, r.status_code, r.text[:200])
            error = r.json()["error"]
            assert set(error) >= ERROR_KEYS
            assert error["code"] == "request_too_large"


def test_upload_routes_take_bodies_above_the_json_cap(start_api_server, api_settings, make_chat_dataset):
    server = start_api_server(api_settings.model_copy(update={"max_upload_bytes": 4 * MAX_JSON_BODY_BYTES}))
    tenant = server.create_tenant("big-uploads")
    dataset = make_chat_dataset("big.jsonl", 20_000)
    assert dataset.stat().st_size > 2 * MAX_JSON_BODY_BYTES
    with server.client(tenant.api_key) as c:
        with open(dataset, "rb") as fh:
            r = c.post("/v1/files", files={"file": ("big.jsonl", fh)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text[:300]
        # Over the JSON cap but not an archive: the import route itself answers, not the body cap.
        junk = b"\x00" * (2 * MAX_JSON_BODY_BYTES)
        r = c.post("/v1/adapters", files={"file": ("big.zip", junk)}, data={"name": "big"})
        assert r.status_code == 400, r.text[:300]
        assert "unreadable" in r.json()["error"]["message"]
