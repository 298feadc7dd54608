"""Compensation for removed experts, compared side by side in ``premoe sweep --compensate``.

Each method changes only values of a pruned model built in memory (same architecture, expert count
and router, so a vanilla load still works), from the dense model's layers and each MoE layer's
captured calibration tokens (:func:`premoe.moe.refit.capture`):

* ``refit``: the kept experts' down projections re-fitted by least squares under re-routing
  (:func:`premoe.moe.refit.refit_pruned_`);
* ``scale``: one least-squares output scale per kept expert under re-routing (a one-parameter
  special case of ``refit``, ridge toward 1);
* ``merge``: every removed expert folded into its closest kept expert, weights averaged with the
  experts' routed-token counts as weights (HC-SMoE / MC-SMoE style frequency-weighted merging);
  closest: the highest cosine similarity of the two experts' outputs on the calibration tokens;
* ``merge+refit``: merging, then the re-fit of the merged experts;
* ``router``: the kept experts' router rows re-fitted so the re-routed block output matches the
  dense one (:func:`premoe.moe.refit.router_delta`), experts unchanged;
* ``refit+router``: the down-projection re-fit, then the router re-fit with the re-fitted experts
  (what ``premoe prune`` applies by default).

All of them need the dense experts of the layer (the model in memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from premoe.moe.arch import MoeLayer, RouterSpec, find_moe_layers
from premoe.moe.refit import (
    LAM,
    check_supported,
    dense_output,
    down_weight,
    expert_hidden,
    expert_out,
    pruned_routing,
    refit_pruned_,
    rerouted,
    routed_out,
    router_delta,
    router_weight_path,
)
from premoe.moe.routing import route

MERGE_TOKENS = 1024  # tokens per layer whose expert outputs decide which kept expert is closest


def _pairs(dense_layers: Sequence[MoeLayer], net: nn.Module, arch, spec: RouterSpec):
    for dense, pruned in zip(dense_layers, find_moe_layers(net, arch)):
        check_supported(dense.experts, spec, arch.weight_on_input, arch.name)
        yield dense, pruned


@torch.inference_mode()
def scale_layer(
    layer: MoeLayer,
    h: torch.Tensor,
    logits: torch.Tensor,
    kept: Sequence[int],
    spec: RouterSpec,
    pruned: RouterSpec,
    lam: float = LAM,
    target: torch.Tensor | None = None,
) -> dict[int, float]:
    """Per kept expert, the output scale minimising the re-routed block's squared error against the dense
    block on these tokens (ridge ``lam`` x the mean diagonal, toward 1)."""
    experts = layer.experts
    kept = sorted(kept)
    x = h.to(experts.down_proj.device, torch.float32)
    y = dense_output(layer, x, logits, spec) if target is None else target.to(x.device, torch.float64)
    sel = rerouted(experts, x, logits, kept, pruned, layer.selection_bias())
    cols = []
    for p in range(len(kept)):
        col = torch.zeros_like(y)
        if p in sel:
            rows, a, wt = sel[p]
            col.index_add_(0, rows, routed_out(experts, kept[p], a.double(), wt))
        cols.append(col.reshape(-1))
    A = torch.stack(cols, 1)  # [T*D, N]
    g = A.T @ A
    s = lam * float(g.diagonal().mean().clamp_min(1e-30))
    alpha = torch.linalg.solve(g + s * torch.eye(len(kept), dtype=g.dtype), A.T @ y.reshape(-1) + s)
    return {e: float(alpha[p]) for p, e in enumerate(kept)}


def scale_pruned_(net: nn.Module, arch, plan, dense_layers: Sequence[MoeLayer], captured, spec: RouterSpec) -> int:
    """Scale each kept expert's down projection (and bias) of ``net`` by :func:`scale_layer`."""
    changed = 0
    for pos, (dense, pruned) in enumerate(_pairs(dense_layers, net, arch, spec)):
        kept = sorted(plan.kept[dense.index])
        if len(kept) >= spec.num_experts:
            continue
        h, z, y = captured[pos]
        alpha = scale_layer(dense, h, z, kept, spec, pruned_routing(spec, plan), target=y)
        with torch.no_grad():
            for p, e in enumerate(kept):
                pruned.experts.down_proj[p].mul_(alpha[e])
                if pruned.experts.has_bias:
                    pruned.experts.down_proj_bias[p].mul_(alpha[e])
        changed += 1
    return changed


