"""``premoe sweep``: every scorer, task-specific and task-agnostic, at several keep counts.

Each task is calibrated once with every scorer's statistics (one pass); each (scorer, mode, keep)
then ranks experts from those statistics, the pruned model is built from the checkpoint (only its
experts are read) and evaluated on the task's held-out samples. Writes ``results.json`` and
``results.csv`` (one row per scorer, mode, keep and task), and three pictures:

* ``retention.png``: accuracy retention (pruned / dense, mean over tasks) vs. experts kept, one line
  per scorer, task-specific solid and task-agnostic dashed;
* ``importance.png``: per layer, each task's expert importance (TCESS) as a heatmap, so expert
  specialisation by task is visible;
* ``overlap.png``: how much the kept sets of different tasks overlap (Jaccard, mean over layers).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from premoe.core.config import load_tokenizer
from premoe.core.data import CalibrationData, write_jsonl
from premoe.core.evaluation import exact_match, perplexity
from premoe.core.options import MemoryOptions, RunOptions
from premoe.errors import InputError
from premoe.moe.calibration import calibrate
from premoe.moe.loading import load_model
from premoe.moe.model import ModelInfo
from premoe.moe.options import MoeCalibration, MoeSelection, MoeSweep
from premoe.moe.patterns import plan_from_pattern, pool_patterns
from premoe.moe.scoring import SCORERS
from premoe.moe.selective import ByteReader, build_model

DATA_FREE = {"random", "weights"}  # same ranking whatever the calibration data: one mode suffices


def sweep(
    out: str | Path,
    info: ModelInfo,
    tasks: dict[str, tuple[Any, Any]],
    opts: MoeSweep = MoeSweep(),
    *,
    variants: tuple[str, ...] | None = None,
    memory: MemoryOptions = MemoryOptions(),
    progress: bool = True,
    about: dict[str, Any] | None = None,
    overlap_keep: int | None = None,
) -> dict[str, Any]:
    """Run the sweep and write results and pictures into ``out``.

    Args:
        out: output directory (created; ``work/`` inside it holds the store and calibration files).
        info: the model.
        tasks: {name: (calibration samples, evaluation samples)}, each a list of ``{"prompt", "completion"}``
            dicts or a JSONL path.
        opts: keep counts (default: 3/4, 1/2, 3/8, 1/4, 1/8 of the experts, at least top-k) and scorers
            (default: all).
        variants: ``plain`` (the published selection) and compensations of the removed experts, each added as
            ``<scorer>+<variant>`` rows (task-specific only), from :data:`premoe.moe.compensate.COMPENSATIONS`:
            ``refit`` (least-squares down_proj under re-routing), ``scale``, ``merge``, ``merge+refit``,
            ``router``, ``refit+router`` (default: ``plain``).
        memory: for a model larger than memory: calibration streams it layer by layer and evaluation loads
            its layers on demand (``stream`` forces either way); compensations need it in memory.
        about: recorded in the results as they are (the model's label, the sizes of the built-in splits).
        overlap_keep: keep count of the overlap picture (default: half the experts).
    """
    import tempfile

    from premoe.core.distributed import agree_on_tasks, world
    from premoe.moe.compensate import COMPENSATIONS

    logging.getLogger("premoe").setLevel(logging.WARNING)
    w = world()
    progress = progress and w.main
    t_start = time.perf_counter()
    out = Path(out)
    variants = tuple(variants or ("plain",))
    bad = [v for v in variants if v != "plain" and v not in COMPENSATIONS]
    if bad:
        raise InputError(f"unknown `variants` {bad} for an MoE model; choose from plain, {', '.join(COMPENSATIONS)}")
    variants = tuple(None if v == "plain" else v for v in dict.fromkeys(variants))
    compensated = any(variants)
    scorers = list(opts.scorers or SCORERS)
    from premoe.core.memory import fits, memory_budget
    from premoe.moe.streaming import inference_model, resident_sizes

    model = info.path
    budget = memory_budget(memory.max_memory)
    stream = memory.stream
    in_memory = stream is not True and not info.quant.quantized and fits(resident_sizes(info)["total"], budget)
    if compensated and not in_memory:
        raise InputError(
            "compensation `variants` in an MoE sweep need the model in memory (they change the experts "
            "they evaluate); drop `stream`/`max_memory` or use `variants=('plain',)`"
        )
    # data-parallel: every rank sweeps the same model, samples and options
    agree_on_tasks(
        info.fingerprint.to_dict(), tasks, [repr(opts), variants, repr(memory.stream), in_memory], w, "sweep"
    )
    if w.main:  # rank 0 writes; the other ranks keep their copies of the calibration files in a temporary directory
        out.mkdir(parents=True, exist_ok=True)
    lm = load_model(model, device="cpu", dtype=torch.float32) if in_memory else None
    tok = lm.tokenizer if lm else load_tokenizer(info.path)

    def network(plan, reader):
        if in_memory:
            return build_model(info, plan, reader).float()
        return inference_model(info, plan, reader, budget=budget, stream=stream)[0]

    E, K = info.num_experts, info.router.top_k
    keeps = sorted(
        {k for k in (opts.keeps or [E * 3 // 4, E // 2, E * 3 // 8, E // 4, E // 8]) if K <= k <= E}, reverse=True
    )
    if not keeps:
        raise InputError(f"no keep count between top-k {K} and {E} experts")
    evals = {name: _rows(ev) for name, (_, ev) in tasks.items()}
    scratch = None if w.main else tempfile.TemporaryDirectory(prefix="premoe-sweep-rank-")
    work = out / "work" if scratch is None else Path(scratch.name)
    work.mkdir(exist_ok=True)
    store = work / "store"
    configs = [(s, m) for s in scorers for m in (("specific",) if s in DATA_FREE else ("specific", "agnostic"))]
    bar = tqdm(total=len(tasks) * 2 + len(configs) * len(keeps), desc="sweep", unit="step", disable=not progress)
    paths, patterns = {}, {}
    for name, (cal, _) in tasks.items():
        path = paths[name] = cal if isinstance(cal, (str, Path)) else write_jsonl(work / f"{name}.calib.jsonl", cal)
        patterns[name] = calibrate(  # under torchrun data-parallel; every rank gets the same pattern
            lm or info,
            CalibrationData.open(path),
            name,
            store,
            run=RunOptions(progress=False),
            memory=memory,
            calibration=MoeCalibration(all_stats=True),
            overwrite=True,
        ).as_stored()  # what the store holds, as one process reads it back
        bar.update(1)
    pooled = pool_patterns([patterns[name] for name in tasks])
    records = {name: [(r["prompt"], r["completion"]) for r in evals[name]] for name in tasks}

    def measure(net, name: str) -> tuple[float, float, int]:
        """Accuracy on the task's held-out samples, and the NLL of their completions (sum, tokens)."""
        ppl = perplexity(net, tok, records[name], progress=False, shard=w)
        return exact_match(net, tok, evals[name], progress=False, shard=w), ppl["nll"] * ppl["tokens"], ppl["tokens"]

    dense, dense_nll = {}, {}
    with ByteReader() as reader:
        net = lm.model if lm is not None else network(None, reader)
        for name in tasks:
            dense[name], *dense_nll[name] = measure(net, name)
            bar.update(1)
    captured, dense_layers = {}, None
    if compensated:  # each task's calibration tokens through the dense model, once (premoe.moe.refit)
        from premoe.moe.refit import TOKENS, capture

        dense_layers = lm.layers
        for name in tasks:
            texts = [r.text for r in CalibrationData.open(paths[name]).records()]
            captured[name] = capture(lm.model, dense_layers, info.router, tok, texts, TOKENS)
    else:
        del lm
    del net

    rows: list[dict[str, Any]] = []
    cache: dict[tuple, tuple[float, float, int]] = {}
    runs = [(s, m, r) for s, m in configs for r in variants if not (r and m == "agnostic")]
    bar.total = len(tasks) * 2 + len(runs) * len(keeps)
    for scorer, mode, fit in runs:
        label = scorer + (f"+{fit}" if fit else "")
        for keep in keeps:
            for name in tasks:
                pattern = patterns[name] if mode == "specific" else pooled
                plan = plan_from_pattern(info, pattern, MoeSelection(keep=keep, scorer=scorer))
                key = (tuple(tuple(v) for v in plan.kept.values()), name, fit)
                if key not in cache:
                    with ByteReader() as reader:
                        net = network(plan, reader)
                        if fit:
                            COMPENSATIONS[fit](net, info.spec, plan, dense_layers, captured[name], info.router)
                        cache[key] = measure(net, name)
                acc, nll, ntok = cache[key]
                rows.append(
                    {
                        "scorer": label,
                        "mode": mode,
                        "keep": keep,
                        "task": name,
                        "accuracy": acc,
                        "dense_accuracy": dense[name],
                        "retention": acc / dense[name] if dense[name] else 0.0,
                        "perplexity": math.exp(nll / ntok),
                        "dense_perplexity": math.exp(dense_nll[name][0] / dense_nll[name][1]),
                        "nll_sum": nll,
                        "tokens": ntok,
                    }
                )
            bar.set_postfix_str(f"{label} {mode} {keep}")
            bar.update(1)
    bar.close()
    summary = _summary(rows)
    result = {
        "model": str(model),
        "experts": E,
        "top_k": K,
        "moe_layers": len(info.moe_layers),
        "tasks": list(tasks),
        "keeps": keeps,
        "scorers": list(dict.fromkeys(r["scorer"] for r in rows)),
        "dense": dense,
        "dense_perplexity": math.exp(sum(v[0] for v in dense_nll.values()) / sum(v[1] for v in dense_nll.values())),
        "rows": rows,
        "summary": summary,
        "variants": [v or "plain" for v in variants],
        "kind": "moe",
        "out": str(out),
        **(about or {}),
    }
    result["seconds"] = time.perf_counter() - t_start
    if scratch is not None:
        scratch.cleanup()
    if not w.main:
        return result
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    overlap_keep = overlap_keep or E // 2
    importance = {n: p.means["tcess"] for n, p in patterns.items()}
    kept = {n: plan_from_pattern(info, p, max(K, min(E, overlap_keep))).kept for n, p in patterns.items()}
    result["pictures"] = plot(out, result, importance, kept, max(K, min(E, overlap_keep)), info.moe_layers)
    return result


def _rows(rows_or_path) -> list[dict]:
    if isinstance(rows_or_path, (str, Path)):
        from premoe.core.evaluation import read_eval_data

        gen, _ = read_eval_data(rows_or_path)
        return gen
    return list(rows_or_path)


def _summary(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["scorer"], r["mode"], r["keep"]), []).append(r)
    return [
        {
            "scorer": s,
            "mode": m,
            "keep": k,
            "accuracy": sum(r["accuracy"] for r in g) / len(g),
            "retention": sum(r["retention"] for r in g) / len(g),
            "perplexity": math.exp(sum(r["nll_sum"] for r in g) / sum(r["tokens"] for r in g)),  # token-weighted
        }
        for (s, m, k), g in groups.items()
    ]


