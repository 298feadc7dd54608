"""Model-agnostic helpers on configs and module trees (dotted config keys, tensors by path, the decoder stack)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from premoe.errors import UnsupportedModelError

_MISSING = object()


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """``key`` (dotted for nested configs) of a transformers config object or a ``config.json`` dict."""
    value: Any = config
    for part in key.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        else:
            value = getattr(value, part, _MISSING)
        if value is _MISSING or value is None:
            return default
    return value


def config_has(config: Any, key: str) -> bool:
    return config_get(config, key, _MISSING) is not _MISSING


def config_set(config: Any, key: str, value: Any) -> None:
    """Set a (dotted) key on a config dict or object, creating nothing but the leaf."""
    *path, leaf = key.split(".")
    target = config
    for part in path:
        target = target[part] if isinstance(target, dict) else getattr(target, part)
    if isinstance(target, dict):
        target[leaf] = value
    else:
        setattr(target, leaf, value)


def owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


def set_tensor(module: nn.Module, path: str, value: torch.Tensor, requires_grad: bool = False) -> None:
    """Put ``value`` at ``path`` (dotted, relative to ``module``): as a parameter where the module has
    a parameter of that name, else as a buffer."""
    mod, leaf = owner(module, path)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value.detach(), requires_grad=requires_grad)
    else:
        mod._buffers[leaf] = value


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (the shortest ``*.layers`` ModuleList; DBRX: ``*.blocks``)."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.rpartition(".")[2] in ("layers", "blocks")
    ]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder `layers` list")
    return min(found, key=lambda item: item[0].count("."))[1]


def backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The module that holds the decoder layers and runs them (``model.model`` for most causal LMs), and
    the attribute the layer list has on it (``layers``; DBRX: ``blocks``). ``model.base_model`` is not
    always that module: Llama-4's causal LM names its base ``language_model``."""
    layers = decoder_layers(model)
    for mod in model.modules():
        for name, child in mod._modules.items():
            if child is layers:
                return mod, name
    raise UnsupportedModelError(f"cannot find the module that runs {type(model).__name__}'s decoder layers")


def release(module: nn.Module) -> None:
    """Put a module's tensors back on the meta device (frees their memory; shapes stay)."""
    for mod in module.modules():
        for leaf, t in list(mod._parameters.items()):
            if t is not None and not t.is_meta:
                mod._parameters[leaf] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
        for leaf, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta and leaf not in mod._non_persistent_buffers_set:
                mod._buffers[leaf] = torch.empty_like(b, device="meta")


def finish_buffers(model: nn.Module) -> None:
    """Materialise non-persistent buffers (rotary frequencies) the way transformers does after loading."""
    for mod in model.modules():
        meta = [
            n for n, b in mod._buffers.items() if b is not None and b.is_meta and n in mod._non_persistent_buffers_set
        ]
        if not meta:
            continue
        for n in meta:
            mod._buffers[n] = torch.empty_like(mod._buffers[n], device="cpu")
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            continue
        # _init_weights also re-initialises the module's parameters (Gemma's scaled embedding): let it
        # see meta stand-ins, so only the buffers are computed and the loaded weights stay as they are
        params = dict(mod._parameters)
        for n, t in params.items():
            if t is not None:
                mod._parameters[n] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
        try:
            model._init_weights(mod)
        finally:
            mod._parameters.update(params)
