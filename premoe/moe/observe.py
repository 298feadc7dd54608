"""Observing routers while a model runs: per-expert routing sums of every MoE layer (in memory or layer by layer)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from premoe.core.data import token_batches
from premoe.core.distributed import SINGLE, World
from premoe.core.modules import decoder_layers
from premoe.core.options import RunOptions
from premoe.errors import InputError
from premoe.moe.arch import MoeLayer, RouterSpec
from premoe.moe.kernels import expert_forward
from premoe.moe.model import ModelInfo
from premoe.moe.recon import LayerRecon
from premoe.moe.routing import route
from premoe.moe.scoring import OUTPUT_SUM_NAMES, SUM_NAMES, MarkerParams, RoutingSums, layer_markers, output_markers


class RouterObserver:
    """Accumulates :class:`RoutingSums` from every MoE router while the model runs.

    Use as a context manager (hooks are always removed on exit). Before each forward pass set
    :attr:`mask` to the flattened [B*S] attention mask so padding is not counted. With ``outputs``
    it also recomputes, after each MoE block has run, every chosen expert's output from its fused
    weight slices for its tokens (nothing is unfused), for the expert-output criteria (REAP, EAN,
    EASY-EP), keeping the residual entering the block for one layer. With ``recon`` as well, it
    records each layer's first tokens for the ``recon`` scorer (:mod:`premoe.moe.recon`); call
    :meth:`finish` after the pass.
    """

    def __init__(
        self,
        layers: list[MoeLayer],
        router: RouterSpec,
        arch,
        params: MarkerParams,
        decoder: list | None = None,
        outputs: bool = False,
        recon: bool = False,
        shard: World = SINGLE,
    ):
        self.layers = layers
        self.router = router
        self.arch = arch
        self.params = params
        self.outputs = outputs
        self.decoder = decoder
        device = next(layers[0].router.parameters()).device
        names = tuple(SUM_NAMES) + (tuple(OUTPUT_SUM_NAMES) if outputs else ())
        self.sums = RoutingSums.zeros(len(layers), router.num_experts, device if device.type != "meta" else None, names)
        self.mask: torch.Tensor | None = None
        self._residual: dict[int, torch.Tensor] = {}
        self._routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []
        self.recon = [LayerRecon(router, shard=shard) for _ in layers] if outputs and recon else None

    def finish(self) -> RoutingSums:
        """The sums, with the ``recon`` scores of every layer (computed now where not yet done)."""
        if self.recon is not None:
            got = [r.finish() for r in self.recon]
            E = self.router.num_experts
            self.sums.ranked["recon"] = torch.stack([g if g is not None else torch.zeros(E) for g in got])
        return self.sums

    def _masked(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().reshape(-1, t.shape[-1])  # [B*S, ...]
        return t[self.mask.to(t.device)] if self.mask is not None else t

    def _hook(self, pos: int, layer: MoeLayer):
        at = self.router.logits_at

        def hook(module, args, output):
            logits = output[at] if isinstance(output, (tuple, list)) else output
            logits = self._masked(logits)
            self.sums.add(pos, layer_markers(logits, self.router, self.params, layer.selection_bias()))
            if self.outputs:
                self._routed[pos] = (self._masked(args[0]), logits)

        return hook

    def _residual_hook(self, pos: int):
        def hook(module, args):
            self._residual[pos] = args[0].detach()

        return hook

    def _block_hook(self, pos: int, layer: MoeLayer, decoder_layer):
        scale = self.router.scale or 1.0
        mult = float(getattr(decoder_layer, "residual_multiplier", 1.0) or 1.0)
        E, S = self.router.num_experts, self.router.width

        def hook(module, args, output):
            hidden, logits = self._routed.pop(pos)
            idx, w = route(logits, self.router, bias=layer.selection_bias(), scaled=True)
            res = self._residual.pop(pos, None)
            x = (self._masked(res) if res is not None else hidden).float()
            norms = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
            routed = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
            for e in idx.unique().tolist():
                rows, slots = torch.where(idx == e)
                inp = hidden[rows]
                if self.arch.weight_on_input:
                    inp = inp * w[rows, slots, None].to(inp.dtype)
                out = expert_forward(layer.experts, e, inp).float()
                norms[rows, slots] = out.norm(dim=-1)
                routed.index_add_(0, rows, out if self.arch.weight_on_input else out * w[rows, slots, None])
            rec = self.recon[pos] if self.recon is not None else None
            if rec is not None and not rec.full:
                rec.add(
                    lambda e, h: expert_forward(layer.experts, e, h),
                    hidden,
                    logits,
                    layer.selection_bias(),
                    x,
                    routed,
                    mult,
                )
                if rec.full:
                    rec.finish()  # the statistics are freed as soon as the layer has its tokens
            x, routed = x.double(), routed.double()  # 1 - cos of nearly parallel vectors: float32 rounds it to 0
            gain = (1 - torch.nn.functional.cosine_similarity(x, x + mult * routed, dim=-1)).clamp_min(0).float()
            marks = output_markers(idx, w / scale, norms, gain, S)
            self.sums.add(pos, {k: v[:, :E] for k, v in marks.items()})

        return hook

    def __enter__(self) -> "RouterObserver":
        for pos, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._hook(pos, layer)))
            if self.outputs:
                if layer.experts is None:
                    raise InputError(f"the expert-output scorers need an experts module; {self.arch.name} has none")
                dec = self.decoder[layer.index]
                if self.arch.pre_moe_norm:
                    norm = dec.get_submodule(self.arch.pre_moe_norm)
                    self._handles.append(norm.register_forward_pre_hook(self._residual_hook(pos)))
                self._handles.append(layer.block.register_forward_hook(self._block_hook(pos, layer, dec)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._residual.clear()
        self._routed.clear()


@dataclass(frozen=True)
class Recording:
    """What an observation pass records: the routing sums of ``params`` (always), every chosen expert's output
    statistics with ``outputs`` (REAP, EAN, EASY-EP), the ``recon`` scorer's token statistics with ``recon``
    (and ``outputs``); ``skip_special`` leaves special tokens (BOS...) out of the counts; ``shard``: the
    batches of this data-parallel rank only (``b mod size == rank``; the sums are then partial)."""

    params: MarkerParams
    outputs: bool = False
    recon: bool = False
    skip_special: bool = False
    shard: World = SINGLE  # a data-parallel rank records its share of the batches (premoe.core.distributed)


@torch.inference_mode()
def observe(
    model: torch.nn.Module,
    layers: list[MoeLayer],
    info: ModelInfo,
    tokenizer,
    texts: Iterable[str],
    what: Recording,
    *,
    run: RunOptions = RunOptions(),
    total: int | None = None,
    desc: str = "calibrate",
    **forward_kwargs,
) -> RoutingSums:
    """Stream ``texts`` through ``model`` (``run.batch_size`` samples of at most ``run.max_length`` tokens at
    a time) and return the routing sums of ``layers``' routers, with what ``what`` asks for.

    ``model`` is any module whose forward drives those routers: the causal LM for calibration, or
    a truncated signature view (:mod:`premoe.moe.signature`).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not run.progress)
    decoder = decoder_layers(model) if what.outputs else None
    with RouterObserver(
        layers, info.router, info.spec, what.params, decoder, what.outputs, what.recon, what.shard
    ) as obs:
        for batch in what.shard.share(
            token_batches(tokenizer, texts, run.batch_size, run.max_length, what.skip_special)
        ):
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch], device=device)
            attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=device)
            counted = torch.tensor([c + [0] * (width - len(c)) for _, c in batch], device=device)
            obs.mask = counted.reshape(-1).bool()
            model(input_ids=ids, attention_mask=attn, use_cache=False, **forward_kwargs)
            obs.sums.tokens += int(counted.sum())
            bar.update(len(batch))
    bar.close()
    return obs.finish()


