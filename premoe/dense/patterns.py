"""From stored task statistics to a dense plan: which statistics a method reads (the task's own or every
task's pooled), the plan at a sparsity, and when and on what data its kept columns are re-fitted."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from premoe.core.checkpoint import ByteReader
from premoe.core.distributed import SINGLE, World
from premoe.core.options import RefitOptions
from premoe.core.store import PatternStore
from premoe.dense.model import DenseInfo, DensePlan, reader_getter
from premoe.dense.options import DenseSelection
from premoe.dense.plans import METHODS, compensation, make_dense_plan
from premoe.dense.scoring import pooled
from premoe.errors import InputError, StoreError, UnsupportedModelError

log = logging.getLogger(__name__)


def check_dense_store(store: str | Path | PatternStore, info: DenseInfo) -> PatternStore:
    st = store if isinstance(store, PatternStore) else PatternStore.open(store)
    st.check_model(info.fingerprint)
    return st


def stats_for(st: PatternStore, method: str, task: str | None, agnostic: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The statistics a method calibrates on: the task's own (SEAP), or every task pooled (the rest)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    task_source = METHODS[method].source == "task" and not agnostic
    if task_source:
        if not task:
            raise InputError(f"`method` {method} needs `task` (or `agnostic` for the pooled statistics)")
        return st.load(task).means, task
    names = sorted(st.tasks)
    if not names:
        raise StoreError(f"store {st.path} has no tasks; calibrate some first")
    return pooled([st.load(n).means for n in names]), "all-tasks (pooled)"


def weights_from_checkpoint(info: DenseInfo, reader: ByteReader):
    get = reader_getter(info, reader)
    return lambda layer, site: get(info.key(layer, site), None, None)


def refit_sources(
    st: PatternStore, method: str, task: str | None, agnostic: bool, refit_data: list[str | Path] | None
) -> tuple[list[list[str]], str]:
    """The texts ``--refit`` fits on (:func:`premoe.core.data.refit_sources`): ``refit_data``, else the
    calibration data the store recorded for the plan's statistics (the task's own for SEAP; every
    task's for the pooled methods)."""
    from premoe.core.data import refit_sources as recorded

    own = METHODS[method].source == "task" and not agnostic
    return recorded(st.tasks, [task] if own else sorted(st.tasks), refit_data)


def dense_plan(
    info: DenseInfo,
    store,
    task: str | None,
    selection: DenseSelection | float,
    *,
    agnostic: bool = False,
    refit: RefitOptions = RefitOptions(refit=False),
    written: bool = True,
    seed: int = 0,
    reader: ByteReader | None = None,
    progress: bool = True,
    shard: World = SINGLE,
) -> DensePlan:
    """The plan of ``task`` (or of all tasks pooled) for ``selection`` (a float: that sparsity with SEAP),
    counted as ``premoe prune`` writes it (``written``; a task server, which holds the plan itself
    unpadded, counts it in memory). With ``refit`` the kept ``o_proj``/``down_proj`` columns and biases
    are re-fitted by least squares (:mod:`premoe.dense.refit`) on ``refit.refit_data`` or on the
    calibration data the store recorded; ``refit.refit=None`` (what ``premoe prune``/``eval`` default
    to): re-fit when that data is still there unchanged (or ``refit_data`` is given), else warn and keep
    the plain slice."""
    if not isinstance(selection, DenseSelection):
        selection = DenseSelection(sparsity=selection)
    sparsity, method = selection.required(), selection.method
    st = check_dense_store(store, info)
    if method == "seap" and agnostic:
        method = "seap-gen"
    stats, name = stats_for(st, method, task, agnostic)
    sources, about, skipped = [], "", None
    auto = refit.auto
    do_refit = False
    if auto:  # auto: re-fit when the recorded calibration data is still there
        try:
            sources, about = refit_sources(st, method, task, agnostic, None)
            do_refit = True
        except InputError as e:
            log.warning("not re-fitted (%s); pass `refit_data` to re-fit, or `refit=False` to silence this", e)
            skipped = str(e).split(";")[0]
    elif refit.refit or refit.refit_data:
        do_refit = True
        sources, about = refit_sources(st, method, task, agnostic, refit.refit_data)
    own = reader is None
    reader = reader or ByteReader()
    try:
        weights = weights_from_checkpoint(info, reader)
        plan = make_dense_plan(
            info,
            stats,
            method,
            sparsity,
            schedule=selection.schedule,
            metric=selection.score,
            whole_groups=selection.whole_groups,
            bias_comp=selection.bias_comp,
            weights=weights,
            seed=seed,
            task=name,
            written=written,
        )
        if skipped:
            plan.info["refit_skipped"] = skipped
        if do_refit:
            from premoe.core.config import load_tokenizer
            from premoe.dense.refit import refit as refit_plan

            max_length = max(int((e.get("params") or {}).get("max_length", 2048)) for e in st.tasks.values())
            try:
                refit_plan(
                    info,
                    plan,
                    load_tokenizer(info.path),
                    sources,
                    weights,
                    about=about,
                    max_length=max_length,
                    progress=progress,
                    reader=reader,
                    shard=shard,
                )
            except UnsupportedModelError as e:  # a model that cannot run layer by layer
                if not auto:
                    raise
                log.warning("not re-fitted (%s)", e)
                plan.refit, plan.bias, plan.info["refit_skipped"] = {}, {}, "this model cannot run layer by layer"
                plan.info.pop("refit", None)
                if plan.info.get("bias_comp"):
                    plan.bias = compensation(info, plan, stats, weights)
        return plan
    finally:
        if own:
            reader.close()
