"""The public verbs. Each CLI subcommand is a thin shell over the function of the same name."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from premoe.moe.loading import LoadedModel
from premoe.moe.model import ModelInfo, as_info
from premoe.core.store import PatternStore
from premoe.errors import InputError
from premoe.moe.calibration import calibrate as calibrate_moe
from premoe.core.outdir import check_out_dir
from premoe.moe.export import export_pruned
from premoe.moe.patterns import experts_for_mass, load_pattern, plan_from_pattern, pooled_pattern
from premoe.moe.plans import PrunePlan, check_keep
from premoe.moe.refit_checkpoint import refit_for
from premoe.moe.scoring import SCORERS

__all__ = ["calibrate", "refit", "prune", "plan", "pooled_pattern", "evaluate", "inspect_store", "route", "serve", "model_kind"]

MOE_ONLY = {"keep": "--keep", "top_k": "--top-k", "scorer": "--scorer", "k": "--k", "r": "--r", "all_stats": "--all-stats",
            "stream": "--stream", "max_memory": "--max-memory", "offload_dir": "--offload-dir"}
DENSE_ONLY = {"sparsity": "--sparsity", "method": "--method", "schedule": "--schedule", "whole_groups": "--whole-groups",
              "bias_comp": "--bias-comp", "score": "--score"}
_MEMORY_FLAGS = ("stream", "max_memory", "offload_dir")  # dense models: calibrate only
_NEUTRAL = {"all_stats": False, "whole_groups": False, "group_policy": "balanced", "signature_layers": 4}


def model_kind(model) -> str:
    """``"moe"`` or ``"dense"``: which half of premoe handles this model directory.

    Raises:
        UnsupportedModelError: neither a supported MoE family nor a supported dense family.
    """
    from premoe.core.config import read_config
    from premoe.dense.families import resolve_dense
    from premoe.dense.model import DenseInfo
    from premoe.errors import UnsupportedModelError
    from premoe.moe.families import resolve

    if isinstance(model, (ModelInfo, LoadedModel)):
        return "moe"
    if isinstance(model, DenseInfo):
        return "dense"
    raw = read_config(Path(model))
    try:
        resolve(raw)
        return "moe"
    except UnsupportedModelError as moe_error:
        try:
            resolve_dense(raw)
            return "dense"
        except UnsupportedModelError as dense_error:
            from premoe.dense.families import DENSE_SPECS, UNSUPPORTED

            if raw.get("model_type") in UNSUPPORTED:
                raise dense_error from None
            if "MoE family premoe cannot prune" in str(moe_error):
                raise moe_error from None
            raise UnsupportedModelError(f"{moe_error}; dense families: {', '.join(sorted(DENSE_SPECS))} "
                                        "(premoe/dense/families.py)") from None


def _refuse(kind: str, given: dict[str, Any]) -> None:
    """A one-line error for a flag of the other kind of model."""
    table, fix = (MOE_ONLY, "for a dense model use --sparsity (and --method)") if kind == "dense" else \
        (DENSE_ONLY, "for an MoE model use --keep (and --scorer)")
    for name, flag in table.items():
        value = given.get(name)
        if value is not None and value != _NEUTRAL.get(name, None) and value is not False:
            if name in _MEMORY_FLAGS and kind == "dense":
                raise InputError(f"{flag} applies to dense models in `premoe calibrate` only; other dense commands "
                                 "read only the kept heads and channels, so drop it")
            raise InputError(f"{flag} applies to {'MoE' if kind == 'dense' else 'dense'} models only; {fix}")


def calibrate(model, data, task: str, store, **kwargs):
    """Calibrate ``task`` on ``data`` into ``store``: routed-expert scores for an MoE model
    (:func:`premoe.moe.calibration.calibrate`), activation statistics of heads and FFN channels for a
    dense one (:func:`premoe.dense.calibration.calibrate_dense`)."""
    if model_kind(model) == "moe":
        return calibrate_moe(model, data, task, store, **kwargs)
    from premoe.dense.calibration import calibrate_dense

    memory = _MEMORY_FLAGS  # dense calibration streams too
    _refuse("dense", {**{k: v for k, v in kwargs.items() if k not in memory},
                      "scorer": None if kwargs.get("scorer") in (None, "tcess") else kwargs["scorer"]})
    if kwargs.get("signature_layers", 4) != 4:
        raise InputError("--signature-layers applies to MoE models only (dense stores keep keys at every depth)")
    keep = {k: kwargs[k] for k in ("max_samples", "batch_size", "max_length", "device", "dtype", "overwrite", "progress",
                                   *memory) if k in kwargs}
    return calibrate_dense(model, data, task, store, **keep)


def plan(
    model: str | Path | LoadedModel | ModelInfo,
    store: str | Path,
    task: str | None,
    keep: int,
    *,
    top_k: int | None = None,
    group_policy: str = "balanced",
    scorer: str | None = None,
    agnostic: bool = False,
    seed: int = 0,
) -> PrunePlan:
    """The :class:`~premoe.moe.plans.PrunePlan` that keeps ``keep`` experts per layer for ``task``.

    Args:
        scorer: rank experts with this scorer instead of the task's own (its statistics must have
            been calibrated, e.g. with ``all_stats``).
        agnostic: ignore ``task``; pool every task in the store (task-agnostic selection).

    Raises:
        PremoeError: impossible keep/top-k, unknown task or scorer, or a store built for another model.
    """
    info = as_info(model)
    check_keep(info.router, keep, top_k, group_policy)
    st = PatternStore.open(store)
    st.check_model(info.fingerprint)
    pattern = load_pattern(st, task, agnostic)
    return plan_from_pattern(info, pattern, keep, top_k=top_k, group_policy=group_policy, scorer=scorer, seed=seed)


def check_refit_keeps(model, keeps: list[int], top_k: int | None = None, group_policy: str = "balanced") -> ModelInfo:
    """Raise unless :func:`refit` can store re-fitted rows of ``model`` for ``keeps`` (returns its info)."""
    from premoe.moe.refit_checkpoint import check_refit_model, down_targets

    if model_kind(model) == "dense":
        raise InputError("stored re-fits (premoe refit, --refit-keep) are for MoE models; a dense model re-fits in "
                         "`premoe prune --refit`")
    info = as_info(model)
    for k in keeps:
        check_keep(info.router, k, top_k, group_policy)
    check_refit_model(info)
    down_targets(info)
    return info


def refit(
    model: str | Path | ModelInfo,
    store: str | Path,
    keep: int | list[int],
    *,
    tasks: list[str] | None = None,
    top_k: int | None = None,
    group_policy: str = "balanced",
    scorer: str | None = None,
    refit_data: list[str | Path] | None = None,
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Store re-fitted rows with task patterns (MoE): for each task (default: every task in the store)
    and keep count, the down projections of the experts ``keep`` keeps, re-fitted by least squares under
    re-routing on the task's calibration data (or ``refit_data``), one pass over the model per task.
    ``premoe prune``/``eval`` then skip the re-fit and ``generate``/``chat``/``serve`` (TAER) load these
    rows instead of the checkpoint's, for the same keep count, top-k, group policy and scorer.

    Returns:
        {task: [one manifest entry per keep count: keep, key, experts re-fitted, data, tokens, ...]}

    Raises:
        PremoeError: dense model, impossible keep, unknown task, quantised checkpoint or unsupported
            expert layout, calibration data gone or changed.
    """
    from premoe.moe.refit_checkpoint import store_refits

    keeps = [keep] if isinstance(keep, int) else list(keep)
    info = check_refit_keeps(model, keeps, top_k, group_policy)
    st = PatternStore.open(store)
    st.check_model(info.fingerprint)
    names = list(tasks) if tasks else sorted(st.tasks)
    if not names:
        raise InputError(f"store {st.path} has no tasks; calibrate one first")
    if refit_data and (not tasks or len(names) > 1):
        raise InputError("--refit-data is the data of one task's rows; name that one task with --task")
    out = {}
    for name in names:
        pattern = st.load(name)
        plans = [plan_from_pattern(info, pattern, k, top_k=top_k, group_policy=group_policy, scorer=scorer)
                 for k in keeps]
        out[name] = store_refits(info, st, name, plans, refit_data, progress=progress)
    return out


