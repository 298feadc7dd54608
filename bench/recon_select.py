"""Prototype for issue 10: choose the kept experts by what the pruned block will output.

Superseded by :mod:`premoe.moe.recon` (``premoe calibrate --scorer recon``: streamed, any family,
groups, a bounded objective); kept to reproduce the prototype's numbers in the README and because
``bench/moe_refit.py`` reuses :func:`capture`.

Scores rank experts one at a time; after pruning, every token is re-routed to its best surviving
experts with renormalised weights. This experiment captures, on a task's calibration tokens, each
MoE block's input and router logits, computes every expert's output once, and removes experts one
by one (greedy backward elimination): at each step the expert whose removal, with the family's own
re-routing rule over the survivors (:func:`premoe.moe.routing.route`), changes the block's routed
output least (squared error against the dense block). The elimination order is a nested ranking,
so one pass serves every keep count. Plans are applied in memory and scored on held-out samples,
next to TCESS and EASY-EP from the same calibration.

The prototype has no store field, no streaming and no group-limited routers.

    python bench/recon_select.py [--keeps 16 8 4] [--tokens 2048]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def capture(lm, layers, spec, texts, max_tokens: int):
    """Per MoE layer: (hidden [T, D], logits [T, S], residual [T, D]) of up to ``max_tokens`` real
    tokens; the residual is the stream entering the layer's pre-MoE norm."""
    from premoe.core.modules import decoder_layers

    got = {m.index: ([], [], []) for m in layers}
    mask = {"m": None}
    hooks = []
    decoder = decoder_layers(lm.model)
    for m in layers:
        norm = decoder[m.index].get_submodule(lm.info.spec.pre_moe_norm)

        def pre(mod, args, idx=m.index):
            got[idx][2].append(args[0].reshape(-1, args[0].shape[-1])[mask["m"]].detach().float())
        hooks.append(norm.register_forward_pre_hook(pre))
        def hook(mod, args, out, idx=m.index):
            logits = out[spec.logits_at] if isinstance(out, (tuple, list)) else out
            h = args[0].reshape(-1, args[0].shape[-1])[mask["m"]]
            z = logits.reshape(-1, logits.shape[-1])[mask["m"]]
            got[idx][0].append(h.detach().float())
            got[idx][1].append(z.detach().float())
        hooks.append(m.router.register_forward_hook(hook))
    tok = lm.tokenizer
    try:
        with torch.inference_mode():
            for text in texts:
                enc = tok(text, return_tensors="pt")
                mask["m"] = enc["attention_mask"].reshape(-1).bool()
                lm.model(**enc)
    finally:
        for h in hooks:
            h.remove()
    return {idx: tuple(torch.cat(v)[:max_tokens] for v in parts) for idx, parts in got.items()}


def routed_output(y_all: torch.Tensor, logits: torch.Tensor, kept: list[int], spec) -> torch.Tensor:
    """[T, D] routed output of the block when only ``kept`` experts exist (family re-routing rule)."""
    from premoe.moe.routing import route

    sub = dataclasses.replace(spec, num_experts=len(kept), slots=0, top_k=min(spec.top_k, len(kept)))
    idx, w = route(logits[:, kept], sub, scaled=True)
    ids = torch.tensor(kept)[idx]  # [T, k] original ids
    T = logits.shape[0]
    return (y_all[ids, torch.arange(T)[:, None]] * w[..., None]).sum(1)


def eliminate(y_all: torch.Tensor, logits: torch.Tensor, spec, stop: int, weight: torch.Tensor | None = None) -> list[int]:
    """Greedy backward elimination; returns expert ids in removal order (first removed first).
    ``weight`` [T, 1]: per-token weight of the squared error (default 1)."""
    kept = list(range(y_all.shape[0]))
    dense = routed_output(y_all, logits, kept, spec)
    w = torch.ones(logits.shape[0], 1) if weight is None else weight
    order = []
    while len(kept) > stop:
        errs = []
        for c in kept:
            trial = [e for e in kept if e != c]
            errs.append(float((w * (routed_output(y_all, logits, trial, spec) - dense) ** 2).sum()))
        out = kept[min(range(len(kept)), key=errs.__getitem__)]
        kept.remove(out)
        order.append(out)
    return order + kept  # survivors last (their mutual order: unranked)


def recon_scores(lm, layers, spec, texts, max_tokens: int, stop: int, relative: bool = False) -> torch.Tensor:
    """[L, E] nested ranking by greedy elimination; ``relative``: each token's error is divided by
    the squared norm of the residual stream leaving the block (what the next norm rescales by)."""
    from premoe.moe.kernels import expert_forward

    data = capture(lm, layers, spec, texts, max_tokens)
    scores = torch.zeros(len(layers), spec.num_experts)
    for pos, m in enumerate(layers):
        h, z, res = data[m.index]
        with torch.inference_mode():
            y_all = torch.stack([expert_forward(m.experts, e, h.to(m.experts.down_proj.dtype)).float()
                                 for e in range(spec.num_experts)])  # [E, T, D]
        weight = None
        if relative:
            out = res + routed_output(y_all, z, list(range(spec.num_experts)), spec)
            weight = 1 / (out * out).sum(-1, keepdim=True).clamp_min(1e-12)
        order = eliminate(y_all, z, spec, stop, weight)
        for rank, e in enumerate(order):
            scores[pos, e] = rank  # later removed = more important
    return scores


