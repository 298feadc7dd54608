"""TCESS settings on the built-in suite: the default (k = the model's top-k, no threshold) vs.
counting only each token's primary expert (k = 1) or only dominant shares (r = 0.5).

Evidence for the note on why task-specific TCESS trails output-aware criteria and the official
top-1 preset at small keep counts. Every variant is calibrated and pruned with ``--scorer tcess``
(the default scorer is EASY-EP, which ``--k``/``--r`` do not change).

    python bench/tcess_variants.py
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import premoe  # noqa: E402
from premoe.assets import TINY_MODEL  # noqa: E402
from premoe.core.data import write_jsonl  # noqa: E402
from premoe.core.evaluation import exact_match  # noqa: E402
from premoe.core.store import PatternStore  # noqa: E402
from premoe.core.tasks import TASKS, samples  # noqa: E402
from premoe.moe.loading import load_model  # noqa: E402
from premoe.moe.patterns import plan_from_pattern  # noqa: E402
from premoe.moe.selective import ByteReader, build_model  # noqa: E402

VARIANTS = {"tcess (k=top-k, no r)": {}, "tcess k=1": {"k": 1}, "tcess r=0.5": {"r": 0.5}}
KEEPS = (24, 16, 12, 8, 4)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="premoe-tcess-") as tmp:
        table(Path(tmp))


def table(work: Path) -> None:
    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    evals = {t: samples(t, 100, "eval") for t in TASKS}
    dense = {t: exact_match(lm.model, lm.tokenizer, evals[t], progress=False) for t in TASKS}
    print(f"{'variant':<24} " + " ".join(f"{k:>6}" for k in KEEPS) + "   (accuracy retained, mean over 5 tasks)")
    for i, (label, kwargs) in enumerate(VARIANTS.items()):
        for t in TASKS:
            data = write_jsonl(work / f"{t}.jsonl", samples(t, 64, "calib"))
            premoe.calibrate(lm, data, t, work / f"store{i}", scorer="tcess", progress=False, **kwargs)
        st = PatternStore.open(work / f"store{i}")
        cells = []
        for keep in KEEPS:
            ret = []
            for t in TASKS:
                with ByteReader() as r:
                    net = build_model(lm.info, plan_from_pattern(lm.info, st.load(t), keep), r).float()
                ret.append(exact_match(net, lm.tokenizer, evals[t], progress=False) / dense[t])
            cells.append(f"{100 * sum(ret) / len(ret):>5.1f}%")
        print(f"{label:<24} " + " ".join(cells))


if __name__ == "__main__":
    main()
