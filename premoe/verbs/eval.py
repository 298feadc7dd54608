"""``premoe eval``: accuracy and perplexity of a model, whole, exported or pruned on the fly.

``{"prompt", "completion"}`` lines of ``--data`` are scored by greedy exact match, ``{"prompt", "choices",
"answer"}`` lines by log-likelihood; ``--perplexity FILE`` adds the token-weighted perplexity on a text file
(or on the completions of a JSONL file). With ``--store`` a stored pattern is applied on the fly: the
pruned model is built from the checkpoint, reading only what it keeps. An MoE model larger than memory
runs with its decoder layers loaded on demand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from premoe.core.options import MemoryOptions, RefitOptions, RunOptions, add_flags, defaults_of, kwargs_of
from premoe.dense.options import DenseSelection
from premoe.errors import InputError
from premoe.moe.options import MoeSelection
from premoe.verbs.common import add_model, add_pattern, add_refit, add_selection, add_store

HELP = "accuracy and perplexity of a dense, pruned, or on-the-fly pruned model"


def evaluate(
    model,
    data: str | Path | None = None,
    *,
    perplexity: str | Path | None = None,
    perplexity_window: int = 1024,
    store: str | Path | None = None,
    task: str | None = None,
    agnostic: bool = False,
    keep: int | None = None,
    top_k: int | None = None,
    group_policy: str = "balanced",
    scorer: str | None = None,
    sparsity: float | None = None,
    method: str = "seap",
    schedule: str | None = None,
    whole_groups: bool = False,
    bias_comp: bool | None = None,
    score: str | None = None,
    refit: bool | None = None,
    refit_data: list[str | Path] | tuple = (),
    max_new_tokens: int | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    device: str | None = "cpu",
    dtype: str = "auto",
    stream: bool | None = None,
    max_memory: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of ``model`` (a dense or exported pruned checkpoint) on ``data`` and its perplexity on the file
    ``perplexity``; with ``store`` (and ``task`` or ``agnostic``, and ``keep`` or ``sparsity``) of the model
    pruned on the fly to that pattern.

    ``perplexity``: a plain text file (every token scored, in non-overlapping windows of
    ``perplexity_window`` tokens) or a JSONL file of ``{"text"}`` lines, or of ``{"prompt", "completion"}``
    lines (the completions scored given their prompts); see :func:`premoe.core.evaluation.read_perplexity`.
    The options are :func:`premoe.prune`'s and :func:`premoe.calibrate`'s; ``max_new_tokens`` defaults to
    the longest reference completion plus 2 tokens.

    Returns:
        ``{"exact_match", "generate_samples", "mc_accuracy", "mc_samples", "perplexity", ...}`` (metrics are
        ``None`` when there is nothing of their kind); ``"pruning"`` describes the pattern applied.
    """
    from premoe.core.evaluation import read_eval_data
    from premoe.kinds import check_options, kind_of, select

    backend = kind_of(model)
    run = RunOptions(device=device, dtype=dtype, batch_size=batch_size, progress=progress)
    memory = MemoryOptions(stream, max_memory)
    selections = (
        MoeSelection(keep, top_k, group_policy, scorer),
        DenseSelection(sparsity, method, schedule, whole_groups, bias_comp, score),
    )
    fit = RefitOptions(refit, tuple(refit_data or ()))
    check_options(backend, "eval", run, memory, *selections, fit)
    chosen = select(backend, *selections)
    if store is None:
        given = [f"`{n}`" for n, v in (("task", task), ("agnostic", agnostic)) if v] + [
            f"`{n}`" for n in chosen.given()
        ]
        given += [f"`{n}`" for n in fit.given()]
        if given:
            raise InputError(
                f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} `store` (or evaluate an exported "
                "model directory directly)"
            )
    if max_new_tokens is not None and max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be positive, got {max_new_tokens}")
    if limit is not None and limit < 1:
        raise InputError(f"`limit` must be positive, got {limit}")
    if data is None and perplexity is None:
        raise InputError("nothing to evaluate: pass `data` (accuracy), `perplexity` (a text file), or both")
    if perplexity_window < 2:
        raise InputError(f"`perplexity_window` must be at least 2 tokens, got {perplexity_window}")
    info = backend.inspect(model)
    if data is not None:
        read_eval_data(data, limit)  # bad data fails before the model is built
    _agree(info, data, perplexity, [chosen, fit, run.batch_size, run.dtype, limit, max_new_tokens, perplexity_window,
                                    task, agnostic, stream, max_memory])  # fmt: skip
    if perplexity is not None:
        from premoe.core.evaluation import read_perplexity

        read_perplexity(perplexity)
    the_plan = (
        None
        if store is None
        else backend.plan(info, store, task, agnostic=agnostic, selection=chosen, refit=fit, progress=progress)
    )
    try:
        return backend.evaluate(
            info,
            data,
            the_plan,
            run=run,
            memory=memory,
            limit=limit,
            max_new_tokens=max_new_tokens,
            perplexity=perplexity,
            window=perplexity_window,
        )
    finally:
        if the_plan is not None:
            the_plan.close()


