"""What a job asks the cluster for: its Ray Train workers and the accelerators each holds, and its priority."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Resources", "PriorityClass", "PRIORITY_VALUE", "priority_value"]

PriorityClass = Literal["low", "normal", "high"]
# Within a tenant, a higher value is admitted first and preempted last (Kueue's WorkloadPriorityClass).
PRIORITY_VALUE: dict[str, int] = {"low": -1, "normal": 0, "high": 1}


def priority_value(priority: str) -> int:
    """The number a priority class orders by; ValueError naming the classes for an unknown one."""
    try:
        return PRIORITY_VALUE[priority]
    except KeyError:
        raise ValueError(f"priority must be one of {sorted(PRIORITY_VALUE)}, not {priority!r}") from None


class Resources(BaseModel):
    """A job's gang: `workers` Ray Train ranks, each holding `gpus_per_worker` accelerators.

    Also accepts `{"gpus": N}`, meaning N workers of one accelerator each (one device per rank); the
    two forms cannot be mixed. In CPU mode the accelerators are Ray logical resources
    (`Settings.accelerator_resource`), so the same numbers schedule a laptop and a GPU cluster.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int = Field(1, ge=1, le=64, description="Ray Train workers (ranks).")
    gpus_per_worker: int = Field(1, ge=1, le=16, description="Accelerators each worker holds.")

    @model_validator(mode="before")
    @classmethod
    def _gpus_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and "gpus" in data:
            if "workers" in data or "gpus_per_worker" in data:
                raise ValueError(
                    "give either {'gpus': N} or {'workers': W, 'gpus_per_worker': G}, not both forms at once"
                )
            rest = {k: v for k, v in data.items() if k != "gpus"}
            return {**rest, "workers": data["gpus"], "gpus_per_worker": 1}
        return data

    @property
    def total_gpus(self) -> int:
        """Accelerators the whole gang holds at once: what admission counts against quotas and capacity."""
        return self.workers * self.gpus_per_worker
