"""Fixtures for the lora_core tests: the shared tiny Llama loaded fresh, a fixed batch, adapter perturbation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture
def load_tiny(tiny_model_dir: Path) -> Callable[..., nn.Module]:
    """load_tiny(**from_pretrained_kwargs) -> a fresh fp32 copy of the tiny Llama, in eval mode."""
    from transformers import AutoModelForCausalLM

    def load(**kwargs) -> nn.Module:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True, **kwargs)
        return model.eval()

    return load


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 200, (2, 24), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def randomize_adapter_weights(model: nn.Module, seed: int = 0) -> None:
    """Give every LoRA parameter (ours or PEFT's) random values so that B·A ≠ 0 and the test sees it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                noise = torch.randn(param.shape, generator=generator) * 0.1
                if "magnitude" in name:
                    param.mul_(1.0 + noise.abs())
                else:
                    param.copy_(noise)


@pytest.fixture
def randomize() -> Callable[[nn.Module, int], None]:
    return randomize_adapter_weights