def plot(
    out: Path,
    result: dict,
    importance: dict[str, torch.Tensor],
    kept: dict[str, dict],
    overlap_keep: int,
    layers: list[int],
) -> list[str]:
    """Write the three pictures; returns their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.getLogger(__name__).warning(
            "results written without pictures: they need matplotlib (pip install 'premoe[plots]')"
        )
        return []

    names = []
    fig, ax = plt.subplots(figsize=(11, 5.5))
    palette = plt.get_cmap("tab10" if len(result["scorers"]) <= 10 else "tab20").colors
    colors = {s: palette[i % len(palette)] for i, s in enumerate(result["scorers"])}
    for scorer in result["scorers"]:
        for mode, style in (("specific", "-"), ("agnostic", "--")):
            pts = sorted(
                (r["keep"], 100 * r["retention"])
                for r in result["summary"]
                if r["scorer"] == scorer and r["mode"] == mode
            )
            if pts:
                label = scorer + (
                    "" if scorer in DATA_FREE else f", {'task-specific' if mode == 'specific' else 'task-agnostic'}"
                )
                ax.plot(
                    *zip(*pts), style, marker="o", color=colors[scorer], label=label, lw=2 if scorer == "tcess" else 1.2
                )
    ax.set_xlabel(f"experts kept per MoE layer (of {result['experts']}; top-{result['top_k']})")
    ax.set_ylabel("accuracy retained vs. dense, mean over tasks (%)")
    ax.set_title("Accuracy retention by expert-importance criterion")
    ax.set_xticks(result["keeps"])
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        title="solid: task-specific\ndashed: task-agnostic",
        title_fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(out / "retention.png", dpi=120)
    plt.close(fig)
    names.append("retention.png")

    tasks = list(importance)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 0.5 * len(tasks) + 1.8), squeeze=False)
    for j, layer in enumerate(layers):
        mat = torch.stack([importance[t][j] / importance[t][j].sum().clamp_min(1e-12) for t in tasks])
        im = axes[0, j].imshow(mat.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        axes[0, j].set_title(f"layer {layer}")
        axes[0, j].set_xlabel("expert")
        axes[0, j].set_yticks(range(len(tasks)))
        axes[0, j].set_yticklabels(tasks if j == 0 else [])
    fig.colorbar(im, ax=axes[0, :].tolist(), label="share of the task's TCESS")
    fig.suptitle("Expert importance (TCESS) per task and MoE layer")
    fig.savefig(out / "importance.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    names.append("importance.png")

    n = len(tasks)
    jac = torch.zeros(n, n)
    for a in range(n):
        for b in range(n):
            vals = [
                len(set(kept[tasks[a]][L]) & set(kept[tasks[b]][L]))
                / len(set(kept[tasks[a]][L]) | set(kept[tasks[b]][L]))
                for L in layers
            ]
            jac[a, b] = sum(vals) / len(vals)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2, 1.0 * n + 1.5))
    im = ax.imshow(jac.numpy(), vmin=0, vmax=1, cmap="magma")
    for a in range(n):
        for b in range(n):
            ax.text(b, a, f"{jac[a, b]:.2f}", ha="center", va="center", color="white" if jac[a, b] < 0.6 else "black")
    ax.set_xticks(range(n))
    ax.set_xticklabels(tasks, rotation=45, ha="right")
    ax.set_yticks(range(n))
    ax.set_yticklabels(tasks)
    fig.colorbar(im, ax=ax, label="Jaccard overlap of kept experts")
    ax.set_title(
        f"Kept-set overlap between tasks\n(TCESS, {overlap_keep} of {result['experts']} kept, mean over layers)"
    )
    fig.tight_layout()
    fig.savefig(out / "overlap.png", dpi=120)
    plt.close(fig)
    names.append("overlap.png")
    return names


def format_summary(result: dict) -> str:
    """Retention (mean over tasks) and, where the results have it, perplexity of the held-out completions
    (token-weighted over tasks; the dense model's in the header) per scorer, mode and keep."""
    keeps = result["keeps"]
    w = max([14, *(len(s) for s in result["scorers"])])
    head = f"{'scorer':<{w}} {'mode':<9} " + " ".join(f"{k:>8}" for k in keeps)
    blocks = [("retention", lambda v: f"{100 * v:>7.1f}%", "retention vs dense")]
    if "dense_perplexity" in result:
        blocks.append(("perplexity", lambda v: f"{v:>8.3f}", f"perplexity (dense {result['dense_perplexity']:.3f})"))
    lines = []
    for field, fmt, title in blocks:
        by = {(r["scorer"], r["mode"], r["keep"]): r[field] for r in result["summary"] if field in r}
        lines += ([""] if lines else []) + [title, head]
        for scorer in result["scorers"]:
            for mode in ("specific", "agnostic"):
                if (scorer, mode, keeps[0]) in by:
                    lines.append(f"{scorer:<{w}} {mode:<9} " + " ".join(fmt(by[(scorer, mode, k)]) for k in keeps))
    return "\n".join(lines)
