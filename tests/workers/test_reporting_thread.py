"""ThreadedReporter: the loop's reports delivered in order by a background thread, errors never lost."""

from __future__ import annotations

import pytest

from workers.loop import Runtime, train
from workers.reporting import FileReporter, read_events
from workers.reporting_thread import ThreadedReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset


def test_events_arrive_in_order_and_control_is_polled_after_them(tmp_path):
    control = tmp_path / "control"
    threaded = ThreadedReporter(FileReporter(tmp_path / "events.jsonl", control))
    threaded.log("start")
    for step in range(1, 6):
        threaded.metrics(step, {"train_loss": 1.0 / step})
    threaded.flush(timeout_s=10)
    assert threaded.control() is None
    control.write_text("pause")
    threaded.checkpoint(5, tmp_path / "ckpt")  # the thread polls control once this is delivered
    threaded.flush(timeout_s=10)
    assert threaded.control() == "pause"
    threaded.close(timeout_s=10)
    events = read_events(tmp_path / "events.jsonl")
    assert [e["type"] for e in events] == ["log"] + ["metrics"] * 5 + ["checkpoint"]
    assert [e["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3, 4, 5]


class _BrokenReporter(FileReporter):
    def metrics(self, step, values):
        raise ConnectionError("redis went away")


def test_an_error_of_the_wrapped_reporter_is_raised_by_the_next_call(tmp_path):
    threaded = ThreadedReporter(_BrokenReporter(tmp_path / "events.jsonl"))
    threaded.metrics(1, {"train_loss": 1.0})
    with pytest.raises(RuntimeError, match="redis went away"):
        threaded.flush(timeout_s=10)
    with pytest.raises(RuntimeError, match="redis went away"):
        threaded.log("after the failure")
    with pytest.raises(RuntimeError, match="redis went away"):
        threaded.close(timeout_s=10)


def test_a_run_reporting_in_the_background_has_delivered_everything_when_it_returns(tiny_model_dir, tmp_path):
    spec = TrainingSpec(
        base_model=tiny_model_dir, training_file=write_synthetic_dataset(tmp_path / "t.jsonl", 32, seed=0),
        max_seq_len=64, n_checkpoints=2,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        hyperparameters={"n_epochs": 1, "batch_size": 2, "learning_rate": 2e-3, "max_steps": 6},
    )
    events_path = tmp_path / "events.jsonl"
    result = train(spec, output_dir=tmp_path / "out", reporter=FileReporter(events_path),
                   runtime=Runtime(report_in_background=True, log_every_steps=4))
    assert result.status == "succeeded"
    assert [e["step"] for e in read_events(events_path, "metrics")] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in read_events(events_path, "checkpoint")] == [3]
    assert read_events(events_path, "log")[-1]["message"] == "training succeeded at step 6/6"
