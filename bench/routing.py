"""Routing accuracy of every signature setting on held-out queries of the built-in task suite.

Part 1 calibrates the built-in tasks on the shipped model (calibration split, prompt+completion),
then routes held-out prompts (evaluation split, prompts only, as a user would send them) with every
combination of statistic, key source, MoE layers, normalisation and metric.

Part 2 is harder and covers every router family: for the tiny model of each family in
premoe.testing.FAMILIES, eight synthetic "tasks" are overlapping random character distributions;
keys come from 8 samples of 24 characters, queries are 4 to 8 characters long.

Together they are the evidence behind premoe.core.options.SignatureSpec's defaults.

    python bench/routing.py [--queries 200] [--calib 64]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import premoe  # noqa: E402
from premoe.assets import TINY_MODEL  # noqa: E402
from premoe.core.data import write_jsonl  # noqa: E402
from premoe.core.options import METRICS, NORMS, SOURCES, STATS, SignatureSpec  # noqa: E402
from premoe.core.retrieval import Retriever
from premoe.core.store import PatternStore  # noqa: E402
from premoe.core.tasks import TASKS, samples  # noqa: E402
from premoe.moe.loading import load_model
from premoe.moe.model import inspect_model
from premoe.moe.signature import SignatureModel  # noqa: E402


def query_stats(sm: SignatureModel, prompts: list[str]) -> dict[str, torch.Tensor]:
    """{stat: [Q, M, E]} signatures of every prompt (one pass per prompt, as at query time)."""
    sigs = [sm.signature(p) for p in prompts]
    return {s: torch.stack([g[s] for g in sigs]) for s in STATS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=200, help="held-out prompts per task")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples per task")
    ap.add_argument("--model", default=str(TINY_MODEL))
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="premoe-routing-"))
    lm = load_model(args.model, device="cpu", dtype=torch.float32)
    for t in TASKS:
        premoe.calibrate(
            lm, write_jsonl(work / f"{t}.jsonl", samples(t, args.calib, "calib")), t, work / "store", progress=False
        )
    store = PatternStore.open(work / "store")
    info = inspect_model(args.model)
    M = store.load(next(iter(TASKS))).info["signature"]["layers"]
    sm = SignatureModel.from_checkpoint(info, lm.tokenizer, M)
    prompts, truth = [], []
    for t in TASKS:
        for s in samples(t, args.queries, "eval"):
            prompts.append(s["prompt"])
            truth.append(t)
    stats = query_stats(sm, prompts)

    rows = []
    for layers, stat, source, norm, metric in itertools.product(range(1, M + 1), STATS, SOURCES, NORMS, METRICS):
        spec = SignatureSpec(layers, stat, source, norm, metric)
        r = Retriever.from_store(store, spec)
        routed = [x.task for x in r.route_stats(stats[stat])]
        acc = sum(a == b for a, b in zip(routed, truth)) / len(truth)
        rows.append((acc, spec))
    default = SignatureSpec()
    print(
        f"{len(prompts)} held-out prompts ({args.queries} per task, {len(TASKS)} tasks); keys from {args.calib} "
        "calibration samples per task"
    )
    print(f"{'accuracy':>8}  layers stat     source norm metric")
    for acc, s in sorted(rows, key=lambda r: -r[0]):
        mark = "  <- default" if s == default else ""
        print(f"{acc:>8.3f}  {s.layers:>6} {s.stat:<8} {s.source:<6} {s.norm:<4} {s.metric}{mark}")
    summarize(rows)
    synthetic(args.queries)


def summarize(rows) -> None:
    by = {}
    for acc, s in rows:
        for field in ("stat", "source", "norm", "metric", "layers"):
            by.setdefault((field, getattr(s, field)), []).append(acc)
    print("\nmean / min accuracy by setting:")
    for (field, value), accs in sorted(by.items()):
        print(f"  {field:<7} {str(value):<8} mean {sum(accs) / len(accs):.3f}  min {min(accs):.3f}")


def synthetic(n_queries: int, n_tasks: int = 8, seed: int = 0) -> None:
    import random

    from premoe.testing import FAMILIES, build_model, save_model

    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # Dirichlet sampling uses the global generator
    dists = [torch.distributions.Dirichlet(torch.full((len(alphabet),), 0.3)).sample() for _ in range(n_tasks)]

    def draw(d, n):
        return "".join(alphabet[i] for i in torch.multinomial(d, n, replacement=True, generator=gen).tolist())

    per_family = {}
    for fam, (model_type, overrides, _) in FAMILIES.items():
        work = Path(tempfile.mkdtemp(prefix=f"premoe-routing-{fam}-"))
        src = save_model(*build_model(model_type, overrides), work / "model")
        lm = load_model(src, device="cpu")
        for j, d in enumerate(dists):
            rows = [{"text": draw(d, 24)} for _ in range(8)]
            premoe.calibrate(lm, write_jsonl(work / f"t{j}.jsonl", rows), f"t{j}", work / "store", progress=False)
        store = PatternStore.open(work / "store")
        sm = SignatureModel.from_checkpoint(lm.info, lm.tokenizer, 1)
        prompts, truth = [], []
        for j, d in enumerate(dists):
            for _ in range(n_queries // 4):
                prompts.append(draw(d, rng.randint(4, 8)))
                truth.append(f"t{j}")
        stats = query_stats(sm, prompts)
        for stat, norm, metric in itertools.product(STATS, NORMS, METRICS):
            spec = SignatureSpec(1, stat, "prompt", norm, metric)
            routed = [x.task for x in Retriever.from_store(store, spec).route_stats(stats[stat])]
            per_family.setdefault((stat, norm, metric), {})[fam] = sum(a == b for a, b in zip(routed, truth)) / len(
                truth
            )
    fams = list(FAMILIES)
    print(
        f"\nsynthetic overlapping tasks, {n_tasks} per model, {n_queries // 4} queries each, 1 MoE layer; "
        "accuracy per family"
    )
    print(f"{'stat':<8} {'norm':<4} {'metric':<6} {'mean':>6} " + " ".join(f"{f[:9]:>9}" for f in fams))
    default = SignatureSpec()
    for key, accs in sorted(per_family.items(), key=lambda kv: -sum(kv[1].values())):
        mean = sum(accs.values()) / len(accs)
        mark = "  <- default" if key == (default.stat, default.norm, default.metric) else ""
        print(f"{key[0]:<8} {key[1]:<4} {key[2]:<6} {mean:>6.3f} " + " ".join(f"{accs[f]:>9.3f}" for f in fams) + mark)


if __name__ == "__main__":
    main()
