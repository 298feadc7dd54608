"""The tiny configs of the family contract: one row per supported MoE family (``FAMILIES``: model_type,
config overrides, and whether pruning to a superset of the routed experts is exact) and per dense
family (``DENSE_FAMILIES``). Router weights get a larger scale than the default init when built
(:mod:`premoe.testing.builders`) so routing is decisive, as in trained models."""

from __future__ import annotations

from premoe.core.tasks import char_tokenizer

COMMON = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

# name -> (model_type, config overrides, is pruning to a superset of the routed experts exact?). Not exact:
# softmax over all experts without renormalising over the chosen ones, where dropping experts shrinks the
# denominator (see the README's exactness contract).
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)
E8 = dict(num_experts_per_tok=2, moe_intermediate_size=16)
DSV3 = dict(
    n_routed_experts=8,
    **E8,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    n_shared_experts=1,
    norm_topk_prob=True,
    **MLA,
)
FAMILIES: dict[str, tuple[str, dict, bool]] = {
    "mixtral": ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2), True),
    "minimax": (
        "minimax",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        True,
    ),
    "qwen2_moe": (
        "qwen2_moe",
        dict(num_experts=8, **E8, shared_expert_intermediate_size=24, mlp_only_layers=[1], norm_topk_prob=False),
        False,
    ),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, **E8, head_dim=8, norm_topk_prob=True), True),
    "qwen3_next": (
        "qwen3_next",
        dict(
            num_experts=8,
            **E8,
            head_dim=8,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        True,
    ),
    "qwen3_5_moe_text": (
        "qwen3_5_moe_text",
        dict(
            num_experts=8,
            **E8,
            head_dim=8,
            shared_expert_intermediate_size=24,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
        ),
        True,
    ),
    "mellum": ("mellum", dict(num_local_experts=8, **E8, norm_topk_prob=True), True),
    "lara_mini": (
        "lara_mini",
        dict(num_experts=8, **E8, shared_expert_intermediate_size=24, norm_topk_prob=True),
        True,
    ),
    "olmoe": ("olmoe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False), False),
    "flex_olmo": ("flex_olmo", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True), True),
    "deepseek_v2": (
        "deepseek_v2",
        dict(
            n_routed_experts=8,
            **E8,
            first_k_dense_replace=1,
            topk_method="greedy",
            n_shared_experts=1,
            **{**MLA, "q_lora_rank": None},
        ),
        False,
    ),
    "deepseek_v3": ("deepseek_v3", DSV3, True),
    "deepseek_v32": (
        "deepseek_v32",
        dict(DSV3, n_group=1, topk_group=1, index_n_heads=2, index_head_dim=16, index_topk=8),
        True,
    ),
    "dots1": (
        "dots1",
        dict(
            n_routed_experts=8,
            **E8,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            norm_topk_prob=True,
            head_dim=8,
        ),
        True,
    ),
    "glm4_moe": (
        "glm4_moe",
        dict(
            n_routed_experts=8,
            **E8,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            norm_topk_prob=True,
            head_dim=8,
        ),
        True,
    ),
    "glm4_moe_lite": ("glm4_moe_lite", dict(DSV3, first_k_dense_replace=1), True),
    "glm_moe_dsa": (
        "glm_moe_dsa",
        dict(DSV3, n_group=1, topk_group=1, index_n_heads=2, index_head_dim=16, index_topk=8),
        True,
    ),
    "solar_open": (
        "solar_open",
        dict(n_routed_experts=8, **E8, n_group=1, topk_group=1, n_shared_experts=1, head_dim=8),
        True,
    ),
    "hy_v4": (
        "hy_v4",
        dict(
            n_routed_experts=8, **E8, first_k_dense_replace=1, n_group=2, topk_group=1, n_shared_experts=1, head_dim=8
        ),
        True,
    ),
    "axk1": ("axk1", DSV3, True),
    "exaone_moe": (
        "exaone_moe",
        dict(num_experts=8, **E8, first_k_dense_replace=1, n_group=2, topk_group=1, num_shared_experts=1, head_dim=8),
        True,
    ),
    "kimi_linear": (
        "kimi_linear",
        dict(
            num_experts=8,
            **E8,
            first_k_dense_replace=1,
            num_shared_experts=1,
            moe_renormalize=True,
            linear_head_dim=8,
            linear_num_heads=4,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            **MLA,
        ),
        True,
    ),
    "mimo_v2_flash": (
        "mimo_v2_flash",
        dict(n_routed_experts=8, **E8, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8),
        True,
    ),
    "nemotron_h": (
        "nemotron_h",
        dict(
            n_routed_experts=8,
            **E8,
            n_group=1,
            topk_group=1,
            n_shared_experts=1,
            moe_shared_expert_intermediate_size=24,
            head_dim=8,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=8,
            n_groups=1,
            chunk_size=16,
            layers_block_type=["mamba", "moe", "attention"],
        ),
        True,
    ),
    "beam": (
        "beam",
        dict(
            num_experts=8,
            **E8,
            n_group=2,
            topk_group=1,
            norm_topk_prob=True,
            head_dim=8,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
        True,
    ),
    "gpt_oss": (
        "gpt_oss",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=16,
        ),
        True,
    ),
    "granitemoe": ("granitemoe", dict(num_local_experts=8, num_experts_per_tok=2), True),
    "granitemoeshared": (
        "granitemoeshared",
        dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=24),
        True,
    ),
    "granitemoehybrid": (
        "granitemoehybrid",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            shared_intermediate_size=24,
            mamba_n_heads=4,
            mamba_d_state=8,
            mamba_d_head=16,
            mamba_chunk_size=16,
            layer_types=["mamba", "attention", "mamba"],
        ),
        True,
    ),
    "granitemoe_swa": ("granitemoe_swa", dict(num_local_experts=8, num_experts_per_tok=2), True),
    "aria_text": ("aria_text", dict(moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1), True),
    "cohere2_moe": ("cohere2_moe", dict(num_experts=8, num_experts_per_tok=2, num_shared_experts=1), True),
    "jamba": (
        "jamba",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=8,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_dt_rank=4,
            use_mamba_kernels=False,
        ),
        False,
    ),
    "phimoe": ("phimoe", dict(num_local_experts=8, num_experts_per_tok=2), False),  # sparsemixer sees near-max losers
    "llama4_text": (
        "llama4_text",
        dict(
            num_local_experts=8,
            num_experts_per_tok=1,
            head_dim=8,
            intermediate_size_mlp=48,
            interleave_moe_layer_step=1,
        ),
        True,
    ),
    "minimax_m2": ("minimax_m2", dict(num_local_experts=8, num_experts_per_tok=2, head_dim=8), True),
    "hy_v3": ("hy_v3", dict(num_experts=8, **E8, first_k_dense_replace=1, num_shared_experts=1, head_dim=8), True),
    "laguna": (
        "laguna",
        dict(num_experts=8, **E8, shared_expert_intermediate_size=24, head_dim=8, moe_router_logit_softcapping=10.0),
        True,
    ),
    "flint": (
        "flint",
        dict(
            num_experts=8,
            **E8,
            shared_expert_intermediate_size=24,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            head_dim=8,
        ),
        True,
    ),
    "kolibri1": (
        "kolibri1",
        dict(num_local_experts=8, **E8, shared_expert_intermediate_size=24, norm_topk_prob=True, head_dim=8),
        True,
    ),
    "inkling2_text": (
        "inkling2_text",
        dict(n_routed_experts=8, **E8, head_dim=8, unpadded_vocab_size=len(char_tokenizer())),
        True,
    ),
    "ernie4_5_moe": (
        "ernie4_5_moe",
        dict(
            moe_num_experts=8,
            moe_k=2,
            moe_intermediate_size=16,
            moe_num_shared_experts=1,
            moe_layer_start_index=1,
            head_dim=8,
        ),
        True,
    ),
    "hunyuan_v1_moe": (
        "hunyuan_v1_moe",
        dict(num_experts=8, moe_topk=2, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        True,
    ),
    "lfm2_moe": (
        "lfm2_moe",
        dict(
            num_experts=8,
            **E8,
            num_dense_layers=1,
            use_expert_bias=True,
            layer_types=["conv", "full_attention", "conv"],
        ),
        True,
    ),
    "longcat_flash": (
        "longcat_flash",
        dict(
            num_layers=3,
            num_hidden_layers=6,
            n_routed_experts=8,
            zero_expert_num=2,
            moe_topk=2,
            expert_ffn_hidden_size=16,
            ffn_hidden_size=48,
            head_dim=8,
            **MLA,
        ),
        False,
    ),
    "afmoe": ("afmoe", dict(num_experts=8, **E8, num_shared_experts=1, num_dense_layers=1, head_dim=8), True),
    "dbrx": (
        "dbrx",
        dict(
            d_model=32,
            n_heads=4,
            n_layers=3,
            max_seq_len=128,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={
                "ffn_hidden_size": 16,
                "moe_num_experts": 8,
                "moe_top_k": 2,
                "moe_normalize_expert_weights": 1.0,
            },
        ),
        True,
    ),
}


DENSE_FAMILIES: dict[str, dict] = {  # dense model_type -> config overrides (all GQA)
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma": {},
    "olmo2": {},
}
