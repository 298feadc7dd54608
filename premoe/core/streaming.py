"""Layer streaming for any causal LM (MoE or dense): run it one decoder layer at a time, for
checkpoints larger than memory.

The samples' hidden states go through decoder layer 0 for every batch, then layer 1, and so on; each
layer is built from the checkpoint's byte ranges by a *filler* (the MoE
:class:`~premoe.moe.selective.Materializer`, the dense :class:`~premoe.dense.calibration.DenseFiller`),
used for every batch and freed. Hidden states between layers stay in memory or, past a budget, in a
temporary file. Peak memory is the largest layer, plus the hidden states kept in memory, plus one
batch's activations.

Every decoder layer gets exactly the arguments the model's own forward passes it (attention masks,
position embeddings, the per-layer-type masks of hybrid models). They are captured by running the
model's forward with each decoder layer replaced by a pass-through that records its call, so no
model code is copied. A model whose forward changes the hidden states between layers cannot be
streamed this way; that is detected and reported, not assumed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from premoe.core.checkpoint import ByteReader, tensor_bytes
from premoe.core.memory import fits
from premoe.core.modules import backbone, decoder_layers, finish_buffers, release
from premoe.core.node_share import NodeShare
from premoe.errors import InputError, UnsupportedModelError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Sizes and the decision to stream


def activation_bytes(info, batch_size: int, seq_len: int) -> int:
    """A generous estimate of one forward pass's transient memory for a batch (fp32 intermediates and
    one attention score matrix); ``info`` is any model description with a transformers ``config``."""
    cfg = info.config
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", 1024)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", 16)
    return batch_size * seq_len * hidden * 4 * 12 + batch_size * heads * seq_len * seq_len * 4


def choose_stream(sizes: dict[str, int], act: int, budget: int, stream: bool | None) -> bool:
    """Whether to stream a model of ``sizes`` (``total``, ``largest_layer``, ``outside`` bytes in memory)
    given ``budget`` bytes and ``act`` bytes of activations per batch (``stream``: the user's choice,
    ``None``: automatic).

    Raises:
        InputError: even one layer does not fit the budget.
    """
    if stream is None:
        stream = not fits(sizes["total"] + act, budget)
        if stream:
            log.info(
                "the model needs %.0f MB in memory but %.0f MB are available: streaming it layer by layer",
                sizes["total"] / 2**20,
                budget / 2**20,
            )
    need = sizes["largest_layer"] + act + (sizes["outside"] if stream else sizes["total"])
    if stream and sizes["largest_layer"] + act > budget:
        raise InputError(
            f"the memory budget ({budget / 2**20:.0f} MB) is too small for even one layer: the largest needs "
            f"{sizes['largest_layer'] / 2**20:.0f} MB plus {act / 2**20:.0f} MB of activations for a batch; raise "
            "`max_memory`, free memory, or lower `batch_size` / `max_length`"
        )
    if not stream and need > budget:
        log.warning("the model may not fit in %.0f MB; pass `stream` to calibrate it layer by layer", budget / 2**20)
    return stream


def hidden_room(sizes: dict[str, int], act: int, budget: int) -> int:
    """Bytes of hidden states a streamed run keeps in memory (the rest goes to disk): 80% of the
    budget less the largest layer, everything outside the layers and one batch's activations."""
    return max(int(0.8 * budget) - sizes["largest_layer"] - sizes["outside"] - act, 0)


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


def make_batches(rows: Iterable[list[tuple[list[int], list[int]]]], pad: int) -> list[Batch]:
    out = []
    for batch in rows:
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
        counted = torch.tensor([c + [0] * (width - len(c)) for _, c in batch]).reshape(-1).bool()
        out.append(Batch(ids, attn, counted))
    return out


class Filler(Protocol):
    """Reads the tensors of a skeleton's modules that are still on the meta device from the checkpoint."""

    def fill(self, model: nn.Module, prefixes: Iterable[str] | None = None, skip: set[int] = frozenset()) -> int:
        """Fill ``model``'s modules under ``prefixes`` (all when ``None``) but those whose ``id`` is in
        ``skip``; returns the bytes they now hold."""


