"""Least-squares re-fit of a structurally pruned dense model's output projections (``--refit``).

Removing a query head or an FFN channel removes a column of ``o_proj`` / ``down_proj``, and the layer's
output loses that column's contribution. The kept columns can take most of it over: with the Gram
matrix ``G = E[[x; 1][x; 1]^T]`` of the projection's dense inputs on calibration tokens, the kept
columns ``W'_K`` and the bias ``b'`` minimising ``E||W x - W'_K x_K - b'||^2`` solve

    [W'_K, b'] = [W, 0] G[:, K+] (G[K+, K+] + lambda I)^-1          (K+ = K and the constant)

(FLAP's bias compensation is the special case that keeps ``W_K`` and fits only ``b'``). The result is
ordinary weights plus a bias in the same shapes the plan writes, so it survives a vanilla reload.
With the task's own calibration tokens the re-fit is task-specific as SEAP's masks are.

The Gram matrices come from one layer-by-layer pass of the dense model over the calibration texts
(:class:`~premoe.core.streaming.LayerRunner`: one decoder layer and its two Gram matrices in memory at
a time, hidden states spilled to disk past the budget); :func:`stream_grams` hands each layer's pair to
a callback that solves it and drops it. Everything here but :func:`stream_grams` is pure tensor code.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from premoe.core.checkpoint import TORCH_DTYPES
from premoe.core.distributed import SINGLE, World, sum_int, sum_to_main
from premoe.dense.model import DenseInfo, DensePlan
from premoe.errors import InputError

RIDGE = 1e-3  # relative to the mean diagonal of the kept Gram block: a tiny, scale-free damping
SITES = ("o", "down")
Grams = dict[str, torch.Tensor]  # site -> [C + 1, C + 1] float64, normalised (the last entry is 1)


def kept_columns(info: DenseInfo, plan: DensePlan, layer: int, site: str) -> list[int]:
    """Input columns of ``site``'s projection the plan keeps, in the order the pruned weight holds them."""
    if site == "o":
        return [h * info.head_dim + j for h in plan.heads[layer] for j in range(info.head_dim)]
    return list(plan.channels[layer])


