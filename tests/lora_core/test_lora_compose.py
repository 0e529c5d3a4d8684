"""Several adapters on one base, combining adapters (linear exact, TIES)."""

from __future__ import annotations

import pytest
import torch

import lora_core
from lora_core import LoraConfig, apply_lora


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def two_adapters(load_tiny, randomize):
    model = load_tiny()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter_name="math")
    lora_core.add_adapter(model, LoraConfig(r=2, alpha=2, target_modules=["v_proj", "up_proj"], use_rslora=True),
                          "code")
    randomize(model)
    return model, base


def test_add_switch_disable_delete(two_adapters, load_tiny, batch):
    model, _ = two_adapters
    base_logits = _logits(load_tiny(), batch)
    assert lora_core.active_adapters(model) == ("math",)
    math_logits = _logits(model, batch)
    lora_core.set_active_adapter(model, "code")
    code_logits = _logits(model, batch)
    assert (math_logits - code_logits).abs().max() > 1e-3
    with lora_core.adapters_disabled(model):
        assert torch.equal(_logits(model, batch), base_logits)
    assert torch.equal(_logits(model, batch), code_logits)
    lora_core.delete_adapter(model, "math")
    assert set(lora_core.list_adapters(model)) == {"code"}
    assert torch.equal(_logits(model, batch), code_logits)
    assert not any("q_proj" in p for p, _ in lora_core.lora_layers(model)), "q_proj held only 'math': unwrapped"
    with pytest.raises(lora_core.AdapterNotFoundError, match="no adapter named 'math'"):
        lora_core.set_active_adapter(model, "math")


def test_two_active_adapters_add_up(two_adapters, batch, load_tiny):
    model, _ = two_adapters
    base = _logits(load_tiny(), batch)
    math = _logits(model, batch)
    lora_core.set_active_adapter(model, "code")
    code = _logits(model, batch)
    lora_core.set_active_adapter(model, ["math", "code"])
    both = _logits(model, batch)
    assert both.shape == base.shape and (both - math).abs().max() > 1e-3 and (both - code).abs().max() > 1e-3


def test_saving_one_of_several_adapters_round_trips(two_adapters, load_tiny, batch, tmp_path):
    model, _ = two_adapters
    lora_core.set_active_adapter(model, "code")
    expected = _logits(model, batch)
    lora_core.save_adapter(model, tmp_path / "code", adapter_name="code")
    loaded = lora_core.load_adapter(load_tiny(), tmp_path / "code")
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=0, atol=1e-5)


def test_linear_combination_is_exact_by_concatenating_ranks(two_adapters):
    model, _ = two_adapters
    lora_core.combine_adapters(model, {"math": 0.7, "code": -1.5}, "mix")
    config = lora_core.list_adapters(model)["mix"]
    assert config.r == 6 and config.scale == 1.0
    for path, layer in lora_core.lora_layers(model):
        expected = torch.zeros(layer.out_features, layer.in_features)
        if "math" in layer.lora_A:
            expected += 0.7 * layer.delta_weight("math")
        if "code" in layer.lora_A:
            expected += -1.5 * layer.delta_weight("code")
        torch.testing.assert_close(layer.delta_weight("mix"), expected, rtol=0, atol=1e-6, msg=path)


def test_ties_keeps_agreeing_signs_and_trims_small_entries():
    a = torch.tensor([[3.0, -1.0, 0.1, 2.0]])
    b = torch.tensor([[1.0, 2.0, -0.1, -4.0]])
    merged = lora_core.ties_merge([a, b], density=0.5)
    # a keeps {3, 2}, b keeps {2, -4}; elected signs: +, +, 0, - ; disjoint means: 3, 2, 0, -4
    assert torch.equal(merged, torch.tensor([[3.0, 2.0, 0.0, -4.0]]))


def test_ties_combination_adds_a_low_rank_adapter_close_to_the_ties_update(two_adapters):
    model, _ = two_adapters
    lora_core.combine_adapters(model, {"math": 1.0, "code": 1.0}, "ties", method="ties", density=1.0, rank=64)
    for _, layer in lora_core.lora_layers(model):
        present = [n for n in ("math", "code") if n in layer.lora_A]
        target = lora_core.ties_merge([layer.delta_weight(n).detach() for n in present], 1.0)
        torch.testing.assert_close(layer.delta_weight("ties").detach(), target, rtol=0, atol=1e-5)


def test_dora_adapters_cannot_be_combined(load_tiny):
    model = apply_lora(load_tiny(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(lora_core.LoraError, match="uses DoRA"):
        lora_core.combine_adapters(model, {"default": 1.0}, "x")



def test_two_dora_adapters_merge_like_their_forward_and_like_peft(load_tiny, randomize, batch, tmp_path):
    from peft import PeftModel

    model = load_tiny()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True), "a")
    lora_core.add_adapter(model, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True), "b")
    randomize(model)  # perturbs the magnitudes too, so each DoRA gain differs from 1
    lora_core.set_active_adapter(model, ["a", "b"])
    unmerged = _logits(model, batch)
    for name in ("a", "b"):
        lora_core.save_adapter(model, tmp_path / name, adapter_name=name)

    lora_core.merge_adapter(model)
    merged = _logits(model, batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)

    peft_model = PeftModel.from_pretrained(load_tiny(), tmp_path / "a", adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.base_model.set_adapter(["a", "b"])
    peft_model.base_model.merge_adapter(["a", "b"])
    torch.testing.assert_close(merged, _logits(peft_model, batch), atol=1e-5, rtol=1e-5)

    lora_core.unmerge_adapter(model)
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=1e-5)
