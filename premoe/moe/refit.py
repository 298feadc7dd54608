"""Least-squares re-fit of the kept experts' down projections under re-routing (MoE ``--refit``).

After pruning, every token is re-routed to its best surviving experts with renormalised weights, so
the block's output drifts from the dense block's. On a task's calibration tokens (the dense model's
MoE-block inputs and router logits), the kept experts' ``down_proj`` are re-fitted so the re-routed
output matches the dense one:

    min_W  sum_t || y_dense(t) - sum_{e in sel(t)} w_te W_e h_e(t) ||^2 + lam * s * sum_e ||W_e - W0_e||^2

(``h_e``: expert e's intermediate activation; ``s``: the mean diagonal of the experts' Gram matrices,
so ``lam`` is scale-free). The experts are coupled through tokens routed to several of them, so the
problem is solved by block Gauss-Seidel in token space: one ``[I, I]`` system per kept expert and
sweep, the other experts held, the residual updated after each. The ridge pulls toward the original
weights, so a rarely routed expert barely moves; a layer that keeps every expert is left exactly as
it is. Only values change (same architecture, expert count and router): a vanilla load still works.

Supports experts in transformers' fused experts interface (``gate_up_proj``/``down_proj``, with or
without gate, transposed or not), routers whose weight scales the expert's output, and no
zero-computation experts; other layouts are refused in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.arch import MoeLayer, RouterSpec
from premoe.moe.kernels import slot_outputs
from premoe.moe.routing import route

LAM = 1e-2  # ridge toward the original weights, times the mean diagonal of the experts' Gram matrices
SWEEPS = 3  # block Gauss-Seidel sweeps (3 matched the joint solve on the shipped model)
TOKENS = 4096  # calibration tokens per layer the re-fit uses


def check_supported(experts: nn.Module | None, spec: RouterSpec, weight_on_input: bool, family: str) -> None:
    if experts is None or not hasattr(experts, "has_gate") or weight_on_input or spec.slots:
        raise UnsupportedModelError(
            f"`refit` re-fits experts in transformers' fused experts interface routed by output weight; {family}'s "
            "experts are laid out otherwise; use `refit=False`"
        )


def expert_hidden(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s intermediate activation [N, I] (what its down projection takes)."""
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    up_w = getattr(experts, up_name)[e].to(x.dtype)
    h = x @ up_w if experts.is_transposed else F.linear(x, up_w)
    if experts.has_bias:
        h = h + getattr(experts, f"{up_name}_bias")[e].to(x.dtype)
    return experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


def down_weight(experts: nn.Module, e: int) -> torch.Tensor:
    """Expert ``e``'s down projection as [D, I] (a view)."""
    w = experts.down_proj[e]
    return w.T if experts.is_transposed else w


