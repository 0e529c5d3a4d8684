"""Micro-batch sizing from the device's memory, and the loop's back-off when a micro-batch does not fit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from workers.loop import Runtime, train
from workers.memory_plan import DecoderShape, plan_micro_batch, query_size
from workers.reporting import ListReporter
from workers.spec import TrainingSpec, resolve_hyperparameters
from workers.synthetic import write_synthetic_dataset

GiB = 2**30
LLAMA_1B = DecoderShape(n_layers=16, hidden_size=2048, intermediate_size=8192, kv_size=8 * 64)  # Llama 3.2 1B


def _plan(device_gib: float, **kw):
    args = dict(device_bytes=int(device_gib * GiB), weights_bytes=int(2.5 * GiB), n_adapter_params=11_000_000,
                shape=LLAMA_1B)
    return plan_micro_batch(**{**args, **kw})


def test_the_plan_is_the_largest_token_count_whose_estimate_fits_the_device():
    plan = _plan(80)
    budget = 0.9 * 80 * GiB
    assert plan.fixed_bytes + plan.max_tokens * plan.bytes_per_token <= budget
    assert plan.fixed_bytes + (plan.max_tokens + 1) * plan.bytes_per_token > budget
    # The terms of the docstring's formula, spelled out for this shape in bf16 with checkpointing.
    layer = 2 * (6 * 2048 + 2 * 512 + 4 * 8192)
    assert plan.bytes_per_token == 2 * 2048 * 16 + layer + 8 * 2048
    assert plan.fixed_bytes == int(2.5 * GiB) + 16 * 11_000_000 + 3 * 64 * 2**20 + GiB
    assert plan.max_sequences(2048) == plan.max_tokens // 2048 >= 16  # a 1B model on 80 GB: a full auto batch


def test_less_memory_or_no_checkpointing_fits_fewer_tokens_and_never_fewer_than_one_sequence():
    big, small = _plan(80), _plan(16)
    assert 0 < small.max_tokens < big.max_tokens
    assert _plan(80, gradient_checkpointing=False).max_tokens < big.max_tokens
    assert _plan(80, activation_bytes=4).max_tokens < big.max_tokens
    hopeless = _plan(3)  # not even the weights and the reserve fit
    assert hopeless.max_tokens == 0 and hopeless.max_sequences(2048) == 1


def test_an_int8_base_counts_the_linear_inputs_bitsandbytes_keeps_through_checkpointing():
    """bitsandbytes' int8 matmul holds its input outside checkpointing: per layer and token, the input of
    q/k/v (H), of o (q_size), of gate/up (H) and of down (I), as fleet.memory_model's estimate counts."""
    dense, nf4, int8 = _plan(80), _plan(80, quantization="nf4"), _plan(80, quantization="int8", q_size=2048)
    assert nf4.bytes_per_token == dense.bytes_per_token
    assert int8.bytes_per_token == dense.bytes_per_token + 16 * 2 * (2048 + 2048 + 2048 + 8192)
    assert int8.fixed_bytes == dense.fixed_bytes and int8.max_tokens < dense.max_tokens
    wide_q = _plan(80, quantization="int8", q_size=4096)  # heads × head_dim wider than H: o's input is wider
    assert wide_q.bytes_per_token == int8.bytes_per_token + 16 * 2 * (4096 - 2048)
    # Without checkpointing those inputs are among each layer's saved activations already.
    assert (_plan(80, quantization="int8", gradient_checkpointing=False).bytes_per_token
            == _plan(80, gradient_checkpointing=False).bytes_per_token)


def test_an_auto_batch_that_does_not_fit_is_accumulated_keeping_the_step_and_learning_rate(tiny_model_dir, tmp_path):
    data = write_synthetic_dataset(tmp_path / "train.jsonl", 8, seed=0)
    spec = TrainingSpec(base_model=tiny_model_dir, training_file=data,
                        hyperparameters={"batch_size": "auto", "gradient_accumulation_steps": 2})
    sizes = dict(n_train_examples=100_000, n_train_tokens=100_000 * 1024)  # auto: 16 sequences per step
    free = resolve_hyperparameters(spec, **sizes)
    capped = resolve_hyperparameters(spec, **sizes, max_micro_batch_sequences=5)
    assert (free.batch_size, free.gradient_accumulation_steps) == (16, 2)
    assert (capped.batch_size, capped.gradient_accumulation_steps) == (4, 8)  # a power of two ≤ 5
    assert capped.global_batch_sequences == free.global_batch_sequences
    assert capped.learning_rate == free.learning_rate and capped.total_steps == free.total_steps
    explicit = spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(update={"batch_size": 16})})
    assert resolve_hyperparameters(explicit, **sizes, max_micro_batch_sequences=5).batch_size == 16  # the user's


