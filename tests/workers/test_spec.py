"""The engine's TrainingSpec reads the job's JobSpec: the same limits, one LoraConfig builder, old jobs too."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.job_spec import JobSpec, LoraSpec
from fleet.queue import JobStore
from tests.fleet.conftest import write_pre_jobspec_job
from workers.dispatcher import build_training_spec
from workers.spec import AUTO_BASE_LEARNING_RATE, TrainingSpec, lora_config, resolve_hyperparameters


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("{}\n")
    return path


@pytest.mark.parametrize("field, value", [("n_epochs", 51), ("batch_size", 257), ("learning_rate_multiplier", 101)])
def test_the_engine_refuses_what_the_api_refuses(tiny_model_dir, train_file, field, value):
    # The engine's own Hyperparameters used to allow 100 epochs and batches of 1024: a job the API
    # would refuse could still be trained by building a TrainingSpec directly.
    with pytest.raises(ValidationError, match=field):
        TrainingSpec(base_model=tiny_model_dir, training_file=train_file, hyperparameters={field: value})


def test_the_lora_config_is_the_job_specs_lora(tiny_model_dir, train_file):
    lora = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], use_rslora=True)
    config = lora_config(TrainingSpec(base_model=tiny_model_dir, training_file=train_file, lora=lora).lora)
    assert (config.r, config.alpha, config.dropout, config.use_rslora, config.use_dora) == (4, 8, 0.0, True, False)
    assert config.target_modules == ("q_proj", "v_proj")
    assert lora_config(LoraSpec(target_modules="all-linear")).target_modules == "all-linear"


def test_a_job_stored_before_jobspec_is_claimed_and_becomes_a_training_spec(redis_server, tiny_model_dir,
                                                                            train_file):
    client = redis_server.client(decode_responses=True)
    try:
        jobs = JobStore(client, max_attempts=3)
        job_id = write_pre_jobspec_job(jobs, client)
        claim = jobs.leases.claim_next_job("old-hash-worker", lease_ms=3000)
    finally:
        client.close()
    assert claim is not None and claim.job.id == job_id
    spec = build_training_spec(claim.job, base_model=tiny_model_dir, quantization=claim.job.spec.quantization,
                               work_dir=train_file.parent, training_file=train_file, validation_file=None)
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.use_rslora) == (4, 8.0, 0.1, True)
    assert spec.quantization == "nf4"
    hp = spec.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, "auto", 0.5)


def test_a_new_job_round_trips_through_redis_into_the_same_training_spec(redis_server, tiny_model_dir, train_file):
    wanted = JobSpec(lora={"r": 2, "target_modules": ["v_proj"]}, hyperparameters={"batch_size": 3})
    client = redis_server.client(decode_responses=True)
    try:
        jobs = JobStore(client)
        job = jobs.load_job(jobs.create_job("t1", model="tiny-llama", training_file="f", spec=wanted).job.id)
    finally:
        client.close()
    spec = build_training_spec(job, base_model=tiny_model_dir, quantization=None, work_dir=train_file.parent,
                               training_file=train_file, validation_file=None)
    assert spec.lora == wanted.lora and spec.hyperparameters.batch_size == 3


def test_an_auto_learning_rate_grows_for_a_narrow_base_and_stays_for_a_wide_one(tmp_path, train_file):
    def rate(hidden_size, **hyperparameters):
        spec = TrainingSpec(base_model=tmp_path, training_file=train_file,
                            hyperparameters={"batch_size": 16, **hyperparameters})
        return resolve_hyperparameters(spec, n_train_examples=400, n_train_tokens=16_000,
                                       base_hidden_size=hidden_size).learning_rate

    assert rate(None) == rate(4096) == rate(8192) == pytest.approx(AUTO_BASE_LEARNING_RATE)
    assert rate(2048) == pytest.approx(2 * AUTO_BASE_LEARNING_RATE)  # 1/width below 7B-class widths
    assert rate(128) == rate(64) == pytest.approx(32 * AUTO_BASE_LEARNING_RATE)  # capped at 32x
    assert rate(128, learning_rate_multiplier=0.5) == pytest.approx(16 * AUTO_BASE_LEARNING_RATE)
    assert rate(128, learning_rate=1e-4) == 1e-4  # a rate the job gives is used as it is
