"""``premoe`` command line: subcommands map 1:1 onto :mod:`premoe.api` functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from premoe._version import __version__
from premoe.errors import PremoeError

SCORER_NAMES = ("tcess", "official", "frequency", "reap", "ean", "easyep", "weights", "random")  # premoe.moe.scoring.SCORERS
DENSE_METRICS = ("sf", "sw", "sw-paper", "sw-code")  # premoe.dense.scoring.METRICS
SERVE_POLICIES = ("affinity", "fcfs")  # premoe.server.scheduler.POLICIES


def _add_calibrate(sub):
    p = sub.add_parser("calibrate", help="score every expert for a task and add the pattern to a store")
    p.add_argument("--model", required=True, help="HuggingFace MoE model directory (safetensors)")
    p.add_argument("--data", required=True, nargs="+",
                   help="JSONL ({\"text\"} or {\"prompt\",\"completion\"} per line) or .txt file; several are pooled")
    p.add_argument("--task", required=True, help="task name in the store")
    p.add_argument("--store", required=True, help="pattern-store directory (created if missing)")
    p.add_argument("--scorer", choices=SCORER_NAMES,
                   help="the task's default scorer (default easyep where the experts can be run one by one, else tcess; "
                        "router statistics are always recorded, so --scorer tcess at prune time needs no recalibration)")
    p.add_argument("--all-stats", action="store_true",
                   help="also compute every other scorer's statistics in this pass (expert outputs, weights)")
    p.add_argument("--max-samples", type=int, help="use at most this many samples")
    p.add_argument("--k", type=int, help="experts per token counted as selected (default: the model's top-k)")
    p.add_argument("--r", type=float, help="minimum share of the top-k routing weight to count")
    p.add_argument("--seed", type=int, default=0, help="seed of the random scorer")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=2048, help="tokens kept per sample")
    p.add_argument("--device", default="auto", help="auto (accelerator if any), cpu, cuda:1, ...")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--overwrite", action="store_true", help="replace the task if the store has it")
    p.add_argument("--signature-layers", type=int, default=4, help="MoE layers the stored retrieval keys span (default 4)")
    _add_memory_flags(p)


def _add_memory_flags(p, offload: bool = True):
    g = p.add_argument_group("memory (models larger than RAM)")
    g.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model one decoder layer at a time (default: when it would not fit in memory)")
    g.add_argument("--max-memory", type=float, metavar="MB",
                   help="memory budget (default: what the machine and this process's cgroup leave free)")
    if offload:
        g.add_argument("--offload-dir", help="where hidden states past the budget go (default: the system temp directory)")


def _add_selection_flags(p, keep_required: bool):
    p.add_argument("--task", help="calibrated task whose scores decide")
    p.add_argument("--agnostic", action="store_true", help="pool every task in the store instead (task-agnostic)")
    p.add_argument("--keep", type=int, help="MoE: experts kept in every MoE layer" + (" (required)" if keep_required else ""))
    p.add_argument("--scorer", choices=SCORER_NAMES, help="rank experts with this scorer (default: the task's own)")
    p.add_argument("--top-k", type=int, help="also lower the experts routed per token (e.g. 4/64)")
    p.add_argument("--group-policy", default="balanced", choices=("balanced", "flatten"),
                   help="group-limited routers (DeepSeek-V3): keep N/n_group per group, or flatten to plain top-k")
    _add_dense_flags(p)
    r = p.add_argument_group("compensation (MoE and dense)")
    r.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="re-fit by least squares so each pruned layer's output matches the dense one on the calibration "
                        "tokens (the store's recorded data, or --refit-data): MoE models the kept experts' down "
                        "projections under re-routing, dense models the kept o_proj/down_proj columns and biases; "
                        "plain weights, vanilla load (default: on when the recorded data is still there unchanged; "
                        "--no-refit: the published methods)")
    r.add_argument("--refit-data", nargs="+", metavar="FILE",
                   help="JSONL texts for --refit, each file weighted equally (default: the data the store was calibrated on)")


def _add_dense_flags(p, serving: bool = False):
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


def _add_prune(sub):
    p = sub.add_parser("prune", help="keep the top-N experts per layer for a task and write a HF checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="output model directory")
    _add_selection_flags(p, keep_required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the self-check (by default the export is read back, and reloaded in transformers when it fits in memory)")


def _add_eval(sub):
    p = sub.add_parser("eval", help="accuracy of a dense, pruned, or on-the-fly pruned model on a data file")
    p.add_argument("--model", required=True, help="model directory (dense, or an exported pruned model)")
    p.add_argument("--data", required=True,
                   help='JSONL: {"prompt","completion"} (greedy exact match) or {"prompt","choices","answer"} (log-likelihood)')
    p.add_argument("--store", help="apply a stored pattern on the fly (with --task or --agnostic, and --keep)")
    _add_selection_flags(p, keep_required=False)
    p.add_argument("--max-new-tokens", type=int, help="default: longest reference completion + 2 tokens")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="evaluate at most this many samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_memory_flags(p, offload=False)


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="summarise a pattern store")
    p.add_argument("--store", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="compare every scorer, task-specific and task-agnostic, over keep counts")
    p.add_argument("--out", required=True, help="directory for results.json/.csv, pictures and the store")
    p.add_argument("--model", help="model directory (default: the shipped tiny MoE)")
    p.add_argument("--task", nargs=3, action="append", metavar=("NAME", "CALIB", "EVAL"),
                   help='a task: calibration JSONL and evaluation JSONL ({"prompt","completion"}); repeat (default: built-in suite)')
    p.add_argument("--keep", type=int, nargs="+", help="experts kept per layer (default: 3/4, 1/2, 3/8, 1/4, 1/8)")
    p.add_argument("--scorers", nargs="+", choices=SCORER_NAMES, help="default: all")
    p.add_argument("--sparsities", type=float, nargs="+", help="dense models: fractions of decoder weights removed "
                                                              "(default 0.2 0.35 0.5)")
    p.add_argument("--methods", nargs="+", choices=("seap", "seap-gen", "wanda-sp", "flap", "random"),
                   help="dense models: default all")
    p.add_argument("--schedule", choices=("uniform", "logistic", "adaptive"),
                   help="dense models: give every method this layer allocation, to compare criteria on one structure "
                        "(default: each method's own: uniform, FLAP adaptive)")
    p.add_argument("--count", choices=("written", "memory"),
                   help="dense models: count sparsity in the checkpoint premoe prune writes (default; FLAP's layer-varying "
                        "plans are padded there, so they are made sparser in memory to match) or in memory (as the "
                        "papers do)")
    p.add_argument("--refit", choices=("both", "on", "off"),
                   help="also (both), only (on) or never (off) evaluate every method with a least-squares re-fit on its "
                        "calibration data (rows <method>+refit): dense models re-fit the kept o_proj/down_proj columns "
                        "(default both); MoE models the kept experts' down_proj under re-routing (task-specific rows; "
                        "default off)")
    p.add_argument("--compensate", nargs="+", choices=("refit", "scale", "merge", "merge+refit"),
                   help="MoE models: also evaluate each compensation for the removed experts (rows <scorer>+<method>): "
                        "refit (least-squares down_proj under re-routing), scale (one least-squares output scale per "
                        "kept expert), merge (removed experts folded into their closest kept one, frequency-weighted), "
                        "merge+refit; task-specific rows, model in memory")
    p.add_argument("--calib-samples", type=int, default=64, help="built-in suite: calibration samples per task")
    p.add_argument("--eval-samples", type=int, default=100, help="built-in suite: held-out samples per task")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_memory_flags(p, offload=False)


def _add_demo(sub):
    p = sub.add_parser("demo", help="calibrate, prune and evaluate the shipped tiny MoE (PreMoe) and tiny dense model "
                                    "(SEAP) on the built-in tasks")
    p.add_argument("--keep", type=int, nargs="+", help="MoE keep counts (default: 1/2, 1/4, 1/8 of the experts)")
    p.add_argument("--sparsity", type=float, nargs="+", help="dense sparsities (default: 0.2 0.5)")
    p.add_argument("--no-dense", action="store_true", help="run the MoE part only")
    p.add_argument("--eval-samples", type=int, default=100, help="held-out samples per task")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration samples per task")
    p.add_argument("--workdir", help="keep the stores and pruned models here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _add_signature_flags(p):
    g = p.add_argument_group("retrieval (defaults chosen on routing accuracy; see README)")
    g.add_argument("--layers", type=int, help="MoE: MoE layers the signature spans (default 1); dense: decoder layers "
                                               "run before comparing (default 0: the mean token embedding)")
    g.add_argument("--stat", choices=("prob", "tcess", "count", "official"), help="router statistic compared (default prob)")
    g.add_argument("--source", choices=("prompt", "full"), help="keys from calibration prompts or prompt+completion (default prompt)")
    g.add_argument("--norm", choices=("none", "l1", "l2"), help="per-layer normalisation (default l1)")
    g.add_argument("--metric", choices=("l2", "cosine", "l1"), help="distance (default l1)")


def _add_serving_flags(p, http: bool = False):
    p.add_argument("--model", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--keep", type=int, help="MoE: experts held per MoE layer (required for MoE models)")
    p.add_argument("--top-k", type=int, help="also lower the experts routed per token")
    _add_dense_flags(p, serving=True)
    p.add_argument("--group-policy", default="balanced", choices=("balanced", "flatten"))
    if not http:
        p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cache-mb", type=float, default=0.0, help="keep experts a switch drops, up to this many MB (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto ...")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    _add_signature_flags(p)


def _add_route(sub):
    p = sub.add_parser("route", help="print the stored task nearest to a query (no experts loaded)")
    p.add_argument("query", nargs="?", help="the query text")
    p.add_argument("--model", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--data", help="route every line of this JSONL (prompt or text) or .txt file")
    p.add_argument("--json", action="store_true", help="one JSON object per query (task, distance, margin, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    _add_signature_flags(p)


def _add_generate(sub):
    p = sub.add_parser("generate", help="route a prompt, load only its task's experts, and complete it")
    p.add_argument("prompt", nargs="?", help="the prompt text")
    p.add_argument("--data", help="answer every line of this JSONL (prompt or text) or .txt file")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    _add_serving_flags(p)


def _add_chat(sub):
    p = sub.add_parser("chat", help="interactive: each message is routed; experts switch when the topic does")
    _add_serving_flags(p)


def _add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server; each request is served by its task's pattern")
    _add_serving_flags(p, http=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                     "(default: $PREMOE_API_KEY if set)")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting before new ones get 503 (default 64)")
    g.add_argument("--max-batch", type=int, default=8, help="requests of one task generated together (default 8)")
    g.add_argument("--schedule", choices=SERVE_POLICIES, default="affinity",
                   help="affinity (default): stay on the resident task while others wait at most --max-wait-ms; "
                        "fcfs: strict arrival order")
    g.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous (default): requests of the running task join the batch between tokens; "
                        "static: a batch runs to its end before the next starts")
    g.add_argument("--max-wait-ms", type=float, default=2000.0,
                   help="affinity: longest a request waits while another task is served (default 2000)")
    g.add_argument("--max-tokens", type=int, help="completion cap for requests that give no max_tokens "
                                                 "(default: the rest of the context)")
    g.add_argument("--max-body-kb", type=float, default=1024.0, help="largest request body (default 1024 KB)")
    g.add_argument("--drain-seconds", type=float, default=120.0,
                   help="on SIGTERM, how long in-flight requests may take to finish (default 120)")
    g.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (default warning)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="premoe", description="Task-specific MoE expert pruning and retrieval (PreMoe).")
    ap.add_argument("--version", action="version", version=f"premoe {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_calibrate, _add_prune, _add_eval, _add_inspect, _add_route, _add_generate, _add_chat, _add_serve,
                _add_sweep, _add_demo):
        add(sub)
    return ap


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _run(args) -> int:
    from premoe import api

    progress = not args.quiet
    if args.command == "calibrate":
        t0 = time.perf_counter()
        pattern = api.calibrate(
            args.model, args.data, args.task, args.store, scorer=args.scorer, max_samples=args.max_samples,
            k=args.k, r=args.r, seed=args.seed, batch_size=args.batch_size, max_length=args.max_length,
            device=args.device, dtype=args.dtype, overwrite=args.overwrite, progress=progress,
            signature_layers=args.signature_layers, all_stats=args.all_stats, stream=args.stream,
            max_memory=args.max_memory, offload_dir=args.offload_dir,
        )
        info = pattern.info
        how = ", streamed layer by layer" if info.get("streamed") else ""
        what = f"{len(pattern.layers)} MoE layers" if info.get("kind") != "dense" else \
            f"{info['signature']['layers']} decoder layers (dense: head and FFN-channel statistics)"
        print(f"calibrated task {pattern.name!r} ({pattern.scorer}): {info['samples']} samples, {info['tokens']} tokens, "
              f"{what}{how} -> {args.store} in {time.perf_counter() - t0:.1f}s")
    elif args.command == "prune":
        res = api.prune(
            args.model, args.store, args.task, args.keep, args.out, top_k=args.top_k, group_policy=args.group_policy,
            scorer=args.scorer, agnostic=args.agnostic, overwrite=args.overwrite, verify=args.verify, progress=progress,
            sparsity=args.sparsity, method=args.method, schedule=args.schedule, whole_groups=args.whole_groups,
            bias_comp=args.bias_comp, score=args.score, refit=args.refit, refit_data=args.refit_data,
        )
        p = res.plan
        if hasattr(res, "sparsity"):  # dense
            h, g, c = p.counts()
            print(f"pruned ({p.method}, {p.info['schedule']}{', re-fitted' if p.refit else ''}"
                  f"{', not re-fitted: ' + p.info['refit_skipped'] if p.info.get('refit_skipped') else ''}) for task {p.task!r}: {res.sparsity:.1%} of decoder linear weights "
                  f"removed ({res.params_kept:,} of {res.params_source:,}); {h} heads / {g} KV heads / {c} FFN channels per layer"
                  f"{' (zero-padded)' if res.padded else ''}; {_fmt_bytes(res.bytes_written)} of {_fmt_bytes(res.bytes_source)} "
                  f"({res.bytes_written / max(res.bytes_source, 1):.1%}) -> {res.out} in {res.seconds:.1f}s"
                  + (" (reload verified)" if args.verify else ""))
            return 0
        fit = p.refit or {}
        how = (f", {p.scorer}" + (f", re-fitted on {fit['tokens']} tokens" if "tokens" in fit else "")
               + (f", not re-fitted: {fit['skipped']}" if "skipped" in fit else ""))
        print(f"pruned to {p.top_k}/{p.keep} (top-k/experts per layer, from {p.top_k_before}/{p.num_experts}{how}) for task {p.task!r}: "
              f"{_fmt_bytes(res.bytes_written)} of {_fmt_bytes(res.bytes_source)} "
              f"({res.bytes_written / max(res.bytes_source, 1):.1%}) -> {res.out} in {res.seconds:.1f}s"
              + (" (reload verified)" if args.verify else ""))
    elif args.command == "eval":
        res = api.evaluate(
            args.model, args.data, store=args.store, task=args.task, keep=args.keep, agnostic=args.agnostic,
            scorer=args.scorer, top_k=args.top_k, group_policy=args.group_policy, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, limit=args.limit, device=args.device, dtype=args.dtype, progress=progress,
            stream=args.stream, max_memory=args.max_memory, sparsity=args.sparsity, method=args.method,
            schedule=args.schedule, whole_groups=args.whole_groups, score=args.score, refit=args.refit,
            refit_data=args.refit_data,
        )
        if args.json:
            print(json.dumps(res))
        else:
            what = ""
            if args.store and "sparsity" in res:
                what = (f" ({res['method']}{', re-fitted' if res.get('refit') else ''} for {res['task']}, "
                        f"{res['sparsity']:.1%} of decoder weights removed)")
            elif args.store:
                what = f" ({res['scorer']} pattern of {res['task']}, {res['keep']} experts per layer)"
            if res["exact_match"] is not None:
                print(f"exact match {res['exact_match']:.4f} on {res['generate_samples']} samples{what}")
            if res["mc_accuracy"] is not None:
                print(f"multiple-choice accuracy {res['mc_accuracy']:.4f} on {res['mc_samples']} samples{what}")
    elif args.command == "inspect":
        summary = api.inspect_store(args.store)
        if args.json:
            print(json.dumps(summary))
        else:
            m = summary["model"]
            print(f"store {summary['path']}: {m['architecture']} ({m['model_type']}), {len(m['moe_layers'])} MoE layers x "
                  f"{m['num_experts']} experts, top-{m['top_k']}, router sha256 {m['router_sha256'][:12]}")
            if not summary["tasks"]:
                print("no tasks")
            print(f"{'task':<20} {'scorer':<10} {'samples':>8} {'tokens':>9} {'experts for 90%':>16}  {'created':<25}  --scorer options")
            for name, t in summary["tasks"].items():
                print(f"{name:<20} {t['scorer']:<10} {t['samples']:>8} {t['tokens']:>9} {t['experts_for_90pct']:>16}  "
                      f"{t['created']:<25}  {','.join(t['scorers'])}")
    elif args.command == "route":
        return _route(args)
    elif args.command == "serve":
        return _http(args)
    elif args.command in ("generate", "chat"):
        return _serve(args)
    elif args.command == "sweep":
        from premoe.sweep import format_summary, sweep

        tasks = {name: (calib, ev) for name, calib, ev in args.task} if args.task else None
        res = sweep(args.out, model=args.model, tasks=tasks, keeps=args.keep, scorers=args.scorers,
                    calib_samples=args.calib_samples, eval_samples=args.eval_samples, progress=progress,
                    stream=args.stream, max_memory=args.max_memory, sparsities=args.sparsities, methods=args.methods,
                    schedule=args.schedule, count=args.count, refit=args.refit,
                    compensate=args.compensate)
        if "methods" in res:  # dense
            from premoe.dense.sweep import format_dense_summary

            print(json.dumps({k: v for k, v in res.items() if k != "rows"}) if args.json else format_dense_summary(res))
            return 0
        if args.json:
            print(json.dumps({k: v for k, v in res.items() if k != "rows"}))
        else:
            print("accuracy retained vs. dense (mean over tasks), by experts kept per layer:")
            print(format_summary(res))
            print(f"wrote results.json, results.csv, {', '.join(res['pictures'])} to {args.out} in {res['seconds']:.0f}s")
    elif args.command == "demo":
        from premoe.showcase import demo, format_table

        from premoe.showcase import TINY_DENSE

        result = demo(keeps=args.keep, eval_samples=args.eval_samples, calib_samples=args.calib_samples,
                      workdir=args.workdir, progress=progress, sparsities=args.sparsity,
                      dense_model=None if args.no_dense else TINY_DENSE)
        print(json.dumps(result) if args.json else format_table(result))
    return 0


def _queries(args, text_arg: str) -> list[tuple[str, str]]:
    """(where, text) pairs from the positional text or --data."""
    from premoe.core.data import iter_records
    from premoe.errors import InputError

    text = getattr(args, text_arg)
    if (text is None) == (args.data is None):
        raise InputError(f"give either a {text_arg.upper()} or --data FILE")
    if text is not None:
        return [("query", text)]
    return [(f"{args.data}:{i}", r.prompt) for i, r in enumerate(iter_records(args.data, queries=True), 1)]


def _spec(args):
    from premoe.core.retrieval import signature_spec

    return signature_spec(args.layers or 1, args.stat, args.source, args.norm, args.metric)


def _route(args) -> int:
    from premoe.core.retrieval import QueryRouter
    from premoe.errors import InputError

    queries = _queries(args, "query")
    from premoe.api import model_kind

    if model_kind(args.model) == "dense":
        from premoe.dense.verbs import ROUTE_DEPTH, DenseRouter

        router = DenseRouter(args.model, args.store, ROUTE_DEPTH if args.layers is None else args.layers, device=args.device)
    else:
        router = QueryRouter(args.model, args.store, _spec(args), device=args.device, dtype=args.dtype)
    for where, q in queries:
        try:
            res = router.route(q)
        except InputError as e:
            raise InputError(f"{where}: {e}" if args.data else str(e)) from None
        print(json.dumps({**res.to_dict(), "signature_bytes_read": router.bytes_read}) if args.json else res.task, flush=True)
    return 0


def _task_server(args):
    """The task server (MoE or dense) that generate, chat and serve use, from the shared flags."""
    from premoe.api import model_kind
    from premoe.errors import InputError
    from premoe.serving import TaskServer

    if model_kind(args.model) == "dense":
        from premoe.dense.verbs import ROUTE_DEPTH, DenseServer

        if args.keep is not None or args.top_k is not None:
            raise InputError("--keep/--top-k apply to MoE models only; for a dense model use --sparsity (and --method)")
        if args.sparsity is None:
            raise InputError("--sparsity (fraction of decoder weights removed) is required for a dense model")
        if args.cache_mb:
            raise InputError("--cache-mb applies to MoE models only (a dense switch reads only what it lacks)")
        return DenseServer(args.model, args.store, args.sparsity, method=args.method or "seap",
                           depth=ROUTE_DEPTH if args.layers is None else args.layers, device=args.device,
                           dtype=args.dtype)
    if args.sparsity is not None or args.method is not None:
        raise InputError("--sparsity/--method apply to dense models only; for an MoE model use --keep")
    if args.keep is None:
        raise InputError("--keep (experts held per MoE layer) is required for an MoE model")
    if args.cache_mb < 0:
        raise InputError(f"--cache-mb must be >= 0, got {args.cache_mb}")
    return TaskServer(
        args.model, args.store, args.keep, top_k=args.top_k, group_policy=args.group_policy,
        signature=_spec(args), cache_bytes=int(args.cache_mb * 2**20),
        device=args.device, dtype=args.dtype,
    )


def _serve(args) -> int:
    from premoe.api import model_kind
    from premoe.errors import InputError

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.command == "chat" and model_kind(args.model) == "dense":
        raise InputError("chat is not available for dense models yet; use generate or serve")
    server = _task_server(args)
    if args.command == "chat":
        return _chat(server, args)
    return _answer(server, args)


def _http(args) -> int:
    import os

    from premoe.errors import InputError
    from premoe.server.app import ServeOptions
    from premoe.server.main import bind, serve

    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--max-batch", args.max_batch, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--max-body-kb", args.max_body_kb, 1),
                             ("--max-wait-ms", args.max_wait_ms, 0), ("--drain-seconds", args.drain_seconds, 0)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    bind(args.host, args.port).close()  # fail on a taken port before loading anything
    server = _task_server(args)
    if not server.tasks:
        raise InputError(f"store {args.store} has no tasks; calibrate some first")
    server.load(server.tasks[0])  # build the resident model now, not on the first request
    opts = ServeOptions(api_key=args.api_key or os.environ.get("PREMOE_API_KEY") or None, max_queue=args.max_queue,
                        max_batch=args.max_batch, policy=args.schedule, max_wait=args.max_wait_ms / 1000,
                        continuous=args.batching == "continuous",
                        max_body_bytes=int(args.max_body_kb * 1024), max_tokens=args.max_tokens)
    return serve(server, opts, args.host, args.port, args.drain_seconds, args.log_level,
                 announce=lambda line: print(line, flush=True))


def _answer(server, args) -> int:
    """Route and answer the prompt (or every --data line) with a task server of either kind."""
    from premoe.errors import InputError

    for where, prompt in _queries(args, "prompt"):
        try:
            reply = server.generate(prompt, args.max_new_tokens)
        except InputError as e:
            raise InputError(f"{where}: {e}" if args.data else str(e)) from None
        print(json.dumps(reply.to_dict()) if args.json else f"[{reply.task}] {reply.text}", flush=True)
    return 0


def _chat(server, args) -> int:
    from premoe.errors import InputError

    tok = server.tokenizer
    templated = bool(getattr(tok, "chat_template", None))
    history: list[dict[str, str]] = []
    print(f"premoe chat: {len(server.retriever.names)} tasks, {server.keep} experts per MoE layer. "
          "Each message is routed; /task shows the current task, /clear forgets the conversation, /exit quits.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/exit", "/quit"):
            break
        if msg == "/clear":
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        if msg == "/task":
            print(f"(current task: {server.task or 'none yet'})", flush=True)
            continue
        try:
            route = server.route(msg)
        except InputError as e:
            print(f"premoe: {e}", flush=True)
            continue
        note = ""
        if route.task != server.task:
            st = server.load(route.task)
            note = f"switched to {route.task}: read {_fmt_bytes(st.bytes_read)}, {st.experts_read} experts from disk, " \
                   f"{st.experts_from_cache} from cache"
        if templated:
            history.append({"role": "user", "content": msg})
            prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        else:
            prompt = msg
        from premoe.core.evaluation import generate_greedy

        text = generate_greedy(server.model, tok, [prompt], args.max_new_tokens)[0].strip()
        if templated:
            history.append({"role": "assistant", "content": text})
        if note:
            print(f"({note})", flush=True)
        print(f"[{route.task}] {text}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="premoe: %(message)s")
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # premoe shows its own progress; transformers' per-load bars are noise
    if args.quiet:
        import os

        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return _run(args)
    except PremoeError as e:
        print(f"premoe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("premoe: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
