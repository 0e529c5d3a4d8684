"""Errors raised by lora_core: each says what is wrong, where, and what to do about it."""

from __future__ import annotations


class LoraError(Exception):
    """Base class of every lora_core error."""


class LoraConfigError(LoraError, ValueError):
    """A LoraConfig (or an adapter_config.json) has one or more invalid fields; all are listed."""


class TargetModulesError(LoraError, ValueError):
    """target_modules matched nothing, or matched a module that is not a linear layer."""


class AdapterFileError(LoraError, ValueError):
    """An adapter directory is missing, corrupt, or does not fit the model it is loaded into."""


class AdapterNotFoundError(LoraError, KeyError):
    """An adapter name that the model does not hold."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class QuantizedMergeError(LoraError, RuntimeError):
    """Merging into a quantized (4-bit / 8-bit) weight would silently re-quantize it."""
