"""Exactness contract and the README's family table, measured for every family.

For each tiny model of premoe.testing.FAMILIES: calibrate on one short input, prune to the smallest
keep count that holds every expert that input routes to, reload the export with plain transformers
and compare logits on the same input with the unpruned model. Also records how the family routes,
its hub expert-count key, its on-disk expert layout and whether it can be calibrated layer by layer.

    python bench/exactness.py              # the plain table
    python bench/exactness.py --markdown   # the README's family table
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import premoe  # noqa: E402
from premoe.core.data import write_jsonl  # noqa: E402
from premoe.core.store import PatternStore  # noqa: E402
from premoe.errors import UnsupportedModelError  # noqa: E402
from premoe.moe.families import resolve, supported_model_types  # noqa: E402
from premoe.moe.loading import load_model
from premoe.moe.model import inspect_model
from premoe.testing import FAMILIES, build_model, save_model  # noqa: E402

TEXT = "ab"


def measure(name: str, model_type: str, overrides: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src = save_model(*build_model(model_type, overrides), d / "src")
        data = write_jsonl(d / "one.jsonl", [{"text": TEXT}])
        premoe.calibrate(src, data, "one", d / "s", progress=False)
        try:
            premoe.calibrate(src, data, "st", d / "s", stream=True, progress=False)
            streams = True
        except UnsupportedModelError:
            streams = False
        info = inspect_model(src)
        p = PatternStore.open(d / "s").load("one")
        hits = [(row > 0).nonzero().flatten().tolist() for row in p.means["count"]]
        r = info.router
        if r.group_limited:
            size = r.num_experts // r.n_group
            per = max(sum(1 for e in h if e // size == g) for h in hits for g in range(r.n_group))
            keep = r.n_group * max(per, 2)
        else:
            keep = max(r.top_k, max(len(h) for h in hits))
        premoe.prune(src, d / "s", "one", keep, d / "out", progress=False)
        a, b = load_model(src, device="cpu"), load_model(d / "out", device="cpu")
        with torch.no_grad():
            x = a.model(**a.tokenizer(TEXT, return_tensors="pt"), use_cache=False).logits.float()
            y = b.model(**b.tokenizer(TEXT, return_tensors="pt"), use_cache=False).logits.float()
        kinds = {role.kind for role in info.roles.values()}
        return {
            "family": name,
            "spec": info.spec,
            "experts": info.num_experts,
            "keep": keep,
            "diff": (x - y).abs().max().item(),
            "rel": ((x - y).norm() / x.norm()).item(),
            "same_argmax": bool(torch.equal(x.argmax(-1), y.argmax(-1))),
            "exact": FAMILIES[name][2],
            "layout": "per expert" if "expert" in kinds else "fused",
            "streams": streams,
            "rule": info.spec.routing_for(info.config).describe(),
        }


def aliases(row: str) -> list[str]:
    return sorted(mt for mt in supported_model_types() if mt != row and _row_of(mt) == row)


def _row_of(model_type: str) -> str | None:
    try:
        return resolve({"model_type": model_type})[0].name
    except UnsupportedModelError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--markdown", action="store_true", help="print the README's family table")
    args = ap.parse_args()
    rows = [measure(name, mt, ov) for name, (mt, ov, _) in FAMILIES.items()]
    if args.markdown:
        print(
            "| `model_type` | routing rule | expert-count key | experts on disk | streamed calibration | "
            "max abs. logit difference (exactness contract) | notes |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: r["family"]):
            spec = r["spec"]
            names = ", ".join(f"`{m}`" for m in [spec.name, *aliases(spec.name)])
            print(
                f"| {names} | {r['rule']} | `{spec.count_key}` | {r['layout']} | "
                f"{'yes' if r['streams'] else 'no (in memory)'} | "
                f"{r['diff']:.1e}{'' if r['exact'] else ' (not renormalised: expected)'} | {spec.notes} |"
            )
        return
    print(
        f"{'family':<18} {'exact':>6} {'experts':>8} {'kept':>5} {'max |dlogit|':>13} {'rel. L2':>9}  same "
        "argmax  streams"
    )
    for r in rows:
        print(
            f"{r['family']:<18} {str(r['exact']):>6} {r['experts']:>8} {r['keep']:>5} {r['diff']:>13.2e} "
            f"{r['rel']:>9.2e}  {str(r['same_argmax']):>11}  {r['streams']}"
        )


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    main()
