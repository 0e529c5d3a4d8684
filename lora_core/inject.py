"""Finding the modules an adapter targets, wrapping them in LoraLinear, and freezing the base.

Target matching follows PEFT so a config means the same thing in both libraries: a list entry matches a
module whose dotted path equals it or ends with "." + entry; a string is a regular expression that must
match the whole path; "all-linear" takes every linear layer except the output head (lm_head).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace

from torch import nn

from lora_core.adapter_config import matching_target
from lora_core.config import ALL_LINEAR, LoraConfig
from lora_core.exceptions import AdapterNotFoundError, TargetModulesError
from lora_core.layers import LoraLinear, TokenRoute, is_supported_linear

logger = logging.getLogger(__name__)

# The adapters a model holds: {adapter name: LoraConfig}, kept on the model object itself.
_CONFIGS_ATTR = "lora_core_configs"


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter ``adapter_name`` to every target module of ``model`` (in place) and make it the active one.

    The base model is frozen: afterwards the only parameters with requires_grad are the adapters'.
    Raises TargetModulesError when a target matches nothing (listing the module names the model has) or
    matches a module that is not a linear layer. Returns ``model``.
    """
    add_adapter(model, config, adapter_name)
    set_active_adapter(model, adapter_name)
    return model


def add_adapter(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """Like apply_lora, but leaves the active adapter(s) unchanged."""
    configs = adapter_configs(model)
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}; "
                         "delete_adapter() it first or choose another name")
    targets = find_target_modules(model, config)
    for path in targets:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module)
            replace_submodule(model, path, module)
        module.add_adapter(adapter_name, config)
    configs[adapter_name] = config
    freeze_base(model)
    logger.info("added adapter %r (r=%d) to %d modules", adapter_name, config.r, len(targets))
    return model


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Dotted paths of the modules ``config.target_modules`` selects (wrapped ones count as their base)."""
    candidates = {path: _unwrap(module) for path, module in _named_modules(model)}
    head = _output_head_paths(model)
    selected: list[str] = []
    not_linear: list[str] = []
    matched_entries: set[str] = set()
    for path, module in candidates.items():
        if not path or _is_excluded(path, config.exclude_modules):
            continue
        if config.target_modules == ALL_LINEAR:
            hit = is_supported_linear(module) and path not in head
        else:
            entry = matching_target(path, config.target_modules)
            hit = entry is not None
            if hit:
                matched_entries.add(entry)
        if not hit:
            continue
        if is_supported_linear(module):
            selected.append(path)
        else:
            not_linear.append(f"{path} ({type(module).__name__})")
    if not_linear:
        raise TargetModulesError(
            "target_modules matched modules that are not linear layers, which LoRA cannot adapt: "
            + ", ".join(not_linear) + ". Name their linear sub-layers instead."
        )
    if not selected:
        raise TargetModulesError(
            f"target_modules {_show(config.target_modules)} matched no linear layer of "
            f"{type(model).__name__}. Its linear layers are named: {', '.join(linear_layer_names(model))}"
            " (use a name, a dotted suffix, a full-match regular expression, or 'all-linear')."
        )
    if isinstance(config.target_modules, tuple):
        unmatched = [t for t in config.target_modules if t not in matched_entries]
        if unmatched:
            # PEFT accepts a partly matching list too; say so instead of failing.
            logger.warning("target_modules entries %s matched nothing in %s", unmatched, type(model).__name__)
    return selected


def linear_layer_names(model: nn.Module) -> list[str]:
    """Sorted distinct last path components of the model's linear layers (what target_modules usually names)."""
    names = {path.rsplit(".", 1)[-1] for path, m in _named_modules(model) if path and is_supported_linear(_unwrap(m))}
    return sorted(names)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """Every (dotted path, LoraLinear) in the model."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield path, module


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The model's adapters by name (a live dict, created empty on first use)."""
    configs = getattr(model, _CONFIGS_ATTR, None)
    if configs is None:
        configs = {}
        # object.__setattr__ keeps nn.Module from treating the dict as anything special.
        object.__setattr__(model, _CONFIGS_ATTR, configs)
    return configs


