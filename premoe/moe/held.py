"""Experts held as the checkpoint stores them: quantised in memory, dequantised one expert at a time on use.
The quantised checkpoint's other linear weights (attention, dense MLPs, shared experts) are held the same way,
each dequantised whole for its module's forward (:class:`HeldWeight`).

A quantised checkpoint's (FP8, MXFP4) kept experts would take about twice their stored bytes once
dequantised to bf16. :class:`HeldExperts` stands in for one fused expert tensor of transformers' experts
module (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], ...): it keeps each part of it (the
per-expert keys concatenated along rows, or the one fused key) as stored, values and scales, and
``held[e]`` dequantises expert ``e`` alone, block by block through the format's own rule, to the compute
dtype on the tensors' device. Every experts forward premoe runs (its bucketed kernel, transformers' eager
loop) indexes experts one at a time, so only one expert's dequantised weights exist at any moment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from premoe.core.checkpoint import TORCH_DTYPES
from premoe.core.quant.fp8 import as_stored


@dataclass
class HeldPart:
    """One stored part of every held expert: values [E, ...], their scales [E, ...] and the other companions
    the format dequantises with (zero points, global scales: ``fmt.dequant_companions``, in that order), as on
    disk."""

    value: torch.Tensor
    scale: torch.Tensor
    extras: tuple[torch.Tensor, ...] = ()

    def scale_of(self, e: int):
        """What ``fmt.dequant`` takes for expert ``e``: its scale, or (scale, *its other companions)."""
        return (self.scale[e], *(x[e] for x in self.extras)) if self.extras else self.scale[e]

    def map(self, fn) -> "HeldPart":
        """``fn`` applied to every stored tensor."""
        return HeldPart(fn(self.value), fn(self.scale), tuple(fn(x) for x in self.extras))


class HeldExperts:
    """A fused expert tensor of ``shape`` (memory layout, dequantised) held in ``fmt`` (a
    :class:`premoe.core.quant.QuantFormat`) as ``parts``, concatenated along rows when dequantised;
    ``transposed``: the stored parts are the memory layout with its last two dims swapped."""

    def __init__(
        self, fmt, parts: list[HeldPart], shape: tuple[int, ...], dtype: torch.dtype, transposed: bool = False
    ):
        self.fmt, self.parts, self.shape, self.dtype, self.transposed = fmt, parts, torch.Size(shape), dtype, transposed

    # -- what the experts forward asks of a weight tensor ---------------------------------------------

    def __getitem__(self, e) -> torch.Tensor:
        e = int(e)
        rows, cols = (self.shape[-1], self.shape[-2]) if self.transposed else (self.shape[-2], self.shape[-1])
        pieces = [self.fmt.dequant(p.value[e], p.scale_of(e), self.dtype) for p in self.parts]
        w = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
        w = w[:rows, :cols]
        return w.T.contiguous() if self.transposed else w

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.parts[0].value.device

    @property
    def is_meta(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        """Bytes held: the stored values, scales and other companions."""
        return sum(p.value.nbytes + p.scale.nbytes + sum(x.nbytes for x in p.extras) for p in self.parts)

    def dim(self) -> int:
        return len(self.shape)

    def to_(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> "HeldExperts":
        """Move the stored parts to ``device`` and compute in ``dtype`` from now on (in place)."""
        if device is not None:
            self.parts = [p.map(lambda t: t.to(device)) for p in self.parts]
        if dtype is not None:
            self.dtype = dtype
        return self

    def rows(self, ids: list[int]) -> list[HeldPart]:
        """The stored parts of experts at positions ``ids`` (copies)."""
        index = torch.tensor(ids, dtype=torch.long, device=self.device)
        return [p.map(lambda t: t.index_select(0, index)) for p in self.parts]

    def __repr__(self) -> str:
        return f"HeldExperts({self.fmt.label}, shape={list(self.shape)}, {self.nbytes} bytes held)"


def stored_part(fmt, encoded: dict[str, torch.Tensor]) -> HeldPart:
    """A re-fit's encoded parts (:meth:`premoe.moe.refit_weights.RefitWeights.encoded`) as one held part."""
    main = next(k for k in encoded if fmt.companion(k) is None)
    kinds = {c[1]: v for k, v in encoded.items() if (c := fmt.companion(k)) is not None}
    return HeldPart(encoded[main], kinds["scale"], tuple(kinds[k] for k in fmt.dequant_companions))


