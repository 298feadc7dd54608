"""SEAP's choices, measured: which score, which layer schedule, and how GQA heads are removed.

For each built-in task, SEAP plans at several sparsities with

* every score of ``premoe.dense.scoring.METRICS``: ``sf`` (SEAP s_F: input variance x squared column
  L2 norm) and s_W three ways: ``sw`` (Wanda-sp's original code: input RMS x mean |column|),
  ``sw-paper`` (SEAP's eq. 12: mean square x column L1 norm), ``sw-code`` (SEAP's code: RMS x
  squared column L2 norm);
* schedule ``uniform`` (the same counts in every layer: what a vanilla transformers config can say),
  ``adaptive`` (FLAP's global structure on the task's own statistics)
  or ``logistic`` (SEAP's depth schedule, first and last layers protected), the latter written with
  every layer zero-padded to the largest, so its real file cost is reported too;
* GQA as the same number of query heads removed from every KV group (``heads``) or whole KV groups
  (``groups``);

and the pruned model (built in memory, unpruned tensors shared) is scored on the task's held-out
samples. Evidence behind the defaults in ``premoe.dense.plans.METHODS``.

    python bench/dense_scores.py [--model premoe/assets/tiny-dense] [--sparsities 0.2 0.35 0.5]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import premoe  # noqa: E402
from premoe.assets import TINY_DENSE  # noqa: E402
from premoe.core.data import write_jsonl  # noqa: E402
from premoe.core.evaluation import exact_match  # noqa: E402
from premoe.core.store import PatternStore  # noqa: E402
from premoe.core.tasks import TASKS, samples  # noqa: E402
from premoe.dense.model import kept_params, load_dense, prune_in_memory  # noqa: E402
from premoe.dense.plans import make_dense_plan  # noqa: E402
from premoe.dense.scoring import METRICS  # noqa: E402
from premoe.errors import InputError  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=TINY_DENSE)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.2, 0.35, 0.5])
    ap.add_argument("--eval", type=int, default=200, help="held-out samples per task")
    ap.add_argument("--calib", type=int, default=64, help="calibration samples per task")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="premoe-dense-scores-"))
    for t in TASKS:
        data = write_jsonl(work / f"{t}.jsonl", samples(t, args.calib, "calib"))
        premoe.calibrate(args.model, data, t, work / "store", progress=False)
    info, lm, tok = load_dense(args.model, dtype="float32")
    store = PatternStore.open(work / "store")
    evals = {t: samples(t, args.eval, "eval") for t in TASKS}
    dense = {t: exact_match(lm, tok, evals[t], progress=False) for t in TASKS}
    total = kept_params(info, None)
    print(
        f"{args.model.name}: dense mean {sum(dense.values()) / len(dense):.3f} "
        f"({', '.join(f'{t} {a:.3f}' for t, a in dense.items())}); {args.eval} held-out samples per task"
    )
    print(f"{'score':<8} {'schedule':<9} {'gqa':<7} {'sparsity':>8} {'written':>8} {'retained':>9}  per task")
    for metric, schedule, groups in itertools.product(METRICS, ("uniform", "logistic", "adaptive"), (False, True)):
        for s in args.sparsities:
            acc, written = {}, []
            try:
                plans = {
                    t: make_dense_plan(
                        info,
                        store.load(t).means,
                        "seap",
                        s,
                        metric=metric,
                        schedule=schedule,
                        whole_groups=groups,
                        task=t,
                    )
                    for t in TASKS
                }
            except InputError as e:
                print(f"{metric:<8} {schedule:<9} {'groups' if groups else 'heads':<7} {s:>8.0%}  unreachable: {e}")
                continue
            for t in TASKS:
                plan = plans[t]
                written.append(1 - kept_params(info, plan, padded=True) / total)
                acc[t] = exact_match(prune_in_memory(lm, info, plan), tok, evals[t], progress=False)
            ret = sum(acc[t] / dense[t] for t in TASKS if dense[t]) / sum(1 for t in TASKS if dense[t])
            print(
                f"{metric:<8} {schedule:<9} {'groups' if groups else 'heads':<7} {s:>8.0%} "
                f"{sum(written) / len(written):>8.1%} {ret:>9.1%}  " + " ".join(f"{t} {a:.2f}" for t, a in acc.items())
            )


if __name__ == "__main__":
    main()
