"""JobSpec: one set of limits and defaults, and jobs stored before it (dict fields in the hash) read into it."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from fleet import keys
from fleet.job_spec import DEFAULT_TARGET_MODULES, Hyperparameters, JobSpec, LoraSpec
from fleet.jobs import JobStatus
from fleet.queue import JobStore
from fleet.resources import Resources
from tests.fleet.conftest import PRE_JOBSPEC_HYPERPARAMETERS, write_pre_jobspec_job


@pytest.fixture
def jobs(r) -> JobStore:
    return JobStore(r, max_attempts=3)


def test_defaults_are_auto_hyperparameters_the_default_adapter_and_one_gpu():
    spec = JobSpec()
    assert spec.hyperparameters == Hyperparameters(n_epochs="auto", batch_size="auto", learning_rate_multiplier="auto")
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (8, 16.0, 0.05)
    assert spec.lora.target_modules == list(DEFAULT_TARGET_MODULES)
    assert (spec.lora.use_rslora, spec.lora.use_dora) == (False, False)
    assert (spec.quantization, spec.resources, spec.priority) == (None, Resources(), "normal")


@pytest.mark.parametrize("field, value", [
    ("n_epochs", 0), ("n_epochs", 51), ("batch_size", 0), ("batch_size", 257),
    ("learning_rate_multiplier", 0), ("learning_rate_multiplier", 101), ("learning_rate_multiplier", float("inf")),
    ("n_epochs", "many"), ("temperature", 1),
])
def test_hyperparameters_outside_the_limits_are_refused(field, value):
    with pytest.raises(ValidationError) as e:
        Hyperparameters(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field


def test_hyperparameters_at_the_limits_are_accepted():
    hp = Hyperparameters(n_epochs=50, batch_size=256, learning_rate_multiplier=100)
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (50, 256, 100.0)


@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", 1025), ("alpha", 0), ("alpha", float("inf")), ("dropout", 1.0), ("dropout", -0.1),
    ("target_modules", []), ("target_modules", ["q_proj", "bad name!"]), ("target_modules", "q_proj"),
])
def test_lora_outside_the_limits_is_refused(field, value):
    with pytest.raises(ValidationError) as e:
        LoraSpec(**{field: value})
    assert e.value.errors()[0]["loc"][0] == field


def test_the_lora_block_is_the_spec_plus_quantization_as_the_manifest_stores_it():
    spec = JobSpec(lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]}, quantization="none")
    assert spec.lora_block() == {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["q_proj"],
                                 "use_rslora": False, "use_dora": False, "quantization": "none"}


def test_a_created_job_stores_its_spec_as_one_json_field(jobs, r):
    spec = JobSpec(lora={"r": 4, "target_modules": "all-linear"}, quantization="int8",
                   hyperparameters={"n_epochs": 2}, resources={"gpus": 2}, priority="high")
    job = jobs.create_job("t1", model="tiny-llama", training_file="file-x", spec=spec).job
    stored = r.hgetall(keys.job(job.id))
    assert JobSpec.model_validate_json(stored["spec"]) == spec
    assert not {"lora", "method", "hyperparameters", "resources"} & set(stored)
    assert (stored["gpus"], stored["priority_value"]) == ("2", "1")  # what the scheduler's Lua reads
    assert jobs.load_job(job.id).spec == spec


def test_a_job_stored_before_jobspec_loads_into_the_spec(jobs, r):
    job = jobs.load_job(write_pre_jobspec_job(jobs, r))
    assert job.spec.hyperparameters == Hyperparameters(**PRE_JOBSPEC_HYPERPARAMETERS)
    assert job.spec.lora == LoraSpec(r=4, alpha=8.0, dropout=0.1, target_modules=["q_proj", "v_proj"],
                                     use_rslora=True)
    assert job.spec.quantization == "nf4"
    assert (job.resources, job.priority) == (Resources(workers=2), "high")
    assert job.hyperparameters_used is None  # a queued job's `hyperparameters` were the request


def test_an_old_succeeded_job_keeps_its_request_and_the_values_used(jobs, r):
    used = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5, "learning_rate": 1e-4}
    job_id = write_pre_jobspec_job(jobs, r, hyperparameters=json.dumps(used), status=JobStatus.SUCCEEDED.value)
    job = jobs.load_job(job_id)
    assert job.spec.hyperparameters == Hyperparameters(**PRE_JOBSPEC_HYPERPARAMETERS)  # from its method block
    assert job.hyperparameters_used == used


def test_an_old_job_created_without_lora_or_method_takes_the_defaults(jobs, r):
    job_id = write_pre_jobspec_job(jobs, r, hyperparameters="{}", lora="{}")
    r.hdel(keys.job(job_id), "method")
    job = jobs.load_job(job_id)
    assert job.spec.lora == LoraSpec() and job.spec.quantization is None
    assert job.spec.hyperparameters == Hyperparameters()
