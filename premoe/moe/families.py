"""The adapter table: one :class:`~premoe.moe.arch.ArchSpec` row per transformers MoE implementation.

A checkpoint's ``model_type`` selects its row directly, or through the causal-LM class transformers
maps it to (``sarvam_moe`` runs ``Glm4MoeForCausalLM``, so it uses the ``glm4_moe`` row), or,
for a ``model_type`` transformers does not know (Kimi-K2's ``kimi_k2``), through the class named
in ``architectures`` (``DeepseekV3ForCausalLM``). To add a family, add a row (start from the
closest one) and a tiny config to :data:`premoe.testing.FAMILIES`; the contract tests in
``tests/contract/test_moe_family.py`` then check routing, calibration (in memory and streamed),
pruning, export, reload, selective loading and switching for it. :data:`UNSUPPORTED` says why the MoE
families left out cannot be pruned.
"""

from __future__ import annotations

from typing import Any

from premoe.core.modules import config_get
from premoe.errors import UnsupportedModelError
from premoe.moe.arch import ArchSpec, Routing

SCALE = ("routed_scaling_factor",)
RENORM = Routing("softmax", renormalize=True)
NORM_TOPK = Routing("softmax", renormalize="norm_topk_prob")
TOPK_SOFTMAX = Routing("logits", "softmax")
# DeepSeek-V3: sigmoid scores, a correction bias used only to choose, groups scored by their two best.
DSV3 = Routing(
    "sigmoid",
    renormalize="norm_topk_prob",
    eps=1e-20,
    bias="gate.e_score_correction_bias",
    group="top2sum",
    scale=SCALE,
)
SIGMOID_BLOCK_BIAS = Routing("sigmoid", renormalize=True, bias="e_score_correction_bias")


def _cohere2(config: Any) -> Routing:
    if config_get(config, "expert_selection_fn", "softmax") == "sigmoid":
        return Routing("logits", "sigmoid", renormalize="norm_topk_prob")
    return TOPK_SOFTMAX


def _dsv3_like(name: str, count: str = "n_routed_experts", **kw) -> ArchSpec:
    return ArchSpec(name, DSV3, count, shared=("shared_experts",), **kw)


