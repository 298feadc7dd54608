"""``premoe sweep`` on a dense model: SEAP, SEAP-gen, Wanda-sp, FLAP and random at several sparsities,
side by side, plus task routing (held-out routing accuracy and routed vs oracle accuracy).

Every task is calibrated once; each (method, sparsity) plan is applied to the model in memory
(unpruned tensors shared, pruned ones sliced) and evaluated on each task's held-out samples.
Writes ``results.json``, ``results.csv`` and ``retention.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from premoe.core.data import CalibrationData, write_jsonl
from premoe.core.distributed import agree_on_tasks, broadcast, world
from premoe.core.evaluation import exact_match, perplexity
from premoe.core.options import RunOptions
from premoe.dense.calibration import calibrate_dense
from premoe.dense.model import DenseInfo, load_dense, prune_in_memory
from premoe.dense.options import DenseSweep
from premoe.dense.plans import METHODS, make_dense_plan
from premoe.dense.refit import apply_grams, pool_grams, stream_grams
from premoe.dense.router import DenseRouter
from premoe.dense.scoring import pooled
from premoe.errors import InputError

DEFAULT_SPARSITIES = (0.2, 0.35, 0.5)


def sweep_dense(
    out,
    info: DenseInfo,
    tasks: dict[str, tuple[Any, Any]],
    opts: DenseSweep = DenseSweep(),
    *,
    variants: tuple[str, ...] | None = None,
    progress: bool = True,
    about: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every method at every sparsity (``opts``), counted as ``premoe prune`` writes the checkpoint
    (``opts.count`` "written", the default: a plan whose layers differ, FLAP's adaptive one, is made sparser
    in memory until its zero-padded checkpoint removes the fraction asked) or in memory ("memory", as the
    FLAP and SEAP papers count). Rows report both counts.

    ``variants``: ``plain`` (the methods as published) and ``refit`` (each plan's kept o_proj/down_proj
    columns re-fitted by least squares on the calibration data its statistics came from, rows named
    ``<method>+refit``; see :mod:`premoe.dense.refit`); default both, side by side. ``about`` is recorded in
    the results as it is."""
    allowed = {"plain": False, "refit": True}
    bad = [v for v in variants or () if v not in allowed]
    if bad:
        raise InputError(f"unknown `variants` {bad} for a dense model; choose from plain, refit")
    variants = [allowed[v] for v in dict.fromkeys(variants or ("plain", "refit"))]
    schedule, count = opts.schedule, opts.count
    model = info.path
    t0 = time.perf_counter()
    out = Path(out)
    w = world()
    progress = progress and w.main
    sparsities = [float(s) for s in (opts.sparsities or DEFAULT_SPARSITIES)]
    methods = list(opts.methods or METHODS)
    # data-parallel: every rank sweeps the same model, samples and options
    agree_on_tasks(info.fingerprint.to_dict(), tasks, [repr(opts), variants], w, "sweep")
    # rank 0 writes; the other ranks keep their copies of the data files in a temporary directory
    scratch = None if w.main else tempfile.TemporaryDirectory(prefix="premoe-sweep-rank-")
    if scratch is None:
        out.mkdir(parents=True, exist_ok=True)
    data = out / "data" if scratch is None else Path(scratch.name)
    data.mkdir(exist_ok=True)
    files = {}
    for name, (calib, ev) in tasks.items():
        files[name] = [
            write_jsonl(data / f"{name}.calib.jsonl", calib) if isinstance(calib, list) else Path(calib),
            write_jsonl(data / f"{name}.eval.jsonl", ev) if isinstance(ev, list) else Path(ev),
        ]
    store = out / "store" if scratch is None else data / "store"
    stats = {}
    for name, (calib, _) in files.items():  # under torchrun data-parallel; every rank gets the same statistics
        stats[name] = (
            calibrate_dense(
                info, CalibrationData.open(calib), name, store, run=RunOptions(progress=progress), overwrite=True
            )
            .as_stored()
            .means
        )
    info, lm, tok = load_dense(model, device="cpu", dtype=torch.float32)
    pool = pooled(list(stats.values()))
    evals = {n: _read(files[n][1]) for n in files}
    dense = {n: exact_match(lm, tok, evals[n], progress=False, shard=w) for n in files}

    def nll(net, name: str) -> tuple[float, int]:
        """The NLL of the task's held-out completions given their prompts (sum over tokens, tokens)."""
        got = perplexity(net, tok, [(r["prompt"], r["completion"]) for r in evals[name]], progress=False, shard=w)
        return got["nll"] * got["tokens"], got["tokens"]

    dense_nll = {n: nll(lm, n) for n in files}
    grams: dict[str | None, dict] = {}
    if True in variants:  # every task's Gram matrices once (streamed from the checkpoint, as premoe prune --refit does)
        for name in files:
            per: dict = {}
            texts = [r.text for r in CalibrationData.open(files[name][0]).records()]
            stream_grams(info, tok, [texts], per.__setitem__, progress=False, shard=w)
            grams[name] = _broadcast_grams(info, per, w)
        grams[None] = pool_grams([grams[n] for n in files])
    weights = {}

    def weight(layer, site):
        key = (layer, site)
        if key not in weights:
            weights[key] = lm.get_parameter(info.key(layer, site)).detach()
        return weights[key]

    plans = {}

    def plan_for(method: str, s: float, name: str, refit: bool = False):
        """One plan per (method, sparsity, task), or per (method, sparsity) for pooled methods; re-fitted
        on the same data as its statistics with ``refit``."""
        own = METHODS[method].source == "task"
        key = (method, s, name if own else None)
        if key not in plans:
            plans[key] = make_dense_plan(
                info,
                stats[name] if own else pool,
                method,
                s,
                schedule=schedule,
                weights=weight,
                task=name,
                written=count == "written",
            )
        if not refit:
            return plans[key]
        if key + ("refit",) not in plans:
            base = plans[key]
            plans[key + ("refit",)] = apply_grams(
                info, replace(base, bias={}, refit={}, info=dict(base.info)), grams[key[2]], weight
            )
        return plans[key + ("refit",)]

    rows = []
    labels = [m + ("+refit" if r else "") for m in methods for r in variants]
    bar = tqdm(total=len(labels) * len(sparsities) * len(files), desc="sweep", disable=not progress)
    for method, label, fit in ((m, m + ("+refit" if r else ""), r) for m in methods for r in variants):
        for s in sparsities:
            for name in files:
                plan = plan_for(method, s, name, fit)
                net = prune_in_memory(lm, info, plan)
                acc = exact_match(net, tok, evals[name], progress=False, shard=w)
                loss, ntok = nll(net, name)
                rows.append(
                    {
                        "method": label,
                        "sparsity": s,
                        "task": name,
                        "accuracy": acc,
                        "dense": dense[name],
                        "retention": acc / dense[name] if dense[name] else 0.0,
                        "perplexity": math.exp(loss / ntok),
                        "dense_perplexity": math.exp(dense_nll[name][0] / dense_nll[name][1]),
                        "nll_sum": loss,
                        "tokens": ntok,
                        "sparsity_counted": plan.info["sparsity"],
                        "sparsity_written": plan.info["sparsity_written"],
                        "schedule": plan.info["schedule"],
                    }
                )
                bar.update(1)
    bar.close()
    summary = []
    for method in labels:
        for s in sparsities:
            sel = [r for r in rows if r["method"] == method and r["sparsity"] == s]
            summary.append(
                {
                    "method": method,
                    "sparsity": s,
                    "accuracy": sum(r["accuracy"] for r in sel) / len(sel),
                    "retention": sum(r["retention"] for r in sel) / len(sel),
                    "perplexity": math.exp(sum(r["nll_sum"] for r in sel) / sum(r["tokens"] for r in sel)),
                    "sparsity_counted": sum(r["sparsity_counted"] for r in sel) / len(sel),
                    "sparsity_written": sum(r["sparsity_written"] for r in sel) / len(sel),
                }
            )
    routed = lambda m, s, name: plan_for(m, s, name, variants[-1])  # noqa: E731 - SEAP as premoe prunes it (re-fitted when on)
    # routing reads the store rank 0 wrote: rank 0 measures it alone
    routing = _routing(info, store, evals, lm, tok, sparsities, routed) if len(files) > 1 and w.main else None
    if routing:
        routing["method"] = "seap" + ("+refit" if variants[-1] else "")
    result = {
        "model": str(model),
        "kind": "dense",
        "out": str(out),
        "tasks": list(files),
        "sparsities": sparsities,
        "methods": labels,
        "variants": ["refit" if v else "plain" for v in variants],
        "schedule": schedule or "each method's own",
        "count": count,
        "dense": dense,
        "dense_mean": sum(dense.values()) / len(dense),
        "dense_perplexity": math.exp(sum(v[0] for v in dense_nll.values()) / sum(v[1] for v in dense_nll.values())),
        "summary": summary,
        "rows": rows,
        "routing": routing,
        "seconds": time.perf_counter() - t0,
        **(about or {}),
    }
    if scratch is not None:
        scratch.cleanup()
        return result
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result["pictures"] = _plot(out, result)
    return result


