"""A model larger than memory: calibrate, prune and generate with retrieval under a hard memory limit.

Generates a DeepSeek-V3-shaped checkpoint (sigmoid router with correction bias, 8 expert groups of
which 4 are used, top-8, a shared expert, leading dense layers, MLA attention), FP8 with 128x128 block
scales as DeepSeek publishes it, sharded. Then, each in a fresh process inside a cgroup-v1 memory
group whose limit is at most half the checkpoint (``/sys/fs/cgroup/memory``; needs root):

1. ``premoe calibrate`` of two built-in tasks (streamed layer by layer: the model does not fit);
2. ``premoe prune --keep 16`` (kept experts written in FP8, scales sliced in lockstep);
3. ``premoe generate --keep 16`` with retrieval (only the routed task's experts are read).

Each step's peak RSS (the process's high-water mark) is compared with its ideal: the interpreter
with torch and transformers imported, plus the largest layer and the hidden states (calibration), a
copy buffer (pruning), or the pruned model (generation). Then, on a smaller checkpoint of the same
shape that fits in memory, calibration is timed streamed and in memory, and their scores compared.

    python bench/large_model.py --experts 128 --limit-frac 0.5      # ~7.5 GB checkpoint, 3.7 GB limit
    python bench/large_model.py --experts 32 --skip-large           # the throughput comparison only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CGROUP, ShardedWriter, baseline_rss_mb, require_cgroup, work_dir  # noqa: E402
BLOCK = 128


def config(experts: int) -> dict:
    from premoe.core.tasks import char_tokenizer

    tok = char_tokenizer()
    return dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=8192, hidden_size=2048,
        intermediate_size=5632, moe_intermediate_size=768, num_hidden_layers=14, first_k_dense_replace=2,
        n_routed_experts=experts, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=16, num_key_value_heads=16,
        q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="bfloat16",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [BLOCK, BLOCK]},
    )


def make_checkpoint(path: Path, experts: int, shard_bytes: int = 1 << 30) -> int:
    """Write the checkpoint tensor by tensor (never the whole model in memory); returns its size."""
    import torch
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    from premoe.core.tasks import char_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    cfg = config(experts)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    char_tokenizer().save_pretrained(path)
    c = CONFIG_MAPPING["deepseek_v3"](**{k: v for k, v in cfg.items() if k not in ("model_type", "quantization_config")})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(c)
    gen = torch.Generator().manual_seed(0)

    def fp8(shape):  # N(0, 1) values in float8 with block scales ~0.02: weights of std ~0.02, as published
        q = torch.randn(shape, generator=gen, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        grid = (*shape[:-2], math.ceil(shape[-2] / BLOCK), math.ceil(shape[-1] / BLOCK))
        return q, 0.02 * (1 + 0.1 * torch.rand(grid, generator=gen))

    out = ShardedWriter(path, shard_bytes)
    put = out.put

    for name, p in skeleton.named_parameters():
        shape = tuple(p.shape)
        if ".experts." in name:  # fused in memory, one key per expert on the hub
            prefix, leaf = name.rsplit(".", 1)
            for e in range(shape[0]):
                parts = [("gate_proj", slice(0, shape[1] // 2)), ("up_proj", slice(shape[1] // 2, None))] \
                    if leaf == "gate_up_proj" else [("down_proj", slice(None))]
                for part, rows in parts:
                    n = shape[1] // 2 if leaf == "gate_up_proj" else shape[1]
                    q, s = fp8((n, shape[2]))
                    put(f"{prefix}.{e}.{part}.weight", q)
                    put(f"{prefix}.{e}.{part}.weight_scale_inv", s)
        elif name.endswith("mlp.gate.weight"):  # the router: bf16 rows that route decisively
            put(name, (torch.randn(shape, generator=gen) * 0.5).to(torch.bfloat16))
        elif "norm" in name:
            put(name, torch.ones(shape, dtype=torch.bfloat16))
        elif "embed" in name or "lm_head" in name or p.dim() < 2:
            put(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
        else:
            q, s = fp8(shape)
            put(name, q)
            put(f"{name}_scale_inv", s)
    for name, b in skeleton.named_buffers():
        if name.endswith("e_score_correction_bias"):
            put(name, torch.randn(tuple(b.shape), generator=gen) * 0.01)
    return out.close()


# ---------------------------------------------------------------------------------------------
# running a step inside a memory-limited cgroup


def run_limited(cmd: list[str], limit: int | None, name: str = "premoe-bench") -> dict:
    """Run ``cmd`` (optionally inside a new cgroup with ``limit`` bytes); its wall time and peak RSS."""
    group = None
    prefix = []
    if limit is not None:
        group = CGROUP / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():
            try:
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping around the limit
            except OSError:
                pass
        (group / "memory.max_usage_in_bytes").write_text("0")
        prefix = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(prefix + cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    done = threading.Event()
    anon = [0]  # the group's peak anonymous memory (its usage also counts reclaimable page cache)

    def sample():
        while not done.wait(0.05):
            try:
                stat = (group / "memory.stat").read_text().splitlines()
            except OSError:
                return
            anon[0] = max([anon[0], *(int(line.split()[1]) for line in stat if line.startswith("rss "))])

    if group is not None:
        threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    done.set()
    wall = time.perf_counter() - t0
    result = {"cmd": " ".join(cmd), "returncode": proc.returncode, "seconds": wall, "stdout": out[-4000:], "stderr": err[-2000:]}
    if group is not None:
        result["cgroup_max_usage_mb"] = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        result["cgroup_peak_anon_mb"] = anon[0] / 2**20
        result["oom_kills"] = (group / "memory.oom_control").read_text().count("oom_kill 1") if (group / "memory.oom_control").exists() else 0
        try:
            group.rmdir()
        except OSError:
            pass
    return result


def peak_rss_of(cmd: list[str], limit: int | None) -> dict:
    """:func:`run_limited` through a tiny launcher that reports the child's VmHWM."""
    launcher = ("import json, os, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
                "print('\\nPEAK ' + json.dumps({'rc': r.returncode, 'maxrss_mb': u.ru_maxrss / 1024}))")
    res = run_limited([sys.executable, "-c", launcher, *cmd], limit)
    line = next((l for l in res["stdout"].splitlines() if l.startswith("PEAK ")), None)
    peak = json.loads(line[5:]) if line else {"rc": -1, "maxrss_mb": float("nan")}
    res.update(peak_rss_mb=peak["maxrss_mb"], returncode=peak["rc"] if res["returncode"] == 0 else res["returncode"])
    return res


