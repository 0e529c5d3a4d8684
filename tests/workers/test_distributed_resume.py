"""Two data-parallel ranks (torch.distributed, gloo, one process each) with dropout: own streams, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workers.spec import TrainingSpec
from workers.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2

# One rank: train() as rank `rank` of a gloo group. lora_core's seeded dropout is watched: the seed of
# the first mask drawn, then a fingerprint of each mask drawn in training mode.
_RANK = """
import hashlib, json, sys
from pathlib import Path
import torch, torch.distributed as dist
import lora_core.layers
from workers.loop import Runtime, train
from workers.reporting import ListReporter
from workers.spec import TrainingSpec

rank, init_file, spec_file, out_dir, resume_from, pause_at = sys.argv[1:7]
rank = int(rank)
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
seen = {"first_seed": None, "masks": []}
draw = lora_core.layers._dropout_mask

def watched(shape, p, seed, device):
    mask = draw(shape, p, seed, device)
    if seen["first_seed"] is None:
        seen["first_seed"] = seed
    seen["masks"].append(hashlib.sha1(mask.numpy().tobytes()).hexdigest()[:16])
    return mask

lora_core.layers._dropout_mask = watched
spec = TrainingSpec.model_validate_json(Path(spec_file).read_text())
reporter = ListReporter(control_at={int(pause_at): "pause"} if pause_at != "-" else {})
result = train(spec, output_dir=Path(out_dir), reporter=reporter,
               resume_from=Path(resume_from) if resume_from != "-" else None,
               runtime=Runtime(rank=rank, world_size=2, device=torch.device("cpu")))
dist.destroy_process_group()
Path(out_dir, f"rank-{rank}.json").write_text(json.dumps({
    "result": result.to_dict(), "losses": reporter.series("train_loss"),
    "first_seed": seen["first_seed"], "masks": seen["masks"], "rng_after": torch.rand(4).tolist(),
}))
"""


def _run_two_ranks(tmp_path: Path, spec: TrainingSpec, out: Path, *, resume_from=None, pause_at=None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    init_file = tmp_path / f"rendezvous-{uuid.uuid4().hex}"  # a FileStore is single-use
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [str(init_file), str(spec_file), str(out), str(resume_from or "-"), str(pause_at or "-")]
    procs = [
        subprocess.Popen([sys.executable, "-c", _RANK, str(rank), *args], env=env, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    for rank, proc in enumerate(procs):
        try:
            outputs.append(proc.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} did not finish training within 600 s") from None
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-3000:]}"
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _adapter(result: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result["adapter_dir"]) / "adapter_model.safetensors"))


def test_two_ranks_with_dropout_draw_their_own_masks_and_resume_bit_for_bit(tiny_model_dir, tmp_path):
    spec = TrainingSpec(
        base_model=tiny_model_dir,
        training_file=write_synthetic_dataset(tmp_path / "train.jsonl", 96, seed=0),
        validation_file=write_synthetic_dataset(tmp_path / "val.jsonl", 8, seed=1),
        max_seq_len=96,
        lora={"r": 4, "alpha": 8, "dropout": 0.2, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        hyperparameters={"n_epochs": 2, "batch_size": 2, "learning_rate": 2e-3, "lr_scheduler": "cosine",
                         "warmup_ratio": 0.1, "max_steps": 20},
        eval_every_steps=7,
        n_checkpoints=0,
        seed=3,
    )
    straight = _run_two_ranks(tmp_path, spec, tmp_path / "straight")
    first = _run_two_ranks(tmp_path, spec, tmp_path / "split", pause_at=10)
    assert [r["result"]["status"] for r in first] == ["paused", "paused"]
    checkpoint = tmp_path / "split" / "checkpoints" / "step-00000010"
    assert first[0]["result"]["checkpoint"] == str(checkpoint)
    assert sorted(p.name for p in checkpoint.glob("rng-rank-*.pt")) == ["rng-rank-00000.pt", "rng-rank-00001.pt"]
    second = _run_two_ranks(tmp_path, spec, tmp_path / "split", resume_from=checkpoint)

    # Each rank draws from its own stream: different seeds for the first mask.
    assert straight[0]["first_seed"] is not None and straight[0]["first_seed"] != straight[1]["first_seed"]
    assert straight[0]["masks"][0] != straight[1]["masks"][0]
    for rank in range(WORLD_SIZE):
        # The same masks in the same order: 20 steps straight = 10 steps, then resumed, then 10.
        assert straight[rank]["masks"] == first[rank]["masks"] + second[rank]["masks"], rank
        assert straight[rank]["rng_after"] == second[rank]["rng_after"], rank
    losses = [v for _, v in straight[0]["losses"]]
    assert [v for _, v in first[0]["losses"] + second[0]["losses"]] == losses and len(losses) == 20
    a, b = _adapter(straight[0]["result"]), _adapter(second[0]["result"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second[0]["result"]["history"] == straight[0]["result"]["history"]
