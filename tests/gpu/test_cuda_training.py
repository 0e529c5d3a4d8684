"""On one CUDA GPU: an NF4 base trains with a finite, falling loss; a bf16-autocast step matches an fp32 step.

Skipped (and reported as skipped) where torch sees no CUDA device.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from workers.loop import train
from workers.reporting import ListReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_splits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]


def test_nf4_base_trains_on_cuda_with_a_finite_falling_loss(tiny_model_dir: Path, tmp_path: Path):
    train_file, val_file = write_synthetic_splits(tmp_path, n_train=200, n_val=16, seed=0, task="reverse")
    spec = TrainingSpec(
        base_model=tiny_model_dir,
        training_file=train_file,
        validation_file=val_file,
        max_seq_len=128,
        quantization="nf4",
        bf16=True,
        lora={"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        hyperparameters={"n_epochs": 3, "batch_size": 4, "learning_rate": 3e-3, "max_steps": 30},
        eval_every_steps=30,
        n_checkpoints=0,
    )
    reporter = ListReporter()
    result = train(spec, output_dir=tmp_path / "out", reporter=reporter)

    assert result.status == "succeeded" and result.step == 30
    losses = [loss for _, loss in reporter.series("train_loss")]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses), losses
    start, end = result.history[0], result.history[-1]
    assert start["step"] == 0 and end["step"] == 30
    assert end["val_loss"] < 0.9 * start["val_loss"], (start, end)  # from ~ln(vocab): word frequencies learnt
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def _adapter_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor], autocast: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch, labels=batch["input_ids"], use_cache=False).loss
    loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_bf16_autocast_step_gives_the_fp32_adapter_gradients_within_bf16_precision(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    from lora_core import LoraConfig, apply_lora, trainable_parameters

    torch.manual_seed(0)
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).cuda()
    apply_lora(fp32, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for param in trainable_parameters(fp32):  # B = 0 at init would give A no gradient to compare
            param.normal_(0.0, 0.05)
    # The loop's bf16 path: the base in bf16, the adapters in fp32, the step under bf16 autocast.
    bf16 = copy.deepcopy(fp32)
    adapters = {id(p) for p in trainable_parameters(bf16)}
    for param in bf16.parameters():
        if id(param) not in adapters:
            param.data = param.data.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 500, (4, 96), generator=generator).cuda()
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    reference = _adapter_grads(fp32, batch, autocast=False)
    mixed = _adapter_grads(bf16, batch, autocast=True)

    assert reference.keys() == mixed.keys() and reference
    for name, want in reference.items():
        got = mixed[name]
        assert got.dtype == want.dtype and torch.isfinite(got).all(), name
        relative = float((got - want).norm() / want.norm())
        assert relative < 0.05, f"{name}: bf16 gradient differs from fp32 by {relative:.3f} (relative L2)"
