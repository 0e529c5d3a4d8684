"""The `lorafleet` CLI's client commands against a live API server (in-process through typer's runner)."""

from __future__ import annotations

import json
import threading
import time

import pytest
from typer.testing import CliRunner

from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.settings import make_redis
from service.cli import app


@pytest.fixture
def cli(api_server):
    runner = CliRunner()

    def run(*args: str, api_key: str | None = None, expect: int = 0):
        env = {"LORAFLEET_BASE_URL": api_server.url, "LORAFLEET_API_KEY": api_key or "",
               "LORAFLEET_ADMIN_KEY": "", "COLUMNS": "200"}
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == expect, (args, result.output, result.exception)
        return result

    return run


def test_admin_commands_create_issue_and_revoke(cli, api_server):
    tenant = json.loads(cli("admin", "create-tenant", "team-cli", "--json", api_key=api_server.operator_key).output)
    assert tenant["name"] == "team-cli" and tenant["api_key"].startswith("lf-")
    listed = cli("admin", "list-tenants", "--json", api_key=api_server.operator_key).output
    assert tenant["id"] in listed
    key = json.loads(cli("admin", "issue-key", tenant["id"], "--json", api_key=api_server.operator_key).output)
    assert key["role"] == "member"
    cli("files", "list", api_key=key["api_key"])
    out = cli("admin", "revoke-key", key["id"], api_key=api_server.operator_key).output
    assert f"Revoked key {key['id']}" in out
    denied = cli("files", "list", api_key=key["api_key"], expect=1)
    assert "HTTP 401" in denied.output and "revoked" in denied.output


def test_upload_create_list_get_cancel(cli, tenant_a, dataset_path):
    uploaded = json.loads(cli("files", "upload", str(dataset_path), "--json", api_key=tenant_a.api_key).output)
    assert uploaded["id"].startswith("file-")
    # A local path as --training-file is uploaded first.
    created = cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path),
                  "--r", "4", "--target-modules", "q_proj,v_proj", "--n-epochs", "2", "--metadata", "team=nlp",
                  "--json", api_key=tenant_a.api_key).output
    job = json.loads(created[created.index("{"):])
    assert job["lora"]["r"] == 4 and job["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["hyperparameters"]["n_epochs"] == 2 and job["metadata"] == {"team": "nlp"}

    listing = json.loads(cli("jobs", "list", "--json", api_key=tenant_a.api_key).output)
    assert [j["id"] for j in listing["data"]] == [job["id"]]
    shown = cli("jobs", "get", job["id"], api_key=tenant_a.api_key).output
    assert job["id"] in shown and "queued" in shown
    assert "cancelled" in cli("jobs", "cancel", job["id"], api_key=tenant_a.api_key).output


def test_create_reports_validation_errors(cli, tenant_a, dataset_path):
    result = cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path), "--r", "0",
                 api_key=tenant_a.api_key, expect=1)
    assert "HTTP 400" in result.output and "lora.r" in result.output


def test_follow_renders_progress_until_the_job_succeeds(cli, api_server, tenant_a, dataset_path):
    uploaded = json.loads(cli("files", "upload", str(dataset_path), "--json", api_key=tenant_a.api_key).output)
    job = json.loads(cli("jobs", "create", "--model", "tiny-llama", "--training-file", uploaded["id"],
                         "--suffix", "adder", "--json", api_key=tenant_a.api_key).output)
    client = make_redis(api_server.settings)
    store = JobStore(client)
    claim = store.leases.claim_next_job("worker-1", lease_ms=60_000)

    def worker():
        time.sleep(0.3)
        for step in (1, 2, 3):
            store.append_event(job["id"], "info", f"step {step}/3", {"step": step, "train_loss": 2.0 / step},
                               type="metrics")
            store.leases.record_progress(claim.fence, step=step, total_steps=3, eta_s=3.0 - step)
            time.sleep(0.1)
        store.leases.finish_job(claim.fence, JobStatus.SUCCEEDED, fine_tuned_model="adder:v1")

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        out = cli("jobs", "follow", job["id"], api_key=tenant_a.api_key).output
    finally:
        thread.join()
        client.close()
    assert "Created fine-tuning job" in out
    assert f"Job {job['id']} succeeded" in out and "adder:v1" in out


def test_follow_exits_nonzero_for_a_cancelled_job(cli, tenant_a, dataset_path):
    created = cli("jobs", "create", "--model", "tiny-llama", "--training-file", str(dataset_path), "--json",
                  api_key=tenant_a.api_key)
    job = json.loads(created.stdout)  # the upload notice goes to stderr: stdout is the job's JSON alone
    assert "Uploaded" in created.stderr
    cli("jobs", "cancel", job["id"], api_key=tenant_a.api_key)
    out = cli("jobs", "follow", job["id"], api_key=tenant_a.api_key, expect=1).output
    assert "cancelled" in out


def test_adapters_list_and_download(cli, api_server, tenant_a, peft_adapter_dir, peft_adapter_archive, tmp_path):
    with api_server.client(tenant_a.api_key) as c:
        assert c.post("/v1/adapters", files={"file": ("a.tar.gz", peft_adapter_archive)},
                      data={"name": "helper"}).status_code == 200

    listed = json.loads(cli("adapters", "list", "--json", api_key=tenant_a.api_key).output)
    assert [a["name"] for a in listed["data"]] == ["helper"]
    table = cli("adapters", "list", api_key=tenant_a.api_key).output  # the rich table, as a person sees it
    assert "helper" in table and "helper:v1" in table
    assert "helper:v1" in cli("adapters", "list", "helper", api_key=tenant_a.api_key).output
    out_dir = tmp_path / "downloaded"
    out = cli("adapters", "download", "helper:v1", "-o", str(out_dir), api_key=tenant_a.api_key).output
    assert "helper-v1" in out
    extracted = out_dir / "helper-v1"
    weights = "adapter_model.safetensors"
    assert (extracted / weights).read_bytes() == (peft_adapter_dir / weights).read_bytes()
    assert json.loads((extracted / "manifest.json").read_text())["ref"] == "helper:v1"
    missing = cli("adapters", "download", "nope:v1", "-o", str(tmp_path / "x"), api_key=tenant_a.api_key, expect=1)
    assert "HTTP 404" in missing.output


def test_unreachable_server_and_missing_key_fail_clearly():
    runner = CliRunner()
    result = runner.invoke(app, ["jobs", "list", "--base-url", "http://127.0.0.1:9", "--api-key", "lf-x"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "cannot reach the lorafleet API" in result.output
    result = runner.invoke(app, ["jobs", "list"], env={"LORAFLEET_API_KEY": "", "COLUMNS": "200"})
    assert result.exit_code == 1 and "no API key" in result.output
