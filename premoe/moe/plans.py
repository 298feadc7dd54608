"""Prune plans: which original experts each MoE layer keeps, decided before anything is written.

A :class:`PrunePlan` is plain data (JSON); :mod:`premoe.moe.export` applies it to a checkpoint on disk
and :mod:`premoe.moe.surgery` to a model in memory.

Group-limited routing (DeepSeek-V3, DeepSeek-V2 ``group_limited_greedy``): the router reshapes the
experts into ``n_group`` equal groups, scores each group and only routes into the best
``topk_group``. Removing experts unevenly would break that structure, so premoe offers:

* ``balanced`` (default): keep ``N / n_group`` experts in every group, best first within the group.
  Group ids keep their meaning and the exported router is the model's own group-limited router,
  so a vanilla transformers/vLLM/SGLang load is faithful to how the model was trained. Needs
  ``N`` divisible by ``n_group`` and ``topk_group * N / n_group >= top_k``.
* ``flatten``: choose the best N freely and set ``n_group = topk_group = 1`` (plain top-k over the
  kept experts), as the PreMoe reference code does for every run. It changes routing even for
  tokens whose experts all survive; use it when a task's experts concentrate in a few groups.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from premoe.moe.arch import RouterSpec
from premoe.moe.options import MoeSelection, ResolvedSelection


@dataclass
class PrunePlan:
    """Kept experts per MoE layer plus the routing settings of the pruned model. ``weights`` holds the kept
    experts' re-fitted rows when the plan was re-fitted (not serialised; :meth:`close` frees them)."""

    kept: dict[int, list[int]]  # decoder-layer id -> kept original expert ids, ascending
    num_experts: int  # before pruning
    top_k: int  # after pruning
    top_k_before: int
    n_group: int = 1  # after pruning (group-limited routers only)
    topk_group: int = 1
    group_policy: str | None = None
    task: str | None = None
    scorer: str | None = None
    source: dict[str, Any] = field(default_factory=dict)
    refit: dict[str, Any] | None = None  # how the kept experts were re-fitted (premoe.moe.refit), if they were
    weights: Any = field(default=None, repr=False, compare=False)  # premoe.moe.refit_weights.RefitWeights
    quantize: Any = field(default=None, repr=False, compare=False)  # premoe.moe.quantize.ExpertQuant (export)

    @property
    def keep(self) -> int:
        return len(next(iter(self.kept.values())))

    def close(self) -> None:
        """Free the re-fitted rows (temporary files) the plan holds."""
        if self.weights is not None:
            self.weights.close()

    def to_dict(self) -> dict[str, Any]:
        skip = ("weights", "quantize")
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name not in skip}
        if self.quantize is not None:
            d["quantize"] = self.quantize.about()
        d["kept"] = {str(k): v for k, v in self.kept.items()}
        d["keep"] = self.keep
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrunePlan":
        d = {k: v for k, v in d.items() if k not in ("keep", "weights", "quantize")}
        d["kept"] = {int(k): list(v) for k, v in d["kept"].items()}
        return cls(**d)


def rank_experts(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Expert ids best first: by score, ties by ``tiebreak`` (both descending), then by id."""
    order = torch.arange(scores.numel())
    if tiebreak is not None:
        order = torch.sort(tiebreak.float(), descending=True, stable=True).indices
    return order[torch.sort(scores.float()[order], descending=True, stable=True).indices]


def select_experts(
    scores: torch.Tensor,
    keep: int,
    router: RouterSpec,
    group_policy: str = "balanced",
    tiebreak: torch.Tensor | None = None,
) -> list[list[int]]:
    """Top-``keep`` experts of every layer (rows of ``scores`` [L, E]), ascending ids."""
    out = []
    balanced = router.group_limited and group_policy == "balanced"
    for layer in range(scores.shape[0]):
        tb = tiebreak[layer] if tiebreak is not None else None
        if balanced:
            size, per = router.num_experts // router.n_group, keep // router.n_group
            kept = []
            for g in range(router.n_group):
                sl = slice(g * size, (g + 1) * size)
                best = rank_experts(scores[layer, sl], tb[sl] if tb is not None else None)[:per]
                kept += (best + g * size).tolist()
        else:
            kept = rank_experts(scores[layer], tb)[:keep].tolist()
        out.append(sorted(kept))
    return out


def resolved(selection: MoeSelection | ResolvedSelection | int, router: RouterSpec) -> ResolvedSelection:
    """``selection`` checked against ``router`` (an int: keep that many experts with the model's routing)."""
    if isinstance(selection, ResolvedSelection):
        return selection
    return (selection if isinstance(selection, MoeSelection) else MoeSelection(keep=selection)).resolve(router)


def make_plan(
    scores: torch.Tensor,
    layers: list[int],
    router: RouterSpec,
    selection: MoeSelection | ResolvedSelection | int,
    tiebreak: torch.Tensor | None = None,
    **meta: Any,
) -> PrunePlan:
    """A :class:`PrunePlan` keeping the best experts per layer by ``scores`` [L, E]: ``selection``'s keep
    count (an int: that many, the model's routing otherwise), checked against ``router`` first unless it
    already was (a :class:`~premoe.moe.options.ResolvedSelection`)."""
    sel = resolved(selection, router)
    kept = select_experts(scores, sel.keep, router, sel.group_policy or "balanced", tiebreak)
    return PrunePlan(
        kept=dict(zip(layers, kept)),
        num_experts=router.num_experts,
        top_k=sel.top_k,
        top_k_before=router.top_k,
        n_group=sel.n_group,
        topk_group=sel.topk_group,
        group_policy=sel.group_policy,
        **meta,
    )
