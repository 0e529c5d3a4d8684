"""Checkpoints: atomic layout, listing and pruning, RNG capture, and exact resume of a training run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from workers.checkpoints import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    write_checkpoint,
)
from workers.loop import train
from workers.reporting import ListReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset


def _write_dummy(ckpts: Path, step: int) -> Path:
    def save_adapter_to(d: Path) -> None:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"x")

    return write_checkpoint(
        ckpts,
        step=step,
        save_adapter_to=save_adapter_to,
        training_state={"rng": capture_rng_state(), "optimizer": {"state": {}}},
        trainer_state={"position": {"epoch": 0, "batch_index": step}},
    )


def test_checkpoints_are_listed_in_step_order_and_half_written_ones_are_ignored(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step in (20, 5, 10):
        _write_dummy(ckpts, step)
    (ckpts / ".tmp-step-00000030-abcd").mkdir()  # a crash mid-write leaves only a hidden temp dir
    (ckpts / "step-00000040").mkdir()  # no trainer_state.json: not complete
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-00000005", "step-00000010", "step-00000020"]
    assert latest_checkpoint(ckpts).name == "step-00000020"
    removed = prune_checkpoints(ckpts, keep=2)
    assert [p.name for p in removed] == ["step-00000005"]
    assert not (ckpts / ".tmp-step-00000030-abcd").exists()
    loaded = load_checkpoint(ckpts / "step-00000010")
    assert loaded.step == 10 and loaded.trainer_state["position"] == {"epoch": 0, "batch_index": 10}
    assert (loaded.adapter_dir / "adapter_model.safetensors").is_file()


def test_rewriting_a_step_replaces_the_checkpoint_whole(tmp_path):
    first = _write_dummy(tmp_path, 3)
    (first / "stray").write_text("from the first write")
    again = _write_dummy(tmp_path, 3)
    assert again == first and not (again / "stray").exists()


def test_loading_a_directory_that_is_not_a_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        load_checkpoint(tmp_path)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = _write_dummy(tmp_path, 1)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    restore_rng_state(load_checkpoint(path).training_state["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_each_rank_reads_back_its_own_rng_file_and_another_worker_count_is_refused(tmp_path):
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        states.append(capture_rng_state())
    path = write_checkpoint(tmp_path, step=1, save_adapter_to=lambda d: d.mkdir(), training_state={},
                            trainer_state={}, rng_states=states)
    loaded = load_checkpoint(path)
    for rank in (0, 1):
        assert torch.equal(loaded.rng_state(rank, world_size=2)["torch"], states[rank]["torch"])
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 3: resume with 2 workers"):
        loaded.rng_state(0, world_size=3)


def test_a_format_1_checkpoint_still_resumes_with_its_single_rng_state(tmp_path):
    path = _write_dummy(tmp_path, 1)  # format 1 kept rank 0's RNG in training_state.pt
    state_file = path / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace('"format_version": 2', '"format_version": 1'))
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.rng_state(1, world_size=2)["torch"], loaded.training_state["rng"]["torch"])


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def test_twenty_steps_straight_equal_ten_then_resume_then_ten_bit_for_bit(tiny_model_dir, tmp_path):
    spec = TrainingSpec(
        base_model=tiny_model_dir,
        training_file=write_synthetic_dataset(tmp_path / "train.jsonl", 120, seed=0),
        validation_file=write_synthetic_dataset(tmp_path / "val.jsonl", 8, seed=1),
        max_seq_len=96,
        lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        hyperparameters={
            "n_epochs": 2,  # the 20 steps cross an epoch boundary: 14 steps per epoch
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "learning_rate": 2e-3,
            "lr_scheduler": "cosine",
            "warmup_ratio": 0.1,
            "weight_decay": 0.01,
            "max_steps": 20,
        },
        eval_every_steps=7,
        n_checkpoints=0,
        seed=3,
    )
    straight = train(spec, output_dir=tmp_path / "straight", reporter=ListReporter())
    assert straight.status == "succeeded" and straight.step == 20

    first = train(spec, output_dir=tmp_path / "split", reporter=ListReporter(control_at={10: "pause"}))
    assert first.status == "paused" and first.step == 10 and first.adapter_dir is None
    assert first.checkpoint == tmp_path / "split" / "checkpoints" / "step-00000010"

    # A resumed process starts from unrelated RNG state and a freshly loaded model.
    random.seed(12345), np.random.seed(12345), torch.manual_seed(12345)
    resumed_reporter = ListReporter()
    second = train(spec, output_dir=tmp_path / "split", reporter=resumed_reporter, resume_from=first.checkpoint)
    assert second.status == "succeeded" and second.step == 20
    assert [s for s, _ in resumed_reporter.metric_rows] == list(range(11, 21))

    a, b = _adapter_tensors(straight.adapter_dir), _adapter_tensors(second.adapter_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert second.history == straight.history  # evaluations at 0, 7, 14, 20 carried through the checkpoint
