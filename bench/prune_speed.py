"""Pruning cost: premoe's byte-range rewrite vs. loading, slicing and re-saving with transformers.

Generates a random Qwen3-MoE checkpoint (bfloat16, about --gb GB), stores a random pattern for it,
then runs each method in a fresh subprocess (peak RSS is its VmHWM) on warm files, timing the work
after the (identical) imports:

* copy     -- shutil.copyfile of the source checkpoint: the disk's raw throughput reference
* premoe   -- `premoe prune --no-verify` (streams byte ranges, never builds the model)
* premoe+v -- `premoe prune` with its reload self-check
* naive    -- AutoModelForCausalLM.from_pretrained + in-memory slicing + save_pretrained

    python bench/prune_speed.py --gb 1 --keep-frac 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, shutil, sys, time
from pathlib import Path
method, src, store, out, keep = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
if method != "copy":  # imports are a fixed start-up cost, the same for both; time the work only
    import torch, premoe
    import transformers.models.qwen3_moe.modeling_qwen3_moe
    from transformers import AutoModelForCausalLM
    from premoe.moe.model import inspect_model
    from premoe.moe.surgery import apply_plan_
def rss_kb(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
base = rss_kb("VmRSS:")
t0 = time.perf_counter()
if method == "copy":
    out.mkdir()
    shutil.copyfile(src / "model.safetensors", out / "model.safetensors")
elif method in ("premoe", "premoe+v"):
    premoe.prune(src, store, "t", keep, out, verify=method == "premoe+v", progress=False)
else:
    info = inspect_model(src)
    plan = premoe.plan(info, store, "t", keep)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    apply_plan_(model, info.spec, plan)
    model.save_pretrained(out)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "peak_rss_mb": rss_kb("VmHWM:") / 1024, "base_rss_mb": base / 1024}))
"""


def make_model(path: Path, gb: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from premoe.core.tasks import char_tokenizer

    tok = char_tokenizer()
    hidden, inter, experts, layers = 1024, 256, 64, max(1, round(gb * 2**30 / (2 * 3 * 1024 * 256 * 64)))
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=experts,
        num_experts_per_tok=8,
        norm_topk_prob=True,
    )
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="100GB")
    tok.save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="approximate checkpoint size")
    ap.add_argument("--keep-frac", type=float, default=0.5)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--repeat", type=int, default=3, help="runs per method; the fastest is reported")
    args = ap.parse_args()

    import premoe
    from premoe.moe.model import inspect_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="premoe-bench-"))
    src = work / "src"
    if not (src / "config.json").exists():
        make_model(src, args.gb)
    info = inspect_model(src)
    keep = max(info.router.top_k, round(info.num_experts * args.keep_frac))
    store = work / "store"
    if not store.exists():
        (work / "d.txt").write_text("x\n")
        premoe.calibrate(src, work / "d.txt", "t", store, scorer="random", progress=False)
    size = info.checkpoint.nbytes
    with open(src / "model.safetensors", "rb") as f:  # warm the page cache
        while f.read(1 << 24):
            pass
    rows = {}
    for method in ("copy", "premoe", "premoe+v", "naive"):
        runs = []
        for _ in range(args.repeat):
            out = work / f"out-{method}"
            shutil.rmtree(out, ignore_errors=True)
            res = subprocess.run(
                [sys.executable, "-c", CHILD, method, str(src), str(store), str(out), str(keep)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            if res.returncode:
                print(res.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"{method} failed")
            run = json.loads(res.stdout.strip().splitlines()[-1])
            run["bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            runs.append(run)
            shutil.rmtree(out, ignore_errors=True)
        rows[method] = min(runs, key=lambda r: r["seconds"])
    print(
        f"checkpoint: {size / 2**30:.2f} GiB, {info.num_experts} experts x {len(info.moe_layers)} layers, keep {keep}"
    )
    base = rows["copy"]["seconds"]
    print(f"{'method':<10} {'seconds':>8} {'x copy':>7} {'peak RSS':>10} {'after imports':>14} {'written':>10}")
    for m, r in rows.items():
        print(
            f"{m:<10} {r['seconds']:>8.2f} {r['seconds'] / base:>7.2f} {r['peak_rss_mb']:>8.0f}MB "
            f"{r['base_rss_mb']:>12.0f}MB {r['bytes'] / 2**20:>8.0f}MB"
        )


if __name__ == "__main__":
    main()
