"""Ray Train: data parallelism over CPU workers (gloo), restore after a worker dies, pause and resume."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file

from workers.ray_train import run_training_on_ray
from workers.reporting import FileReporter, read_events
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_splits

pytestmark = pytest.mark.slow

# Reporters defined here travel to the Ray workers by value: this test module is not importable there.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _CrashOnceReporter(FileReporter):
    """Kills its worker process the first time it is polled after step `crash_at` (a marker file says so)."""

    def __init__(self, events_path: Path, marker: Path, crash_at: int):
        super().__init__(events_path)
        self.marker, self.crash_at = marker, crash_at
        self._step = 0

    def metrics(self, step: int, values: dict[str, float]) -> None:
        super().metrics(step, values)
        self._step = step

    def control(self):
        if self._step == self.crash_at and not self.marker.exists():
            self.marker.write_text("crashed")
            os._exit(1)
        return None


def _spec(model_dir: Path, data_dir: Path, **hyper) -> TrainingSpec:
    train_file, val_file = write_synthetic_splits(data_dir, n_train=48, n_val=8, seed=0)
    return TrainingSpec(
        base_model=model_dir,
        training_file=train_file,
        validation_file=val_file,
        max_seq_len=64,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        hyperparameters={"n_epochs": 1, "learning_rate": 3e-3, **hyper},
        eval_every_steps=3,
        n_checkpoints=2,
        seed=5,
    )


def _losses(events: Path) -> dict[int, float]:
    return {e["step"]: e["values"]["train_loss"] for e in read_events(events, "metrics") if e["step"] > 0}


def _tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_two_cpu_workers_follow_the_same_loss_trajectory_as_one(ray_cluster, tiny_model_dir, tmp_path):
    runs = {}
    for workers, batch_size in ((1, 4), (2, 2)):  # the same global batch of 4 sequences per step
        events = tmp_path / f"events-{workers}.jsonl"
        result = run_training_on_ray(
            _spec(tiny_model_dir, tmp_path / "data", batch_size=batch_size, max_steps=6),
            output_dir=tmp_path / f"out-{workers}",
            reporter_factory=functools.partial(FileReporter, events),
            num_workers=workers,
            storage_path=tmp_path / "ray",
            name=f"equivalence-{workers}",
        )
        assert result.status == "succeeded" and result.step == 6
        assert result.hyperparameters["world_size"] == workers
        runs[workers] = (_losses(events), _tensors(result.adapter_dir), result)

    one, two = runs[1], runs[2]
    assert sorted(one[0]) == sorted(two[0]) == list(range(1, 7))
    for step in one[0]:
        assert two[0][step] == pytest.approx(one[0][step], rel=1e-4), step
    for key in one[1]:
        torch.testing.assert_close(two[1][key], one[1][key], rtol=1e-3, atol=1e-5)
    assert two[2].metrics["val_loss"] == pytest.approx(one[2].metrics["val_loss"], rel=1e-4)


def test_a_dead_worker_is_replaced_and_training_resumes_from_the_latest_checkpoint(
    ray_cluster, tiny_model_dir, tmp_path
):
    events = tmp_path / "events.jsonl"
    result = run_training_on_ray(
        _spec(tiny_model_dir, tmp_path / "data", batch_size=2, max_steps=8),  # checkpoints at steps 4 and 8
        output_dir=tmp_path / "out",
        reporter_factory=functools.partial(_CrashOnceReporter, events, tmp_path / "crashed", 6),
        num_workers=1,
        storage_path=tmp_path / "ray",
        name="crash",
        max_failures=1,
    )
    assert (tmp_path / "crashed").exists()
    assert result.status == "succeeded" and result.step == 8
    steps = [e["step"] for e in read_events(events, "metrics")]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # steps 5-6 ran twice: once before the crash
    restored = [e["message"] for e in read_events(events, "log") if "restoring from checkpoint" in e["message"]]
    assert restored == ["worker group restarted; restoring from checkpoint step-00000004"]
    first_pass, second_pass = {}, {}
    for e in read_events(events, "metrics")[1:]:  # step 0 is the evaluation before training
        (second_pass if e["step"] in first_pass else first_pass)[e["step"]] = e["values"]["train_loss"]
    assert second_pass[5] == first_pass[5] and second_pass[6] == first_pass[6]  # exact resume
    assert (result.adapter_dir / "adapter_config.json").is_file()


def test_pause_stops_every_rank_and_a_later_run_resumes_from_the_persisted_checkpoint(
    ray_cluster, tiny_model_dir, tmp_path
):
    events, control = tmp_path / "events.jsonl", tmp_path / "control"
    control.write_text("pause")
    # A checkpoint every step: the pause lands on a checkpoint step, where every rank must agree that
    # the checkpoint is already written (a rank that saves again would wait forever in Ray's report).
    spec = _spec(tiny_model_dir, tmp_path / "data", batch_size=2, max_steps=4).model_copy(update={"n_checkpoints": 4})
    paused = run_training_on_ray(
        spec,
        output_dir=tmp_path / "out",
        reporter_factory=functools.partial(FileReporter, events, control),
        num_workers=2,
        storage_path=tmp_path / "ray",
        name="pause",
    )
    assert paused.status == "paused" and paused.step == 1 and paused.adapter_dir is None
    assert paused.checkpoint == tmp_path / "ray" / "pause" / "step-00000001"

    control.unlink()
    done = run_training_on_ray(
        spec,
        output_dir=tmp_path / "out",
        reporter_factory=functools.partial(FileReporter, events, control),
        num_workers=2,
        storage_path=tmp_path / "ray",
        name="pause-resumed",
        resume_from=paused.checkpoint,
    )
    assert done.status == "succeeded" and done.step == 4
    assert [e["step"] for e in read_events(events, "metrics")] == [0, 1, 2, 3, 4]
