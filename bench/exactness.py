"""Exactness contract, measured for every family (the numbers quoted in the README).

For each tiny model of premoe.testing.FAMILIES: calibrate on one short input, prune to the smallest
keep count that holds every expert that input routes to, reload the export with plain transformers
and compare logits on the same input with the unpruned model.

    python bench/exactness.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import premoe  # noqa: E402
from premoe.data import write_jsonl  # noqa: E402
from premoe.modelio import inspect_model, load_model  # noqa: E402
from premoe.store import PatternStore  # noqa: E402
from premoe.testing import FAMILIES, build_model, save_model  # noqa: E402

TEXT = "ab"


def main() -> None:
    print(f"{'family':<12} {'renorm':>6} {'experts':>8} {'kept':>5} {'max |dlogit|':>13} {'rel. L2':>9}  same argmax")
    for name, (model_type, overrides, renorm) in FAMILIES.items():
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            src = save_model(*build_model(model_type, overrides), d / "src")
            premoe.calibrate(src, write_jsonl(d / "one.jsonl", [{"text": TEXT}]), "one", d / "s", progress=False)
            info = inspect_model(src)
            p = PatternStore.open(d / "s").load("one")
            hits = [(row > 0).nonzero().flatten().tolist() for row in p.means["count"]]
            r = info.router
            if r.group_limited:
                size = r.num_experts // r.n_group
                per = max(sum(1 for e in h if e // size == g) for h in hits for g in range(r.n_group))
                keep = r.n_group * max(per, 2)
            else:
                keep = max(len(h) for h in hits)
            premoe.prune(src, d / "s", "one", keep, d / "out", progress=False)
            a, b = load_model(src, device="cpu"), load_model(d / "out", device="cpu")
            with torch.no_grad():
                x = a.model(**a.tokenizer(TEXT, return_tensors="pt")).logits.float()
                y = b.model(**b.tokenizer(TEXT, return_tensors="pt")).logits.float()
            diff = (x - y).abs().max().item()
            rel = ((x - y).norm() / x.norm()).item()
            same = bool(torch.equal(x.argmax(-1), y.argmax(-1)))
            print(f"{name:<12} {str(renorm):>6} {info.num_experts:>8} {keep:>5} {diff:>13.2e} {rel:>9.2e}  {same}")


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    main()