def _spec(tiny_model_dir, tmp_path, batch_size: int, accumulation: int) -> TrainingSpec:
    return TrainingSpec(
        base_model=tiny_model_dir, training_file=write_synthetic_dataset(tmp_path / "train.jsonl", 48, seed=0),
        max_seq_len=64, n_checkpoints=0, seed=3,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        hyperparameters={"n_epochs": 1, "batch_size": batch_size, "gradient_accumulation_steps": accumulation,
                         "learning_rate": 2e-3, "max_steps": 4},
    )


def test_out_of_memory_halves_the_micro_batch_and_trains_as_if_it_had_started_small(tiny_model_dir, tmp_path):
    """A micro-batch over the token cap raises torch.OutOfMemoryError; the step is retried with half the rows."""
    backed_off, reporter = _spec(tiny_model_dir, tmp_path, 4, 1), ListReporter()
    result = train(backed_off, output_dir=tmp_path / "oom", reporter=reporter,
                   runtime=Runtime(max_micro_batch_tokens=2 * 64))
    small_reporter = ListReporter()
    small = train(_spec(tiny_model_dir, tmp_path, 2, 2), output_dir=tmp_path / "small", reporter=small_reporter)

    assert result.status == "succeeded" and result.step == small.step == 4
    assert (result.hyperparameters["batch_size"], result.hyperparameters["gradient_accumulation_steps"]) == (2, 2)
    warnings = [m for level, m in reporter.logs if level == "warning"]
    assert len(warnings) == 1 and "out of memory at step 1" in warnings[0] and "micro-batches of 2" in warnings[0]
    losses = [v for _, v in reporter.series("train_loss")]
    assert losses == pytest.approx([v for _, v in small_reporter.series("train_loss")], rel=1e-5)
    assert result.tokens_trained == small.tokens_trained
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (result, small))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_out_of_memory_with_one_sequence_per_micro_batch_says_what_to_change(tiny_model_dir, tmp_path):
    with pytest.raises(torch.OutOfMemoryError, match="lower max_seq_len"):
        train(_spec(tiny_model_dir, tmp_path, 2, 1), output_dir=tmp_path / "out", reporter=ListReporter(),
              runtime=Runtime(max_micro_batch_tokens=16))


def test_a_run_paused_after_backing_off_resumes_with_the_smaller_micro_batch(tiny_model_dir, tmp_path):
    spec, runtime = _spec(tiny_model_dir, tmp_path, 4, 1), Runtime(max_micro_batch_tokens=2 * 64)
    paused = train(spec, output_dir=tmp_path / "a", reporter=ListReporter(control_at={2: "pause"}), runtime=runtime)
    assert paused.status == "paused" and paused.step == 2
    # Resumed without the cap: the checkpoint's split (2 × 2), not the spec's (4 × 1), continues the run.
    resumed = train(spec, output_dir=tmp_path / "b", reporter=ListReporter(), resume_from=paused.checkpoint)
    straight = train(_spec(tiny_model_dir, tmp_path, 2, 2), output_dir=tmp_path / "c", reporter=ListReporter())
    assert resumed.hyperparameters["batch_size"] == 2 and resumed.step == 4
    a, b = (load_file(str(r.adapter_dir / "adapter_model.safetensors")) for r in (resumed, straight))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)


def test_the_shape_is_read_from_a_transformers_config():
    from transformers import GPT2Config, LlamaConfig

    llama = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8)
    assert DecoderShape.from_config(llama) == LLAMA_1B
    gpt2 = DecoderShape.from_config(GPT2Config(n_embd=768, n_layer=12, n_head=12))  # no intermediate_size
    assert gpt2 == DecoderShape(n_layers=12, hidden_size=768, intermediate_size=4 * 768, kv_size=768)
    assert query_size(llama) == 2048
    assert query_size(LlamaConfig(hidden_size=2048, num_attention_heads=16, head_dim=256)) == 4096
