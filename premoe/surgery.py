"""Applying a :class:`~premoe.plans.PrunePlan` to a model in memory (transformers 5 fused experts).

Slices, on dim 0 and in lockstep, every per-expert tensor of the router (weight, bias,
``e_score_correction_bias``) and of the experts module (``gate_up_proj``, ``down_proj`` and their
biases), then updates every cached count (module attributes and the shared config). Shared experts
and dense layers are never touched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .arch import EXPERT_COUNT_KEYS, ArchSpec, config_get, find_moe_layers
from .errors import InputError
from .plans import PrunePlan

_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


def config_updates(config: Any, spec: ArchSpec, plan: PrunePlan) -> dict[str, Any]:
    """Config keys (hub-native names) that change when ``plan`` is applied."""
    present = (lambda k: k in config) if isinstance(config, dict) else (lambda k: hasattr(config, k))
    upd: dict[str, Any] = {spec.expert_count_key: plan.keep}
    upd.update({k: plan.keep for k in EXPERT_COUNT_KEYS if present(k)})
    upd["num_experts_per_tok"] = plan.top_k
    if present("experts_per_token"):  # GPT-OSS hub configs carry both
        upd["experts_per_token"] = plan.top_k
    if plan.group_policy == "flatten":
        upd.update(n_group=1, topk_group=1)
        if config_get(config, "topk_method") == "group_limited_greedy":
            upd["topk_method"] = "greedy"
    return upd


def _slice_dim0_(module: nn.Module, keep: torch.Tensor, num_experts: int) -> None:
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() and p.shape[0] == num_experts:
            setattr(module, name, nn.Parameter(p.data.index_select(0, keep.to(p.device)).clone(), requires_grad=p.requires_grad))
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() and b.shape[0] == num_experts:
            setattr(module, name, b.index_select(0, keep.to(b.device)).clone())


def apply_plan_(model: nn.Module, spec: ArchSpec, plan: PrunePlan) -> nn.Module:
    """Prune ``model`` in place to ``plan``; returns it.

    Raises:
        InputError: the plan was made for other MoE layers or another expert count.
    """
    layers = find_moe_layers(model, spec)
    if {m.index for m in layers} != set(plan.kept):
        raise InputError("the prune plan does not match the model's MoE layers; make it from this model's pattern store")
    for m in layers:
        E = plan.num_experts
        if m.router.weight.shape[0] != E:
            raise InputError(f"layer {m.index} has {m.router.weight.shape[0]} experts but the plan expects {E}")
        keep = torch.tensor(plan.kept[m.index], dtype=torch.long)
        for mod in (m.router, m.experts):
            _slice_dim0_(mod, keep, E)
        for mod in (m.block, m.router, m.experts):  # expert counts: updated model-wide below
            if isinstance(mod, nn.Linear):
                mod.out_features = len(keep)
            if isinstance(getattr(mod, "top_k", None), int):
                mod.top_k = plan.top_k
            if hasattr(mod, "num_group"):
                mod.num_group, mod.topk_group = plan.n_group, plan.topk_group
            if plan.n_group == 1 and getattr(mod, "topk_method", None) == "group_limited_greedy":
                mod.topk_method = "greedy"
    for mod in model.modules():  # every cached count: blocks, routers, experts, the causal LM's aux-loss `num_experts`
        for attr in _COUNT_ATTRS:
            if getattr(mod, attr, None) == plan.num_experts:
                setattr(mod, attr, plan.keep)
        if getattr(mod, "num_experts_per_tok", None) == plan.top_k_before:
            mod.num_experts_per_tok = plan.top_k
    for key, value in config_updates(model.config, spec, plan).items():
        setattr(model.config, key, value)
    return model
