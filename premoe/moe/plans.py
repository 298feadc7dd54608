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

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from premoe.errors import InputError
from premoe.moe.arch import RouterSpec

GROUP_POLICIES = ("balanced", "flatten")


@dataclass
class PrunePlan:
    """Kept experts per MoE layer plus the routing settings of the pruned model."""

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

    @property
    def keep(self) -> int:
        return len(next(iter(self.kept.values())))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept"] = {str(k): v for k, v in self.kept.items()}
        d["keep"] = self.keep
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrunePlan":
        d = {k: v for k, v in d.items() if k != "keep"}
        d["kept"] = {int(k): list(v) for k, v in d["kept"].items()}
        return cls(**d)


def rank_experts(scores: torch.Tensor, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Expert ids best first: by score, ties by ``tiebreak`` (both descending), then by id."""
    order = torch.arange(scores.numel())
    if tiebreak is not None:
        order = torch.sort(tiebreak.float(), descending=True, stable=True).indices
    return order[torch.sort(scores.float()[order], descending=True, stable=True).indices]


def check_keep(router: RouterSpec, keep: int, top_k: int | None, group_policy: str) -> tuple[int, int, int]:
    """Validate a keep count before any work; returns (top_k, n_group, topk_group) after pruning.

    Raises:
        InputError: the keep count or top-k is impossible for this router.
    """
    E, K = router.num_experts, router.top_k
    if group_policy not in GROUP_POLICIES:
        raise InputError(f"unknown group policy {group_policy!r}; choose {' or '.join(GROUP_POLICIES)}")
    if not isinstance(keep, int) or keep < 1:
        raise InputError(f"--keep must be a positive number of experts per layer, got {keep}")
    if keep > E:
        raise InputError(f"--keep {keep} exceeds the model's {E} experts per layer")
    new_k = K if top_k is None else top_k
    if new_k < 1:
        raise InputError(f"--top-k must be at least 1, got {top_k}")
    if top_k is not None and top_k > K:
        raise InputError(f"--top-k {top_k} exceeds the model's own top-k {K}; it can only be lowered")
    if keep < new_k:
        raise InputError(
            f"--keep {keep} is below the {new_k} experts each token is routed to; keep at least {new_k} "
            f"experts per layer (or lower top-k with --top-k)"
        )
    if not router.group_limited or group_policy == "flatten":
        if router.group_score == "top2sum" and keep < 2:
            raise InputError("DeepSeek-V3-style routers score expert groups by their two best experts; keep at least 2")
        return (new_k, router.n_group, router.topk_group) if not router.group_limited else (new_k, 1, 1)
    G, TG = router.n_group, router.topk_group
    if keep % G:
        raise InputError(
            f"--keep {keep} is not a multiple of the router's {G} expert groups; use a multiple of {G} "
            f"or --group-policy flatten"
        )
    if router.group_score == "top2sum" and keep < 2 * G:
        raise InputError(
            f"--keep {keep} leaves fewer than 2 experts in some of the {G} groups, but this router scores groups "
            f"by their two best experts; keep at least {2 * G} or use --group-policy flatten"
        )
    if TG * (keep // G) < new_k:
        raise InputError(
            f"--keep {keep} leaves {keep // G} experts in each of the {TG} groups a token may use, fewer than "
            f"top-k {new_k}; keep at least {G * -(-new_k // TG)} or use --group-policy flatten"
        )
    return new_k, G, TG


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


def make_plan(
    scores: torch.Tensor,
    layers: list[int],
    router: RouterSpec,
    keep: int,
    top_k: int | None = None,
    group_policy: str = "balanced",
    tiebreak: torch.Tensor | None = None,
    **meta: Any,
) -> PrunePlan:
    """A :class:`PrunePlan` keeping the ``keep`` best experts per layer by ``scores`` [L, E]."""
    new_k, n_group, topk_group = check_keep(router, keep, top_k, group_policy)
    kept = select_experts(scores, keep, router, group_policy, tiebreak)
    return PrunePlan(
        kept=dict(zip(layers, kept)),
        num_experts=router.num_experts,
        top_k=new_k,
        top_k_before=router.top_k,
        n_group=n_group,
        topk_group=topk_group,
        group_policy=group_policy if router.group_limited else None,
        **meta,
    )