class LayerRunner:
    """A causal LM on the meta device whose decoder layers are built one at a time.

    Args:
        model: the skeleton (every tensor on the meta device).
        filler: builds modules of ``model`` from the checkpoint.
        reader: what ``filler`` reads with (for the bytes read).
        device: where layers run (hidden states stay on the CPU between layers).
        dtype: run every built module in this dtype (default: as the checkpoint stores it).
        share: data-parallel ranks of one node hold one copy of each built module
            (:class:`~premoe.core.node_share.NodeShare`; every rank runs the same layers).

    Everything outside the decoder layers but the embeddings and the LM head is built at once; the
    embeddings are built only to embed the batches, the LM head never.
    """

    def __init__(
        self,
        model: nn.Module,
        filler: Filler,
        reader: ByteReader,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        share: NodeShare | None = None,
    ):
        self.model = model
        self.share = share
        self.dtype = dtype
        self.mat = filler
        self.reader = reader
        self.device = device or torch.device("cpu")
        self.base = backbone(model)[0]
        self.layers = decoder_layers(model)
        self.names = {id(mod): name for name, mod in model.named_modules()}
        emb = self.base.get_input_embeddings()
        head = model.get_output_embeddings()
        skip = {id(x) for layer in self.layers for x in layer.modules()} | {id(x) for x in emb.modules()}
        if head is not None:
            skip |= {id(x) for x in head.modules()}
        self.mat.fill(model, skip=skip)  # the final norm and whatever else sits outside the layers
        finish_buffers(model)
        to_device(model, self.device, self.dtype)

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
                "cannot be run layer by layer; calibrate it in memory (`stream=False`)"
            ) from None
        if "changed" in calls:
            raise UnsupportedModelError(
                f"{name} changes hidden states between decoder layers (before layer {calls['changed']}), so it "
                "cannot be run layer by layer; calibrate it in memory (`stream=False`)"
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
                    "outputs besides its hidden states, so it cannot be run layer by layer; calibrate it in "
                    "memory (`stream=False`)"
                )

    # -- running ----------------------------------------------------------------------------------

    def build(self, module: nn.Module) -> int:
        """Read ``module`` from the checkpoint, compute its non-persistent buffers (Gemma's embedding
        scale) the way transformers does after loading, and move it to the device; returns its bytes.
        Shared across a node's ranks, the node's first rank builds it and every rank maps that copy."""
        if self.share is None:
            return self._build(module)
        return self.share.build(module, lambda: self._build(module), self.finish)

    def _build(self, module: nn.Module) -> int:
        held = self.mat.fill(self.model, prefixes=[self.names[id(module)]])
        self.finish(module)
        return held

    def finish(self, module: nn.Module) -> None:
        """Compute ``module``'s non-persistent buffers and move it to the device and dtype."""
        for mod in module.modules():  # set at init without their weights (so not computed): compute them now
            for n in mod._non_persistent_buffers_set:
                if mod._buffers.get(n) is not None:
                    mod._buffers[n] = torch.empty_like(mod._buffers[n], device="meta")
        finish_buffers(self.model)
        to_device(module, self.device, self.dtype)

    def first_hidden(self, batches: list[Batch], store: HiddenStore, after: Callable | None = None) -> None:
        """The input of decoder layer 0 for every batch (embeddings built, used and freed)."""
        emb = self.base.get_input_embeddings()
        self.build(emb)
        try:
            for b, batch in enumerate(batches):
                calls = self._capture(input_ids=batch.ids.to(self.device), attention_mask=batch.attn.to(self.device))
                args, kwargs = calls[0]
                hidden = args[0] if args else kwargs["hidden_states"]
                if after is not None:
                    after(0, b, hidden)
                store.put(b, hidden)
        finally:
            release(emb)
            trim_heap()

    def run_layer(
        self,
        i: int,
        batches: list[Batch],
        store: HiddenStore,
        before: Callable[[int], None] | None = None,
        after: Callable | None = None,
        built: Callable | None = None,
        done: Callable | None = None,
    ) -> int:
        """Build decoder layer ``i``, push every batch through it, free it; returns the bytes it held.
        ``built(i, layer)`` runs once the layer is built, ``before(b)`` before batch ``b`` enters it,
        ``after(i + 1, b, hidden)`` with what leaves it and ``done(i, layer)`` after the last batch, before
        the layer is freed."""
        layer = self.layers[i]
        held = self.build(layer)
        try:
            if built is not None:
                built(i, layer)
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
                out = out[0] if isinstance(out, (tuple, list)) else out
                if after is not None:
                    after(i + 1, b, out)
                store.put(b, out)
            if done is not None:
                done(i, layer)
        finally:
            release(layer)
            trim_heap()
        return held

    def run(
        self,
        batches: list[Batch],
        hidden_budget: int,
        before: Callable[[int], None] | None = None,
        progress: bool = True,
        desc: str = "stream",
        offload_dir: str | None = None,
        *,
        after: Callable[[int, int, torch.Tensor], None] | None = None,
        built: Callable[[int, nn.Module], None] | None = None,
        done: Callable[[int, nn.Module], None] | None = None,
    ) -> dict[str, int]:
        """Every batch through every layer; returns what it held at most and what spilled to disk.

        ``after(depth, b, hidden)``: the hidden states of batch ``b`` after the embeddings (depth 0) and
        after each decoder layer (depth i + 1); ``built(i, layer)``: decoder layer ``i`` once it is built;
        ``done(i, layer)``: the same layer once every batch has passed it, before it is freed.
        """
        store = HiddenStore(hidden_budget, offload_dir)
        largest = 0
        bar = tqdm(total=len(self.layers), desc=desc, unit="layer", disable=not progress)
        try:
            with self.share or contextlib.nullcontext():
                self.first_hidden(batches, store, after)
                if batches:
                    self.check_independent(batches[0], store.get(0).to(self.device))
                for i in range(len(self.layers)):
                    largest = max(largest, self.run_layer(i, batches, store, before, after, built, done))
                    bar.set_postfix(read=f"{self.reader.bytes_read / 2**20:.0f}MB", refresh=False)
                    bar.update(1)
        finally:
            bar.close()
            spilled = store.spilled
            store.close()
        return {"largest_layer": largest, "spilled": spilled}


def trim_heap() -> None:
    """Give freed heap memory back to the system. glibc serves allocations below its mmap threshold from
    the heap and raises that threshold as large blocks are freed, so a freed layer's tensors would stay in
    the process (RSS growing by most of a layer per layer) without this; elsewhere it does nothing."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def to_device(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Move the tensors of ``module`` that are loaded (not on the meta device) to ``device`` (floating ones
    to ``dtype`` as well, when given)."""
    if device.type == "cpu" and dtype is None:
        return

    def moved(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    for mod in module.modules():
        for leaf, p in mod._parameters.items():
            if p is not None and not p.is_meta and (t := moved(p)) is not p:
                mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        for leaf, b in mod._buffers.items():
            if b is not None and not b.is_meta:
                mod._buffers[leaf] = moved(b)


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