_SPECS = [
    ArchSpec("mixtral", RENORM, "num_local_experts", notes="hub: `block_sparse_moe.experts.{e}.w1/w2/w3`"),
    ArchSpec("minimax", RENORM, "num_local_experts", notes="Mixtral routing; lightning-attention hybrid layers"),
    ArchSpec(
        "qwen2_moe",
        NORM_TOPK,
        "num_experts",
        shared=("shared_expert", "shared_expert_gate"),
        notes="shared expert + gate kept; `mlp_only_layers` dense",
    ),
    ArchSpec("qwen3_moe", NORM_TOPK, "num_experts"),
    ArchSpec(
        "qwen3_next",
        NORM_TOPK,
        "num_experts",
        shared=("shared_expert", "shared_expert_gate"),
        notes="hybrid Gated DeltaNet / attention layers; shared expert + gate kept",
    ),
    ArchSpec(
        "qwen3_5_moe_text",
        RENORM,
        "num_experts",
        shared=("shared_expert", "shared_expert_gate"),
        notes="hybrid linear / full attention layers; shared expert + gate kept",
    ),
    ArchSpec("mellum", NORM_TOPK, "num_local_experts"),
    ArchSpec("lara_mini", NORM_TOPK, "num_experts", shared=("shared_expert",)),
    ArchSpec("olmoe", NORM_TOPK, "num_experts"),
    ArchSpec("flex_olmo", NORM_TOPK, "num_experts"),
    ArchSpec(
        "deepseek_v2",
        Routing(
            "softmax", group="max", group_when=("topk_method", "group_limited_greedy"), group_fill=0.0, scale=SCALE
        ),
        "n_routed_experts",
        shared=("shared_experts",),
        notes="`greedy` or `group_limited_greedy`; never renormalised",
    ),
    _dsv3_like("deepseek_v3", notes="also Kimi-K2 (`kimi_k2`), Moonlight; correction bias sliced with the experts"),
    _dsv3_like("deepseek_v32", notes="DeepSeek-V3.2 (sparse attention); V3 routing"),
    _dsv3_like("dots1"),
    _dsv3_like("glm4_moe", notes="GLM-4.5/4.6/4.7; also `sarvam_moe`"),
    _dsv3_like("glm4_moe_lite"),
    _dsv3_like("glm_moe_dsa"),
    _dsv3_like("solar_open"),
    _dsv3_like("hy_v4"),
    _dsv3_like("axk1"),
    _dsv3_like("exaone_moe", "num_experts"),
    _dsv3_like("kimi_linear", "num_experts", notes="Kimi Delta Attention hybrid layers"),
    ArchSpec("mimo_v2_flash", DSV3, "n_routed_experts", notes="no shared experts"),
    ArchSpec(
        "nemotron_h",
        DSV3,
        "n_routed_experts",
        block=("mixer",),
        shared=("shared_experts",),
        pre_moe_norm="norm",
        notes="Mamba / attention / MoE hybrid; experts without a gate (`up_proj`)",
    ),
    ArchSpec(
        "beam",
        Routing(
            "sigmoid", renormalize="norm_topk_prob", eps=1e-20, bias="gate.e_score_correction_bias", group="top2sum"
        ),
        "num_experts",
        pre_moe_norm="pre_feedforward_layernorm",
        notes="routed output x routed_scaling_factor in the block",
    ),
    ArchSpec(
        "gpt_oss",
        TOPK_SOFTMAX,
        "num_local_experts",
        router="router",
        packed_transposed=True,
        notes="fused, transposed, interleaved gate/up; router bias and expert biases sliced; MXFP4 on the hub",
    ),
    ArchSpec(
        "granitemoe",
        TOPK_SOFTMAX,
        "num_local_experts",
        block=("block_sparse_moe",),
        router="router",
        notes="hub: fused `input_linear`/`output_linear`",
    ),
    ArchSpec(
        "granitemoeshared",
        TOPK_SOFTMAX,
        "num_local_experts",
        block=("block_sparse_moe",),
        router="router",
        shared=("shared_mlp",),
        notes="shared MLP kept",
    ),
    ArchSpec(
        "granitemoehybrid",
        TOPK_SOFTMAX,
        "num_local_experts",
        block=("block_sparse_moe",),
        router="router",
        notes="Mamba2 / attention hybrid",
    ),
    ArchSpec("granitemoe_swa", TOPK_SOFTMAX, "num_local_experts", block=("block_sparse_moe",), router="router"),
    ArchSpec(
        "aria_text",
        TOPK_SOFTMAX,
        "moe_num_experts",
        topk_key="moe_topk",
        router="router",
        shared=("shared_experts",),
        notes="experts stored transposed (`fc1`/`fc2` on the hub)",
    ),
    ArchSpec(
        "cohere2_moe",
        _cohere2,
        "num_experts",
        shared=("shared_experts",),
        pre_moe_norm="input_layernorm",
        notes="`expert_selection_fn` softmax or sigmoid",
    ),
    ArchSpec(
        "jamba",
        Routing("softmax"),
        "num_experts",
        block=("feed_forward",),
        router="router",
        pre_moe_norm="pre_ff_layernorm",
        notes="Mamba / attention hybrid; never renormalised",
    ),
    ArchSpec(
        "phimoe",
        Routing("logits", "sparsemixer"),
        "num_local_experts",
        router="router",
        notes="hub: `block_sparse_moe.gate`; sparsemixer weights",
    ),
    ArchSpec(
        "llama4_text",
        Routing("logits", "sigmoid", logits_at=1),
        "num_local_experts",
        block=("feed_forward",),
        router="router",
        shared=("shared_expert",),
        weight_on_input=True,
        notes="score multiplies the expert input; interleaved dense layers; experts transposed",
    ),
    ArchSpec("minimax_m2", SIGMOID_BLOCK_BIAS, "num_local_experts", notes="correction bias on the block"),
    ArchSpec(
        "hy_v3",
        Routing(
            "sigmoid", renormalize=True, eps=1e-20, bias="e_score_correction_bias", scale=("router_scaling_factor",)
        ),
        "num_experts",
        shared=("shared_experts",),
    ),
    ArchSpec(
        "laguna",
        Routing("sigmoid", renormalize=True, bias="gate.e_score_correction_bias"),
        "num_experts",
        shared=("shared_experts",),
        notes="logit soft-capping in the router",
    ),
    ArchSpec("flint", Routing("sigmoid", renormalize="norm_topk_prob"), "num_experts", shared=("shared_expert",)),
    ArchSpec(
        "kolibri1",
        Routing(
            "logits", "sigmoid", renormalize="norm_topk_prob", bias="gate.e_score_correction_bias", bias_on_logits=True
        ),
        "num_local_experts",
        shared=("shared_experts",),
    ),
    ArchSpec(
        "inkling2_text",
        Routing("sigmoid", renormalize=True, eps=1e-20, bias="gate.e_score_correction_bias", scale=SCALE),
        "n_routed_experts",
    ),
    ArchSpec(
        "ernie4_5_moe",
        Routing(
            "softmax", renormalize=True, renorm_min="moe_norm_min", bias="gate.moe_statics.e_score_correction_bias"
        ),
        "moe_num_experts",
        topk_key="moe_k",
        shared=("shared_experts",),
        notes="correction bias [1, E] in `moe_statics`",
    ),
    ArchSpec(
        "hunyuan_v1_moe", RENORM, "num_experts", topk_key="moe_topk", shared=("shared_mlp",), notes="router `gate.wg`"
    ),
    ArchSpec(
        "lfm2_moe",
        Routing("sigmoid", renormalize="norm_topk_prob", eps=1e-6, bias="expert_bias", scale=SCALE),
        "num_experts",
        block=("feed_forward",),
        pre_moe_norm="ffn_norm",
        notes="short-convolution / attention hybrid; expert bias on the block",
    ),
    ArchSpec(
        "longcat_flash",
        Routing("softmax", bias="router.e_score_correction_bias", scale=SCALE),
        "n_routed_experts",
        topk_key="moe_topk",
        router="router",
        extra_slots="zero_expert_num",
        pre_moe_norm="post_attention_layernorm.0",
        layers_key="num_layers",
        notes="zero-computation experts always kept; two attention + dense MLP sublayers per layer",
    ),
    ArchSpec(
        "afmoe",
        Routing("sigmoid", renormalize=True, eps=1e-20, bias="expert_bias", scale=("route_scale",)),
        "num_experts",
        router="router",
        shared=("shared_experts",),
        notes="expert bias on the block",
    ),
    ArchSpec(
        "dbrx",
        Routing("softmax", renorm_p="ffn_config.moe_normalize_expert_weights"),
        "ffn_config.moe_num_experts",
        topk_key="ffn_config.moe_top_k",
        block=("ffn",),
        router="router",
        pre_moe_norm="norm_attn_norm.norm_2",
        layers_key="n_layers",
        notes="experts as [E x I, H] row blocks (`w1`, `v1`, `w2`)",
    ),
]
ARCH_SPECS: dict[str, ArchSpec] = {s.name: s for s in _SPECS}

