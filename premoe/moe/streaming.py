"""Layer streaming: run a model one decoder layer at a time, for checkpoints larger than memory.

Calibration needs router statistics, not the whole model at once. The samples' hidden states go
through decoder layer 0 for every batch, then layer 1, and so on; each layer is built from the
checkpoint's byte ranges (dequantised if it is quantised), used for every batch and freed. Hidden
states between layers stay in memory or, past a budget, in a temporary file. Peak memory is the
largest layer, plus the hidden states kept in memory, plus one batch's activations.

Every decoder layer gets exactly the arguments the model's own forward passes it (attention masks,
position embeddings, the per-layer-type masks of hybrid models). They are captured by running the
model's forward with each decoder layer replaced by a pass-through that records its call, so no
model code is copied. A model whose forward changes the hidden states between layers cannot be
streamed this way; that is detected and reported, not assumed.

:func:`lazy_layers` serves the other use of a model too large for memory (generation, log-likelihoods
in ``premoe eval``): every decoder layer is built when it runs and freed after, within a budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from premoe.core.checkpoint import ByteReader, tensor_bytes
from premoe.core.memory import available_bytes, fits
from premoe.core.modelio import ModelInfo
from premoe.core.modules import backbone, decoder_layers
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.arch import find_moe_layers
from premoe.moe.kernels import select_kernel
from premoe.moe.selective import (
    Materializer,
    ZeroExperts,
    compute_dtype,
    finish_buffers,
    kept_bytes,
    model_config,
    release,
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
        nbytes = kept_bytes(info, role, t.nbytes, plan)
        if info.quant.method == "fp8" and t.dtype.startswith("F8"):
            nbytes *= item  # one byte per value
        elif info.quant.method == "mxfp4" and name.endswith("_blocks"):
            nbytes *= 2 * item  # two values per byte
        if role.layer is not None:
            per_layer[role.layer] = per_layer.get(role.layer, 0) + nbytes
        else:
            outside[role.target] = outside.get(role.target, 0) + nbytes
    largest = max([*per_layer.values(), *outside.values(), 0])
    return {"total": sum(per_layer.values()) + sum(outside.values()), "largest_layer": largest,
            "outside": sum(outside.values())}


def activation_bytes(info: ModelInfo, batch_size: int, seq_len: int) -> int:
    """A generous estimate of one forward pass's transient memory for a batch (fp32 intermediates and
    one attention score matrix)."""
    cfg = info.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 1024)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", 16)
    return batch_size * seq_len * hidden * 4 * 12 + batch_size * heads * seq_len * seq_len * 4


def plan_memory(info: ModelInfo, budget: int, batch_size: int, seq_len: int, stream: bool | None) -> bool:
    """Whether to stream, given ``budget`` bytes (``stream``: the user's choice, ``None``: automatic).

    Raises:
        InputError: even one layer does not fit the budget.
    """
    sizes = resident_sizes(info)
    act = activation_bytes(info, batch_size, seq_len)
    if stream is None:
        stream = not fits(sizes["total"] + act, budget)
        if stream:
            log.info("the model needs %.0f MB in memory but %.0f MB are available: streaming it layer by layer",
                     sizes["total"] / 2**20, budget / 2**20)
    need = sizes["largest_layer"] + act + (sizes["outside"] if stream else sizes["total"])
    if stream and sizes["largest_layer"] + act > budget:
        raise InputError(
            f"the memory budget ({budget / 2**20:.0f} MB) is too small for even one layer: the largest needs "
            f"{sizes['largest_layer'] / 2**20:.0f} MB plus {act / 2**20:.0f} MB of activations for a batch; raise "
            "--max-memory, free memory, or lower --batch-size / --max-length"
        )
    if not stream and need > budget:
        log.warning("the model may not fit in %.0f MB; pass --stream to calibrate it layer by layer", budget / 2**20)
    return stream


# ---------------------------------------------------------------------------------------------
# Hidden states between layers


class HiddenStore:
    """Per-batch hidden states: in memory up to ``budget`` bytes, then in a temporary file (removed on close).

    A batch keeps its size from layer to layer, so each is rewritten in place.
    """

    def __init__(self, budget: int, directory: str | None = None):
        self.budget = budget
        self.directory = directory
        self.in_memory = 0
        self.spilled = 0
        self._mem: dict[int, torch.Tensor] = {}
        self._disk: dict[int, tuple[int, tuple[int, ...], torch.dtype]] = {}
        self._file = None
        self._end = 0

    def put(self, i: int, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if i in self._disk:
            offset, shape, dtype = self._disk[i]
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError("a batch changed size between layers")
            os.pwrite(self._file.fileno(), tensor_bytes(t), offset)
            return
        if i in self._mem:
            self._mem[i] = t
            return
        if self.in_memory + t.nbytes <= self.budget:
            self._mem[i] = t
            self.in_memory += t.nbytes
            return
        if self._file is None:
            fd, path = tempfile.mkstemp(prefix="premoe-hidden-", suffix=".bin", dir=self.directory)
            self._file = os.fdopen(fd, "r+b", buffering=0)
            os.unlink(path)  # the space is freed when the file is closed, even after a crash
        os.pwrite(self._file.fileno(), tensor_bytes(t), self._end)
        self._disk[i] = (self._end, tuple(t.shape), t.dtype)
        self._end += t.nbytes
        self.spilled += t.nbytes

    def get(self, i: int) -> torch.Tensor:
        if i in self._mem:
            return self._mem[i]
        offset, shape, dtype = self._disk[i]
        t = torch.empty(shape, dtype=dtype)
        view = tensor_bytes(t)
        got = 0
        while got < t.nbytes:
            n = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if n <= 0:
                raise OSError("the hidden-state file is truncated")
            got += n
        return t

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem.clear()
        self._disk.clear()


# ---------------------------------------------------------------------------------------------
# The layer-by-layer runner


@dataclass
class Batch:
    ids: torch.Tensor  # [B, S]
    attn: torch.Tensor  # [B, S]
    counted: torch.Tensor  # [B * S] bool: tokens the statistics count


class LayerStream:
    """A model of ``info`` on the meta device whose decoder layers are built one at a time.

    Args:
        info: the model directory.
        num_layers: keep only the first decoder layers (signature keys need the first MoE layers only).
        experts: ``False`` replaces every routed expert by a stub that contributes nothing (signatures).
        reader: counts the bytes read.
        device: where layers run (hidden states stay on the CPU between layers).
        dtype: what quantised tensors are dequantised to.
    """

    def __init__(self, info: ModelInfo, *, num_layers: int | None = None, experts: bool = True,
                 reader: ByteReader | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None):
        self.info = info
        self.reader = reader or ByteReader()
        self.device = device or torch.device("cpu")
        self.model = skeleton(model_config(info, None, num_layers))
        self.base = backbone(self.model)[0]
        self.layers = decoder_layers(self.model)
        self.names = {id(mod): name for name, mod in self.model.named_modules()}
        self.moe = find_moe_layers(self.model, info.spec)
        if not experts:
            for m in self.moe:
                if m.experts is not None:
                    setattr(m.block, info.spec.experts, ZeroExperts())
                    m.experts = None
        self.mat = Materializer(info, None, self.reader, dtype=dtype)
        emb = self.base.get_input_embeddings()
        head = self.model.get_output_embeddings()
        self._embed_ids = {id(x) for x in emb.modules()}
        skip = {id(x) for layer in self.layers for x in layer.modules()} | self._embed_ids
        if head is not None:
            skip |= {id(x) for x in head.modules()}
        self.mat.fill(self.model, skip=skip)  # the final norm and whatever else sits outside the layers
        finish_buffers(self.model)
        _to_device(self.model, self.device)
        select_kernel(self.model, self.device)

    # -- capturing what the model passes each layer --------------------------------------------

    @contextlib.contextmanager
    def _pass_through(self, calls: dict):
        """Replace every decoder layer's forward by one that records its arguments and returns its input."""
        returned: dict[int, torch.Tensor] = {}

        def make(i: int):
            def forward(*args, **kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if i and returned.get(i - 1) is not hidden:
                    calls["changed"] = i
                calls[i] = (args, kwargs)
                returned[i] = hidden
                return hidden

            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = make(i)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.__dict__.pop("forward", None)

    def _capture(self, **inputs) -> dict:
        calls: dict = {}
        name = type(self.model).__name__
        try:
            with self._pass_through(calls):
                self.base(use_cache=False, **inputs)
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise UnsupportedModelError(
                f"{name}'s decoder layers pass each other more than hidden states ({type(e).__name__}: {e}), so it "
                "cannot be run layer by layer; calibrate it in memory (--no-stream)"
            ) from None
        if "changed" in calls:
            raise UnsupportedModelError(
                f"{name} changes hidden states between decoder layers (before layer {calls['changed']}), so it "
                "cannot be run layer by layer; calibrate it in memory (--no-stream)"
            )
        return calls

    def check_independent(self, batch: Batch, hidden: torch.Tensor) -> None:
        """Raise unless what the model passes each layer besides its hidden states is the same whatever the
        hidden states are (masks, positions): a layer-by-layer run could not reproduce it otherwise
        (e.g. a second residual stream built from earlier layers' outputs)."""
        attn = batch.attn.to(self.device)
        first = self._capture(inputs_embeds=hidden, attention_mask=attn)
        other = self._capture(inputs_embeds=hidden * 2 + 1, attention_mask=attn)
        for i in range(len(self.layers)):
            a, b = _leaves(first[i]), _leaves(other[i])
            same = len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
            if not same:
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} passes decoder layer {i} inputs computed from earlier layers' "
                    "outputs besides its hidden states, so it cannot be run layer by layer; calibrate it in memory (--no-stream)"
                )

    def first_hidden(self, batches: list[Batch], store: HiddenStore) -> None:
        """The input of decoder layer 0 for every batch (embeddings built, used and freed)."""
        emb = self.base.get_input_embeddings()
        self.mat.fill(self.model, prefixes=[self.names[id(emb)]])
        _to_device(emb, self.device)
        try:
            for b, batch in enumerate(batches):
                calls = self._capture(input_ids=batch.ids.to(self.device), attention_mask=batch.attn.to(self.device))
                args, kwargs = calls[0]
                store.put(b, args[0] if args else kwargs["hidden_states"])
        finally:
            release(emb)

    def run_layer(self, i: int, batches: list[Batch], store: HiddenStore, before: Callable[[int], None] | None = None) -> int:
        """Build decoder layer ``i``, push every batch through it, free it; returns the bytes it held."""
        layer = self.layers[i]
        held = self.mat.fill(self.model, prefixes=[self.names[id(layer)]])
        finish_buffers(layer)
        _to_device(layer, self.device)
        try:
            for b, batch in enumerate(batches):
                hidden = store.get(b).to(self.device)
                calls = self._capture(inputs_embeds=hidden, attention_mask=batch.attn.to(self.device))
                args, kwargs = calls[i]
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": hidden}
                if before is not None:
                    before(b)
                out = layer(*args, **kwargs)
                store.put(b, out[0] if isinstance(out, (tuple, list)) else out)
        finally:
            release(layer)
        return held

    def run(self, batches: list[Batch], hidden_budget: int, before: Callable[[int], None] | None = None,
            progress: bool = True, desc: str = "stream", offload_dir: str | None = None) -> dict[str, int]:
        """Every batch through every layer; returns what it held at most and what spilled to disk."""
        store = HiddenStore(hidden_budget, offload_dir)
        largest = 0
        bar = tqdm(total=len(self.layers), desc=desc, unit="layer", disable=not progress)
        try:
            self.first_hidden(batches, store)
            if batches:
                self.check_independent(batches[0], store.get(0).to(self.device))
            for i in range(len(self.layers)):
                largest = max(largest, self.run_layer(i, batches, store, before))
                bar.set_postfix(read=f"{self.reader.bytes_read / 2**20:.0f}MB", refresh=False)
                bar.update(1)
        finally:
            bar.close()
            spilled = store.spilled
            store.close()
        return {"largest_layer": largest, "spilled": spilled}


