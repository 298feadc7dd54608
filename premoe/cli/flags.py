"""Flags several ``premoe`` verbs share, the choices they offer, and how sizes are printed."""

from __future__ import annotations

import argparse

SCORER_NAMES = ("tcess", "official", "frequency", "reap", "ean", "easyep", "recon", "weights", "random")  # premoe.moe.scoring.SCORERS
DENSE_METRICS = ("sf", "sw", "sw-paper", "sw-code")  # premoe.dense.scoring.METRICS
SERVE_POLICIES = ("affinity", "fcfs")  # premoe.server.scheduler.POLICIES


def add_memory_flags(p, offload: bool = True):
    g = p.add_argument_group("memory (models larger than RAM)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model one decoder layer at a time (default: when it would not fit in memory)")
    g.add_argument("--max-memory", type=float, metavar="MB",
                   help="memory budget (default: what the machine and this process's cgroup leave free)")
    if offload:
        g.add_argument("--offload-dir", help="where hidden states past the budget go (default: the system temp directory)")


def add_selection_flags(p, keep_required: bool):
    p.add_argument("--task", help="calibrated task whose scores decide")
    p.add_argument("--agnostic", action="store_true", help="pool every task in the store instead (task-agnostic)")
    p.add_argument("--keep", type=int, help="MoE: experts kept in every MoE layer" + (" (required)" if keep_required else ""))
    p.add_argument("--scorer", choices=SCORER_NAMES, help="rank experts with this scorer (default: the task's own)")
    p.add_argument("--top-k", type=int, help="also lower the experts routed per token (e.g. 4/64)")
    p.add_argument("--group-policy", default="balanced", choices=("balanced", "flatten"),
                   help="group-limited routers (DeepSeek-V3): keep N/n_group per group, or flatten to plain top-k")
    add_dense_flags(p)
    r = p.add_argument_group("compensation (MoE and dense)")
    r.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="re-fit by least squares so each pruned layer's output matches the dense one on the calibration "
                        "tokens (the store's recorded data, or --refit-data): MoE models the kept experts' down "
                        "projections and router rows under re-routing, dense models the kept o_proj/down_proj columns and biases; "
                        "plain weights, vanilla load (default: on when the recorded data is still there unchanged; "
                        "--no-refit: the published methods)")
    r.add_argument("--refit-data", nargs="+", metavar="FILE",
                   help="JSONL texts for --refit, each file weighted equally (default: the data the store was calibrated on)")


def add_dense_flags(p, serving: bool = False):
    g = p.add_argument_group("dense models (SEAP: heads and FFN channels)")
    g.add_argument("--sparsity", type=float, help="fraction of decoder linear weights removed, in [0, 1) (e.g. 0.5)")
    g.add_argument("--method", choices=("seap", "seap-gen", "wanda-sp", "flap", "random"),
                   help="seap (default: the task's statistics), seap-gen (all tasks pooled), wanda-sp, flap, random")
    if serving:
        return
    g.add_argument("--schedule", choices=("uniform", "logistic", "adaptive"),
                   help="layer allocation: uniform counts (default; plain transformers/vLLM load), SEAP's logistic "
                        "depth schedule or FLAP's adaptive ranking (exports are zero-padded to the largest layer)")
    g.add_argument("--whole-groups", action="store_true",
                   help="GQA: remove whole KV groups instead of the same number of query heads from every group")
    g.add_argument("--bias-comp", action=argparse.BooleanOptionalAction, default=None,
                   help="FLAP bias compensation of the removed inputs' mean (default: on for flap only)")
    g.add_argument("--score", choices=tuple(DENSE_METRICS),
                   help="importance score (default: the method's; sf = SEAP s_F, sw = Wanda-sp; see README)")


def add_signature_flags(p):
    g = p.add_argument_group("retrieval (defaults chosen on routing accuracy; see README)")
    g.add_argument("--layers", type=int, help="MoE: MoE layers the signature spans (default 1); dense: decoder layers "
                                               "run before comparing (default 0: the mean token embedding)")
    g.add_argument("--stat", choices=("prob", "tcess", "count", "official"), help="router statistic compared (default prob)")
    g.add_argument("--source", choices=("prompt", "full"), help="keys from calibration prompts or prompt+completion (default prompt)")
    g.add_argument("--norm", choices=("none", "l1", "l2"), help="per-layer normalisation (default l1)")
    g.add_argument("--metric", choices=("l2", "cosine", "l1"), help="distance (default l1)")


def add_serving_flags(p, http: bool = False):
    p.add_argument("--model", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--keep", type=int, help="MoE: experts held per MoE layer (required for MoE models)")
    p.add_argument("--top-k", type=int, help="also lower the experts routed per token")
    add_dense_flags(p, serving=True)
    p.add_argument("--group-policy", default="balanced", choices=("balanced", "flatten"))
    if not http:
        p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache-mb", type=float, default=0.0, help="keep experts a switch drops, up to this many MB (default 0)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="MoE: load the re-fitted rows `premoe refit` stored with each task's pattern for this --keep "
                        "(default: where the store has them; --refit: required; --no-refit: the checkpoint's rows)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto ...")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    add_signature_flags(p)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
