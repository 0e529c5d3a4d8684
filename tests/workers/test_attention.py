"""Variable-length attention over packed rows: exactly the attention of each example alone, with no T×T mask."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from workers.attention import use_varlen_attention, varlen_attention_forward
from workers.loop import Runtime, train
from workers.packing import make_batches
from workers.reporting import ListReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset
from workers.tokenization import tokenize_example

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _reference_attention(q, k, v, lengths, scale):
    """float64 softmax attention with the block-diagonal causal mask over flattened (N, H, D) tensors."""
    n, n_heads, _ = q.shape
    k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
    v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, v.double())


def test_varlen_attention_equals_block_diagonal_attention_with_gqa_and_its_gradient():
    torch.manual_seed(0)
    batch, width, heads, kv_heads, dim = 2, 12, 4, 2, 8
    lengths = [5, 4, 3, 7, 1, 4]  # row 0: 5 + 4 + padding 3; row 1: 7 + 1 + padding 4
    q = torch.randn(batch, heads, width, dim, requires_grad=True)
    k = torch.randn(batch, kv_heads, width, dim, requires_grad=True)
    v = torch.randn(batch, kv_heads, width, dim, requires_grad=True)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    module = nn.Module().train()

    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu,
                                      max_length_q=max(lengths))

    flat = [t.detach().transpose(1, 2).reshape(batch * width, t.shape[1], dim).requires_grad_() for t in (q, k, v)]
    expected = _reference_attention(*flat, lengths, dim**-0.5)
    assert out.shape == (batch, width, heads, dim)
    torch.testing.assert_close(out.reshape(batch * width, heads, dim).double(), expected, rtol=1e-5, atol=1e-6)
    grad_out = torch.randn_like(expected)
    (out.reshape(batch * width, heads, dim).double() * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    for ours, ref in zip((q, k, v), flat, strict=True):
        torch.testing.assert_close(ours.grad.transpose(1, 2).reshape(ref.shape).double(), ref.grad.double(),
                                   rtol=1e-5, atol=1e-6)


def test_varlen_attention_refuses_a_batch_without_segment_lengths():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="block_mask='varlen'"):
        varlen_attention_forward(nn.Module(), q, q, q, None)


@pytest.mark.parametrize("packing", [True, False])
def test_packed_varlen_logits_equal_each_example_alone(tiny_model_dir, packing):
    """The model's logits for every example of a packed (or padded) varlen batch equal its logits run alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    examples = []
    for _ in range(11):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
        record = {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text.upper()}]}
        examples.append(tokenize_example(record, tokenizer, max_seq_len=128, train_on_inputs=False))
    alone_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    use_varlen_attention(model)
    n_seen = 0
    with torch.no_grad():
        alone = {tuple(e.input_ids): alone_model(input_ids=torch.tensor([e.input_ids])).logits[0] for e in examples}
        for batch in make_batches(examples, block_len=128, batch_size=2, packing=packing, pad_id=0, seed=3,
                                  block_mask="varlen"):
            inputs = {k: v for k, v in batch.inputs.items() if k != "labels"}
            assert "attention_mask" not in inputs
            logits = model(**inputs, use_cache=False).logits
            flat = logits.flatten(0, 1)
            bounds = batch.inputs["cu_seq_lens_q"].tolist()
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                ids = tuple(batch.inputs["input_ids"].flatten()[start:end].tolist())
                if ids in alone:  # not a padding segment
                    torch.testing.assert_close(flat[start:end], alone[ids], rtol=1e-5, atol=1e-5)
                    n_seen += 1
    assert n_seen == len(examples)


@pytest.mark.parametrize("packing", [True, False])
def test_a_training_run_with_varlen_attention_equals_the_dense_mask_run(tiny_model_dir, tmp_path, packing):
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 32, seed=0)
    spec = TrainingSpec(
        base_model=tiny_model_dir, training_file=data, max_seq_len=64, packing=packing, n_checkpoints=0,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate": 2e-3, "max_steps": 3},
    )
    results = {}
    for attention in ("varlen", "dense_mask"):
        reporter = ListReporter()
        result = train(spec, output_dir=tmp_path / attention, reporter=reporter, runtime=Runtime(attention=attention))
        results[attention] = (reporter.series("train_loss"), result)
    (losses, varlen), (dense_losses, dense) = results["varlen"], results["dense_mask"]
    assert [s for s, _ in losses] == [1, 2, 3]
    assert [v for _, v in losses] == pytest.approx([v for _, v in dense_losses], rel=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(varlen.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(dense.adapter_dir / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)  # Adam steps of ~2e-3 from fp32 noise