def _to_device(module: nn.Module, device: torch.device) -> None:
    """Move the tensors of ``module`` that are loaded (not on the meta device) to ``device``."""
    if device.type == "cpu":
        return
    for mod in module.modules():
        for leaf, p in mod._parameters.items():
            if p is not None and not p.is_meta and p.device != device:
                mod._parameters[leaf] = nn.Parameter(p.to(device), requires_grad=False)
        for leaf, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[leaf] = b.to(device)


def _leaves(call) -> list[torch.Tensor]:
    """Every tensor in a recorded call (the hidden states first), in a fixed order."""
    args, kwargs = call
    out: list[torch.Tensor] = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                walk(y)
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])

    hidden = args[0] if args else kwargs.get("hidden_states")
    walk(hidden)
    walk(list(args[1:]))
    walk({k: v for k, v in kwargs.items() if k != "hidden_states"})
    return out


def make_batches(rows: Iterable[list[tuple[list[int], list[int]]]], pad: int) -> list[Batch]:
    out = []
    for batch in rows:
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        counted = torch.tensor([c + [0] * (width - len(c)) for _, c in batch]).reshape(-1).bool()
        out.append(Batch(ids, attn, counted))
    return out


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
        _to_device(layer, self.device)
        self.held[key] = (layer, size)
        self.bytes += size

    def leave(self, layer: nn.Module) -> None:
        while self.bytes > self.budget and self.held:
            key, (mod, size) = next(iter(self.held.items()))
            release(mod)
            del self.held[key]
            self.bytes -= size


