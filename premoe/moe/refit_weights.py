"""Re-fitted rows on disk: :class:`RefitWeights` holds the kept experts' re-fitted down projections (encoded in a
quantised checkpoint's own format), re-fitted router rows and ``--quantize``'s GPTQ parts, one safetensors file
per MoE layer, for the export, the task server and a pattern store's stored re-fits
(:mod:`premoe.moe.refit_checkpoint` makes them).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

PART = "weight"  # the key a re-fitted expert's parts are encoded under (``weight``, ``weight_scale_inv``...)


class RefitWeights:
    """Re-fitted down projections of the kept experts, one safetensors file per MoE layer in
    ``directory`` (default: a temporary one, removed by :meth:`close`; a pattern store's re-fits are
    kept): :meth:`get` gives expert ``e`` of ``layer`` in the in-memory layout of ``experts.down_proj[e]``
    and the model's dtype.

    On a quantised checkpoint a layer's re-fitted experts are stored in the checkpoint's own format
    (:meth:`put` with ``quant``; the file's metadata says which): :meth:`encoded` gives the stored parts an
    export writes, :meth:`get` what a reader of that export computes with (dequantised)."""

    def __init__(self, about: dict[str, Any], directory: str | Path | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="premoe-moe-refit-") if directory is None else None
        self.path = Path(self._tmp.name if self._tmp else directory)
        self.about = about
        self.experts: dict[int, list[int]] = {}  # layer -> re-fitted experts (original ids)
        self.routers: dict[int, list[str]] = {}  # layer -> router weights with re-fitted rows (in-memory names)
        self._formats: dict[int, tuple | None] = {}  # layer -> (format, transposed, dtype, shape) if quantised
        self._quantized: dict[int, set[str]] = {}  # layer -> checkpoint keys `--quantize` rounded by GPTQ

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
                    keys = list(g.keys())
                    out.experts[layer] = sorted({int(k.split(".")[0]) for k in keys if k.split(".")[0].isdigit()})
                    out.routers[layer] = sorted(k for k in keys if not k.split(".")[0].isdigit())
                    out._formats[layer] = _format_of(g.metadata() or {})
            except (SafetensorError, OSError, ValueError, KeyError) as e:
                raise StoreError(
                    f"store re-fit file {f} is corrupt ({e}); rerun `premoe refit` or pass `refit=False`"
                ) from None
        return out

    def put(
        self,
        layer: int,
        weights: dict[int, torch.Tensor],
        routers: dict[str, torch.Tensor] | None = None,
        quant: tuple | None = None,
    ) -> None:
        """Store a layer's re-fitted down projections ({expert: tensor}) and router rows ({in-memory name
        of the router weight: [kept, D] rows, kept experts ascending}). ``quant`` = (format, transposed,
        dtype): the checkpoint stores the down projections quantised (``transposed``: with their last two
        dimensions swapped on disk), so they are stored encoded as it would (from the given values, in
        float32 for precision) and read back dequantised to ``dtype``."""
        if not weights:
            return
        meta: dict[str, str] = {}
        if quant is None:
            tensors = {str(e): w.contiguous() for e, w in weights.items()}
            self._formats[layer] = None
        else:
            fmt, transposed, dtype = quant
            shape = tuple(next(iter(weights.values())).shape)
            tensors = {
                f"{e}.{part}": t.contiguous()
                for e, w in weights.items()
                for part, t in fmt.encode(PART, w.float(), transposed=transposed).items()
            }
            meta = {
                "quantization_config": json.dumps(fmt.config()),
                "transposed": str(int(transposed)),
                "dtype": str(dtype).removeprefix("torch."),
                "shape": json.dumps(list(shape)),
            }
            self._formats[layer] = (fmt, transposed, dtype, shape)
        tensors.update({n: r.contiguous() for n, r in (routers or {}).items()})
        save_file(tensors, self._file(layer), metadata=meta or None)
        self.experts[layer] = sorted(weights)
        self.routers[layer] = sorted(routers or {})

    def put_quantized(self, layer: int, parts: dict[str, dict[str, torch.Tensor]]) -> None:
        """Store a layer's kept expert weights as ``premoe prune --quantize`` rounded them: {checkpoint key:
        its stored parts} (:func:`premoe.moe.quantize.quantize_layer`)."""
        if not parts:
            return
        tensors = {f"{key}|{p}": t.contiguous() for key, d in parts.items() for p, t in d.items()}
        save_file(tensors, str(self.path / f"quant{layer}.safetensors"))
        self._quantized[layer] = set(parts)

    def quantized(self, layer: int | None, key: str) -> dict[str, torch.Tensor] | None:
        """Checkpoint key ``key``'s stored parts as :meth:`put_quantized` stored them, if it did."""
        if key not in self._quantized.get(layer, ()):
            return None
        with safe_open(str(self.path / f"quant{layer}.safetensors"), "pt") as f:
            return {k.split("|", 1)[1]: f.get_tensor(k) for k in f.keys() if k.split("|", 1)[0] == key}

    def encoded(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s stored parts, named as :meth:`QuantFormat.encode` names those of key :data:`PART`
        (``{"weight": tensor}`` on an unquantised checkpoint)."""
        with safe_open(self._file(layer), "pt") as f:
            if self._formats.get(layer) is None:
                return {PART: f.get_tensor(str(expert))}
            prefix = f"{expert}."
            return {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    def get(self, layer: int, expert: int) -> torch.Tensor:
        parts = self.encoded(layer, expert)
        found = self._formats.get(layer)
        if found is None:
            return parts[PART]
        fmt, transposed, dtype, shape = found
        return fmt.decode(parts, shape, dtype, transposed)

    def router(self, layer: int | None, name: str) -> torch.Tensor | None:
        """The re-fitted rows [kept, D] of router weight ``name`` (in-memory name) of ``layer``, if any."""
        if name not in self.routers.get(layer, ()):
            return None
        with safe_open(self._file(layer), "pt") as f:
            return f.get_tensor(name)

    def stored_quantized(self, layer: int) -> bool:
        """Whether ``layer``'s re-fitted experts are stored encoded in a quantised checkpoint's format."""
        return self._formats.get(layer) is not None

    def has(self, layer: int | None, expert: int | None) -> bool:
        return expert in self.experts.get(layer, ())

    def _file(self, layer: int) -> str:
        return str(self.path / f"layer{layer}.safetensors")

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _format_of(meta: dict[str, str]) -> tuple | None:
    """(format, transposed, dtype, shape) from a re-fit file's metadata (``None``: stored unquantised)."""
    if "quantization_config" not in meta:
        return None
    from premoe.core.quant import quant_format

    fmt = quant_format({"quantization_config": json.loads(meta["quantization_config"])})
    dtype = getattr(torch, meta["dtype"])
    return fmt, meta["transposed"] == "1", dtype, tuple(json.loads(meta["shape"]))
