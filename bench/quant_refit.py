"""Re-fit on quantised checkpoints: retention and perplexity of the default prune (re-fitted, re-quantised in
the checkpoint's format) against the same prune of the unquantised model, at every keep of the sweep.

For each format the model is written as that format's hub release would be (``premoe.testing
.quantize_checkpoint``), every built-in task is calibrated on it, and each (keep, task) is evaluated with
``premoe.evaluate`` pruned on the fly with the default re-fit: greedy exact match on held-out samples and the
perplexity of their completions. Retention is relative to the same checkpoint's dense accuracy. Per format:

* ``<fmt>``: the default, end to end (calibrated on the quantised checkpoint, re-fit re-quantised);
* ``<fmt>, original's experts``: the same, pruned with the original model's patterns (the kept experts the
  unquantised model's ranking chooses): a near-tie in the ranking that the format's rounding flips does not
  enter, so it measures the re-fit and its re-quantising alone;
* ``<fmt>, re-fit rounded to nearest`` (formats whose re-fit GPTQ rounds onto their grid, MXFP4): the
  re-fitted experts rounded to nearest instead;
* ``<fmt>, float re-fit``: the re-fit kept in float instead of re-quantised (what no export can hold): the
  cost of re-quantising;
* ``<fmt> weights unquantised``: the control, the quantised checkpoint dequantised and saved as a plain one
  (the format's rounded weights, no format), calibrated and re-fitted as any bf16 model.

The summary's last columns: the worst format's retention minus the original's, minus its control's, and with
the original's experts minus the original's.

    python bench/quant_refit.py                                   # shipped tiny MoE: bf16 vs FP8 blocks
    python bench/quant_refit.py --formats compressed-tensors/nvfp4   # NVFP4 experts (compressed-tensors layout)
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


def dequantized_copy(model: Path, out: Path) -> Path:
    """The quantised checkpoint ``model`` with every weight dequantised to its config's dtype and no
    ``quantization_config``: the same weights as an unquantised checkpoint (the control that tells what the
    format costs from what its rounded weights change)."""
    import torch

    from premoe.moe.loading import load_model

    loaded = load_model(model, device="cpu", dtype="auto")
    net = loaded.model
    if hasattr(net.config, "quantization_config"):
        del net.config.quantization_config
    net.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    del net, loaded
    torch.set_num_threads(torch.get_num_threads())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an unquantised MoE checkpoint (default: the shipped tiny MoE)")
    ap.add_argument(
        "--formats", nargs="*", default=["fp8"], help="fp8, mxfp4, nvfp4 and/or modelopt, each against the original"
    )
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

    # label -> (checkpoint, pattern store, calibrate it here, keep the re-fit in float, rounding)
    store_of = {"original": work / "store-original"}
    runs = {"original": (source, store_of["original"], True, False, "gptq")}
    for fmt in args.formats:
        q = quantize_checkpoint(source, work / fmt, fmt, block=tuple(args.block))
        own = work / f"store-{fmt}"
        runs[fmt] = (q, own, True, False, "gptq")
        runs[f"{fmt}, original's experts"] = (q, store_of["original"], False, False, "gptq")
        if inspect_model(q).quant.rounding_grid() is not None:  # GPTQ onto the grid is the default there
            runs[f"{fmt}, re-fit rounded to nearest"] = (q, own, False, False, "rtn")
        runs[f"{fmt}, float re-fit"] = (q, own, False, True, "gptq")
        plain = dequantized_copy(q, work / f"{fmt}-weights")
        runs[f"{fmt} weights unquantised"] = (plain, work / f"store-{fmt}-weights", True, False, "gptq")
    models = {label: r[0] for label, r in runs.items()}
    requantize = refit_checkpoint.down_quant
    report = {"model": str(source), "keeps": keeps, "tasks": args.tasks, "block": args.block, "formats": {}}
    for label, (model, store, calibrate, float_refit, rounding) in runs.items():
        t0 = time.perf_counter()
        refit_checkpoint.down_quant = (lambda *a, **k: None) if float_refit else requantize
        refit_checkpoint.REQUANT = rounding
        for t in args.tasks:
            if calibrate:
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
    print(
        f"{'keep':>6} "
        + " ".join(f"{f'{i} ret':>8} {f'{i} ppl':>8}" for i in range(len(models)))
        + "  gap  same-weights gap  same-experts gap"
    )
    for keep in keeps:
        vals = {lab: pooled(lab, keep) for lab in models}
        gap = min((vals[lab][0] - vals["original"][0] for lab in args.formats), default=0.0)
        same = min((vals[f][0] - vals[f"{f} weights unquantised"][0] for f in args.formats), default=0.0)
        kept = min((vals[f"{f}, original's experts"][0] - vals["original"][0] for f in args.formats), default=0.0)
        report.setdefault("summary", []).append(
            {
                "keep": keep,
                **{lab: {"retention": v[0], "perplexity": v[1]} for lab, v in vals.items()},
                "worst_gap": gap,
                "worst_gap_same_weights": same,
                "worst_gap_same_experts": kept,
            }
        )
        print(
            f"{keep:>6} "
            + " ".join(f"{100 * v[0]:>7.1f}% {v[1]:>8.4f}" for v in vals.values())
            + f"  {gap:+.3f}  {same:+.3f}  {kept:+.3f}"
        )
    print(f"{'dense':>6} " + " ".join(f"{'':>8} {pooled(lab, None)[1]:>8.4f}" for lab in models))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
