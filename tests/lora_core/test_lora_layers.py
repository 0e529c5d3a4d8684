"""LoraLinear: parameter count, exact no-op at init, merge/unmerge, dtypes, DoRA, GPT-2 Conv1D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_core
from lora_core import LoraConfig, LoraLinear, apply_lora, merge_adapter, unmerge_adapter


def test_trainable_count_is_r_times_in_plus_out_on_a_4096_square_linear():
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    apply_lora(model, LoraConfig(r=16, alpha=32, target_modules=["0"]))
    count = sum(p.numel() for p in lora_core.trainable_parameters(model))
    assert count == 16 * (4096 + 4096) == 131_072
    report = lora_core.trainable_parameter_report(model)
    assert report.trainable == 131_072 and report.total == 4096 * 4096 + 131_072


def test_trainable_count_on_the_tiny_llama(load_tiny):
    model = load_tiny()
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    expected = sum(4 * (i + o) for n, (i, o) in shapes.items() if n != "lm_head")
    assert lora_core.trainable_parameter_report(model).trainable == expected
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_fresh_adapter_is_exact_noop(init, load_tiny, batch):
    base = load_tiny()
    with torch.no_grad():
        expected = base(**batch).logits
    model = apply_lora(load_tiny(), LoraConfig(r=8, target_modules="all-linear", init=init, use_dora=True))
    model.train()  # dropout off (0.0), but the train path runs
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)


def test_dropout_applies_to_the_adapter_branch_only():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8))
    layer.add_adapter("default", LoraConfig(r=4, dropout=0.5))
    layer.set_active_adapters(("default",))
    layer.train()
    x = torch.randn(3, 16)
    # B = 0: whatever dropout does to the branch input, the output is the base output exactly
    assert torch.equal(layer(x), layer.base_layer(x))
    nn.init.normal_(layer.lora_B["default"])
    layer.eval()
    expected = layer.base_layer(x) + x @ layer.lora_A["default"].T @ layer.lora_B["default"].T * layer.scale["default"]
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_then_unmerge_restores_weights_and_merged_equals_unmerged(use_dora, load_tiny, batch, randomize):
    model = apply_lora(load_tiny(), LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
    randomize(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        unmerged_logits = model(**batch).logits
        merge_adapter(model)
        merged_logits = model(**batch).logits
    changed = [n for n, p in model.named_parameters() if n in original and not torch.equal(p, original[n])]
    assert changed, "merge must write into the base weights"
    torch.testing.assert_close(merged_logits, unmerged_logits, rtol=0, atol=1e-4)
    unmerge_adapter(model)
    for name, param in model.named_parameters():
        if name in original:
            torch.testing.assert_close(param, original[name], rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, unmerged_logits, rtol=0, atol=1e-5)


def test_merge_and_unload_gives_a_plain_model_with_the_same_output(load_tiny, batch, randomize):
    model = apply_lora(load_tiny(), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    randomize(model)
    with torch.no_grad():
        expected = model(**batch).logits
        lora_core.merge_and_unload(model)
        assert not list(lora_core.lora_layers(model))
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=1e-4)


def _bf16_layer_with_trained_adapter() -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 16, dtype=torch.bfloat16))
    layer.add_adapter("default", LoraConfig(r=4))
    layer.set_active_adapters(("default",))
    nn.init.normal_(layer.lora_B["default"])  # B ≠ 0 so the branch shows
    return layer


def test_adapters_stay_fp32_on_a_bf16_base_and_output_keeps_the_base_dtype():
    layer = _bf16_layer_with_trained_adapter()
    assert layer.lora_A["default"].dtype == torch.float32
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    reference = layer.base_layer(x).float() + (x.float() @ A.T @ B.T) * layer.scale["default"]
    torch.testing.assert_close(out, reference.to(torch.bfloat16), rtol=1e-2, atol=1e-2)


def test_gpt2_conv1d_matches_peft(randomize, tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    cfg = LoraConfig(r=4, target_modules=["c_attn", "c_fc"])
    ours = apply_lora(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), cfg)
    randomize(ours)
    ours.eval()
    lora_core.save_adapter(ours, tmp_path / "adapter")
    assert lora_core.read_adapter_config(tmp_path / "adapter").fan_in_fan_out
    ids = torch.randint(0, 64, (2, 10))
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        merge_adapter(ours)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


def test_lora_branch_gradients_pass_gradcheck_in_float64():
    from lora_core.layers import _LoraDelta

    torch.manual_seed(0)
    out = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda o, x, A, B: _LoraDelta.apply(o.clone(), x, A, B, 0.7), (out, x, A, B))


def test_bf16_base_gradients_match_an_fp32_reference():
    layer = _bf16_layer_with_trained_adapter()
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()
    A = layer.lora_A["default"].detach().clone().requires_grad_()
    B = layer.lora_B["default"].detach().clone().requires_grad_()
    x_ref = x.detach().float().requires_grad_()
    reference = layer.base_layer(x.detach()).float() + (x_ref @ A.T @ B.T) * layer.scale["default"]
    reference.to(torch.bfloat16).float().square().sum().backward()
    torch.testing.assert_close(layer.lora_A["default"].grad, A.grad, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(layer.lora_B["default"].grad, B.grad, rtol=2e-2, atol=1e-2)


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(got.float() - expected) / torch.linalg.vector_norm(expected))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_backward_under_bf16_autocast_gives_fp32_gradients_close_to_the_fp32_ones(use_dora):
    """The GPU path: autocast in forward, backward outside it (autograd's way). Shown with CPU autocast."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 24))
    layer.add_adapter("default", LoraConfig(r=4, alpha=8, use_dora=use_dora))
    layer.set_active_adapters(("default",))
    nn.init.normal_(layer.lora_B["default"], std=0.1)
    x = torch.randn(3, 7, 32)

    def run(autocast: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = layer(x_in)
        out.float().square().sum().backward()
        return out, x_in.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad

    reference = run(autocast=False)
    got = run(autocast=True)
    assert got[0].dtype == torch.bfloat16  # the base output's dtype under autocast
    assert got[2].dtype == got[3].dtype == torch.float32  # the adapters train in fp32
    for name, g, r in zip(("output", "grad x", "grad A", "grad B"), got, reference, strict=True):
        assert _relative_error(g, r.detach()) < 2e-2, name  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding


def test_without_dropout_the_branch_saves_the_input_itself_not_a_copy():
    layer = LoraLinear(nn.Linear(32, 24))
    layer.add_adapter("default", LoraConfig(r=4, dropout=0.0))
    layer.set_active_adapters(("default",))
    layer.train()
    x = torch.randn(5, 32, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    inputs = [t for t in saved if t.shape == x.shape]
    assert inputs and all(t.data_ptr() == x.data_ptr() for t in inputs)  # base and branch share x
