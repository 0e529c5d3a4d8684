"""QLoRA on a real bitsandbytes NF4 base (CPU): training under gradient checkpointing, merge refusal, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lora_core
from lora_core import (
    LoraConfig,
    QuantizedMergeError,
    apply_lora,
    load_base_model,
    merge_adapter,
    prepare_for_training,
    trainable_parameters,
)

STEPS = 30


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_nf4_gradient_checkpointing_trains_every_adapter_and_leaves_the_base_bit_identical(
    use_reentrant, tiny_model_dir, batch
):
    model = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype=torch.float32)
    assert lora_core.is_quantized(model)
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    prepare_for_training(model, gradient_checkpointing=True, use_reentrant=use_reentrant)
    # the embedding output requires grad, or reentrant checkpointing would skip the blocks' adapters
    assert model.get_input_embeddings()(batch["input_ids"]).requires_grad
    layers = dict(lora_core.lora_layers(model))
    assert len(layers) == 4 * 7 and all(layer.quantization == "nf4" for layer in layers.values())
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    quant_before = {n: layer.base_layer.weight.quant_state.absmax.clone() for n, layer in layers.items()}

    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
    labels = batch["input_ids"]
    losses = []
    for step in range(STEPS):
        if step == STEPS // 2:  # an evaluation pass mid-training must not change how the base trains
            model.eval()
            with torch.no_grad():
                model(**batch)
            model.train()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    assert losses[-1] < losses[0] - 0.5, losses
    untrained = [n for n, layer in layers.items() if torch.count_nonzero(layer.lora_B["default"]) == 0]
    assert not untrained, f"lora_B never trained in {untrained}"
    for name, param in model.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), f"base weight {name} changed"
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight.quant_state.absmax, quant_before[name])


def test_merging_into_nf4_is_refused_and_export_makes_a_dense_merged_model(tiny_model_dir, batch, randomize,
                                                                           tmp_path):
    model = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize(model)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with pytest.raises(QuantizedMergeError, match="export_merged_model"):
        merge_adapter(model)
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)

    with torch.no_grad():
        expected = model(**batch).logits
    lora_core.export_merged_model(model, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, expected, rtol=0, atol=1e-4)


def test_int8_base_with_dora_trains(tiny_model_dir, batch):
    model = load_base_model(tiny_model_dir, quantization="int8", compute_dtype=torch.float32)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=True))
    prepare_for_training(model, gradient_checkpointing=False)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = [layer.lora_magnitude["default"].grad for _, layer in lora_core.lora_layers(model)]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


def test_nf4_adapter_outputs_keep_a_bf16_compute_dtype(tiny_model_dir, batch):
    model = load_base_model(tiny_model_dir, quantization="nf4", compute_dtype=torch.bfloat16)
    apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_A["default"].dtype == torch.float32
    hidden = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    assert layer(hidden).dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_unknown_quantization_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="quantization must be"):
        load_base_model(tiny_model_dir, quantization="nf3")


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_nf4_logits_match_peft_on_the_same_quantized_base(use_dora, tiny_model_dir, batch, randomize):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict

    peft_model = get_peft_model(
        load_base_model(tiny_model_dir, quantization="nf4", compute_dtype=torch.float32),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=use_dora, task_type="CAUSAL_LM"),
    )
    randomize(peft_model)
    ours = apply_lora(load_base_model(tiny_model_dir, quantization="nf4", compute_dtype=torch.float32),
                      LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=use_dora))
    lora_core.set_lora_state_dict(ours, get_peft_model_state_dict(peft_model))
    with torch.no_grad():
        expected = peft_model(**batch).logits
        torch.testing.assert_close(ours(**batch).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("quantization", [None, "nf4", "int8"])
def test_the_base_is_placed_whole_on_one_device_never_spread_by_auto(quantization):
    """A DDP rank's model must sit on its own GPU: "auto" spread it over every GPU Ray shows the worker."""
    from lora_core.quant import _from_pretrained_kwargs

    rank_1 = _from_pretrained_kwargs(quantization, torch.bfloat16, device="cuda:1", device_map=None)
    assert rank_1["device_map"] == {"": torch.device("cuda", 1)}
    default = _from_pretrained_kwargs(quantization, torch.bfloat16, device=None, device_map=None)
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert default["device_map"] == {"": expected}
    with pytest.raises(ValueError, match="either device .* or device_map"):
        _from_pretrained_kwargs(quantization, torch.bfloat16, device="cpu", device_map="auto")
