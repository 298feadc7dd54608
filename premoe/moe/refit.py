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

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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


def capture(model: nn.Module, layers: Sequence[MoeLayer], spec: RouterSpec, tok, texts: Iterable[str],
            max_tokens: int, max_length: int = 2048) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Per MoE layer: (block input [T, D], router logits [T, S], routed experts' output [T, D] or ``None``
    where the layer has no experts module) of up to ``max_tokens`` real tokens (texts cut at ``max_length``)."""
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
        y.index_add_(0, rows, w[rows, slots, None].double() * expert_out(experts, e, a, down_weight(experts, e).double()))
    return y


def rerouted(experts: nn.Module, x: torch.Tensor, logits: torch.Tensor, kept: Sequence[int], routing: RouterSpec,
             bias: torch.Tensor | None) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
def refit_layer(layer: MoeLayer, h: torch.Tensor, logits: torch.Tensor, kept: Sequence[int], spec: RouterSpec,
                lam: float = LAM, sweeps: int = SWEEPS, pruned: RouterSpec | None = None,
                kept_experts: nn.Module | None = None, target: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
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


def router_weight_path(layer: MoeLayer) -> str | None:
    """Path (in ``layer.block``) of the layer's router weight matrix, experts on dim 0, if it has one."""
    return next((p for p, d in layer.router_tensors.items()
                 if d == 0 and p.endswith("weight") and layer.tensor(p).dim() == 2), None)


def router_delta(experts: nn.Module, kept: Sequence[int], h: torch.Tensor, logits: torch.Tensor, routing: RouterSpec,
                 bias: torch.Tensor | None, target: torch.Tensor, down: dict[int, torch.Tensor] | None = None,
                 lam: float = LAM, steps: int = ROUTER_STEPS, tokens: int = ROUTER_TOKENS) -> torch.Tensor:
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
            outs = torch.zeros(T, c, x.shape[1], device=dev)
            for p in cand.unique().tolist():
                rows, slots = torch.where(cand == p)
                e = kept[p]
                w = down.get(e, down_weight(experts, e)).to(dev, torch.float32)
                outs[rows, slots] = expert_out(experts, e, expert_hidden(experts, e, x[rows]), w).float()
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
    return dataclasses.replace(spec, num_experts=plan.keep, top_k=plan.top_k, n_group=plan.n_group,
                               topk_group=plan.topk_group)


@torch.inference_mode()
def refit_pruned_(net: nn.Module, arch, plan, dense_layers: Sequence[MoeLayer], captured, spec: RouterSpec,
                  lam: float = LAM, sweeps: int = SWEEPS, from_pruned: bool = False) -> int:
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


# ---------------------------------------------------------------------------------------------
# premoe prune --refit: streamed, one decoder layer in memory at a time