def prune(
    model: str | Path | LoadedModel | ModelInfo,
    store: str | Path,
    task: str | None,
    keep: int | None,
    out: str | Path,
    *,
    top_k: int | None = None,
    group_policy: str = "balanced",
    scorer: str | None = None,
    agnostic: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
    sparsity: float | None = None,
    method: str | None = None,
    schedule: str | None = None,
    whole_groups: bool = False,
    bias_comp: bool | None = None,
    score: str | None = None,
    refit: bool | None = None,
    refit_data: list[str | Path] | None = None,
):
    """Keep the ``keep`` best experts of every MoE layer for ``task`` and write a HF checkpoint.

    Args:
        model: source model directory.
        store: pattern store holding ``task``.
        task: calibrated task whose scores decide (``None`` with ``agnostic``).
        keep: experts kept per MoE layer (the same in every layer, so vLLM loads the result);
            at least the (new) top-k.
        out: output directory (must not exist unless ``overwrite``).
        top_k: lower the experts routed per token as well (the paper's "4/64").
        group_policy: ``balanced`` or ``flatten`` for group-limited routers (see :mod:`premoe.moe.plans`).
        scorer: rank with this scorer instead of the task's own.
        agnostic: pool every task in the store instead of using one (task-agnostic pruning).
        verify: reload the result with ``AutoModelForCausalLM`` before moving it into place.
        sparsity / method / schedule / whole_groups / bias_comp / score: dense models (see
            :func:`premoe.dense.plans.make_dense_plan`): the fraction of decoder linear weights removed.
        refit / refit_data: re-fit by least squares on ``refit_data`` or the store's recorded calibration
            data (``None``, the default: when that data is still there unchanged; ``False``: never): MoE
            models the kept experts' down projections under re-routing (:mod:`premoe.moe.refit`), dense
            models the kept o_proj/down_proj columns and biases (:mod:`premoe.dense.refit`).

    Returns:
        :class:`~premoe.moe.export.ExportResult` (MoE) or :class:`~premoe.dense.export.DenseExportResult`.
    """
    given = dict(keep=keep, top_k=top_k, scorer=scorer, sparsity=sparsity, method=method, schedule=schedule,
                 whole_groups=whole_groups, bias_comp=bias_comp, score=score, refit=refit, refit_data=refit_data)
    if model_kind(model) == "dense":
        _refuse("dense", given)
        return _prune_dense(model, store, task, out, sparsity, method, schedule, whole_groups, bias_comp, agnostic,
                            overwrite, verify, progress, score, refit, refit_data)
    _refuse("moe", given)
    if keep is None:
        raise InputError("--keep (experts kept per MoE layer) is required")
    info = as_info(model)
    check_keep(info.router, keep, top_k, group_policy)
    check_out_dir(Path(out), info.path, overwrite)
    the_plan = plan(info, store, task, keep, top_k=top_k, group_policy=group_policy, scorer=scorer, agnostic=agnostic)
    weights = refit_for(info, store, the_plan, task, agnostic, refit, refit_data, progress)
    try:
        return export_pruned(info, the_plan, out, overwrite=overwrite, verify=verify, progress=progress, refit=weights)
    finally:
        if weights is not None:
            weights.close()


