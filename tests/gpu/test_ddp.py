"""Two ranks on two CUDA GPUs through Ray Train (nccl): the run succeeds and follows the 1-GPU loss trajectory.

Skipped (and reported as skipped) where torch sees fewer than two CUDA devices.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch

from workers.ray_train import run_training_on_ray
from workers.reporting import FileReporter, read_events
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_splits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def test_two_gpu_ranks_train_like_one_gpu_with_the_same_global_batch(ray_cluster, tiny_model_dir: Path, tmp_path: Path):
    train_file, val_file = write_synthetic_splits(tmp_path / "data", n_train=64, n_val=8, seed=0)
    losses = {}
    for workers, batch_size in ((1, 4), (2, 2)):  # 4 sequences per optimizer step either way
        spec = TrainingSpec(
            base_model=tiny_model_dir,
            training_file=train_file,
            validation_file=val_file,
            max_seq_len=64,
            lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            hyperparameters={"n_epochs": 1, "batch_size": batch_size, "learning_rate": 3e-3, "max_steps": 6},
            n_checkpoints=0,
        )
        events = tmp_path / f"events-{workers}.jsonl"
        result = run_training_on_ray(
            spec,
            output_dir=tmp_path / f"out-{workers}",
            reporter_factory=functools.partial(FileReporter, events),
            num_workers=workers,
            use_gpu=True,
            storage_path=tmp_path / "ray",
            name=f"gpu-ddp-{workers}",
            max_failures=0,
        )
        assert result.status == "succeeded" and result.step == 6
        assert result.hyperparameters["world_size"] == workers
        assert (result.adapter_dir / "adapter_model.safetensors").is_file()
        losses[workers] = [e["values"]["train_loss"] for e in read_events(events, "metrics") if e["step"] > 0]

    assert len(losses[2]) == 6 and all(math.isfinite(x) for x in losses[2]), losses[2]
    # bf16 on both sides, different micro-batch shapes: equal to bf16 precision, not bit for bit.
    assert losses[2] == pytest.approx(losses[1], rel=2e-2), losses
