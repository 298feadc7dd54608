"""``premoe calibrate``, ``refit``, ``prune``, ``eval``, ``inspect``, ``sweep`` and ``demo``: the verbs that
score, prune, measure and export (the serving verbs are in :mod:`premoe.cli.serving`)."""

from __future__ import annotations

import json
import time

from premoe.cli.flags import SCORER_NAMES, add_memory_flags, add_selection_flags, fmt_bytes


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
    p.add_argument("--refit-keep", type=int, nargs="+", metavar="N",
                   help="MoE: then store re-fitted rows for these keep counts with the pattern (as `premoe refit --keep N`)")
    add_memory_flags(p)


def _add_refit(sub):
    p = sub.add_parser("refit", help="MoE: re-fit the experts a keep count keeps for stored tasks and store the rows "
                                     "with their patterns (used by prune, eval, generate, chat and serve)")
    p.add_argument("--model", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--keep", type=int, nargs="+", required=True, help="experts kept per MoE layer (one or more counts)")
    p.add_argument("--task", nargs="+", help="tasks to re-fit (default: every task in the store)")
    p.add_argument("--scorer", choices=SCORER_NAMES, help="rank experts with this scorer (default: the task's own)")
    p.add_argument("--top-k", type=int, help="the lowered experts routed per token you will serve with")
    p.add_argument("--group-policy", default="balanced", choices=("balanced", "flatten"))
    p.add_argument("--refit-data", nargs="+", metavar="FILE",
                   help="JSONL texts to fit on, each file weighted equally (default: the data the task was calibrated on)")


def _add_prune(sub):
    p = sub.add_parser("prune", help="keep the top-N experts per layer for a task and write a HF checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="output model directory")
    add_selection_flags(p, keep_required=True)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the self-check (by default the export is read back, and reloaded in transformers when it fits in memory)")


def _add_eval(sub):
    p = sub.add_parser("eval", help="accuracy of a dense, pruned, or on-the-fly pruned model on a data file")
    p.add_argument("--model", required=True, help="model directory (dense, or an exported pruned model)")
    p.add_argument("--data", required=True,
                   help='JSONL: {"prompt","completion"} (greedy exact match) or {"prompt","choices","answer"} (log-likelihood)')
    p.add_argument("--store", help="apply a stored pattern on the fly (with --task or --agnostic, and --keep)")
    add_selection_flags(p, keep_required=False)
    p.add_argument("--max-new-tokens", type=int, help="default: longest reference completion + 2 tokens")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, help="evaluate at most this many samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_memory_flags(p, offload=False)


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
    p.add_argument("--compensate", nargs="+", choices=("refit", "scale", "merge", "merge+refit", "router", "refit+router"),
                   help="MoE models: also evaluate each compensation for the removed experts (rows <scorer>+<method>): "
                        "refit (least-squares down_proj under re-routing), scale (one least-squares output scale per "
                        "kept expert), merge (removed experts folded into their closest kept one, frequency-weighted), "
                        "merge+refit; task-specific rows, model in memory")
    p.add_argument("--calib-samples", type=int, default=64, help="built-in suite: calibration samples per task")
    p.add_argument("--eval-samples", type=int, default=100, help="built-in suite: held-out samples per task")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_memory_flags(p, offload=False)


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


def run(args) -> int:
    from premoe import api

    progress = not args.quiet
    if args.command == "calibrate":
        t0 = time.perf_counter()
        if args.refit_keep:  # refuse what the re-fit would refuse before spending a calibration
            api.check_refit_keeps(args.model, args.refit_keep)
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
        if args.refit_keep:
            _refit(args, progress, tasks=[pattern.name], scorer=None, top_k=None, group_policy="balanced", refit_data=None)
    elif args.command == "refit":
        _refit(args, progress, tasks=args.task, scorer=args.scorer, top_k=args.top_k, group_policy=args.group_policy,
               refit_data=args.refit_data)
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
                  f"{' (zero-padded)' if res.padded else ''}; {fmt_bytes(res.bytes_written)} of {fmt_bytes(res.bytes_source)} "
                  f"({res.bytes_written / max(res.bytes_source, 1):.1%}) -> {res.out} in {res.seconds:.1f}s"
                  + (" (reload verified)" if args.verify else ""))
            return 0
        fit = p.refit or {}
        how = (f", {p.scorer}" + (f", re-fitted on {fit['tokens']} tokens" if "tokens" in fit else "")
               + (f", not re-fitted: {fit['skipped']}" if "skipped" in fit else ""))
        print(f"pruned to {p.top_k}/{p.keep} (top-k/experts per layer, from {p.top_k_before}/{p.num_experts}{how}) for task {p.task!r}: "
              f"{fmt_bytes(res.bytes_written)} of {fmt_bytes(res.bytes_source)} "
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
            print(f"{'task':<20} {'scorer':<10} {'samples':>8} {'tokens':>9} {'experts for 90%':>16}  {'created':<25}  "
                  "--scorer options  re-fitted --keep")
            for name, t in summary["tasks"].items():
                print(f"{name:<20} {t['scorer']:<10} {t['samples']:>8} {t['tokens']:>9} {t['experts_for_90pct']:>16}  "
                      f"{t['created']:<25}  {','.join(t['scorers']):<16}  {','.join(str(r['keep']) for r in t['refits']) or '-'}")
    elif args.command == "sweep":
        from premoe.moe.sweep import format_summary, sweep

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


def _refit(args, progress: bool, **kwargs) -> None:
    from premoe import api

    t0 = time.perf_counter()
    keeps = args.refit_keep if args.command == "calibrate" else args.keep
    for task, entries in api.refit(args.model, args.store, keeps, progress=progress, **kwargs).items():
        for e in entries:
            print(f"stored re-fitted rows of task {task!r} for --keep {e['keep']}: {e['experts']} experts re-fitted on "
                  f"{e['about']['tokens']} tokens per layer -> {args.store}")
        for k in sorted(set(keeps) - {e["keep"] for e in entries}):
            print(f"task {task!r}: --keep {k} keeps every expert, nothing to re-fit")
    print(f"re-fitted in {time.perf_counter() - t0:.1f}s")


PARSERS = {"calibrate": _add_calibrate, "refit": _add_refit, "prune": _add_prune, "eval": _add_eval,
           "inspect": _add_inspect, "sweep": _add_sweep, "demo": _add_demo}
