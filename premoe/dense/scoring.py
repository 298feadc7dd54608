"""Pure tensor functions of structured pruning: channel and head scores, pooled statistics, layer
schedules and the units heads are removed in. No hooks, no I/O.

Statistics per layer and site (``o``: input of ``o_proj`` = concatenated head outputs, [L, H*d];
``down``: input of ``down_proj`` = FFN channels, [L, I]): ``mean``, ``sq`` (E[x^2]), ``var``; weight
column statistics ``w.<site>.l2sq`` (squared L2 norm) and ``w.<site>.l1mean`` (mean |w|).
"""

from __future__ import annotations

import math

import torch

from premoe.errors import InputError

# name -> (statistic, weight statistic, combine)
METRICS = {
    "sf": "variance x squared column L2 norm (SEAP s_F, FLAP's fluctuation WIFV)",
    "sw": "activation RMS x mean |column| (s_W as Wanda-sp's original code computes it)",
    "sw-paper": "mean square x column L1 norm (s_W as SEAP's paper states it, eq. 12)",
    "sw-code": "activation RMS x squared column L2 norm (s_W as SEAP's code computes it)",
}


def channel_scores(means: dict[str, torch.Tensor], site: str, metric: str) -> torch.Tensor:
    """[L, C] importance of every input channel of ``site`` (``o`` or ``down``)."""
    if metric == "sf":
        return means[f"{site}.var"] * means[f"w.{site}.l2sq"]
    if metric == "sw":
        return means[f"{site}.sq"].clamp_min(0).sqrt() * means[f"w.{site}.l1mean"]
    if metric == "sw-paper":  # the L1 norm is D x the mean |w|: the same ranking
        return means[f"{site}.sq"].clamp_min(0) * means[f"w.{site}.l1mean"]
    if metric == "sw-code":
        return means[f"{site}.sq"].clamp_min(0).sqrt() * means[f"w.{site}.l2sq"]
    raise InputError(f"unknown score {metric!r}; choose one of {', '.join(METRICS)}")


def perturbation(means: dict[str, torch.Tensor], site: str, compensated: bool) -> torch.Tensor:
    """[L, C] expected squared change of the layer's output (a vector in the residual stream) when input
    channel ``c`` of ``site`` is removed, diagonal approximation: E[x^2] ||w||^2, or Var[x] ||w||^2
    when the removed mean is compensated by a bias. Heads and FFN channels land in the same stream,
    so these compare across the two (what the uniform allocation weighs)."""
    x = means[f"{site}.var"] if compensated else means[f"{site}.sq"]
    return x.clamp_min(0) * means[f"w.{site}.l2sq"]


def head_perturbation(means: dict[str, torch.Tensor], head_dim: int, compensated: bool, weight=None) -> torch.Tensor:
    """[L, H] expected squared change of the layer's output when query head ``h`` is removed.

    Exact per head when calibration recorded ``o.head_sq`` (E||W_h x_h||^2; with compensation the
    removed mean output ||W_h E[x_h]||^2 is subtracted, which needs ``weight(layer, "o")``); stores
    from before fall back to the diagonal sum over the head's channels (:func:`perturbation`), which
    ignores the correlation between them (4 to 6x too low on the shipped dense model)."""
    if "o.head_sq" not in means or (compensated and weight is None):
        return head_scores(perturbation(means, "o", compensated), head_dim)
    energy = means["o.head_sq"].double()
    if compensated:
        L, H = energy.shape
        mu = means["o.mean"].double()
        for l in range(L):
            w = weight(l, "o").double().reshape(-1, H, head_dim)  # [D, H, d]
            out = torch.einsum("Dhd,hd->hD", w, mu[l].reshape(H, head_dim))
            energy[l] = energy[l] - (out * out).sum(-1)
    return energy.clamp_min(0).float()


