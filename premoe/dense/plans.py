"""From activation statistics to a structured plan: which heads and FFN channels each layer keeps.

Methods (rows of :data:`METHODS`; each is a scoring metric, a layer allocation and a calibration source):

- ``seap``: the task's own statistics, s_F scores, SEAP's logistic layer schedule or uniform counts.
- ``seap-gen``: the same on the equal-weight pool of every task in the store.
- ``wanda-sp``: pooled (general) statistics, Wanda-sp scores (activation RMS x mean |w|), uniform.
- ``flap``: pooled statistics, fluctuation scores standardised per layer and module, FLAP's adaptive
  global structure and its bias compensation.
- ``random``: uniform random choice (a floor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from premoe.dense.model import DenseInfo, DensePlan, check_plan, kept_params
from premoe.dense.options import SCHEDULES
from premoe.dense.scoring import (
    attention_units,
    channel_scores,
    head_perturbation,
    head_scores,
    logistic_shape,
    perturbation,
    round_half_up,
    scale_schedule,
    standardize,
    unit_cost,
)
from premoe.errors import InputError


@dataclass(frozen=True)
class Method:
    metric: str
    schedule: str  # uniform | logistic | adaptive
    source: str  # task | pooled
    bias_comp: bool = False
    standardized: bool = False
    about: str = ""


METHODS: dict[str, Method] = {
    "seap": Method("sf", "uniform", "task", about="SEAP: the task's own statistics"),
    "seap-gen": Method("sf", "uniform", "pooled", about="SEAP-gen: every task's statistics pooled with equal weights"),
    "wanda-sp": Method("sw", "uniform", "pooled", about="Wanda-sp: RMS x mean |w|, uniform"),
    "flap": Method(
        "sf",
        "adaptive",
        "pooled",
        bias_comp=True,
        standardized=True,
        about="FLAP: standardised fluctuation, adaptive structure, bias compensation",
    ),
    "random": Method("sf", "uniform", "pooled", about="random heads and channels"),
}


def check_sparsity(sparsity: float) -> float:
    if not (0 <= sparsity < 1):
        raise InputError(f"`sparsity` must be in [0, 1), got {sparsity}")
    return float(sparsity)


def make_dense_plan(
    info: DenseInfo,
    stats: dict[str, torch.Tensor],
    method: str,
    sparsity: float,
    *,
    schedule: str | None = None,
    metric: str | None = None,
    whole_groups: bool = False,
    bias_comp: bool | None = None,
    weights: Callable[[int, str], torch.Tensor] | None = None,
    seed: int = 0,
    task: str = "",
    written: bool = False,
) -> DensePlan:
    """The heads and channels to keep for ``sparsity`` (the fraction of decoder linear weights removed).

    Args:
        stats: a task's (or pooled) statistics, see :mod:`premoe.dense.scoring`.
        schedule: ``uniform`` (same counts in every layer: a vanilla transformers checkpoint),
            ``logistic`` (SEAP's depth schedule) or ``adaptive`` (FLAP's global ranking); default: the method's.
        whole_groups: remove whole KV groups instead of the same number of query heads per group.
        weights: ``(layer, "o"|"down") -> [D, C]`` weight, needed for bias compensation.
        written: count ``sparsity`` in the checkpoint as written (what ``premoe prune`` does): a plan
            whose layers differ is exported zero-padded to its largest layer, so it removes more in
            memory than it does on disk; with ``written`` such a plan is made sparser in memory until
            its padded checkpoint removes ``sparsity``. Uniform plans are the same either way.
    """

    def build(target: float) -> DensePlan:
        return _make_plan(info, stats, method, target, schedule, metric, whole_groups, bias_comp, weights, seed, task)

    plan = build(sparsity)
    if written and not plan.uniform() and plan.info["sparsity_written"] < sparsity - 1e-3:
        plan = _sparser_in_memory(plan, sparsity, build)
    if plan.info["bias_comp"]:  # once, on the chosen plan: it reads every layer's o_proj/down_proj
        if weights is None:
            raise InputError("bias compensation needs the model's weights")
        plan.bias = compensation(info, plan, stats, weights)
    return plan


def _sparser_in_memory(plan: DensePlan, sparsity: float, build: Callable[[float], DensePlan]) -> DensePlan:
    """The least sparse plan (in memory) whose zero-padded checkpoint removes ``sparsity``: the
    padded count grows with the in-memory target, so the target is bisected."""
    lo, hi, best = sparsity, 0.99, plan
    for _ in range(14):
        mid = (lo + hi) / 2
        try:
            cand = build(mid)
        except InputError:
            hi = mid
            continue
        if cand.info["sparsity_written"] >= sparsity - 1e-3:
            hi, best = mid, cand
        else:
            lo = mid
    if best.info["sparsity_written"] < sparsity - 0.02:
        raise InputError(
            f"a {best.info['schedule']} plan cannot be written at sparsity {sparsity} (padded, at most "
            f"{best.info['sparsity_written']:.3f}); lower `sparsity` or use `schedule='uniform'`"
        )
    best.info["sparsity_requested"] = sparsity
    return best


def _make_plan(
    info, stats, method, sparsity, schedule, metric, whole_groups, bias_comp, weights, seed, task
) -> DensePlan:
    """The plan's structure (no compensation biases yet: :func:`make_dense_plan` adds them once)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    m = METHODS[method]
    check_sparsity(sparsity)
    schedule = schedule or m.schedule
    if schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    bias_comp = m.bias_comp if bias_comp is None else bias_comp
    L, d, G = info.num_layers, info.head_dim, info.kv_heads
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        ch_o, ch_down = torch.rand(L, info.heads * d, generator=gen), torch.rand(L, info.intermediate, generator=gen)
    else:
        ch_o, ch_down = (
            channel_scores(stats, "o", metric or m.metric),
            channel_scores(stats, "down", metric or m.metric),
        )
    if m.standardized:
        heads = head_scores(standardize(ch_o), d) / d
        ch_down = standardize(ch_down)
    else:
        heads = head_scores(ch_o, d)
    units = [attention_units(heads[l], G, whole_groups) for l in range(L)]
    allowed = _allowed_units(info, units[0])
    if schedule == "adaptive":
        n_units, n_ch = _adaptive(info, units, ch_down, sparsity, allowed)
    elif schedule == "uniform" and method != "random" and "o.sq" in stats:  # random: the fixed-ratio split
        pert_heads = head_perturbation(stats, d, bias_comp, weights)
        n_units, n_ch = _uniform(
            info, units, ch_down, pert_heads, perturbation(stats, "down", bias_comp), sparsity, allowed
        )
    else:
        shape = torch.ones(L) if schedule == "uniform" else logistic_shape(L)
        n_units, n_ch = _allocate(info, units, shape, sparsity, allowed)
    plan_heads, plan_kv, plan_ch = {}, {}, {}
    for l in range(L):
        kept = units[l][: n_units[l]]
        plan_heads[l] = sorted(h for u in kept for h in u[1])
        plan_kv[l] = sorted({h // info.group for h in plan_heads[l]})
        plan_ch[l] = sorted(torch.topk(ch_down[l], n_ch[l]).indices.tolist())
    plan = DensePlan(plan_heads, plan_kv, plan_ch, method=method, task=task)
    check_plan(info, plan)
    total = kept_params(info, None)
    counted = 1 - kept_params(info, plan) / total
    if counted < sparsity - 0.02 and schedule != "adaptive":
        raise InputError(
            f"sparsity {sparsity} would remove every attention head or FFN channel of a layer (at most {counted:.3f} "
            "can be removed while each layer keeps one valid head group and one channel); lower `sparsity`"
        )
    plan.info = {
        "sparsity_requested": sparsity,
        "sparsity": round(1 - kept_params(info, plan) / total, 6),
        "sparsity_written": round(1 - kept_params(info, plan, padded=not plan.uniform()) / total, 6),
        "schedule": schedule,
        "metric": "random" if method == "random" else (metric or m.metric),
        "gqa": "groups" if whole_groups or info.group == 1 else "heads",
        "bias_comp": bool(bias_comp),
    }
    return plan


def _allowed_units(info: DenseInfo, units) -> list[int]:
    """Kept attention-unit counts whose head/KV-head counts transformers' config accepts (Llama-style
    configs require the hidden size to be a multiple of the head count)."""
    from premoe.dense.model import valid_counts

    ok = []
    for n in range(1, len(units) + 1):
        heads = sum(len(u[1]) for u in units[:n])
        kv = len({h // info.group for u in units[:n] for h in u[1]})
        if valid_counts(info, heads, kv):
            ok.append(n)
    if not ok:
        raise InputError(f"no kept head count of {info.spec.name} passes transformers' config checks")
    return ok


def _snap(n: int, allowed: list[int]) -> int:
    """The allowed count nearest to ``n`` (the larger on a tie)."""
    return min(allowed, key=lambda a: (abs(a - n), -a))


def _layer_counts(info: DenseInfo, units, rho: float, allowed: list[int]) -> tuple[int, int]:
    """(kept units, kept channels) of one layer removing ``rho`` of its weights: attention units at
    the same ratio (snapped to a valid count), FFN channels absorbing the rounding."""
    D, d = info.hidden, info.head_dim
    U = len(units)
    keep_units = _snap(U - min(U - 1, round_half_up(rho * U)), allowed)
    attn_removed = sum(unit_cost(D, d, u) for u in units[keep_units:])
    r_c = round_half_up((rho * info.layer_params() - attn_removed) / (3 * D))
    return keep_units, info.intermediate - min(max(r_c, 0), info.intermediate - 1)


def _uniform(
    info: DenseInfo,
    units,
    ch_down: torch.Tensor,
    pert_heads: torch.Tensor,
    pert_ch: torch.Tensor,
    sparsity: float,
    allowed: list[int],
) -> tuple[list[int], list[int]]:
    """The same counts in every layer (what one transformers config says): of the allowed attention
    unit counts, the one whose removal, with the FFN channels taking the rest of the budget, removes
    the least expected output perturbation (:func:`~premoe.dense.scoring.perturbation`, summed over
    layers). A fixed ratio would force the same share on heads and channels; with few heads (8
    query heads over 4 KV groups allow keeping 4 or 8) that removes half the heads of every layer."""
    D, d, L, inter = info.hidden, info.head_dim, info.num_layers, info.intermediate
    total = info.layer_params() * L
    order = ch_down.argsort(dim=1, descending=True)  # [L, I] channels best first (the method's ranking)
    ch_cost = torch.gather(pert_ch.double(), 1, order).flip(1).cumsum(1)  # [L, I] cost of removing the r worst
    best = None
    for u in allowed:
        attn_removed = sum(unit_cost(D, d, x) for l in range(L) for x in units[l][u:])
        r_c = round_half_up((sparsity * total - attn_removed) / (3 * D * L))
        if r_c < 0 or r_c > inter - 1:
            continue
        counted = (attn_removed + 3 * D * L * r_c) / total
        if abs(counted - sparsity) > 0.02 and sparsity > 0:
            continue
        cost = sum(float(pert_heads[l, h]) for l in range(L) for x in units[l][u:] for h in x[1])
        cost += float(ch_cost[:, r_c - 1].sum()) if r_c > 0 else 0.0
        if best is None or cost < best[0]:
            best = (cost, u, inter - r_c)
    if best is None:  # nothing meets the sparsity within 2 points: the closest the fixed-ratio split gets
        return _allocate(info, units, torch.ones(L), sparsity, allowed)
    return [best[1]] * L, [best[2]] * L


def _allocate(
    info: DenseInfo, units, shape: torch.Tensor, sparsity: float, allowed: list[int]
) -> tuple[list[int], list[int]]:
    """Per-layer counts whose removed weights, as counted, come closest to ``sparsity``: the schedule's
    scale is searched (bisection) on the real counts, not on the nominal ratios."""
    D, d = info.hidden, info.head_dim
    total = info.layer_params() * info.num_layers

    def counts(target: float):
        rho = scale_schedule(shape, target) if bool((shape != 1).any()) else torch.full_like(shape, target)
        cs = [_layer_counts(info, units[l], float(rho[l]), allowed) for l in range(info.num_layers)]
        kept = sum(
            sum(unit_cost(D, d, u) for u in units[l][:nu])
            + (info.layer_params() - sum(unit_cost(D, d, u) for u in units[l]))
            - 3 * D * info.intermediate
            + 3 * D * nc
            for l, (nu, nc) in enumerate(cs)
        )
        return cs, 1 - kept / total

    best = counts(sparsity)
    if sparsity > 0:
        lo, hi = 0.0, 0.999
        for _ in range(40):
            mid = (lo + hi) / 2
            try:
                cs, got = counts(mid)
            except InputError:
                hi = mid
                continue
            if abs(got - sparsity) < abs(best[1] - sparsity):
                best = (cs, got)
            if got < sparsity:
                lo = mid
            else:
                hi = mid
    return [c[0] for c in best[0]], [c[1] for c in best[0]]


def _adaptive(
    info: DenseInfo, units, ch_down: torch.Tensor, sparsity: float, allowed: list[int]
) -> tuple[list[int], list[int]]:
    """FLAP's adaptive structure: every unit of every layer in one list by standardised score; keep
    the best until (1 - sparsity) of the decoder weights is kept. Attention counts are then snapped
    to valid head counts and the FFN channels are re-chosen globally to fill the remaining budget."""
    D, d = info.hidden, info.head_dim
    items = []
    for l, us in enumerate(units):
        for u in us:
            items.append((u[0] / len(u[1]), l, "a", unit_cost(D, d, u)))
        items.extend((float(v), l, "c", 3 * D) for v in ch_down[l].tolist())
    items.sort(key=lambda t: -t[0])
    budget = (1 - sparsity) * info.layer_params() * info.num_layers
    n_units = [0] * info.num_layers
    kept = 0.0
    for _score, l, kind, cost in items:
        if kept + cost / 2 > budget:
            break
        kept += cost
        if kind == "a":
            n_units[l] += 1
    n_units = [_snap(max(1, n), allowed) for n in n_units]
    fixed = sum(
        info.layer_params() - 3 * D * info.intermediate - sum(unit_cost(D, d, u) for u in us[n:])
        for us, n in zip(units, n_units)
    )
    channels = int(max(budget - fixed, 0) // (3 * D))
    n_ch = [1] * info.num_layers  # every layer keeps a channel; the rest by global rank
    order = ch_down.flatten().argsort(descending=True).tolist()
    left = channels - info.num_layers
    for flat in order:
        if left <= 0:
            break
        l = flat // ch_down.shape[1]
        if n_ch[l] < ch_down.shape[1]:
            n_ch[l] += 1
            left -= 1
    return n_units, n_ch


def compensation(
    info: DenseInfo, plan: DensePlan, stats: dict[str, torch.Tensor], weights: Callable[[int, str], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """FLAP's bias compensation: what the removed inputs contributed on average, W[:, removed] @ mean[removed]."""
    d = info.head_dim
    out = {}
    for l in range(info.num_layers):
        kept_cols = {"o": {h * d + j for h in plan.heads[l] for j in range(d)}, "down": set(plan.channels[l])}
        for site, width in (("o", info.heads * d), ("down", info.intermediate)):
            removed = [c for c in range(width) if c not in kept_cols[site]]
            if removed:
                w = weights(l, site).float()
                idx = torch.tensor(removed)
                out[f"{l}.{site}"] = w[:, idx] @ stats[f"{site}.mean"][l, idx].float()
    return out
