"""The CLI's scheduling commands against a live API server (in-process through typer's runner):
`lorafleet admin quota ...`, `lorafleet admin cluster`, and resources/priority on `lorafleet jobs create`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fleet.capacity import CapacityStore, NodeCapacity
from fleet.queue import JobStore
from fleet.resources import Resources
from fleet.settings import make_redis
from service.cli import app


@pytest.fixture
def cli(api_server):
    """`cli(*args, api_key=None, expect=0)`: run `lorafleet ARGS` with the operator key unless `api_key`."""
    runner = CliRunner()

    def run(*args: str, api_key: str | None = None, expect: int = 0):
        env = {"LORAFLEET_BASE_URL": api_server.url, "LORAFLEET_ADMIN_KEY": api_server.operator_key,
               "LORAFLEET_API_KEY": api_key or "", "COLUMNS": "200"}
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == expect, (args, result.output, result.exception)
        return result.output

    return run


@pytest.fixture
def admin_cli(cli):
    return lambda *args, expect=0: cli("admin", *args, expect=expect)


def test_quota_set_changes_only_the_given_fields_and_reset_restores_the_default(admin_cli, tenant_a):
    shown = admin_cli("quota", "get", tenant_a.id)
    assert "the default quota" in shown and "no limit" in shown
    admin_cli("quota", "set", tenant_a.id, "--nominal-gpus", "8", "--max-queued", "100")
    admin_cli("quota", "set", tenant_a.id, "--weight", "2.5", "--borrowing-limit", "4")
    quota = json.loads(admin_cli("quota", "get", tenant_a.id, "--json"))
    assert (quota["nominal_gpus"], quota["max_queued_jobs"], quota["weight"], quota["borrowing_limit_gpus"]) == (
        8, 100, 2.5, 4)
    assert quota["is_default"] is False
    admin_cli("quota", "set", tenant_a.id, "--max-queued", "none")
    assert json.loads(admin_cli("quota", "get", tenant_a.id, "--json"))["max_queued_jobs"] is None
    table = admin_cli("quota", "get", tenant_a.id)
    assert "its own quota" in table and "nominal_gpus" in table and " 8 " in table
    assert json.loads(admin_cli("quota", "reset", tenant_a.id, "--json"))["is_default"] is True


def test_quota_set_refuses_bad_values_with_the_servers_or_its_own_message(admin_cli, tenant_a):
    assert "whole number or 'none'" in admin_cli("quota", "set", tenant_a.id, "--max-running", "lots", expect=1)
    assert "nothing to set" in admin_cli("quota", "set", tenant_a.id, expect=1)
    refused = admin_cli("quota", "set", tenant_a.id, "--weight", "0", expect=1)
    assert "HTTP 400" in refused and "weight" in refused
    assert "HTTP 404" in admin_cli("quota", "get", "tenant-nope", expect=1)


def test_cluster_prints_nodes_and_why_each_tenant_waits(admin_cli, api_server, tenant_a):
    client = make_redis(api_server.settings)
    try:
        CapacityStore(client).record_nodes([NodeCapacity(node_id="gpu-node-1", gpus=2)])
        JobStore(client).create_job(tenant_a.id, model="tiny-llama", training_file="file-x",
                                    resources=Resources(workers=1, gpus_per_worker=2))
        JobStore(client).create_job(tenant_a.id, model="tiny-llama", training_file="file-x",
                                    resources=Resources(workers=1, gpus_per_worker=2))
        assert JobStore(client).leases.claim_next_job("d1", lease_ms=60_000) is not None
    finally:
        client.close()
    out = admin_cli("cluster")
    assert "GPUs: 2; allocated 2; free 0" in out
    assert "gpu-node-1" in out and "team-a" in out
    assert "waiting for 2 GPUs; 0 free" in out
    view = json.loads(admin_cli("cluster", "--json"))
    assert view["tenants"][0]["queued_jobs"] == 1


def test_jobs_create_takes_resources_and_priority(cli, tenant_a, dataset_path):
    out = cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path), "--workers", "2",
              "--gpus-per-worker", "2", "--priority", "high", api_key=tenant_a.api_key)
    assert "(2 × 2 GPU, high priority)" in out
    job = json.loads(cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path), "--gpus",
                         "3", "--json", api_key=tenant_a.api_key).split("\n", 1)[1])
    assert (job["resources"], job["priority"]) == ({"workers": 3, "gpus_per_worker": 1}, "normal")
    refused = cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path), "--gpus", "2",
                  "--workers", "2", api_key=tenant_a.api_key, expect=1)
    assert "HTTP 400" in refused and "not both forms" in refused


def test_jobs_create_can_keep_a_job_out_of_co_training(cli, tenant_a, dataset_path):
    job = json.loads(cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path),
                         "--no-co-training", "--json", api_key=tenant_a.api_key).split("\n", 1)[1])
    assert job["co_training"] is False
    default = json.loads(cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path),
                             "--json", api_key=tenant_a.api_key).split("\n", 1)[1])
    assert default["co_training"] is True
