"""Structural checks of a PEFT LoRA adapter directory without torch: adapter_config.json + safetensors header.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the tensor data.
We read only the header, so a multi-GB adapter is checked in microseconds and nothing is unpickled.
What adapter_config.json may contain is decided by `lora_core.adapter_config` (pure Python, no torch),
the same rules lora_core applies when it loads the adapter to train on, so an import never accepts an
adapter that a job continuing it would refuse.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.bounded_json import loads_bounded
from fleet.exceptions import InvalidRequest
from lora_core.adapter_config import ALL_LINEAR, adapter_config_problems, matching_target

__all__ = [
    "PeftAdapterInfo",
    "read_safetensors_header",
    "validate_peft_adapter_dir",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class PeftAdapterInfo:
    """What an adapter directory declares, once it passed the checks."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str
    base_model_name_or_path: str | None
    use_dora: bool
    use_rslora: bool
    n_tensors: int
    lora_modules: list[str]  # module paths that carry a lora_A/lora_B pair
    config: dict[str, Any]


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The parsed header of a safetensors file (tensor entries plus optional "__metadata__").

    Raises InvalidRequest naming the file and what is malformed.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidRequest(f"{path.name} is not a safetensors file: shorter than 8 bytes.", param="adapter")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER_BYTES or 8 + n > size:
            raise InvalidRequest(
                f"{path.name} is not a valid safetensors file: header length {n} does not fit the {size}-byte file.",
                param="adapter",
            )
        raw = f.read(n)
    try:
        header = loads_bounded(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, JsonTooDeep, a number too long to convert
        raise InvalidRequest(f"{path.name}: safetensors header is not valid JSON ({e}).", param="adapter") from e
    if not isinstance(header, dict):
        raise InvalidRequest(f"{path.name}: safetensors header must be a JSON object.", param="adapter")
    data_bytes = size - 8 - n
    problems = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problems += _tensor_entry_problems(name, entry, data_bytes)
    if problems:
        raise InvalidRequest(f"{path.name} is malformed: " + "; ".join(problems[:20]), param="adapter")
    return header


def _tensor_entry_problems(name: str, entry: Any, data_bytes: int) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{name}: entry is not an object"]
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        return [f"{name}: unknown dtype {dtype!r}"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return [f"{name}: shape {shape!r} is not a list of non-negative integers"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_bytes
    ):
        return [f"{name}: data_offsets {offsets!r} fall outside the {data_bytes} data bytes"]
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != expected:
        return [f"{name}: {offsets[1] - offsets[0]} bytes stored but shape {shape} of {dtype} needs {expected}"]
    return []


def _model_path(tensor_module: str) -> str:
    """The module's path in the base model: tensor keys carry PEFT's "base_model.model." in front."""
    return tensor_module.removeprefix("base_model.model.")


def validate_peft_adapter_dir(path: Path) -> PeftAdapterInfo:
    """Check that `path` holds a loadable PEFT LoRA adapter; collect every problem, raise once.

    Checks: adapter_config.json fields (`lora_core.adapter_config`); the safetensors header; every
    lora_A has its lora_B with shapes A (r×in) and B (out×r) agreeing with the config's r and each
    other; every adapted module is covered by target_modules (PEFT's matching rule).
    """
    path = Path(path)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise InvalidRequest(
            f"Adapter directory lacks {', '.join(missing)}; a PEFT adapter needs {CONFIG_FILE} and "
            f"{WEIGHTS_FILE} (.bin pickles are not accepted).",
            param="adapter",
        )
    try:
        config = loads_bounded(config_path.read_bytes())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, JsonTooDeep, a number too long to convert
        raise InvalidRequest(f"{CONFIG_FILE} is not valid JSON: {e}.", param="adapter") from e
    problems = adapter_config_problems(config)
    if problems:
        raise InvalidRequest(f"{CONFIG_FILE} is invalid: " + "; ".join(problems), param="adapter")
    header = read_safetensors_header(weights_path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}

    pairs: dict[str, dict[str, list[int]]] = {}
    for name, entry in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module = name.split(marker)[0]
                pairs.setdefault(module, {})[part] = entry["shape"]
    if not pairs:
        problems.append(f"{WEIGHTS_FILE} holds no lora_A/lora_B tensors")
    for module, shapes in sorted(pairs.items()):
        a, b = shapes.get("lora_A"), shapes.get("lora_B")
        if a is None or b is None:
            problems.append(f"{module}: has {'lora_A' if a else 'lora_B'} but not {'lora_B' if a else 'lora_A'}")
            continue
        if len(a) != 2 or len(b) != 2:
            continue  # conv / embedding variants: shapes differ by layer type; the pair itself is present
        if a[0] != config["r"] or b[1] != config["r"]:
            problems.append(f"{module}: lora_A {a} and lora_B {b} do not have rank r={config['r']} (A: r×in, B: out×r)")
    targets = config["target_modules"]
    uncovered = [] if targets == ALL_LINEAR else [
        m for m in sorted(pairs) if matching_target(_model_path(m), targets) is None
    ]
    if uncovered:
        listed = ", ".join(uncovered[:5]) + (f" (and {len(uncovered) - 5} more)" if len(uncovered) > 5 else "")
        problems.append(f"adapted modules not covered by target_modules: {listed}")
    if problems:
        raise InvalidRequest("Adapter is inconsistent: " + "; ".join(problems[:20]), param="adapter")
    return PeftAdapterInfo(
        r=config["r"],
        lora_alpha=float(config["lora_alpha"]),
        target_modules=targets,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        use_dora=bool(config.get("use_dora", False)),
        use_rslora=bool(config.get("use_rslora", False)),
        n_tensors=len(tensors),
        lora_modules=sorted(pairs),
        config=config,
    )