def write_tasks(work: Path, n: int) -> dict[str, Path]:
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples

    return {t: write_jsonl(work / f"{t}.jsonl", samples(t, n, "calib")) for t in ("add", "reverse")}


def hidden_bytes(model: Path, data: list[Path], max_length: int = 2048) -> int:
    from premoe.core.data import iter_samples
    from premoe.core.config import load_tokenizer

    tok = load_tokenizer(model)
    tokens = sum(len(tok(t, truncation=True, max_length=max_length)["input_ids"]) for f in data for t in iter_samples(f))
    return tokens * 2048 * 2


def large_run(args, work: Path) -> dict:
    from premoe.moe.model import inspect_model
    from premoe.moe.streaming import resident_sizes

    model = work / "model"
    if not (model / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        make_checkpoint(model, args.experts)
        print(f"generated {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    info = inspect_model(model)
    size = info.checkpoint.nbytes
    limit = int(size * args.limit_frac)
    sizes = resident_sizes(info)
    base = baseline_rss_mb("torch, transformers, premoe.api, premoe.cli, premoe.moe.streaming, premoe.serving, "
                           "transformers.models.deepseek_v3.modeling_deepseek_v3")
    tasks = write_tasks(work, args.samples)
    store, out = work / "store", work / "pruned"
    py = [sys.executable, "-m", "premoe", "-q"]
    steps = {}
    for t, f in tasks.items():
        steps[f"calibrate {t}"] = peak_rss_of(py + ["calibrate", "--model", str(model), "--data", str(f), "--task", t,
                                                   "--store", str(store), "--overwrite"], limit)
    steps["prune"] = peak_rss_of(py + ["prune", "--model", str(model), "--store", str(store), "--task", "add",
                                       "--keep", str(args.keep), "--out", str(out), "--overwrite"] +
                                 ([] if args.verify else ["--no-verify"]), limit)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("add 12+30=", "reverse hello=", "add 7+8=")))
    steps["generate"] = peak_rss_of(py + ["generate", "--model", str(model), "--store", str(store), "--keep",
                                          str(args.keep), "--data", str(prompts), "--json", "--max-new-tokens", "4"], limit)
    import premoe

    plan = premoe.plan(info, store, "add", args.keep)
    pruned = resident_sizes(info, plan=plan)
    routers = sum(info.checkpoint.tensors[k].nbytes for k, r in info.roles.items() if r.kind == "router")
    hid = hidden_bytes(model, list(tasks.values()))
    ideal = {
        f"calibrate {t}": base + (sizes["largest_layer"] + hid) / 2**20 for t in tasks
    }
    ideal["prune"] = base + 16
    ideal["generate"] = base + (pruned["total"] + routers) / 2**20
    for name, st in steps.items():
        st["ideal_mb"] = ideal[name]
    return {"checkpoint_mb": size / 2**20, "limit_mb": limit / 2**20, "resident_mb": sizes["total"] / 2**20,
            "largest_layer_mb": sizes["largest_layer"] / 2**20, "baseline_mb": base, "hidden_mb": hid / 2**20,
            "pruned_resident_mb": pruned["total"] / 2**20, "keep": args.keep, "experts": args.experts, "steps": steps}


