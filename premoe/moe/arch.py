"""What a transformers MoE family is, as data: routing rules, config keys, where the MoE block lives.

A family is one :class:`ArchSpec` row in :mod:`premoe.moe.families`. This module holds the row types,
resolves a row and a model config into the concrete :class:`RouterSpec` that
:func:`premoe.moe.routing.route` follows, and finds the MoE blocks of a live (or meta-device) model:
for each, its router, the tensors that are indexed by expert (router rows, selection biases,
expert weights) and along which dimension. Nothing here branches on a family's name.

Layouts follow transformers 5.x. Expert weights are whatever tensors of the experts module have
the experts on dim 0: fused ``gate_up_proj`` [E, 2I, H] / ``down_proj`` [E, H, I] in most
families, transposed in GPT-OSS, Llama-4 and Aria, ``up_proj`` without a gate in Nemotron-H, and
[E * I, H] row blocks in DBRX. Router tensors are found the same way: every tensor of the router
(and selection biases the block keeps for it) with a dimension of the expert count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from premoe.core.modules import config_get, decoder_layers, owner
from premoe.errors import UnsupportedModelError

# Config keys that may hold the routed-expert count, in any family (aliases included).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class Routing:
    """A family's routing rule (see :func:`premoe.moe.routing.route`).

    Attributes:
        score: what experts are scored by before top-k: ``softmax`` over all experts, ``sigmoid``
            per expert, or ``logits`` (top-k on the raw logits).
        weights: the weight of each chosen expert: ``probs`` (its score), ``softmax`` (softmax over
            the chosen logits), ``sigmoid`` (sigmoid of its logit) or ``sparsemixer`` (Phi-3.5).
        renormalize: divide the chosen weights by their sum; a string names the config key that
            decides (``norm_topk_prob``).
        eps: added to that sum; ``renorm_min``: config key of a floor on it (ERNIE).
        renorm_p: config key of a p-norm to divide by instead (DBRX ``moe_normalize_expert_weights``).
        bias: selection-only bias, as a path relative to the MoE block (DeepSeek-V3's
            ``gate.e_score_correction_bias``; MiniMax-M2 keeps it on the block itself); added to the
            scores, or to the raw logits with ``bias_on_logits``.
        group: group-limited routing: ``max`` (DeepSeek-V2) or ``top2sum`` (DeepSeek-V3) group scores;
            ``group_when`` = (config key, value) that switches it on; ``group_fill`` masks the other groups.
        scale: config key(s) of a constant factor on the weights (first present wins).
        logits_at: position of the logits in the router module's output (a bare tensor: 0).
    """

    score: str = "softmax"
    weights: str = "probs"
    renormalize: bool | str = False
    eps: float = 0.0
    renorm_min: str | None = None
    renorm_p: str | None = None
    bias: str | None = None
    bias_on_logits: bool = False
    group: str | None = None
    group_when: tuple[str, str] | None = None
    group_fill: float = float("-inf")
    scale: tuple[str, ...] = ()
    logits_at: int = 0

    def describe(self) -> str:
        """One line for the README's family table."""
        pre = {"softmax": "softmax", "sigmoid": "sigmoid", "logits": "raw logits"}[self.score]
        parts = [pre]
        if self.bias:
            parts.append("+ selection bias" + (" on logits" if self.bias_on_logits else ""))
        if self.group:
            parts.append(f"group-limited ({'max' if self.group == 'max' else 'top-2 sum'})")
        parts.append("top-k")
        w = {
            "probs": "",
            "softmax": ", softmax over chosen",
            "sigmoid": ", sigmoid of chosen",
            "sparsemixer": ", sparsemixer (top-2, masked softmaxes)",
        }[self.weights]
        out = " ".join(parts) + w
        if self.renorm_p:
            out += f", divided by their {self.renorm_p} p-norm"
        elif self.renormalize is True:
            out += ", renormalised"
        elif self.renormalize:
            out += f", renormalised if {self.renormalize}"
        if self.scale:
            out += f", x {self.scale[0]}"
        return out


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers MoE implementation is laid out and routes.

    Attributes:
        name: the transformers implementation (``models/<name>/modeling_<name>.py``); every
            ``model_type`` whose causal LM is that implementation's uses this row.
        routing: the routing rule, or a function of the config returning one (Cohere2-MoE's
            ``expert_selection_fn``).
        count_key: config key of the routed-expert count as hub checkpoints spell it (written on
            export); dotted for nested configs (DBRX ``ffn_config.moe_num_experts``).
        topk_key: config key of experts per token.
        block: attribute(s) of the MoE block on a decoder layer (the first present is used).
        router: attribute of the router on the block.
        experts: attribute of the experts module on the block (``None``: expert tensors live on the
            block itself, listed in ``expert_params``).
        expert_params: expert tensors relative to the block (default: every parameter of ``experts``).
        extra_slots: config key of zero-computation experts the router can choose besides the routed
            ones (LongCat-Flash); they cost nothing, so they are always kept.
        pre_moe_norm: the decoder layer's norm just before the MoE block (EASY-EP compares the routed
            output with the residual entering it); ``None``: the block input is used.
        weight_on_input: the routing weight scales the expert's input, not its output (Llama-4).
        packed_transposed: fused experts are held [E, in, out] in memory while quantised checkpoints pack
            them [E, out, in] along the input dimension (GPT-OSS's MXFP4 release).
        layers_key: config key of the number of decoder layers (LongCat-Flash: ``num_layers``).
        shared: names of shared-expert submodules (never pruned; for documentation).
        notes: what the README says about the family.
    """

    name: str
    routing: Routing | Callable[[Any], Routing]
    count_key: str
    topk_key: str = "num_experts_per_tok"
    block: tuple[str, ...] = ("mlp",)
    router: str = "gate"
    experts: str | None = "experts"
    expert_params: tuple[str, ...] = ()
    extra_slots: str | None = None
    pre_moe_norm: str | None = "post_attention_layernorm"
    weight_on_input: bool = False
    packed_transposed: bool = False
    layers_key: str = "num_hidden_layers"
    shared: tuple[str, ...] = ()
    notes: str = ""

    def routing_for(self, config: Any) -> Routing:
        return self.routing(config) if callable(self.routing) else self.routing


@dataclass(frozen=True)
class RouterSpec:
    """Routing semantics of one model (a family's rule with its config's values filled in)."""

    score: str
    num_experts: int
    top_k: int
    weights: str = "probs"
    renormalize: bool = False
    eps: float = 0.0
    renorm_min: float | None = None
    renorm_p: float | None = None
    bias_on_logits: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: str | None = None
    group_fill: float = float("-inf")
    scale: float = 1.0
    slots: int = 0  # router outputs: routed experts plus zero-computation experts (0: none extra)
    jitter: float = 0.0  # sparsemixer's relative margin
    logits_at: int = 0  # position of the logits in the router module's output

    @property
    def group_limited(self) -> bool:
        return self.group_score is not None and self.n_group > 1 and self.topk_group < self.n_group

    @property
    def width(self) -> int:
        """Number of router outputs (experts plus zero-computation experts)."""
        return self.slots or self.num_experts

    @property
    def kind(self) -> str:
        """Short label of the rule (logs and docs)."""
        return self.score if self.weights == "probs" else f"{self.score}/{self.weights}"


def _int_key(config: Any, key: str, what: str, spec: ArchSpec) -> int:
    value = config_get(config, key)
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        value = value[0]  # a per-layer list that is uniform
    if isinstance(value, (list, tuple)):
        raise UnsupportedModelError(
            f"config key {key!r} of {spec.name} lists different {what} per layer ({value}); premoe's pattern "
            "stores and exports assume one count for every layer, as vLLM and transformers load"
        )
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UnsupportedModelError(
            f"config of {spec.name} has no valid {what} ({key!r} = {value!r}); is it a dense checkpoint?"
        )
    return value


def num_experts_of(config: Any, spec: ArchSpec) -> int:
    if config_get(config, spec.count_key) is None:
        for key in EXPERT_COUNT_KEYS:
            if isinstance(config_get(config, key), int):
                return _int_key(config, key, "routed-expert count", spec)
    return _int_key(config, spec.count_key, "routed-expert count", spec)


def router_spec(config: Any, spec: ArchSpec) -> RouterSpec:
    """Routing semantics from a config (object or dict) and its adapter row."""
    rule = spec.routing_for(config)
    renorm = rule.renormalize
    if isinstance(renorm, str):
        renorm = bool(config_get(config, renorm, False))
    num = num_experts_of(config, spec)
    top_k = _int_key(config, spec.topk_key, "experts per token", spec)
    n_group = topk_group = 1
    group = None
    if rule.group and (rule.group_when is None or config_get(config, rule.group_when[0]) == rule.group_when[1]):
        group = rule.group
        n_group = int(config_get(config, "n_group", 1) or 1)
        topk_group = int(config_get(config, "topk_group", n_group) or n_group)
    scale = 1.0
    for key in rule.scale:
        if config_get(config, key) is not None:
            scale = float(config_get(config, key))
            break
    renorm_p = config_get(config, rule.renorm_p) if rule.renorm_p else None
    return RouterSpec(
        score=rule.score,
        weights=rule.weights,
        num_experts=num,
        top_k=top_k,
        renormalize=bool(renorm),
        eps=rule.eps,
        renorm_min=float(config_get(config, rule.renorm_min))
        if rule.renorm_min and config_get(config, rule.renorm_min) is not None
        else None,
        renorm_p=float(renorm_p) if renorm_p is not None else None,
        bias_on_logits=rule.bias_on_logits,
        n_group=n_group,
        topk_group=topk_group,
        group_score=group,
        group_fill=rule.group_fill,
        scale=scale,
        slots=num + int(config_get(config, spec.extra_slots, 0) or 0) if spec.extra_slots else 0,
        jitter=float(config_get(config, "router_jitter_noise", 0.0) or 0.0) if rule.weights == "sparsemixer" else 0.0,
        logits_at=rule.logits_at,
    )


# ---------------------------------------------------------------------------------------------
# MoE blocks of a live (or meta-device) model


@dataclass
class MoeLayer:
    """One MoE block of a model. ``index`` is the decoder-layer index; tensor paths are relative to
    ``block`` and map to the dimension that indexes experts (router) or to the rows per expert on
    dim 0 (expert weights; 1 for [E, ...] tensors, I for DBRX's [E * I, H])."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module | None
    router_tensors: dict[str, int] = field(default_factory=dict)
    expert_tensors: dict[str, int] = field(default_factory=dict)
    bias_path: str | None = None

    def tensor(self, path: str) -> torch.Tensor:
        mod, leaf = owner(self.block, path)
        return getattr(mod, leaf)

    def selection_bias(self) -> torch.Tensor | None:
        if self.bias_path is None:
            return None
        bias = self.tensor(self.bias_path)
        return bias.reshape(-1) if bias is not None else None


def _own_tensors(module: nn.Module, prefix: str = ""):
    """(path, tensor) of a module's persistent parameters and buffers, recursively, and of the expert tensors it
    holds as stored (:class:`premoe.moe.held.HeldExperts`)."""
    from premoe.moe.held import HeldExperts

    for name, mod in module.named_modules(prefix=prefix.rstrip(".")):
        skip = getattr(mod, "_non_persistent_buffers_set", set())
        held = [(n, v) for n, v in vars(mod).items() if isinstance(v, HeldExperts)]
        for leaf, t in [*mod._parameters.items(), *((n, b) for n, b in mod._buffers.items() if n not in skip), *held]:
            if t is not None:
                yield (f"{name}.{leaf}" if name else leaf), t


def _expert_dim(shape: torch.Size, width: int) -> int | None:
    if not shape:
        return None
    if shape[0] == width:
        return 0
    dims = [d for d, n in enumerate(shape) if n == width]
    return dims[0] if len(dims) == 1 else None


def moe_layer(
    index: int, layer: nn.Module, spec: ArchSpec, num_experts: int, width: int, bias: str | None = None
) -> MoeLayer | None:
    """The MoE block of decoder layer ``layer`` (``None`` for a dense layer)."""
    block = next((getattr(layer, b) for b in spec.block if getattr(layer, b, None) is not None), None)
    router = getattr(block, spec.router, None) if block is not None else None
    experts = getattr(block, spec.experts, None) if block is not None and spec.experts else None
    if router is None or (spec.experts and experts is None):
        return None
    m = MoeLayer(index, block, router, experts)
    if spec.expert_params:
        paths = [(p, m.tensor(p)) for p in spec.expert_params]
    else:
        paths = list(_own_tensors(experts, spec.experts + "."))
    for path, t in paths:
        if t.dim() and t.shape[0] in (num_experts, width):
            m.expert_tensors[path] = 1 if t.shape[0] == num_experts else 0  # 0: one row per router slot
        elif t.dim() and t.shape[0] % num_experts == 0:
            m.expert_tensors[path] = t.shape[0] // num_experts
    candidates = list(_own_tensors(router, spec.router + "."))
    candidates += [
        (n, t)
        for n, t in [*block._parameters.items(), *block._buffers.items()]
        if t is not None and n not in block._non_persistent_buffers_set
    ]
    for path, t in candidates:
        dim = _expert_dim(t.shape, width)
        if dim is not None:
            m.router_tensors[path] = dim
    if bias is not None and bias in m.router_tensors:
        m.bias_path = bias
    if not m.router_tensors or (
        not m.expert_tensors and experts is not None and any(True for _ in experts.parameters())
    ):
        return None
    return m


def find_moe_layers(model: nn.Module, spec: ArchSpec) -> list[MoeLayer]:
    """MoE blocks in decoder order; dense layers (DeepSeek's first layers, Qwen ``mlp_only_layers``,
    Llama-4's interleaved dense layers, hybrid models' mixer layers) are skipped. Expert counts come
    from the model's config (a pruned model's config holds its pruned count)."""
    cfg = model.config
    rspec = router_spec(cfg, spec)
    bias = spec.routing_for(cfg).bias
    out = [
        m
        for i, layer in enumerate(decoder_layers(model))
        if (m := moe_layer(i, layer, spec, rspec.num_experts, rspec.width, bias)) is not None
    ]
    if not out:
        raise UnsupportedModelError(
            f"no MoE blocks found in {type(model).__name__} (expected `{'|'.join(spec.block)}.{spec.router}` with "
            f"expert tensors on decoder layers)"
        )
    return out