def _agree(info, data, perplexity, options) -> None:
    """Under torchrun: every rank evaluates the same model on the same files with the same options."""
    import hashlib

    from premoe.core.distributed import agree, world

    w = world()
    if not w.parallel:
        return
    files = {str(n): hashlib.sha256(Path(f).read_bytes()).hexdigest() for n, f in (("data", data), ("ppl", perplexity))
             if f is not None}  # fmt: skip
    agree({"model": info.fingerprint.to_dict(), "data": files, "options": repr(options)}, w, "eval")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help=HELP, description=__doc__.split("\n\n")[1])
    add_model(p, help="model directory (dense, or an exported pruned model)")
    p.add_argument(
        "--data",
        help='JSONL: {"prompt","completion"} (greedy exact match) or {"prompt","choices","answer"} (log-likelihood)',
    )
    p.add_argument(
        "--perplexity",
        metavar="FILE",
        help='token-weighted perplexity on a text file, or on a JSONL of {"text"} or {"prompt","completion"} lines '
        "(completions scored given their prompts)",
    )
    p.add_argument("--perplexity-window", type=int, default=1024, help="tokens per perplexity window (default: 1024)")
    add_store(
        p,
        required=False,
        help="apply a stored pattern on the fly (with --task or --agnostic, and --keep or --sparsity)",
    )
    add_pattern(p)
    defaults = defaults_of(evaluate)
    add_selection(p, defaults)
    add_refit(p, defaults)
    p.add_argument("--max-new-tokens", type=int, help="default: longest reference completion + 2 tokens")
    p.add_argument("--limit", type=int, help="evaluate at most this many samples")
    add_flags(p, RunOptions, defaults=defaults, skip=("max_length",))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_flags(
        p,
        MemoryOptions,
        defaults=defaults,
        skip=("offload_dir", "share_layers"),
        title="memory (models larger than RAM)",
    )


def run(args) -> int:
    from premoe.core.distributed import world

    res = evaluate(**kwargs_of(evaluate, args, progress=not args.quiet))
    if not world().main:
        return 0  # every rank holds the same result; rank 0 prints it
    if args.json:
        print(json.dumps(res))
        return 0
    what = f" ({res['pruning']})" if res.get("pruning") else ""
    if res["exact_match"] is not None:
        print(f"exact match {res['exact_match']:.4f} on {res['generate_samples']} samples{what}")
    if res["mc_accuracy"] is not None:
        print(f"multiple-choice accuracy {res['mc_accuracy']:.4f} on {res['mc_samples']} samples{what}")
    if res.get("perplexity") is not None:
        print(f"perplexity {res['perplexity']:.4f} on {res['perplexity_tokens']} tokens{what}")
    return 0
