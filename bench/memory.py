"""Models larger than the memory they are given: premoe's CLI steps under a hard memory limit.

Each subcommand generates a random-weight checkpoint tensor by tensor (never the whole model in
memory), sharded as the hub ships it, then runs every step as the ``premoe`` command a user would
type, in a fresh process, most inside a cgroup-v1 memory group (``/sys/fs/cgroup/memory``; needs
root) whose limit is a fraction of the checkpoint. Reported per step: seconds and the process's peak
RSS (VmHWM), against the interpreter's own RSS with torch and transformers imported and the
checkpoint's size. Accuracy is not measured here (the weights are random); ``premoe sweep`` does that.

  moe          DeepSeek-V3-shaped FP8 checkpoint (~7 GB) under half its size: calibrate, prune and
               generate with retrieval, each peak against its ideal; then streamed vs in-memory
               calibration throughput, and agreement, on a smaller one that fits.
  dense        Llama-shaped bf16 checkpoint (~1.1 GB): calibration streamed, automatic and in memory
               under the limit, and in memory without one (the reference statistics).
  dense-refit  the same Llama shape, 24 layers (~2.1 GB): what ``premoe prune --refit`` costs over a
               plain prune, and against a streamed calibration.
  moe-refit    Qwen3-MoE-shaped bf16 checkpoint (~2 GB): what the tight-keep defaults cost (EASY-EP
               and recon calibration, the streamed re-fit) against the paper's TCESS calibration.

    python bench/memory.py moe --experts 128 --limit-frac 0.5
    python bench/memory.py dense --layers 24 --limit-frac 0.25
    python bench/memory.py dense-refit
    python bench/memory.py moe-refit
    python bench/memory.py SUBCOMMAND --help     # what it measures, its options and defaults
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ROOT,
    ShardedWriter,
    baseline_rss_mb,
    drop_cache,
    generated,
    meta_skeleton,
    peak_rss_of,
    print_result,
    print_steps,
    require_cgroup,
    work_dir,
)

sys.path.insert(0, str(ROOT))
PREMOE = [sys.executable, "-m", "premoe", "-q"]
CLI = "torch, transformers, premoe.cli"  # what every step imports before its own modules (baseline RSS)
BLOCK = 128  # FP8 block size of the DeepSeek-V3 checkpoint


def special_tokens() -> dict:
    from premoe.core.tasks import char_tokenizer

    tok = char_tokenizer()
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


# ---------------------------------------------------------------------------------------------
# the generated checkpoints


def deepseek_config(experts: int) -> dict:
    return dict(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        vocab_size=8192,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=768,
        num_hidden_layers=14,
        first_k_dense_replace=2,
        n_routed_experts=experts,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=512,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        dtype="bfloat16",
        **special_tokens(),
        quantization_config={
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [BLOCK, BLOCK],
        },
    )


def make_deepseek(path: Path, experts: int, shard_bytes: int = 1 << 30) -> int:
    """DeepSeek-V3 as published: FP8 weights with 128x128 block scales, one key per expert; returns its size."""
    import torch

    skeleton = meta_skeleton(path, deepseek_config(experts))
    gen = torch.Generator().manual_seed(0)

    def fp8(shape):  # N(0, 1) values in float8 with block scales ~0.02: weights of std ~0.02, as published
        q = torch.randn(shape, generator=gen, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
        grid = (*shape[:-2], math.ceil(shape[-2] / BLOCK), math.ceil(shape[-1] / BLOCK))
        return q, 0.02 * (1 + 0.1 * torch.rand(grid, generator=gen))

    out = ShardedWriter(path, shard_bytes)
    for name, p in skeleton.named_parameters():
        shape = tuple(p.shape)
        if ".experts." in name:  # fused in memory, one key per expert on the hub
            prefix, leaf = name.rsplit(".", 1)
            for e in range(shape[0]):
                parts = ["gate_proj", "up_proj"] if leaf == "gate_up_proj" else ["down_proj"]
                for part in parts:
                    n = shape[1] // 2 if leaf == "gate_up_proj" else shape[1]
                    q, s = fp8((n, shape[2]))
                    out.put(f"{prefix}.{e}.{part}.weight", q)
                    out.put(f"{prefix}.{e}.{part}.weight_scale_inv", s)
        elif name.endswith("mlp.gate.weight"):  # the router: bf16 rows that route decisively
            out.put(name, (torch.randn(shape, generator=gen) * 0.5).to(torch.bfloat16))
        elif "norm" in name:
            out.put(name, torch.ones(shape, dtype=torch.bfloat16))
        elif "embed" in name or "lm_head" in name or p.dim() < 2:
            out.put(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16))
        else:
            q, s = fp8(shape)
            out.put(name, q)
            out.put(f"{name}_scale_inv", s)
    for name, b in skeleton.named_buffers():
        if name.endswith("e_score_correction_bias"):
            out.put(name, torch.randn(tuple(b.shape), generator=gen) * 0.01)
    return out.close()


def llama_config(layers: int, hidden: int, inter: int) -> dict:
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(hidden // 512, 1),
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        dtype="bfloat16",
        **special_tokens(),
    )


def make_llama(path: Path, cfg: dict, shard_bytes: int = 256 << 20) -> int:
    """A bf16 Llama with trained-looking norms; returns its size."""
    import torch

    skeleton = meta_skeleton(path, cfg)
    gen = torch.Generator().manual_seed(0)
    out = ShardedWriter(path, shard_bytes)
    for name, p in skeleton.named_parameters():
        if "norm" in name:
            t = 1 + 0.1 * torch.randn(tuple(p.shape), generator=gen)
        else:
            t = 0.02 * torch.randn(tuple(p.shape), generator=gen)
        out.put(name, t.to(torch.bfloat16))
    return out.close()


def qwen3_moe_config(layers: int, hidden: int, experts: int, inter: int, top_k: int) -> dict:
    from premoe.core.tasks import char_tokenizer

    return {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": len(char_tokenizer()),
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "moe_intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": True,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        **special_tokens(),
    }


def make_qwen3_moe(path: Path, cfg: dict, shard_bytes: int = 256 << 20) -> int:
    """Qwen3-MoE as the hub publishes it (``experts.{e}.gate_proj.weight`` ...); returns its size."""
    import torch

    skeleton = meta_skeleton(path, cfg)
    gen = torch.Generator().manual_seed(0)
    out = ShardedWriter(path, shard_bytes)

    def rand(shape, std=0.02):
        return (std * torch.randn(tuple(shape), generator=gen)).to(torch.bfloat16)

    inter = cfg["moe_intermediate_size"]
    for name, p in skeleton.named_parameters():
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H] -> per-expert gate_proj / up_proj [I, H]
            prefix = name[: -len("gate_up_proj")]
            for e in range(p.shape[0]):
                out.put(f"{prefix}{e}.gate_proj.weight", rand((inter, p.shape[2])))
                out.put(f"{prefix}{e}.up_proj.weight", rand((inter, p.shape[2])))
        elif name.endswith("experts.down_proj"):  # [E, H, I] -> per-expert down_proj [H, I]
            prefix = name[: -len("down_proj")]
            for e in range(p.shape[0]):
                out.put(f"{prefix}{e}.down_proj.weight", rand(p.shape[1:]))
        elif "norm" in name:
            out.put(name, (1 + 0.1 * torch.randn(tuple(p.shape), generator=gen)).to(torch.bfloat16))
        elif name.endswith("mlp.gate.weight"):
            out.put(name, rand(p.shape, 1.0))  # decisive routing, as in trained models
        else:
            out.put(name, rand(p.shape))
    return out.close()


def write_tasks(work: Path, n: int, tasks=("add", "reverse")) -> dict[str, Path]:
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples

    return {t: write_jsonl(work / f"{t}.jsonl", samples(t, n, "calib")) for t in tasks}


def max_rel_diff(a, b) -> float:
    """Largest relative difference between two patterns' statistics."""
    return max(float(((a.means[k] - b.means[k]).abs() / a.means[k].abs().clamp_min(1e-6)).max()) for k in a.means)