@torch.inference_mode()
def merge_groups(
    layer: MoeLayer,
    h: torch.Tensor,
    logits: torch.Tensor,
    kept: Sequence[int],
    spec: RouterSpec,
    tokens: int = MERGE_TOKENS,
) -> tuple[dict[int, list[int]], torch.Tensor]:
    """Which removed experts fold into which kept one ({kept: [removed...]}), by the cosine similarity of
    their outputs on the first ``tokens`` tokens, and every expert's routed-token count (the weights)."""
    experts = layer.experts
    x = h[:tokens].to(experts.down_proj.device, torch.float32)
    idx, _ = route(logits.to(x.device), spec, bias=layer.selection_bias(), scaled=True)
    freq = torch.bincount(idx.reshape(-1).cpu(), minlength=spec.num_experts)[: spec.num_experts].double()
    outs = torch.stack(
        [
            expert_out(experts, e, expert_hidden(experts, e, x), down_weight(experts, e).float()).reshape(-1)
            for e in range(spec.num_experts)
        ]
    )
    outs = torch.nn.functional.normalize(outs, dim=1)
    kept = sorted(kept)
    sim = outs @ outs[kept].T  # [E, N]
    groups: dict[int, list[int]] = {e: [] for e in kept}
    for r in sorted(set(range(spec.num_experts)) - set(kept)):
        groups[kept[int(sim[r].argmax())]].append(r)
    return groups, freq


def merge_pruned_(net: nn.Module, arch, plan, dense_layers: Sequence[MoeLayer], captured, spec: RouterSpec) -> int:
    """Fold every removed expert of ``net``'s layers into its closest kept one (frequency-weighted average of
    every expert tensor: gate/up and down projections and their biases). Router rows are kept as they are."""
    changed = 0
    for pos, (dense, pruned) in enumerate(_pairs(dense_layers, net, arch, spec)):
        kept = sorted(plan.kept[dense.index])
        if len(kept) >= spec.num_experts:
            continue
        groups, freq = merge_groups(dense, *captured[pos][:2], kept, spec)
        names = [n for n, _ in pruned.experts.named_parameters(recurse=False)]
        with torch.no_grad():
            for p, e in enumerate(kept):
                members = [e, *groups[e]]
                wts = freq[members] + 1e-6  # an expert no token chose still counts a little
                wts = wts / wts.sum()
                for n in names:
                    src = getattr(dense.experts, n)
                    merged = sum(float(wt) * src[m].double() for wt, m in zip(wts, members))
                    getattr(pruned.experts, n)[p].copy_(merged.to(src.dtype))
        changed += 1
    return changed


def merge_refit_(net, arch, plan, dense_layers, captured, spec) -> int:
    """Merging, then the least-squares re-fit of the merged experts' down projections (toward the dense
    block's output, starting from the merged weights)."""
    merge_pruned_(net, arch, plan, dense_layers, captured, spec)
    return refit_pruned_(net, arch, plan, dense_layers, captured, spec, from_pruned=True)


def router_pruned_(net: nn.Module, arch, plan, dense_layers: Sequence[MoeLayer], captured, spec: RouterSpec) -> int:
    """Re-fit the kept experts' router rows of ``net`` (:func:`premoe.moe.refit.router_delta`), its
    experts as they are."""
    changed = 0
    for pos, (dense, pruned) in enumerate(_pairs(dense_layers, net, arch, spec)):
        kept = sorted(plan.kept[dense.index])
        path = router_weight_path(pruned)
        if len(kept) >= spec.num_experts or path is None:
            continue
        h, z, y = captured[pos]
        target = dense_output(dense, h.float(), z, spec) if y is None else y
        down = {e: down_weight(pruned.experts, p).float() for p, e in enumerate(kept)}
        delta = router_delta(
            dense.experts, kept, h, z, pruned_routing(spec, plan), dense.selection_bias(), target, down
        )
        with torch.no_grad():
            w = pruned.tensor(path)
            w.add_(delta.to(w.dtype))
        changed += 1
    return changed


def refit_router_(net, arch, plan, dense_layers, captured, spec) -> int:
    """The down-projection re-fit, then the router re-fit with the re-fitted experts."""
    refit_pruned_(net, arch, plan, dense_layers, captured, spec)
    return router_pruned_(net, arch, plan, dense_layers, captured, spec)


COMPENSATIONS: dict[str, Callable] = {
    "router": router_pruned_,
    "refit+router": refit_router_,
    "refit": refit_pruned_,
    "scale": scale_pruned_,
    "merge": merge_pruned_,
    "merge+refit": merge_refit_,
}
