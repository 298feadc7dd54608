"""``premoe inspect``: what a pattern store holds: the model it was built for and, per task, what was
calibrated (samples, tokens, scorer, how concentrated the experts are, scorers available, stored re-fits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HELP = "summarise a pattern store"


def inspect(store: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a pattern store: its model and, per task, what was calibrated.

    Raises:
        StoreError: no store there, or a corrupt one.
    """
    from premoe.core.store import PatternStore
    from premoe.moe.patterns import experts_for_mass
    from premoe.moe.scoring import SCORERS

    st = PatternStore.open(store)
    manifest = st.manifest()
    dense = st.kind == "dense"
    tasks = {}
    for name, entry in sorted(manifest["tasks"].items()):
        pattern = st.load(name)
        row = {k: entry.get(k) for k in ("samples", "tokens", "scorer", "params", "created", "data")}
        if not dense:
            concentration = pattern.means.get("tcess", pattern.scores)
            row.update(
                experts_for_90pct=round(experts_for_mass(concentration, 0.9), 2),
                scorers=[n for n, sc in SCORERS.items() if all(k in pattern.means for k in sc.needs)],
                top_experts={
                    str(layer): row.argsort(descending=True)[:8].tolist()
                    for layer, row in zip(pattern.layers, pattern.scores)
                },
            )
        row["refits"] = sorted(
            (
                {k: r.get(k) for k in ("keep", "top_k", "group_policy", "scorer", "experts", "dir")}
                for r in entry.get("refits", {}).values()
            ),
            key=lambda r: r["keep"],
        )
        tasks[name] = row
    return {
        "path": str(st.path),
        "version": manifest["version"],
        "kind": "dense" if dense else "moe",
        "model": manifest["model"],
        "tasks": tasks,
    }


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help=HELP, description=__doc__)
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from premoe.kinds import backend

    summary = inspect(args.store)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"store {summary['path']}: {backend(summary['kind']).describe_store(summary['model'])}")
    if not summary["tasks"]:
        print("no tasks")
        return 0
    print(
        f"{'task':<20} {'scorer':<10} {'samples':>8} {'tokens':>9} {'experts for 90%':>16}  {'created':<25}  "
        "--scorer options  re-fitted --keep"
    )
    for name, t in summary["tasks"].items():
        print(
            f"{name:<20} {t['scorer']:<10} {t['samples']:>8} {t['tokens']:>9} {t.get('experts_for_90pct', '-'):>16}  "
            f"{t['created']:<25}  {','.join(t.get('scorers', [])) or '-':<16}  "
            f"{','.join(str(r['keep']) for r in t['refits']) or '-'}"
        )
    return 0
