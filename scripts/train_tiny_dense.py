"""Train the tiny dense Llama (GQA) that premoe ships (premoe/assets/tiny-dense) on the built-in task suite.

The dense counterpart of ``train_tiny_moe.py`` (same data stream, same held-out check): a
Llama-architecture decoder with grouped-query attention, used by ``premoe demo`` and the tests of
SEAP (structured pruning of heads and FFN channels). Weights are saved in bfloat16 (a few MB).

    python scripts/train_tiny_dense.py --out premoe/assets/tiny-dense
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


def build_config(tok, args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("premoe/assets/tiny-dense"))
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument(
        "--head-dim", type=int, default=32, help="attention head size (vLLM's CPU attention needs 32, 64, 80, ...)"
    )
    add_training_args(ap, steps=5000)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_config(build_config(tok, args), dtype=torch.float32)
    return fit_and_save(model, tok, args)


if __name__ == "__main__":
    raise SystemExit(main())
