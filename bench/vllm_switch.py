"""Switch times of the vLLM engine (``--engine vllm``): load the first task, then switch through the others
``--rounds`` times and report each switch's seconds and bytes read.

Two ways, side by side in one run, on one engine:

* ``foreground``: the engine idles while each switch reads, packs and writes (``premoe generate``'s way), then
  serves a batch of ``--batch`` requests of the new task.
* ``staged``: the next switch's reads start (``prepare``) as the batch starts, on a thread of vLLM's worker, and
  the switch after the batch only writes (``premoe serve``'s way).

For each it reports the pause (the switch call) and the time of batch plus switch, the cost per task served.

Run it with the Python that has vLLM and premoe (``docs/serving.md#the-vllm-engine``):

    python bench/vllm_switch.py                 # a generated Qwen3-MoE, 10 layers, 32 experts (1.1 GB), keep 8
    python bench/vllm_switch.py --layers 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32, help="requests served between switches (16 tokens each)")
    ap.add_argument("--tasks", nargs="+", default=["add", "reverse", "shift", "count", "sort"])
    ap.add_argument("--work", type=Path, help="keep the generated checkpoint and store here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from common import generated
    from memory import make_qwen3_moe, qwen3_moe_config

    import premoe
    from premoe.core.data import write_jsonl
    from premoe.core.options import EngineOptions
    from premoe.core.tasks import samples
    from premoe.server.engine import Sampling, Sequence
    from premoe.vllm.server import VllmTaskServer

    work = args.work or Path(tempfile.mkdtemp(prefix="premoe-vllm-switch-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = qwen3_moe_config(args.layers, 1024, 32, 512, 4)
    model = generated(work / f"qwen3moe-{args.layers}l", lambda p: make_qwen3_moe(p, cfg))
    store = work / f"store-{Path(model).name}"
    if not store.exists():
        for t in args.tasks:
            premoe.calibrate(model, write_jsonl(work / f"{t}.jsonl", samples(t, 32, "calib")), t, store, progress=False)
    srv = VllmTaskServer(model, store, args.keep, engine=EngineOptions(engine="vllm", kv_cache_gb=1))
    order = (args.tasks[1:] + args.tasks[:1]) * args.rounds
    prompts = {t: [srv.tokenizer(s["prompt"])["input_ids"] for s in samples(t, args.batch, "eval")] for t in args.tasks}

    def serve(task: str) -> float:
        seqs = [Sequence(ids, Sampling(16, temperature=0.0), task=task) for ids in prompts[task]]
        t0 = time.perf_counter()
        srv.run_batch(seqs, max_batch=8)
        return time.perf_counter() - t0

    rows = []
    try:
        srv.load(args.tasks[0])
        serve(args.tasks[0])  # warm: page cache, kernels
        for way in ("foreground", "staged"):
            for i, t in enumerate(order):
                if way == "staged":
                    srv.prepare(t)  # reads while the batch of the held task runs
                    busy = serve(srv.task)
                    s = srv.load(t)
                else:
                    busy = serve(srv.task)
                    s = srv.load(t)
                rows.append(
                    {
                        "way": way,
                        "task": t,
                        "pause_s": s.seconds,
                        "batch_s": busy,
                        "bytes_read": s.bytes_read,
                        "staged": s.staged,
                    }
                )
    finally:
        srv.close()
    report = {}
    for way in ("foreground", "staged"):
        mine = [r for r in rows if r["way"] == way]
        pause = sorted(r["pause_s"] for r in mine)
        total = sum(r["pause_s"] + r["batch_s"] for r in mine) / len(mine)
        mb = sum(r["bytes_read"] for r in mine) / len(mine) / 2**20
        report[way] = {
            "pause_mean_s": sum(pause) / len(pause),
            "pause_median_s": pause[len(pause) // 2],
            "batch_plus_switch_s": total,
            "mb_per_switch": mb,
        }
        print(
            f"{way:<10} {len(mine)} switches: pause mean {report[way]['pause_mean_s']:.3f} s, median "
            f"{report[way]['pause_median_s']:.3f} s; batch + switch {total:.3f} s; {mb:.0f} MB each"
        )
    ratio = report["staged"]["batch_plus_switch_s"] / report["foreground"]["batch_plus_switch_s"]
    print(
        f"staged / foreground: pause x{report['staged']['pause_mean_s'] / report['foreground']['pause_mean_s']:.2f}, "
        f"batch + switch x{ratio:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"switches": rows, "summary": report}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
