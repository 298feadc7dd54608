"""The public verbs. Each CLI subcommand is a thin shell over the function of the same name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .calibration import calibrate
from .export import ExportResult, check_out_dir, export_pruned
from .modelio import LoadedModel, ModelInfo, as_info
from .plans import PrunePlan, check_keep, make_plan
from .store import PatternStore, TaskPattern

__all__ = ["calibrate", "prune", "plan", "inspect_store", "route", "serve"]


def plan(
    model: str | Path | LoadedModel | ModelInfo,
    store: str | Path,
    task: str,
    keep: int,
    *,
    top_k: int | None = None,
    group_policy: str = "balanced",
) -> PrunePlan:
    """The :class:`~premoe.plans.PrunePlan` that keeps ``keep`` experts per layer for ``task``.

    Raises:
        PremoeError: impossible keep/top-k, unknown task, or a store built for another model.
    """
    info = as_info(model)
    check_keep(info.router, keep, top_k, group_policy)
    st = PatternStore.open(store)
    st.check_model(info.fingerprint)
    pattern = st.load(task)
    return plan_from_pattern(info, pattern, keep, top_k=top_k, group_policy=group_policy)


def plan_from_pattern(info: ModelInfo, pattern: TaskPattern, keep: int, *, top_k=None, group_policy="balanced") -> PrunePlan:
    return make_plan(
        pattern.scores,
        pattern.layers,
        info.router,
        keep,
        top_k=top_k,
        group_policy=group_policy,
        tiebreak=pattern.means.get("prob"),  # unselected experts: the router's soft preference decides
        task=pattern.name,
        scorer=pattern.scorer,
        source=info.fingerprint.to_dict(),
    )


def prune(
    model: str | Path | LoadedModel | ModelInfo,
    store: str | Path,
    task: str,
    keep: int,
    out: str | Path,
    *,
    top_k: int | None = None,
    group_policy: str = "balanced",
    overwrite: bool = False,
    verify: bool = True,
    progress: bool = True,
) -> ExportResult:
    """Keep the ``keep`` best experts of every MoE layer for ``task`` and write a HF checkpoint.

    Args:
        model: source model directory.
        store: pattern store holding ``task``.
        task: calibrated task whose scores decide.
        keep: experts kept per MoE layer (the same in every layer, so vLLM loads the result);
            at least the (new) top-k.
        out: output directory (must not exist unless ``overwrite``).
        top_k: lower the experts routed per token as well (the paper's "4/64").
        group_policy: ``balanced`` or ``flatten`` for group-limited routers (see :mod:`premoe.plans`).
        verify: reload the result with ``AutoModelForCausalLM`` before moving it into place.

    Returns:
        :class:`~premoe.export.ExportResult` (bytes written, plan, timing).
    """
    info = as_info(model)
    check_keep(info.router, keep, top_k, group_policy)
    check_out_dir(Path(out), info.path, overwrite)
    the_plan = plan(info, store, task, keep, top_k=top_k, group_policy=group_policy)
    return export_pruned(info, the_plan, out, overwrite=overwrite, verify=verify, progress=progress)


def experts_for_mass(scores: torch.Tensor, mass: float = 0.9) -> float:
    """Mean over layers of how many experts cover ``mass`` of a layer's (non-negative) score."""
    s = scores.clamp_min(0).sort(dim=-1, descending=True).values
    total = s.sum(dim=-1, keepdim=True)
    frac = s.cumsum(dim=-1) / total.clamp_min(1e-30)
    needed = (frac < mass - 1e-9).sum(dim=-1) + 1
    return float(needed.float().mean())


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
            "top_experts": {str(layer): row.argsort(descending=True)[:8].tolist() for layer, row in zip(pattern.layers, pattern.scores)},
        }
    return {"path": str(st.path), "version": manifest["version"], "model": manifest["model"], "tasks": tasks}


def route(
    model: str | Path | ModelInfo,
    store: str | Path,
    queries: str | list[str],
    *,
    layers: int = 1,
    stat: str | None = None,
    source: str | None = None,
    norm: str | None = None,
    metric: str | None = None,
    device: str | None = "cpu",
    dtype: str | None = None,
):
    """Route queries to the nearest stored task, loading no routed expert.

    Only the embeddings, the decoder layers up to the ``layers``-th MoE layer and their routers are
    read from the checkpoint. Defaults of ``stat``/``source``/``norm``/``metric``: see
    :class:`~premoe.retrieval.SignatureSpec`.

    Returns:
        ``(results, bytes_read)``: one :class:`~premoe.retrieval.RouteResult` per query, and the
        bytes read from the checkpoint to build the signature model.

    Raises:
        PremoeError: empty store, store of another model, empty query.
    """
    from .retrieval import QueryRouter, signature_spec

    router = QueryRouter(model, store, signature_spec(layers, stat, source, norm, metric), device=device, dtype=dtype)
    queries = [queries] if isinstance(queries, str) else list(queries)
    return [router.route(q) for q in queries], router.bytes_read


def serve(model: str | Path, store: str | Path, keep: int, **kwargs):
    """A :class:`~premoe.serving.TaskServer`: route prompts and serve them with only their task's experts."""
    from .serving import TaskServer

    return TaskServer(model, store, keep, **kwargs)