def _broadcast_grams(info: DenseInfo, grams: dict, w) -> dict:
    """Rank 0's Gram matrices of every layer (what :func:`stream_grams` hands rank 0 alone) on every rank."""
    if not w.parallel:
        return grams
    width = {"o": info.heads * info.head_dim + 1, "down": info.intermediate + 1}
    return {
        layer: {
            site: broadcast(grams[layer][site] if w.main else torch.zeros(n, n), w, "the Gram matrices' broadcast")
            for site, n in width.items()
        }
        for layer in range(info.num_layers)
    }


def _read(path: Path) -> list[dict]:
    from premoe.core.evaluation import read_eval_data

    gen, _ = read_eval_data(path)
    if not gen:
        raise InputError(f'{path}: the dense sweep needs {{"prompt", "completion"}} samples')
    return gen


def _routing(info, store, evals, lm, tok, sparsities, plan_for) -> dict[str, Any]:
    """Held-out routing accuracy, and SEAP accuracy when each prompt gets the mask of the task it is
    routed to (routed) vs of its true task (oracle)."""
    router = DenseRouter(info, store)
    routed = {}
    correct = total = 0
    for name, ev in evals.items():
        res = router.route_many([r["prompt"] for r in ev])
        routed[name] = [r.task for r in res]
        correct += sum(t == name for t in routed[name])
        total += len(ev)
    out: dict[str, Any] = {
        "accuracy": correct / total,
        "prompts": total,
        "depth": router.depth,
        "bytes_read": router.bytes_read,
    }
    for s in sparsities:
        oracle = routed_acc = 0.0
        nets = {}
        for name in evals:
            nets[name] = prune_in_memory(lm, info, plan_for("seap", s, name))
        for name, ev in evals.items():
            oracle += exact_match(nets[name], tok, ev, progress=False) / len(evals)
            hits = 0.0
            for task in set(routed[name]):
                part = [r for r, t in zip(ev, routed[name]) if t == task]
                hits += exact_match(nets[task], tok, part, progress=False) * len(part)
            routed_acc += hits / len(ev) / len(evals)
        out[str(s)] = {"oracle": oracle, "routed": routed_acc}
    return out