def _prune_dense(model, store, task, out, sparsity, method, schedule, whole_groups, bias_comp, agnostic, overwrite, verify,
                 progress, score, refit=None, refit_data=None):
    from premoe.dense.export import export_dense
    from premoe.dense.model import inspect_dense
    from premoe.dense.patterns import dense_plan

    if sparsity is None:
        raise InputError("--sparsity (fraction of decoder weights removed, e.g. 0.5) is required for a dense model")
    info = inspect_dense(model)
    check_out_dir(Path(out), info.path, overwrite)
    the_plan = dense_plan(info, store, task, sparsity, method=method or "seap", agnostic=agnostic, schedule=schedule,
                          whole_groups=whole_groups, bias_comp=bias_comp, metric=score, refit=refit,
                          refit_data=refit_data, progress=progress)
    return export_dense(info, the_plan, out, overwrite=overwrite, verify=verify, progress=progress)


def inspect_store(store: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of a pattern store: its model and, per task, what was calibrated."""
    st = PatternStore.open(store)
    manifest = st.manifest()
    tasks = {}
    for name, entry in sorted(manifest["tasks"].items()):
        pattern = st.load(name)
        concentration = pattern.means.get("tcess", pattern.scores)
        tasks[name] = {
            "samples": entry.get("samples"),
            "tokens": entry.get("tokens"),
            "scorer": entry.get("scorer"),
            "params": entry.get("params"),
            "created": entry.get("created"),
            "data": entry.get("data"),
            "experts_for_90pct": round(experts_for_mass(concentration, 0.9), 2),
            "scorers": [n for n, sc in SCORERS.items() if all(k in pattern.means for k in sc.needs)],
            "top_experts": {str(layer): row.argsort(descending=True)[:8].tolist() for layer, row in zip(pattern.layers, pattern.scores)},
            "refits": sorted(({k: r.get(k) for k in ("keep", "top_k", "group_policy", "scorer", "experts", "dir")}
                              for r in entry.get("refits", {}).values()), key=lambda r: r["keep"]),
        }
    return {"path": str(st.path), "version": manifest["version"], "model": manifest["model"], "tasks": tasks}


def route(
    model: str | Path | ModelInfo,
    store: str | Path,
    queries: str | list[str],
    *,
    layers: int | None = None,
    stat: str | None = None,
    source: str | None = None,
    norm: str | None = None,
    metric: str | None = None,
    device: str | None = "cpu",
    dtype: str | None = None,
):
    """Route queries to the nearest stored task, loading no routed expert.

    Only the embeddings, the decoder layers up to the ``layers``-th MoE layer and their routers are
    read from the checkpoint (dense models: ``layers`` decoder layers, default 0, the mean token
    embedding, as ``premoe route`` does). Defaults of ``stat``/``source``/``norm``/``metric``: see
    :class:`~premoe.core.retrieval.SignatureSpec`.

    Returns:
        ``(results, bytes_read)``: one :class:`~premoe.core.retrieval.RouteResult` per query, and the
        bytes read from the checkpoint to build the signature model.

    Raises:
        PremoeError: empty store, store of another model, empty query.
    """
    from premoe.moe.router import QueryRouter
    from premoe.core.retrieval import signature_spec

    queries = [queries] if isinstance(queries, str) else list(queries)
    if model_kind(model) == "dense":
        from premoe.dense.router import ROUTE_DEPTH, DenseRouter

        router = DenseRouter(model, store, ROUTE_DEPTH if layers is None else layers, device=device or "cpu")
        return router.route_many(queries), router.bytes_read
    router = QueryRouter(model, store, signature_spec(layers or 1, stat, source, norm, metric), device=device, dtype=dtype)
    return [router.route(q) for q in queries], router.bytes_read


def serve(model: str | Path, store: str | Path, keep: int, **kwargs):
    """A :class:`~premoe.moe.server.TaskServer`: route prompts and serve them with only their task's experts."""
    from premoe.moe.server import TaskServer

    return TaskServer(model, store, keep, **kwargs)


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    store: str | Path | None = None,
    task: str | None = None,
    keep: int | None = None,
    agnostic: bool = False,
    scorer: str | None = None,
    top_k: int | None = None,
    group_policy: str = "balanced",
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    limit: int | None = None,
    device: str | None = "cpu",
    dtype: str | None = "auto",
    progress: bool = True,
    stream: bool | None = None,
    max_memory: float | None = None,
    sparsity: float | None = None,
    method: str | None = None,
    schedule: str | None = None,
    whole_groups: bool = False,
    score: str | None = None,
    refit: bool | None = None,
    refit_data: list[str | Path] | None = None,
) -> dict[str, Any]:
    """Accuracy of a model on a data file: greedy exact match for ``{"prompt", "completion"}`` lines,
    log-likelihood accuracy for ``{"prompt", "choices", "answer"}`` lines.

    ``model`` may be a dense or an exported pruned checkpoint. With ``store`` (and ``task`` or
    ``agnostic``, and ``keep``) a stored pattern is applied on the fly: the pruned model is built
    from the checkpoint, reading only its experts. A model that does not fit in memory (or
    ``max_memory`` MB; ``stream`` forces either way) runs with its decoder layers loaded on demand.

    Returns:
        ``{"exact_match", "generate_samples", "mc_accuracy", "mc_samples", ...}`` (metrics are
        ``None`` when the file has no sample of that kind).
    """
    from premoe.core.evaluation import choice_accuracy, exact_match, read_eval_data
    from premoe.moe.loading import load_model
    from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
    from premoe.moe.kernels import select_kernel

    given = dict(keep=keep, top_k=top_k, scorer=scorer, stream=stream, max_memory=max_memory, sparsity=sparsity,
                 method=method, schedule=schedule, whole_groups=whole_groups, score=score, refit=refit,
                 refit_data=refit_data)
    if model_kind(model) == "dense":
        from premoe.dense.model import inspect_dense
        from premoe.dense.patterns import dense_plan
        from premoe.dense.evaluate import evaluate_dense

        _refuse("dense", given)
        if store is None and (task or agnostic or sparsity is not None):
            raise InputError("--task/--sparsity/--agnostic need --store (or evaluate an exported model directory directly)")
        if store is not None and sparsity is None:
            raise InputError("--store needs --sparsity (fraction of decoder weights removed) for a dense model")
        info = inspect_dense(model)
        the_plan = None if store is None else dense_plan(info, store, task, sparsity, method=method or "seap",
                                                         agnostic=agnostic, schedule=schedule, whole_groups=whole_groups,
                                                         metric=score, refit=refit, refit_data=refit_data,
                                                         progress=progress)
        read_eval_data(data, limit)  # bad data fails before the model is built
        return evaluate_dense(info, data, the_plan, batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
                              device=device, dtype=dtype, progress=progress)
    _refuse("moe", given)
    gen, mc = read_eval_data(data, limit)
    result: dict[str, Any] = {"model": str(model), "data": str(data)}
    if store is None and (any(v is not None for v in (task, keep)) or agnostic):
        raise InputError("--task/--keep/--agnostic need --store (or evaluate an exported model directory directly)")
    if store is not None and keep is None:
        raise InputError("--store needs --keep (experts per layer) and --task or --agnostic")
    from premoe.core.memory import fits, memory_budget
    from premoe.moe.selective import ByteReader
    from premoe.moe.streaming import inference_model, resident_sizes

    budget = memory_budget(max_memory)
    info = as_info(model)
    the_plan = None
    if store is not None:
        the_plan = plan(info, store, task, keep, top_k=top_k, group_policy=group_policy, scorer=scorer, agnostic=agnostic)
        result.update(task="all-tasks (pooled)" if agnostic else task, keep=keep, scorer=the_plan.scorer, top_k=the_plan.top_k)
    elif refit or refit_data:
        raise InputError("--refit/--refit-data apply to a model pruned on the fly (--store, --task, --keep)")
    weights = None if the_plan is None else refit_for(info, store, the_plan, task, agnostic, refit, refit_data, progress)
    if the_plan is not None:
        result["refit"] = the_plan.refit if weights is not None else None
    # transformers loads a whole unquantised model that fits; anything else is built from byte ranges
    by_transformers = (the_plan is None and stream is None and max_memory is None and not info.quant.method
                       and fits(resident_sizes(info)["total"], budget))
    with ByteReader() as reader, contextlib.closing(weights) if weights is not None else contextlib.nullcontext():
        if by_transformers:
            lm = load_model(model, device=device, dtype=dtype)
            net, tokenizer = lm.model, lm.tokenizer
        else:
            net, lazy = inference_model(info, the_plan, reader, budget=budget, stream=stream, device=resolve_device(device),
                                        refit=weights)
            if not lazy:
                dt = resolve_dtype(dtype)
                net.to(device=resolve_device(device), dtype=None if dt == "auto" else dt)
                select_kernel(net)
            result["streamed"] = lazy
            tokenizer = load_tokenizer(info.path)
        result["exact_match"] = exact_match(net, tokenizer, gen, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                            progress=progress) if gen else None
        result["generate_samples"] = len(gen)
        result["mc_accuracy"] = choice_accuracy(net, tokenizer, mc, progress=progress) if mc else None
        result["mc_samples"] = len(mc)
        if reader.bytes_read:
            result["bytes_read"] = reader.bytes_read
    return result