def set_active_adapter(model: nn.Module, adapter_name: str | list[str] | tuple[str, ...]) -> nn.Module:
    """Make the named adapter(s) the only active one(s); several active adapters add up."""
    names = (adapter_name,) if isinstance(adapter_name, str) else tuple(adapter_name)
    configs = adapter_configs(model)
    for name in names:
        if name not in configs:
            raise AdapterNotFoundError(f"no adapter named {name!r}; the model has {sorted(configs)}")
    for _, layer in lora_layers(model):
        layer.set_active_adapters(tuple(n for n in names if n in layer.lora_A))
    return model


def active_adapters(model: nn.Module) -> tuple[str, ...]:
    """Names of the active adapters (in activation order)."""
    seen: list[str] = []
    for _, layer in lora_layers(model):
        seen.extend(n for n in layer.active_adapters if n not in seen)
    return tuple(seen)


@contextmanager
def route_tokens(model: nn.Module, routes: Mapping[str, TokenRoute]) -> Iterator[nn.Module]:
    """Inside the block, adapter `name` applies only to the tokens `routes[name]` of the flattened (B·T) input.

    Adapters not named in `routes` do not apply at all, active or not. Keep the block open over the
    backward pass too when gradient checkpointing is on: the recomputed forward must route the same way.
    A route's dropout seed becomes one seed per layer (mixed with the layer's path), so the layers'
    masks differ from each other but not between two models holding the same adapter at the same paths.
    """
    configs = adapter_configs(model)
    unknown = sorted(set(routes) - set(configs))
    if unknown:
        raise AdapterNotFoundError(f"cannot route adapters {unknown}: the model has {sorted(configs)}")
    layers = list(lora_layers(model))
    merged = sorted({n for _, layer in layers for n in layer.merged_adapters if n in routes})
    if merged:
        raise ValueError(f"adapters {merged} are merged into the base weights, which every token sees: "
                         "unmerge_adapter(model) before routing them")
    previous = [layer.routes for _, layer in layers]
    for path, layer in layers:
        layer.routes = {name: _route_for_layer(route, path) for name, route in routes.items() if name in layer.lora_A}
    try:
        yield model
    finally:
        for (_, layer), routed in zip(layers, previous, strict=True):
            layer.routes = routed


def _route_for_layer(route: TokenRoute, path: str) -> TokenRoute:
    """The route with its dropout seed mixed with the layer's dotted path (a stable 63-bit hash)."""
    if route.dropout_seed is None:
        return route
    digest = hashlib.blake2b(f"{route.dropout_seed}:{path}".encode(), digest_size=8).digest()
    return replace(route, dropout_seed=int.from_bytes(digest, "little") >> 1)


def adapter_parameters(model: nn.Module, adapter_name: str) -> list[nn.Parameter]:
    """The parameters of adapter `adapter_name` alone (A, B and DoRA magnitudes), in module order."""
    if adapter_name not in adapter_configs(model):
        raise AdapterNotFoundError(f"no adapter named {adapter_name!r}; the model has {sorted(adapter_configs(model))}")
    return [
        store[adapter_name]
        for _, layer in lora_layers(model)
        for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude)
        if adapter_name in store
    ]


def freeze_base(model: nn.Module) -> None:
    """requires_grad False for every parameter that is not an adapter parameter."""
    adapter_params = {id(p) for _, layer in lora_layers(model) for p in _adapter_parameters(layer)}
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad (after apply_lora: the adapters' A, B and DoRA magnitudes)."""
    return [p for p in model.parameters() if p.requires_grad]


def _adapter_parameters(layer: LoraLinear) -> Iterator[nn.Parameter]:
    for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
        yield from store.values()


def _named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the insides of LoraLinear (a wrapped layer is reported under its own path)."""
    wrapped: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoraLinear):
            wrapped.append(path)
        yield path, module


def _unwrap(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLinear) else module


def _is_excluded(path: str, exclude: tuple[str, ...]) -> bool:
    return any(path == e or path.endswith("." + e) for e in exclude)


def _output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head: the module get_output_embeddings() returns, and any 'lm_head'."""
    heads: set[str] = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for path, module in model.named_modules():
        if (head is not None and (module is head or _unwrap(module) is head)) or path.rsplit(".", 1)[-1] == "lm_head":
            heads.add(path)
    return heads


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``model``."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def _show(targets: tuple[str, ...] | str) -> str:
    return repr(targets) if isinstance(targets, str) else repr(list(targets))
