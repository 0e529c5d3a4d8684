"""Saving and loading adapters in PEFT's file layout, strictly.

A directory holds ``adapter_config.json`` (LoraConfig.to_peft_dict) and ``adapter_model.safetensors`` with
    base_model.model.<module path>.lora_A.weight        (r, in)
    base_model.model.<module path>.lora_B.weight        (out, r)
    base_model.model.<module path>.lora_magnitude_vector (out,)   DoRA only
(adapter name stripped, contiguous tensors), which PEFT, vLLM and LoRAX read. Loading is strict where
PEFT only warns: a key that matches no adapted module, an adapted module missing A or B, or a tensor of
the wrong shape is an AdapterFileError naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_core.compose import delete_adapter
from lora_core.config import ALL_LINEAR, LoraConfig
from lora_core.exceptions import AdapterFileError, AdapterNotFoundError, LoraConfigError, TargetModulesError
from lora_core.inject import active_adapters, adapter_configs, apply_lora, lora_layers

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")
_KINDS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude"}


def lora_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed as in the PEFT file (detached views; default: the single active adapter)."""
    name = _resolve_adapter(model, adapter_name)
    state: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        prefix = f"{KEY_PREFIX}{path}."
        state[prefix + "lora_A.weight"] = layer.lora_A[name].detach()
        state[prefix + "lora_B.weight"] = layer.lora_B[name].detach()
        if name in layer.lora_magnitude:
            state[prefix + "lora_magnitude_vector"] = layer.lora_magnitude[name].detach()
    return state


def set_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
    """Copy ``state`` (PEFT-keyed) into the adapter, strictly: every problem is listed in one AdapterFileError."""
    name = _resolve_adapter(model, adapter_name)
    layers = {path: layer for path, layer in lora_layers(model) if name in layer.lora_A}
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            problems.append(f"key {key!r} is not a LoRA tensor key "
                            "('base_model.model.<module>.lora_A.weight' / '.lora_B.weight' / '.lora_magnitude_vector')")
            continue
        path, kind = match["path"], _KINDS[match["kind"]]
        layer = layers.get(path)
        if layer is None:
            problems.append(f"key {key!r}: the model has no module {path!r} adapted by {name!r}")
            continue
        store = getattr(layer, kind)
        if name not in store:
            problems.append(f"key {key!r}: module {path!r} has no {kind} (DoRA magnitude in a non-DoRA adapter?)")
            continue
        expected = tuple(store[name].shape)
        if tuple(tensor.shape) != expected:
            problems.append(f"key {key!r}: shape {tuple(tensor.shape)} does not fit module {path!r}, "
                            f"which needs {expected}")
            continue
        if not tensor.is_floating_point():
            problems.append(f"key {key!r}: dtype {tensor.dtype} is not a floating-point type")
            continue
        if not torch.isfinite(tensor).all():
            problems.append(f"key {key!r}: holds NaN or infinite values")
            continue
        seen.add((path, kind))
    for path, layer in layers.items():
        for kind in ("lora_A", "lora_B", "lora_magnitude"):
            if name in getattr(layer, kind) and (path, kind) not in seen and not _reported(problems, path, kind):
                problems.append(f"module {path!r} is adapted but the file has no {kind} tensor for it")
    if problems:
        raise AdapterFileError(f"adapter tensors do not fit the model ({len(problems)} problems):\n  - "
                               + "\n  - ".join(problems))
    with torch.no_grad():
        for key, tensor in state.items():
            match = _KEY.match(key)
            param = getattr(layers[match["path"]], _KINDS[match["kind"]])[name]
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapter as a PEFT directory (adapter_config.json + adapter_model.safetensors); returns it.

    Files are written to temporary names and renamed, so a crash never leaves a half-written file.
    """
    name = _resolve_adapter(model, adapter_name)
    config = adapter_configs(model)[name]
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to("cpu").contiguous() for k, v in lora_state_dict(model, name).items()}
    wrapped = [p for p, layer in lora_layers(model) if name in layer.lora_A]
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in lora_layers(model) if name in layer.lora_A)
    # PEFT has no "all-linear minus the head" or exclusion on every version: name the wrapped modules.
    targets = wrapped if config.target_modules == ALL_LINEAR or config.exclude_modules else None
    if fan_in_fan_out != config.fan_in_fan_out:
        config = replace(config, fan_in_fan_out=fan_in_fan_out)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    peft_dict = config.to_peft_dict(base_model_name_or_path=base_model_name_or_path, target_modules=targets)
    _atomic_write(out_dir / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out_dir / CONFIG_FILE, lambda p: p.write_text(json.dumps(peft_dict, indent=2) + "\n"))
    logger.info("saved adapter %r (%d tensors) to %s", name, len(tensors), out_dir)
    return out_dir


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The LoraConfig in ``path``/adapter_config.json; AdapterFileError if it is missing or invalid."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFileError(f"{config_path} does not exist; an adapter directory needs {CONFIG_FILE} "
                               f"and {WEIGHTS_FILE}")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_path} must hold a JSON object, got {type(data).__name__}")
    try:
        return LoraConfig.from_peft_dict(data)
    except LoraConfigError as e:
        raise AdapterFileError(f"{config_path}: {e}") from e


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors in ``path``/adapter_model.safetensors; AdapterFileError if missing or corrupt."""
    weights_path = Path(path) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterFileError(f"{weights_path} does not exist (only safetensors adapters are read)")
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights_path} is not a readable safetensors file: {e}") from e


def load_adapter(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    trainable: bool = True,
) -> nn.Module:
    """Apply the adapter saved in ``path`` (ours or PEFT's) to ``base_model`` in place and activate it.

    Strict: any mismatch between file and model is an AdapterFileError naming the key, module or shape,
    and the model is left without the half-loaded adapter. ``trainable=False`` freezes the adapter too.
    """
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    try:
        apply_lora(base_model, config, adapter_name)
    except TargetModulesError as e:
        raise AdapterFileError(f"{Path(path) / CONFIG_FILE}: {e}") from e
    try:
        set_lora_state_dict(base_model, tensors, adapter_name)
    except AdapterFileError as e:
        delete_adapter(base_model, adapter_name)
        raise AdapterFileError(f"{Path(path) / WEIGHTS_FILE}: {e}") from e
    if not trainable:
        for _, layer in lora_layers(base_model):
            for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
                if adapter_name in store:
                    store[adapter_name].requires_grad_(False)
    logger.info("loaded adapter %r from %s", adapter_name, path)
    return base_model


def _resolve_adapter(model: nn.Module, adapter_name: str | None) -> str:
    configs = adapter_configs(model)
    if adapter_name is not None:
        if adapter_name not in configs:
            raise AdapterNotFoundError(f"no adapter named {adapter_name!r}; the model has {sorted(configs)}")
        return adapter_name
    active = active_adapters(model)
    if len(active) == 1:
        return active[0]
    if not configs:
        raise AdapterNotFoundError("the model has no LoRA adapter; call apply_lora() or load_adapter() first")
    raise AdapterNotFoundError(f"{len(active)} adapters are active ({list(active)}); name the one you mean "
                               "with adapter_name=")


def _reported(problems: list[str], path: str, kind: str) -> bool:
    return any(f"module {path!r}" in p and kind in p for p in problems)


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
