"""Serving a quantised checkpoint with its kept experts held as stored (FP8 values and block scales, one
expert dequantised at a time) against dequantised whole, side by side: resident bytes, peak RSS over the
import baseline, and generation speed.

A DeepSeek-V3-shaped FP8 checkpoint (``memory.py``'s generator: 128x128 block scales, one key per expert,
MLA attention, shared experts) is written, two built-in tasks are calibrated on it, and ``premoe prune``
gives the kept bytes in the checkpoint's own format (the export's size). Then, for each mode, a fresh
process builds ``TaskServer(..., hold=...)``, loads the ``add`` pattern, greedily completes a few prompts,
and reports what it holds and its peak RSS (VmHWM).

    python bench/held_memory.py                          # 32 experts per layer, keep 16 (~2 GB checkpoint)
    python bench/held_memory.py --experts 64 --keep 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, baseline_rss_mb, generated, work_dir  # noqa: E402
from memory import make_deepseek, write_tasks  # noqa: E402

SERVE = r"""
import json, sys, time, torch
from premoe.moe.server import TaskServer
from premoe.moe.held import held_bytes
model, store, keep, hold, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", int(sys.argv[5])
torch.set_num_threads(int(sys.argv[6]))
server = TaskServer(model, store, keep, hold=hold)
t0 = time.perf_counter()
server.load("add")
load_s = time.perf_counter() - t0
resident = sum(t.nbytes for t in server.model.state_dict().values()) + held_bytes(server.model)
prompts = ["add 12+30=", "add 7+8=", "reverse hello=", "add 101+5="]
server.complete(prompts[0], 2)  # warm up
t0 = time.perf_counter()
texts = [server.complete(p, tokens) for p in prompts]
gen_s = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
print(json.dumps({"resident_mb": resident / 2**20, "held_mb": held_bytes(server.model) / 2**20, "load_s": load_s,
                  "tokens_per_s": len(prompts) * tokens / gen_s, "peak_rss_mb": hwm, "texts": texts}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32, help="routed experts per MoE layer of the generated model")
    ap.add_argument("--keep", type=int, default=16)
    ap.add_argument("--samples", type=int, default=16, help="calibration samples per task")
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated per prompt (4 prompts)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, help="keep the generated checkpoint and store here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import premoe
    from premoe.moe.model import inspect_model

    with work_dir(args.work, "premoe-held-") as work:
        model = generated(work / f"deepseek-{args.experts}", lambda p: make_deepseek(p, args.experts))
        info = inspect_model(model)
        store = work / f"store-{args.experts}"
        if not store.exists():
            for t, f in write_tasks(work, args.samples).items():
                premoe.calibrate(model, f, t, store, progress=False)
        export = premoe.prune(
            model, store, "add", args.keep, work / "export", refit=False, verify=False, overwrite=True, progress=False
        )
        base = baseline_rss_mb(
            "premoe.moe.server, premoe.moe.held, transformers.models.deepseek_v3.modeling_deepseek_v3"
        )
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        runs = {}
        for mode in ("held", "dequantised"):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    SERVE,
                    str(model),
                    str(store),
                    str(args.keep),
                    "1" if mode == "held" else "0",
                    str(args.tokens),
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{mode}: done", flush=True)
    kept_mb = export.bytes_written / 2**20
    report = {
        "checkpoint_mb": info.checkpoint.nbytes / 2**20,
        "kept_mb_as_stored": kept_mb,
        "baseline_mb": base,
        "keep": args.keep,
        "experts": args.experts,
        "runs": runs,
        "same_answers": runs["held"]["texts"] == runs["dequantised"]["texts"],
    }
    print(
        f"DeepSeek-V3-shaped FP8 checkpoint, {args.experts} experts per layer ({report['checkpoint_mb']:.0f} MB), "
        f"keep {args.keep}: kept bytes as stored {kept_mb:.0f} MB; import baseline {base:.0f} MB"
    )
    print(
        f"{'mode':<12} {'resident MB':>11} {'x kept':>7} {'peak-base MB':>12} {'x kept':>7} {'tok/s':>7} {'load s':>7}"
    )
    for mode, r in runs.items():
        over = r["peak_rss_mb"] - base
        print(
            f"{mode:<12} {r['resident_mb']:>11.0f} {r['resident_mb'] / kept_mb:>7.2f} {over:>12.0f} "
            f"{over / kept_mb:>7.2f} {r['tokens_per_s']:>7.2f} {r['load_s']:>7.2f}"
        )
    ratio = runs["held"]["tokens_per_s"] / runs["dequantised"]["tokens_per_s"]
    print(f"held / dequantised tokens/s: x{ratio:.2f}; same answers: {report['same_answers']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
