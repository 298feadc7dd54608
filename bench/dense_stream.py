"""A dense model larger than memory: calibrate it layer by layer under a hard memory limit.

Generates a Llama-shaped bf16 checkpoint tensor by tensor (never the whole model in memory), sharded.
Then, each in a fresh process, with the checkpoint dropped from the page cache first (so every read
is charged to the process's group):

1. ``premoe calibrate --stream`` inside a cgroup-v1 memory group whose limit is at most half the
   checkpoint (``/sys/fs/cgroup/memory``; needs root); hidden states past the budget go to ``--offload-dir``;
2. ``premoe calibrate`` with no memory flag inside the same limit: premoe reads the cgroup's room,
   decides the model does not fit and streams on its own;
3. ``premoe calibrate --no-stream`` inside the same limit (the model loaded whole by transformers);
4. ``premoe calibrate --no-stream`` without a limit: the in-memory peak and the reference statistics,
   compared with the streamed ones.

Reported per step: the process's peak RSS (VmHWM: anonymous memory plus mapped files, the shared
libraries included), the group's peak anonymous memory and its peak usage (which also counts page
cache, reclaimed at the limit), against the interpreter's own RSS with torch and transformers imported
and the checkpoint's size.

    python bench/dense_stream.py                                  # ~1.1 GB checkpoint, 0.55 GB limit
    python bench/dense_stream.py --layers 24 --limit-frac 0.25    # ~2.1 GB checkpoint, the same limit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ShardedWriter, baseline_rss_mb, require_cgroup, work_dir  # noqa: E402
from large_model import peak_rss_of  # noqa: E402


def config(layers: int, hidden: int, inter: int) -> dict:
    from premoe.core.tasks import char_tokenizer

    tok = char_tokenizer()
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=8192, hidden_size=hidden,
                intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=hidden // 128,
                num_key_value_heads=max(hidden // 512, 1), head_dim=128, max_position_embeddings=4096,
                rms_norm_eps=1e-6, tie_word_embeddings=False, dtype="bfloat16", bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_checkpoint(path: Path, cfg: dict, shard_bytes: int = 256 << 20) -> int:
    """Write the checkpoint shard by shard (at most one shard in memory); returns its size."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from premoe.core.tasks import char_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    char_tokenizer().save_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(CONFIG_MAPPING["llama"](**{k: v for k, v in cfg.items() if k != "model_type"}))
    gen = torch.Generator().manual_seed(0)
    out = ShardedWriter(path, shard_bytes)
    for name, p in skeleton.named_parameters():
        if "norm" in name:  # trained-looking norms
            t = 1 + 0.1 * torch.randn(tuple(p.shape), generator=gen)
        else:
            t = 0.02 * torch.randn(tuple(p.shape), generator=gen)
        out.put(name, t.to(torch.bfloat16))
    return out.close()


def drop_cache(model: Path) -> None:
    """Evict the checkpoint's files from the page cache (only those files)."""
    for f in model.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def compare(a_store: Path, b_store: Path) -> dict:
    """Largest relative difference of the statistics and of the prompt centroids of two calibrations."""
    from premoe.core.store import PatternStore

    a, b = PatternStore.open(a_store).load("t"), PatternStore.open(b_store).load("t")
    rel = max(float(((a.means[k] - b.means[k]).abs() / a.means[k].abs().clamp_min(1e-6)).max()) for k in a.means)
    sig = max(float((a.signature[k] - b.signature[k]).abs().max()) for k in a.signature)
    return {"max_rel_diff": rel, "max_abs_diff_centroids": sig, "tokens": [a.info["tokens"], b.info["tokens"]],
            "streamed": [a.info.get("streamed"), b.info.get("streamed")]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12, help="decoder layers (size)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--limit-frac", type=float, default=0.5, help="memory limit as a fraction of the checkpoint (<= 0.5)")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    if args.limit_frac > 0.5:
        ap.error("--limit-frac must be at most 0.5 (the limit is at most half the checkpoint)")
    require_cgroup(ap)
    with work_dir(args.work, "premoe-dense-stream-") as work:
        result = run(args, work)
    print(json.dumps(result, indent=2))
    report(result)
    return 0