def held_refs(mat, name: str, slot: int):
    """Where the stored parts of expert tensor ``name`` at router slot ``slot`` are on disk (``mat``: a
    :class:`premoe.moe.selective.Materializer` of the checkpoint): per part ``((dtype, shape, pieces) of the
    values, (dtype, shape, pieces) of the scales)``, or ``None`` where the tensor cannot be held as stored
    (not quantised, converted by transformers, row blocks of a 2D fused tensor, a zero-computation expert
    without weights, a fused tensor with zero points or global scales). A part's refs are its values', its
    scales' and then each of ``fmt.dequant_companions``'."""
    src = mat.info.layout.sources[name]
    kinds = mat.info.quant.dequant_companions
    if src.converter is not None or not src.scales:
        return None
    if src.kind == "fused":
        if kinds or src.key not in src.scales or (src.rows or 1) != 1:
            return None
        value, scale_key = mat.tensors[src.key], src.scales[src.key]
        scale, per = mat.tensors[scale_key], mat._block_rows(scale_key, src)
        if per != 1:
            return None
        return [
            (
                (value.dtype, tuple(value.shape[1:]), value.rows([slot], 1)),
                (scale.dtype, tuple(scale.shape[1:]), scale.rows([slot], 1)),
            )
        ]
    keys = [src.parts.get((slot, p)) for p in range(src.n_parts)]
    if any(k is None or k not in src.scales or any(kind not in src.extras.get(k, {}) for kind in kinds) for k in keys):
        return None
    refs = []
    for k in keys:
        tensors = [mat.tensors[k], mat.tensors[src.scales[k]], *(mat.tensors[src.extras[k][kind]] for kind in kinds)]
        refs.append(tuple((t.dtype, tuple(t.shape), [(t.file, t.offset, t.nbytes)]) for t in tensors))
    return refs


def held_tensor(mat, name: str, slots: list[int], shape: tuple[int, ...], given, device=None):
    """The held expert tensor ``name`` (:class:`HeldExperts`) for router ``slots``, filled row
    by row into tensors allocated once: ``given(j, slot)`` returns a row's stored parts when it has them
    (kept rows, re-fitted rows), else the row is read from the checkpoint as stored. ``None`` where the
    tensor cannot be held (:func:`held_refs`)."""
    refs = [held_refs(mat, name, slot) for slot in slots]
    template = next((r for r in refs if r is not None), None)
    if template is None:
        return None

    def empty(ref):
        return torch.empty((len(slots), *ref[1]), dtype=TORCH_DTYPES[ref[0]], device=device)

    parts = [HeldPart(empty(v), empty(sc), tuple(empty(x) for x in extra)) for v, sc, *extra in template]
    for j, slot in enumerate(slots):
        have = given(j, slot)
        if have is not None:
            for dst, src in zip(parts, have):
                dst.value[j].copy_(src.value.view(dst.value.dtype) if src.value.dtype != dst.value.dtype else src.value)
                dst.scale[j].copy_(as_stored(src.scale, dst.scale.dtype))
                for d, x in zip(dst.extras, src.extras):
                    d[j].copy_(x.reshape(d[j].shape))
            continue
        if refs[j] is None or len(refs[j]) != len(parts):
            return None
        for dst, (v, sc, *extra) in zip(parts, refs[j]):
            stored_refs = ((dst.value[j], v), (dst.scale[j], sc), *((d[j], x) for d, x in zip(dst.extras, extra)))
            for t, (stored, shp, pieces) in stored_refs:
                if t.device.type == "cpu":
                    mat.reader.read_into(t, pieces)
                else:  # staged on the CPU, then copied to the device
                    t.copy_(mat.reader.tensor(stored, shp, pieces))
    return HeldExperts(mat.info.quant, parts, tuple(shape), mat.dtype, bool(mat.info.spec.packed_transposed))


class HeldWeight(HeldExperts):
    """A quantised checkpoint's linear weight (attention, dense MLP, shared experts) held as stored: one row of
    a :class:`HeldExperts` of shape ``(1, out, in)``, dequantised whole for each forward of its module and
    dropped after it (:func:`hold_linear`)."""

    def whole(self) -> torch.Tensor:
        return self[0]


def hold_linear(module: nn.Module, held: HeldWeight) -> None:
    """Hold ``module``'s (an ``nn.Linear``) weight as stored: the forward sees it dequantised, and between forwards
    only the stored bytes stay. Costs one dequantisation per call, as held experts do."""
    install(module, "weight", held)

    def before(mod, args):
        mod.__dict__["weight"] = held.whole()

    def after(mod, args, out):
        mod.__dict__["weight"] = held

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def install(module: nn.Module, leaf: str, held: HeldExperts) -> None:
    """Put ``held`` where ``module`` has the parameter ``leaf`` (the parameter goes)."""
    module._parameters.pop(leaf, None)
    module._buffers.pop(leaf, None)
    object.__setattr__(module, leaf, held)


def held_tensors(model: nn.Module):
    """(module, leaf, HeldExperts) for every held expert tensor of ``model``."""
    for mod in model.modules():
        for leaf, value in vars(mod).items():
            if isinstance(value, HeldExperts):
                yield mod, leaf, value


def held_to_(model: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
    """What ``model.to(device, dtype)`` does for its parameters, for its held expert tensors."""
    for _, _, held in held_tensors(model):
        held.to_(device, dtype)


def held_bytes(model: nn.Module) -> int:
    return sum(h.nbytes for _, _, h in held_tensors(model))


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every held expert tensor dequantised in full (for checks, not for serving)."""
    out = dict(model.state_dict())
    names = {id(m): n for n, m in model.named_modules()}
    for mod, leaf, held in held_tensors(model):
        prefix = names[id(mod)]
        whole = held.whole() if isinstance(held, HeldWeight) else torch.stack([held[e] for e in range(len(held))])
        out[f"{prefix}.{leaf}" if prefix else leaf] = whole
    return out
