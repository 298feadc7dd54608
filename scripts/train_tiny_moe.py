"""Train the tiny Qwen3-MoE that premoe ships (premoe/assets/tiny-moe) on the built-in task suite.

Reproducible: fixed seeds, one thread, deterministic data stream. It trains until the dense model
solves every task at >= 90% greedy exact match on held-out samples (checked at the end; the script
exits non-zero otherwise) and saves weights in bfloat16 (a few MB).

    python scripts/train_tiny_moe.py --out premoe/assets/tiny-moe
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from premoe.core.evaluation import exact_match  # noqa: E402
from premoe.core.tasks import TASKS, char_tokenizer, samples, split_of  # noqa: E402


def build_config(tok, args):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.expert_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def batch_stream(tok, batch: int, seed: int):
    """Endless training batches: a uniform task mix, train-split prompts only."""
    rng = random.Random(seed)
    names = list(TASKS)
    while True:
        ids, labels = [], []
        for _ in range(batch):
            task = TASKS[rng.choice(names)]
            while True:
                prompt, completion = task.make(rng)
                if split_of(prompt) == "train":
                    break
            p = tok(prompt).input_ids
            c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids.append(p + c)
            labels.append([-100] * len(p) + c)
        width = max(map(len, ids))
        pad = tok.pad_token_id
        yield (
            torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
        )


def evaluate(model, tok, n: int) -> dict[str, float]:
    return {t: exact_match(model, tok, samples(t, n, "eval"), progress=False) for t in TASKS}


def add_training_args(ap: argparse.ArgumentParser, steps: int) -> None:
    """The optimisation and evaluation flags both tiny-model scripts take."""
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("premoe/assets/tiny-moe"))
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument(
        "--head-dim", type=int, default=32, help="attention head size (vLLM's CPU attention needs 32, 64, 80, ...)"
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=32)
    ap.add_argument("--aux", type=float, default=0.001, help="router load-balancing loss coefficient")
    add_training_args(ap, steps=6000)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = char_tokenizer()
    config = build_config(tok, args)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return fit_and_save(model, tok, args, output_router_logits=True)


def fit_and_save(model, tok, args, **forward) -> int:
    """Train ``model`` on the task stream (AdamW, warm-up + cosine), save it in bfloat16 with its
    tokenizer and a training report, and check every task reaches 90% held-out exact match (exit 1
    otherwise). ``forward``: extra model arguments (the MoE asks for router logits and reports the aux loss)."""
    print(f"params: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    stream = batch_stream(tok, args.batch, args.seed)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        ids, mask, labels = next(stream)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **forward)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            aux = f" aux {out.aux_loss.item():.3f}" if getattr(out, "aux_loss", None) is not None else ""
            print(f"step {step} loss {out.loss.item():.4f}{aux} {time.time() - t0:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            acc = evaluate(model, tok, args.eval_samples)
            print(f"step {step} eval " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)

    model.eval()
    model = model.to(torch.bfloat16)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    acc = evaluate(model.float(), tok, args.eval_samples)
    report = {"eval_exact_match_bf16_weights": acc, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("final (bf16 weights): " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()), flush=True)
    if min(acc.values()) < 0.9:
        print("error: some task is below 90% exact match; train longer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
