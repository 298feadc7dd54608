"""``premoe demo``: both halves of premoe on the shipped tiny models and the built-in task suite.

MoE (PreMoe): calibrates every built-in task, a task-agnostic pattern (all tasks' samples pooled) and a
seeded random pattern on the shipped tiny MoE; prunes it to several keep counts with ``premoe prune``'s
defaults (EASY-EP selection, the kept experts re-fitted on the task's calibration data) and as the
paper does (TCESS, no re-fit), task-specific and pooled.

Dense (SEAP): calibrates every built-in task on the shipped tiny dense Llama (GQA) and prunes it to
several sparsities with SEAP (each task's own statistics), SEAP-gen (all tasks pooled), Wanda-sp,
FLAP and random heads/channels.

Every pruned model goes through the real export path (safetensors rewrite + vanilla reload check)
and is scored by greedy exact match on held-out samples, with the weight bytes it needs.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from premoe.assets import TINY_DENSE, TINY_MODEL

HELP = "calibrate, prune and evaluate the shipped tiny MoE (PreMoe) and tiny dense model (SEAP) on the built-in tasks"
DENSE_METHODS = {
    "seap": "SEAP, --no-refit",
    "seap+refit": "SEAP (default: + re-fit)",
    "seap-gen": "SEAP-gen, tasks pooled",
    "wanda-sp": "Wanda-sp",
    "flap": "FLAP",
    "random": "random",
}
DENSE_SPARSITIES = (0.2, 0.5)
METHODS = {
    "default": "default: EASY-EP + re-fit",
    "tcess": "TCESS, --no-refit (paper)",
    "agnostic": "TCESS, all tasks pooled",
    "random": "random",
}
AGNOSTIC, RANDOM = "all-tasks", "random"


def demo(
    keeps: list[int] | None = None,
    eval_samples: int = 100,
    calib_samples: int = 64,
    workdir: str | Path | None = None,
    model: str | Path = TINY_MODEL,
    tasks: list[str] | None = None,
    progress: bool = True,
    sparsities: list[float] | None = None,
    dense_model: str | Path | None = TINY_DENSE,
) -> dict[str, Any]:
    """Run the demo; returns the results (see :func:`format_table`). The MoE results sit at the top
    level, the dense (SEAP) ones under ``"dense"`` (left out with ``dense_model=None``)."""
    from premoe.core.tasks import TASKS

    logging.getLogger("premoe").setLevel(logging.WARNING)
    tasks = tasks or list(TASKS)
    with tempfile.TemporaryDirectory(prefix="premoe-demo-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = _run(Path(model), work, keeps, eval_samples, calib_samples, tasks, progress)
        if dense_model is not None:
            result["dense"] = _run_dense(
                Path(dense_model), work / "dense", sparsities, eval_samples, calib_samples, tasks, progress
            )
        return result


def _run(model: Path, work: Path, keeps, eval_samples, calib_samples, tasks, progress) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.moe.loading import load_model
    from premoe.verbs.calibrate import calibrate
    from premoe.verbs.prune import prune
    from premoe.verbs.refit import refit

    t_start = time.perf_counter()
    lm = load_model(model, device="cpu", dtype=torch.float32)
    info = lm.info
    E, K = info.num_experts, info.router.top_k
    keeps = sorted({k for k in (keeps or [E // 2, E // 4, E // 8]) if K <= k <= E}, reverse=True)
    evals = {t: samples(t, eval_samples, "eval") for t in tasks}
    calib = {t: samples(t, calib_samples, "calib") for t in tasks}
    store = work / "store"
    steps = 2 * len(tasks) + 2 + len(tasks) + len(keeps) * (2 * len(tasks) + 2)
    bar = tqdm(total=steps, desc="demo", unit="step", disable=not progress)

    def step(desc: str):
        bar.set_postfix_str(desc)
        bar.update(1)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for t in tasks:
        calibrate(lm, write_jsonl(work / f"{t}.jsonl", calib[t]), t, store, overwrite=True, progress=False)
        step(f"calibrate {t}")
    timings["calibrate_per_task_s"] = (time.perf_counter() - t0) / len(tasks)
    t0 = time.perf_counter()
    for t in tasks:  # the default's re-fitted rows for every keep count, one pass per task (premoe refit)
        refit(lm.info, store, keeps, tasks=[t], progress=False)
        step(f"refit {t}")
    timings["refit_per_task_s"] = (time.perf_counter() - t0) / len(tasks)
    pooled = [row for t in tasks for row in calib[t]]
    calibrate(lm, write_jsonl(work / "pooled.jsonl", pooled), AGNOSTIC, store, overwrite=True, progress=False)
    step("calibrate pooled")
    calibrate(lm, work / "pooled.jsonl", RANDOM, store, scorer="random", seed=0, overwrite=True, progress=False)
    step("random pattern")

    dense_bytes = info.checkpoint.nbytes
    dense, nll = {}, {}
    for t in tasks:
        dense[t], nll[t] = _measure(lm.model, lm.tokenizer, evals[t])
        step(f"dense {t}")
    rows = [_row("dense", dense_bytes, dense, nll, keep=E)]

    prune_times = []
    for keep in keeps:
        for method in METHODS:
            own = method in ("default", "tcess")
            pattern_for = {t: t if own else (AGNOSTIC if method == "agnostic" else RANDOM) for t in tasks}
            options = {} if method == "default" else {"refit": False, "scorer": None if method == "random" else "tcess"}
            acc, nll, nbytes = {}, {}, 0
            for pattern in dict.fromkeys(pattern_for.values()):
                out = work / "models" / f"{pattern}-{keep}{'-default' if method == 'default' else ''}"
                t0 = time.perf_counter()
                res = prune(model, store, pattern, keep, out, overwrite=True, progress=False, **options)
                prune_times.append(time.perf_counter() - t0)
                nbytes = res.bytes_written
                pruned = load_model(out, device="cpu", dtype=torch.float32)
                for t in (t for t, p in pattern_for.items() if p == pattern):
                    acc[t], nll[t] = _measure(pruned.model, pruned.tokenizer, evals[t])
                step(f"{method} keep {keep}")
            rows.append(_row(method, nbytes, {t: acc[t] for t in tasks}, nll, keep=keep))
    bar.close()
    timings["prune_per_model_s"] = sum(prune_times) / len(prune_times) if prune_times else 0.0
    timings["total_s"] = time.perf_counter() - t_start
    dense_mean = rows[0]["mean"]
    for r in rows:
        r["retention"] = r["mean"] / dense_mean if dense_mean else 0.0
    return {
        "model": {
            "path": str(model),
            "architecture": info.fingerprint.architecture,
            "moe_layers": len(info.moe_layers),
            "num_experts": E,
            "top_k": K,
        },
        "tasks": tasks,
        "eval_samples": eval_samples,
        "calib_samples": calib_samples,
        "rows": rows,
        "timings": timings,
    }


def _run_dense(model: Path, work: Path, sparsities, eval_samples, calib_samples, tasks, progress) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.dense.model import inspect_dense, load_dense
    from premoe.verbs.calibrate import calibrate
    from premoe.verbs.prune import prune

    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    sparsities = sorted(set(sparsities or DENSE_SPARSITIES))
    info, lm, tok = load_dense(model, device="cpu", dtype=torch.float32)
    evals = {t: samples(t, eval_samples, "eval") for t in tasks}
    store = work / "store"
    bar = tqdm(
        total=len(tasks) * (2 + len(sparsities)) + len(sparsities) * (len(DENSE_METHODS) - 1) * len(tasks),
        desc="demo (dense)",
        unit="step",
        disable=not progress,
    )
    for t in tasks:
        calibrate(
            model,
            write_jsonl(work / f"{t}.jsonl", samples(t, calib_samples, "calib")),
            t,
            store,
            overwrite=True,
            dtype="float32",
            progress=False,
        )
        bar.update(1)
    dense, nll = {}, {}
    for t in tasks:
        dense[t], nll[t] = _measure(lm, tok, evals[t])
        bar.update(1)
    rows = [_row("dense", info.checkpoint.nbytes, dense, nll, sparsity=0.0)]
    for s in sparsities:
        for method in DENSE_METHODS:
            base, refit = method.removesuffix("+refit"), method.endswith("+refit")
            per_task = base == "seap"
            acc, nll, nbytes, counted = {}, {}, 0, 0.0
            for pattern in tasks if per_task else [None]:
                out = work / "models" / f"{pattern or base}{'-refit' if refit else ''}-{round(100 * s)}"
                res = prune(
                    model,
                    store,
                    pattern,
                    None,
                    out,
                    sparsity=s,
                    method=base,
                    agnostic=pattern is None,
                    overwrite=True,
                    progress=False,
                    refit=refit,
                )
                nbytes, counted = res.bytes_written, res.sparsity
                pruned_info, net, ptok = load_dense(out, device="cpu", dtype=torch.float32)
                for t in [pattern] if per_task else tasks:
                    acc[t], nll[t] = _measure(net, ptok, evals[t])
                    bar.update(1)
            rows.append({**_row(method, nbytes, {t: acc[t] for t in tasks}, nll, sparsity=counted), "requested": s})
    bar.close()
    for r in rows:
        r["retention"] = r["mean"] / rows[0]["mean"] if rows[0]["mean"] else 0.0
    cfg = inspect_dense(model)
    return {
        "model": {
            "path": str(model),
            "architecture": cfg.fingerprint.architecture,
            "layers": cfg.num_layers,
            "heads": cfg.heads,
            "kv_heads": cfg.kv_heads,
            "intermediate": cfg.intermediate,
        },
        "rows": rows,
        "seconds": time.perf_counter() - t_start,
    }


def _measure(model, tokenizer, rows: list[dict]) -> tuple[float, tuple[float, int]]:
    """Exact match on held-out ``rows`` and the NLL of their completions (sum over tokens, tokens)."""
    from premoe.core.evaluation import exact_match, perplexity

    ppl = perplexity(model, tokenizer, [(r["prompt"], r["completion"]) for r in rows], progress=False)
    return exact_match(model, tokenizer, rows, progress=False), (ppl["nll"] * ppl["tokens"], ppl["tokens"])


def _perplexity(nll: dict[str, tuple[float, int]]) -> float:
    """Token-weighted perplexity over tasks, from each task's (NLL sum, tokens)."""
    return math.exp(sum(v[0] for v in nll.values()) / sum(v[1] for v in nll.values()))


