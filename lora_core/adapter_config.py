"""What an adapter_config.json may contain, and which modules its target_modules cover: the one set of rules.

`LoraConfig.from_peft_dict` (loading an adapter to train or serve) and `fleet.peft_format` (checking an
adapter a tenant imports, in the API process) both apply `adapter_config_problems`, so an adapter the
import accepts is one lora_core loads, and the reverse. Pure Python, no torch: the API imports this
module alone (`lora_core/__init__.py` loads its torch parts lazily).

target_modules follows PEFT: a list of names, where a module matches when its dotted path equals a name
or ends with "." + name (so both leaf names like "q_proj" and full paths like
"model.layers.0.self_attn.q_proj", as `save_adapter` writes for "all-linear", work); or a string, a
regular expression that must match the whole path; or "all-linear".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ALL_LINEAR",
    "UNSUPPORTED_PEFT_FIELDS",
    "adapter_config_problems",
    "matching_target",
]

ALL_LINEAR = "all-linear"

# PEFT fields that change what an adapter computes and that we do not implement. A file that sets
# one of them to a non-default value is refused rather than loaded with different numerics.
UNSUPPORTED_PEFT_FIELDS: dict[str, tuple[Any, ...]] = {
    "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "lora_bias": (False, None),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}, []),
    "alora_invocation_tokens": (None, []),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def adapter_config_problems(data: Any) -> list[str]:
    """Every reason the adapter_config.json contents `data` are not an adapter lora_core can load."""
    if not isinstance(data, Mapping):
        return [f"adapter_config.json must hold a JSON object, got {type(data).__name__}"]
    problems: list[str] = []
    if data.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {data.get('peft_type')!r}; only 'LORA' adapters are supported")
    if data.get("bias", "none") != "none":
        problems.append(f"bias is {data.get('bias')!r}; only 'none' is supported")
    for name, defaults in UNSUPPORTED_PEFT_FIELDS.items():
        if name in data and data[name] not in defaults:
            problems.append(f"{name} is {data[name]!r}; this field is not supported (leave it unset)")
    for required in ("r", "lora_alpha", "target_modules"):
        if data.get(required) is None:
            problems.append(f"{required} is missing")
    r, alpha = data.get("r"), data.get("lora_alpha")
    if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
        problems.append(f"r must be a positive integer (the adapter rank), got {r!r}")
    if alpha is not None and (not _is_number(alpha) or not alpha > 0):
        problems.append(f"lora_alpha must be a positive number, got {alpha!r}")
    dropout = data.get("lora_dropout")
    if dropout is not None and (not _is_number(dropout) or not 0.0 <= dropout < 1.0):
        problems.append(f"lora_dropout must be in [0, 1), got {dropout!r}")
    problems += _target_problems(data.get("target_modules"))
    exclude = data.get("exclude_modules")
    if isinstance(exclude, str):
        problems.append("exclude_modules as a regular expression is not supported; give a list of names")
    elif exclude is not None and not (isinstance(exclude, list) and all(isinstance(e, str) and e for e in exclude)):
        problems.append(f"exclude_modules must be a list of module names, got {exclude!r}")
    base = data.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model_name_or_path must be a string, got {base!r}")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if data.get(flag) is not None and not isinstance(data[flag], bool):
            problems.append(f"{flag} must be true or false, got {data[flag]!r}")
    return problems


def _target_problems(targets: Any) -> list[str]:
    if targets is None:
        return []  # reported as missing
    if isinstance(targets, str):
        if not targets:
            return ["target_modules is empty; name the modules to adapt, e.g. ['q_proj', 'v_proj']"]
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as e:
                return [f"target_modules {targets!r} is not a valid regular expression: {e}"]
        return []
    if not isinstance(targets, list | tuple) or not targets:
        return [f"target_modules must be a non-empty list of module names, a regular expression or "
                f"{ALL_LINEAR!r}, got {targets!r}"]
    if not all(isinstance(t, str) and t for t in targets):
        return [f"target_modules must be non-empty strings, got {list(targets)!r}"]
    return []


def matching_target(path: str, targets: Sequence[str] | str) -> str | None:
    """The entry of `targets` that covers the module at dotted `path` (PEFT's rule), or None.

    "all-linear" cannot be decided from a path (it depends on the layer type): callers handle it.
    """
    if isinstance(targets, str):
        return targets if re.fullmatch(targets, path) else None
    for target in targets:
        if path == target or path.endswith("." + target):
            return target
    return None
