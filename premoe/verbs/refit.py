"""``premoe refit``: store re-fitted rows with task patterns (MoE models).

For each task (default: every task in the store) and keep count, the down projections and router rows of
the experts that keep count keeps are re-fitted by least squares under re-routing on the task's
calibration data (or ``--refit-data``), one pass over the model per task, and stored with the pattern.
``premoe prune``/``eval`` then skip the re-fit and ``generate``/``chat``/``serve`` (TAER) load these rows
instead of the checkpoint's, for the same keep count, top-k, group policy and scorer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from premoe.core.options import RefitOptions, add_flags, defaults_of, kwargs_of
from premoe.moe.options import MoeSelection
from premoe.verbs.common import add_model, add_store

HELP = (
    "MoE: re-fit the experts a keep count keeps for stored tasks and store the rows with their patterns "
    "(used by prune, eval, generate, chat and serve)"
)


def refit(
    model,
    store: str | Path,
    keep: int | list[int],
    *,
    tasks: list[str] | None = None,
    top_k: int | None = None,
    group_policy: str = "balanced",
    scorer: str | None = None,
    refit_data: list[str | Path] | tuple = (),
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Re-fit and store the rows of the experts ``keep`` (one or several counts) keeps for each of ``tasks``.

    Returns:
        {task: [one manifest entry per keep count: keep, key, experts re-fitted, data, tokens, ...]}

    Raises:
        PremoeError: a dense model, impossible keep, unknown task, quantised checkpoint or unsupported
            expert layout, calibration data gone or changed.
    """
    from premoe.kinds import check_options, kind_of

    keeps = [keep] if isinstance(keep, int) else list(keep)
    selection = MoeSelection(keep=keeps[0] if keeps else None, top_k=top_k, group_policy=group_policy, scorer=scorer)
    fit = RefitOptions(refit_data=tuple(refit_data or ()))
    backend = kind_of(model)
    check_options(backend, "refit", selection, fit)
    return backend.refit(
        backend.inspect(model), store, keeps, tasks=tasks, selection=selection, refit=fit, progress=progress
    )


def print_refits(model, store, keeps: list[int], **kwargs) -> None:
    """Run :func:`refit` and print one line per stored re-fit (rank 0 of a data-parallel run)."""
    from premoe.core.distributed import world

    t0 = time.perf_counter()
    done = refit(model, store, keeps, **kwargs)
    if not world().main:
        return
    for task, entries in done.items():
        for e in entries:
            print(
                f"stored re-fitted rows of task {task!r} for --keep {e['keep']}: {e['experts']} experts re-fitted on "
                f"{e['about']['tokens']} tokens per layer -> {store}"
            )
        for k in sorted(set(keeps) - {e["keep"] for e in entries}):
            print(f"task {task!r}: --keep {k} keeps every expert, nothing to re-fit")
    print(f"re-fitted in {time.perf_counter() - t0:.1f}s")


def add_parser(sub) -> None:
    p = sub.add_parser("refit", help=HELP, description=__doc__.split("\n\n")[1])
    add_model(p)
    add_store(p)
    p.add_argument("--keep", type=int, nargs="+", required=True, help="experts kept per MoE layer (one or more counts)")
    p.add_argument("--task", dest="tasks", nargs="+", help="tasks to re-fit (default: every task in the store)")
    defaults = defaults_of(refit)
    add_flags(p, MoeSelection, defaults=defaults, skip=("keep",))
    add_flags(p, RefitOptions, defaults=defaults, only=("refit_data",))


def run(args) -> int:
    kwargs = kwargs_of(refit, args, progress=not args.quiet)
    print_refits(kwargs.pop("model"), kwargs.pop("store"), list(kwargs.pop("keep")), **kwargs)
    return 0
