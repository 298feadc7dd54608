"""``premoe demo``: the whole PreMoe pipeline on the shipped tiny MoE and the built-in task suite.

Calibrates every built-in task (TCESS), a task-agnostic pattern (all tasks' samples pooled) and a
seeded random pattern; prunes the model to several keep counts through the real export path
(safetensors rewrite + reload check); and reports greedy exact-match accuracy on held-out samples
with the weight bytes each model needs.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from premoe.api import calibrate, prune
from premoe.core.data import write_jsonl
from premoe.core.evaluation import exact_match
from premoe.core.loading import load_model
from premoe.core.tasks import TASKS, samples

TINY_MODEL = Path(__file__).parent / "assets" / "tiny-moe"
METHODS = {
    "tcess": "TCESS, task-specific",
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
) -> dict[str, Any]:
    """Run the demo; returns the results (see :func:`format_table`)."""
    logging.getLogger("premoe").setLevel(logging.WARNING)
    tasks = tasks or list(TASKS)
    with tempfile.TemporaryDirectory(prefix="premoe-demo-") as tmp:
        work = Path(workdir) if workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        return _run(Path(model), work, keeps, eval_samples, calib_samples, tasks, progress)


def _run(model: Path, work: Path, keeps, eval_samples, calib_samples, tasks, progress) -> dict[str, Any]:
    t_start = time.perf_counter()
    lm = load_model(model, device="cpu", dtype=torch.float32)
    info = lm.info
    E, K = info.num_experts, info.router.top_k
    keeps = sorted({k for k in (keeps or [E // 2, E // 4, E // 8]) if K <= k <= E}, reverse=True)
    evals = {t: samples(t, eval_samples, "eval") for t in tasks}
    calib = {t: samples(t, calib_samples, "calib") for t in tasks}
    store = work / "store"
    steps = len(tasks) + 2 + len(tasks) + len(keeps) * (len(tasks) + 2)
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
    pooled = [row for t in tasks for row in calib[t]]
    calibrate(lm, write_jsonl(work / "pooled.jsonl", pooled), AGNOSTIC, store, overwrite=True, progress=False)
    step("calibrate pooled")
    calibrate(lm, work / "pooled.jsonl", RANDOM, store, scorer="random", seed=0, overwrite=True, progress=False)
    step("random pattern")

    dense_bytes = info.checkpoint.nbytes
    dense = {}
    for t in tasks:
        dense[t] = exact_match(lm.model, lm.tokenizer, evals[t], progress=False)
        step(f"dense {t}")
    rows = [_row("dense", E, dense_bytes, dense)]

    prune_times = []
    for keep in keeps:
        for method in METHODS:
            pattern_for = {t: t if method == "tcess" else (AGNOSTIC if method == "agnostic" else RANDOM) for t in tasks}
            acc, nbytes = {}, 0
            for pattern in dict.fromkeys(pattern_for.values()):
                out = work / "models" / f"{pattern}-{keep}"
                t0 = time.perf_counter()
                res = prune(model, store, pattern, keep, out, overwrite=True, progress=False)
                prune_times.append(time.perf_counter() - t0)
                nbytes = res.bytes_written
                pruned = load_model(out, device="cpu", dtype=torch.float32)
                for t in (t for t, p in pattern_for.items() if p == pattern):
                    acc[t] = exact_match(pruned.model, pruned.tokenizer, evals[t], progress=False)
                step(f"{method} keep {keep}")
            rows.append(_row(method, keep, nbytes, {t: acc[t] for t in tasks}))
    bar.close()
    timings["prune_per_model_s"] = sum(prune_times) / len(prune_times) if prune_times else 0.0
    timings["total_s"] = time.perf_counter() - t_start
    dense_mean = rows[0]["mean"]
    for r in rows:
        r["retention"] = r["mean"] / dense_mean if dense_mean else 0.0
    return {
        "model": {"path": str(model), "architecture": info.fingerprint.architecture, "moe_layers": len(info.moe_layers),
                  "num_experts": E, "top_k": K},
        "tasks": tasks,
        "eval_samples": eval_samples,
        "calib_samples": calib_samples,
        "rows": rows,
        "timings": timings,
    }


def _row(method: str, keep: int, nbytes: int, acc: dict[str, float]) -> dict[str, Any]:
    return {"method": method, "keep": keep, "bytes": nbytes, "accuracy": acc, "mean": sum(acc.values()) / len(acc)}


def format_table(result: dict[str, Any]) -> str:
    m, tasks = result["model"], result["tasks"]
    lines = [
        f"premoe demo: {m['architecture']} ({m['moe_layers']} MoE layers x {m['num_experts']} experts, top-{m['top_k']}), "
        f"{len(tasks)} built-in tasks, greedy exact match on {result['eval_samples']} held-out samples each",
        "",
    ]
    head = f"{'pruning':<26} {'experts':>7} {'weights':>9}  " + " ".join(f"{t:>7}" for t in tasks) + f" {'mean':>7} {'retained':>8}"
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        label = "dense (no pruning)" if r["method"] == "dense" else METHODS[r["method"]]
        accs = " ".join(f"{r['accuracy'][t]:>7.3f}" for t in tasks)
        lines.append(f"{label:<26} {r['keep']:>7} {r['bytes'] / 2**20:>7.2f}MB  {accs} {r['mean']:>7.3f} {r['retention']:>8.1%}")
    t = result["timings"]
    lines += [
        "",
        f"calibrate: {t['calibrate_per_task_s']:.2f}s per task ({result['calib_samples']} samples); "
        f"prune: {t['prune_per_model_s']:.2f}s per model (write + reload check); total {t['total_s']:.0f}s",
    ]
    return "\n".join(lines)
