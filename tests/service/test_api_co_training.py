"""Co-training through the API: the `co_training` extension field on create and on the job object, over
real HTTP on a real redis-server (the end-to-end run on Ray is tests/service/test_co_training_end_to_end.py)."""

from __future__ import annotations

import pytest

from fleet.queue import JobStore
from fleet.settings import make_redis


@pytest.fixture
def training_file(api_server, tenant_a, dataset_path) -> str:
    with open(dataset_path, "rb") as fh:
        return api_server.openai(tenant_a.api_key).files.create(file=fh, purpose="fine-tune").id


def _create(api_server, tenant, training_file, **extra):
    with api_server.client(tenant.api_key) as c:
        return c.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training_file, **extra})


def test_a_job_may_opt_out_of_co_training_and_shows_it(api_server, tenant_a, training_file):
    default = _create(api_server, tenant_a, training_file)
    assert default.status_code == 200, default.text
    assert default.json()["co_training"] is True
    alone = _create(api_server, tenant_a, training_file, co_training=False)
    assert alone.status_code == 200, alone.text
    assert alone.json()["co_training"] is False
    again = api_server.openai(tenant_a.api_key).fine_tuning.jobs.retrieve(alone.json()["id"])
    assert again.model_extra["co_training"] is False
    stored = JobStore(make_redis(api_server.settings)).load_job(alone.json()["id"])
    assert stored.spec.co_training is False  # what the scheduler reads


def test_a_non_boolean_co_training_is_a_400_naming_the_field(api_server, tenant_a, training_file):
    response = _create(api_server, tenant_a, training_file, co_training="sometimes")
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "co_training"