def head_scores(channels: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[L, H*d] channel scores -> [L, H] head scores (sum over the head's channels, SEAP eq. 13)."""
    return channels.reshape(channels.shape[0], -1, head_dim).sum(-1)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-row z-score (FLAP compares layers and modules on one scale)."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp_min(1e-12)


def pooled(stats: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Statistics of the equal-weight mixture of several tasks' token distributions: every task
    counts the same however many tokens its corpus has (a long-text corpus does not dominate)."""
    if not stats:
        raise InputError("no task statistics to pool")
    out = {k: v for k, v in stats[0].items() if k.startswith("w.")}
    for site in ("o", "down"):
        mean = torch.stack([s[f"{site}.mean"].double() for s in stats]).mean(0)
        sq = torch.stack([s[f"{site}.sq"].double() for s in stats]).mean(0)
        out[f"{site}.mean"], out[f"{site}.sq"] = mean.float(), sq.float()
        out[f"{site}.var"] = (sq - mean * mean).clamp_min(0).float()
    if all("o.head_sq" in s for s in stats):  # E||W_h x_h||^2 of the mixture: the mean of the tasks'
        out["o.head_sq"] = torch.stack([s["o.head_sq"].double() for s in stats]).mean(0).float()
    return out


def logistic_shape(
    num_layers: int, k: float = 1.0, x0: float = 0.3, protect: tuple[int, int] | None = None
) -> torch.Tensor:
    """[L] relative layer sparsities of SEAP's logistic schedule (eqs. 16-17): 1/(1+exp(-k(x-x0)))
    over the unprotected layers (x from 0 to 1), 0 on the first and last ``protect`` layers
    (default: max(1, round(L/16)) each, 2+2 for 32 layers as in SEAP's code)."""
    m = n = max(1, round(num_layers / 16)) if protect is None else None
    if protect is not None:
        m, n = protect
    active = num_layers - m - n
    if active < 1:
        raise InputError(
            f"a logistic schedule over {num_layers} layers leaves no layer to prune; use `schedule='uniform'`"
        )
    x = torch.linspace(0, 1, active) if active > 1 else torch.zeros(1)
    shape = torch.zeros(num_layers)
    shape[m : m + active] = 1 / (1 + torch.exp(-k * (x - x0)))
    return shape


def scale_schedule(shape: torch.Tensor, target: float, cap: float = 0.95) -> torch.Tensor:
    """Layer sparsities ``lam * shape`` (each at most ``cap``) whose mean is ``target``; bisection."""
    if target == 0:
        return torch.zeros_like(shape)
    if (shape.clamp(max=1) > 0).float().mean() * cap < target:
        raise InputError(
            f"sparsity {target} is not reachable with this layer schedule (protected layers); lower it "
            "or use `schedule='uniform'`"
        )
    lo, hi = 0.0, cap / max(float(shape[shape > 0].min()), 1e-9)
    for _ in range(100):
        lam = (lo + hi) / 2
        if float((lam * shape).clamp(max=cap).mean()) < target:
            lo = lam
        else:
            hi = lam
    return (hi * shape).clamp(max=cap)


def attention_units(heads: torch.Tensor, kv_heads: int, whole_groups: bool) -> list[tuple[float, list[int], list[int]]]:
    """A layer's removable attention units, best first: (score, query heads, KV heads they take).

    With query groups of g > 1 heads (GQA) and ``whole_groups`` off, unit r holds the r-th best
    query head of every KV group, so any number of kept units leaves every group the same number
    of query heads (what transformers' ``num_key_value_groups`` needs) and every KV head in use.
    Otherwise (MHA, or ``whole_groups``) a unit is one KV group with all its query heads.
    """
    H = heads.numel()
    g = H // kv_heads
    if g == 1 or whole_groups:
        units = [
            (float(heads[j * g : (j + 1) * g].sum()), list(range(j * g, (j + 1) * g)), [j]) for j in range(kv_heads)
        ]
        return sorted(units, key=lambda u: -u[0])
    ranked = [sorted(range(j * g, (j + 1) * g), key=lambda h: -float(heads[h])) for j in range(kv_heads)]
    return [(float(sum(heads[r[i]] for r in ranked)), [r[i] for r in ranked], []) for i in range(g)]


def unit_cost(hidden: int, head_dim: int, unit: tuple[float, list[int], list[int]]) -> int:
    """Decoder weights a unit holds: q rows and o columns of its heads, k/v rows of its KV heads."""
    return hidden * head_dim * (2 * len(unit[1]) + 2 * len(unit[2]))


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))
