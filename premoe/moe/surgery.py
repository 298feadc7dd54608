"""Applying a :class:`~premoe.moe.plans.PrunePlan` to a model in memory, and the config it implies.

Slices, in lockstep, every tensor indexed by expert: router rows, selection biases (whatever
dimension holds the experts) and the expert weights (blocks of rows on dim 0), then updates
every cached count (module attributes and the shared config). Shared experts and dense layers are
never touched. Zero-computation experts (LongCat-Flash) are router slots past the routed experts;
they are always kept, after the kept routed experts.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from premoe.core.modules import config_get, config_has, config_set, set_tensor
from premoe.errors import InputError
from premoe.moe.arch import EXPERT_COUNT_KEYS, ArchSpec, find_moe_layers, router_spec
from premoe.moe.layout import expert_slots
from premoe.moe.plans import PrunePlan

_COUNT_ATTRS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "num_routed_experts",
    "moe_num_experts",
    "total_experts",
)
_TOPK_ATTRS = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k")
TOPK_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "moe_k", "num_experts_per_token")


def _aliases(config_obj: Any, key: str) -> set[str]:
    """``key`` and every name the config class maps to or from it (``attribute_map``)."""
    amap = getattr(type(config_obj), "attribute_map", {}) or {}
    canon = amap.get(key, key)
    return {key, canon, *(a for a, c in amap.items() if c == canon)}


def config_updates(raw: dict[str, Any], spec: ArchSpec, config: Any, plan: PrunePlan) -> dict[str, Any]:
    """Keys of ``config.json`` ``raw`` (as the hub spells them; dotted for nested configs) that change with
    ``plan``; ``config`` is the model's transformers config (its class's ``attribute_map`` gives aliases)."""
    upd: dict[str, Any] = {spec.count_key: plan.keep, spec.topk_key: plan.top_k}
    upd.update({k: plan.keep for k in (*EXPERT_COUNT_KEYS, *_aliases(config, spec.count_key)) if config_has(raw, k)})
    upd.update({k: plan.top_k for k in (*TOPK_KEYS, *_aliases(config, spec.topk_key)) if config_has(raw, k)})
    if plan.group_policy == "flatten":
        for k in ("n_group", "topk_group", *_aliases(config, "n_group"), *_aliases(config, "topk_group")):
            if config_has(raw, k):
                upd[k] = 1
        if config_get(raw, "topk_method") == "group_limited_greedy":
            upd["topk_method"] = "greedy"
    return upd


def apply_config_updates(raw: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` with the (dotted) ``updates`` applied."""
    out = copy.deepcopy(raw)
    for key, value in updates.items():
        config_set(out, key, value)
    return out


def _slice(t: torch.Tensor, dim: int, ids: list[int], per: int = 1) -> torch.Tensor:
    index = torch.tensor(ids, dtype=torch.long, device=t.device)
    if per == 1:
        return t.index_select(dim, index).clone()
    blocks = t.unflatten(0, (-1, per)).index_select(0, index)
    return blocks.flatten(0, 1).clone()


def apply_plan_(model: nn.Module, spec: ArchSpec, plan: PrunePlan) -> nn.Module:
    """Prune ``model`` in place to ``plan``; returns it.

    Raises:
        InputError: the plan was made for other MoE layers or another expert count.
    """
    rspec = router_spec(model.config, spec)
    E, width = plan.num_experts, rspec.width
    layers = find_moe_layers(model, spec)
    if {m.index for m in layers} != set(plan.kept):
        raise InputError(
            "the prune plan does not match the model's MoE layers; make it from this model's pattern store"
        )
    if rspec.num_experts != E:
        raise InputError(f"the model has {rspec.num_experts} experts per layer but the plan expects {E}")
    N, extra = plan.keep, width - E
    for m in layers:
        kept = plan.kept[m.index]
        slots = expert_slots(kept, E, width)
        for path, dim in m.router_tensors.items():
            t = m.tensor(path)
            set_tensor(m.block, path, _slice(t, dim, slots), requires_grad=t.requires_grad)
        for path, per in m.expert_tensors.items():
            t = m.tensor(path)
            set_tensor(
                m.block, path, _slice(t, 0, slots if per == 0 else kept, max(per, 1)), requires_grad=t.requires_grad
            )
        for mod in m.block.modules():
            if isinstance(mod, nn.Linear) and mod.out_features == width and mod.weight.shape[0] == N + extra:
                mod.out_features = N + extra
            if plan.n_group == 1 and getattr(mod, "topk_method", None) == "group_limited_greedy":
                mod.topk_method = "greedy"
            if hasattr(mod, "num_group") and plan.group_policy == "flatten":
                mod.num_group, mod.topk_group = plan.n_group, plan.topk_group
    for mod in model.modules():  # every cached count: blocks, routers, experts, the causal LM's aux-loss count
        for attr in _COUNT_ATTRS:
            value = getattr(mod, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value in (E, width):
                setattr(mod, attr, N if value == E else N + extra)
        for attr in _TOPK_ATTRS:
            if getattr(mod, attr, None) == plan.top_k_before and isinstance(getattr(mod, attr), int):
                setattr(mod, attr, plan.top_k)
    for key, value in config_updates(model.config.to_dict(), spec, model.config, plan).items():
        config_set(model.config, key, value)
    return model
