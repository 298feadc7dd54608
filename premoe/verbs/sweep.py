"""``premoe sweep``: compare pruning criteria side by side on a set of tasks.

MoE models: every scorer, task-specific and task-agnostic, at several keep counts, each pruned model built
from the checkpoint (only its experts read), plus compensations of the removed experts (``--variants``).
Dense models: SEAP, SEAP-gen, Wanda-sp, FLAP and random at several sparsities, plain and re-fitted, with
task routing. Writes ``results.json``, ``results.csv`` and pictures into ``--out``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from premoe.core.options import MemoryOptions, add_flags, defaults_of, kwargs_of
from premoe.dense.options import DenseSweep
from premoe.errors import InputError
from premoe.moe.options import MoeSweep

HELP = "compare every scorer (MoE) or method (dense), task-specific and task-agnostic, over keep counts or sparsities"


def sweep(
    out: str | Path,
    model=None,
    tasks: dict[str, tuple[Any, Any]] | None = None,
    *,
    keeps: list[int] | tuple = (),
    scorers: list[str] | tuple = (),
    sparsities: list[float] | tuple = (),
    methods: list[str] | tuple = (),
    schedule: str | None = None,
    count: str = "written",
    variants: list[str] | tuple | None = None,
    calib_samples: int = 64,
    eval_samples: int = 100,
    stream: bool | None = None,
    max_memory: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the sweep and write results and pictures into ``out``.

    Args:
        out: output directory (created; the store and calibration files go inside it).
        model: model directory (default: the shipped tiny MoE).
        tasks: {name: (calibration samples, evaluation samples)}, each a list of ``{"prompt", "completion"}``
            dicts or a JSONL path (default: the built-in suite, ``calib_samples``/``eval_samples`` each).
        keeps / scorers: MoE models (:class:`premoe.moe.options.MoeSweep`).
        sparsities / methods / schedule / count: dense models (:class:`premoe.dense.options.DenseSweep`).
        variants: ``plain`` and ``refit`` (dense default: both), and for MoE models the compensations of the
            removed experts ``refit``, ``scale``, ``merge``, ``merge+refit``, ``router``, ``refit+router``, each
            a ``<scorer>+<variant>`` row (MoE default: ``plain``).
        stream / max_memory: MoE models larger than memory.

    Returns:
        The results (``results.json``); ``premoe.kinds.backend(result["kind"]).format_sweep(result)`` is the
        summary table.
    """
    from premoe.assets import TINY_MODEL
    from premoe.core.tasks import suite
    from premoe.kinds import check_options, kind_of, select

    for name, value in (("calib_samples", calib_samples), ("eval_samples", eval_samples)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"`{name}` must be a positive integer, got {value!r}")
    label = str(model) if model else "premoe/assets/tiny-moe (shipped)"
    model = Path(model or TINY_MODEL)
    backend = kind_of(model)
    memory = MemoryOptions(stream, max_memory)
    opts = (
        MoeSweep(tuple(keeps or ()), tuple(scorers or ())),
        DenseSweep(tuple(sparsities or ()), tuple(methods or ()), schedule, count),
    )
    check_options(backend, "sweep", memory, *opts)
    about = {"model": label, "calib_samples": calib_samples, "eval_samples": eval_samples}
    return backend.sweep(
        Path(out),
        backend.inspect(model),
        tasks or suite(calib_samples, eval_samples),
        sweep=select(backend, *opts),
        variants=tuple(variants) if variants else None,
        memory=memory,
        progress=progress,
        about=about,
    )


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help=HELP, description=__doc__.split("\n\n")[1])
    p.add_argument("--out", required=True, help="directory for results.json/.csv, pictures and the store")
    p.add_argument("--model", help="model directory (default: the shipped tiny MoE)")
    p.add_argument(
        "--task",
        dest="tasks",
        nargs=3,
        action="append",
        metavar=("NAME", "CALIB", "EVAL"),
        help='a task: calibration JSONL and evaluation JSONL ({"prompt","completion"}); repeat '
        "(default: the built-in suite)",
    )
    defaults = defaults_of(sweep)
    add_flags(p, MoeSweep, defaults=defaults, title="MoE models")
    add_flags(p, DenseSweep, defaults=defaults, title="dense models")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help="plain and/or refit (least-squares re-fit of what is kept; dense default: both), and for MoE "
        "models compensations of the removed experts, each a <scorer>+<variant> row: scale (one "
        "least-squares output scale per kept expert), merge (removed experts folded into their closest "
        "kept one), merge+refit, router (re-fitted router rows), refit+router (MoE default: plain)",
    )
    p.add_argument(
        "--calib-samples",
        type=int,
        default=defaults["calib_samples"],
        help="built-in suite: calibration samples per task (default 64)",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=defaults["eval_samples"],
        help="built-in suite: held-out samples per task (default 100)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_flags(
        p,
        MemoryOptions,
        defaults=defaults,
        skip=("offload_dir", "share_layers"),
        title="memory (MoE models larger than RAM)",
    )


def run(args) -> int:
    from premoe.core.distributed import world
    from premoe.kinds import backend

    tasks = {name: (calib, ev) for name, calib, ev in args.tasks} if args.tasks else None
    res = sweep(**kwargs_of(sweep, args, tasks=tasks, progress=not args.quiet))
    if not world().main:  # under torchrun rank 0 prints
        return 0
    print(
        json.dumps({k: v for k, v in res.items() if k != "rows"})
        if args.json
        else backend(res["kind"]).format_sweep(res)
    )
    return 0
