"""Train a tiny MoE of another architecture family (Mixtral, DeepSeek-V3, gpt-oss) on the built-in task suite.

The counterparts of the shipped Qwen3-MoE (``train_tiny_moe.py``: same data stream, optimiser, bf16
save and >= 90% held-out exact-match check), used as evidence models for pruning experiments on
other routing schemes. Sizes follow the shipped model where they apply (hidden 96, 4 layers,
4 heads of 32, 2 KV heads, experts of width 32, top-2, 64 positions, tied embeddings):

* ``mixtral``: 16 experts, softmax top-2 renormalised.
* ``deepseek_v3``: 32 routed experts in 4 groups (2 chosen), 1 shared expert, sigmoid scores,
  first layer dense (width 192), small MLA. The router's ``e_score_correction_bias`` is not trained
  by gradient (DeepSeek adjusts it out of band); it stays at zero. transformers computes no aux loss
  for this family, so the router gets no load-balancing pressure.
* ``gpt_oss``: 16 experts, top-k softmax router with bias, alternating sliding (window 64, i.e.
  full on these short sequences) / full attention, YaRN keys with factor 1 (plain RoPE).

    python scripts/train_tiny_family.py --family mixtral --out runs/families/mixtral
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_moe import add_training_args, fit_and_save  # noqa: E402

from premoe.core.tasks import char_tokenizer  # noqa: E402

FAMILIES = ("mixtral", "deepseek_v3", "gpt_oss")
DEFAULT_EXPERTS = {"mixtral": 16, "deepseek_v3": 32, "gpt_oss": 16}


def build_config(tok, args):
    from transformers import CONFIG_MAPPING

    common = dict(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    experts = args.experts or DEFAULT_EXPERTS[args.family]
    if args.family == "mixtral":
        family = dict(
            head_dim=args.head_dim,
            num_local_experts=experts,
            intermediate_size=args.expert_size,  # Mixtral's expert width
            router_aux_loss_coef=args.aux,
        )
    elif args.family == "deepseek_v3":
        family = dict(
            n_routed_experts=experts,
            n_group=4,
            topk_group=2,
            n_shared_experts=1,
            moe_intermediate_size=args.expert_size,
            intermediate_size=args.hidden * 2,  # the dense first layer
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=1.0,
            kv_lora_rank=32,
            q_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=args.head_dim,
            # MLA: keys/values are per head (no GQA); transformers requires it to equal the heads
            num_key_value_heads=4,
        )
    elif args.family == "gpt_oss":
        family = dict(
            head_dim=args.head_dim,
            num_local_experts=experts,
            intermediate_size=args.expert_size,
            sliding_window=64,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(args.layers)],
            router_aux_loss_coef=args.aux,
            # gpt-oss ships YaRN (factor 32 over 4096 positions); keep the YaRN keys (vLLM reads them) but
            # with factor 1 over our 64 positions, which is plain RoPE and matches max_position_embeddings.
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 1.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
        )
    else:
        raise ValueError(f"unknown family {args.family!r}")
    if args.rope_theta is not None:
        rope = family.get("rope_parameters") or {"rope_type": "default"}
        family["rope_parameters"] = {**rope, "rope_theta": args.rope_theta}
    return CONFIG_MAPPING[args.family](**{**common, **family})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=FAMILIES)
    ap.add_argument("--out", type=Path, default=None, help="default: runs/families/<family>")
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--head-dim", type=int, default=32, help="attention head size (DeepSeek-V3: the value head size)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=None, help="default: 16 (mixtral, gpt_oss), 32 (deepseek_v3)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=32)
    ap.add_argument(
        "--rope-theta",
        type=float,
        default=None,
        help="RoPE base; default: the family's (mixtral 1e6, deepseek_v3 1e4, gpt_oss 1.5e5); "
        "the shipped model uses 1e4",
    )
    ap.add_argument("--aux", type=float, default=0.001, help="router load-balancing loss coefficient (not deepseek_v3)")
    add_training_args(ap, steps=6000)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path("runs/families") / args.family

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = char_tokenizer()
    config = build_config(tok, args)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Router logits (and so the aux loss) only where the family computes a load-balancing loss.
    forward = {"output_router_logits": True} if hasattr(config, "router_aux_loss_coef") else {}
    return fit_and_save(model, tok, args, **forward)


if __name__ == "__main__":
    raise SystemExit(main())