THROUGHPUT = r"""
import json, sys, time, torch
import premoe
from premoe.core.data import iter_samples
model, data, store, stream = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t0 = time.perf_counter()
p = premoe.calibrate(model, data, "t", store, stream=stream, progress=False, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": p.info["tokens"], "streamed": p.info["streamed"]}))
"""


def throughput_run(args, work: Path) -> dict:
    """Streamed vs in-memory calibration on a checkpoint that fits, and their agreement."""
    from premoe.core.store import PatternStore

    model = work / "small"
    if not (model / "model.safetensors.index.json").exists():
        make_checkpoint(model, args.small_experts)
    f = write_tasks(work, args.samples)["add"]
    res = {}
    for mode in ("memory", "stream", "memory", "stream"):
        store = work / f"store-{mode}"
        out = subprocess.run([sys.executable, "-c", THROUGHPUT, str(model), str(f), str(store), "1" if mode == "stream" else "0"],
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res.setdefault(mode, []).append(r["seconds"])
        res["tokens"] = r["tokens"]
    a = PatternStore.open(work / "store-memory").load("t")
    b = PatternStore.open(work / "store-stream").load("t")
    rel = max(float(((a.means[k] - b.means[k]).abs() / a.means[k].abs().clamp_min(1e-6)).max()) for k in a.means)
    best = {m: min(res[m]) for m in ("memory", "stream")}
    from premoe.moe.model import inspect_model

    return {"checkpoint_mb": inspect_model(model).checkpoint.nbytes / 2**20, "tokens": res["tokens"],
            "seconds": best, "ratio": best["memory"] / best["stream"], "max_rel_diff": rel,
            "same_kept_16": bool(torch_equal_kept(a, b))}


def torch_equal_kept(a, b) -> bool:
    import torch

    return all(torch.equal(x.topk(16).indices.sort().values, y.topk(16).indices.sort().values) for x, y in zip(a.scores, b.scores))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128, help="routed experts per MoE layer of the large model (size)")
    ap.add_argument("--small-experts", type=int, default=16, help="routed experts of the model that fits (throughput)")
    ap.add_argument("--limit-frac", type=float, default=0.5, help="memory limit as a fraction of the checkpoint (<= 0.5)")
    ap.add_argument("--keep", type=int, default=16, help="experts kept per layer when pruning and serving")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples per task")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip prune's self-check (by default: read back, reloaded in transformers only if it fits)")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args(argv)
    if args.limit_frac > 0.5:
        ap.error("--limit-frac must be at most 0.5 (the limit is at most half the checkpoint)")
    if not args.skip_large:
        require_cgroup(ap)
    result = {}
    with work_dir(args.work, "premoe-large-") as work:
        if not args.skip_large:
            result["large"] = large_run(args, work)
        if not args.skip_throughput:
            result["throughput"] = throughput_run(args, work)
        print(json.dumps(result, indent=2))
        report(result)
    return 0


def report(result: dict) -> None:
    if "large" in result:
        r = result["large"]
        print(f"\ncheckpoint {r['checkpoint_mb'] / 1024:.2f} GB (FP8, {r['experts']} experts x 12 MoE layers), "
              f"memory limit {r['limit_mb'] / 1024:.2f} GB ({r['limit_mb'] / r['checkpoint_mb']:.2f} of it); "
              f"dequantised the model needs {r['resident_mb'] / 1024:.2f} GB")
        print(f"{'step':<20} {'ok':>3} {'seconds':>8} {'peak RSS MB':>12} {'ideal MB':>9} {'ratio':>6}")
        for name, st in r["steps"].items():
            print(f"{name:<20} {'yes' if st['returncode'] == 0 else 'NO':>3} {st['seconds']:>8.1f} {st['peak_rss_mb']:>12.0f} "
                  f"{st['ideal_mb']:>9.0f} {st['peak_rss_mb'] / st['ideal_mb']:>6.2f}")
    if "throughput" in result:
        t = result["throughput"]
        print(f"\ncalibration on a {t['checkpoint_mb'] / 1024:.2f} GB checkpoint that fits ({t['tokens']} tokens): in memory "
              f"{t['seconds']['memory']:.1f}s, streamed {t['seconds']['stream']:.1f}s -> streamed throughput "
              f"{t['ratio']:.2f} of in-memory; max relative difference of the statistics {t['max_rel_diff']:.1e}; "
              f"same kept experts at 16: {t['same_kept_16']}")


if __name__ == "__main__":
    raise SystemExit(main())
