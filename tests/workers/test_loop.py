"""The training loop and its spec: auto hyperparameters, schedules, accumulation, control, learning, NF4."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from workers.loop import Runtime, _build_model, train
from workers.reporting import FileReporter, ListReporter, LoggingReporter, read_events
from workers.schedule import lr_factor
from workers.spec import AUTO_BASE_LEARNING_RATE, TrainingSpec, resolve_hyperparameters
from workers.synthetic import write_synthetic_dataset, write_synthetic_splits


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return {
        "training_file": write_synthetic_dataset(tmp_path / "train.jsonl", 64, seed=0),
        "validation_file": write_synthetic_dataset(tmp_path / "val.jsonl", 8, seed=1),
    }


def _spec(model_dir: Path, data: dict[str, Path], **overrides) -> TrainingSpec:
    hyper = {"n_epochs": 1, "batch_size": 4, "learning_rate": 2e-3, **overrides.pop("hyperparameters", {})}
    fields = {
        "base_model": model_dir,
        "max_seq_len": 64,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "n_checkpoints": 0,
        **data,
        **overrides,
    }
    return TrainingSpec(hyperparameters=hyper, **fields)


# ------------------------------------------------------------------------------------------- spec


def test_auto_epochs_follow_openais_rule(tiny_model_dir, data):
    spec = _spec(tiny_model_dir, data, hyperparameters={"n_epochs": "auto"})

    def epochs(n: int) -> int:
        return resolve_hyperparameters(spec, n_train_examples=n, n_train_tokens=n * 50).n_epochs

    assert epochs(5) == 20  # too few examples: aim for 100 example-visits
    assert epochs(2) == 25  # ...but never more than 25 epochs
    assert epochs(50) == 3
    assert epochs(20_000) == 1  # too many: at most 25 000 example-visits, at least 1 epoch


def test_auto_batch_size_and_learning_rate_scale_with_the_data(tiny_model_dir, data):
    spec = _spec(tiny_model_dir, data, hyperparameters={"batch_size": "auto", "learning_rate": "auto"})
    small = resolve_hyperparameters(spec, n_train_examples=100, n_train_tokens=100 * 40)
    large = resolve_hyperparameters(spec, n_train_examples=200_000, n_train_tokens=200_000 * 640)
    assert small.batch_size == 1 and large.batch_size == 16
    assert small.learning_rate == pytest.approx(AUTO_BASE_LEARNING_RATE * 0.5)
    assert large.learning_rate == pytest.approx(AUTO_BASE_LEARNING_RATE * 1.0)
    multiplied = {"learning_rate": None, "learning_rate_multiplier": 2.0, "batch_size": 16}
    scaled = _spec(tiny_model_dir, data, hyperparameters=multiplied)
    hp = resolve_hyperparameters(scaled, n_train_examples=1000, n_train_tokens=64_000)
    assert hp.learning_rate == pytest.approx(2 * AUTO_BASE_LEARNING_RATE)
    assert hp.total_steps == hp.n_epochs * hp.steps_per_epoch and hp.steps_per_epoch == math.ceil(1000 / 16)


def test_every_bad_field_is_named_in_one_error(tiny_model_dir, data):
    with pytest.raises(ValidationError) as err:
        TrainingSpec(
            base_model=tiny_model_dir,
            quantization="fp8",
            lora={"r": 0},
            hyperparameters={"n_epochs": 0, "batch_size": "big", "warmup_ratio": 1.5},
            **data,
        )
    text = str(err.value)
    for field in ("quantization", "lora.r", "hyperparameters.n_epochs", "hyperparameters.batch_size",
                  "hyperparameters.warmup_ratio"):
        assert field in text, field


def test_missing_files_and_conflicting_rates_are_refused_with_the_field(tiny_model_dir, tmp_path, data):
    with pytest.raises(ValidationError, match="training_file: .*does not exist"):
        TrainingSpec(base_model=tiny_model_dir, training_file=tmp_path / "nope.jsonl")
    with pytest.raises(ValidationError, match="either learning_rate or learning_rate_multiplier"):
        _spec(tiny_model_dir, data, hyperparameters={"learning_rate": 1e-4, "learning_rate_multiplier": 2.0})
    with pytest.raises(ValidationError, match="early_stopping_patience: needs a validation_file"):
        _spec(tiny_model_dir, {"training_file": data["training_file"]}, early_stopping_patience=2)


def test_schedules_warm_up_then_decay_to_zero():
    assert [lr_factor(s, warmup_steps=3, total_steps=10, kind="constant") for s in (0, 1, 2, 3, 9)] == [
        0.25, 0.5, 0.75, 1.0, 1.0
    ]
    assert lr_factor(3, warmup_steps=3, total_steps=10, kind="linear") == 1.0
    assert lr_factor(10, warmup_steps=3, total_steps=10, kind="linear") == 0.0
    assert lr_factor(10, warmup_steps=3, total_steps=10, kind="cosine") == pytest.approx(0.0)
    assert lr_factor(6, warmup_steps=0, total_steps=12, kind="cosine") == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- reporters


def test_logging_reporter_logs_and_file_reporter_is_steered_through_its_control_file(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="lorafleet.training"):
        LoggingReporter().metrics(3, {"train_loss": 1.25, "step": 3})
    assert "step 3 train_loss=1.25" in caplog.text

    control = tmp_path / "control"
    reporter = FileReporter(tmp_path / "events.jsonl", control)
    assert reporter.control() is None
    control.write_text("pause\n")
    assert reporter.control() == "pause"
    control.write_text("stop")
    with pytest.raises(ValueError, match="must hold 'cancel' or 'pause'"):
        reporter.control()
    reporter.checkpoint(2, tmp_path / "ckpt")
    reporter.log("hello", "warning")
    assert [e["type"] for e in read_events(tmp_path / "events.jsonl")] == ["checkpoint", "log"]


# ------------------------------------------------------------------------------------------- loop


def _tensors(result) -> dict[str, torch.Tensor]:
    return load_file(str(result.adapter_dir / "adapter_model.safetensors"))


def test_accumulating_two_small_batches_equals_one_large_batch(tiny_model_dir, data, tmp_path):
    """The loss is normalised by the step's loss tokens, not per micro-batch: padding and splits don't matter."""
    kwargs = {"packing": False, "seed": 1}
    big = train(_spec(tiny_model_dir, data, hyperparameters={"batch_size": 4, "max_steps": 3}, **kwargs),
                output_dir=tmp_path / "big", reporter=ListReporter())
    split = train(
        _spec(tiny_model_dir, data, hyperparameters={"batch_size": 2, "gradient_accumulation_steps": 2,
                                                     "max_steps": 3}, **kwargs),
        output_dir=tmp_path / "split", reporter=ListReporter())
    a, b = _tensors(big), _tensors(split)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert big.metrics["train_loss"] == pytest.approx(split.metrics["train_loss"], rel=1e-5)


def test_cancel_is_seen_at_the_next_step_and_publishes_nothing(tiny_model_dir, data, tmp_path):
    reporter = ListReporter(control_at={2: "cancel"})
    result = train(_spec(tiny_model_dir, data), output_dir=tmp_path / "out", reporter=reporter)
    assert result.status == "cancelled" and result.step == 2 and result.adapter_dir is None
    assert not (tmp_path / "out" / "adapter").exists()
    assert [s for s, _ in reporter.metric_rows] == [0, 1, 2]


def test_checkpoints_are_spread_over_the_run_and_reported(tiny_model_dir, data, tmp_path):
    reporter = ListReporter()
    spec = _spec(tiny_model_dir, data, n_checkpoints=3, hyperparameters={"max_steps": 9, "batch_size": 1})
    result = train(spec, output_dir=tmp_path / "out", reporter=reporter)
    assert [s for s, _ in reporter.checkpoints] == [3, 6]  # the 3rd falls on the last step: the adapter
    assert [p.name for p in result.checkpoints] == ["step-00000003", "step-00000006"]
    assert result.hyperparameters["total_steps"] == 9


def test_continuing_a_published_adapter_starts_where_it_ended(tiny_model_dir, data, tmp_path):
    first = train(_spec(tiny_model_dir, data, hyperparameters={"max_steps": 4}),
                  output_dir=tmp_path / "v1", reporter=ListReporter())
    reporter = ListReporter()
    train(_spec(tiny_model_dir, data, init_adapter=first.adapter_dir, hyperparameters={"max_steps": 1}),
          output_dir=tmp_path / "v2", reporter=reporter)
    start = dict(reporter.metric_rows[0][1])
    assert start["step"] == 0
    assert start["val_loss"] == pytest.approx(first.metrics["val_loss"], rel=1e-6)


def test_early_stopping_publishes_the_best_evaluation(tiny_model_dir, data, tmp_path):
    # A rate far too high, unclipped, makes validation loss rise soon; patience 2 stops two evaluations later.
    spec = _spec(tiny_model_dir, data, early_stopping_patience=2, eval_every_steps=1,
                 hyperparameters={"learning_rate": 0.5, "lr_scheduler": "constant", "batch_size": 2,
                                  "max_grad_norm": None})
    result = train(spec, output_dir=tmp_path / "out", reporter=ListReporter())
    assert result.stopped_early and result.status == "succeeded"
    assert result.step == result.best_step + 2 and result.step < result.total_steps
    best = min(result.history, key=lambda row: row["val_loss"])
    assert best["step"] == result.best_step


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_bf16_autocast_path_trains_several_steps_to_a_finite_loss(tiny_model_dir, data, tmp_path, quantization):
    """The CUDA precision path (bf16 base, bf16 autocast, fp32 adapters), run on the CPU."""
    spec = _spec(tiny_model_dir, data, quantization=quantization, bf16=True,
                 lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
                 hyperparameters={"max_steps": 4, "batch_size": 2})
    reporter = ListReporter()
    result = train(spec, output_dir=tmp_path / "out", reporter=reporter,
                   runtime=Runtime(device=torch.device("cpu"), bf16_on_cpu=True))
    assert result.status == "succeeded" and result.step == 4
    losses = [v for _, v in reporter.series("train_loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.metrics["val_loss"])
    tensors = _tensors(result)
    assert all(t.dtype == torch.float32 for t in tensors.values())  # adapters stay fp32
    assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B left zero: it trained


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_each_rank_builds_its_model_whole_on_its_own_device(tiny_model_dir, data, quantization):
    device = torch.device("cpu")  # a rank's torch device (ray.train.torch.get_device() under Ray)
    model = _build_model(_spec(tiny_model_dir, data, quantization=quantization), device, torch.float32)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and {t.device for t in tensors} == {device}


@pytest.mark.slow
def test_nf4_base_trains_a_few_steps(tiny_model_dir, data, tmp_path):
    spec = _spec(tiny_model_dir, data, quantization="nf4", hyperparameters={"max_steps": 3})
    result = train(spec, output_dir=tmp_path / "out", reporter=ListReporter())
    assert result.status == "succeeded" and result.step == 3
    assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    b = [t for k, t in _tensors(result).items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # B started at zero: the adapter did learn


@pytest.mark.slow
def test_tiny_model_learns_the_synthetic_task(tiny_model_dir, tmp_path):
    train_file, val_file = write_synthetic_splits(tmp_path, n_train=400, n_val=32, seed=0, task="reverse")
    spec = TrainingSpec(
        base_model=tiny_model_dir,
        training_file=train_file,
        validation_file=val_file,
        max_seq_len=128,
        lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        hyperparameters={"n_epochs": 10, "batch_size": 4, "learning_rate": 3e-3, "max_steps": 100},
        eval_every_steps=50,
        n_checkpoints=0,
    )
    result = train(spec, output_dir=tmp_path / "out", reporter=ListReporter())
    start, end = result.history[0], result.history[-1]
    assert start["step"] == 0 and end["step"] == 100
    # From a random base: ~ln(vocab) at the start; format and word distribution learnt by step 100.
    assert end["val_loss"] <= 0.75 * start["val_loss"]
    assert end["val_token_accuracy"] >= start["val_token_accuracy"] + 0.3


# ------------------------------------------------------------------------------------ host syncs


class _HostReads(TorchDispatchMode):
    """Counts the operations that make the host read a tensor's values (a device sync on a GPU):
    .item()/float()/int()/bool() (aten._local_scalar_dense), boolean-mask indexing and nonzero
    (aten.nonzero, whose output size is data-dependent), and .tolist() (patched in by the test)."""

    _READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
              "aten::equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self._READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _ReadsAtEachMetricsRow(ListReporter):
    """A ListReporter that notes how many host reads had happened when each metrics row arrived."""

    def __init__(self, reads: _HostReads):
        super().__init__()
        self.reads = reads
        self.reads_at: dict[int, int] = {}

    def metrics(self, step, values):
        self.reads_at[step] = self.reads.count
        super().metrics(step, values)


def test_steps_read_device_values_back_once_per_logging_interval(tiny_model_dir, data, tmp_path, monkeypatch):
    """No host read inside a step: loss, token counts and grad norm are read once per interval of 4 steps."""
    reads = _HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        reads.count += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    spec = _spec(tiny_model_dir, {"training_file": data["training_file"]}, packing=True,
                 hyperparameters={"batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 8})
    reporter = _ReadsAtEachMetricsRow(reads)
    with reads:
        result = train(spec, output_dir=tmp_path / "out", reporter=reporter, runtime=Runtime(log_every_steps=4))
    assert result.step == 8 and [s for s, _ in reporter.series("train_loss")] == list(range(1, 9))
    # Steps 1-4 arrive together, then 5-8: between them ran steps 5-8 (8 micro-batches) and one read.
    assert reporter.reads_at[1] == reporter.reads_at[4]
    assert reporter.reads_at[5] - reporter.reads_at[4] <= 1
    assert all(math.isfinite(row["train_loss"]) and row["grad_norm"] > 0 for _, row in reporter.metric_rows)