def run(args, work: Path) -> dict:
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.dense.calibration import dense_sizes
    from premoe.dense.model import inspect_dense

    model = work / "model"
    if not (model / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        make_checkpoint(model, config(args.layers, args.hidden, args.intermediate))
        print(f"generated {model} in {time.perf_counter() - t0:.0f}s", flush=True)
    info = inspect_dense(model)
    size = info.checkpoint.nbytes
    limit = int(size * args.limit_frac)
    sizes = dense_sizes(info)
    base = baseline_rss_mb("torch, transformers, premoe.api, premoe.cli, premoe.dense.calibration, "
                           "premoe.core.streaming, transformers.models.llama.modeling_llama")
    data = write_jsonl(work / "add.jsonl", samples("add", args.samples, "calib"))
    offload = work / "offload"
    offload.mkdir(exist_ok=True)
    py = [sys.executable, "-m", "premoe", "-q", "calibrate", "--model", str(model), "--data", str(data), "--task", "t"]
    runs = {
        "--stream, limited": (["--store", str(work / "s-stream"), "--stream", "--offload-dir", str(offload)], limit),
        "(auto), limited": (["--store", str(work / "s-auto"), "--offload-dir", str(offload)], limit),
        "--no-stream, limited": (["--store", str(work / "s-memory-limited"), "--no-stream"], limit),
        "--no-stream, no limit": (["--store", str(work / "s-memory"), "--no-stream"], None),
    }
    steps = {}
    for name, (flags, lim) in runs.items():
        drop_cache(model)
        steps[name] = st = peak_rss_of(py + flags, lim)
        st["streamed_note"] = "streamed layer by layer" in st["stdout"]
    ok = steps["--stream, limited"]["returncode"] == 0 and steps["--no-stream, no limit"]["returncode"] == 0
    return {"checkpoint_mb": size / 2**20, "limit_mb": limit / 2**20, "largest_layer_mb": sizes["largest_layer"] / 2**20,
            "outside_mb": sizes["outside"] / 2**20, "baseline_mb": base, "ideal_streamed_mb": base + sizes["largest_layer"] / 2**20,
            "layers": args.layers, "steps": steps,
            "agreement": compare(work / "s-memory", work / "s-stream") if ok else None,
            "offload_left": sorted(p.name for p in offload.iterdir())}


def report(r: dict) -> None:
    print(f"\ncheckpoint {r['checkpoint_mb']:.0f} MB (bf16 Llama, {r['layers']} layers; largest part "
          f"{r['largest_layer_mb']:.0f} MB), memory limit {r['limit_mb']:.0f} MB ({r['limit_mb'] / r['checkpoint_mb']:.2f} "
          f"of it); interpreter with torch + transformers {r['baseline_mb']:.0f} MB")
    print(f"{'step':<22} {'rc':>4} {'streamed':>8} {'seconds':>8} {'peak RSS MB':>12} {'/ checkpoint':>12} "
          f"{'group anon MB':>13} {'group usage MB':>14}")
    for name, st in r["steps"].items():
        anon, usage = st.get("cgroup_peak_anon_mb"), st.get("cgroup_max_usage_mb")
        print(f"{name:<22} {st['returncode']:>4} {'yes' if st['streamed_note'] else 'no':>8} {st['seconds']:>8.1f} "
              f"{st['peak_rss_mb']:>12.0f} {st['peak_rss_mb'] / r['checkpoint_mb']:>12.2f} "
              f"{'-' if anon is None else f'{anon:.0f}':>13} {'-' if usage is None else f'{usage:.0f}':>14}")
    print(f"ideal streamed peak RSS (interpreter + largest part): {r['ideal_streamed_mb']:.0f} MB")
    if r["agreement"]:
        a = r["agreement"]
        print(f"streamed vs in-memory statistics: max relative difference {a['max_rel_diff']:.1e}, prompt centroids "
              f"max abs difference {a['max_abs_diff_centroids']:.1e}, tokens {a['tokens']}")


if __name__ == "__main__":
    raise SystemExit(main())
