"""Co-training is exact: a job trained in a group of four gives the adapter and events it gives alone (fp32, CPU),
also when other members of its group are cancelled or preempted, or fail to start."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from workers.cotrain import GroupMember, train_group
from workers.loop import TrainingResult, train
from workers.reporting import ListReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset

_CO_TRAINED = "co-trained with"


def _specs(model_dir: Path, data_dir: Path) -> dict[str, TrainingSpec]:
    """Four jobs that differ in everything a job may choose: rank, targets, dropout, data, seed, lr, batch."""
    data_dir.mkdir(parents=True, exist_ok=True)

    def data(name: str, n: int, seed: int, task: str = "reverse") -> Path:
        return write_synthetic_dataset(data_dir / f"{name}.jsonl", n, seed=seed, task=task)

    def spec(**fields) -> TrainingSpec:
        return TrainingSpec(base_model=model_dir, **{"n_checkpoints": 0, **fields})

    return {
        "a": spec(training_file=data("a", 24, 0), max_seq_len=64, seed=1,
                  lora={"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
                  hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate": 2e-3, "max_steps": 5}),
        "b": spec(training_file=data("b", 24, 1, "sort"), max_seq_len=48, seed=2, packing=False,
                  lora={"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["k_proj", "o_proj", "down_proj"]},
                  hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "max_steps": 4,
                                   "lr_scheduler": "cosine"}),
        "c": spec(training_file=data("c", 24, 2, "uppercase"), validation_file=data("c-val", 6, 3, "uppercase"),
                  max_seq_len=64, seed=3, eval_every_steps=2, n_checkpoints=2,
                  lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                  hyperparameters={"n_epochs": 1, "batch_size": 1, "gradient_accumulation_steps": 2,
                                   "learning_rate": 3e-3, "max_steps": 6, "warmup_ratio": 0.2}),
        "d": spec(training_file=data("d", 32, 4, "first_last"), max_seq_len=96, seed=4,
                  lora={"r": 32, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                        "use_rslora": True},
                  hyperparameters={"n_epochs": 2, "batch_size": 3, "learning_rate": 5e-4, "max_steps": 7}),
    }


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def assert_same_adapter(got: Path, want: Path, atol: float = 1e-4) -> None:
    a, b = _tensors(got), _tensors(want)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"max abs difference {worst:.3g} > {atol}"
    # lora_B starts at zero: equal adapters that never left it would prove nothing (e.g. no loss tokens).
    assert any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k), f"the adapter in {want} never trained"
    config = "adapter_config.json"
    assert json.loads((got / config).read_text()) == json.loads((want / config).read_text())


def assert_same_events(got: ListReporter, want: ListReporter) -> None:
    """The same metrics rows (steps, keys, values close but the timing) and checkpoints; the same logs but one."""
    assert [(s, sorted(r)) for s, r in got.metric_rows] == [(s, sorted(r)) for s, r in want.metric_rows]
    for (step, row), (_, expected) in zip(got.metric_rows, want.metric_rows, strict=True):
        for key, value in row.items():
            if key != "tokens_per_s":
                assert math.isclose(value, expected[key], rel_tol=1e-4, abs_tol=1e-5), (step, key, value, expected[key])
    assert [s for s, _ in got.checkpoints] == [s for s, _ in want.checkpoints]
    assert [p.name for _, p in got.checkpoints] == [p.name for _, p in want.checkpoints]
    assert [m for m in got.logs if _CO_TRAINED not in m[1]] == want.logs
    assert sum(_CO_TRAINED in m for _, m in got.logs) == 1


def assert_same_result(got: TrainingResult, want: TrainingResult) -> None:
    assert (got.status, got.step, got.total_steps, got.tokens_trained) == (
        want.status, want.step, want.total_steps, want.tokens_trained)
    assert got.hyperparameters == want.hyperparameters
    assert [p.name for p in got.checkpoints] == [p.name for p in want.checkpoints]
    assert len(got.history) == len(want.history)
    for row, expected in zip(got.history, want.history, strict=True):
        assert row == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.fixture(scope="module")
def alone(tiny_model_dir, tmp_path_factory) -> tuple[dict[str, TrainingSpec], dict[str, tuple[TrainingResult, Any]]]:
    """Each of the four jobs trained alone, once for the module."""
    root = tmp_path_factory.mktemp("alone")
    specs = _specs(tiny_model_dir, root / "data")
    runs = {}
    for name, spec in specs.items():
        reporter = ListReporter()
        runs[name] = (train(spec, output_dir=root / name, reporter=reporter), reporter)
    return specs, runs


def test_a_job_trained_in_a_group_of_four_equals_it_trained_alone(alone, tmp_path):
    specs, runs = alone
    reporters = {name: ListReporter() for name in specs}
    members = [GroupMember(job_id=name, spec=spec, output_dir=tmp_path / name, reporter=reporters[name])
               for name, spec in specs.items()]
    outcomes = train_group(members)

    assert sorted(outcomes) == sorted(specs)
    for name, (want, want_events) in runs.items():
        got = outcomes[name]
        assert isinstance(got, TrainingResult), got
        assert got.status == "succeeded" and got.adapter_dir == tmp_path / name / "adapter"
        assert_same_adapter(got.adapter_dir, want.adapter_dir)
        assert_same_result(got, want)
        assert_same_events(reporters[name], want_events)
        saved = TrainingResult.from_dict(json.loads((tmp_path / name / "training_result.json").read_text()))
        assert saved.status == "succeeded" and saved.step == want.step
    # c's checkpoints (written in the group) hold the same adapter as alone
    for got, want in zip(outcomes["c"].checkpoints, runs["c"][0].checkpoints, strict=True):
        assert_same_adapter(got / "adapter", want / "adapter")


def test_a_group_of_one_is_train(alone, tmp_path):
    specs, runs = alone
    reporter = ListReporter()
    outcome = train_group([GroupMember("a", specs["a"], tmp_path / "a", reporter)])["a"]
    assert_same_adapter(outcome.adapter_dir, runs["a"][0].adapter_dir, atol=1e-6)
    assert_same_events(reporter, runs["a"][1])


def test_cancelled_and_paused_members_leave_while_the_others_finish_as_alone(alone, tmp_path):
    """c is cancelled at its step 2, d paused (preempted) at its step 3; a and b finish. Each member's
    on_member_done comes when it ends, while the others are still training."""
    specs, runs = alone
    reporters = {name: ListReporter() for name in specs}
    reporters["c"].control_at = {2: "cancel"}
    reporters["d"].control_at = {3: "pause"}
    final_rows = {name: len(events.metric_rows) for name, (_, events) in runs.items()}
    calls: list[tuple[str, Any, dict[str, int]]] = []

    def on_member_done(job_id: str, outcome: Any) -> None:
        calls.append((job_id, outcome, {name: len(r.metric_rows) for name, r in reporters.items()}))
        raise RuntimeError("a failing callback is logged; the group goes on")

    members = [GroupMember(job_id=name, spec=spec, output_dir=tmp_path / name, reporter=reporters[name])
               for name, spec in specs.items()]
    outcomes = train_group(members, on_member_done=on_member_done)

    # One micro-batch of every member per pass: d pauses after pass 3; c (steps of 2 micro-batches) is
    # cancelled after pass 4; b, done with its 4 steps, leaves before pass 5 runs; a ends after pass 5.
    assert [job_id for job_id, _, _ in calls] == ["d", "c", "b", "a"]
    for job_id, outcome, rows in calls[:-1]:
        assert outcome is outcomes[job_id]
        assert rows["a"] < final_rows["a"], (job_id, rows)  # a was still training when this one ended
    assert [rows["d"] for _, _, rows in calls] == [3, 3, 3, 3]  # d reports nothing after its pause (steps 1-3)
    assert (outcomes["c"].status, outcomes["c"].step, outcomes["c"].adapter_dir) == ("cancelled", 2, None)
    assert not (tmp_path / "c" / "adapter").exists()
    assert [s for s, _ in reporters["c"].metric_rows] == [0, 1, 2]
    paused = outcomes["d"]
    assert (paused.status, paused.step) == ("paused", 3)
    assert paused.checkpoint == tmp_path / "d" / "checkpoints" / "step-00000003"
    assert reporters["d"].checkpoints == [(3, paused.checkpoint)]
    for name in ("a", "b"):
        assert outcomes[name].status == "succeeded"
        assert_same_adapter(outcomes[name].adapter_dir, runs[name][0].adapter_dir)
        assert_same_events(reporters[name], runs[name][1])

    # The preempted job's checkpoint, resumed alone, ends where an uninterrupted run ends.
    resumed = train(specs["d"], output_dir=tmp_path / "d", reporter=ListReporter(), resume_from=paused.checkpoint)
    assert resumed.status == "succeeded" and resumed.step == runs["d"][0].step
    assert_same_adapter(resumed.adapter_dir, runs["d"][0].adapter_dir)


def test_a_member_whose_setup_fails_gets_its_error_and_the_others_train(alone, tmp_path):
    specs, runs = alone
    broken_file = tmp_path / "broken.jsonl"
    broken_file.write_text("this is not JSON\n")
    broken = specs["b"].model_copy(update={"training_file": broken_file})
    outcomes = train_group([
        GroupMember("broken", broken, tmp_path / "broken", ListReporter()),
        GroupMember("a", specs["a"], tmp_path / "a", ListReporter()),
    ])
    assert isinstance(outcomes["broken"], ValueError) and "broken.jsonl" in str(outcomes["broken"])
    assert_same_adapter(outcomes["a"].adapter_dir, runs["a"][0].adapter_dir)


def test_a_group_on_two_bases_is_refused_naming_both_jobs(alone, tmp_path):
    specs, _ = alone
    other_base = specs["b"].model_copy(update={"quantization": "nf4"})
    with pytest.raises(ValueError, match="quantization: job a has None, job b has nf4"):
        train_group([GroupMember("a", specs["a"], tmp_path / "a", None),
                     GroupMember("b", other_base, tmp_path / "b", None)])


def test_a_checkpoint_written_alone_resumes_in_a_group(alone, tmp_path):
    specs, runs = alone
    paused = train(specs["d"], output_dir=tmp_path / "d", reporter=ListReporter(control_at={3: "pause"}))
    assert paused.status == "paused"
    outcomes = train_group([
        GroupMember("a", specs["a"], tmp_path / "a", ListReporter()),
        GroupMember("d", specs["d"], tmp_path / "d", ListReporter(), resume_from=paused.checkpoint),
    ])
    assert outcomes["d"].step == runs["d"][0].step
    assert_same_adapter(outcomes["d"].adapter_dir, runs["d"][0].adapter_dir)
    assert_same_adapter(outcomes["a"].adapter_dir, runs["a"][0].adapter_dir)


class _BrokenReporter(ListReporter):
    """A reporter whose delivery fails at one step, as a lost connection to the service would."""

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if step == 2:
            raise ConnectionError("the events stream is gone")
        super().metrics(step, values)


def test_a_member_failing_mid_run_leaves_with_its_error_and_the_others_finish(alone, tmp_path):
    specs, runs = alone
    outcomes = train_group([
        GroupMember("a", specs["a"], tmp_path / "a", ListReporter()),
        GroupMember("b", specs["b"], tmp_path / "b", _BrokenReporter()),
    ])
    assert isinstance(outcomes["b"], ConnectionError)
    assert_same_adapter(outcomes["a"].adapter_dir, runs["a"][0].adapter_dir)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_the_gpu_precision_path_co_trains_to_finite_losses(alone, tmp_path, quantization):
    """bf16 base, bf16 autocast, fp32 adapters (CUDA's path, run on the CPU), dense or NF4, one with dropout."""
    from workers.loop import Runtime

    specs, _ = alone
    members = [
        GroupMember(name, specs[name].model_copy(update={"quantization": quantization, "bf16": True}),
                    tmp_path / name, ListReporter())
        for name in ("a", "b")
    ]
    outcomes = train_group(members, runtime=Runtime(device=torch.device("cpu"), bf16_on_cpu=True))
    for member in members:
        result = outcomes[member.job_id]
        assert isinstance(result, TrainingResult) and result.status == "succeeded", result
        losses = [v for _, v in member.reporter.series("train_loss")]
        assert len(losses) == result.step and all(math.isfinite(v) for v in losses)
        tensors = _tensors(result.adapter_dir)
        assert all(t.dtype == torch.float32 for t in tensors.values())  # adapters stay fp32
        assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # B left zero: it trained


def test_a_base_that_does_not_load_is_every_members_outcome(alone, tmp_path):
    specs, _ = alone
    empty_base = tmp_path / "no-model"
    empty_base.mkdir()
    members = [GroupMember(n, specs[n].model_copy(update={"base_model": empty_base}), tmp_path / n, None)
               for n in ("a", "b")]
    seen: list[str] = []
    outcomes = train_group(members, on_member_done=lambda job_id, outcome: seen.append(job_id))
    assert seen == ["a", "b"]
    assert all(isinstance(outcomes[n], Exception) for n in ("a", "b"))