# ---------------------------------------------------------------------------------------------
# moe


def run_moe(args, work: Path) -> dict:
    """A DeepSeek-V3-shaped checkpoint (sigmoid router with correction bias, 8 expert groups of which 4
    are used, top-8, a shared expert, leading dense layers, MLA attention), FP8 with 128x128 block scales
    as DeepSeek publishes it, sharded. Each step in a fresh process inside a memory limit of at most half
    the checkpoint:

    1. ``premoe calibrate`` of two built-in tasks (streamed layer by layer: the model does not fit);
    2. ``premoe prune --keep 16`` (kept experts written in FP8, scales sliced in lockstep);
    3. ``premoe generate --keep 16`` with retrieval (only the routed task's experts are read).

    Each step's peak RSS is compared with its ideal: the interpreter with torch and transformers
    imported, plus the largest layer and the hidden states (calibration), a copy buffer (pruning), or
    the pruned model (generation). Then, on a smaller checkpoint of the same shape that fits in memory,
    calibration is timed streamed and in memory, and their scores compared."""
    result = {}
    if not args.skip_large:
        result["large"] = moe_large(args, work)
    if not args.skip_throughput:
        result["throughput"] = moe_throughput(args, work)
    return result


def moe_large(args, work: Path) -> dict:
    import premoe
    from premoe.core.config import load_tokenizer
    from premoe.core.data import iter_samples
    from premoe.moe.model import inspect_model
    from premoe.moe.streaming import resident_sizes

    model = generated(work / "model", lambda p: make_deepseek(p, args.experts))
    info = inspect_model(model)
    size = info.checkpoint.nbytes
    limit = int(size * args.limit_frac)
    sizes = resident_sizes(info)
    base = baseline_rss_mb(
        f"{CLI}, premoe.moe.streaming, premoe.moe.server, transformers.models.deepseek_v3.modeling_deepseek_v3"
    )
    tasks = write_tasks(work, args.samples)
    store, out = work / "store", work / "pruned"
    steps = {}
    for t, f in tasks.items():
        steps[f"calibrate {t}"] = peak_rss_of(
            PREMOE
            + ["calibrate", "--model", str(model), "--data", str(f), "--task", t, "--store", str(store), "--overwrite"],
            limit,
        )
    steps["prune"] = peak_rss_of(
        PREMOE
        + [
            "prune",
            "--model",
            str(model),
            "--store",
            str(store),
            "--task",
            "add",
            "--keep",
            str(args.keep),
            "--out",
            str(out),
            "--overwrite",
        ]
        + ([] if args.verify else ["--no-verify"]),
        limit,
    )
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("add 12+30=", "reverse hello=", "add 7+8=")))
    steps["generate"] = peak_rss_of(
        PREMOE
        + [
            "generate",
            "--model",
            str(model),
            "--store",
            str(store),
            "--keep",
            str(args.keep),
            "--data",
            str(prompts),
            "--json",
            "--max-new-tokens",
            "4",
        ],
        limit,
    )
    if steps["calibrate add"]["returncode"] == 0:
        pruned = resident_sizes(info, plan=premoe.plan(info, store, "add", args.keep))
    else:  # calibration failed (killed at the limit, say): no plan to size the pruned model by
        pruned = {"total": float("nan")}
    routers = sum(info.checkpoint.tensors[k].nbytes for k, r in info.roles.items() if r.kind == "router")
    tok = load_tokenizer(model)
    tokens = sum(
        len(tok(t, truncation=True, max_length=2048)["input_ids"]) for f in tasks.values() for t in iter_samples(f)
    )
    hid = tokens * 2048 * 2  # hidden states: bf16 x hidden size 2048
    ideal = {f"calibrate {t}": base + (sizes["largest_layer"] + hid) / 2**20 for t in tasks}
    ideal["prune"] = base + 16
    ideal["generate"] = base + (pruned["total"] + routers) / 2**20
    for name, st in steps.items():
        st["ideal_mb"] = ideal[name]
    return {
        "checkpoint_mb": size / 2**20,
        "limit_mb": limit / 2**20,
        "resident_mb": sizes["total"] / 2**20,
        "largest_layer_mb": sizes["largest_layer"] / 2**20,
        "baseline_mb": base,
        "hidden_mb": hid / 2**20,
        "pruned_resident_mb": pruned["total"] / 2**20,
        "keep": args.keep,
        "experts": args.experts,
        "steps": steps,
    }