def _plot(out: Path, result: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(__name__).warning(
            "results written without a picture: it needs matplotlib (pip install 'premoe[plots]')"
        )
        return []
    fig, ax = plt.subplots(figsize=(8, 5))
    colors: dict[str, str] = {}
    key = "sparsity_written" if result.get("count", "written") == "written" else "sparsity_counted"
    for method in result["methods"]:
        base = method.removesuffix("+refit")
        color = colors.setdefault(base, f"C{len(colors)}")
        pts = sorted((100 * r[key], 100 * r["retention"]) for r in result["summary"] if r["method"] == method)
        ax.plot(
            *zip(*pts),
            marker="o",
            label=method,
            color=color,
            ls="-" if method.endswith("+refit") or "refit" not in result.get("variants", ("plain", "refit")) else "--",
            lw=2 if base == "seap" else 1.2,
        )
    ax.set_xlabel(
        "decoder linear weights removed (%, " + ("as written" if key == "sparsity_written" else "in memory") + ")"
    )
    ax.set_ylabel("accuracy retained vs dense (%, mean over tasks)")
    ax.set_title(f"{Path(result['model']).name}: structured pruning, held-out exact match")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=120)
    plt.close(fig)
    return ["retention.png"]


def format_dense_summary(result: dict) -> str:
    counted = "in the written checkpoint" if result.get("count", "written") == "written" else "in memory"
    lines = [
        f"accuracy retained vs. dense (mean over tasks), by fraction of decoder weights removed {counted}; "
        f"layer allocation: {result.get('schedule', 'each method' + chr(39) + 's own')}",
        f"{'method':<16}" + "".join(f"{f'{s:.0%}':>10}" for s in result["sparsities"]),
    ]
    for m in result["methods"]:
        cells = [
            next(r for r in result["summary"] if r["method"] == m and r["sparsity"] == s) for s in result["sparsities"]
        ]
        lines.append(f"{m:<16}" + "".join(f"{100 * c['retention']:>9.1f}%" for c in cells))
    if "dense_perplexity" in result:
        lines.append(f"perplexity of the held-out completions (dense {result['dense_perplexity']:.3f})")
        for m in result["methods"]:
            cells = [
                next(r for r in result["summary"] if r["method"] == m and r["sparsity"] == s)
                for s in result["sparsities"]
            ]
            lines.append(f"{m:<16}" + "".join(f"{c['perplexity']:>10.3f}" for c in cells))
    key = "sparsity_written" if result.get("count", "written") == "written" else "sparsity_counted"
    off = [
        (c["method"], c["sparsity"], c[key])
        for c in result["summary"]
        if abs(c.get(key, c["sparsity"]) - c["sparsity"]) > 0.005
    ]
    if off:
        lines.append(
            "actually removed where it differs (a layer-varying plan's padded size moves in steps; premoe takes "
            "the first step at or above the request): " + ", ".join(f"{m} {s:.0%} -> {v:.1%}" for m, s, v in off)
        )
    if result.get("routing"):
        r = result["routing"]
        lines.append(
            f"routing: {100 * r['accuracy']:.1f}% of {r['prompts']} held-out prompts (depth {r['depth']}); "
            f"{r.get('method', 'seap')} "
            + ", ".join(
                f"{float(s):.0%}: routed {100 * v['routed']:.1f} vs oracle {100 * v['oracle']:.1f}"
                for s, v in r.items()
                if isinstance(v, dict)
            )
        )
    return "\n".join(lines)