def solve_refit(
    weight: torch.Tensor, gram: torch.Tensor, kept: Sequence[int], fit_bias: bool = True, ridge: float = RIDGE
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The re-fitted kept columns ``[D, len(kept)]`` (float32) and the bias ``[D]`` (or ``None``)."""
    g = gram.to(weight.device, torch.float64)
    c = weight.shape[1]
    if g.shape != (c + 1, c + 1):
        raise InputError(f"a Gram matrix of shape {list(g.shape)} does not match a weight of {c} input columns")
    idx = torch.tensor(list(kept) + ([c] if fit_bias else []), device=weight.device, dtype=torch.long)
    a = g[idx[:, None], idx]  # [k(+1), k(+1)], gathered without a [k, C] intermediate
    a.diagonal().add_(ridge * a.diagonal().mean().clamp_min(1e-30))
    # rhs = [W, 0] G[:, K+] = W G[:C, K+], in blocks so neither W in float64 nor G[:C, K+] is ever whole
    rhs = torch.empty(weight.shape[0], len(idx), dtype=torch.float64, device=weight.device)
    step = 1024
    for j in range(0, len(idx), step):
        cols = g[:c].index_select(1, idx[j : j + step])  # [C, <=step]
        for r in range(0, weight.shape[0], step):
            rhs[r : r + step, j : j + step] = weight[r : r + step].double() @ cols
        del cols
    try:
        chol = torch.linalg.cholesky(a)
        del a
        sol = torch.cholesky_solve(rhs.T, chol).T
    except RuntimeError:  # not positive definite even with the damping: the least-squares solution
        sol = torch.linalg.lstsq(g[idx[:, None], idx], rhs.T).solution.T
    if fit_bias:
        return sol[:, :-1].float(), sol[:, -1].float()
    return sol.float(), None


def pool_grams(per_task: Sequence[dict[int, Grams]]) -> dict[int, Grams]:
    """The equal-weight mixture of several tasks' normalised Gram matrices (as the pooled statistics are)."""
    if not per_task:
        raise InputError("no Gram matrices to pool")
    return {l: {s: sum(g[l][s] for g in per_task) / len(per_task) for s in SITES} for l in per_task[0]}


def refit_plan(
    info: DenseInfo,
    plan: DensePlan,
    layer: int,
    grams: Grams,
    weight: Callable[[int, str], torch.Tensor],
    fit_bias: dict[str, bool],
    spill: Path | None = None,
) -> None:
    """Re-fit one layer of ``plan`` in place: ``plan.refit`` gets the kept columns' new weights and
    ``plan.bias`` the fitted biases (replacing any mean-only compensation). A projection that keeps
    every input column is left exactly as it is. With ``spill`` the weights go to a safetensors file
    there (in the checkpoint's dtype) and ``plan.refit`` holds a loader: memory stays flat in depth."""
    for site in SITES:
        kept = kept_columns(info, plan, layer, site)
        if len(kept) == (info.heads * info.head_dim if site == "o" else info.intermediate):
            continue
        w, b = solve_refit(weight(layer, site), grams[site], kept, fit_bias[site])
        if spill is None:
            plan.refit[f"{layer}.{site}"] = w.cpu()
        else:
            plan.refit[f"{layer}.{site}"] = _spilled(
                spill / f"{layer}.{site}.safetensors",
                w.to(TORCH_DTYPES[info.checkpoint.tensors[info.key(layer, site)].dtype]),
            )
        if b is not None:
            plan.bias[f"{layer}.{site}"] = b.cpu()
        else:
            plan.bias.pop(f"{layer}.{site}", None)


def _spilled(path: Path, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    from safetensors.torch import load_file, save_file

    save_file({"w": w.cpu().contiguous()}, str(path))
    return lambda: load_file(str(path))["w"]


def can_fit_bias(info: DenseInfo) -> dict[str, bool]:
    """Per projection, whether it can carry a fitted bias through a vanilla reload (the family's config
    has the flag); where it cannot, the re-fit has no constant term."""
    return {"o": info.spec.attn_bias_key is not None, "down": info.spec.mlp_bias_key is not None}


class GramCollector:
    """Float64 sums of ``w * [x; 1][x; 1]^T`` over the counted tokens of ``o_proj`` and ``down_proj``
    inputs of the layers attached; :attr:`mask` is the batch's [B*S] token mask, :attr:`weight` its
    tokens' weight (1 / the tokens of its source, so every source counts the same)."""

    def __init__(self, info: DenseInfo):
        self.info = info
        self.mask: torch.Tensor | None = None
        self.weight = 1.0
        self.sums: dict[int, dict[str, torch.Tensor]] = {}
        self._hooks: dict[int, list] = {}

    def attach(self, layer: int, module: torch.nn.Module, shard: World = SINGLE) -> None:
        spec = self.info.spec
        hooks = []
        for site, mod in (
            ("o", getattr(getattr(module, spec.attn), spec.o)),
            ("down", getattr(getattr(module, spec.mlp), spec.down)),
        ):
            hooks.append(mod.register_forward_pre_hook(self._hook(layer, site)))
            if shard.parallel:  # every rank has every sum to add, tokens of this layer or not
                n = mod.weight.shape[1] + 1
                self.sums.setdefault(layer, {})[site] = torch.zeros(n, n, dtype=torch.float64, device=mod.weight.device)
        self._hooks[layer] = hooks

    def _hook(self, layer: int, site: str):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if self.mask is not None:
                x = x[self.mask.to(x.device)]
            if not len(x):
                return
            x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64, device=x.device)], 1)
            per = self.sums.setdefault(layer, {})
            if site not in per:
                per[site] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            per[site].addmm_(x.T, x, alpha=self.weight)  # in place: no second [C+1, C+1] matrix

        return hook

    def take(self, layer: int, shard: World = SINGLE) -> Grams | None:
        """The layer's normalised Gram matrices (its hooks removed, its sums dropped). Under torchrun
        (``shard``) every rank's sums, added in rank order on rank 0 (``None`` on the other ranks)."""
        for h in self._hooks.pop(layer, []):
            h.remove()
        per = self.sums.pop(layer, None)
        if shard.parallel:
            summed = {s: sum_to_main(per[s], shard, "the re-fit's Gram reduction") for s in SITES}
            if not shard.main:
                return None
            per = summed
        if per is None or set(per) != set(SITES) or float(per["o"][-1, -1]) == 0:
            raise InputError("the refit data produced no tokens; check `refit_data`")
        # normalised, then held in float32 (half the memory; the solve runs in float64 on the kept block)
        return {s: g.div_(g[-1, -1].clone()).to("cpu", torch.float32) for s, g in per.items()}

    def close(self) -> None:
        for layer in list(self._hooks):
            for h in self._hooks.pop(layer):
                h.remove()