class RefitWeights:
    """Re-fitted down projections of the kept experts, one safetensors file per MoE layer in
    ``directory`` (default: a temporary one, removed by :meth:`close`; a pattern store's re-fits are
    kept): :meth:`get` gives expert ``e`` of ``layer`` in the in-memory layout of ``experts.down_proj[e]``
    and the model's dtype."""

    def __init__(self, about: dict[str, Any], directory: str | Path | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="premoe-moe-refit-") if directory is None else None
        self.path = Path(self._tmp.name if self._tmp else directory)
        self.about = about
        self.experts: dict[int, list[int]] = {}  # layer -> re-fitted experts (original ids)
        self.routers: dict[int, list[str]] = {}  # layer -> router weights with re-fitted rows (in-memory names)

    @classmethod
    def open(cls, directory: str | Path, about: dict[str, Any]) -> "RefitWeights":
        """The re-fit written earlier into ``directory`` (a pattern store's; nothing is removed on close).

        Raises:
            StoreError: a file is not readable safetensors.
        """
        from premoe.errors import StoreError

        out = cls(about, directory)
        for f in sorted(out.path.glob("layer*.safetensors")):
            try:
                with safe_open(f, "pt") as g:
                    layer = int(f.stem.removeprefix("layer"))
                    out.experts[layer] = sorted(int(k) for k in g.keys() if k.isdigit())
                    out.routers[layer] = sorted(k for k in g.keys() if not k.isdigit())
            except (SafetensorError, OSError, ValueError) as e:
                raise StoreError(f"store re-fit file {f} is corrupt ({e}); rerun `premoe refit` or pass --no-refit") from None
        return out

    def put(self, layer: int, weights: dict[int, torch.Tensor], routers: dict[str, torch.Tensor] | None = None) -> None:
        """Store a layer's re-fitted down projections ({expert: tensor}) and router rows ({in-memory name
        of the router weight: [kept, D] rows, kept experts ascending})."""
        if weights:
            tensors = {str(e): w.contiguous() for e, w in weights.items()}
            tensors.update({n: r.contiguous() for n, r in (routers or {}).items()})
            save_file(tensors, self._file(layer))
            self.experts[layer] = sorted(weights)
            self.routers[layer] = sorted(routers or {})

    def get(self, layer: int, expert: int) -> torch.Tensor:
        with safe_open(self._file(layer), "pt") as f:
            return f.get_tensor(str(expert))

    def router(self, layer: int | None, name: str) -> torch.Tensor | None:
        """The re-fitted rows [kept, D] of router weight ``name`` (in-memory name) of ``layer``, if any."""
        if name not in self.routers.get(layer, ()):
            return None
        with safe_open(self._file(layer), "pt") as f:
            return f.get_tensor(name)

    def has(self, layer: int | None, expert: int | None) -> bool:
        return expert in self.experts.get(layer, ())

    def _file(self, layer: int) -> str:
        return str(self.path / f"layer{layer}.safetensors")

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def plan_key(plan) -> str:
    """Digest of what a re-fit depends on in ``plan``: each layer's kept experts and the pruned routing."""
    import hashlib
    import json

    what = {"kept": {str(k): sorted(v) for k, v in sorted(plan.kept.items())}, "top_k": plan.top_k,
            "n_group": plan.n_group, "topk_group": plan.topk_group}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def pick_texts(tok, sources: Sequence[Sequence[str]], tokens: int, max_length: int) -> list[str]:
    """Texts in order from each source until it has given an equal share of ``tokens``."""
    share = -(-tokens // max(len(sources), 1))
    out = []
    for texts in sources:
        got = 0
        for text in texts:
            if got >= share:
                break
            out.append(text)
            got += len(tok(text, truncation=True, max_length=max_length)["input_ids"])
    return out


def down_targets(info) -> dict[int, str]:
    """Per MoE layer, the in-memory name of its experts' fused ``down_proj``, where the checkpoint holds it
    as per-expert keys or as a fused tensor in the in-memory layout (what ``--refit`` can rewrite).

    Raises:
        UnsupportedModelError: a layer's down projections are stored any other way.
    """
    out = {}
    for layer, names in info.layout.moe.items():
        target = next((n for n in names["experts"] if n.endswith(".down_proj")), None)
        src = info.layout.sources.get(target) if target else None
        if src is None or src.kind not in ("split", "fused") or src.converter is not None:
            raise UnsupportedModelError(f"--refit rewrites the experts' down projections, but {info.spec.name} stores "
                                        f"layer {layer}'s in a layout premoe does not rewrite; use --no-refit")
        out[layer] = target
    return out


def router_target(info, layer: int) -> str | None:
    """In-memory name of ``layer``'s router weight where the checkpoint stores it as one plain key with the
    experts on dim 0 (what the router re-fit rewrites), else ``None``."""
    for name, dim in info.layout.moe[layer]["router"].items():
        src = info.layout.sources.get(name)
        if dim == 0 and name.endswith(".weight") and src is not None and src.kind == "router" and src.key \
                and src.converter is None and not src.scales:
            return name
    return None


def check_refit_model(info) -> None:
    """Raise unless ``premoe prune --refit`` can write ``info``'s re-fitted experts (one line, naming --no-refit)."""
    if info.quant.method:
        raise UnsupportedModelError(f"--refit writes new expert weights, but this checkpoint is {info.quant.method}-quantised "
                                    "and premoe does not re-quantise them; use --no-refit")
    if info.spec.weight_on_input or info.router.slots or not info.spec.experts:
        raise UnsupportedModelError(f"--refit re-fits experts routed by output weight in transformers' fused experts "
                                    f"interface; {info.spec.name}'s experts are laid out otherwise; use --no-refit")


def refit_model(info, plan, tok, sources: Sequence[Sequence[str]], *, directory: str | Path | None = None,
                **kwargs) -> RefitWeights:
    """Re-fit the kept experts of every MoE layer of ``plan``: :func:`refit_models` for one plan."""
    return refit_models(info, [plan], tok, sources, directories=[directory], **kwargs)[0]


def refit_models(info, plans: Sequence, tok, sources: Sequence[Sequence[str]], *, about: str = "",
                 directories: Sequence[str | Path | None] | None = None, tokens: int = TOKENS, lam: float = LAM,
                 sweeps: int = SWEEPS, batch_size: int = 16, max_length: int = 2048,
                 device: torch.device | None = None, progress: bool = True, reader=None,
                 stream: bool | None = None, router: bool = True) -> list[RefitWeights]:
    """Re-fit the kept experts of every MoE layer of each of ``plans`` on up to ``tokens`` calibration
    tokens per layer from ``sources`` (texts, equal shares), in one pass over the model: the dense
    model's MoE-block inputs and router logits are recorded and each layer is re-fitted for every plan
    (:func:`refit_layer`), then, with ``router``, the kept experts' router rows with the re-fitted
    experts (:func:`router_delta`, where the checkpoint stores the router weight as one plain key); the
    new weights are spilled to disk (``directories``: one per plan, default temporary ones).

    A model that fits in memory is built whole (``stream``: force either way); a larger one runs one
    decoder layer at a time, each built from the checkpoint and re-fitted before it is freed. Memory
    then: one decoder layer, one layer's recorded tokens and the hidden states (spilled to disk past
    the machine's memory budget).
    """
    from premoe.core.memory import fits, memory_budget
    from premoe.moe.streaming import resident_sizes

    check_refit_model(info)
    texts = pick_texts(tok, sources, tokens, max_length)
    if not texts:
        raise InputError("the refit data has no texts; pass --refit-data FILE or use --no-refit")
    outs = [RefitWeights({"data": about, "tokens": 0, "ridge": lam, "sweeps": sweeps}, d)
            for d in (directories or [None] * len(plans))]
    routings = [pruned_routing(info.router, plan) for plan in plans]

    def solve(m: MoeLayer, h: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> None:
        check_supported(m.experts, info.router, info.spec.weight_on_input, info.spec.name)
        dt = m.experts.down_proj.dtype
        name = router_target(info, m.index) if router else None
        path = name.removeprefix(info.layout.moe[m.index]["prefix"] + ".") if name else None
        if y is None:
            y = dense_output(m, h.to(m.experts.down_proj.device, torch.float32), z, info.router).float()
        for plan, routing, out in zip(plans, routings, outs):
            out.about["tokens"] = len(h)
            kept = sorted(plan.kept[m.index])
            new = refit_layer(m, h, z, kept, info.router, lam, sweeps, routing, target=y)
            rows = {}
            if new and path is not None and path in m.router_tensors:
                w = m.tensor(path)
                delta = router_delta(m.experts, kept, h, z, routing, m.selection_bias(), y, new, lam)
                rows[name] = (w[kept].float() + delta.to(w.device)).to(w.dtype)
                out.about["router_tokens"] = min(len(h), ROUTER_TOKENS)
            out.put(m.index, {e: (w.T if m.experts.is_transposed else w).to(dt) for e, w in new.items()}, rows)

    budget = memory_budget(None)
    try:
        if stream is False or (stream is None and fits(resident_sizes(info)["total"], budget)):
            _refit_in_memory(info, tok, texts, tokens, max_length, solve, reader, progress)
        else:
            _refit_streamed(info, tok, texts, tokens, solve, batch_size, max_length, device, reader, budget, progress)
    except BaseException:
        for out in outs:
            out.close()
        raise
    return outs


def _refit_in_memory(info, tok, texts, tokens, max_length, solve, reader, progress) -> None:
    from tqdm.auto import tqdm

    from premoe.core.checkpoint import ByteReader
    from premoe.moe.arch import find_moe_layers
    from premoe.moe.selective import build_model

    with contextlib.nullcontext(reader) if reader is not None else ByteReader() as r:
        model = build_model(info, None, r)
    layers = find_moe_layers(model, info.spec)
    captured = capture(model, layers, info.router, tok, texts, tokens, max_length)
    for m, (h, z, y) in tqdm(list(zip(layers, captured)), desc="refit", unit="layer", disable=not progress):
        solve(m, h, z, y)


def _refit_streamed(info, tok, texts, tokens, solve, batch_size, max_length, device, reader, budget, progress) -> None:
    from premoe.core.streaming import activation_bytes, hidden_room
    from premoe.moe.observe import _batches
    from premoe.moe.streaming import LayerStream, make_batches, resident_sizes

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = make_batches(_batches(tok, texts, batch_size, max_length, False), pad)
    stream = LayerStream(info, reader=reader, device=device, num_layers=max(info.moe_layers) + 1)
    moe = {m.index: m for m in stream.moe}
    got = {m.index: ([], [], []) for m in stream.moe}
    mask: dict[str, torch.Tensor] = {}
    hooks = [hk for m in stream.moe for hk in _record(m, info.router, got[m.index], mask, tokens)]

    def before(b: int) -> None:
        mask["m"] = batches[b].counted

    def done(i: int, layer) -> None:
        if i in moe:
            solve(moe[i], *_joined(got.pop(i), tokens))

    room = hidden_room(resident_sizes(info), activation_bytes(info, batch_size, min(max_length, 2048)), budget)
    try:
        stream.run(batches, room, before, progress=progress, desc="refit (streamed)", done=done)
    finally:
        for hk in hooks:
            hk.remove()


def refit_for(info, store, plan, task: str | None, agnostic: bool, refit: bool | None,
              refit_data: Sequence | None = None, progress: bool = True) -> RefitWeights | None:
    """The re-fit ``premoe prune`` and ``premoe eval`` apply to ``plan`` (recorded in ``plan.refit``).

    ``refit``: ``False`` never; ``True`` always (a one-line error when it cannot); ``None`` (the default)
    when it can: the data (``refit_data``, else the calibration data the store recorded for the task, or
    for every task with ``agnostic``) is still there unchanged and the checkpoint's experts can be
    rewritten, else a warning and the plain slice. A plan that keeps every expert needs nothing.
    """
    import logging

    from premoe.core.data import refit_sources
    from premoe.core.modelio import load_tokenizer
    from premoe.core.store import PatternStore
    from premoe.errors import PremoeError

    if refit is False:
        if refit_data:
            raise InputError("--refit-data cannot go with --no-refit")
        return None
    if all(len(v) >= info.num_experts for v in plan.kept.values()):
        return None  # every expert kept: nothing to correct
    st = store if isinstance(store, PatternStore) else PatternStore.open(store)
    if not refit_data and not agnostic:
        stored = stored_refit(st, task, plan)
        if stored is not None:
            plan.refit = dict(stored.about)
            return stored
    try:
        check_refit_model(info)
        down_targets(info)
        sources, about = refit_sources(st.tasks, sorted(st.tasks) if agnostic else [task], refit_data)
        weights = refit_model(info, plan, load_tokenizer(info.path), sources, about=about, progress=progress)
    except PremoeError as e:
        if refit:
            raise
        logging.getLogger(__name__).warning("not re-fitting the kept experts: %s", e)
        plan.refit = {"skipped": str(e)}
        return None
    plan.refit = dict(weights.about)
    return weights


def stored_refit(store, task: str, plan) -> RefitWeights | None:
    """``task``'s re-fit for ``plan``'s kept set that ``premoe refit`` stored with the pattern, if any."""
    found = store.refit_dir(task, plan_key(plan))
    if found is None:
        return None
    directory, entry = found
    return RefitWeights.open(directory, {**entry.get("about", {}), "stored": entry["dir"]})


def store_refits(info, store, task: str, plans: Sequence, refit_data: Sequence | None = None,
                 progress: bool = True, **kwargs) -> list[dict[str, Any]]:
    """Re-fit ``task``'s kept experts for each of ``plans`` (one pass over the model) on ``refit_data``
    or the task's recorded calibration data, and store the rows with the pattern (``premoe refit``);
    returns each plan's manifest entry. Plans that keep every expert are skipped.

    Raises:
        UnsupportedModelError / InputError: as ``premoe prune --refit`` (quantised checkpoint, other
            expert layout, calibration data gone or changed).
    """
    import shutil

    from premoe.core.data import refit_sources
    from premoe.core.modelio import load_tokenizer

    plans = [p for p in plans if any(len(v) < info.num_experts for v in p.kept.values())]
    if not plans:
        return []
    check_refit_model(info)
    down_targets(info)
    sources, about = refit_sources(store.tasks, [task], refit_data)
    dirs = [store.refit_workdir() for _ in plans]
    try:
        outs = refit_models(info, plans, load_tokenizer(info.path), sources, about=about, directories=dirs,
                            progress=progress, **kwargs)
        entries = []
        for plan, out, d in zip(plans, outs, dirs):
            key = plan_key(plan)
            meta = {"keep": plan.keep, "top_k": plan.top_k, "group_policy": plan.group_policy, "scorer": plan.scorer,
                    "experts": sum(len(v) for v in out.experts.values()), "about": out.about}
            store.add_refit(task, key, meta, d)
            entries.append({**meta, "key": key})
        return entries
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
