"""LoraConfig validation and its PEFT JSON form."""

from __future__ import annotations

import math

import pytest

from lora_core import LoraConfig, LoraConfigError


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_rank_must_be_a_positive_integer(r):
    with pytest.raises(LoraConfigError, match="r must be a positive integer"):
        LoraConfig(r=r)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_dropout_must_be_in_zero_one(dropout):
    with pytest.raises(LoraConfigError, match=r"dropout must be in \[0, 1\)"):
        LoraConfig(dropout=dropout)


def test_all_problems_are_reported_at_once():
    with pytest.raises(LoraConfigError) as info:
        LoraConfig(r=0, alpha=-1, dropout=2.0, target_modules=[], init="xavier")
    message = str(info.value)
    for field in ("r must", "alpha must", "dropout must", "target_modules is empty", "init must"):
        assert field in message


def test_invalid_regex_target_is_reported():
    with pytest.raises(LoraConfigError, match="not a valid regular expression"):
        LoraConfig(target_modules="q_proj(")


def test_scale_is_alpha_over_r_or_over_sqrt_r_with_rslora():
    assert LoraConfig(r=8, alpha=16).scale == 2.0
    assert LoraConfig(r=16, alpha=16, use_rslora=True).scale == pytest.approx(16 / math.sqrt(16))


def test_config_is_frozen_and_lists_become_tuples():
    cfg = LoraConfig(target_modules=["q_proj", "v_proj"])
    assert cfg.target_modules == ("q_proj", "v_proj")
    with pytest.raises(AttributeError):
        cfg.r = 4  # type: ignore[misc]


def test_peft_dict_round_trip():
    cfg = LoraConfig(r=4, alpha=8, dropout=0.05, target_modules=["q_proj"], use_rslora=True, use_dora=True,
                     init="gaussian")
    data = cfg.to_peft_dict(base_model_name_or_path="org/model")
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert data["lora_alpha"] == 8 and data["init_lora_weights"] == "gaussian"
    assert LoraConfig.from_peft_dict(data) == cfg


def test_peft_dict_with_unsupported_fields_is_refused_listing_each():
    data = LoraConfig().to_peft_dict() | {"rank_pattern": {"q_proj": 4}, "modules_to_save": ["lm_head"],
                                         "bias": "all"}
    with pytest.raises(LoraConfigError) as info:
        LoraConfig.from_peft_dict(data)
    for field in ("rank_pattern", "modules_to_save", "bias"):
        assert field in str(info.value)


def test_exclude_modules_must_be_a_list_and_excluded_modules_are_not_wrapped(load_tiny):
    with pytest.raises(LoraConfigError, match="exclude_modules must be a list"):
        LoraConfig(exclude_modules="lm_head")
    import lora_core

    paths = lora_core.find_target_modules(load_tiny(), LoraConfig(target_modules="all-linear",
                                                                  exclude_modules=["down_proj"]))
    assert paths and not any(p.endswith("down_proj") for p in paths)
