"""The dashboard's static files and the operator's pages (cluster view, tenants, keys, quotas) in chromium."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.settings import Settings
from tests.browser.conftest import sign_in
from tests.service.conftest import APIServer, make_api_settings, write_chat_dataset


@pytest.fixture
def server(tmp_path: Path, redis_server: Any, start_api_server: Callable[[Settings], APIServer]) -> APIServer:
    return start_api_server(make_api_settings(tmp_path, redis_server.url))


def test_dashboard_files_are_public_but_every_data_request_needs_a_key(server: APIServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/", follow_redirects=False).headers["location"] == "/ui/"
        index = http.get("/ui/")
        assert index.status_code == 200 and "text/html" in index.headers["content-type"]
        assert "default-src 'self'" in index.headers["content-security-policy"]
        assert http.get("/ui/app.js").status_code == 200
        assert http.get("/ui/../service/app.py").status_code == 404
        assert http.get("/ui/secrets.txt").status_code == 404
        assert http.get("/v1/fine_tuning/jobs").status_code == 401
        assert http.get("/v1/admin/cluster").status_code == 401
        paths = http.get("/openapi.json").json()["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/ui")], "the dashboard is no part of the API schema"


def test_operator_sees_cluster_view_tenants_keys_and_quotas(server: APIServer, redis_server: Any, page: Any,
                                                           screenshots: Path, tmp_path: Path) -> None:
    team_a, team_b = server.create_tenant("team-a"), server.create_tenant("team-b")
    with server.admin() as admin:
        response = admin.put(f"/v1/admin/tenants/{team_a.id}/quota",
                             json={"nominal_gpus": 2, "borrowing_limit_gpus": 2, "max_queued_jobs": 10})
        assert response.status_code == 200, response.text
    # What a dispatcher reports from Ray: two nodes of two GPUs each.
    with redis_server.client(decode_responses=True) as client:
        CapacityStore(client).record_nodes([NodeCapacity(node_id="node-1", address="10.0.0.1", gpus=2),
                                            NodeCapacity(node_id="node-2", address="10.0.0.2", gpus=2)])
    openai = server.openai(team_b.api_key)
    training = openai.files.create(file=write_chat_dataset(tmp_path / "train.jsonl").open("rb"), purpose="fine-tune")
    openai.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id, extra_body={"resources": {"gpus": 2}})

    sign_in(page, server.url, server.operator_key)
    page.wait_for_url("**/ui/#/cluster")
    assert page.locator("#total-gpus").inner_text() == "4"
    nodes = page.locator("#nodes tbody tr")
    assert nodes.count() == 2 and "10.0.0.2" in nodes.nth(1).inner_text()
    waiting = page.locator(f'#cluster-tenants tr[data-tenant="{team_b.id}"]')
    assert "team-b" in waiting.inner_text() and "waiting" in waiting.inner_text().lower()
    page.screenshot(path=str(screenshots / "dashboard-cluster.png"), full_page=True)

    page.get_by_role("link", name="Tenants & quotas").click()
    quota_a = page.locator(f'#quotas tr[data-tenant="{team_a.id}"]')
    quota_a.wait_for()
    assert "0 / 2" in quota_a.inner_text() and "0 / 10" in quota_a.inner_text()
    quota_b = page.locator(f'#quotas tr[data-tenant="{team_b.id}"]')
    assert "default quota" in quota_b.inner_text() and "1 /" in quota_b.inner_text()  # one queued job
    assert page.locator("#keys").get_by_text(team_a.key_id).count() == 1
    page.screenshot(path=str(screenshots / "dashboard-quotas.png"), full_page=True)

    # A tenant's key sees neither the cluster view nor other tenants.
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, server.url, team_b.api_key)
    assert page.get_by_role("link", name="Cluster").is_hidden()
    page.locator('#jobs tr >> text="queued"').wait_for()
