"""Loading a quantized base model (QLoRA: NF4 + double quantization, or int8) and preparing it for training.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): W0 is stored as 4-bit NormalFloat blocks whose scales are
themselves quantized ("double quant"); the forward pass dequantizes to ``compute_dtype``, and gradients
flow only into the fp32 adapters: h = dequant(W0)·x + s·B·A·x.

Gradient checkpointing recomputes each decoder block in the backward pass. With reentrant checkpointing a
block whose inputs do not require grad is skipped by autograd entirely, so adapters inside it silently
never train; prepare_for_training makes the embedding output require grad, which fixes that for
reentrant and is harmless for non-reentrant checkpointing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from lora_core.exceptions import LoraError
from lora_core.inject import freeze_base, replace_submodule
from lora_core.layers import dense_weight, keep_trainable_4bit_layout, quantization_of

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "int8", None)


def load_base_model(
    path_or_id: str | os.PathLike,
    quantization: str | None = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    *,
    device: torch.device | str | None = None,
    device_map: str | dict | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """A causal LM from a local directory or hub id, optionally quantized by bitsandbytes, base frozen.

    quantization "nf4": 4-bit NormalFloat with double quantization, computing in ``compute_dtype``;
    "int8": LLM.int8(); None: dense weights in ``compute_dtype``. bitsandbytes runs these on CPU
    (≥ 0.47) and CUDA. The output head and embeddings stay unquantized, as transformers does it.
    Every weight is loaded straight onto one device: ``device``, by default the current CUDA device
    if there is one, else the CPU. Never spread over the node's GPUs ("auto"): a data-parallel rank's
    model must sit whole on its own GPU. ``device_map`` replaces that for a caller placing layers itself.
    """
    from transformers import AutoModelForCausalLM

    kwargs = _from_pretrained_kwargs(quantization, compute_dtype, device=device, device_map=device_map)
    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), local_files_only=local_files_only, **kwargs)
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        keep_trainable_4bit_layout(module)
    logger.info("loaded %s (quantization=%s, compute dtype %s, %s)", path_or_id, quantization, compute_dtype,
                kwargs["device_map"])
    return model


def _from_pretrained_kwargs(
    quantization: str | None,
    compute_dtype: torch.dtype,
    *,
    device: torch.device | str | None,
    device_map: str | dict | None,
) -> dict:
    """The `from_pretrained` arguments for load_base_model (pure: dtype, quantization, placement)."""
    from transformers import BitsAndBytesConfig

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be 'nf4', 'int8' or None, got {quantization!r}")
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise ValueError(f"compute_dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {compute_dtype!r}")
    if device is not None and device_map is not None:
        raise ValueError("pass either device (the whole model on one device) or device_map, not both")
    if device_map is None:
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        device_map = {"": torch.device(device)}
    kwargs: dict = {"dtype": compute_dtype, "device_map": device_map}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    elif quantization == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    return kwargs


def prepare_for_training(
    model: nn.Module,
    gradient_checkpointing: bool = True,
    use_reentrant: bool = False,
) -> nn.Module:
    """Freeze the base, enable gradient checkpointing so adapters in checkpointed blocks still train.

    Makes the input embeddings' output require grad (without it reentrant checkpointing silently drops
    the adapter gradients), turns off the KV cache (useless in training and incompatible with
    checkpointing) and puts the model in train mode. Works before or after apply_lora. Returns model.
    """
    freeze_base(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
    if gradient_checkpointing:
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise LoraError(f"{type(model).__name__} has no gradient checkpointing support "
                            "(not a transformers PreTrainedModel); pass gradient_checkpointing=False")
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model


def is_quantized(model: nn.Module) -> bool:
    """True when any linear layer of the model is a bitsandbytes 4-bit/8-bit layer."""
    return any(quantization_of(m) is not None for m in model.modules())


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every bitsandbytes layer (wrapped or not) by a dense nn.Linear in ``dtype``, in place."""
    for path, module in list(model.named_modules()):
        if quantization_of(module) is None:
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(dense_weight(module).to(dtype))
            if module.bias is not None:
                dense.bias.copy_(module.bias.to(dtype))
        dense.requires_grad_(False)
        replace_submodule(model, path, dense)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    for attr in ("hf_quantizer", "is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model


def export_merged_model(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Save a dense ``dtype`` model with the active adapters merged in (the explicit way to merge a QLoRA).

    The quantized base is dequantized first, then W0 + s·B·A is formed in fp32 and rounded once to
    ``dtype``. Consumes ``model`` (it is dequantized and unwrapped in place). Returns out_dir.
    """
    from lora_core.compose import merge_and_unload

    dequantize_model(model, dtype)
    merge_and_unload(model)
    model.to(dtype)
    out = Path(out_dir)
    model.save_pretrained(out)
    logger.info("exported merged %s model to %s", dtype, out)
    return out


