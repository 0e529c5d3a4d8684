"""LoraConfig: the hyper-parameters of one LoRA adapter, validated once, and its PEFT JSON form.

An adapter adds ΔW = s·B·A to a frozen weight W0 (A: r×in, B: out×r), with s = α/r, or α/√r with
rsLoRA (Kalajdzievski 2023). ``to_peft_dict`` / ``from_peft_dict`` read and write the fields of PEFT's
``adapter_config.json`` so that PEFT, vLLM and LoRAX load what we save and we load what they save.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_core.adapter_config import ALL_LINEAR, adapter_config_problems
from lora_core.exceptions import LoraConfigError

__all__ = ["ALL_LINEAR", "INIT_METHODS", "LoraConfig"]

INIT_METHODS = ("kaiming", "gaussian")


@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of one adapter. Frozen; invalid values raise LoraConfigError listing all problems.

    target_modules: a list of names (a module matches when its dotted path equals a name or ends with
    ``"." + name``), a string (a regular expression that must match the full dotted path), or
    ``"all-linear"`` (every linear layer except the output head).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    use_rslora: bool = False
    use_dora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    fan_in_fan_out: bool = False
    exclude_modules: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and stored as tuples so the config stays hashable.
        if isinstance(self.target_modules, Sequence) and not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.exclude_modules, Sequence) and not isinstance(self.exclude_modules, str):
            object.__setattr__(self, "exclude_modules", tuple(self.exclude_modules))
        problems = _validate(self)
        if problems:
            raise LoraConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))

    @property
    def scale(self) -> float:
        """s in ΔW = s·B·A: α/r, or α/√r with rsLoRA."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft_dict(
        self,
        *,
        base_model_name_or_path: str | None = None,
        target_modules: Sequence[str] | str | None = None,
    ) -> dict[str, Any]:
        """The adapter_config.json fields PEFT, vLLM and LoRAX read; nothing vLLM refuses.

        ``target_modules`` overrides the stored targets (save_adapter passes the wrapped module paths
        when the config says "all-linear", as PEFT does).
        """
        targets = self.target_modules if target_modules is None else target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "bias": "none",
            "fan_in_fan_out": self.fan_in_fan_out,
            "use_rslora": self.use_rslora,
            "use_dora": self.use_dora,
            "init_lora_weights": True if self.init == "kaiming" else "gaussian",
            "inference_mode": True,
        }

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build a config from adapter_config.json contents; every unsupported field is reported at once."""
        problems = adapter_config_problems(data)  # the rules fleet applies on import too
        init = data.get("init_lora_weights", True)
        init_name = {True: "kaiming", "gaussian": "gaussian"}.get(init) if isinstance(init, (bool, str)) else None
        if init_name is None:
            # The init only matters for a fresh adapter; a saved one carries its trained weights.
            init_name = "kaiming"
        if problems:
            raise LoraConfigError("unsupported adapter_config.json:\n  - " + "\n  - ".join(problems))
        return cls(
            r=data["r"],
            alpha=data["lora_alpha"],
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            target_modules=data["target_modules"],
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            init=init_name,  # type: ignore[arg-type]
            fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
            exclude_modules=tuple(data.get("exclude_modules") or ()),
        )


def _validate(cfg: LoraConfig) -> list[str]:
    """Every problem with cfg, as messages naming the field and what to do."""
    problems: list[str] = []
    if isinstance(cfg.r, bool) or not isinstance(cfg.r, int) or cfg.r <= 0:
        problems.append(f"r must be a positive integer (the adapter rank), got {cfg.r!r}")
    if isinstance(cfg.alpha, bool) or not isinstance(cfg.alpha, (int, float)) or not math.isfinite(cfg.alpha):
        problems.append(f"alpha must be a finite number, got {cfg.alpha!r}")
    elif cfg.alpha <= 0:
        problems.append(f"alpha must be > 0 (the scale is alpha/r), got {cfg.alpha!r}")
    if isinstance(cfg.dropout, bool) or not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {cfg.dropout!r}")
    targets = cfg.target_modules
    if isinstance(targets, str):
        if not targets:
            problems.append("target_modules is empty; name the modules to adapt, e.g. ['q_proj', 'v_proj']")
        elif targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as e:
                problems.append(f"target_modules {targets!r} is not a valid regular expression: {e}")
    elif not targets:
        problems.append("target_modules is empty; name the modules to adapt, e.g. ['q_proj', 'v_proj']")
    elif not all(isinstance(t, str) and t for t in targets):
        problems.append(f"target_modules must be non-empty strings, got {list(targets)!r}")
    if cfg.init not in INIT_METHODS:
        problems.append(f"init must be one of {INIT_METHODS}, got {cfg.init!r}")
    if isinstance(cfg.exclude_modules, str):
        problems.append(f"exclude_modules must be a list of module names, got the string {cfg.exclude_modules!r}")
    elif not all(isinstance(t, str) and t for t in cfg.exclude_modules):
        problems.append(f"exclude_modules must be non-empty strings, got {list(cfg.exclude_modules)!r}")
    for name in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(getattr(cfg, name), bool):
            problems.append(f"{name} must be true or false, got {getattr(cfg, name)!r}")
    return problems
