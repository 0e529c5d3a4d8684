"""Our adapters against PEFT as the oracle: same logits both ways through the PEFT file format."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lora_core
from lora_core import LoraConfig, apply_lora, load_adapter, save_adapter

TOL = 1e-5


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize(
    "cfg",
    [
        LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        LoraConfig(r=4, alpha=8, target_modules="all-linear", use_rslora=True, init="gaussian"),
        LoraConfig(r=4, alpha=16, target_modules=r".*\.mlp\.(up|down)_proj", use_dora=True),
        LoraConfig(r=2, alpha=4, target_modules=["self_attn.o_proj", "gate_proj"], dropout=0.1, use_dora=True),
    ],
    ids=["qv", "all-linear-rslora", "regex-dora", "suffix-dora-dropout"],
)
def test_ours_saved_loads_in_peft_with_same_logits(cfg, load_tiny, batch, randomize, tmp_path, caplog):
    from peft import PeftModel

    ours = apply_lora(load_tiny(), cfg)
    randomize(ours)
    ours.eval()
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    expected = _logits(ours, batch)

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(load_tiny(), tmp_path / "adapter")
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
    peft_model.eval()
    got = _logits(peft_model, batch)
    assert (got - expected).abs().max().item() <= TOL
    # and the adapter really changes the output (so the comparison means something)
    assert (expected - _logits(load_tiny(), batch)).abs().max().item() > 1e-3


def test_saved_files_follow_peft_layout(load_tiny, randomize, tmp_path):
    model = apply_lora(load_tiny(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    save_adapter(model, tmp_path, base_model_name_or_path="org/base")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == ["q_proj", "v_proj"]
    assert config["bias"] == "none" and config["base_model_name_or_path"] == "org/base"
    for refused in ("modules_to_save", "rank_pattern", "alpha_pattern"):
        assert refused not in config
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight" in tensors
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in tensors
    assert all(".default." not in k for k in tensors)
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.parametrize(
    "peft_kwargs",
    [
        {"target_modules": ["q_proj", "k_proj", "v_proj"], "use_rslora": True},
        {"target_modules": "all-linear"},
        {"target_modules": ["q_proj", "down_proj"], "use_dora": True},
        {"target_modules": "all-linear", "use_dora": True, "use_rslora": True},
    ],
    ids=["rslora", "all-linear", "dora", "all-linear-dora-rslora"],
)
def test_peft_saved_loads_in_ours_with_same_logits(peft_kwargs, load_tiny, batch, randomize, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(load_tiny(), PeftLoraConfig(r=4, lora_alpha=12, task_type="CAUSAL_LM", **peft_kwargs))
    randomize(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    expected = _logits(peft_model, batch)

    ours = load_adapter(load_tiny(), tmp_path).eval()
    got = _logits(ours, batch)
    assert (got - expected).abs().max().item() <= TOL
    assert (expected - _logits(load_tiny(), batch)).abs().max().item() > 1e-3


@pytest.mark.parametrize("use_dora, dropout", [(False, 0.0), (True, 0.0), (False, 0.2), (True, 0.2)],
                         ids=["lora", "dora", "lora-dropout", "dora-dropout"])
def test_training_forward_and_gradients_match_peft(use_dora, dropout, load_tiny, batch, randomize):
    """Same weights (and the same dropout masks) → same loss and same adapter gradients in train mode."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(load_tiny(), PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            lora_dropout=dropout, use_dora=use_dora,
                                                            task_type="CAUSAL_LM"))
    randomize(peft_model)
    ours = apply_lora(load_tiny(), LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora,
                                              dropout=dropout))
    lora_core.set_lora_state_dict(ours, _peft_state(peft_model))
    peft_model.train()
    ours.train()
    labels = batch["input_ids"]
    torch.manual_seed(123)  # both draw their dropout masks in the same module order
    loss_peft = peft_model(**batch, labels=labels).loss
    torch.manual_seed(123)
    loss_ours = ours(**batch, labels=labels).loss
    loss_peft.backward()
    loss_ours.backward()
    assert abs(loss_peft.item() - loss_ours.item()) <= TOL
    peft_grads = {k: v.grad for k, v in _peft_named_lora(peft_model).items()}
    for path, layer in lora_core.lora_layers(ours):
        key = f"base_model.model.{path}.lora_B.weight"
        torch.testing.assert_close(layer.lora_B["default"].grad, peft_grads[key], rtol=1e-4, atol=1e-6)
        key = f"base_model.model.{path}.lora_A.weight"
        torch.testing.assert_close(layer.lora_A["default"].grad, peft_grads[key], rtol=1e-4, atol=1e-6)


def _peft_named_lora(peft_model) -> dict[str, torch.nn.Parameter]:
    out = {}
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            out[name.replace(".default", "")] = param
    return out


def _peft_state(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model)
