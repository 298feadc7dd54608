"""From stored task patterns to expert plans: pooling tasks, scoring a pattern, the top-N plan."""

from __future__ import annotations

from pathlib import Path

import torch

from premoe.core.store import PatternStore, TaskPattern
from premoe.errors import InputError, StoreError
from premoe.moe.model import ModelInfo
from premoe.moe.options import MoeSelection, ResolvedSelection
from premoe.moe.plans import PrunePlan, make_plan, resolved
from premoe.moe.scoring import pool_means, score


def pooled_pattern(
    store: str | Path | PatternStore, tasks: list[str] | None = None, name: str = "all-tasks"
) -> TaskPattern:
    """One pattern for several tasks (default: all in the store), as if calibrated on all their samples.

    Every stored statistic is a per-token sum, so pooling is exact: a token-weighted average of the
    tasks' means (task-agnostic pruning, what REAP and most peers do).

    Raises:
        StoreError: an unknown task, or no tasks.
    """
    st = store if isinstance(store, PatternStore) else PatternStore.open(store)
    names = tasks or sorted(st.tasks)
    if not names:
        raise StoreError(f"store {st.path} has no tasks to pool; calibrate some first")
    return pool_patterns([st.load(t) for t in names], name)


def pool_patterns(patterns: list[TaskPattern], name: str = "all-tasks") -> TaskPattern:
    """The pooled pattern of ``patterns`` (:func:`pooled_pattern` of patterns already loaded)."""
    names = [p.name for p in patterns]
    means, tokens = pool_means([(p.means, int(p.info.get("tokens", 0))) for p in patterns])
    default = patterns[0].scorer if len({p.scorer for p in patterns}) == 1 else "tcess"
    shape = tuple(patterns[0].scores.shape)
    scores = score_pattern(TaskPattern(name, patterns[0].layers, patterns[0].scores, means), default, shape)
    return TaskPattern(
        name,
        patterns[0].layers,
        scores,
        means,
        {
            "tokens": tokens,
            "scorer": default,
            "pooled_from": names,
            "samples": sum(int(p.info.get("samples", 0)) for p in patterns),
        },
    )


def score_pattern(pattern: TaskPattern, scorer: str | None, shape=None, seed: int = 0):
    """``pattern``'s scores under ``scorer`` (``None``: the scorer it was calibrated with).

    Raises:
        InputError: unknown scorer, or the pattern lacks the statistics it needs.
    """
    if scorer is None or scorer == pattern.scorer:
        return pattern.scores
    try:
        return score(scorer, pattern.means, shape or tuple(pattern.scores.shape), seed)
    except ValueError as e:
        raise InputError(f"task {pattern.name!r}: {e}") from None


def load_pattern(store: str | Path | PatternStore, task: str | None, agnostic: bool = False) -> TaskPattern:
    """A stored task's pattern, or with ``agnostic`` the pooled pattern of every task in the store."""
    st = store if isinstance(store, PatternStore) else PatternStore.open(store)
    if agnostic == (task is not None):
        raise InputError("give either `task` or `agnostic` (pool every task in the store)")
    return pooled_pattern(st) if agnostic else st.load(task)


def plan_from_pattern(
    info: ModelInfo, pattern: TaskPattern, selection: MoeSelection | ResolvedSelection | int, seed: int = 0
) -> PrunePlan:
    """The plan keeping ``selection``'s experts (an int: that many) of ``pattern``, ranked by its scorer
    (default: the pattern's own)."""
    selection = resolved(selection, info.router)
    scores = score_pattern(pattern, selection.scorer, seed=seed)
    return make_plan(
        scores,
        pattern.layers,
        info.router,
        selection,
        tiebreak=tiebreak(pattern.means),
        task=pattern.name,
        scorer=selection.scorer or pattern.scorer,
        source=info.fingerprint.to_dict(),
    )


def tiebreak(means: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What decides between experts of equal score [L, E]: how often the router chose them (TCESS), then
    its soft preference (mean gate probability), so an expert the task routed to always outranks one it
    never did, and among unchosen experts the router's next picks come first."""
    keys = [means[k] for k in ("tcess", "prob") if k in means]
    if not keys:
        return None
    out = torch.zeros(keys[0].shape, dtype=torch.float64)
    for k in keys:  # lexicographic: each key's rank within the layer, the earlier keys more significant
        below = (k[..., None, :] < k[..., :, None]).sum(-1)  # experts with a smaller value: equal values tie
        out = out * k.shape[-1] + below.double()
    return out


def experts_for_mass(scores: torch.Tensor, mass: float = 0.9) -> float:
    """Mean over layers of how many experts cover ``mass`` of a layer's (non-negative) score."""
    s = scores.clamp_min(0).sort(dim=-1, descending=True).values
    total = s.sum(dim=-1, keepdim=True)
    frac = s.cumsum(dim=-1) / total.clamp_min(1e-30)
    needed = (frac < mass - 1e-9).sum(dim=-1) + 1
    return float(needed.float().mean())
