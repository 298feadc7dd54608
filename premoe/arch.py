"""Architecture adapters: one declarative table keyed by ``config.model_type``.

Every family premoe supports is one :class:`ArchSpec` row: where the MoE block, router and
experts live (in memory and on disk), how the router turns logits into routing weights, and which
config key holds the routed-expert count on the hub. Nothing else in the package branches on the
family name. To add a family, add a row (or an alias) and a tiny config to
``tests/conftest.py::FAMILIES``; the shared contract tests then check routing, calibration,
pruning, export and reload for it.

Layouts follow transformers 5.x (fused 3D experts: ``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]; GPT-OSS transposed and interleaved, with biases).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModelError

# Config keys that may hold the routed-expert count, in any family (aliases included).
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers MoE family is laid out and routes.

    Attributes:
        model_type: ``config.model_type``.
        expert_count_key: the hub-native config key for the routed-expert count (written on export).
        router_kind: ``"softmax"`` (softmax over all experts, then top-k), ``"sigmoid"`` (independent
            sigmoid scores, DeepSeek-V3) or ``"topk_softmax"`` (top-k on raw logits, then softmax over
            the k chosen: GPT-OSS, Granite).
        renormalize: whether the top-k weights are renormalised to sum to one; a string names the
            config key that decides it (``norm_topk_prob``).
        block_attr / router_attr / experts_attr: attribute names in memory (decoder layer -> MoE
            block -> router, experts).
        disk_blocks: names the MoE block has in checkpoints (Mixtral's hub name differs from v5).
        disk_router: regex, relative to the block, of the router module in checkpoints.
        disk_fused: regex, relative to the block, of fused expert tensors stored outside ``experts.``.
        group_score: group-limited routing: ``"max"`` (DeepSeek-V2 ``group_limited_greedy``) or
            ``"top2sum"`` (DeepSeek-V3); ``None`` when the family has none.
        selection_bias: name of a router buffer added to the scores only to choose experts.
        scaling_key: config key of a constant multiplier on the routing weights.
        shared: names of shared-expert submodules of the block (never pruned; listed for docs).
        pre_moe_norm: the decoder layer's norm just before the MoE block (its input is the residual
            stream EASY-EP compares with the routed output).
        expert_parts: for each fused in-memory expert parameter, the checkpoint tensors (relative
            to ``experts.{e}.`` for per-expert layouts, or to the block for fused ones) whose rows
            it concatenates on dim 0 (gate then up). Fused checkpoint tensors named like the
            in-memory parameter (GPT-OSS, v5-native saves) are found without an entry.
    """

    model_type: str
    expert_count_key: str
    router_kind: str
    renormalize: bool | str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    disk_blocks: tuple[str, ...] = ("mlp",)
    disk_router: str = r"gate"
    disk_fused: str | None = None
    group_score: str | None = None
    selection_bias: str | None = None
    scaling_key: str | None = None
    shared: tuple[str, ...] = ()
    pre_moe_norm: str = "post_attention_layernorm"
    expert_parts: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("gate_up_proj", ("gate_proj.weight", "up_proj.weight")),
        ("down_proj", ("down_proj.weight",)),
    )


_SPECS = [
    ArchSpec(
        "mixtral", "num_local_experts", "softmax", True, disk_blocks=("block_sparse_moe", "mlp"),
        expert_parts=(("gate_up_proj", ("w1.weight", "w3.weight")), ("down_proj", ("w2.weight",))),
    ),
    ArchSpec("qwen2_moe", "num_experts", "softmax", "norm_topk_prob", shared=("shared_expert", "shared_expert_gate")),
    ArchSpec("qwen3_moe", "num_experts", "softmax", "norm_topk_prob"),
    ArchSpec("olmoe", "num_experts", "softmax", "norm_topk_prob"),
    ArchSpec(
        "deepseek_v2", "n_routed_experts", "softmax", False,
        group_score="max", scaling_key="routed_scaling_factor", shared=("shared_experts",),
    ),
    ArchSpec(
        "deepseek_v3", "n_routed_experts", "sigmoid", "norm_topk_prob",
        group_score="top2sum", selection_bias="e_score_correction_bias",
        scaling_key="routed_scaling_factor", shared=("shared_experts",),
    ),
    ArchSpec("gpt_oss", "num_local_experts", "topk_softmax", True, router_attr="router", disk_router=r"router"),
    ArchSpec(
        "granitemoe", "num_local_experts", "topk_softmax", True,
        block_attr="block_sparse_moe", router_attr="router", disk_blocks=("block_sparse_moe",),
        disk_router=r"router(?:\.layer)?", disk_fused=r"(?:input_linear|output_linear)\.weight",
        expert_parts=(("gate_up_proj", ("input_linear.weight",)), ("down_proj", ("output_linear.weight",))),
    ),
]
ARCH_SPECS: dict[str, ArchSpec] = {s.model_type: s for s in _SPECS}
# Families whose MoE block is identical to a row above (checked by the contract tests).
ALIASES: dict[str, str] = {"granitemoeshared": "granitemoe"}


