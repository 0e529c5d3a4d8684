"""Token routing: several adapters on one base in one forward pass, each on its own tokens only."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lora_core import (
    AdapterNotFoundError,
    LoraConfig,
    TokenRoute,
    adapter_parameters,
    add_adapter,
    route_tokens,
    set_active_adapter,
)


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _model(configs: dict[str, LoraConfig]) -> nn.Module:
    torch.manual_seed(0)
    model = _TwoLayers().double()
    for name, config in configs.items():
        add_adapter(model, config, name)
    with torch.no_grad():  # B ≠ 0, so every adapter changes the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.double()
    return model


_CONFIGS = {
    "a": LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["up", "down"]),
    "b": LoraConfig(r=4, alpha=4, dropout=0.5, target_modules=["up"]),
    "c": LoraConfig(r=3, alpha=6, dropout=0.0, target_modules=["down"], use_dora=True),
}


def _grads(model: nn.Module, name: str) -> list[torch.Tensor]:
    return [p.grad.clone() for p in adapter_parameters(model, name)]


def test_each_adapter_sees_only_its_tokens_and_gets_only_its_gradient():
    """Routed in one pass over concatenated tokens = each adapter run alone on its own tokens (float64)."""
    torch.manual_seed(1)
    parts = {"a": torch.randn(2, 3, 12), "b": torch.randn(1, 5, 12), "c": torch.randn(3, 2, 12)}
    parts = {k: v.double() for k, v in parts.items()}
    alone_out, alone_grads = {}, {}
    for name, x in parts.items():
        model = _model(_CONFIGS)
        with route_tokens(model, {name: TokenRoute(dropout_seed=7)}):
            out = model(x)
            (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
        alone_out[name], alone_grads[name] = out.detach(), _grads(model, name)

    model = _model(_CONFIGS)
    flat = torch.cat([x.reshape(-1, 12) for x in parts.values()])[None]  # (1, 6 + 5 + 6, 12)
    routes, start = {}, 0
    for name, x in parts.items():
        n = x.shape[0] * x.shape[1]
        routes[name], start = TokenRoute(start, start + n, dropout_seed=7), start + n
    with route_tokens(model, routes):
        out = model(flat)[0]
        loss = 0
        for name, x in parts.items():
            piece = out[routes[name].start : routes[name].end].reshape(x.shape)
            torch.testing.assert_close(piece, alone_out[name], rtol=0, atol=1e-12)
            loss = loss + (piece * torch.arange(piece.numel()).view(piece.shape)).sum()
        loss.backward()
    for name in parts:
        for got, want in zip(_grads(model, name), alone_grads[name], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_a_seeded_dropout_mask_is_the_same_when_checkpointing_recomputes_the_forward():
    model = _model({"b": _CONFIGS["b"]})
    x = torch.randn(4, 12, dtype=torch.float64)

    def grads(use_checkpoint: bool) -> list[torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(123)  # the global RNG differs between the passes: the mask must not depend on it
        with route_tokens(model, {"b": TokenRoute(dropout_seed=5)}):
            out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
            torch.manual_seed(999)
            out.square().sum().backward()
        return _grads(model, "b")

    plain, recomputed = grads(False), grads(True)
    for got, want in zip(recomputed, plain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_dropout_seed_decides_the_mask_and_the_layers_get_different_masks():
    model = _model({"b": LoraConfig(r=4, alpha=4, dropout=0.5, target_modules=["up", "down"])})
    x = torch.randn(8, 12, dtype=torch.float64)

    def out(seed: int) -> torch.Tensor:
        with route_tokens(model, {"b": TokenRoute(dropout_seed=seed)}):
            return model(x).detach()

    torch.testing.assert_close(out(1), out(1), rtol=0, atol=0)
    assert not torch.equal(out(1), out(2))
    with route_tokens(model, {"b": TokenRoute(dropout_seed=1)}):
        up, down = model.up.routes["b"].dropout_seed, model.down.routes["b"].dropout_seed
    assert up != down and model.up.routes is None  # restored on leaving the block


def test_routing_an_unknown_adapter_names_the_ones_the_model_has():
    model = _model({"a": _CONFIGS["a"]})
    with pytest.raises(AdapterNotFoundError, match=r"\['zz'\].*\['a'\]"):
        with route_tokens(model, {"zz": TokenRoute()}):
            pass


def test_one_adapter_routed_over_every_token_is_the_plain_forward():
    """Without dropout, the routed path (one node for the layer's adapters) = the unrouted _LoraDelta path."""
    config = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["up", "down"])
    x = torch.randn(3, 5, 12, dtype=torch.float64)

    def run(routed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = _model({"a": config})
        set_active_adapter(model, "a")
        inputs = x.clone().requires_grad_(True)
        if routed:
            with route_tokens(model, {"a": TokenRoute()}):
                out = model(inputs)
                out.square().sum().backward()
        else:
            out = model(inputs)
            out.square().sum().backward()
        return out.detach(), [*_grads(model, "a"), inputs.grad]

    (plain, plain_grads), (routed, routed_grads) = run(False), run(True)
    torch.testing.assert_close(routed, plain, rtol=0, atol=1e-12)
    for got, want in zip(routed_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
