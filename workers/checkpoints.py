"""Training checkpoints: adapter + optimizer + scheduler + RNG + data position, written atomically.

Layout of one checkpoint (a directory named `step-<8 digits>` under `<output_dir>/checkpoints/`):

    adapter/                 the adapter in PEFT layout (lora_core.save_adapter), loadable on its own
    training_state.pt        optimizer and LR-scheduler state dicts, early-stopping state
    rng-rank-NNNNN.pt        one per rank: that rank's RNG states (python, numpy, torch CPU, every
                             CUDA device), so every rank's dropout stream continues exactly
    trainer_state.json       step, epoch, data position, metrics history, hyperparameters used,
                             spec fingerprint, format version; written last, so its presence marks a
                             complete checkpoint

A checkpoint is built in a hidden temporary sibling directory and renamed into place, so a crash
leaves either the previous set of checkpoints or the new one, never a half-written directory.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "LoadedCheckpoint",
    "capture_rng_state",
    "checkpoint_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "restore_rng_state",
    "write_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 2  # 2: one RNG file per rank; 1: rank 0's RNG inside training_state.pt
_READABLE_VERSIONS = (1, 2)
_TRAINER_STATE = "trainer_state.json"
_TRAINING_STATE = "training_state.pt"
_ADAPTER = "adapter"
_PREFIX = "step-"
_RNG_PREFIX = "rng-rank-"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read back: where its adapter lies, its tensors' state and its JSON state."""

    path: Path
    adapter_dir: Path
    training_state: dict[str, Any]  # optimizer, scheduler, best, ...
    trainer_state: dict[str, Any]  # step, epoch, position, history, ...

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    def rng_state(self, rank: int, world_size: int) -> dict[str, Any]:
        """Rank `rank`'s RNG state, for `restore_rng_state`; the checkpoint must be from `world_size` ranks."""
        if self.trainer_state["format_version"] == 1:  # one state, rank 0's, for every rank
            return self.training_state["rng"]
        n_ranks = len(list(self.path.glob(_RNG_PREFIX + "*.pt")))
        if n_ranks != world_size:
            raise ValueError(
                f"{self.path} was written by {n_ranks} ranks and this run has {world_size}: resume with "
                f"{n_ranks} workers (the data plan and every rank's RNG stream depend on it)"
            )
        return torch.load(self.path / _rng_file(rank), map_location="cpu", weights_only=True)


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _rng_file(rank: int) -> str:
    return f"{_RNG_PREFIX}{rank:05d}.pt"


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the loop touches (dropout, shuffling), as plain lists/tensors for `weights_only` loads."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            logger.warning(
                "checkpoint holds RNG state for %d CUDA devices, this process sees %d; restoring what fits",
                len(state["cuda"]),
                torch.cuda.device_count(),
            )
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device=index)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def write_checkpoint(
    checkpoints_dir: Path,
    *,
    step: int,
    save_adapter_to: Any,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rng_states: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write checkpoint `step` atomically and return its directory.

    `save_adapter_to(path)` writes the adapter files into `path` (a lora_core.save_adapter call);
    `training_state` is torch-saved, `trainer_state` JSON-dumped (it must be JSON-able);
    `rng_states[r]` (capture_rng_state() of rank r) is torch-saved to rank r's own file.
    """
    checkpoints_dir = Path(checkpoints_dir)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / checkpoint_name(step)
    tmp = checkpoints_dir / f".tmp-{checkpoint_name(step)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_adapter_to(tmp / _ADAPTER)
        torch.save(training_state, tmp / _TRAINING_STATE)
        for rank, rng_state in enumerate(rng_states):
            torch.save(rng_state, tmp / _rng_file(rank))
        payload = {"format_version": CHECKPOINT_FORMAT_VERSION, "step": step, **trainer_state}
        (tmp / _TRAINER_STATE).write_text(json.dumps(payload, indent=1, sort_keys=True))
        _fsync_tree(tmp)
        if final.exists():
            # Same step written again (a run restored from an earlier checkpoint): replace it whole.
            stale = checkpoints_dir / f".stale-{final.name}-{uuid.uuid4().hex[:8]}"
            final.rename(stale)
            shutil.rmtree(stale)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _is_complete(path: Path) -> bool:
    return path.is_dir() and path.name.startswith(_PREFIX) and (path / _TRAINER_STATE).is_file()


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints under `checkpoints_dir`, oldest first (temporary directories skipped)."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    return sorted(p for p in checkpoints_dir.iterdir() if _is_complete(p))


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def prune_checkpoints(checkpoints_dir: Path, *, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and any leftover temporary dirs; return what went."""
    removed = []
    found = list_checkpoints(checkpoints_dir)
    for path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path)
        removed.append(path)
    for path in Path(checkpoints_dir).glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Read a checkpoint directory written by `write_checkpoint`; errors say what is missing."""
    path = Path(path)
    if not _is_complete(path) and not (path / _TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete training checkpoint (no {_TRAINER_STATE}); "
            f"pass a directory named {_PREFIX}NNNNNNNN from <output_dir>/checkpoints"
        )
    trainer_state = json.loads((path / _TRAINER_STATE).read_text())
    version = trainer_state.get("format_version")
    if version not in _READABLE_VERSIONS:
        raise ValueError(
            f"{path}: checkpoint format {version} is not supported (this version reads "
            f"{', '.join(map(str, _READABLE_VERSIONS))})"
        )
    training_state = torch.load(path / _TRAINING_STATE, map_location="cpu", weights_only=True)
    return LoadedCheckpoint(
        path=path,
        adapter_dir=path / _ADAPTER,
        training_state=training_state,
        trainer_state=trainer_state,
    )