THROUGHPUT = r"""
import json, sys, time, torch
import premoe
model, data, store, stream = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
t0 = time.perf_counter()
p = premoe.calibrate(model, data, "t", store, stream=stream, progress=False, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": p.info["tokens"], "streamed": p.info["streamed"]}))
"""


def moe_throughput(args, work: Path) -> dict:
    """Streamed vs in-memory calibration on a checkpoint that fits (best of two fresh processes each), and
    their agreement."""
    from premoe.core.store import PatternStore
    from premoe.moe.model import inspect_model

    model = generated(work / "small", lambda p: make_deepseek(p, args.small_experts))
    f = write_tasks(work, args.samples)["add"]
    res = {}
    for mode in ("memory", "stream", "memory", "stream"):
        store = work / f"store-{mode}"
        flag = "1" if mode == "stream" else "0"
        out = subprocess.run(
            [sys.executable, "-c", THROUGHPUT, str(model), str(f), str(store), flag],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        res.setdefault(mode, []).append(r["seconds"])
        res["tokens"] = r["tokens"]
    a = PatternStore.open(work / "store-memory").load("t")
    b = PatternStore.open(work / "store-stream").load("t")
    best = {m: min(res[m]) for m in ("memory", "stream")}
    same = all(
        x.topk(16).indices.sort().values.equal(y.topk(16).indices.sort().values) for x, y in zip(a.scores, b.scores)
    )
    return {
        "checkpoint_mb": inspect_model(model).checkpoint.nbytes / 2**20,
        "tokens": res["tokens"],
        "seconds": best,
        "ratio": best["memory"] / best["stream"],
        "max_rel_diff": max_rel_diff(a, b),
        "same_kept_16": bool(same),
    }


def report_moe(result: dict) -> int:
    if "large" in result:
        r = result["large"]
        print(
            f"\ncheckpoint {r['checkpoint_mb'] / 1024:.2f} GB (FP8, {r['experts']} experts x 12 MoE layers), "
            f"memory limit {r['limit_mb'] / 1024:.2f} GB ({r['limit_mb'] / r['checkpoint_mb']:.2f} of it); "
            f"dequantised the model needs {r['resident_mb'] / 1024:.2f} GB"
        )
        print(f"{'step':<20} {'ok':>3} {'seconds':>8} {'peak RSS MB':>12} {'ideal MB':>9} {'ratio':>6}")
        for name, st in r["steps"].items():
            print(
                f"{name:<20} {'yes' if st['returncode'] == 0 else 'NO':>3} {st['seconds']:>8.1f} "
                f"{st['peak_rss_mb']:>12.0f} {st['ideal_mb']:>9.0f} {st['peak_rss_mb'] / st['ideal_mb']:>6.2f}"
            )
    if "throughput" in result:
        t = result["throughput"]
        print(
            f"\ncalibration on a {t['checkpoint_mb'] / 1024:.2f} GB checkpoint that fits ({t['tokens']} tokens): "
            f"in memory {t['seconds']['memory']:.1f}s, streamed {t['seconds']['stream']:.1f}s -> streamed throughput "
            f"{t['ratio']:.2f} of in-memory; max relative difference of the statistics {t['max_rel_diff']:.1e}; "
            f"same kept experts at 16: {t['same_kept_16']}"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# dense


def run_dense(args, work: Path) -> dict:
    """A Llama-shaped bf16 checkpoint, calibrated layer by layer under a hard memory limit. Each step in a
    fresh process, with the checkpoint dropped from the page cache first (so every read is charged to
    the process's group):

    1. ``premoe calibrate --stream`` inside a memory limit of at most half the checkpoint; hidden states
       past the budget go to ``--offload-dir``;
    2. ``premoe calibrate`` with no memory flag inside the same limit: premoe reads the cgroup's room,
       decides the model does not fit and streams on its own;
    3. ``premoe calibrate --no-stream`` inside the same limit (the model loaded whole by transformers);
    4. ``premoe calibrate --no-stream`` without a limit: the in-memory peak and the reference statistics,
       compared with the streamed ones.

    Reported per step: the process's peak RSS (VmHWM: anonymous memory plus mapped files, the shared
    libraries included), the group's peak anonymous memory and its peak usage (which also counts page
    cache, reclaimed at the limit)."""
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.dense.calibration import dense_sizes
    from premoe.dense.model import inspect_dense

    cfg = llama_config(args.layers, args.hidden, args.intermediate)
    model = generated(work / "model", lambda p: make_llama(p, cfg))
    info = inspect_dense(model)
    size = info.checkpoint.nbytes
    limit = int(size * args.limit_frac)
    sizes = dense_sizes(info)
    base = baseline_rss_mb(
        f"{CLI}, premoe.dense.calibration, premoe.core.streaming, transformers.models.llama.modeling_llama"
    )
    data = write_jsonl(work / "add.jsonl", samples("add", args.samples, "calib"))
    offload = work / "offload"
    offload.mkdir(exist_ok=True)
    cmd = PREMOE + ["calibrate", "--model", str(model), "--data", str(data), "--task", "t"]
    runs = {
        "--stream, limited": (["--store", str(work / "s-stream"), "--stream", "--offload-dir", str(offload)], limit),
        "(auto), limited": (["--store", str(work / "s-auto"), "--offload-dir", str(offload)], limit),
        "--no-stream, limited": (["--store", str(work / "s-memory-limited"), "--no-stream"], limit),
        "--no-stream, no limit": (["--store", str(work / "s-memory"), "--no-stream"], None),
    }
    steps = {}
    for name, (flags, lim) in runs.items():
        drop_cache(model)
        steps[name] = st = peak_rss_of(cmd + flags, lim)
        st["streamed_note"] = "streamed layer by layer" in st["stdout"]
    ok = steps["--stream, limited"]["returncode"] == 0 and steps["--no-stream, no limit"]["returncode"] == 0
    return {
        "checkpoint_mb": size / 2**20,
        "limit_mb": limit / 2**20,
        "largest_layer_mb": sizes["largest_layer"] / 2**20,
        "outside_mb": sizes["outside"] / 2**20,
        "baseline_mb": base,
        "ideal_streamed_mb": base + sizes["largest_layer"] / 2**20,
        "layers": args.layers,
        "steps": steps,
        "agreement": dense_agreement(work / "s-memory", work / "s-stream") if ok else None,
        "offload_left": sorted(p.name for p in offload.iterdir()),
    }


def dense_agreement(a_store: Path, b_store: Path) -> dict:
    """Largest relative difference of the statistics and of the prompt centroids of two calibrations."""
    from premoe.core.store import PatternStore

    a, b = PatternStore.open(a_store).load("t"), PatternStore.open(b_store).load("t")
    sig = max(float((a.signature[k] - b.signature[k]).abs().max()) for k in a.signature)
    return {
        "max_rel_diff": max_rel_diff(a, b),
        "max_abs_diff_centroids": sig,
        "tokens": [a.info["tokens"], b.info["tokens"]],
        "streamed": [a.info.get("streamed"), b.info.get("streamed")],
    }


def report_dense(r: dict) -> int:
    print(
        f"\ncheckpoint {r['checkpoint_mb']:.0f} MB (bf16 Llama, {r['layers']} layers; largest part "
        f"{r['largest_layer_mb']:.0f} MB), memory limit {r['limit_mb']:.0f} MB "
        f"({r['limit_mb'] / r['checkpoint_mb']:.2f} of it); interpreter with torch + transformers "
        f"{r['baseline_mb']:.0f} MB"
    )
    print(
        f"{'step':<22} {'rc':>4} {'streamed':>8} {'seconds':>8} {'peak RSS MB':>12} {'/ checkpoint':>12} "
        f"{'group anon MB':>13} {'group usage MB':>14}"
    )
    for name, st in r["steps"].items():
        anon, usage = st.get("cgroup_peak_anon_mb"), st.get("cgroup_max_usage_mb")
        print(
            f"{name:<22} {st['returncode']:>4} {'yes' if st['streamed_note'] else 'no':>8} {st['seconds']:>8.1f} "
            f"{st['peak_rss_mb']:>12.0f} {st['peak_rss_mb'] / r['checkpoint_mb']:>12.2f} "
            f"{'-' if anon is None else f'{anon:.0f}':>13} {'-' if usage is None else f'{usage:.0f}':>14}"
        )
    print(f"ideal streamed peak RSS (interpreter + largest part): {r['ideal_streamed_mb']:.0f} MB")
    if r["agreement"]:
        a = r["agreement"]
        print(
            f"streamed vs in-memory statistics: max relative difference {a['max_rel_diff']:.1e}, prompt centroids "
            f"max abs difference {a['max_abs_diff_centroids']:.1e}, tokens {a['tokens']}"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# dense-refit


def run_dense_refit(args, work: Path) -> dict:
    """What ``premoe prune --refit`` costs on a dense model larger than the memory it is given. The
    Llama-shaped checkpoint of ``dense``; a task calibrated on it (streamed, no limit); then, each in a
    fresh process with the checkpoint dropped from the page cache, inside a memory limit of
    ``--limit-frac`` of the checkpoint:

    1. ``premoe prune --sparsity S`` (plain SEAP slice);
    2. ``premoe prune --sparsity S --refit`` (the same plan, o_proj/down_proj re-fitted by least squares
       on the task's calibration data: one streamed pass, one layer's Gram matrices in memory at a time).

    Reported: the re-fit's extra time as a ratio to the plain prune and to calibration."""
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.dense.model import inspect_dense

    cfg = llama_config(args.layers, args.hidden, args.intermediate)
    model = generated(work / "model", lambda p: make_llama(p, cfg))
    size = inspect_dense(model).checkpoint.nbytes
    limit = int(size * args.limit_frac)
    base = baseline_rss_mb(
        f"{CLI}, premoe.dense.refit, premoe.dense.export, "
        "premoe.core.streaming, transformers.models.llama.modeling_llama"
    )
    data = write_jsonl(work / "add.jsonl", samples("add", args.samples, "calib"))
    store = work / "store"
    drop_cache(model)
    steps = {
        "calibrate --stream": peak_rss_of(
            PREMOE
            + [
                "calibrate",
                "--model",
                str(model),
                "--data",
                str(data),
                "--task",
                "t",
                "--store",
                str(store),
                "--stream",
            ],
            None,
        )
    }
    for name, extra in (("prune", []), ("prune --refit", ["--refit"])):
        drop_cache(model)
        steps[name] = peak_rss_of(
            PREMOE
            + [
                "prune",
                "--model",
                str(model),
                "--store",
                str(store),
                "--task",
                "t",
                "--sparsity",
                str(args.sparsity),
                "--out",
                str(work / name.replace(" ", "")),
                *extra,
            ],
            limit,
        )
    return {
        "checkpoint_mb": size / 2**20,
        "limit_mb": limit / 2**20,
        "baseline_mb": base,
        "layers": args.layers,
        "hidden": args.hidden,
        "intermediate": args.intermediate,
        "sparsity": args.sparsity,
        "samples": args.samples,
        "steps": steps,
    }


def report_dense_refit(r: dict) -> int:
    s = r["steps"]
    print(
        f"\ncheckpoint {r['checkpoint_mb']:.0f} MB (bf16 Llama, {r['layers']} layers, hidden {r['hidden']}, FFN "
        f"{r['intermediate']}); prune limit {r['limit_mb']:.0f} MB; interpreter with torch + transformers "
        f"{r['baseline_mb']:.0f} MB; {r['samples']} calibration samples"
    )
    print_steps(s, r["checkpoint_mb"])
    if all(st["returncode"] == 0 for st in s.values()):
        extra = s["prune --refit"]["seconds"] - s["prune"]["seconds"]
        print(
            f"prune --refit / prune: {s['prune --refit']['seconds'] / s['prune']['seconds']:.2f}x time; the re-fit's "
            f"extra time is {extra / s['calibrate --stream']['seconds']:.2f}x a streamed calibration"
        )
    return 0


# ---------------------------------------------------------------------------------------------
# moe-refit


def run_moe_refit(args, work: Path) -> dict:
    """What the tight-keep defaults cost on an MoE model larger than the memory it is given. A
    Qwen3-MoE-shaped bf16 checkpoint in the hub's layout (per-expert keys, sharded); each step in a fresh
    process with the checkpoint dropped from the page cache, inside a memory limit of ``--limit-frac`` of
    the checkpoint (so every pass streams the model one decoder layer at a time):

    1. ``premoe calibrate --scorer tcess`` (the paper's statistics: router logits only);
    2. ``premoe calibrate`` (the default: also the expert-output statistics EASY-EP ranks by) and
       ``premoe calibrate --scorer recon`` (also the selection by the pruned block's output);
    3. ``premoe prune --keep N --no-refit`` (the plain slice);
    4. ``premoe prune --keep N`` (the default: the kept experts' down projections re-fitted under
       re-routing on the task's calibration tokens, one streamed pass).

    Reported: the cost of the default (its calibration plus the re-fit's extra time over a plain prune)
    as a ratio to the paper's plain calibration."""
    from premoe.moe.model import inspect_model

    cfg = qwen3_moe_config(args.layers, args.hidden, args.experts, args.inter, args.top_k)
    model = generated(work / "model", lambda p: make_qwen3_moe(p, cfg))
    size = inspect_model(model).checkpoint.nbytes
    limit = int(size * args.limit_frac)
    base = baseline_rss_mb(
        f"{CLI}, premoe.moe.refit, premoe.moe.export, "
        "premoe.core.streaming, transformers.models.qwen3_moe.modeling_qwen3_moe"
    )
    data = write_tasks(work, args.samples, ("sort",))["sort"]
    steps = {}
    for name, store, extra in (
        ("calibrate --scorer tcess", "tcess", ["--scorer", "tcess"]),
        ("calibrate (default)", "default", []),
        ("calibrate --scorer recon", "recon", ["--scorer", "recon"]),
    ):
        drop_cache(model)
        steps[name] = peak_rss_of(
            PREMOE
            + [
                "calibrate",
                "--model",
                str(model),
                "--data",
                str(data),
                "--task",
                "t",
                "--store",
                str(work / store),
                "--overwrite",
                *extra,
            ],
            limit,
        )
    for name, out, extra in (("prune --no-refit", "plain", ["--no-refit"]), ("prune (default)", "refit", [])):
        drop_cache(model)
        steps[name] = peak_rss_of(
            PREMOE
            + [
                "prune",
                "--model",
                str(model),
                "--store",
                str(work / "default"),
                "--task",
                "t",
                "--keep",
                str(args.keep),
                "--out",
                str(work / out),
                "--overwrite",
                *extra,
            ],
            limit,
        )
    return {
        "checkpoint_mb": size / 2**20,
        "limit_mb": limit / 2**20,
        "baseline_mb": base,
        "layers": args.layers,
        "hidden": args.hidden,
        "experts": args.experts,
        "inter": args.inter,
        "top_k": args.top_k,
        "keep": args.keep,
        "samples": args.samples,
        "steps": steps,
    }


def report_moe_refit(r: dict) -> int:
    s = r["steps"]
    print(
        f"\ncheckpoint {r['checkpoint_mb']:.0f} MB (bf16 Qwen3-MoE, {r['layers']} layers, hidden {r['hidden']}, "
        f"{r['experts']} experts of {r['inter']}, top-{r['top_k']}); limit {r['limit_mb']:.0f} MB; interpreter with "
        f"torch + transformers {r['baseline_mb']:.0f} MB; {r['samples']} calibration samples; keep {r['keep']}"
    )
    print_steps(s, r["checkpoint_mb"])
    if not all(st["returncode"] == 0 for st in s.values()):
        return 1
    plain = s["calibrate --scorer tcess"]["seconds"]
    extra = s["prune (default)"]["seconds"] - s["prune --no-refit"]["seconds"]
    total = s["calibrate (default)"]["seconds"] + extra
    print(
        f"default calibration / tcess calibration: {s['calibrate (default)']['seconds'] / plain:.2f}x; "
        f"re-fit extra over a plain prune: {extra / plain:.2f}x a tcess calibration; "
        f"calibration + selection + re-fit: {total / plain:.2f}x plain calibration"
    )
    print(
        f"recon calibration (selection by the pruned block's output) / tcess calibration: "
        f"{s['calibrate --scorer recon']['seconds'] / plain:.2f}x"
    )
    return 0


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{moe,dense,dense-refit,moe-refit}")

    def command(name: str, run, report, summary: str, samples: int, half_at_most: bool) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=summary,
            description=inspect.cleandoc(run.__doc__),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(run=run, report=report, prefix=f"premoe-{name}-", half_at_most=half_at_most)
        p.add_argument(
            "--limit-frac",
            type=float,
            default=0.5,
            help="memory limit as a fraction of the checkpoint" + (" (<= 0.5)" if half_at_most else ""),
        )
        p.add_argument(
            "--samples", type=int, default=samples, help="calibration samples" + (" per task" if name == "moe" else "")
        )
        p.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
        return p

    p = command(
        "moe",
        run_moe,
        report_moe,
        "calibrate, prune and generate a DeepSeek-V3-shaped FP8 MoE under half its "
        "size; streamed vs in-memory calibration",
        32,
        True,
    )
    p.add_argument("--experts", type=int, default=128, help="routed experts per MoE layer of the large model (size)")
    p.add_argument("--small-experts", type=int, default=16, help="routed experts of the model that fits (throughput)")
    p.add_argument("--keep", type=int, default=16, help="experts kept per layer when pruning and serving")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip prune's self-check (by default: read back, reloaded in transformers only if it fits)",
    )
    p.add_argument("--skip-large", action="store_true", help="the throughput comparison only (needs no cgroup)")
    p.add_argument("--skip-throughput", action="store_true")

    for name, run, report, summary, layers in (
        (
            "dense",
            run_dense,
            report_dense,
            "calibrate a Llama-shaped bf16 model streamed, automatically and in memory under a memory limit",
            12,
        ),
        (
            "dense-refit",
            run_dense_refit,
            report_dense_refit,
            "what premoe prune --refit costs on a dense model larger than its memory limit",
            24,
        ),
    ):
        p = command(name, run, report, summary, 32, name == "dense")
        p.add_argument("--layers", type=int, default=layers, help="decoder layers (size)")
        p.add_argument("--hidden", type=int, default=2048)
        p.add_argument("--intermediate", type=int, default=5632)
        if name == "dense-refit":
            p.add_argument("--sparsity", type=float, default=0.5)

    p = command(
        "moe-refit",
        run_moe_refit,
        report_moe_refit,
        "what the tight-keep defaults (EASY-EP or recon "
        "selection, re-fit) cost on a Qwen3-MoE-shaped model larger than its memory limit",
        64,
        False,
    )
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--inter", type=int, default=512, help="expert intermediate size")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--keep", type=int, default=16)
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.half_at_most and args.limit_frac > 0.5:
        ap.error("--limit-frac must be at most 0.5 (the limit is at most half the checkpoint)")
    if not getattr(args, "skip_large", False):
        require_cgroup(ap)
    with work_dir(args.work, args.prefix) as work:
        result = args.run(args, work)
    print_result(result)
    return args.report(result)


if __name__ == "__main__":
    raise SystemExit(main())
