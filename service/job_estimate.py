"""The API's side of a job estimate: read what fleet.estimate needs (config.json, the training file's text,
the measured speed) and resolve "auto" as the engine will; nothing is created and no torch is loaded."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis

from fleet.catalog import Catalog
from fleet.estimate import (
    DatasetTokens,
    JobEstimate,
    RunShape,
    estimate_job,
    estimate_sweep,
    estimated_example_tokens,
)
from fleet.files import FileStore
from fleet.job_spec import JobSpec, LoraSpec
from fleet.memory_model import RESERVE_BYTES, BaseModelShape
from fleet.settings import Settings
from fleet.throughput import ThroughputStore, accelerator_kind
from workers.spec import TrainingHyperparameters, TrainingSpec, resolve_hyperparameters

__all__ = ["estimate_validated_job"]

logger = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def _base_shape(model_path: str) -> tuple[BaseModelShape | None, str]:
    """The base model's shape from its config.json (which does not change while the server runs), or
    None and the reason, worded for the figures that need it."""
    path = Path(model_path) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "unknown: the base model's config.json is not readable by the API (a hub id?)"
    try:
        return BaseModelShape.from_config_json(config if isinstance(config, dict) else {}), ""
    except ValueError as e:
        return None, f"unknown: {e} (the estimate reads Llama-style configs)"


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def _dataset_tokens(files: FileStore, tenant_id: str, file_id: str, max_seq_len: int) -> DatasetTokens:
    """Tokens of the (validated) training file, estimated from its text, each example cut at max_seq_len."""
    n_examples = n_tokens = n_truncated = 0
    for line in _lines(files.iter_content(tenant_id, file_id)):
        if not line.strip():
            continue
        n = estimated_example_tokens(json.loads(line))
        n_examples += 1
        n_tokens += min(n, max_seq_len)
        n_truncated += n > max_seq_len
    return DatasetTokens(n_examples=n_examples, n_tokens=n_tokens, n_truncated=n_truncated)


def estimate_validated_job(fields: dict[str, Any], *, tenant_id: str, files: FileStore, catalog: Catalog,
                           client: redis.Redis, settings: Settings, rank_sweep: list[int] | None = None) -> JobEstimate:
    """The estimate of a job request that passed create's checks (`fields`: create_job's arguments); of a
    rank sweep's (`rank_sweep`, checked): each child's, and the sweep's (fleet.estimate.estimate_sweep)."""
    spec: JobSpec = fields["spec"]
    base_name: str = fields["base_model"]
    base = catalog.get(base_name)
    shape, shape_unknown = _base_shape(base.path)
    # The engine's spec as the dispatcher builds it (workers.dispatcher.build_training_spec), for the
    # fields "auto" depends on; the paths exist only on a worker, so they are not validated here.
    engine = TrainingSpec.model_construct(
        hyperparameters=TrainingHyperparameters(**spec.hyperparameters.model_dump()))
    tokens = _dataset_tokens(files, tenant_id, fields["training_file"], engine.max_seq_len)
    workers = spec.resources.workers
    resolved = resolve_hyperparameters(
        engine, n_train_examples=max(1, tokens.n_examples), n_train_tokens=tokens.n_tokens, world_size=workers,
        base_hidden_size=shape.decoder.hidden_size if shape is not None else None)
    accelerator = accelerator_kind(settings)
    on_gpu = settings.use_gpu
    run = RunShape(
        n_epochs=resolved.n_epochs, micro_batch_sequences=resolved.batch_size,
        gradient_accumulation_steps=resolved.gradient_accumulation_steps, max_seq_len=engine.max_seq_len,
        workers=workers, gradient_checkpointing=engine.gradient_checkpointing,
        # Real GPUs train in bf16 autocast; a CPU cluster in fp32 with no CUDA context to reserve.
        activation_bytes=2 if on_gpu and engine.bf16 else 4, dense_bytes=2 if on_gpu and engine.bf16 else 4,
        reserve_bytes=RESERVE_BYTES if on_gpu else 0,
    )
    quantization = spec.quantization or base.quantization
    measured = ThroughputStore(client).get(accelerator, base_name)

    def at(lora: LoraSpec) -> JobEstimate:
        return estimate_job(model=fields["model"], base_model=base_name, lora=lora, quantization=quantization,
                            shape=shape, shape_unknown=shape_unknown, tokens=tokens, run=run, throughput=measured,
                            accelerator=accelerator)

    if rank_sweep is None:
        return at(spec.lora)
    return estimate_sweep({r: at(spec.lora.model_copy(update={"r": r})) for r in rank_sweep})

