"""lora_core: our LoRA library, h = W0·x + (α/r)·B·A·x, numerically and file-compatible with PEFT.

See docs/lora_core.md for the math and the API. Imports nothing from service/, workers/ or fleet/.
The torch-backed parts load on first use (PEP 562), so the pure-Python rules for adapter files
(`lora_core.adapter_config`, `LoraConfig`) can be imported by the API process without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lora_core.config import ALL_LINEAR, LoraConfig
from lora_core.exceptions import (
    AdapterFileError,
    AdapterNotFoundError,
    LoraConfigError,
    LoraError,
    QuantizedMergeError,
    TargetModulesError,
)

if TYPE_CHECKING:
    from lora_core.compose import (
        adapters_disabled,
        combine_adapters,
        delete_adapter,
        disable_adapters,
        enable_adapters,
        list_adapters,
        merge_adapter,
        merge_and_unload,
        ties_merge,
        unmerge_adapter,
    )
    from lora_core.inject import (
        active_adapters,
        adapter_parameters,
        add_adapter,
        apply_lora,
        find_target_modules,
        linear_layer_names,
        lora_layers,
        route_tokens,
        set_active_adapter,
        trainable_parameters,
    )
    from lora_core.io import (
        load_adapter,
        lora_state_dict,
        read_adapter_config,
        save_adapter,
        set_lora_state_dict,
    )
    from lora_core.layers import LoraLinear, TokenRoute
    from lora_core.quant import (
        dequantize_model,
        export_merged_model,
        is_quantized,
        load_base_model,
        prepare_for_training,
    )
    from lora_core.report import (
        ModuleRank,
        RankReport,
        TrainableParameterReport,
        adapter_rank_report,
        effective_rank,
        rank_report,
        singular_values_of_delta,
        trainable_parameter_report,
    )

# name → the module that defines it, for everything that needs torch.
_LAZY = {
    name: module
    for module, names in {
        "lora_core.compose": ("adapters_disabled", "combine_adapters", "delete_adapter", "disable_adapters",
                              "enable_adapters", "list_adapters", "merge_adapter", "merge_and_unload",
                              "ties_merge", "unmerge_adapter"),
        "lora_core.inject": ("active_adapters", "adapter_parameters", "add_adapter", "apply_lora",
                             "find_target_modules", "linear_layer_names", "lora_layers", "route_tokens",
                             "set_active_adapter", "trainable_parameters"),
        "lora_core.io": ("load_adapter", "lora_state_dict", "read_adapter_config", "save_adapter",
                         "set_lora_state_dict"),
        "lora_core.layers": ("LoraLinear", "TokenRoute"),
        "lora_core.quant": ("dequantize_model", "export_merged_model", "is_quantized", "load_base_model",
                            "prepare_for_training"),
        "lora_core.report": ("ModuleRank", "RankReport", "TrainableParameterReport", "adapter_rank_report",
                             "effective_rank", "rank_report", "singular_values_of_delta",
                             "trainable_parameter_report"),
    }.items()
    for name in names
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "ALL_LINEAR",
    "AdapterFileError",
    "AdapterNotFoundError",
    "LoraConfig",
    "LoraConfigError",
    "LoraError",
    "LoraLinear",
    "ModuleRank",
    "QuantizedMergeError",
    "RankReport",
    "TargetModulesError",
    "TokenRoute",
    "TrainableParameterReport",
    "active_adapters",
    "adapter_parameters",
    "adapter_rank_report",
    "add_adapter",
    "adapters_disabled",
    "apply_lora",
    "combine_adapters",
    "delete_adapter",
    "dequantize_model",
    "disable_adapters",
    "effective_rank",
    "enable_adapters",
    "export_merged_model",
    "find_target_modules",
    "is_quantized",
    "linear_layer_names",
    "list_adapters",
    "load_adapter",
    "load_base_model",
    "lora_layers",
    "lora_state_dict",
    "merge_adapter",
    "merge_and_unload",
    "prepare_for_training",
    "rank_report",
    "read_adapter_config",
    "route_tokens",
    "save_adapter",
    "set_active_adapter",
    "set_lora_state_dict",
    "singular_values_of_delta",
    "ties_merge",
    "trainable_parameter_report",
    "trainable_parameters",
    "unmerge_adapter",
]
