"""OpenAI's request shapes → JobSpec → the job object: the same `hyperparameters` and `method` on the wire."""

from __future__ import annotations

import pytest

from fleet.job_spec import JobSpec, LoraSpec
from fleet.jobs import Job, JobStatus
from service.objects import job_object
from service.schemas import JobCreateRequest

_SHAPES = [
    {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}}},
    {"hyperparameters": {"learning_rate_multiplier": 0.5}},
    {"method": {"type": "supervised"}},
    {},
]


def _job(spec: JobSpec, **fields) -> Job:
    return Job(id="ftjob-abc", tenant_id="t1", created_at=0, model="tiny-llama", training_file="file-1", spec=spec,
               **fields)


@pytest.mark.parametrize("shape", _SHAPES)
def test_openai_hyperparameter_shapes_come_back_unchanged(shape):
    body = JobCreateRequest(model="tiny-llama", training_file="file-1", **shape)
    spec = JobSpec(hyperparameters=body.effective_hyperparameters(), quantization="nf4")
    wire = job_object(_job(spec))
    given = body.effective_hyperparameters().model_dump(exclude_unset=True)
    assert wire["hyperparameters"] == {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto",
                                       **given}
    assert wire["method"] == {"type": "supervised", "supervised": {"hyperparameters": wire["hyperparameters"]}}
    assert JobSpec.model_validate_json(spec.model_dump_json()) == spec  # as the hash stores it


def test_extensions_come_back_as_the_lora_resources_and_priority_blocks():
    spec = JobSpec(lora=LoraSpec(r=4, alpha=8, target_modules=["q_proj"]), quantization="none",
                   resources={"gpus": 2}, priority="low")
    wire = job_object(_job(spec))
    assert wire["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.05, "target_modules": ["q_proj"],
                            "use_rslora": False, "use_dora": False, "quantization": "none"}
    assert (wire["resources"], wire["priority"]) == ({"workers": 2, "gpus_per_worker": 1}, "low")


def test_a_succeeded_job_shows_the_values_used_in_place_of_auto():
    used = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.5, "learning_rate": 3e-4}
    wire = job_object(_job(JobSpec(), status=JobStatus.SUCCEEDED, hyperparameters_used=used))
    assert wire["hyperparameters"] == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.5}
    assert wire["method"]["supervised"]["hyperparameters"] == wire["hyperparameters"]
