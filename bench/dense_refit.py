"""What ``premoe prune --refit`` costs on a dense model larger than the memory it is given.

Generates the Llama-shaped bf16 checkpoint of ``bench/dense_stream.py`` (tensor by tensor, sharded),
calibrates a task on it (streamed, no limit), then, each in a fresh process with the checkpoint dropped
from the page cache, inside a cgroup-v1 memory limit of ``--limit-frac`` of the checkpoint:

1. ``premoe prune --sparsity S`` (plain SEAP slice);
2. ``premoe prune --sparsity S --refit`` (the same plan, o_proj/down_proj re-fitted by least squares on
   the task's calibration data: one streamed pass, one layer's Gram matrices in memory at a time).

Reported: seconds and peak RSS of each step, the re-fit's extra time as a ratio to the plain prune and
to calibration, against the interpreter's own RSS and the checkpoint's size. Accuracy is measured on
the shipped model (``premoe sweep``), not here: this model's weights are random.

    python bench/dense_refit.py                  # ~2.1 GB checkpoint, 1.06 GB limit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import baseline_rss_mb, print_steps, require_cgroup, work_dir  # noqa: E402
from dense_stream import config, drop_cache, make_checkpoint  # noqa: E402
from large_model import peak_rss_of  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--limit-frac", type=float, default=0.5, help="memory limit as a fraction of the checkpoint")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=32, help="calibration samples")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    require_cgroup(ap)
    with work_dir(args.work, "premoe-dense-refit-") as work:
        result = run(args, work)
    print(json.dumps({k: v for k, v in result.items() if k != "steps"} | {"steps": {
        n: {k: v for k, v in s.items() if k not in ("stdout", "stderr")} for n, s in result["steps"].items()}}, indent=2))
    report(result)
    return 0


def run(args, work: Path) -> dict:
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.dense.model import inspect_dense

    model = work / "model"
    if not (model / "model.safetensors.index.json").exists():
        make_checkpoint(model, config(args.layers, args.hidden, args.intermediate))
    size = inspect_dense(model).checkpoint.nbytes
    limit = int(size * args.limit_frac)
    base = baseline_rss_mb("torch, transformers, premoe.api, premoe.cli, premoe.dense.refit, premoe.dense.export, "
                           "premoe.core.streaming, transformers.models.llama.modeling_llama")
    data = write_jsonl(work / "add.jsonl", samples("add", args.samples, "calib"))
    store = work / "store"
    py = [sys.executable, "-m", "premoe", "-q"]
    drop_cache(model)
    steps = {"calibrate --stream": peak_rss_of(py + ["calibrate", "--model", str(model), "--data", str(data), "--task", "t",
                                                     "--store", str(store), "--stream"], None)}
    for name, extra in (("prune", []), ("prune --refit", ["--refit"])):
        drop_cache(model)
        steps[name] = peak_rss_of(py + ["prune", "--model", str(model), "--store", str(store), "--task", "t", "--sparsity",
                                        str(args.sparsity), "--out", str(work / name.replace(" ", "")), *extra], limit)
    for st in steps.values():
        if st["returncode"]:
            print(st["stderr"][-2000:], file=sys.stderr)
    return {"checkpoint_mb": size / 2**20, "limit_mb": limit / 2**20, "baseline_mb": base, "layers": args.layers,
            "hidden": args.hidden, "intermediate": args.intermediate, "sparsity": args.sparsity, "samples": args.samples,
            "steps": steps}


def report(r: dict) -> None:
    s = r["steps"]
    print(f"\ncheckpoint {r['checkpoint_mb']:.0f} MB (bf16 Llama, {r['layers']} layers, hidden {r['hidden']}, FFN "
          f"{r['intermediate']}); prune limit {r['limit_mb']:.0f} MB; interpreter with torch + transformers "
          f"{r['baseline_mb']:.0f} MB; {r['samples']} calibration samples")
    print_steps(s, r["checkpoint_mb"])
    if all(st["returncode"] == 0 for st in s.values()):
        extra = s["prune --refit"]["seconds"] - s["prune"]["seconds"]
        print(f"prune --refit / prune: {s['prune --refit']['seconds'] / s['prune']['seconds']:.2f}x time; the re-fit's "
              f"extra time is {extra / s['calibrate --stream']['seconds']:.2f}x a streamed calibration")


if __name__ == "__main__":
    raise SystemExit(main())