def expert_out(experts: nn.Module, e: int, a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s output from its activation ``a`` and down weight ``w`` [D, I] (its bias added)."""
    y = a @ w.T
    if experts.has_bias:
        y = y + experts.down_proj_bias[e].to(y.dtype)
    return y


def capture(
    model: nn.Module,
    layers: Sequence[MoeLayer],
    spec: RouterSpec,
    tok,
    texts: Iterable[str],
    max_tokens: int,
    max_length: int = 2048,
    joined: bool = True,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per MoE layer: (block input [T, D], router logits [T, S], routed experts' output [T, D] or ``None``
    where the layer has no experts module) of up to ``max_tokens`` real tokens (texts cut at ``max_length``).
    ``joined=False``: per layer the three lists of per-text blocks as recorded (a data-parallel rank's share,
    possibly empty)."""
    got: list[tuple[list, list, list]] = [([], [], []) for _ in layers]
    mask: dict[str, torch.Tensor] = {}
    hooks = []
    for pos, layer in enumerate(layers):
        hooks += _record(layer, spec, got[pos], mask, max_tokens)
    dev = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for text in texts:
                enc = tok(text, return_tensors="pt", truncation=True, max_length=max_length)
                mask["m"] = enc["attention_mask"].reshape(-1).bool()
                model(**{k: v.to(dev) for k, v in enc.items()})
                if min(sum(len(t) for t in g[0]) for g in got) >= max_tokens:
                    break
    finally:
        for h in hooks:
            h.remove()
    if not joined:
        return got
    if not got or min(sum(len(t) for t in g[0]) for g in got) == 0:
        raise InputError("the refit data produced no tokens")
    return [_joined(g, max_tokens) for g in got]


def _record(layer: MoeLayer, spec: RouterSpec, into: tuple[list, list, list], mask: dict, max_tokens: int) -> list:
    """Hooks appending the layer's block input and router logits (router hook) and its routed experts' output
    (experts hook) at the real tokens of ``mask["m"]``, up to ``max_tokens``; returns the hook handles."""

    def masked(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, t.shape[-1])[mask["m"].to(t.device)].detach().float().cpu()

    def router_hook(mod, args, out):
        if sum(len(t) for t in into[0]) < max_tokens:
            into[0].append(masked(args[0]))
            into[1].append(masked(out[spec.logits_at] if isinstance(out, (tuple, list)) else out))

    def experts_hook(mod, args, out):
        if sum(len(t) for t in into[2]) < max_tokens:
            into[2].append(masked(out[0] if isinstance(out, (tuple, list)) else out))

    hooks = [layer.router.register_forward_hook(router_hook)]
    if layer.experts is not None:
        hooks.append(layer.experts.register_forward_hook(experts_hook))
    return hooks


def _joined(got: tuple[list, list, list], max_tokens: int):
    h, z, y = (torch.cat(t)[:max_tokens] if t else None for t in got)
    return h, z, (y if y is not None and len(y) == len(h) else None)


def dense_output(layer: MoeLayer, x: torch.Tensor, logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """The dense block's routed experts' output [T, D] (float64) for inputs ``x`` (float32)."""
    experts = layer.experts
    idx, w = route(logits.to(x.device), spec, bias=layer.selection_bias(), scaled=True)
    y = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for e in idx.unique().tolist():
        rows, slots = torch.where(idx == e)
        a = expert_hidden(experts, e, x[rows]).double()
        y.index_add_(
            0, rows, w[rows, slots, None].double() * expert_out(experts, e, a, down_weight(experts, e).double())
        )
    return y


def rerouted(
    experts: nn.Module,
    x: torch.Tensor,
    logits: torch.Tensor,
    kept: Sequence[int],
    routing: RouterSpec,
    bias: torch.Tensor | None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """How the pruned block routes ``x``: per position p into ``kept`` (ascending) that some token goes to,
    (those tokens' rows, expert ``kept[p]``'s activation [n, I] with the routing weight folded in, the
    routing weights [n]), all float32."""
    idx, w = route(logits[:, kept].to(x.device), routing, bias=None if bias is None else bias[kept], scaled=True)
    out = {}
    for p in idx.unique().tolist():
        rows, slots = torch.where(idx == p)
        wt = w[rows, slots].float()
        out[p] = (rows, expert_hidden(experts, kept[p], x[rows]) * wt[:, None], wt)
    return out


def routed_out(experts: nn.Module, e: int, a: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s weighted output from its weighted activation ``a`` (its bias times the weights ``wt``)."""
    out = a @ down_weight(experts, e).to(a.dtype).T
    if experts.has_bias:
        out = out + wt[:, None].to(a.dtype) * experts.down_proj_bias[e].to(a.dtype)
    return out


@torch.inference_mode()
def refit_layer(
    layer: MoeLayer,
    h: torch.Tensor,
    logits: torch.Tensor,
    kept: Sequence[int],
    spec: RouterSpec,
    lam: float = LAM,
    sweeps: int = SWEEPS,
    pruned: RouterSpec | None = None,
    kept_experts: nn.Module | None = None,
    target: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """New ``down_proj`` [D, I] (float32) of each kept expert of one dense MoE layer; ``{}`` when every
    expert is kept (nothing to correct). ``pruned``: the pruned model's routing (default: ``spec`` over
    the kept experts, top-k capped; group-limited routers pass the plan's groups). ``kept_experts``:
    where the kept experts' weights come from, by original id (default: the layer's own; merged experts
    are re-fitted from theirs, toward the dense block's output). ``target``: the dense routed experts'
    output on these tokens as the model computed it (default: recomputed here from every routed expert)."""
    experts = layer.experts
    mine = kept_experts if kept_experts is not None else experts
    E = spec.num_experts
    kept = sorted(kept)
    if len(kept) >= E:
        return {}
    x = h.to(experts.down_proj.device, torch.float32)  # in float32 whatever the weights' dtype
    bias = layer.selection_bias()
    T = x.shape[0]
    y = (dense_output(layer, x, logits, spec) if target is None else target).to(x.device, torch.float32)
    sub = pruned or dataclasses.replace(spec, num_experts=len(kept), top_k=min(spec.top_k, len(kept)))
    sel = rerouted(mine, x, logits, kept, sub, bias)
    resid = y.clone()  # what the kept experts have to produce, less what they produce now (float32 products;
    for p, (rows, a, wt) in sel.items():  # Gram matrices and solves in float64)
        resid.index_add_(0, rows, -routed_out(mine, kept[p], a, wt))  # biases stay as they are, in the residual
    if not sel:
        return {}
    W0 = {p: down_weight(mine, kept[p]).double() for p in sel}
    W = {p: W0[p].clone() for p in sel}
    s = lam * sum(float((a.double() ** 2).sum(0).mean()) for _, a, _ in sel.values()) / len(sel) / T
    s = max(s, 1e-12)
    chol = {}
    for p, (rows, a, _) in sel.items():  # each expert's system matrix is the same in every sweep: factor it once
        g = a.double().T @ a.double() / T
        g.diagonal().add_(s)
        chol[p] = torch.linalg.cholesky(g)
    for _ in range(sweeps):
        for p, (rows, a, _) in sel.items():
            r = resid[rows] + a @ W[p].float().T  # the residual with this expert's own contribution put back
            b = (r.T @ a).double() / T + s * W0[p]
            new = torch.cholesky_solve(b.T, chol[p]).T
            resid[rows] = r - a @ new.float().T
            W[p] = new
    return {kept[p]: W[p].float() for p in sel}


ROUTER_STEPS = 200  # Adam steps of the router re-fit
ROUTER_TOKENS = 1024  # calibration tokens per layer the router re-fit uses
ROUTER_CANDIDATES = 2  # x top-k: the kept experts per token (best first) the re-fit router may move weight among


@dataclasses.dataclass(frozen=True)
class RefitSolver:
    """How a checkpoint's kept experts are re-fitted: calibration ``tokens`` per layer, the ridge ``lam``
    toward the original weights, block Gauss-Seidel ``sweeps``, and whether the kept experts' ``router``
    rows are re-fitted too (:func:`router_delta`). ``down=False`` keeps the down projections as they are;
    ``quantize`` (a :class:`premoe.moe.quantize.ExpertQuant` with GPTQ) rounds the kept experts with the
    pass's input Gram matrices after the re-fit."""

    tokens: int = TOKENS
    lam: float = LAM
    sweeps: int = SWEEPS
    router: bool = True
    down: bool = True
    quantize: Any = None


def router_weight_path(layer: MoeLayer) -> str | None:
    """Path (in ``layer.block``) of the layer's router weight matrix, experts on dim 0, if it has one."""
    return next(
        (p for p, d in layer.router_tensors.items() if d == 0 and p.endswith("weight") and layer.tensor(p).dim() == 2),
        None,
    )


def router_delta(
    experts: nn.Module,
    kept: Sequence[int],
    h: torch.Tensor,
    logits: torch.Tensor,
    routing: RouterSpec,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    down: dict[int, torch.Tensor] | None = None,
    lam: float = LAM,
    steps: int = ROUTER_STEPS,
    tokens: int = ROUTER_TOKENS,
) -> torch.Tensor:
    """A change [N, D] (float32) to the kept experts' router rows (ascending ids) that lowers the pruned
    block's squared error against ``target`` (the dense routed output) on the first ``tokens`` tokens,
    with the kept experts fixed (``down``: their down projections [D, I] by id, default the layer's).

    Adam on the routing weights' gradient (the top-k choice is piecewise constant), ridge ``lam``
    toward the original rows; each token may move weight only among its best ``ROUTER_CANDIDATES`` x
    top-k kept experts (the others are kept out of its choice), which bounds memory by
    tokens x candidates x hidden. Routers that compute logits as ``x @ W.T`` (+ a bias) only.
    """
    kept = sorted(kept)
    down = down or {}
    with torch.inference_mode(False), torch.enable_grad():
        dev = experts.down_proj.device
        x = h[:tokens].to(dev, torch.float32).clone()
        y = target[:tokens].to(dev, torch.float32).clone()
        z0 = logits[:tokens, kept].to(dev, torch.float32).clone()
        kb = None if bias is None else bias[kept].to(dev, torch.float32).clone()
        T, N = z0.shape
        c = min(N, ROUTER_CANDIDATES * routing.top_k)
        with torch.no_grad():
            cand, _ = route(z0, routing, k=c, bias=kb)  # [T, c] positions into kept

            def run(p: int, rows: torch.Tensor) -> torch.Tensor:
                e = kept[p]
                w = down.get(e, down_weight(experts, e)).to(dev, torch.float32)
                return expert_out(experts, e, expert_hidden(experts, e, x[rows]), w)

            outs = slot_outputs(cand, run, x.shape[1])
            slot = torch.full((T, N), -1, dtype=torch.long, device=dev)
            slot.scatter_(1, cand, torch.arange(c, device=dev).expand(T, c))
            keep_out = torch.where(slot >= 0, 0.0, -1e4)  # selection-only: non-candidates are never chosen
            sel_bias = keep_out if kb is None else keep_out + kb
        rows = torch.arange(T, device=dev)[:, None]
        delta = torch.zeros(N, x.shape[1], device=dev, requires_grad=True)
        scale = float(y.pow(2).sum(-1).mean().clamp_min(1e-12))
        opt = torch.optim.Adam([delta], lr=1e-2 / float(x.norm(dim=1).mean().clamp_min(1e-12)))
        for _ in range(steps):
            idx, w = route(z0 + x @ delta.T, routing, bias=sel_bias, scaled=True)
            got = (w[..., None] * outs[rows, slot.gather(1, idx).clamp_min(0)]).sum(1)
            loss = (got - y).pow(2).sum(-1).mean() / scale + lam * delta.pow(2).sum() / N
            opt.zero_grad()
            loss.backward()
            opt.step()
    return delta.detach()


def pruned_routing(spec: RouterSpec, plan) -> RouterSpec:
    """How the model ``plan`` builds routes: its experts, top-k and expert groups."""
    return dataclasses.replace(
        spec, num_experts=plan.keep, top_k=plan.top_k, n_group=plan.n_group, topk_group=plan.topk_group
    )


@torch.inference_mode()
def refit_pruned_(
    net: nn.Module,
    arch,
    plan,
    dense_layers: Sequence[MoeLayer],
    captured,
    spec: RouterSpec,
    lam: float = LAM,
    sweeps: int = SWEEPS,
    from_pruned: bool = False,
) -> int:
    """Re-fit the kept experts of ``net`` (the model ``plan`` built, kept experts at their ascending
    positions) from the dense model's layers and the captured tokens; returns the layers changed.
    ``from_pruned``: start from ``net``'s kept experts as they are (merged ones, say) rather than the
    dense model's; the target is the dense block's output either way."""
    import copy

    from premoe.moe.arch import find_moe_layers

    changed = 0
    for pos, (dense, pruned) in enumerate(zip(dense_layers, find_moe_layers(net, arch))):
        check_supported(dense.experts, spec, arch.weight_on_input, arch.name)
        kept = sorted(plan.kept[dense.index])
        if len(kept) >= spec.num_experts:
            continue
        mine = None
        if from_pruned:  # the dense experts with the kept ones' rows taken from ``net``
            mine = copy.deepcopy(dense.experts)
            for n, _ in pruned.experts.named_parameters(recurse=False):
                getattr(mine, n)[kept] = getattr(pruned.experts, n).to(getattr(mine, n).dtype)
        h, z, y = captured[pos]
        new = refit_layer(dense, h, z, kept, spec, lam, sweeps, pruned_routing(spec, plan), kept_experts=mine, target=y)
        with torch.no_grad():
            for e, wt in new.items():
                target = down_weight(pruned.experts, kept.index(e))
                target.copy_(wt.to(target.dtype))
        changed += bool(new)
    return changed
