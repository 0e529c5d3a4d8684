"""Clear errors: unknown targets, corrupt or mismatched adapter files; strict loading leaves no half adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_core
from lora_core import AdapterFileError, LoraConfig, TargetModulesError, apply_lora, load_adapter, save_adapter


@pytest.fixture
def saved_adapter(load_tiny, randomize, tmp_path):
    model = apply_lora(load_tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    return save_adapter(model, tmp_path / "adapter")


def test_unknown_target_lists_the_models_linear_layer_names(load_tiny):
    with pytest.raises(TargetModulesError) as info:
        apply_lora(load_tiny(), LoraConfig(target_modules=["query_key_value"]))
    message = str(info.value)
    assert "query_key_value" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"):
        assert name in message


def test_target_that_is_not_a_linear_layer_is_named(load_tiny):
    with pytest.raises(TargetModulesError, match=r"model\.layers\.0\.mlp \(LlamaMLP\)"):
        apply_lora(load_tiny(), LoraConfig(target_modules=["mlp"]))


def test_target_matching_exact_suffix_regex_and_all_linear(load_tiny):
    model = load_tiny()
    find = lora_core.find_target_modules
    assert find(model, LoraConfig(target_modules=["model.layers.1.self_attn.q_proj"])) == [
        "model.layers.1.self_attn.q_proj"]
    assert len(find(model, LoraConfig(target_modules=["self_attn.q_proj"]))) == 4
    assert find(model, LoraConfig(target_modules=r"model\.layers\.[02]\.mlp\.down_proj")) == [
        "model.layers.0.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    with pytest.raises(TargetModulesError):
        find(model, LoraConfig(target_modules="q_proj"))
    all_linear = find(model, LoraConfig(target_modules="all-linear"))
    assert len(all_linear) == 4 * 7 and "lm_head" not in all_linear


def test_corrupt_weights_file_is_an_adapter_file_error(saved_adapter, load_tiny):
    (saved_adapter / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(load_tiny(), saved_adapter)


def test_invalid_config_json_is_an_adapter_file_error(saved_adapter, load_tiny):
    (saved_adapter / "adapter_config.json").write_text("{ not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json is not valid JSON"):
        load_adapter(load_tiny(), saved_adapter)


def test_missing_directory_says_what_is_needed(tmp_path, load_tiny):
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        load_adapter(load_tiny(), tmp_path / "nowhere")


def test_wrong_shape_names_the_key_and_both_shapes(saved_adapter, load_tiny):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(7, 4)
    save_file(tensors, path)
    with pytest.raises(AdapterFileError) as info:
        load_adapter(load_tiny(), saved_adapter)
    assert key in str(info.value) and "(7, 4)" in str(info.value) and "(64, 4)" in str(info.value)


def test_missing_and_unexpected_keys_are_all_named_and_nothing_is_left_applied(saved_adapter, load_tiny):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 128)
    save_file(tensors, path)
    model = load_tiny()
    with pytest.raises(AdapterFileError) as info:
        load_adapter(model, saved_adapter)
    message = str(info.value)
    assert "'model.layers.1.self_attn.q_proj' is adapted but the file has no lora_A" in message
    assert "model.layers.1.mlp.up_proj.lora_A.weight" in message
    assert not list(lora_core.lora_layers(model)) and not lora_core.list_adapters(model)


def test_config_targets_that_do_not_exist_in_the_model(saved_adapter, load_tiny):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]
    (saved_adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="c_attn"):
        load_adapter(load_tiny(), saved_adapter)


def test_rank_mismatch_between_config_and_tensors(saved_adapter, load_tiny):
    config = json.loads((saved_adapter / "adapter_config.json").read_text())
    config["r"] = 8
    (saved_adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"shape \(4, 128\) does not fit .* needs \(8, 128\)"):
        load_adapter(load_tiny(), saved_adapter)


def test_nan_in_the_file_is_refused(saved_adapter, load_tiny):
    path = saved_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match="NaN"):
        load_adapter(load_tiny(), saved_adapter)


def test_round_trip_restores_the_exact_tensors(saved_adapter, load_tiny):
    model = load_adapter(load_tiny(), saved_adapter)
    on_disk = load_file(saved_adapter / "adapter_model.safetensors")
    state = lora_core.lora_state_dict(model)
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in state)
