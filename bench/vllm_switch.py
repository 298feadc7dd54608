"""Switch times of the vLLM engine (``--engine vllm``) on an idle engine: load the first task, then switch
through the others ``--rounds`` times and report each switch's seconds and bytes read.

Run it with the Python that has vLLM and premoe (``docs/serving.md#the-vllm-engine``):

    python bench/vllm_switch.py                 # a generated Qwen3-MoE, 10 layers, 32 experts (1.1 GB), keep 8
    python bench/vllm_switch.py --layers 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
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
    try:
        srv.load(args.tasks[0])
        rows = []
        for t in (args.tasks[1:] + args.tasks[:1]) * args.rounds:
            s = srv.load(t)
            rows.append({"task": t, "seconds": s.seconds, "bytes_read": s.bytes_read})
    finally:
        srv.close()
    secs = sorted(r["seconds"] for r in rows)
    mb = sum(r["bytes_read"] for r in rows) / len(rows) / 2**20
    mean, median = sum(secs) / len(secs), secs[len(secs) // 2]
    print(f"{len(rows)} switches: mean {mean:.3f} s, median {median:.3f} s, {mb:.0f} MB each")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
