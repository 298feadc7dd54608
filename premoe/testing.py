"""Tiny models of every supported family, for tests and benchmarks (nothing is downloaded).

``FAMILIES`` is the shared contract table: every entry goes through the same checks (routing
reproduction, calibration, pruning, export, reload, exactness). Router weights get a larger scale
than the default init so routing is decisive, as in trained models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tasks import char_tokenizer

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# name -> (model_type, config overrides, routing renormalises over the chosen experts?)
FAMILIES: dict[str, tuple[str, dict, bool]] = {
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2), True),
    "qwen2_moe": (
        "qwen2_moe",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
             mlp_only_layers=[1], norm_topk_prob=False),
        False,
    ),
    "qwen3_moe": (
        "qwen3_moe",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True),
        True,
    ),
    "deepseek_v2": (
        "deepseek_v2",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
             kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
             topk_method="greedy", n_shared_experts=1, num_key_value_heads=4),
        False,
    ),
    "deepseek_v3": (
        "deepseek_v3",
        dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1,
             n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1, norm_topk_prob=True, num_key_value_heads=4),
        True,
    ),
    "olmoe": ("olmoe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False), False),
    "gpt_oss": (
        "gpt_oss",
        dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16),
        True,
    ),
    "granitemoe": ("granitemoe", dict(num_local_experts=8, num_experts_per_tok=2), True),
}


def build_model(model_type: str, overrides: dict, seed: int = 0):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    tok = char_tokenizer()
    config = CONFIG_MAPPING[model_type](
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **{**COMMON, **overrides},
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    router_suffixes = (".mlp.gate.weight", ".mlp.router.weight", ".block_sparse_moe.router.weight")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(router_suffixes):
                p.normal_(0, 1.0)
            elif name.endswith("router.bias"):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model, tok


def save_model(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
