"""``premoe calibrate``: run a task's samples through a model and store what pruning decides by.

MoE models: per-expert routing statistics of every MoE layer (PreMoe's TCESS, EASY-EP and the other
scorers' statistics) and the retrieval keys of the first MoE layers. Dense models: activation statistics
of every layer's ``o_proj``/``down_proj`` inputs and the prompts' mean hidden states. Either way the
task's pattern is added to a pattern store (created if missing).
"""

from __future__ import annotations

import time
from pathlib import Path

from premoe.core.options import MemoryOptions, RunOptions, add_flags, defaults_of, kwargs_of
from premoe.moe.options import MoeCalibration
from premoe.verbs.common import add_model, add_store

HELP = "score every expert (MoE) or head and channel (dense) for a task and add the pattern to a store"


def calibrate(
    model,
    data: str | Path | list[str | Path],
    task: str,
    store: str | Path,
    *,
    scorer: str | None = None,
    all_stats: bool = False,
    k: int | None = None,
    r: float | None = None,
    seed: int = 0,
    signature_layers: int = 4,
    max_samples: int | None = None,
    batch_size: int = 16,
    max_length: int = 2048,
    device: str | None = "auto",
    dtype: str = "auto",
    stream: bool | None = None,
    max_memory: float | None = None,
    offload_dir: str | None = None,
    share_layers: bool = False,
    overwrite: bool = False,
    progress: bool = True,
):
    """Calibrate ``task`` on the samples in ``data`` and add its pattern to ``store``.

    Args:
        model: model directory, MoE or dense (or a model :func:`premoe.load_model` returned, to reuse it).
        data: JSONL (``text`` or ``prompt``+``completion`` per line) or .txt file of task samples; several
            files are pooled into one task.
        task: task name in the store.
        store: pattern-store directory (created if missing).
        scorer / all_stats / k / r / seed / signature_layers: MoE models, see
            :class:`premoe.moe.options.MoeCalibration` (default scorer: EASY-EP where the experts can be run one
            by one, else TCESS; router statistics are always recorded).
        max_samples: use at most this many samples.
        batch_size / max_length / device / dtype: how the model runs (:class:`premoe.core.options.RunOptions`).
        stream / max_memory / offload_dir / share_layers: models larger than memory, and under torchrun one
            copy of each streamed layer per node (:class:`premoe.core.options.MemoryOptions`).
        overwrite: replace the task if the store has it.

    Returns:
        The stored :class:`~premoe.core.store.TaskPattern`.

    Raises:
        PremoeError: bad input (files, task name, options of the other kind of model, a store of another
            model...), before any model weights are loaded.
    """
    from premoe.core.data import CalibrationData
    from premoe.core.store import check_task_name
    from premoe.kinds import check_options, kind_of

    check_task_name(task)
    run = RunOptions(device, dtype, batch_size, max_length, progress)
    memory = MemoryOptions(stream, max_memory, offload_dir, share_layers)
    calibration = MoeCalibration(scorer, all_stats, k, r, seed, signature_layers)
    cal = CalibrationData.open(data, max_samples)
    backend = kind_of(model)
    check_options(backend, "calibrate", run, memory, calibration)
    return backend.calibrate(
        model, cal, task, store, run=run, memory=memory, calibration=calibration, overwrite=overwrite
    )


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate", help=HELP, description=__doc__.split("\n\n")[1])
    add_model(p)
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        help='JSONL ({"text"} or {"prompt","completion"} per line) or .txt file; several are pooled',
    )
    p.add_argument("--task", required=True, help="task name in the store")
    add_store(p, help="pattern-store directory (created if missing)")
    p.add_argument("--max-samples", type=int, help="use at most this many samples")
    p.add_argument("--overwrite", action="store_true", help="replace the task if the store has it")
    defaults = defaults_of(calibrate)
    add_flags(p, RunOptions, defaults=defaults)
    add_flags(p, MoeCalibration, defaults=defaults, title="MoE models")
    p.add_argument(
        "--refit-keep",
        type=int,
        nargs="+",
        metavar="N",
        help="MoE: then store re-fitted rows for these keep counts with the pattern (as `premoe refit`)",
    )
    add_flags(p, MemoryOptions, defaults=defaults, title="memory (models larger than RAM)")


def run(args) -> int:
    from premoe.core.distributed import barrier, world
    from premoe.kinds import check_options, kind_of
    from premoe.verbs.refit import print_refits

    t0 = time.perf_counter()
    w = world()
    if args.refit_keep:  # refuse what the re-fit would refuse before spending a calibration
        backend = kind_of(args.model)
        check_options(backend, "refit")
        backend.check_refit(backend.inspect(args.model), args.refit_keep)
    pattern = calibrate(**kwargs_of(calibrate, args, progress=not args.quiet))
    if w.main:
        ranks = f" ({w.size} data-parallel ranks)" if w.parallel else ""
        print(f"{pattern.summary()} -> {args.store} in {time.perf_counter() - t0:.1f}s{ranks}")
    if args.refit_keep:
        barrier(w, "the store's hand-over")  # rank 0 has written the task: every rank re-fits from the store
        print_refits(args.model, args.store, args.refit_keep, tasks=[pattern.name], progress=not args.quiet)
    return 0
