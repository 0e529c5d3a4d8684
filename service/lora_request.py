"""Turning a job request's `lora` block into the job's LoRA spec and quantization, checked against the catalog.

Every problem surfaces as a 400 naming the field (`lora.r`, `lora.target_modules`, ...) before the job
is queued, so a worker never starts on a configuration it would refuse.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import ValidationError

from fleet.catalog import BaseModelSpec, Catalog
from fleet.exceptions import InvalidRequest
from fleet.job_spec import LoraSpec, Quantization
from service.schemas import LoraRequest
from service.target_modules import ALL_LINEAR, check_target_modules, linear_module_names

__all__ = ["resolve_lora"]


@lru_cache(maxsize=64)
def _module_names(model_path: str) -> tuple[str, ...] | None:
    # config.json of a catalog model does not change while the server runs.
    return linear_module_names(model_path)


def resolve_lora(request: LoraRequest | None, *, model: str,
                 catalog: Catalog) -> tuple[LoraSpec, Quantization]:
    """The job's LoraSpec (defaults filled in) and its quantization (the request's, else the catalog's).

    `"all-linear"`, and an omitted `target_modules`, become the base model's linear layer names when
    they are known from its config.json; otherwise `"all-linear"` is passed on as it is.
    """
    spec: BaseModelSpec = catalog.get(model)
    request = request or LoraRequest()
    given = request.model_dump(exclude_none=True, exclude={"quantization"})
    valid = _module_names(spec.path)
    if "target_modules" in given:
        check_target_modules(given["target_modules"], valid, model=model)
        if given["target_modules"] == [ALL_LINEAR]:
            # Known layers: name them. Unknown (a hub id, an unlisted architecture): the engine expands
            # "all-linear" itself once it has loaded the model.
            given["target_modules"] = list(valid) if valid is not None else ALL_LINEAR
    elif valid is not None:
        # Default: every linear layer of the blocks (for Llama-style models, the engine's default too).
        given["target_modules"] = list(valid)

    catalog.check_rank(model, given.get("r", LoraSpec.model_fields["r"].default))
    try:
        lora = LoraSpec(**given)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise InvalidRequest(
            f"Invalid value for 'lora.{field}': {err['msg']}.", param=f"lora.{field}", code="invalid_lora"
        ) from e
    return lora, request.quantization or spec.quantization
