"""The dense adapter table: one :class:`DenseSpec` row per transformers dense decoder family.

A row says where a decoder layer's attention projections and gated FFN live and which config keys
hold their sizes; every family whose layers look like Llama's (``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``, one head count and one intermediate size for all layers) is a row.
Nothing elsewhere branches on a family's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from premoe.errors import UnsupportedModelError


@dataclass(frozen=True)
class DenseSpec:
    """How one dense family is laid out.

    Attributes:
        name: the transformers ``model_type``.
        attn_bias_key: config flag that gives q/k/v/o biases (bias compensation of ``o_proj`` is
            written there); ``None``: the family cannot hold an ``o_proj`` bias.
        mlp_bias_key: config flag that gives gate/up/down biases (compensation of ``down_proj``).
        notes: what the README says about the family.
    """

    name: str
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    heads_key: str = "num_attention_heads"
    kv_key: str = "num_key_value_heads"
    inter_key: str = "intermediate_size"
    attn_bias_key: str | None = None
    mlp_bias_key: str | None = None
    notes: str = ""


DENSE_SPECS: dict[str, DenseSpec] = {
    s.name: s
    for s in [
        DenseSpec(
            "llama", attn_bias_key="attention_bias", mlp_bias_key="mlp_bias", notes="Llama 2/3, TinyLlama, SmolLM"
        ),
        DenseSpec("mistral", notes="Mistral 7B, Ministral"),
        DenseSpec("qwen2", notes="Qwen2/2.5: q/k/v biases are sliced with their heads"),
        DenseSpec("qwen3", notes="Qwen3 dense: per-head q/k norms are shared by every head"),
        DenseSpec("gemma", attn_bias_key="attention_bias", notes="explicit head_dim"),
        DenseSpec("gemma2", attn_bias_key="attention_bias", notes="soft-capping and sliding layers"),
        DenseSpec("gemma3_text", attn_bias_key="attention_bias", notes="Gemma 3 text decoder"),
        DenseSpec("olmo2", attn_bias_key="attention_bias", notes="q/k norms over all heads are sliced with them"),
        DenseSpec("granite", attn_bias_key="attention_bias", mlp_bias_key="mlp_bias"),
        DenseSpec("smollm3", attn_bias_key="attention_bias", mlp_bias_key="mlp_bias"),
    ]
}

UNSUPPORTED: dict[str, str] = {
    "phi3": "its q/k/v and gate/up projections are fused into one tensor each (qkv_proj, gate_up_proj)",
    "gpt2": "fused c_attn projections and no gated FFN",
    "gpt_neox": "fused query_key_value projections",
    "falcon": "fused query_key_value projections",
}


def resolve_dense(raw_config: dict[str, Any]) -> DenseSpec:
    """The row for a dense ``config.json``.

    Raises:
        UnsupportedModelError: not a dense family premoe knows (the message lists those it does).
    """
    model_type = raw_config.get("model_type")
    if model_type in DENSE_SPECS:
        return DENSE_SPECS[model_type]
    if model_type in UNSUPPORTED:
        raise UnsupportedModelError(f"{model_type} is a dense family premoe cannot prune: {UNSUPPORTED[model_type]}")
    raise UnsupportedModelError(
        f"unsupported dense architecture {model_type!r}: premoe supports {', '.join(sorted(DENSE_SPECS))} "
        "(add a row to premoe/dense/families.py to extend it)"
    )
