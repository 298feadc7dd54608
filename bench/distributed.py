"""Data-parallel calibration (``torchrun -m premoe calibrate``, gloo) against one process, side by side.

On a generated Qwen3-MoE checkpoint (default 10 layers, hidden 1024, 32 experts of width 512: ~1.1 GB bf16,
hub layout) the same task is calibrated three ways, each in a fresh process tree inside one memory cgroup
(the node's peak is the group's):

* one process with one thread (the statistics' reference: each rank's arithmetic), and one with ``--threads``
  OpenMP threads (default 2: every core of this machine; the speed baseline);
* ``torchrun --nproc-per-node 2``, one thread each;
* the same, streamed (``--stream``: each rank reads one decoder layer at a time);
* streamed with ``--share-layers`` (one copy of each layer per node, in shared memory), and both streamed runs
  with 3 ranks, to show how the node's peak grows with the ranks.

Reported: wall seconds, the speed-up over one process on every core, the node's peak memory (anonymous plus
shared memory: the group's ``rss + shmem``, sampled every 50 ms), and the
max relative difference of every mean from the one-thread store's (threads change float32 summation order,
and a random model's near-tie routing with it; ranks do not).

    python bench/distributed.py                         # ~1.1 GB checkpoint, 256 samples
    python bench/distributed.py --layers 4 --samples 64 # quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))


def rel_diff(a, b) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / a.abs().clamp_min(1e-12)).max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="OpenMP threads of the one-process run")
    ap.add_argument("--dtype", default="float32", help="compute dtype of every run (bf16 results depend on threads)")
    ap.add_argument("--limit-gb", type=float, default=12.0, help="the cgroup's memory limit (the node's)")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from common import generated, run_limited
    from memory import make_qwen3_moe, qwen3_moe_config

    from premoe.core.data import write_jsonl
    from premoe.core.store import PatternStore
    from premoe.core.tasks import samples

    work = args.work or Path(tempfile.mkdtemp(prefix="premoe-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = qwen3_moe_config(args.layers, 1024, 32, 512, 4)
    model = generated(work / f"qwen3moe-{args.layers}l", lambda p: make_qwen3_moe(p, cfg))
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    tasks = ["add", "reverse", "sort", "shift"]
    rows = [r for t in tasks for r in samples(t, -(-args.samples // len(tasks)), "calib")][: args.samples]
    data = write_jsonl(work / "data.jsonl", rows)
    limit = int(args.limit_gb * 2**30)

    def cal(store: Path, *extra: str) -> list[str]:
        head = ["-m", "premoe", "-q", "calibrate", "--model", str(model), "--data", str(data), "--task", "t"]
        return head + ["--store", str(store), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
                       "--overwrite", *extra]  # fmt: skip

    def torchrun(ranks: int, port: int, store: str, *extra: str) -> tuple[dict, list[str], Path]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-port", str(port), *cal(work / store, *extra)[1:]]  # fmt: skip
        return {"OMP_NUM_THREADS": "1"}, cmd, work / store

    runs = {
        "1 process, 1 thread": ({"OMP_NUM_THREADS": "1"}, [sys.executable, *cal(work / "one-1")], work / "one-1"),
        f"1 process, {args.threads} threads": (
            {"OMP_NUM_THREADS": str(args.threads)},
            [sys.executable, *cal(work / "one")],
            work / "one",
        ),
        "torchrun, 2 ranks x 1 thread": torchrun(2, 29533, "two"),
        "torchrun, 2 ranks x 1 thread, streamed": torchrun(2, 29534, "two-streamed", "--stream"),
        "torchrun, 2 ranks x 1 thread, streamed, --share-layers": torchrun(2, 29535, "two-shared", "--share-layers"),
        "torchrun, 3 ranks x 1 thread, streamed": torchrun(3, 29536, "three-streamed", "--stream"),
        "torchrun, 3 ranks x 1 thread, streamed, --share-layers": torchrun(3, 29537, "three-shared", "--share-layers"),
    }
    report = {"checkpoint_bytes": size, "samples": len(rows), "batch_size": args.batch_size, "runs": {}}
    base = None
    ref = None
    for name, (env, cmd, store) in runs.items():
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            r = run_limited(cmd, limit, name="premoe-bench-dist")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if r["returncode"] != 0:
            print(f"{name}: failed\n{r['stderr']}", file=sys.stderr)
            return 1
        pattern = PatternStore.open(store).load("t")
        if ref is None:  # the statistics' reference: one process, one thread (each rank's arithmetic)
            ref = pattern
        elif base is None:  # the speed baseline: one process on every core
            base = r["seconds"]
        diff = max(rel_diff(ref.means[k], pattern.means[k]) for k in ref.means)
        report["runs"][name] = {
            "seconds": r["seconds"],
            "speedup": (base or r["seconds"]) / r["seconds"],
            "node_peak_anon_mb": r.get("cgroup_peak_anon_mb"),
            "node_peak_anon_shmem_mb": r.get("cgroup_peak_anon_shmem_mb"),
            "max_rel_diff": diff,
        }
        print(f"{name}: {r['seconds']:.1f}s (x{(base or r['seconds']) / r['seconds']:.2f}), node peak "
              f"{r.get('cgroup_peak_anon_shmem_mb', 0):.0f} MB (anonymous {r.get('cgroup_peak_anon_mb', 0):.0f} MB), "
              f"max rel diff {diff:.1e}", flush=True)  # fmt: skip
    print(f"checkpoint {size / 2**30:.2f} GiB, {len(rows)} samples, batches of {args.batch_size}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
