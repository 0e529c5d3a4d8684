"""JobSpec: one set of limits and defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.job_spec import DEFAULT_TARGET_MODULES, Hyperparameters, JobSpec, LoraSpec
from fleet.resources import Resources


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
