"""On one CUDA GPU: co-training on an NF4 base in bf16 trains every member as it trains alone.

On CPU, fp32 co-training is exact (tests/workers/test_cotrain_exactness.py). On a GPU the base is NF4, the step
runs under bf16 autocast, and the routed LoRA delta (lora_core.route_tokens) takes the bf16 path: this checks
that path on the device it is for. Skipped (and reported as skipped) where torch sees no CUDA device.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from workers.cotrain import GroupMember, train_group
from workers.loop import TrainingResult, train
from workers.reporting import ListReporter
from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

_STEPS = 12


def _specs(model_dir: Path, data_dir: Path) -> dict[str, TrainingSpec]:
    """Three jobs on one NF4 base that differ in rank, targets, dropout, data, seed and learning rate."""
    data_dir.mkdir(parents=True, exist_ok=True)

    def spec(name: str, task: str, seed: int, lora: dict, lr: float) -> TrainingSpec:
        data = write_synthetic_dataset(data_dir / f"{name}.jsonl", 96, seed=seed, task=task)
        return TrainingSpec(
            base_model=model_dir, training_file=data, max_seq_len=96, seed=seed, quantization="nf4", bf16=True,
            lora=lora, n_checkpoints=0,
            hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate": lr, "max_steps": _STEPS},
        )

    return {
        "a": spec("a", "reverse", 1, {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"}, 3e-3),
        "b": spec("b", "sort", 2, {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, 2e-3),
        "c": spec("c", "uppercase", 3, {"r": 32, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"}, 1e-3),
    }


def test_an_nf4_bf16_group_trains_each_member_as_it_trains_alone(tiny_model_dir: Path, tmp_path: Path):
    specs = _specs(tiny_model_dir, tmp_path / "data")
    alone = {}
    for name, spec in specs.items():
        reporter = ListReporter()
        result = train(spec, output_dir=tmp_path / "alone" / name, reporter=reporter)
        alone[name] = (result, [loss for _, loss in reporter.series("train_loss")])

    reporters = {name: ListReporter() for name in specs}
    outcomes = train_group([GroupMember(name, spec, tmp_path / "group" / name, reporters[name])
                            for name, spec in specs.items()])

    for name, outcome in outcomes.items():
        assert isinstance(outcome, TrainingResult), (name, outcome)
        assert outcome.status == "succeeded" and outcome.step == _STEPS, (name, outcome)
        losses = [loss for _, loss in reporters[name].series("train_loss")]
        alone_result, alone_losses = alone[name]
        assert len(losses) == _STEPS and all(math.isfinite(x) for x in losses), (name, losses)
        # The first step's loss is the same forward over the same tokens, in bf16 with larger matmuls.
        assert math.isclose(losses[0], alone_losses[0], rel_tol=2e-2), (name, losses[0], alone_losses[0])
        # Each member learns as it does alone: its loss falls, and ends near where its lone run ends.
        assert sum(losses[-3:]) < sum(losses[:3]), (name, losses)
        assert math.isclose(sum(losses[-3:]), sum(alone_losses[-3:]), rel_tol=0.1), (name, losses, alone_losses)
        assert (tmp_path / "group" / name / "adapter" / "adapter_model.safetensors").is_file()
        assert alone_result.status == "succeeded"
