"""POST /v1/fine_tuning/jobs/estimate and `lorafleet jobs estimate` over real HTTP, on a real Redis.

The catalog's "tiny-llama" here has a complete config.json of the tiny model's shape (hidden 128, MLP
352, 4 layers, GQA 4/2 heads, vocabulary 512), so every figure but the duration can be computed; the
duration appears once a finished job's speed is in Redis.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleet import keys
from fleet.estimate import NO_THROUGHPUT_YET
from fleet.settings import make_redis
from fleet.throughput import ThroughputStore
from service.cli import app
from tests.service.conftest import make_api_settings, write_chat_dataset
from tests.service.test_end_to_end import e2e, synthetic  # noqa: F401  (fixtures: API, dispatchers, Ray)

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "intermediate_size": 352,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
# (in, out) of each Llama linear layer at that shape: q and o 128↔128, k and v 128→64 (2 KV heads of 32),
# the MLP 128↔352.
LINEARS = {"q_proj": (128, 128), "k_proj": (128, 64), "v_proj": (128, 64), "o_proj": (128, 128),
           "gate_proj": (128, 352), "up_proj": (128, 352), "down_proj": (352, 128)}
PARTS = ("base_weights", "adapter_weights", "gradients", "optimizer_state", "activations", "loss_logits", "reserve")


@pytest.fixture
def server(tmp_path, redis_server, start_api_server):
    model_dir = tmp_path / "tiny-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY), encoding="utf-8")
    return start_api_server(make_api_settings(tmp_path, redis_server.url, model_dir=model_dir))


@pytest.fixture
def tenant(server):
    return server.create_tenant("team-a")


@pytest.fixture
def training_file(server, tenant, tmp_path) -> str:
    path = write_chat_dataset(tmp_path / "train.jsonl", 40)
    with server.client(tenant.api_key) as http, open(path, "rb") as fh:
        response = http.post("/v1/files", files={"file": ("train.jsonl", fh)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _post(server, tenant, path: str, body: dict):
    with server.client(tenant.api_key) as http:
        return http.post(path, json=body)


def test_the_estimate_states_each_figure_with_its_assumption_and_creates_nothing(server, tenant, training_file):
    body = {"model": "tiny-llama", "training_file": training_file,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}},
            "lora": {"r": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}}
    response = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body)
    assert response.status_code == 200, response.text
    estimate = response.json()
    assert estimate["object"] == "fine_tuning.job.estimate" and estimate["quantization"] == "nf4"

    # r·(in + out) per adapted matrix, in each of the 4 layers.
    expected = 4 * sum(8 * (LINEARS[m][0] + LINEARS[m][1]) for m in ("q_proj", "v_proj", "down_proj"))
    assert estimate["trainable_parameters"]["value"] == expected
    assert estimate["adapter_file_bytes"]["value"] > 4 * expected  # fp32 tensors plus the header
    memory = estimate["peak_memory_bytes"]
    assert memory["value"] == sum(memory[part]["value"] for part in PARTS)
    assert memory["adapter_weights"]["value"] == 4 * expected and memory["optimizer_state"]["value"] == 8 * expected
    assert memory["reserve"]["value"] == 0  # the test cluster trains on the CPU: no CUDA context
    tokens = estimate["training_tokens"]
    assert tokens["value"] > 0 and "40 examples" in tokens["assumption"] and "3 epoch" in tokens["assumption"]
    assert estimate["hyperparameters"]["n_epochs"] == 3 and estimate["hyperparameters"]["batch_size"] == 2
    assert estimate["duration_s"] == {"value": None, "assumption": NO_THROUGHPUT_YET}
    figures = [estimate[f] for f in ("trainable_parameters", "adapter_file_bytes", "training_tokens", "duration_s")]
    assert all(f["assumption"] for f in figures + [memory] + [memory[p] for p in PARTS])

    with server.client(tenant.api_key) as http:
        assert http.get("/v1/fine_tuning/jobs").json()["data"] == []
    client = make_redis(server.settings)
    assert client.llen(keys.queue(tenant.id)) == 0 and client.zcard(keys.tenant_jobs(tenant.id)) == 0
    client.close()


def test_dora_adds_a_magnitude_vector_per_adapted_matrix(server, tenant, training_file):
    body = {"model": "tiny-llama", "training_file": training_file, "lora": {"r": 4, "target_modules": ["q_proj"]}}
    plain = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body).json()
    dora = _post(server, tenant, "/v1/fine_tuning/jobs/estimate",
                 {**body, "lora": {**body["lora"], "use_dora": True}}).json()
    assert plain["trainable_parameters"]["value"] == 4 * 4 * (128 + 128)
    assert dora["trainable_parameters"]["value"] == plain["trainable_parameters"]["value"] + 4 * 128
    assert "magnitude" in dora["trainable_parameters"]["assumption"]


def test_the_duration_comes_from_the_speed_finished_jobs_recorded(server, tenant, training_file):
    client = make_redis(server.settings)
    store = ThroughputStore(client)
    store.record("cpu", "tiny-llama", tokens_per_s=1200.0, workers=2)  # 600 tokens/s per worker
    store.record("GPU", "tiny-llama", tokens_per_s=99999.0, workers=1)  # another accelerator kind: not ours
    client.close()
    body = {"model": "tiny-llama", "training_file": training_file, "resources": {"gpus": 1}}
    estimate = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body).json()
    tokens = estimate["training_tokens"]["value"]
    assert estimate["duration_s"]["value"] == pytest.approx(tokens / 600.0, abs=0.1)
    assert "600.0 tokens/s per worker on cpu" in estimate["duration_s"]["assumption"]


def test_a_base_model_whose_config_lacks_sizes_gets_unknown_figures_saying_why(tmp_path, redis_server,
                                                                              start_api_server):
    server = start_api_server(make_api_settings(tmp_path, redis_server.url))  # config.json without vocab_size
    tenant = server.create_tenant("team-a")
    path = write_chat_dataset(tmp_path / "train.jsonl", 12)
    with server.client(tenant.api_key) as http, open(path, "rb") as fh:
        file_id = http.post("/v1/files", files={"file": ("t.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
    estimate = _post(server, tenant, "/v1/fine_tuning/jobs/estimate",
                     {"model": "tiny-llama", "training_file": file_id}).json()
    for figure in (estimate["trainable_parameters"], estimate["peak_memory_bytes"], estimate["adapter_file_bytes"]):
        assert figure["value"] is None
        assert "intermediate_size, vocab_size" in figure["assumption"]
    assert estimate["training_tokens"]["value"] > 0  # the file alone tells this one


BAD_BODIES = [
    ("unknown model", {"model": "no-such-model"}),
    ("rank above the catalog's max", {"lora": {"r": 128}}),
    ("unknown target module", {"lora": {"target_modules": ["q_proj", "qq_proj"]}}),
    ("missing file", {"training_file": "file-doesnotexist"}),
    ("unknown field", {"learning_rate": 0.1}),
    ("no GPUs", {"resources": {"gpus": 0}}),
    ("bad hyperparameter", {"hyperparameters": {"n_epochs": 0}}),
]


@pytest.mark.parametrize(("case", "change"), BAD_BODIES, ids=[c for c, _ in BAD_BODIES])
def test_the_estimate_refuses_what_create_refuses_with_the_same_error(server, tenant, training_file, case, change):
    body = {"model": "tiny-llama", "training_file": training_file, **change}
    created = _post(server, tenant, "/v1/fine_tuning/jobs", body)
    estimated = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body)
    assert 400 <= created.status_code < 500, created.text
    assert estimated.status_code == created.status_code, (case, estimated.text)
    assert estimated.json()["error"] == created.json()["error"], case


def test_too_small_a_training_file_is_refused_as_create_refuses_it(server, tenant, tmp_path):
    path = write_chat_dataset(tmp_path / "small.jsonl", 3)
    with server.client(tenant.api_key) as http, open(path, "rb") as fh:
        file_id = http.post("/v1/files", files={"file": ("s.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
    body = {"model": "tiny-llama", "training_file": file_id}
    estimated = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body)
    assert estimated.status_code == 400 and estimated.json()["error"]["code"] == "too_few_examples"
    assert estimated.json() == _post(server, tenant, "/v1/fine_tuning/jobs", body).json()


def _cli(server, tenant, *args: str):
    env = {"LORAFLEET_BASE_URL": server.url, "LORAFLEET_API_KEY": tenant.api_key, "LORAFLEET_ADMIN_KEY": "",
           "COLUMNS": "220"}
    return CliRunner().invoke(app, ["jobs", "estimate", *args], env=env)


def test_the_cli_prints_a_table_or_only_json_and_uploads_a_local_file(server, tenant, tmp_path):
    path: Path = write_chat_dataset(tmp_path / "local.jsonl", 20)
    options = ["--model", "tiny-llama", "--training-file", str(path), "--r", "4", "--target-modules", "q_proj,v_proj",
               "--n-epochs", "2"]
    as_json = _cli(server, tenant, *options, "--json")
    assert as_json.exit_code == 0, as_json.output
    estimate = json.loads(as_json.stdout)  # stdout holds only the JSON; the upload notice went to stderr
    assert estimate["trainable_parameters"]["value"] == 4 * 4 * ((128 + 128) + (128 + 64))
    assert estimate["hyperparameters"]["n_epochs"] == 2

    table = _cli(server, tenant, *options)
    assert table.exit_code == 0, table.output
    for text in ("trainable parameters", f"{estimate['trainable_parameters']['value']:,}", "peak memory per worker",
                 "activations", "training tokens", "duration", "unknown", "no finished job on this base model yet"):
        assert text in table.stdout, text
    with server.client(tenant.api_key) as http:
        assert http.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_the_cli_reports_a_refused_estimate(server, tenant, tmp_path):
    path = write_chat_dataset(tmp_path / "local.jsonl", 20)
    result = _cli(server, tenant, "--model", "tiny-llama", "--training-file", str(path), "--r", "0")
    assert result.exit_code == 1 and "HTTP 400" in result.output and "lora.r" in result.output


def _peak_live_tensor_bytes():
    """bench/tensor_memory.py's measure: the peak of live torch tensor bytes from the profiler's
    allocation and free events (torch's CPU allocator keeps no peak; process RSS would count Python)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "tensor_memory.py"
    spec = importlib.util.spec_from_file_location("tensor_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_live_tensor_bytes


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_the_memory_estimate_is_within_25_percent_of_a_cpu_runs_measured_peak(tmp_path, redis_server,
                                                                               start_api_server, tiny_model_dir,
                                                                               quantization):
    """The API's estimate for a job, against the peak of live tensor bytes of the same job trained on the
    CPU by the engine (model loaded, micro-batches of 2 packed rows of 1024 tokens, 3 steps, adapter saved);
    the CPU cluster's estimate is fp32 with no CUDA reserve, as the run is. The adapter file is exact.
    int8 keeps every layer's linear inputs past gradient checkpointing (bitsandbytes holds them on its
    autograd context), which the estimate must count."""
    import torch

    from fleet.job_spec import LoraSpec
    from workers.loop import train
    from workers.reporting import ListReporter
    from workers.spec import TrainingSpec
    from workers.synthetic import write_synthetic_dataset

    settings = make_api_settings(tmp_path, redis_server.url, model_dir=tiny_model_dir,
                                 catalog={"tiny-llama": {"path": str(tiny_model_dir), "quantization": quantization}})
    server = start_api_server(settings)
    tenant = server.create_tenant("team-a")
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 600, seed=0)  # ~17k tokens: rows fill up
    with server.client(tenant.api_key) as http, open(data, "rb") as fh:
        file_id = http.post("/v1/files", files={"file": ("t.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
    hyperparameters = {"n_epochs": 1, "batch_size": 2}
    body = {"model": "tiny-llama", "training_file": file_id, "lora": {"r": 16},
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}
    estimate = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body).json()
    memory = estimate["peak_memory_bytes"]
    assert memory["reserve"]["value"] == 0 and "of 1024 tokens" in memory["activations"]["assumption"]

    assert estimate["quantization"] == quantization
    spec = TrainingSpec(base_model=tiny_model_dir, training_file=data, n_checkpoints=0,
                        quantization=None if quantization == "none" else quantization,
                        lora=LoraSpec(**{k: estimate["lora"][k] for k in LoraSpec.model_fields}),
                        hyperparameters={**hyperparameters, "max_steps": 3})
    torch.manual_seed(0)
    peak, result = _peak_live_tensor_bytes()(lambda: train(spec, output_dir=tmp_path / "run", reporter=ListReporter()))
    assert result.status == "succeeded" and result.hyperparameters["batch_size"] == 2

    ratio = memory["value"] / peak
    assert 0.75 <= ratio <= 1.25, (f"estimate {memory['value'] / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB",
                                   {part: memory[part]["value"] for part in PARTS})
    saved = result.adapter_dir / "adapter_model.safetensors"
    assert estimate["adapter_file_bytes"]["value"] == saved.stat().st_size


def test_the_cli_estimate_takes_every_option_of_create_but_the_create_only_ones():
    import typer.main

    jobs = typer.main.get_command(app).commands["jobs"]
    options = {name: {opt for p in jobs.commands[name].params for opt in p.opts} for name in ("create", "estimate")}
    assert options["create"] - options["estimate"] == {"--idempotency-key", "--follow"}
    assert options["estimate"] <= options["create"]


@pytest.mark.slow
def test_a_job_that_finishes_gives_its_base_model_a_measured_duration(e2e, synthetic):  # noqa: F811 (fixtures)
    """Through a real dispatcher and Ray: the succeeded job's speed is recorded, and the next estimate
    on its base model has a duration."""
    from tests.service.test_end_to_end import _finished, _wait_for

    server, dispatchers = e2e()
    tenant = server.create_tenant("team-e2e")
    train_path, _ = synthetic
    with server.client(tenant.api_key) as http, open(train_path, "rb") as fh:
        file_id = http.post("/v1/files", files={"file": ("t.jsonl", fh)}, data={"purpose": "fine-tune"}).json()["id"]
    body = {"model": "tiny-llama", "training_file": file_id, "lora": {"r": 4, "target_modules": ["q_proj"]},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}}
    before = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body).json()
    assert before["duration_s"]["value"] is None

    dispatchers.start("dispatcher-1")
    job = _post(server, tenant, "/v1/fine_tuning/jobs", body).json()
    client = server.openai(tenant.api_key)
    done = _wait_for(lambda: _finished(client, job["id"]), f"job {job['id']} to finish")
    assert done.status == "succeeded", done.error

    redis_client = make_redis(server.settings)
    measured = ThroughputStore(redis_client).get("cpu", "tiny-llama")
    redis_client.close()
    assert measured is not None and measured.jobs == 1 and measured.tokens_per_s_per_worker > 0
    after = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body).json()
    assert after["duration_s"]["value"] == pytest.approx(
        after["training_tokens"]["value"] / measured.tokens_per_s_per_worker, abs=0.1)
    assert "1 finished job(s) on tiny-llama" in after["duration_s"]["assumption"]