def inference_model(info: ModelInfo, plan, reader: ByteReader, *, budget: int | None = None, stream: bool | None = None,
                    dtype: torch.dtype | None = None, device: torch.device | None = None) -> tuple[nn.Module, bool]:
    """The model of ``info`` (pruned to ``plan``) for generation or log-likelihoods: built whole when it
    fits in ``budget`` bytes (default: available memory), else with lazy layers (``stream`` forces
    either). A lazy model runs on ``device`` (its layers are moved there as they are built); a whole one
    is returned on the CPU. Returns ``(model, lazy)``.

    Raises:
        InputError: even one layer and the embeddings do not fit the budget.
    """
    from premoe.moe.selective import build_model

    budget = budget or available_bytes()
    sizes = resident_sizes(info, plan=plan)
    lazy = stream if stream is not None else not fits(sizes["total"], budget)
    if not lazy:
        return build_model(info, plan, reader, dtype=dtype), False
    if sizes["largest_layer"] + sizes["outside"] > budget:
        raise InputError(
            f"the memory budget ({budget / 2**20:.0f} MB) is too small for even one layer: the largest needs "
            f"{sizes['largest_layer'] / 2**20:.0f} MB besides {sizes['outside'] / 2**20:.0f} MB of embeddings and head; "
            "raise --max-memory or free memory"
        )
    log.info("the model needs %.0f MB but the budget is %.0f MB: running it with layers loaded on demand",
             sizes["total"] / 2**20, budget / 2**20)
    return lazy_model(info, plan, reader, budget - sizes["outside"], dtype, device), True


def lazy_model(info: ModelInfo, plan, reader: ByteReader, budget: int, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> nn.Module:
    """The causal LM of ``info`` (pruned to ``plan``) with everything but its decoder layers loaded, and
    the layers loaded on demand within ``budget`` bytes (:func:`lazy_layers`): generation and
    log-likelihoods for a model larger than memory, reading each layer once per forward pass. It runs
    on ``device`` (default: the CPU); each layer moves there when it is built."""
    from transformers import GenerationConfig

    device = device or torch.device("cpu")
    model = skeleton(model_config(info, plan))
    mat = Materializer(info, plan, reader, dtype=dtype)
    skip = {id(x) for layer in decoder_layers(model) for x in layer.modules()}
    mat.fill(model, skip=skip)
    model.tie_weights()
    finish_buffers(model)
    _to_device(model, device)
    select_kernel(model, device)
    if (info.path / "generation_config.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(info.path)
    model._premoe_unhook = lazy_layers(model, mat, budget, device)
    return model


def lazy_layers(model: nn.Module, mat: Materializer, budget: int, device: torch.device | None = None) -> Callable[[], None]:
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
