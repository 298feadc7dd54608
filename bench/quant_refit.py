"""Re-fit on quantised checkpoints: retention and perplexity of the default prune (re-fitted, re-quantised in
the checkpoint's format) against the same prune of the unquantised model, at every keep of the sweep.

For each format the model is written as that format's hub release would be (``premoe.testing
.quantize_checkpoint``), every built-in task is calibrated on it, and each (keep, task) is evaluated with
``premoe.evaluate`` pruned on the fly with the default re-fit: greedy exact match on held-out samples and the
perplexity of their completions. Retention is relative to the same checkpoint's dense accuracy. A third
column per format keeps that checkpoint's re-fit in float instead of re-quantising it (what no export can
hold), which separates the cost of re-quantising from the cost of re-fitting a quantised model.

    python bench/quant_refit.py                                   # shipped tiny MoE: bf16 vs FP8 blocks
    python bench/quant_refit.py --model runs/families/gpt_oss --formats mxfp4   # MXFP4 needs fused experts
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an unquantised MoE checkpoint (default: the shipped tiny MoE)")
    ap.add_argument("--formats", nargs="+", default=["fp8"], help="fp8 and/or mxfp4, each against the original")
    ap.add_argument("--block", type=int, nargs=2, default=[128, 128], help="FP8 weight_block_size (as published)")
    ap.add_argument("--keeps", type=int, nargs="+", help="default: 3/4, 1/2, 3/8, 1/4, 1/8 of the experts")
    ap.add_argument("--tasks", nargs="+", default=["add", "reverse", "shift", "count", "sort"])
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--eval", type=int, default=100)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import premoe
    from premoe.assets import TINY_MODEL
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.moe.model import inspect_model
    from premoe.testing import quantize_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="premoe-quant-refit-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.model or Path(TINY_MODEL)
    info = inspect_model(source)
    E = info.num_experts
    keeps = args.keeps or sorted(
        {k for k in (E * 3 // 4, E // 2, E * 3 // 8, E // 4, E // 8) if k >= info.router.top_k}, reverse=True
    )
    evals = {t: write_jsonl(work / f"{t}.eval.jsonl", samples(t, args.eval, "eval")) for t in args.tasks}
    calib = {t: write_jsonl(work / f"{t}.calib.jsonl", samples(t, args.calib, "calib")) for t in args.tasks}
    import premoe.moe.refit_checkpoint as refit_checkpoint

    models = {"original": source}
    for fmt in args.formats:
        models[fmt] = quantize_checkpoint(source, work / fmt, fmt, block=tuple(args.block))
        models[f"{fmt}, float re-fit"] = models[fmt]
    requantize = refit_checkpoint.down_quant
    report = {"model": str(source), "keeps": keeps, "tasks": args.tasks, "block": args.block, "formats": {}}
    for label, model in models.items():
        t0 = time.perf_counter()
        refit_checkpoint.down_quant = (lambda *a, **k: None) if "float" in label else requantize
        store = work / f"store-{label.split(',')[0]}"
        for t in args.tasks:
            if "float" not in label:  # the float re-fit row reuses its checkpoint's patterns
                premoe.calibrate(model, calib[t], t, store, progress=False, overwrite=True)
        dense = {t: premoe.evaluate(model, evals[t], perplexity=evals[t], progress=False) for t in args.tasks}
        rows = []
        for keep in keeps:
            for t in args.tasks:
                r = premoe.evaluate(
                    model, evals[t], perplexity=evals[t], store=store, task=t, keep=keep, progress=False
                )
                rows.append(
                    {
                        "keep": keep,
                        "task": t,
                        "accuracy": r["exact_match"],
                        "retention": r["exact_match"] / dense[t]["exact_match"] if dense[t]["exact_match"] else 0.0,
                        "nll": r["nll"],
                        "tokens": r["perplexity_tokens"],
                        "refit": r.get("refit"),
                    }
                )
        report["formats"][label] = {
            "dense": {t: {"accuracy": d["exact_match"], "perplexity": d["perplexity"]} for t, d in dense.items()},
            "rows": rows,
            "seconds": time.perf_counter() - t0,
        }
        print(f"{label}: done in {time.perf_counter() - t0:.0f}s", flush=True)

    import math

    def pooled(label: str, keep: int | None) -> tuple[float, float]:
        f = report["formats"][label]
        if keep is None:
            d = f["dense"].values()
            return 1.0, math.exp(sum(math.log(x["perplexity"]) for x in d) / len(d))
        g = [r for r in f["rows"] if r["keep"] == keep]
        ret = sum(r["retention"] for r in g) / len(g)
        return ret, math.exp(sum(r["nll"] * r["tokens"] for r in g) / sum(r["tokens"] for r in g))

    print(
        f"{source} ({E} experts, top-{info.router.top_k}); default prune (re-fitted); mean over {len(args.tasks)} tasks"
    )
    print(" | ".join(f"{i}: {lab}" for i, lab in enumerate(models)))
    print(f"{'keep':>6} " + " ".join(f"{f'{i} ret':>8} {f'{i} ppl':>8}" for i in range(len(models))) + "  gap")
    for keep in keeps:
        vals = {lab: pooled(lab, keep) for lab in models}
        gap = min(vals[lab][0] - vals["original"][0] for lab in models if "float" not in lab)
        report.setdefault("summary", []).append(
            {
                "keep": keep,
                **{lab: {"retention": v[0], "perplexity": v[1]} for lab, v in vals.items()},
                "worst_gap": gap,
            }
        )
        print(f"{keep:>6} " + " ".join(f"{100 * v[0]:>7.1f}% {v[1]:>8.4f}" for v in vals.values()) + f"  {gap:+.3f}")
    print(f"{'dense':>6} " + " ".join(f"{'':>8} {pooled(lab, None)[1]:>8.4f}" for lab in models))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