def _upload(server, tenant, path: Path) -> str:
    with server.client(tenant.api_key) as http, open(path, "rb") as fh:
        response = http.post("/v1/files", files={"file": (path.name, fh)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def test_a_rank_sweeps_estimate_has_one_estimate_per_rank_and_the_sweeps_totals(server, tenant, training_file,
                                                                             tmp_path):
    validation = _upload(server, tenant, write_chat_dataset(tmp_path / "val.jsonl", 4))
    body = {"model": "tiny-llama", "training_file": training_file, "validation_file": validation,
            "lora": {"target_modules": ["q_proj"]}, "rank_sweep": [4, 16, 8]}
    response = _post(server, tenant, "/v1/fine_tuning/jobs/estimate", body)
    assert response.status_code == 200, response.text
    sweep = response.json()
    singles = {r: _post(server, tenant, "/v1/fine_tuning/jobs/estimate",
                        {**body, "rank_sweep": None, "lora": {"r": r, "target_modules": ["q_proj"]}}).json()
               for r in (4, 8, 16)}
    per_rank = sweep["rank_sweep"]
    assert [e["rank"] for e in per_rank] == [4, 16, 8]
    for e in per_rank:  # each child exactly as the same job with that lora.r
        for figure in ("trainable_parameters", "adapter_file_bytes", "peak_memory_bytes", "training_tokens"):
            assert e[figure] == singles[e["rank"]][figure], (e["rank"], figure)
    # The sweep's own figures: the largest child (what a worker must fit), and every child's tokens.
    assert sweep["lora"]["r"] == 16
    assert {k: v for k, v in sweep["peak_memory_bytes"].items() if k != "assumption"} == {
        k: v for k, v in singles[16]["peak_memory_bytes"].items() if k != "assumption"}
    assert "largest of the 3 child jobs (r=16)" in sweep["peak_memory_bytes"]["assumption"]
    assert sweep["trainable_parameters"]["value"] == singles[16]["trainable_parameters"]["value"]
    assert sweep["training_tokens"]["value"] == 3 * singles[4]["training_tokens"]["value"]
    assert "3 child jobs" in sweep["training_tokens"]["assumption"]
    # What create refuses, the estimate refuses the same way.
    for bad in ({**body, "validation_file": None}, {**body, "rank_sweep": [4]}, {**body, "lora": {"r": 4}}):
        bad = {k: v for k, v in bad.items() if v is not None}
        estimated, created = (_post(server, tenant, path, bad) for path in
                              ("/v1/fine_tuning/jobs/estimate", "/v1/fine_tuning/jobs"))
        assert estimated.status_code == created.status_code == 400, estimated.text
        assert estimated.json()["error"] == created.json()["error"]
    with server.client(tenant.api_key) as http:
        assert http.get("/v1/fine_tuning/jobs").json()["data"] == []


def test_the_cli_creates_and_estimates_a_rank_sweep(server, tenant, tmp_path):
    train, val = write_chat_dataset(tmp_path / "t.jsonl", 20), write_chat_dataset(tmp_path / "v.jsonl", 4)
    options = ["--model", "tiny-llama", "--training-file", str(train), "--validation-file", str(val),
               "--target-modules", "q_proj", "--rank-sweep", "4,8"]
    table = _cli(server, tenant, *options)
    assert table.exit_code == 0, table.output
    assert "r=4" in table.stdout and "r=8" in table.stdout
    env = {"LORAFLEET_BASE_URL": server.url, "LORAFLEET_API_KEY": tenant.api_key, "COLUMNS": "220"}
    created = CliRunner().invoke(app, ["jobs", "create", *options, "--json"], env=env)
    assert created.exit_code == 0, created.output
    parent = json.loads(created.stdout)
    assert [c["rank"] for c in parent["rank_sweep"]["children"]] == [4, 8]
    shown = CliRunner().invoke(app, ["jobs", "create", *options], env=env)
    assert shown.exit_code == 0, shown.output
    assert "r=4: child job ftjob-" in shown.stdout and "r=8: child job ftjob-" in shown.stdout
    bad = CliRunner().invoke(app, ["jobs", "create", *options[:-1], "4,x"], env=env)
    assert bad.exit_code != 0 and "--rank-sweep" in bad.output
