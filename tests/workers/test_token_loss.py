"""The chunked token loss: equal to a float64 full-vocabulary reference, whatever the chunking or head."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_core import LoraConfig, apply_lora, trainable_parameters
from workers.token_loss import TokenLoss, default_rows_per_chunk


@pytest.fixture
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).requires_grad_(False)


def _rows(model: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    vocab, width = model.get_output_embeddings().weight.shape
    hidden = torch.randn(n, width, generator=generator)
    return hidden, torch.randint(0, vocab, (n,), generator=generator)


def _reference(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor):
    """Σ cross-entropy, correct count and ∂/∂hidden (and ∂/∂W) over the full logits, in float64."""
    h = hidden.double().requires_grad_()
    w = head.weight.detach().double().requires_grad_()
    logits = h @ w.T
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    return loss.item(), int((logits.argmax(-1) == targets).sum()), h.grad, w.grad


@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head"])
def test_chunked_loss_and_gradients_equal_the_full_vocabulary_reference(tiny_lm, trainable_head):
    head = tiny_lm.get_output_embeddings()
    head.weight.requires_grad_(trainable_head)
    hidden, targets = _rows(tiny_lm, 23)
    loss_module = TokenLoss(tiny_lm, rows_per_chunk=7)  # 3 full chunks and a partial one
    h = hidden.clone().requires_grad_()
    loss, correct = loss_module.head_loss(h, targets)
    (loss * 0.5).backward()
    ref_loss, ref_correct, ref_grad_h, ref_grad_w = _reference(head, hidden, targets)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref_loss, rel=1e-6)
    assert int(correct) == ref_correct
    torch.testing.assert_close(h.grad.double(), 0.5 * ref_grad_h, rtol=1e-5, atol=1e-7)
    if trainable_head:
        torch.testing.assert_close(head.weight.grad.double(), 0.5 * ref_grad_w, rtol=1e-5, atol=1e-7)


def test_evaluation_without_grad_gives_the_same_sums(tiny_lm):
    hidden, targets = _rows(tiny_lm, 19)
    with torch.no_grad():
        loss, correct = TokenLoss(tiny_lm, rows_per_chunk=4).head_loss(hidden, targets)
    ref_loss, ref_correct, _, _ = _reference(tiny_lm.get_output_embeddings(), hidden, targets)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6) and int(correct) == ref_correct


def test_a_micro_batch_without_loss_tokens_still_reaches_every_adapter(tiny_lm):
    apply_lora(tiny_lm, LoraConfig(r=2, target_modules=["q_proj"]))
    ids = torch.randint(3, 100, (1, 10))
    batch = {"input_ids": ids, "labels": torch.full_like(ids, -100)}  # a padding-only row (DDP: every rank steps)
    loss, correct = TokenLoss(tiny_lm)(batch)
    loss.backward()
    assert loss.item() == 0.0 and int(correct) == 0
    assert all(p.grad is not None for p in trainable_parameters(tiny_lm))


def test_chunking_does_not_change_a_training_step(tiny_lm):
    torch.manual_seed(0)  # the gaussian init of A and B: one fixed draw, not whatever the RNG holds
    apply_lora(tiny_lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init="gaussian"))
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    grads = []
    for rows in (5, 10_000):
        loss, _ = TokenLoss(tiny_lm, rows_per_chunk=rows)(batch)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in trainable_parameters(tiny_lm)]))
        tiny_lm.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # fp32 sums in another order


def test_a_chunk_holds_about_64_mib_of_fp32_logits():
    assert default_rows_per_chunk(128_256) == 130 and default_rows_per_chunk(32_000) == 524
    assert default_rows_per_chunk(10**9) == 1