@torch.inference_mode()
def stream_grams(
    info: DenseInfo,
    tok,
    sources: Sequence[Iterable[str]],
    on_layer: Callable[[int, Grams], None],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    hidden_budget: int = 1 << 62,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    offload_dir: str | None = None,
    progress: bool = True,
    reader=None,
    shard: World = SINGLE,
) -> dict[str, int]:
    """Every decoder layer's Gram matrices over ``sources`` (lists of texts, each weighted equally),
    one layer at a time: ``on_layer(layer, grams)`` gets them as soon as the layer is done.

    Under torchrun (``shard``) each rank runs its share of each source's batches (batch ``b`` of a source on
    rank ``b mod N``), the sums are added in rank order on rank 0, and only rank 0 calls ``on_layer``."""
    from premoe.core.checkpoint import ByteReader
    from premoe.core.config import config_from_dict, skeleton
    from premoe.core.data import token_batches
    from premoe.core.streaming import LayerRunner, make_batches
    from premoe.dense.calibration import DenseFiller

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches, weights = [], []
    for texts in sources:
        part = make_batches(shard.share(token_batches(tok, texts, batch_size, max_length, False)), pad)
        tokens = sum_int(sum(int(b.counted.sum()) for b in part), shard, "the re-fit's token count")
        if tokens == 0:
            raise InputError("the refit data produced no tokens; check `refit_data`")
        batches += part
        weights += [1.0 / tokens] * len(part)
    own = reader is None
    reader = reader or ByteReader()
    model = skeleton(config_from_dict(info.raw_config, info.spec.name))
    runner = LayerRunner(model, DenseFiller(info, reader, dtype), reader, device)
    grams = GramCollector(info)

    def before(b: int) -> None:
        grams.mask, grams.weight = batches[b].counted, weights[b]

    def done(i: int, grams_of: Grams | None) -> None:
        if grams_of is not None:  # rank 0
            on_layer(i, grams_of)

    def built(i: int, layer: torch.nn.Module) -> None:
        if i > 0:
            done(i - 1, grams.take(i - 1, shard))
        grams.attach(i, layer, shard)

    try:
        run = runner.run(
            batches, hidden_budget, before, progress=progress, desc="refit", offload_dir=offload_dir, built=built
        )
        done(info.num_layers - 1, grams.take(info.num_layers - 1, shard))
    finally:
        grams.close()
        if own:
            reader.close()
    run["bytes_read"] = reader.bytes_read
    return run


def refit(
    info: DenseInfo,
    plan: DensePlan,
    tok,
    sources: Sequence[Iterable[str]],
    weight: Callable[[int, str], torch.Tensor],
    *,
    about: str = "",
    batch_size: int = 16,
    max_length: int = 2048,
    device: torch.device | None = None,
    progress: bool = True,
    reader=None,
    shard: World = SINGLE,
) -> DensePlan:
    """Re-fit every layer of ``plan`` on ``sources`` (streamed: one layer's Gram matrices in memory at a
    time, hidden states past the machine's memory budget spilled to disk); returns ``plan``. Under torchrun
    (``shard``) the pass is shared and rank 0 solves: only its plan is re-fitted."""
    from premoe.core.memory import memory_budget
    from premoe.core.streaming import activation_bytes, hidden_room
    from premoe.dense.calibration import dense_sizes

    fit_bias = can_fit_bias(info)
    room = hidden_room(
        dense_sizes(info), activation_bytes(info, batch_size, min(max_length, 2048)), memory_budget(None)
    )
    plan.bias = {}
    spill = tempfile.TemporaryDirectory(prefix="premoe-refit-")
    plan.spill = spill  # removed with the plan
    stream_grams(
        info,
        tok,
        sources,
        lambda l, g: refit_plan(info, plan, l, g, weight, fit_bias, Path(spill.name)),
        batch_size=batch_size,
        max_length=max_length,
        hidden_budget=room,
        device=device,
        progress=progress,
        reader=reader,
        shard=shard,
    )
    plan.info["bias_comp"] = False  # the fitted bias already holds the removed inputs' mean contribution
    plan.info["refit"] = {"data": about, "bias": fit_bias, "ridge": RIDGE}
    return plan


def apply_grams(
    info: DenseInfo, plan: DensePlan, grams: dict[int, Grams], weight: Callable[[int, str], torch.Tensor]
) -> DensePlan:
    """:func:`refit` from Gram matrices already collected (every layer's; what ``premoe sweep`` reuses)."""
    fit_bias = can_fit_bias(info)
    plan.bias = {}
    for layer in range(info.num_layers):
        refit_plan(info, plan, layer, grams[layer], weight, fit_bias)
    plan.info["bias_comp"] = False
    plan.info["refit"] = {"data": "calibration", "bias": fit_bias, "ridge": RIDGE}
    return plan
