"""What the tight-keep defaults cost on an MoE model larger than the memory it is given (issue 10).

Generates a Qwen3-MoE-shaped bf16 checkpoint in the hub's layout (per-expert keys, sharded), written
tensor by tensor, then runs each step in a fresh process with the checkpoint dropped from the page
cache, inside a cgroup-v1 memory limit of ``--limit-frac`` of the checkpoint (so every pass streams
the model one decoder layer at a time):

1. ``premoe calibrate --scorer tcess`` (the paper's statistics: router logits only);
2. ``premoe calibrate`` (the default: also the expert-output statistics EASY-EP ranks by);
   and ``premoe calibrate --scorer recon`` (also the selection by the pruned block's output,
   :mod:`premoe.moe.recon`);
3. ``premoe prune --keep N --no-refit`` (the plain slice);
4. ``premoe prune --keep N`` (the default: the kept experts' down projections re-fitted under
   re-routing on the task's calibration tokens, one streamed pass).

Reported: seconds and peak RSS of each step, and the cost of the default (its calibration plus the
re-fit's extra time over a plain prune) as a ratio to the paper's plain calibration. Accuracy is
measured on trained models (``premoe sweep``), not here: this model's weights are random.

    python bench/moe_refit_cost.py              # ~2.1 GB checkpoint, 1.05 GB limit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ShardedWriter, baseline_rss_mb, print_steps, require_cgroup, work_dir  # noqa: E402
from dense_stream import drop_cache  # noqa: E402
from large_model import peak_rss_of  # noqa: E402


def config(layers: int, hidden: int, experts: int, inter: int, top_k: int) -> dict:
    from premoe.core.tasks import char_tokenizer

    tok = char_tokenizer()
    return {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": len(tok),
            "hidden_size": hidden, "intermediate_size": 4 * hidden, "moe_intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 128, "num_key_value_heads": 4,
            "head_dim": 128, "num_experts": experts, "num_experts_per_tok": top_k, "norm_topk_prob": True,
            "max_position_embeddings": 2048, "tie_word_embeddings": False, "dtype": "bfloat16",
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def make_checkpoint(path: Path, cfg: dict, shard_bytes: int = 256 << 20) -> int:
    """Write the checkpoint as the hub publishes Qwen3-MoE (``experts.{e}.gate_proj.weight`` ...), one
    shard in memory at a time; returns its size."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from premoe.core.tasks import char_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    char_tokenizer().save_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(CONFIG_MAPPING["qwen3_moe"](**{k: v for k, v in cfg.items()
                                                                                   if k != "model_type"}))
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--inter", type=int, default=512, help="expert intermediate size")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--keep", type=int, default=16)
    ap.add_argument("--limit-frac", type=float, default=0.5, help="memory limit as a fraction of the checkpoint")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples")
    ap.add_argument("--work", type=Path, help="working directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    require_cgroup(ap)
    with work_dir(args.work, "premoe-moe-refit-") as work:
        result = run(args, work)
    print(json.dumps({k: v for k, v in result.items() if k != "steps"} | {"steps": {
        n: {k: v for k, v in s.items() if k not in ("stdout", "stderr")} for n, s in result["steps"].items()}}, indent=2))
    report(result)
    return 0 if all(s["returncode"] == 0 for s in result["steps"].values()) else 1


def run(args, work: Path) -> dict:
    from premoe.core.data import write_jsonl
    from premoe.moe.model import inspect_model
    from premoe.core.tasks import samples

    model = work / "model"
    if not (model / "model.safetensors.index.json").exists():
        make_checkpoint(model, config(args.layers, args.hidden, args.experts, args.inter, args.top_k))
    size = inspect_model(model).checkpoint.nbytes
    limit = int(size * args.limit_frac)
    base = baseline_rss_mb("torch, transformers, premoe.api, premoe.cli, premoe.moe.refit, premoe.moe.export, "
                           "premoe.core.streaming, transformers.models.qwen3_moe.modeling_qwen3_moe")
    data = write_jsonl(work / "sort.jsonl", samples("sort", args.samples, "calib"))
    py = [sys.executable, "-m", "premoe", "-q"]
    steps = {}
    for name, store, extra in (("calibrate --scorer tcess", "tcess", ["--scorer", "tcess"]),
                               ("calibrate (default)", "default", []),
                               ("calibrate --scorer recon", "recon", ["--scorer", "recon"])):
        drop_cache(model)
        steps[name] = peak_rss_of(py + ["calibrate", "--model", str(model), "--data", str(data), "--task", "t",
                                        "--store", str(work / store), "--overwrite", *extra], limit)
    for name, out, extra in (("prune --no-refit", "plain", ["--no-refit"]), ("prune (default)", "refit", [])):
        drop_cache(model)
        steps[name] = peak_rss_of(py + ["prune", "--model", str(model), "--store", str(work / "default"), "--task", "t",
                                        "--keep", str(args.keep), "--out", str(work / out), "--overwrite", *extra], limit)
    for st in steps.values():
        if st["returncode"]:
            print(st["stderr"][-2000:], file=sys.stderr)
    return {"checkpoint_mb": size / 2**20, "limit_mb": limit / 2**20, "baseline_mb": base, "layers": args.layers,
            "hidden": args.hidden, "experts": args.experts, "inter": args.inter, "top_k": args.top_k, "keep": args.keep,
            "samples": args.samples, "steps": steps}


def report(r: dict) -> None:
    s = r["steps"]
    print(f"\ncheckpoint {r['checkpoint_mb']:.0f} MB (bf16 Qwen3-MoE, {r['layers']} layers, hidden {r['hidden']}, "
          f"{r['experts']} experts of {r['inter']}, top-{r['top_k']}); limit {r['limit_mb']:.0f} MB; interpreter with "
          f"torch + transformers {r['baseline_mb']:.0f} MB; {r['samples']} calibration samples; keep {r['keep']}")
    print_steps(s, r["checkpoint_mb"])
    if all(st["returncode"] == 0 for st in s.values()):
        plain = s["calibrate --scorer tcess"]["seconds"]
        extra = s["prune (default)"]["seconds"] - s["prune --no-refit"]["seconds"]
        total = s["calibrate (default)"]["seconds"] + extra
        print(f"default calibration / tcess calibration: {s['calibrate (default)']['seconds'] / plain:.2f}x; "
              f"re-fit extra over a plain prune: {extra / plain:.2f}x a tcess calibration; "
              f"calibration + selection + re-fit: {total / plain:.2f}x plain calibration")
        if "calibrate --scorer recon" in s:
            print(f"recon calibration (selection by the pruned block's output) / tcess calibration: "
                  f"{s['calibrate --scorer recon']['seconds'] / plain:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
