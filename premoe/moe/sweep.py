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
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from premoe.core.data import write_jsonl
from premoe.core.evaluation import exact_match
from premoe.moe.loading import load_model
from premoe.core.store import PatternStore
from premoe.errors import InputError
from premoe.moe.calibration import calibrate
from premoe.moe.patterns import plan_from_pattern, pooled_pattern
from premoe.moe.scoring import SCORERS
from premoe.moe.selective import ByteReader, build_model

DATA_FREE = {"random", "weights"}  # same ranking whatever the calibration data: one mode suffices


def builtin_tasks(calib_samples: int, eval_samples: int) -> dict[str, tuple[list[dict], list[dict]]]:
    from premoe.core.tasks import TASKS, samples

    return {t: (samples(t, calib_samples, "calib"), samples(t, eval_samples, "eval")) for t in TASKS}


def sweep(
    out: str | Path,
    model: str | Path | None = None,
    tasks: dict[str, tuple[Any, Any]] | None = None,
    keeps: list[int] | None = None,
    scorers: list[str] | None = None,
    calib_samples: int = 64,
    eval_samples: int = 100,
    overlap_keep: int | None = None,
    progress: bool = True,
    stream: bool | None = None,
    max_memory: float | None = None,
    sparsities: list[float] | None = None,
    methods: list[str] | None = None,
    schedule: str | None = None,
    count: str | None = None,
    refit: str | None = None,
    compensate: list[str] | None = None,
) -> dict[str, Any]:
    """Run the sweep and write results and pictures into ``out`` (a dense model: see
    :func:`premoe.dense.sweep.sweep_dense`, over ``sparsities`` and ``methods``).

    Args:
        out: output directory (created; ``work/`` inside it holds the store and calibration files).
        model: model directory (default: the shipped tiny MoE).
        tasks: {name: (calibration samples, evaluation samples)}, each a list of
            ``{"prompt", "completion"}`` dicts or a JSONL path (default: the built-in suite).
        keeps: experts kept per layer (default: 3/4, 1/2, 3/8, 1/4, 1/8 of the experts, at least top-k).
        scorers: scorer names (default: all).
        calib_samples / eval_samples: sizes of the built-in splits (ignored for given tasks).
        overlap_keep: keep count of the overlap picture (default: half the experts).
        stream / max_memory: for a model larger than memory (or ``max_memory`` MB): calibration streams
            it layer by layer and evaluation loads its layers on demand (``stream`` forces either way).
        schedule: dense models: one layer allocation for every method (``uniform``, ``logistic``,
            ``adaptive``) so criteria are compared on the same structure (default: each method's own).
        count: dense models: ``written`` (default; sparsity as ``premoe prune`` writes the checkpoint,
            padded plans made sparser in memory to match) or ``memory`` (as the papers count).
        refit: ``both``, ``on`` or ``off``: every method also (or only) with its kept weights re-fitted by
            least squares (dense: :mod:`premoe.dense.refit`, default both; MoE: :mod:`premoe.moe.refit`,
            task-specific rows only, default off).
        compensate: MoE models: compensation methods each added as ``<scorer>+<method>`` rows, from
            :data:`premoe.moe.compensate.COMPENSATIONS` (``refit``, ``scale``, ``merge``, ``merge+refit``);
            ``refit="on"`` drops the plain rows.
    """
    from premoe.showcase import TINY_MODEL

    logging.getLogger("premoe").setLevel(logging.WARNING)
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model_label = str(model) if model else "premoe/assets/tiny-moe (shipped)"
    model = Path(model or TINY_MODEL)
    from premoe.api import model_kind

    if model_kind(model) == "dense":
        from premoe.dense.sweep import sweep_dense

        if keeps or scorers or stream or max_memory or compensate:
            raise InputError("--keep/--scorers/--stream/--max-memory/--compensate apply to MoE models; for a dense "
                             "model use --sparsities and --methods")
        return sweep_dense(out, model, tasks or builtin_tasks(calib_samples, eval_samples), sparsities, methods, progress,
                           schedule=schedule, count=count or "written", refit=refit or "both")
    if sparsities or methods or schedule or count:
        raise InputError("--sparsities/--methods/--schedule/--count apply to dense models; for an MoE model use --keep "
                         "and --scorers")
    from premoe.moe.compensate import COMPENSATIONS

    variants = {None: [None], "off": [None], "on": ["refit"], "both": [None, "refit"]}.get(refit)
    if variants is None:
        raise InputError(f"refit must be 'off', 'on' or 'both', got {refit!r}")
    bad = [c for c in compensate or [] if c not in COMPENSATIONS]
    if bad:
        raise InputError(f"unknown compensation(s) {bad}; choose from {', '.join(COMPENSATIONS)}")
    if compensate:
        variants = list(dict.fromkeys([v for v in variants if refit != "on" or v] + list(compensate)))
    compensated = any(variants)
    scorers = scorers or list(SCORERS)
    bad = [s for s in scorers if s not in SCORERS]
    if bad:
        raise InputError(f"unknown scorer(s) {bad}; choose from {', '.join(SCORERS)}")
    tasks = tasks or builtin_tasks(calib_samples, eval_samples)
    from premoe.core.memory import fits, memory_budget
    from premoe.moe.model import inspect_model
    from premoe.core.config import load_tokenizer
    from premoe.moe.streaming import inference_model, resident_sizes

    info = inspect_model(model)
    budget = memory_budget(max_memory)
    in_memory = stream is not True and not info.quant.method and fits(resident_sizes(info)["total"], budget)
    if compensated and not in_memory:
        raise InputError("--refit/--compensate in an MoE sweep need the model in memory (they change the experts they "
                         "evaluate); drop --stream/--max-memory or use --refit off")
    lm = load_model(model, device="cpu", dtype=torch.float32) if in_memory else None
    tok = lm.tokenizer if lm else load_tokenizer(info.path)

    def network(plan, reader):
        if in_memory:
            return build_model(info, plan, reader).float()
        return inference_model(info, plan, reader, budget=budget, stream=stream)[0]

    E, K = info.num_experts, info.router.top_k
    keeps = sorted({k for k in (keeps or [E * 3 // 4, E // 2, E * 3 // 8, E // 4, E // 8]) if K <= k <= E}, reverse=True)
    if not keeps:
        raise InputError(f"no keep count between top-k {K} and {E} experts")
    evals = {name: _rows(ev) for name, (_, ev) in tasks.items()}
    work = out / "work"
    work.mkdir(exist_ok=True)
    store = work / "store"
    configs = [(s, m) for s in scorers for m in (("specific",) if s in DATA_FREE else ("specific", "agnostic"))]
    bar = tqdm(total=len(tasks) * 2 + len(configs) * len(keeps), desc="sweep", unit="step", disable=not progress)
    paths = {}
    for name, (cal, _) in tasks.items():
        path = paths[name] = cal if isinstance(cal, (str, Path)) else write_jsonl(work / f"{name}.calib.jsonl", cal)
        calibrate(lm or model, path, name, store, all_stats=True, overwrite=True, progress=False, stream=stream,
                  max_memory=max_memory)
        bar.update(1)
    st = PatternStore.open(store)
    patterns = {name: st.load(name) for name in tasks}
    pooled = pooled_pattern(st, list(tasks))
    dense = {}
    with ByteReader() as reader:
        net = lm.model if lm is not None else network(None, reader)
        for name in tasks:
            dense[name] = exact_match(net, tok, evals[name], progress=False)
            bar.update(1)
    captured, dense_layers = {}, None
    if compensated:  # each task's calibration tokens through the dense model, once (premoe.moe.refit)
        from premoe.core.data import CalibrationData
        from premoe.moe.refit import TOKENS, capture

        dense_layers = lm.layers
        for name in tasks:
            texts = [r.text for r in CalibrationData.open(paths[name], None, 1, 1).records()]
            captured[name] = capture(lm.model, dense_layers, info.router, tok, texts, TOKENS)
    else:
        del lm
    del net

    rows: list[dict[str, Any]] = []
    cache: dict[tuple, float] = {}
    runs = [(s, m, r) for s, m in configs for r in variants if not (r and m == "agnostic")]
    bar.total = len(tasks) * 2 + len(runs) * len(keeps)
    for scorer, mode, fit in runs:
        label = scorer + (f"+{fit}" if fit else "")
        for keep in keeps:
            for name in tasks:
                pattern = patterns[name] if mode == "specific" else pooled
                plan = plan_from_pattern(info, pattern, keep, scorer=scorer)
                key = (tuple(tuple(v) for v in plan.kept.values()), name, fit)
                if key not in cache:
                    with ByteReader() as reader:
                        net = network(plan, reader)
                        if fit:
                            COMPENSATIONS[fit](net, info.spec, plan, dense_layers, captured[name], info.router)
                        cache[key] = exact_match(net, tok, evals[name], progress=False)
                acc = cache[key]
                rows.append({"scorer": label, "mode": mode, "keep": keep, "task": name, "accuracy": acc,
                             "dense_accuracy": dense[name], "retention": acc / dense[name] if dense[name] else 0.0})
            bar.set_postfix_str(f"{label} {mode} {keep}")
            bar.update(1)
    bar.close()
    summary = _summary(rows)
    result = {
        "model": model_label, "experts": E, "top_k": K, "moe_layers": len(info.moe_layers), "tasks": list(tasks),
        "keeps": keeps, "scorers": list(dict.fromkeys(r["scorer"] for r in rows)), "dense": dense, "rows": rows,
        "summary": summary, "refit": refit or "off", "compensate": [v for v in variants if v],
        "calib_samples": calib_samples, "eval_samples": eval_samples,
    }
    result["seconds"] = time.perf_counter() - t_start
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
    return [{"scorer": s, "mode": m, "keep": k, "accuracy": sum(r["accuracy"] for r in g) / len(g),
             "retention": sum(r["retention"] for r in g) / len(g)} for (s, m, k), g in groups.items()]


def plot(out: Path, result: dict, importance: dict[str, torch.Tensor], kept: dict[str, dict], overlap_keep: int,
         layers: list[int]) -> list[str]:
    """Write the three pictures; returns their file names."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("premoe sweep draws its pictures with matplotlib: pip install 'premoe[plots]'") from None

    names = []
    fig, ax = plt.subplots(figsize=(11, 5.5))
    palette = plt.get_cmap("tab10" if len(result["scorers"]) <= 10 else "tab20").colors
    colors = {s: palette[i % len(palette)] for i, s in enumerate(result["scorers"])}
    for scorer in result["scorers"]:
        for mode, style in (("specific", "-"), ("agnostic", "--")):
            pts = sorted((r["keep"], 100 * r["retention"]) for r in result["summary"] if r["scorer"] == scorer and r["mode"] == mode)
            if pts:
                label = scorer + ("" if scorer in DATA_FREE else f", {'task-specific' if mode == 'specific' else 'task-agnostic'}")
                ax.plot(*zip(*pts), style, marker="o", color=colors[scorer], label=label, lw=2 if scorer == "tcess" else 1.2)
    ax.set_xlabel(f"experts kept per MoE layer (of {result['experts']}; top-{result['top_k']})")
    ax.set_ylabel("accuracy retained vs. dense, mean over tasks (%)")
    ax.set_title("Accuracy retention by expert-importance criterion")
    ax.set_xticks(result["keeps"])
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="solid: task-specific\ndashed: task-agnostic",
              title_fontsize=8)
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
            vals = [len(set(kept[tasks[a]][L]) & set(kept[tasks[b]][L])) / len(set(kept[tasks[a]][L]) | set(kept[tasks[b]][L]))
                    for L in layers]
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
    ax.set_title(f"Kept-set overlap between tasks\n(TCESS, {overlap_keep} of {result['experts']} kept, mean over layers)")
    fig.tight_layout()
    fig.savefig(out / "overlap.png", dpi=120)
    plt.close(fig)
    names.append("overlap.png")
    return names


def format_summary(result: dict) -> str:
    keeps = result["keeps"]
    w = max([14, *(len(s) for s in result["scorers"])])
    lines = [f"{'scorer':<{w}} {'mode':<9} " + " ".join(f"{k:>6}" for k in keeps)]
    by = {(r["scorer"], r["mode"], r["keep"]): r["retention"] for r in result["summary"]}
    for scorer in result["scorers"]:
        for mode in ("specific", "agnostic"):
            if (scorer, mode, keeps[0]) in by:
                lines.append(f"{scorer:<{w}} {mode:<9} " + " ".join(f"{100 * by[(scorer, mode, k)]:>5.1f}%" for k in keeps))
    return "\n".join(lines)