def _row(method: str, nbytes: int, acc: dict[str, float], nll: dict, **size) -> dict[str, Any]:
    """One row of a demo table; ``size``: ``keep=`` (MoE experts) or ``sparsity=`` (dense weights removed)."""
    return {
        "method": method,
        **size,
        "bytes": nbytes,
        "accuracy": acc,
        "mean": sum(acc.values()) / len(acc),
        "perplexity": _perplexity(nll),
    }


def format_table(result: dict[str, Any]) -> str:
    m, tasks = result["model"], result["tasks"]
    lines = [
        f"premoe demo: {m['architecture']} ({m['moe_layers']} MoE layers x {m['num_experts']} experts, "
        f"top-{m['top_k']}), "
        f"{len(tasks)} built-in tasks, greedy exact match on {result['eval_samples']} held-out samples each",
        "",
    ]
    lines += _rows_table(result["rows"], tasks, METHODS, "experts", lambda r: f"{r['keep']:>7}")
    t = result["timings"]
    lines += [
        "",
        f"calibrate: {t['calibrate_per_task_s']:.2f}s per task ({result['calib_samples']} samples); "
        f"re-fit: {t.get('refit_per_task_s', 0):.2f}s per task (every keep count in one pass); "
        f"prune: {t['prune_per_model_s']:.2f}s per model (write + reload check); total {t['total_s']:.0f}s",
    ]
    if result.get("dense"):
        lines += ["", _format_dense(result["dense"], tasks, result["eval_samples"])]
    return "\n".join(lines)


