"""TAER with re-fitted rows stored with the patterns (``premoe refit``): what they buy when serving.

On the shipped tiny model and the built-in suite: each task is calibrated on --calib samples, then
``premoe refit --keep K...`` stores the re-fitted down projections of each task's kept experts. Every
held-out prompt (--queries per task) is routed to its nearest stored task, and served by a
:class:`premoe.moe.server.TaskServer` holding that task's experts: with the checkpoint's rows
(``--no-refit``, the paper's TAER) and with the stored rows (the default where they exist), side by
side in one run. Reported per keep: exact match as a share of the full model's (every expert kept,
same path), bytes read per task switch, and the re-fit's store footprint.

    python bench/taer_refit.py                     # keeps 16 8 4 of 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import premoe  # noqa: E402
from premoe.assets import TINY_MODEL  # noqa: E402
from premoe.core.data import write_jsonl  # noqa: E402
from premoe.core.evaluation import exact_match  # noqa: E402
from premoe.core.tasks import TASKS, samples  # noqa: E402
from premoe.moe.router import QueryRouter  # noqa: E402
from premoe.moe.server import TaskServer  # noqa: E402


def serve_all(store: Path, keep: int, refit: bool | None, groups: dict[str, list[dict]]) -> dict:
    """Exact match over every routed prompt, each group served with its retrieved task's experts."""
    server = TaskServer(TINY_MODEL, store, keep, refit=refit)
    right = n = switch_bytes = 0
    t0 = time.perf_counter()
    for task, group in groups.items():
        before = server.bytes_read
        server.load(task)
        switch_bytes += server.bytes_read - before
        right += exact_match(server.model, server.tokenizer, group, progress=False) * len(group)
        n += len(group)
    return {
        "exact_match": right / n,
        "bytes_per_switch": switch_bytes / len(groups),
        "refit_bytes": server.refit_bytes,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--calib", type=int, default=64, help="calibration samples per task")
    ap.add_argument("--queries", type=int, default=100, help="held-out prompts per task")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="premoe-taer-refit-"))
    try:
        store = work / "store"
        for t in TASKS:
            premoe.calibrate(
                TINY_MODEL, write_jsonl(work / f"{t}.jsonl", samples(t, args.calib, "calib")), t, store, progress=False
            )
        t0 = time.perf_counter()
        premoe.refit(TINY_MODEL, store, args.keep, progress=False)
        refit_seconds = time.perf_counter() - t0
        footprint = sum(f.stat().st_size for f in (store / "refits").rglob("*.safetensors"))
        router = QueryRouter(TINY_MODEL, store)
        groups: dict[str, list[dict]] = {}
        prompts = [s for t in TASKS for s in samples(t, args.queries, "eval")]
        for s in prompts:
            groups.setdefault(router.route(s["prompt"]).task, []).append(s)
        full = serve_all(store, premoe.inspect_model(TINY_MODEL).num_experts, None, groups)
        rows = []
        for keep in args.keep:
            for refit in (False, None):
                r = serve_all(store, keep, refit, groups)
                rows.append(
                    {
                        "keep": keep,
                        "rows": "stored re-fit" if refit is None else "checkpoint (--no-refit)",
                        "retention": r["exact_match"] / full["exact_match"],
                        **r,
                    }
                )
        out = {
            "full_exact_match": full["exact_match"],
            "prompts": len(prompts),
            "refit_seconds": refit_seconds,
            "store_refit_bytes": footprint,
            "rows": rows,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"{len(prompts)} held-out prompts, each routed and served with its retrieved task's experts; full model "
        f"exact match {out['full_exact_match']:.3f}; `premoe refit --keep {' '.join(map(str, args.keep))}` for "
        f"{len(TASKS)} tasks: {refit_seconds:.1f}s, {footprint / 2**20:.2f} MB in the store"
    )
    print(f"{'keep':>4}  {'rows':<24} {'exact match':>11} {'retention':>9} {'KB read per switch':>19}")
    for r in rows:
        print(
            f"{r['keep']:>4}  {r['rows']:<24} {r['exact_match']:>11.3f} {100 * r['retention']:>8.1f}% "
            f"{r['bytes_per_switch'] / 1024:>19.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
