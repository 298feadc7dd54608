"""``premoe prune``: keep what a task needs and write a smaller HuggingFace checkpoint.

MoE models keep the ``--keep`` best experts of every MoE layer for the task (same count in every layer, so
vLLM loads the result), ranked by the task's scorer (default EASY-EP), the kept experts and their router
rows re-fitted so each pruned layer still answers like the dense one. Dense models keep the attention heads
and FFN channels that remove ``--sparsity`` of the decoder weights (SEAP by default). The export is read
back (and reloaded in transformers when it fits in memory) before it is moved into place.
"""

from __future__ import annotations

from pathlib import Path

from premoe.core.options import RefitOptions, add_flags, defaults_of, kwargs_of
from premoe.dense.options import DenseSelection
from premoe.errors import InputError
from premoe.moe.options import MoeSelection, QuantizeOptions
from premoe.verbs.common import add_model, add_pattern, add_refit, add_selection, add_store

HELP = "keep what a task needs (top-N experts, or heads and channels) and write a HF checkpoint"


def plan(
    model,
    store: str | Path,
    task: str | None = None,
    keep: int | None = None,
    *,
    agnostic: bool = False,
    top_k: int | None = None,
    group_policy: str = "balanced",
    scorer: str | None = None,
    sparsity: float | None = None,
    method: str = "seap",
    schedule: str | None = None,
    whole_groups: bool = False,
    bias_comp: bool | None = None,
    score: str | None = None,
    refit: bool | None = False,
    refit_data: list[str | Path] | tuple = (),
    quantize: str | None = None,
    quantize_rounding: str | None = None,
    quantize_group: int | None = None,
    seed: int = 0,
    progress: bool = True,
):
    """What :func:`prune` would keep, without writing anything: a :class:`~premoe.moe.plans.PrunePlan` (MoE)
    or :class:`~premoe.dense.model.DensePlan` (dense). Not re-fitted unless ``refit`` (unlike :func:`prune`);
    a re-fitted MoE plan holds its rows until ``plan.close()``.

    Raises:
        PremoeError: impossible keep/top-k/sparsity, unknown task or scorer, options of the other kind of
            model, or a store built for another model.
    """
    from premoe.kinds import check_options, kind_of, select

    backend = kind_of(model)
    selections = (
        MoeSelection(keep, top_k, group_policy, scorer),
        DenseSelection(sparsity, method, schedule, whole_groups, bias_comp, score),
    )
    fit = RefitOptions(refit, tuple(refit_data or ()))
    quant = QuantizeOptions(quantize, quantize_rounding, quantize_group)
    check_options(backend, "plan", *selections, fit, quant)
    return backend.plan(
        backend.inspect(model),
        store,
        task,
        agnostic=agnostic,
        selection=select(backend, *selections),
        refit=fit,
        progress=progress,
        seed=seed,
        **({"quantize": quant} if quant.quantize else {}),
    )


def prune(
    model,
    store: str | Path,
    task: str | None = None,
    keep: int | None = None,
    out: str | Path | None = None,
    *,
    agnostic: bool = False,
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
    quantize: str | None = None,
    quantize_rounding: str | None = None,
    quantize_group: int | None = None,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
):
    """Keep what ``task`` needs and write a HuggingFace checkpoint into ``out``.

    Args:
        model: source model directory (MoE or dense).
        store: pattern store holding ``task``.
        task: calibrated task whose statistics decide (``None`` with ``agnostic``: every task pooled).
        keep / top_k / group_policy / scorer: MoE models (:class:`premoe.moe.options.MoeSelection`): experts
            kept per MoE layer (at least the new top-k), a lower top-k, the policy of group-limited routers,
            a scorer other than the task's own.
        out: output directory (must not exist unless ``overwrite``).
        sparsity / method / schedule / whole_groups / bias_comp / score: dense models
            (:class:`premoe.dense.options.DenseSelection`): the fraction of decoder linear weights removed.
        refit / refit_data: least-squares re-fit on ``refit_data`` or the store's recorded calibration data
            (``None``, the default: when that data is still there unchanged; ``False``: never): MoE models the
            kept experts' down projections and router rows under re-routing (:mod:`premoe.moe.refit`), dense
            models the kept o_proj/down_proj columns and biases (:mod:`premoe.dense.refit`).
        quantize / quantize_rounding / quantize_group: MoE models from bf16/fp16/fp32 sources
            (:class:`premoe.moe.options.QuantizeOptions`): the kept experts written in compressed-tensors format,
            ``w4a16``/``w8a16`` (GPTQ with the re-fit's Gram matrices, or ``rtn``) or ``fp8`` blocks
            (:mod:`premoe.moe.quantize`).
        verify: read the export back (reloaded with ``AutoModelForCausalLM`` when it fits in memory) before
            moving it into place.

    Returns:
        :class:`~premoe.moe.export.ExportResult` (MoE) or :class:`~premoe.dense.export.DenseExportResult`,
        each with a ``summary()`` line; ``None`` on the other ranks of a data-parallel run (under torchrun the
        re-fit's pass is shared and rank 0 writes the export).
    """
    from premoe.core.distributed import agree, world
    from premoe.core.outdir import check_out_dir
    from premoe.kinds import check_options, kind_of, select

    if out is None:
        raise InputError("`out` (the output model directory) is required")
    backend = kind_of(model)
    selections = (
        MoeSelection(keep, top_k, group_policy, scorer),
        DenseSelection(sparsity, method, schedule, whole_groups, bias_comp, score),
    )
    fit = RefitOptions(refit, tuple(refit_data or ()))
    quant = QuantizeOptions(quantize, quantize_rounding, quantize_group)
    check_options(backend, "prune", *selections, fit, quant)
    info = backend.inspect(model)
    check_out_dir(Path(out), info.path, overwrite)
    w = world()
    extra = {"quantize": quant} if quant.quantize else {}
    if w.parallel:  # the re-fit's pass runs data-parallel; rank 0 solves and writes the export
        chosen = select(backend, *selections)
        agree({"model": info.fingerprint.to_dict(), "options": repr([chosen, fit, quant, task, agnostic, verify]),
               "data": [str(d) for d in fit.refit_data]}, w, "prune")  # fmt: skip
        extra["shard"] = w
    the_plan = backend.plan(
        info, store, task, agnostic=agnostic, selection=select(backend, *selections), refit=fit, progress=progress,
        **extra,
    )  # fmt: skip
    try:
        if not w.main:
            return None
        return backend.export(info, the_plan, Path(out), overwrite=overwrite, verify=verify, progress=progress)
    finally:
        the_plan.close()


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help=HELP, description=__doc__.split("\n\n")[1])
    add_model(p)
    add_store(p)
    p.add_argument("--out", required=True, help="output model directory")
    add_pattern(p)
    defaults = defaults_of(prune)
    add_selection(p, defaults)
    add_refit(p, defaults)
    add_flags(p, QuantizeOptions, defaults=defaults, title="quantised export (MoE)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the self-check (by default the export is read back, and reloaded in transformers when "
        "it fits in memory)",
    )


def run(args) -> int:
    result = prune(**kwargs_of(prune, args, progress=not args.quiet))
    if result is not None:  # rank 0 of a data-parallel run, or the one process
        print(result.summary())
    return 0
