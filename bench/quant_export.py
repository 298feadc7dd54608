"""``premoe prune --quantize w4a16``: retention, perplexity and bytes of the INT4 export (GPTQ with the re-fit's
Gram matrices, and round-to-nearest) against the bf16 export, at 16/8/4 of 32 experts (or 1/2, 1/4, 1/8 of any
other count).

Each task is calibrated once; for every (keep, task) the model is pruned three ways with the default re-fit (bf16,
w4a16 GPTQ, w4a16 RTN), and each export is evaluated as a user would read it (``premoe.evaluate`` on the
export directory): greedy exact match on held-out samples (retention against the dense model) and the perplexity
of their completions.

    python bench/quant_export.py                                        # the shipped tiny Qwen3-MoE
    python bench/quant_export.py --model runs/families/deepseek_v3      # an evidence family
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = {"bf16": {}, "w4a16 gptq": {"quantize": "w4a16"}, "w4a16 rtn": {"quantize": "w4a16", "quantize_rounding": "rtn"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="an unquantised MoE checkpoint (default: the shipped tiny MoE)")
    ap.add_argument("--keeps", type=int, nargs="+", help="default: 1/2, 1/4, 1/8 of the experts")
    ap.add_argument("--group", type=int, help="--quantize-group (default: premoe's)")
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

    work = args.work or Path(tempfile.mkdtemp(prefix="premoe-quant-export-"))
    work.mkdir(parents=True, exist_ok=True)
    source = args.model or Path(TINY_MODEL)
    info = inspect_model(source)
    E = info.num_experts
    keeps = args.keeps or sorted({k for k in (E // 2, E // 4, E // 8) if k >= info.router.top_k}, reverse=True)
    evals = {t: write_jsonl(work / f"{t}.eval.jsonl", samples(t, args.eval, "eval")) for t in args.tasks}
    store = work / "store"
    for t in args.tasks:
        premoe.calibrate(source, write_jsonl(work / f"{t}.calib.jsonl", samples(t, args.calib, "calib")), t, store,
                         progress=False, overwrite=True)  # fmt: skip
    dense = {t: premoe.evaluate(source, evals[t], perplexity=evals[t], progress=False) for t in args.tasks}
    extra = {"quantize_group": args.group} if args.group else {}
    rows, t0 = [], time.perf_counter()
    for keep in keeps:
        for t in args.tasks:
            for way, kw in WAYS.items():
                out = work / f"{way.replace(' ', '-')}-{keep}-{t}"
                s0 = time.perf_counter()
                res = premoe.prune(source, store, t, keep, out, progress=False, overwrite=True,
                                   **kw, **(extra if kw else {}))  # fmt: skip
                seconds = time.perf_counter() - s0
                r = premoe.evaluate(out, evals[t], perplexity=evals[t], progress=False)
                base = dense[t]["exact_match"]
                rows.append(
                    {
                        "keep": keep,
                        "task": t,
                        "way": way,
                        "accuracy": r["exact_match"],
                        "retention": r["exact_match"] / base if base else 0.0,
                        "nll": r["nll"],
                        "tokens": r["perplexity_tokens"],
                        "bytes": res.bytes_written,
                        "prune_seconds": seconds,
                    }
                )
        print(f"keep {keep}: done at {time.perf_counter() - t0:.0f}s", flush=True)

    def pooled(keep: int, way: str) -> dict:
        g = [r for r in rows if r["keep"] == keep and r["way"] == way]
        return {
            "retention": sum(r["retention"] for r in g) / len(g),
            "perplexity": math.exp(sum(r["nll"] * r["tokens"] for r in g) / sum(r["tokens"] for r in g)),
            "bytes": g[0]["bytes"],
            "prune_seconds": sum(r["prune_seconds"] for r in g) / len(g),
        }

    d = list(dense.values())
    dense_ppl = math.exp(sum(math.log(x["perplexity"]) for x in d) / len(d))
    summary = [{"keep": k, **{w: pooled(k, w) for w in WAYS}} for k in keeps]
    print(f"{source} ({E} experts, top-{info.router.top_k}, {info.checkpoint.nbytes} bytes); dense ppl {dense_ppl:.4f}")
    print(f"{'keep':>5} " + " ".join(f"{w + ' ret':>15} {'ppl':>7} {'bytes':>9}" for w in WAYS))
    for s in summary:
        print(
            f"{s['keep']:>5} "
            + " ".join(f"{100 * s[w]['retention']:>14.1f}% {s[w]['perplexity']:>7.3f} {s[w]['bytes']:>9}" for w in WAYS)
        )
    if args.json:
        report = {"model": str(source), "keeps": keeps, "tasks": args.tasks, "dense_perplexity": dense_ppl}
        args.json.write_text(json.dumps({**report, "summary": summary, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