def supported_model_types() -> list[str]:
    return sorted([*ARCH_SPECS, *ALIASES])


def get_spec(model_type: str | None) -> ArchSpec:
    """The adapter row for ``model_type``.

    Raises:
        UnsupportedModelError: the family is not in the table; the message lists those that are.
    """
    name = ALIASES.get(model_type or "", model_type or "")
    if name not in ARCH_SPECS:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}: premoe supports MoE families "
            f"{', '.join(supported_model_types())} (add a row to premoe/arch.py::ARCH_SPECS to extend it)"
        )
    return ARCH_SPECS[name]


@dataclass(frozen=True)
class RouterSpec:
    """Routing semantics of one model: everything :func:`premoe.routing.route` needs."""

    kind: str
    num_experts: int
    top_k: int
    renormalize: bool
    n_group: int = 1
    topk_group: int = 1
    group_score: str | None = None
    scale: float = 1.0

    @property
    def group_limited(self) -> bool:
        return self.group_score is not None and self.n_group > 1 and self.topk_group < self.n_group


def config_get(config: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a transformers config object or a plain ``config.json`` dict."""
    if isinstance(config, dict):
        return config.get(key, default)
    value = getattr(config, key, default)
    return default if value is None else value


def num_experts_of(config: Any, spec: ArchSpec) -> int:
    for key in (spec.expert_count_key, *EXPERT_COUNT_KEYS):
        value = config_get(config, key)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(
        f"config of model_type {spec.model_type!r} has no routed-expert count "
        f"(looked for {', '.join(EXPERT_COUNT_KEYS)}); is this a dense checkpoint?"
    )


def router_spec(config: Any, spec: ArchSpec) -> RouterSpec:
    """Routing semantics from a config (object or dict) and its adapter row."""
    renorm = spec.renormalize
    if isinstance(renorm, str):
        renorm = bool(config_get(config, renorm, False))
    top_k = config_get(config, "num_experts_per_tok")
    if not isinstance(top_k, int) or top_k < 1:
        raise UnsupportedModelError(f"config of model_type {spec.model_type!r} has no valid num_experts_per_tok")
    n_group = topk_group = 1
    group_score = None
    if spec.group_score == "max" and config_get(config, "topk_method", "greedy") == "group_limited_greedy":
        group_score = "max"
    elif spec.group_score == "top2sum":
        group_score = "top2sum"
    if group_score:
        n_group = int(config_get(config, "n_group", 1) or 1)
        topk_group = int(config_get(config, "topk_group", n_group) or n_group)
    scale = float(config_get(config, spec.scaling_key, 1.0)) if spec.scaling_key else 1.0
    return RouterSpec(
        kind=spec.router_kind,
        num_experts=num_experts_of(config, spec),
        top_k=top_k,
        renormalize=bool(renorm),
        n_group=n_group,
        topk_group=topk_group,
        group_score=group_score,
        scale=scale,
    )


@dataclass
class MoeLayer:
    """One MoE block of a live model. ``index`` is the decoder-layer index."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (the shortest ``*.layers`` ModuleList)."""
    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and (name == "layers" or name.endswith(".layers"))
    ]
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no decoder `layers` list")
    return min(found, key=lambda item: item[0].count("."))[1]


def find_moe_layers(model: nn.Module, spec: ArchSpec) -> list[MoeLayer]:
    """MoE blocks in decoder order; dense layers (DeepSeek's first layers, Qwen ``mlp_only_layers``) are skipped."""
    out = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, spec.block_attr, None)
        router = getattr(block, spec.router_attr, None) if block is not None else None
        experts = getattr(block, spec.experts_attr, None) if block is not None else None
        if router is not None and experts is not None:
            out.append(MoeLayer(i, block, router, experts))
    if not out:
        raise UnsupportedModelError(
            f"no MoE blocks found in {type(model).__name__} (expected `{spec.block_attr}.{spec.router_attr}` "
            f"and `{spec.block_attr}.{spec.experts_attr}` on decoder layers)"
        )
    return out


def selection_bias(router: nn.Module, spec: ArchSpec) -> torch.Tensor | None:
    return getattr(router, spec.selection_bias) if spec.selection_bias else None


def disk_patterns(spec: ArchSpec) -> dict[str, re.Pattern]:
    """Regexes that classify checkpoint keys of MoE blocks (see :mod:`premoe.checkpoint`)."""
    blocks = "|".join(re.escape(b) for b in spec.disk_blocks)
    head = rf"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:{blocks}))\."
    pats = {
        "expert": re.compile(head + r"experts\.(?P<expert>\d+)\.(?P<rest>.+)$"),
        "fused": re.compile(head + r"experts\.(?P<rest>[A-Za-z_][\w.]*)$"),
        "router": re.compile(head + rf"(?P<rest>(?:{spec.disk_router})\.(?:weight|bias|e_score_correction_bias))$"),
    }
    if spec.disk_fused:
        pats["fused_extra"] = re.compile(head + rf"(?P<rest>{spec.disk_fused})$")
    return pats