# MoE families transformers ships that premoe cannot prune, and why (the error says so).
UNSUPPORTED: dict[str, str] = {
    "jetmoe": "its attention experts (mixture of attention heads) share `num_local_experts` and `num_experts_per_tok` "
    "with the MLP experts, so no config can describe a checkpoint with fewer MLP experts alone",
    "zaya": "its router is an MLP whose state is carried from layer to layer, so experts cannot be scored or sliced "
    "layer by layer",
    "deepseek_v4": "its first layers route by a hash of the token id, not by learned scores",
    "inkling_text": "its router scores shared experts together with routed ones in one softmax",
    "doge": "its experts are product-key retrieval tables, not a top-k routed FFN",
    "switch_transformers": "it is an encoder-decoder model; premoe prunes causal LMs",
    "nllb-moe": "it is an encoder-decoder model; premoe prunes causal LMs",
}


def _causal_lm_classes() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _rows_by_class(classes: dict[str, str]) -> dict[str, str]:
    """{causal-LM class name: the row's name} for every row transformers has a causal LM for."""
    return {classes[name]: name for name in ARCH_SPECS if name in classes}


def supported_model_types() -> list[str]:
    """Every ``model_type`` with a row, directly or through the causal-LM class it maps to."""
    classes = _causal_lm_classes()
    by_class = _rows_by_class(classes)
    return sorted({*ARCH_SPECS, *(mt for mt, cls in classes.items() if cls in by_class)})


def resolve(raw_config: dict[str, Any]) -> tuple[ArchSpec, str, str | None]:
    """The row for a ``config.json``, the ``model_type`` whose config class reads it, and the key of the
    nested text config when the checkpoint wraps its language model (a multimodal release such as
    Llama-4, Qwen3.5-MoE or Kimi-K2.5: only the text decoder's experts are pruned, everything else is
    kept as it is).

    Raises:
        UnsupportedModelError: not a supported MoE family; the message lists those that are, or
            says why a known MoE family cannot be pruned.
    """
    model_type = raw_config.get("model_type")
    text = raw_config.get("text_config")
    if isinstance(text, dict) and text.get("model_type") and text.get("model_type") != model_type:
        try:
            spec, config_type, _ = resolve(text)
            return spec, config_type, "text_config"
        except UnsupportedModelError:
            pass
    if model_type in ARCH_SPECS:
        return ARCH_SPECS[model_type], model_type, None
    classes = _causal_lm_classes()
    by_class = _rows_by_class(classes)
    if model_type in classes and classes[model_type] in by_class:
        return ARCH_SPECS[by_class[classes[model_type]]], model_type, None
    if model_type not in classes:  # a model_type transformers does not know: trust its architectures
        for arch in raw_config.get("architectures") or []:
            if arch in by_class:
                return ARCH_SPECS[by_class[arch]], by_class[arch], None
    if model_type in UNSUPPORTED:
        raise UnsupportedModelError(f"{model_type} is an MoE family premoe cannot prune: {UNSUPPORTED[model_type]}")
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: premoe supports MoE families "
        f"{', '.join(supported_model_types())} (add a row to premoe/moe/families.py to extend it)"
    )