def recon_sequential(lm, layers, spec, texts, max_tokens: int, keep: int) -> torch.Tensor:
    """Layer by layer, with the earlier layers already pruned to ``keep`` (removed experts' logits
    masked, which is exactly pruning for routers that re-normalise over the chosen experts): each
    layer's inputs are what the pruned model feeds it. [L, E] ranking for this ``keep`` only."""
    from premoe.moe.kernels import expert_forward

    scores = torch.zeros(len(layers), spec.num_experts)
    hooks = []
    try:
        for pos, m in enumerate(layers):
            h, z, _ = capture(lm, layers, spec, texts, max_tokens)[m.index]
            with torch.inference_mode():
                y_all = torch.stack([expert_forward(m.experts, e, h.to(m.experts.down_proj.dtype)).float()
                                     for e in range(spec.num_experts)])
            order = eliminate(y_all, z, spec, keep)
            for rank, e in enumerate(order):
                scores[pos, e] = rank
            removed = torch.tensor(order[: spec.num_experts - keep])

            def mask_hook(mod, args, out, removed=removed):
                # Qwen3-MoE's router returns (logits, weights, indices): recompute the routing with the
                # removed experts' logits at -inf (the shipped model's family; a prototype, not general)
                from premoe.moe.routing import route

                logits = out[0].clone()
                logits[..., removed] = float("-inf")
                idx, w = route(logits, spec)
                return logits, w.to(out[1].dtype), idx
            hooks.append(m.router.register_forward_hook(mask_hook))
    finally:
        for hk in hooks:
            hk.remove()
    return scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keeps", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens per layer used by the selection")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=100)
    args = ap.parse_args(argv)

    from premoe.api import calibrate
    from premoe.core.data import write_jsonl
    from premoe.core.evaluation import exact_match
    from premoe.moe.loading import load_model
    from premoe.core.tasks import TASKS, samples
    from premoe.moe.plans import make_plan
    from premoe.moe.scoring import score
    from premoe.moe.surgery import apply_plan_
    from premoe.showcase import TINY_MODEL
    import tempfile

    torch.manual_seed(0)
    lm = load_model(TINY_MODEL, device="cpu", dtype="float32")
    info, layers, spec = lm.info, lm.layers, lm.info.router
    work = Path(tempfile.mkdtemp(prefix="premoe-recon-"))
    dense_acc, rows, cost = {}, {}, {"calibrate": 0.0, "select": 0.0}
    for t in TASKS:
        cal = samples(t, args.calib, "calib")
        t0 = time.perf_counter()
        pattern = calibrate(TINY_MODEL, write_jsonl(work / f"{t}.jsonl", cal), t, work / "store", all_stats=True,
                            progress=False)
        cost["calibrate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        texts = [r["prompt"] + r["completion"] for r in cal]
        rec = recon_scores(lm, layers, spec, texts, args.tokens, stop=min(args.keeps))
        cost["select"] += time.perf_counter() - t0
        rel = recon_scores(lm, layers, spec, texts, args.tokens, stop=min(args.keeps), relative=True)
        seq = {k: recon_sequential(lm, layers, spec, texts, args.tokens, k) for k in args.keeps}
        ev = samples(t, args.eval, "eval")
        dense_acc[t] = exact_match(lm.model, lm.tokenizer, ev, progress=False)
        shape = (len(layers), spec.num_experts)
        for name, sc in (("tcess", score("tcess", pattern.means, shape)), ("easyep", score("easyep", pattern.means, shape)),
                         ("recon", rec), ("recon-rel", rel), ("recon-seq", None)):
            for keep in args.keeps:
                if name == "recon-seq":
                    sc = seq[keep]
                plan = make_plan(sc, [m.index for m in layers], spec, keep)
                net = apply_plan_(copy.deepcopy(lm.model), info.spec, plan)
                rows.setdefault((name, keep), {})[t] = exact_match(net, lm.tokenizer, ev, progress=False)
        print(t, {f"{n}@{k}": round(v[t], 2) for (n, k), v in rows.items()}, flush=True)
    dense_mean = sum(dense_acc.values()) / len(dense_acc)
    print(f"\ndense mean exact match {dense_mean:.3f}; retention (mean over tasks / dense mean):")
    for keep in args.keeps:
        print(f"keep {keep:>2}/{spec.num_experts}: " + "  ".join(
            f"{name} {100 * sum(rows[(name, keep)].values()) / len(TASKS) / dense_mean:5.1f}%"
            for name in ("tcess", "easyep", "recon", "recon-rel", "recon-seq")))
    print(f"cost: calibration {cost['calibrate']:.1f}s, recon selection {cost['select']:.1f}s "
          f"({cost['select'] / cost['calibrate']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
