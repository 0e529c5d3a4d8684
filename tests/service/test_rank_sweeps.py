"""Rank sweeps and rank reports through the API: the 400s and a sweep's parent (no worker), then end to end on
the tiny model (three children, one published version with the comparison and the rank report in its
manifest, shown by `lorafleet adapters show`)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet.settings import Settings
from service.cli import app
from tests.reliability.conftest import wait_for
from tests.service.conftest import APIServer, Tenant, make_api_settings
from workers.synthetic import write_synthetic_splits

TERMINAL = ("succeeded", "failed", "cancelled")


def _upload(server: APIServer, tenant: Tenant, path: Path) -> str:
    with path.open("rb") as fh:
        return server.openai(tenant.api_key).files.create(file=fh, purpose="fine-tune").id


def _create(server: APIServer, tenant: Tenant, body: dict[str, Any]) -> Any:
    with server.client(tenant.api_key) as http:
        return http.post("/v1/fine_tuning/jobs", json=body)


def _get(server: APIServer, tenant: Tenant, path: str) -> dict[str, Any]:
    with server.client(tenant.api_key) as http:
        response = http.get(path)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
def dataset(api_server: APIServer, tenant_a: Tenant, make_chat_dataset) -> dict[str, str]:
    return {"training_file": _upload(api_server, tenant_a, make_chat_dataset("train.jsonl", n=12)),
            "validation_file": _upload(api_server, tenant_a, make_chat_dataset("val.jsonl", n=4))}


@pytest.mark.parametrize(("extra", "says"), [
    ({"rank_sweep": [8, 16], "validation_file": None}, "give a validation_file"),
    ({"rank_sweep": [8]}, "give 2 to 8 ranks, got 1"),
    ({"rank_sweep": list(range(1, 10))}, "give 2 to 8 ranks, got 9"),
    ({"rank_sweep": [8, 8, 16]}, "the ranks must be distinct"),
    ({"rank_sweep": [8, 128]}, "from 1 to 64"),  # the catalog's max_rank for tiny-llama
    ({"rank_sweep": [0, 8]}, "from 1 to 64"),
    ({"rank_sweep": [8, 16], "lora": {"r": 4}}, "omit lora.r"),
    ({"rank_sweep": ["8", 16]}, "rank_sweep"),  # not a whole number: the schema's own 400
])
def test_a_rank_sweep_that_cannot_run_is_a_400_and_creates_nothing(api_server, tenant_a, dataset, extra, says):
    body = {"model": "tiny-llama", **dataset, **extra}
    response = _create(api_server, tenant_a, {k: v for k, v in body.items() if v is not None})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says in error["message"], error
    assert (error["param"] or "").startswith("rank_sweep"), error
    assert _get(api_server, tenant_a, "/v1/fine_tuning/jobs")["data"] == []


def test_a_sweeps_parent_shows_its_children_cannot_be_paused_and_cancels_them(api_server, tenant_a, dataset):
    response = _create(api_server, tenant_a, {"model": "tiny-llama", **dataset, "rank_sweep": [4, 8, 16],
                                              "suffix": "swept"})
    assert response.status_code == 200, response.text
    parent = response.json()
    assert parent["status"] == "running" and parent["parent"] is None
    assert parent["rank_sweep"]["ranks"] == [4, 8, 16]
    children = parent["rank_sweep"]["children"]
    assert [c["rank"] for c in children] == [4, 8, 16]

    listed = {j["id"]: j for j in _get(api_server, tenant_a, "/v1/fine_tuning/jobs")["data"]}
    assert set(listed) == {parent["id"], *(c["id"] for c in children)}
    for child in children:  # ordinary queued jobs, each with its own rank, pointing at the sweep
        job = listed[child["id"]]
        assert job["status"] == "queued" and job["parent"] == parent["id"]
        assert job["lora"]["r"] == child["rank"] and job["queue_position"] is not None

    with api_server.client(tenant_a.api_key) as http:
        paused = http.post(f"/v1/fine_tuning/jobs/{parent['id']}/pause")
        assert paused.status_code == 409, paused.text
        assert "rank sweep" in paused.json()["error"]["message"]
        cancelled = http.post(f"/v1/fine_tuning/jobs/{parent['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"  # no child was running: the sweep ends at once
    assert [c["status"] for c in cancelled.json()["rank_sweep"]["children"]] == ["cancelled"] * 3
    for child in children:
        assert _get(api_server, tenant_a, f"/v1/fine_tuning/jobs/{child['id']}")["status"] == "cancelled"


def test_a_sweep_on_a_base_model_whose_max_rank_is_below_the_default_r_is_created(tmp_path, redis_server,
                                                                                 start_api_server, make_chat_dataset):
    """Without lora.r a sweep sets no rank of its own: the default r (8) is not checked against max_rank."""
    from tests.service.conftest import write_tiny_llama_config

    settings = make_api_settings(tmp_path, redis_server.url, catalog={"tiny-llama": {
        "path": str(write_tiny_llama_config(tmp_path / "m")), "quantization": "nf4", "max_rank": 4}})
    server = start_api_server(settings)
    tenant = server.create_tenant("small")
    files = {"training_file": _upload(server, tenant, make_chat_dataset("train.jsonl", n=12)),
             "validation_file": _upload(server, tenant, make_chat_dataset("val.jsonl", n=4))}
    for path in ("/v1/fine_tuning/jobs/estimate", "/v1/fine_tuning/jobs"):
        with server.client(tenant.api_key) as http:
            response = http.post(path, json={"model": "tiny-llama", **files, "rank_sweep": [2, 4]})
        assert response.status_code == 200, (path, response.text)
    assert [c["rank"] for c in response.json()["rank_sweep"]["children"]] == [2, 4]
    with server.client(tenant.api_key) as http:  # a rank over max_rank is still named, on rank_sweep
        refused = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", **files, "rank_sweep": [2, 8]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "rank_sweep", refused.text


def test_a_replayed_sweep_create_returns_the_same_parent_and_makes_no_more_children(api_server, tenant_a, dataset):
    body = {"model": "tiny-llama", **dataset, "rank_sweep": [4, 8]}
    with api_server.client(tenant_a.api_key) as http:
        first = http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "sweep-1"})
        again = http.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "sweep-1"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers.get("Idempotent-Replayed") == "true"
    assert len(_get(api_server, tenant_a, "/v1/fine_tuning/jobs")["data"]) == 3


# --- end to end: a dispatcher trains the children on Ray (CPU) ------------------------------------------
@pytest.fixture
def trained_stack(tmp_path: Path, redis_server, tiny_model_dir: Path, ray_cluster,
                  start_api_server) -> Iterator[APIServer]:
    """An API and one in-process dispatcher (three jobs at once) on the real tiny model."""
    from workers.dispatcher import Dispatcher

    settings: Settings = make_api_settings(
        tmp_path, redis_server.url, model_dir=tiny_model_dir, lease_ms=3000, heartbeat_ms=250,
        max_concurrent_jobs=4, catalog={"tiny-llama": {"path": str(tiny_model_dir), "quantization": "none",
                                                       "max_rank": 8}})
    server = start_api_server(settings)
    dispatcher = Dispatcher(settings, worker_id="sweeper")
    thread = threading.Thread(target=dispatcher.run_forever, daemon=True)
    thread.start()
    yield server
    dispatcher.stop()
    thread.join(timeout=60)


@pytest.mark.slow
def test_a_sweep_trains_three_children_and_publishes_the_best_with_the_comparison(trained_stack, tmp_path):
    server = trained_stack
    tenant = server.create_tenant("sweeper")
    train, val = write_synthetic_splits(tmp_path / "data", n_train=24, n_val=8, seed=1)
    files = {"training_file": _upload(server, tenant, train), "validation_file": _upload(server, tenant, val)}
    training = {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
                "lora": {"alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "seed": 3}
    created = _create(server, tenant, {"model": "tiny-llama", **files, **training, "rank_sweep": [2, 4, 8],
                                       "suffix": "swept"})
    assert created.status_code == 200, created.text
    parent_id = created.json()["id"]
    plain = _create(server, tenant, {"model": "tiny-llama", **files, **training, "suffix": "plain",
                                     "lora": {**training["lora"], "r": 4}})
    assert plain.status_code == 200, plain.text

    def ended(job_id: str) -> dict[str, Any] | None:
        job = _get(server, tenant, f"/v1/fine_tuning/jobs/{job_id}")
        return job if job["status"] in TERMINAL else None

    parent = wait_for(lambda: ended(parent_id), "the sweep's parent to end", timeout_s=600)
    assert parent["status"] == "succeeded", parent["error"]
    assert parent["fine_tuned_model"] == "swept:v1"
    children = parent["rank_sweep"]["children"]
    assert [(c["rank"], c["status"]) for c in children] == [(2, "succeeded"), (4, "succeeded"), (8, "succeeded")]
    best = min(children, key=lambda c: (c["val_loss"], c["rank"]))
    assert parent["rank_sweep"]["chosen"] == best["id"]
    for child in children:
        job = _get(server, tenant, f"/v1/fine_tuning/jobs/{child['id']}")
        assert job["parent"] == parent_id and job["fine_tuned_model"] is None  # children publish nothing
        assert child["val_loss"] is not None and child["steps"] > 0 and child["rank_report"]["verdict"]

    versions = _get(server, tenant, "/v1/adapters/swept/versions")["data"]
    assert [v["id"] for v in versions] == ["swept:v1"]  # one version for the whole sweep
    version = _get(server, tenant, "/v1/adapters/swept/versions/v1")
    manifest = version["manifest"]
    assert manifest["job_id"] == parent_id and manifest["lora_config"]["r"] == best["rank"]
    assert manifest["rank_sweep"]["chosen"] == {"job_id": best["id"], "rank": best["rank"]}
    assert [(c["rank"], c["status"]) for c in manifest["rank_sweep"]["children"]] == [
        (2, "succeeded"), (4, "succeeded"), (8, "succeeded")]
    _assert_rank_report(version, r=best["rank"])

    # An ordinary job's version carries its rank report too.
    plain_job = wait_for(lambda: ended(plain.json()["id"]), "the plain job to end", timeout_s=600)
    assert plain_job["status"] == "succeeded", plain_job["error"]
    _assert_rank_report(_get(server, tenant, "/v1/adapters/plain/versions/v1"), r=4)

    # `lorafleet adapters show`: the summary, the per-module table and the sweep's comparison.
    env = {"LORAFLEET_API_KEY": tenant.api_key, "LORAFLEET_BASE_URL": server.url, "COLUMNS": "200"}
    shown = CliRunner().invoke(app, ["adapters", "show", "swept:v1"], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"Rank report: {version['rank_report']['summary']['message']}" in shown.output
    assert "model.layers.0.self_attn.q_proj" in shown.output and "eff. rank 90%" in shown.output
    assert "Rank sweep" in shown.output and "chosen" in shown.output and best["id"] in shown.output
    as_json = CliRunner().invoke(app, ["adapters", "show", "swept", "--json"], env=env)
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout)["rank_report"] == version["rank_report"]


def _assert_rank_report(version: dict[str, Any], *, r: int) -> None:
    """The report per adapted module (q_proj and v_proj of each layer), its summary on the version object."""
    report = version["rank_report"]
    assert report == version["manifest"]["rank_report"]
    assert version["rank_report_summary"] == report["summary"]
    modules = report["modules"]
    assert modules and {m["module"].rsplit(".", 1)[-1] for m in modules} == {"q_proj", "v_proj"}
    for m in modules:
        assert m["r"] == r and len(m["singular_values"]) == r
        assert m["singular_values"] == sorted(m["singular_values"], reverse=True)
        assert 0 <= m["effective_rank_90"] <= m["effective_rank_99"] <= r
        assert m["verdict"] in ("too_small", "adequate", "larger_than_needed", "untrained")
    assert report["summary"]["modules"] == len(modules) and report["summary"]["r"] == r
    assert report["summary"]["message"].startswith("rank looks") or "untrained" in report["summary"]["message"]
