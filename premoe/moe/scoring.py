"""Expert-importance scorers as pure tensor functions.

A calibration pass reduces every MoE layer's router output to a few per-expert sums over tokens
(:class:`RoutingSums`); each scorer is a function of those sums. Legend: T = tokens, E = experts,
k = experts per token, L = MoE layers.

TCESS (task-conditioned expected selection score), PreMoe's criterion, is defined here as
selection-based::

    TCESS_l(e) = (1/T) * sum_t  1[e in S_t(k)] * 1[w_t,e / sum_{j in S_t} w_t,j >= r] * w_t,e

with S_t(k) the k experts the family's own router chooses for token t (k defaults to the model's
top-k, DeepSeek-V3's correction bias and group limits included) and w_t,e the routing weight the
family really applies (softmax, renormalised where the model renormalises; sigmoid for DeepSeek-V3;
softmax over the chosen for GPT-OSS). The constant ``routed_scaling_factor`` is left out.

``official`` reproduces the PreMoe reference code: k = 1 on raw logits, marker = the raw logit. With
sigmoid routers most logits are negative, so an expert that wins often with a negative logit scores
*below* one that never wins (score 0): the ranking inverts. Use it only to compare with that code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from premoe.moe.arch import RouterSpec
from premoe.moe.routing import gate_scores, route


def tcess_marker(
    indices: torch.Tensor, weights: torch.Tensor, num_experts: int, r: float | None = None
) -> torch.Tensor:
    """[T, E] per-token TCESS contribution: the routing weight of each chosen expert whose share
    of the token's chosen weight is at least ``r`` (``None``: no threshold)."""
    w = weights.float()
    if r is not None:
        share = w / w.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        w = torch.where(share >= r, w, torch.zeros_like(w))
    return torch.zeros(w.shape[0], num_experts, dtype=w.dtype, device=w.device).scatter_add_(1, indices, w)


def selection_marker(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, E] one where the expert is among the token's chosen experts."""
    ones = torch.ones(indices.shape, dtype=torch.float32, device=indices.device)
    return torch.zeros(indices.shape[0], num_experts, device=indices.device).scatter_add_(1, indices, ones)


def official_marker(logits: torch.Tensor, k: int = 1, r: float | None = None) -> torch.Tensor:
    """[T, E] the PreMoe reference code's marker: the raw logit of each of the top-k (by raw logit)
    experts whose softmax share among those k is at least ``r``; zero elsewhere."""
    z = logits.float()
    top, idx = z.topk(k, dim=-1)
    if r is not None:
        share = top.softmax(dim=-1)
        top = torch.where(share >= r, top, torch.zeros_like(top))
    return torch.zeros_like(z).scatter_(1, idx, top)


@dataclass
class MarkerParams:
    """Selection settings of one calibration pass (recorded in the pattern store)."""

    k: int
    r: float | None = None
    official_k: int = 1
    official_r: float | None = None

    def to_dict(self) -> dict:
        return {"k": self.k, "r": self.r, "official_k": self.official_k, "official_r": self.official_r}


def output_markers(
    indices: torch.Tensor, weights: torch.Tensor, norms: torch.Tensor, gain: torch.Tensor, num_experts: int
) -> dict[str, torch.Tensor]:
    """[T, E] per-token contributions of the expert-output criteria.

    Args:
        indices / weights: [T, K] experts each token is routed to and their real routing weights.
        norms: [T, K] L2 norm of each chosen expert's output for the token.
        gain: [T] EASY-EP's token factor, max(0, 1 - cos(x, x + r)) with x the residual entering the
            MoE block and r the routed experts' weighted output.

    Returns:
        ``reap``: weight x norm; ``ean``: norm; ``easyep``: weight x norm x gain (each at the chosen
        experts, zero elsewhere). REAP and EAN are means over the tokens routed to the expert, so
        their scores divide these sums by the selection counts.
    """
    w, n = weights.float(), norms.float()

    def scatter(v):
        return torch.zeros(v.shape[0], num_experts, dtype=v.dtype, device=v.device).scatter_add_(1, indices, v)

    return {"reap": scatter(w * n), "ean": scatter(n), "easyep": scatter(w * n * gain.float()[:, None])}


def weight_ratio(tensors: list[torch.Tensor]) -> float:
    """AIMER-style calibration-free statistic of one expert: RMS / mean |w| over all its weights.

    Heavy-tailed experts (a few large weights) score high; experts whose weights are all of similar
    magnitude score near 1 and are pruned first (AIMER prunes the highest mean|w| / RMS).
    """
    flat = torch.cat([t.float().reshape(-1) for t in tensors])
    mean_abs = flat.abs().mean()
    return float(flat.pow(2).mean().sqrt() / mean_abs.clamp_min(torch.finfo(torch.float32).tiny))