def _rows_table(rows, tasks: list[str], labels: dict[str, str], size_name: str, size) -> list[str]:
    """The demo's table: one row per pruning (label, size column, weight bytes, accuracy per task, mean, retained,
    perplexity of the held-out completions, token-weighted over tasks)."""
    head = (
        f"{'pruning':<26} {size_name:>7} {'weights':>9}  "
        + " ".join(f"{t:>7}" for t in tasks)
        + f" {'mean':>7} {'retained':>8} {'ppl':>8}"
    )
    out = [head, "-" * len(head)]
    for r in rows:
        label = "dense (no pruning)" if r["method"] == "dense" else labels[r["method"]]
        accs = " ".join(f"{r['accuracy'][t]:>7.3f}" for t in tasks)
        out.append(
            f"{label:<26} {size(r)} {r['bytes'] / 2**20:>7.2f}MB  {accs} {r['mean']:>7.3f} {r['retention']:>8.1%}"
            + (f" {r['perplexity']:>8.3f}" if "perplexity" in r else "")
        )
    return out


def _format_dense(d: dict[str, Any], tasks: list[str], eval_samples: int) -> str:
    m = d["model"]
    lines = [
        f"premoe demo, dense (SEAP): {m['architecture']} ({m['layers']} layers, {m['heads']} heads over "
        f"{m['kv_heads']} KV heads, FFN {m['intermediate']}), same tasks and samples",
        "",
    ]
    lines += _rows_table(d["rows"], tasks, DENSE_METHODS, "removed", lambda r: f"{r['sparsity']:>7.1%}")
    lines += [
        "",
        "removed: decoder linear weights removed, as counted in the written checkpoint (SEAP: one "
        f"checkpoint per task); dense part {d['seconds']:.0f}s",
    ]
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help=HELP, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument(
        "--keep", dest="keeps", type=int, nargs="+", help="MoE keep counts (default: 1/2, 1/4, 1/8 of the experts)"
    )
    p.add_argument("--sparsity", dest="sparsities", type=float, nargs="+", help="dense sparsities (default: 0.2 0.5)")
    p.add_argument("--no-dense", action="store_true", help="run the MoE part only")
    p.add_argument("--eval-samples", type=int, default=100, help="held-out samples per task (default 100)")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples per task (default 64)")
    p.add_argument("--workdir", help="keep the stores and pruned models here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run(args) -> int:
    import json

    result = demo(
        keeps=args.keeps,
        eval_samples=args.eval_samples,
        calib_samples=args.calib_samples,
        workdir=args.workdir,
        progress=not args.quiet,
        sparsities=args.sparsities,
        dense_model=None if args.no_dense else TINY_DENSE,
    )
    print(json.dumps(result) if args.json else format_table(result))
    return 0