@torch.inference_mode()
def observe_streamed(
    info: ModelInfo,
    tokenizer,
    texts: Iterable[str],
    what: Recording,
    *,
    run: RunOptions = RunOptions(device="cpu"),
    num_layers: int | None = None,
    experts: bool = True,
    desc: str = "calibrate",
    hidden_budget: int = 1 << 62,
    offload_dir: str | None = None,
    share_layers: bool = False,
) -> tuple[RoutingSums, dict[str, int]]:
    """:func:`observe` for a model larger than memory: the same batches, pushed through one decoder
    layer at a time (:class:`~premoe.moe.streaming.LayerStream`; only the first ``num_layers``, routed
    experts replaced by stubs without ``experts``), layers run on ``run.device``, hidden states past
    ``hidden_budget`` bytes in ``offload_dir``; ``share_layers``: data-parallel ranks of one node hold one
    copy of each layer (:mod:`premoe.core.node_share`). Returns the sums and what the run held (largest layer,
    bytes of hidden states spilled to disk, bytes read)."""
    from premoe.core.config import resolve_device, resolve_dtype
    from premoe.core.node_share import node_share
    from premoe.moe.streaming import LayerStream, make_batches

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = make_batches(
        what.shard.share(token_batches(tokenizer, texts, run.batch_size, run.max_length, what.skip_special)), pad
    )
    device = resolve_device(run.device)
    share = node_share(what.shard, share_layers, device)
    if not batches and share is None:  # a data-parallel rank without a share: nothing to add to the sums
        n = sum(1 for i in info.moe_layers if num_layers is None or i < num_layers)
        names = tuple(SUM_NAMES) + (tuple(OUTPUT_SUM_NAMES) if what.outputs else ())
        return RoutingSums.zeros(n, info.num_experts, names=names), {"bytes_read": 0}
    dtype = resolve_dtype(run.dtype)
    dtype = dtype if isinstance(dtype, torch.dtype) else None  # "auto": the checkpoint's
    stream = LayerStream(
        info,
        num_layers=num_layers,
        experts=experts,
        device=device,
        dtype=dtype,
        compute_dtype=dtype,
        share=share,
    )
    decoder = stream.layers if what.outputs else None
    with RouterObserver(
        stream.moe, info.router, info.spec, what.params, decoder, what.outputs, what.recon, what.shard
    ) as obs:
        obs.sums.tokens = sum(int(b.counted.sum()) for b in batches)

        def before(b: int) -> None:
            obs.mask = batches[b].counted.to(stream.device)

        where = {m.index: pos for pos, m in enumerate(stream.moe)}

        def done(i: int, layer) -> None:  # the layer's recon scores before it is freed
            if obs.recon is not None and i in where:
                obs.recon[where[i]].finish()

        stats = stream.run(
            batches, hidden_budget, before, progress=run.progress, desc=desc, offload_dir=offload_dir, done=done
        )
        obs.finish()
    stats["bytes_read"] = stream.reader.bytes_read
    return obs.sums, stats


def marker_params(router: RouterSpec, scorer: str, k: int | None, r: float | None) -> MarkerParams:
    """Selection settings; ``k``/``r`` apply to the chosen scorer, the other statistics use defaults."""
    if k is not None and not 1 <= k <= router.num_experts:
        raise InputError(f"`k` must be between 1 and the {router.num_experts} experts per layer, got {k}")
    if r is not None and not 0.0 < r <= 1.0:
        raise InputError(f"`r` must be in (0, 1], got {r}")
    if scorer == "official":
        return MarkerParams(k=router.top_k, official_k=k or 1, official_r=r)
    return MarkerParams(k=k or router.top_k, r=r)
