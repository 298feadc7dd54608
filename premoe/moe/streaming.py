"""Layer streaming of MoE models, for checkpoints larger than memory.

Calibration needs router statistics, not the whole model at once: :class:`LayerStream` runs the
samples one decoder layer at a time (:mod:`premoe.core.streaming` has the runner, shared with dense
models), each layer built from the checkpoint's byte ranges and dequantised if it is quantised.
:func:`resident_sizes` says what each part of a (pruned) model takes in memory, which decides
whether to stream.

:func:`lazy_layers` serves the other use of a model too large for memory (generation, log-likelihoods
in ``premoe eval``): every decoder layer is built when it runs and freed after, within a budget.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from premoe.core.checkpoint import ByteReader
from premoe.core.memory import available_bytes, fits
from premoe.core.modules import decoder_layers, finish_buffers, release
from premoe.core.streaming import (  # noqa: F401  (HiddenStore, Batch, make_batches: re-exported)
    Batch,
    HiddenStore,
    LayerRunner,
    activation_bytes,
    choose_stream,
    make_batches,
    to_device,
)
from premoe.errors import InputError
from premoe.moe.arch import find_moe_layers
from premoe.moe.kernels import select_kernel
from premoe.moe.model import ModelInfo
from premoe.moe.selective import (
    Materializer,
    ZeroExperts,
    compute_dtype,
    kept_bytes,
    model_config,
    skeleton,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Sizes


def resident_sizes(info: ModelInfo, dtype: torch.dtype | None = None, plan=None) -> dict[str, int]:
    """Bytes each part of the model (pruned to ``plan``) takes in memory, quantised tensors dequantised:
    ``total``, ``largest_layer`` (a decoder layer, or the embeddings / LM head, whichever is larger) and
    ``outside`` (everything that is not a decoder layer)."""
    item = torch.empty((), dtype=dtype or compute_dtype(info)).element_size()
    per_layer: dict[int, int] = {}
    outside: dict[str, int] = {}
    for name, role in info.roles.items():
        if role.kind == "beyond" or role.target is None or role.companion:
            continue
        t = info.checkpoint.tensors[name]
        nbytes = info.quant.resident_bytes(name, t.dtype, kept_bytes(info, role, t.nbytes, plan), item)
        if role.layer is not None:
            per_layer[role.layer] = per_layer.get(role.layer, 0) + nbytes
        else:
            outside[role.target] = outside.get(role.target, 0) + nbytes
    largest = max([*per_layer.values(), *outside.values(), 0])
    return {
        "total": sum(per_layer.values()) + sum(outside.values()),
        "largest_layer": largest,
        "outside": sum(outside.values()),
    }


def plan_memory(info: ModelInfo, budget: int, batch_size: int, seq_len: int, stream: bool | None) -> bool:
    """Whether to stream, given ``budget`` bytes (``stream``: the user's choice, ``None``: automatic).

    Raises:
        InputError: even one layer does not fit the budget.
    """
    return choose_stream(resident_sizes(info), activation_bytes(info, batch_size, seq_len), budget, stream)


# ---------------------------------------------------------------------------------------------
# The layer-by-layer runner of an MoE model


class LayerStream(LayerRunner):
    """A model of ``info`` on the meta device whose decoder layers are built one at a time
    (:class:`~premoe.core.streaming.LayerRunner`).

    Args:
        info: the model directory.
        num_layers: keep only the first decoder layers (signature keys need the first MoE layers only).
        experts: ``False`` replaces every routed expert by a stub that contributes nothing (signatures).
        reader: counts the bytes read.
        device: where layers run (hidden states stay on the CPU between layers).
        dtype: what quantised tensors are dequantised to.
        compute_dtype: run every built layer in this dtype (default: the checkpoint's).
        share: data-parallel ranks of one node hold one copy of each layer
            (:class:`~premoe.core.node_share.NodeShare`).
    """

    def __init__(
        self,
        info: ModelInfo,
        *,
        num_layers: int | None = None,
        experts: bool = True,
        reader: ByteReader | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        compute_dtype: torch.dtype | None = None,
        share=None,
    ):
        self.info = info
        reader = reader or ByteReader()
        model = skeleton(model_config(info, None, num_layers))
        self.moe = find_moe_layers(model, info.spec)
        if not experts:
            for m in self.moe:
                if m.experts is not None:
                    setattr(m.block, info.spec.experts, ZeroExperts())
                    m.experts = None
        super().__init__(model, Materializer(info, None, reader, dtype=dtype), reader, device, compute_dtype, share)
        select_kernel(self.model, self.device)


# ---------------------------------------------------------------------------------------------
# Lazy layers: any forward pass (generation, log-likelihoods) within a memory budget


class _Residency:
    """Decoder layers currently built, least recently used first, within ``budget`` bytes."""

    def __init__(self, mat: Materializer, model: nn.Module, budget: int, device: torch.device):
        self.mat, self.model, self.budget, self.device = mat, model, budget, device
        self.held: OrderedDict[int, tuple[nn.Module, int]] = OrderedDict()
        self.bytes = 0
        self.names = {id(mod): name for name, mod in model.named_modules()}

    def enter(self, layer: nn.Module) -> None:
        key = id(layer)
        if key in self.held:
            self.held.move_to_end(key)
            return
        size = self.mat.fill(self.model, prefixes=[self.names[key]])
        finish_buffers(layer)
        to_device(layer, self.device)
        self.held[key] = (layer, size)
        self.bytes += size

    def leave(self, layer: nn.Module) -> None:
        while self.bytes > self.budget and self.held:
            key, (mod, size) = next(iter(self.held.items()))
            release(mod)
            del self.held[key]
            self.bytes -= size


def inference_model(
    info: ModelInfo,
    plan,
    reader: ByteReader,
    *,
    budget: int | None = None,
    stream: bool | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    refit=None,
    hold: bool = False,
) -> tuple[nn.Module, bool]:
    """The model of ``info`` (pruned to ``plan``) for generation or log-likelihoods: built whole when it
    fits in ``budget`` bytes (default: available memory), else with lazy layers (``stream`` forces
    either). A lazy model runs on ``device`` (its layers are moved there as they are built); a whole one
    is returned on the CPU. ``refit``: re-fitted down projections of the kept experts
    (:class:`premoe.moe.refit_weights.RefitWeights`). ``hold``: a whole model keeps a quantised
    checkpoint's experts as stored (:mod:`premoe.moe.held`). Returns ``(model, lazy)``.

    Raises:
        InputError: even one layer and the embeddings do not fit the budget.
    """
    from premoe.moe.selective import build_model

    budget = budget or available_bytes()
    sizes = resident_sizes(info, plan=plan)
    lazy = stream if stream is not None else not fits(sizes["total"], budget)
    if not lazy:
        if hold and info.quant.quantized:
            from premoe.core.memory import release_freed_blocks

            release_freed_blocks()  # weights dequantised per call: their temporaries go back at once
        return build_model(info, plan, reader, dtype=dtype, refit=refit, hold=hold), False
    if sizes["largest_layer"] + sizes["outside"] > budget:
        raise InputError(
            f"the memory budget ({budget / 2**20:.0f} MB) is too small for even one layer: the largest needs "
            f"{sizes['largest_layer'] / 2**20:.0f} MB besides {sizes['outside'] / 2**20:.0f} MB of embeddings "
            "and head; raise `max_memory` or free memory"
        )
    log.info(
        "the model needs %.0f MB but the budget is %.0f MB: running it with layers loaded on demand",
        sizes["total"] / 2**20,
        budget / 2**20,
    )
    return lazy_model(info, plan, reader, budget - sizes["outside"], dtype, device, refit), True


def lazy_model(
    info: ModelInfo,
    plan,
    reader: ByteReader,
    budget: int,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    refit=None,
) -> nn.Module:
    """The causal LM of ``info`` (pruned to ``plan``) with everything but its decoder layers loaded, and
    the layers loaded on demand within ``budget`` bytes (:func:`lazy_layers`): generation and
    log-likelihoods for a model larger than memory, reading each layer once per forward pass. It runs
    on ``device`` (default: the CPU); each layer moves there when it is built."""
    from transformers import GenerationConfig

    device = device or torch.device("cpu")
    model = skeleton(model_config(info, plan))
    mat = Materializer(info, plan, reader, dtype=dtype, refit=refit)
    skip = {id(x) for layer in decoder_layers(model) for x in layer.modules()}
    mat.fill(model, skip=skip)
    model.tie_weights()
    finish_buffers(model)
    to_device(model, device)
    select_kernel(model, device)
    if (info.path / "generation_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(info.path)
    model._premoe_unhook = lazy_layers(model, mat, budget, device)
    return model


def lazy_layers(
    model: nn.Module, mat: Materializer, budget: int, device: torch.device | None = None
) -> Callable[[], None]:
    """Make ``model``'s decoder layers build themselves from the checkpoint (and move to ``device``)
    when they run and free themselves afterwards once more than ``budget`` bytes of layers are held.
    Returns a function that removes the hooks."""
    res = _Residency(mat, model, budget, device or torch.device("cpu"))
    handles = []
    for layer in decoder_layers(model):
        handles.append(layer.register_forward_pre_hook(lambda mod, args: res.enter(mod)))
        handles.append(layer.register_forward_hook(lambda mod, args, out: res.leave(mod)))

    def remove() -> None:
        for h in handles:
            h.remove()

    return remove
