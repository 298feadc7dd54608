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

import torch
import torch.nn.functional as F
from torch import nn

from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.arch import MoeLayer, RouterSpec
from premoe.moe.routing import route

LAM = 1e-2  # ridge toward the original weights, times the mean diagonal of the experts' Gram matrices
SWEEPS = 3  # block Gauss-Seidel sweeps (3 matched the joint solve on the shipped model)
TOKENS = 4096  # calibration tokens per layer the re-fit uses


def check_supported(experts: nn.Module | None, spec: RouterSpec, weight_on_input: bool, family: str) -> None:
    if experts is None or not hasattr(experts, "has_gate") or weight_on_input or spec.slots:
        raise UnsupportedModelError(
            f"--refit re-fits experts in transformers' fused experts interface routed by output weight; {family}'s "
            "experts are laid out otherwise; use --no-refit")


def expert_hidden(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s intermediate activation [N, I] (what its down projection takes)."""
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    up_w = getattr(experts, up_name)
    h = x @ up_w[e] if experts.is_transposed else F.linear(x, up_w[e])
    if experts.has_bias:
        h = h + getattr(experts, f"{up_name}_bias")[e]
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


def capture(model: nn.Module, layers: Sequence[MoeLayer], spec: RouterSpec, tok, texts: Iterable[str],
            max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer: (block input [T, D], router logits [T, S]) of up to ``max_tokens`` real tokens."""
    got: list[tuple[list, list]] = [([], []) for _ in layers]
    count = [0] * len(layers)
    mask: dict[str, torch.Tensor] = {}
    hooks = []
    for pos, layer in enumerate(layers):
        def hook(mod, args, out, pos=pos):
            if count[pos] >= max_tokens:
                return
            logits = out[spec.logits_at] if isinstance(out, (tuple, list)) else out
            m = mask["m"].to(logits.device)
            h = args[0].reshape(-1, args[0].shape[-1])[m]
            z = logits.reshape(-1, logits.shape[-1])[m]
            got[pos][0].append(h.detach().float().cpu())
            got[pos][1].append(z.detach().float().cpu())
            count[pos] += len(h)
        hooks.append(layer.router.register_forward_hook(hook))
    dev = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for text in texts:
                enc = tok(text, return_tensors="pt")
                mask["m"] = enc["attention_mask"].reshape(-1).bool()
                model(**{k: v.to(dev) for k, v in enc.items()})
                if min(count) >= max_tokens:
                    break
    finally:
        for h in hooks:
            h.remove()
    if not count or min(count) == 0:
        raise InputError("the refit data produced no tokens")
    return [(torch.cat(h)[:max_tokens], torch.cat(z)[:max_tokens]) for h, z in got]


@torch.inference_mode()
def refit_layer(layer: MoeLayer, h: torch.Tensor, logits: torch.Tensor, kept: Sequence[int], spec: RouterSpec,
                lam: float = LAM, sweeps: int = SWEEPS, pruned: RouterSpec | None = None) -> dict[int, torch.Tensor]:
    """New ``down_proj`` [D, I] (float32) of each kept expert of one dense MoE layer; ``{}`` when every
    expert is kept (nothing to correct). ``pruned``: the pruned model's routing (default: ``spec`` over
    the kept experts, top-k capped; group-limited routers pass the plan's groups)."""
    experts = layer.experts
    E = spec.num_experts
    kept = sorted(kept)
    if len(kept) >= E:
        return {}
    dt = experts.down_proj.dtype
    x = h.to(experts.down_proj.device, dt)
    bias = layer.selection_bias()
    idx_d, w_d = route(logits.to(x.device), spec, bias=bias, scaled=True)
    T = x.shape[0]
    y = torch.zeros(T, x.shape[1], dtype=torch.float64, device=x.device)  # the dense block's routed output
    for e in idx_d.unique().tolist():
        rows, slots = torch.where(idx_d == e)
        a = expert_hidden(experts, e, x[rows]).double()
        y.index_add_(0, rows, w_d[rows, slots, None].double() * expert_out(experts, e, a, down_weight(experts, e).double()))
    sub = pruned or dataclasses.replace(spec, num_experts=len(kept), top_k=min(spec.top_k, len(kept)))
    kb = None if bias is None else bias[kept]
    idx, w = route(logits[:, kept].to(x.device), sub, bias=kb, scaled=True)  # positions into ``kept``
    sel = {}
    pred = torch.zeros_like(y)
    for p in idx.unique().tolist():
        rows, slots = torch.where(idx == p)
        a = expert_hidden(experts, kept[p], x[rows]).double() * w[rows, slots, None].double()  # weight folded in
        sel[p] = (rows, a)
        out = a @ down_weight(experts, kept[p]).double().T
        if experts.has_bias:  # biases are kept as they are; they stay in the residual
            out = out + w[rows, slots, None].double() * experts.down_proj_bias[kept[p]].double()
        pred.index_add_(0, rows, out)
    if not sel:
        return {}
    W0 = {p: down_weight(experts, kept[p]).double() for p in sel}
    W = {p: W0[p].clone() for p in sel}
    s = lam * sum(float((a * a).sum(0).mean()) for _, a in sel.values()) / len(sel) / T
    resid = y - pred
    for _ in range(sweeps):
        for p, (rows, a) in sel.items():
            r = resid[rows] + a @ W[p].T  # the residual with this expert's own contribution put back
            g = a.T @ a / T
            g.diagonal().add_(s)
            b = r.T @ a / T + s * W0[p]
            new = torch.linalg.solve(g, b.T).T
            resid[rows] = r - a @ new.T
            W[p] = new
    return {kept[p]: W[p].float() for p in sel}



def refit_pruned_(net: nn.Module, arch, plan, dense_layers: Sequence[MoeLayer], captured, spec: RouterSpec,
                  lam: float = LAM, sweeps: int = SWEEPS) -> int:
    """Re-fit the kept experts of ``net`` (the model ``plan`` built, kept experts at their ascending
    positions) from the dense model's layers and the captured tokens; returns the layers changed."""
    from premoe.moe.arch import find_moe_layers

    changed = 0
    for pos, (dense, pruned) in enumerate(zip(dense_layers, find_moe_layers(net, arch))):
        check_supported(dense.experts, spec, arch.weight_on_input, arch.name)
        kept = sorted(plan.kept[dense.index])
        pruned_spec = dataclasses.replace(spec, num_experts=len(kept), top_k=plan.top_k, n_group=plan.n_group,
                                          topk_group=plan.topk_group)
        new = refit_layer(dense, *captured[pos], kept, spec, lam, sweeps, pruned_spec)
        with torch.no_grad():
            for e, wt in new.items():
                target = down_weight(pruned.experts, kept.index(e))
                target.copy_(wt.to(target.dtype))
        changed += bool(new)
    return changed