# Names of the per-expert sums a calibration pass accumulates, and what each sums over tokens.
SUM_NAMES = {
    "tcess": "routing weight of chosen experts (share >= r)",
    "count": "1 if chosen among the top-k",
    "official": "raw logit at the official preset's top-k",
    "prob": "gate probability over all experts (soft preference)",
}
OUTPUT_SUM_NAMES = {
    "reap": "routing weight x expert output norm, at the chosen experts",
    "ean": "expert output norm, at the chosen experts",
    "easyep": "routing weight x output norm x max(0, 1 - cos(x, x + r))",
}


def layer_markers(
    logits: torch.Tensor, spec: RouterSpec, params: MarkerParams, bias: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """All per-token markers of one layer, each [T, E]; summing them over tokens gives :class:`RoutingSums`.
    Zero-computation experts (router slots past the routed experts) are routed to but not scored."""
    E, S = spec.num_experts, spec.width
    indices, weights = route(logits, spec, k=params.k, bias=bias)
    probs, _ = gate_scores(logits, spec, bias)
    return {
        "tcess": tcess_marker(indices, weights, S, params.r)[:, :E],
        "count": selection_marker(indices, S)[:, :E],
        "official": official_marker(logits, params.official_k, params.official_r)[:, :E],
        "prob": probs[:, :E],
    }


@dataclass
class RoutingSums:
    """Per-expert sums over calibration tokens, [L, E] float64 each, plus the token count."""

    sums: dict[str, torch.Tensor]
    tokens: int = 0
    ranked: dict[str, torch.Tensor] = field(default_factory=dict)  # [L, E] statistics that are not sums (recon)

    @classmethod
    def zeros(
        cls, num_layers: int, num_experts: int, device: torch.device | None = None, names=tuple(SUM_NAMES)
    ) -> "RoutingSums":
        return cls({n: torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device) for n in names})

    def add(self, layer: int, markers: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> None:
        for name, m in markers.items():
            if mask is not None:
                m = m[mask]
            acc = self.sums[name]
            acc[layer] += m.sum(dim=0, dtype=torch.float64).to(acc.device)  # layers may sit on other devices

    def means(self) -> dict[str, torch.Tensor]:
        n = max(self.tokens, 1)
        return {
            **{name: (s / n).float().cpu() for name, s in self.sums.items()},
            **{name: s.float().cpu() for name, s in self.ranked.items()},
        }


@dataclass(frozen=True)
class Scorer:
    name: str
    help: str
    needs: tuple[str, ...] = ()  # calibration means it reads
    needs_model: bool = True  # runs the model on calibration data


SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in [
        Scorer("tcess", "task-conditioned expected selection score (default)", ("tcess",)),
        Scorer("official", "PreMoe reference code: top-1 raw-logit marker (can invert rankings)", ("official",)),
        Scorer("frequency", "routing frequency: share of tokens that choose the expert", ("count",)),
        Scorer("reap", "REAP: mean over routed tokens of routing weight x expert output norm", ("reap", "count")),
        Scorer("ean", "EAN/MAN: mean expert output norm over the tokens routed to it", ("ean", "count")),
        Scorer("easyep", "EASY-EP: routing weight x output norm x (1 - cos(x, x + r)), summed", ("easyep",)),
        Scorer("recon", "greedy elimination by the pruned block's output error under re-routing", ("recon",)),
        Scorer("weights", "AIMER-style, calibration-free: RMS / mean|w| of the expert's weights", ("weights",), False),
        Scorer("random", "seeded random scores (baseline)", (), False),
    ]
}
OUTPUT_SCORERS = {"reap", "ean", "easyep", "recon"}


def score(name: str, means: dict[str, torch.Tensor] | None, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """[L, E] importance scores of scorer ``name`` from calibration means (higher = keep).

    Raises:
        ValueError: unknown scorer, or the means lack what it needs.
    """
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    if name == "random":
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    means = means or {}
    missing = [k for k in SCORERS[name].needs if k not in means]
    if missing:
        raise ValueError(
            f"scorer {name!r} needs calibration statistics {missing}; recalibrate with `scorer='{name}'` or "
            "`all_stats=True`"
        )
    if name in ("reap", "ean"):
        count = means["count"].float()
        return torch.where(count > 0, means[name].float() / count.clamp_min(1e-30), torch.zeros_like(count))
    return means[SCORERS[name].needs[0]].float().clone()


def pool_means(parts: list[tuple[dict[str, torch.Tensor], int]]) -> tuple[dict[str, torch.Tensor], int]:
    """Token-weighted pooling of several calibrations' means: exactly the means one calibration over
    all their samples would give (every statistic is a sum over tokens; ``weights`` is data-free),
    except ``recon``, a ranking, which pools to the rankings' token-weighted mean (a Borda count)."""
    total = sum(tokens for _, tokens in parts)
    keys = set.intersection(*(set(m) for m, _ in parts)) if parts else set()
    pooled = {k: sum(m[k].double() * tokens for m, tokens in parts) / max(total, 1) for k in keys}
    return {k: v.float() for k, v in pooled.items()}, total
