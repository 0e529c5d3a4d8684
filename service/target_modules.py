"""Which LoRA target module names a base model offers, read from its config.json (no torch import).

The API process validates `lora.target_modules` before queueing, so a typo is a 400 listing the valid
names rather than a job that fails on a worker minutes later. Names are the leaf names of the
model's linear layers per architecture family (`model_type` in config.json), as PEFT matches them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from fleet.exceptions import InvalidRequest

__all__ = ["ALL_LINEAR", "linear_module_names", "check_target_modules"]

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"

_LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# model_type → linear layer names inside each decoder block (the LM head is never a LoRA target here).
_LINEAR_NAMES: dict[str, tuple[str, ...]] = {
    **{
        t: _LLAMA_STYLE
        for t in (
            "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
            "olmo", "olmo2", "cohere", "smollm3", "helium",
        )
    },
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    "bloom": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
}


def linear_module_names(model_path: str) -> tuple[str, ...] | None:
    """The target module names of the base model at `model_path`, or None when they cannot be known.

    None (validation deferred to the worker, which sees the real modules) when the path is not a local
    directory with a config.json (e.g. a hub id) or the architecture is not in the table.
    """
    config_path = Path(model_path) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    names = _LINEAR_NAMES.get(str(model_type))
    if names is None:
        logger.info("no target-module table for model_type %r (%s); the worker will check", model_type,
                    config_path)
    return names


def check_target_modules(requested: Sequence[str], valid: Sequence[str] | None, *, model: str) -> None:
    """Raise InvalidRequest(param="lora.target_modules") naming each unknown module and the valid ones."""
    if not requested:
        raise InvalidRequest(
            f"lora.target_modules is empty; name at least one module or use {ALL_LINEAR!r}.",
            param="lora.target_modules",
            code="invalid_target_modules",
        )
    if ALL_LINEAR in requested:
        if len(requested) > 1:
            raise InvalidRequest(
                f"{ALL_LINEAR!r} stands for every linear layer; pass it alone, not with other names.",
                param="lora.target_modules",
                code="invalid_target_modules",
            )
        return
    if valid is None:
        return
    unknown = [name for name in requested if name not in valid]
    if unknown:
        listed = ", ".join(repr(u) for u in unknown)
        raise InvalidRequest(
            f"Unknown target module{'s' if len(unknown) > 1 else ''} {listed} for base model {model!r}. "
            f"Valid names: {', '.join(valid)} (or {ALL_LINEAR!r}).",
            param="lora.target_modules",
            code="unknown_target_module",
        )
