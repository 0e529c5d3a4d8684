"""The API starts while Redis is down (it answers 503 meanwhile) and sets up the scheduler's state
(default quota, fair-share half-life, the job store) once Redis is back."""

from __future__ import annotations

import time

from fleet import keys
from fleet.quotas import TenantQuota


def test_the_api_starts_without_redis_and_publishes_the_default_quota_when_it_returns(
    redis_server, start_api_server, api_settings
):
    redis_server.stop()
    settings = api_settings.model_copy(update={"default_quota": TenantQuota(nominal_gpus=2, max_queued_jobs=7)})
    started = time.monotonic()
    server = start_api_server(settings)  # before the fix: "Application startup failed" after ~10 s
    assert time.monotonic() - started < 10
    with server.admin() as admin:
        assert admin.get("/healthz").status_code == 200
        unavailable = admin.get("/v1/admin/quotas")
        assert unavailable.status_code == 503 and unavailable.headers["Retry-After"] == "5"
        redis_server.start()
        deadline = time.monotonic() + 45
        while (listed := admin.get("/v1/admin/quotas")).status_code != 200:
            assert time.monotonic() < deadline, f"no default quota once Redis returned: {listed.text}"
            time.sleep(0.5)
    assert (listed.json()["default"]["nominal_gpus"], listed.json()["default"]["max_queued_jobs"]) == (2, 7)
    tenant = server.create_tenant("team-a")
    with server.client(tenant.api_key) as c:
        assert c.get("/v1/fine_tuning/jobs").json()["data"] == []
    client = redis_server.client(decode_responses=True)
    try:
        assert client.hget(keys.default_quota(), "max_queued_jobs") == "7"
    finally:
        client.close()
