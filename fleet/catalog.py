"""The base model catalog: which base models tenants may fine-tune, where they live, and their limits."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleet.exceptions import InvalidRequest
from fleet.resources import Resources

__all__ = ["BaseModelSpec", "Catalog", "read_catalog_file"]


class BaseModelSpec(BaseModel):
    """One catalog entry, as the operator writes it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="Local directory or hub id the workers load the base model from.")
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    max_rank: int = Field(default=64, ge=1, le=4096, description="Largest LoRA rank r a job may ask for.")
    description: str = ""
    resources: Resources | None = Field(
        default=None,
        description='What a job on this model asks for when it names no `resources` ({"gpus": N} or '
                    '{"workers": W, "gpus_per_worker": G}); omitted: one worker with one GPU.',
    )

    def default_resources(self) -> Resources:
        """The resources a job on this model gets when its request names none."""
        return self.resources or Resources()


class Catalog:
    """Read-only lookups over the configured base models, with errors that list what is available."""

    def __init__(self, entries: Mapping[str, BaseModelSpec | Mapping[str, Any]]) -> None:
        self._entries = {name: BaseModelSpec.model_validate(spec) for name, spec in sorted(entries.items())}

    def names(self) -> list[str]:
        """Names of every base model, sorted."""
        return list(self._entries)

    def items(self) -> list[tuple[str, BaseModelSpec]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> BaseModelSpec:
        """The entry for `name`; InvalidRequest(param="model") naming the available models if unknown."""
        try:
            return self._entries[name]
        except KeyError:
            available = ", ".join(self._entries) or "(none configured)"
            raise InvalidRequest(
                f"Unknown base model {name!r}. Available models: {available}.",
                param="model",
                code="model_not_found",
            ) from None

    def check_rank(self, name: str, r: int) -> None:
        """Raise InvalidRequest(param="lora.r") if rank `r` is not allowed for base model `name`."""
        spec = self.get(name)
        if r > spec.max_rank:
            raise InvalidRequest(
                f"LoRA rank r={r} exceeds the maximum rank {spec.max_rank} allowed for base model {name!r}.",
                param="lora.r",
                code="rank_too_large",
            )


def read_catalog_file(path: Path) -> dict[str, BaseModelSpec]:
    """Parse a JSON catalog file `{name: {path, quantization, max_rank, description, resources}}`.

    Raises ValueError naming the file and every invalid entry.
    """
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"Catalog file {path} does not exist.") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"Catalog file {path} is not valid JSON: line {e.lineno}: {e.msg}.") from e
    if not isinstance(raw, dict):
        raise ValueError(f"Catalog file {path} must hold a JSON object mapping model names to entries.")
    entries: dict[str, BaseModelSpec] = {}
    problems: list[str] = []
    for name, value in raw.items():
        try:
            entries[name] = BaseModelSpec.model_validate(value)
        except ValidationError as e:
            for err in e.errors():
                loc = ".".join(str(p) for p in err["loc"])
                problems.append(f"{name}.{loc}: {err['msg']}" if loc else f"{name}: {err['msg']}")
    if problems:
        raise ValueError(f"Catalog file {path} has invalid entries: " + "; ".join(problems))
    return entries
