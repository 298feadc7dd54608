"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``), as llm-compressor writes them.

Read:

* ``format: "float-quantized"`` FP8 weights, the layout many Qwen3 / GLM FP8 releases use: ``*.weight`` in
  float8 (e4m3) with ``*.weight_scale`` per tensor ([1]), per output channel ([out, 1]) or per block
  (``block_structure``, [ceil(out/b0), ceil(in/b1)]); static activation scales (``*.input_scale``) ride along.
* ``format: "pack-quantized"`` INT4 / INT8 weights (W4A16 / W8A16, as Kimi-K2-Thinking ships):
  ``*.weight_packed`` (int32, 32 / bits values per word, element i at bit i * bits, offset by 2^(bits-1)),
  ``*.weight_scale`` per group of ``group_size`` inputs ([out, in / group]) or per channel ([out, 1]),
  ``*.weight_shape`` (the unpacked shape); asymmetric ones (``W4A16_ASYM``) also ``*.weight_zero_point``, one
  per scale, packed the same way along the output rows ([ceil(out * bits / 32), groups]).

NVFP4 (``format: "nvfp4-pack-quantized"``) is in :mod:`premoe.core.quant.nvfp4`; the ``format`` dispatch
(:class:`premoe.core.quant.CompressedTensors`) in the package.

Dequantised as compressed-tensors does: each value in its scale's dtype, less its zero point, times the scale,
then the model's dtype. Refused in one line, naming what is read: every other format (``int-quantized``...),
other bit widths and strategies.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from premoe.core.quant.base import FP8_DTYPES, QuantFormat, linear_weight
from premoe.core.quant.fp8 import _expand, quantize_fp8
from premoe.errors import CheckpointError, UnsupportedModelError

STRATEGIES = ("tensor", "channel", "block")
READS = (
    'compressed-tensors "float-quantized" FP8 weights (tensor, channel or block scales), "pack-quantized" '
    'INT4/INT8 weights (group or channel scales, symmetric or with zero points) and "nvfp4-pack-quantized" '
    "NVFP4 weights (FP8 scales per 16 values and a global scale)"
)


def weight_scheme(qc: dict[str, Any]) -> dict[str, Any]:
    """The one weight quantisation scheme of a compressed-tensors config (its ``config_groups``).

    Raises:
        UnsupportedModelError: no weight scheme, or several different ones.
    """
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    weights = [g.get("weights") for g in groups if g.get("weights")]
    if not weights:
        raise UnsupportedModelError("compressed-tensors config_groups name no weight quantisation; fix the config")
    keys = ("type", "num_bits", "symmetric", "strategy", "group_size", "block_structure")
    kinds = {tuple(str(w.get(k)) for k in keys) for w in weights}
    if len(kinds) != 1:
        raise UnsupportedModelError(
            "compressed-tensors config_groups quantise weights in several ways; premoe reads one scheme per model"
        )
    return weights[0]


class CompressedFp8(QuantFormat):
    """compressed-tensors ``float-quantized`` FP8; ``strategy``: ``tensor``, ``channel`` or ``block`` (``block``:
    the weights' ``block_structure``)."""

    method: ClassVar[str | None] = "compressed-tensors"

    def __init__(self, strategy: str = "channel", block: tuple[int, int] | None = None):
        self.strategy, self.block = strategy, block

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "CompressedFp8":
        """Raises UnsupportedModelError: a strategy or weight type premoe does not read."""
        w = weight_scheme(qc)
        kind, bits, symmetric, strategy = w.get("type"), w.get("num_bits"), w.get("symmetric", True), w.get("strategy")
        if kind != "float" or bits != 8 or not symmetric or strategy not in STRATEGIES:
            raise UnsupportedModelError(
                f"compressed-tensors float-quantized weights of type {kind!r}, {bits} bits, symmetric={symmetric}, "
                f"strategy {strategy!r} are not supported: premoe reads {READS}"
            )
        if strategy == "block":
            block = tuple(w.get("block_structure") or ())
            if not (len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise UnsupportedModelError(
                    f"compressed-tensors block_structure must be two positive integers, got {list(block)}"
                )
            return cls(strategy, (int(block[0]), int(block[1])))
        return cls(strategy)

    @property
    def transformers_reloads(self) -> bool:
        """transformers' compressed-tensors loader cannot fuse per-expert block-scaled FP8 into its fused
        experts (its conversion fails on the source as on the export)."""
        return self.strategy != "block"

    @property
    def label(self) -> str:
        how = f"blocks {self.block[0]}x{self.block[1]}" if self.block else f"per {self.strategy}"
        return f"compressed-tensors fp8 ({how})"

    def companion(self, key: str) -> tuple[str, str] | None:
        """``x.weight_scale`` belongs to ``x.weight``; static activation scales (``x.input_scale``) to it too."""
        if key.endswith("weight_scale"):
            return key.removesuffix("_scale"), "scale"
        if key.endswith(".input_scale"):
            return key.removesuffix(".input_scale") + ".weight", "activation"
        return None

    def scale_shape(self, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        *lead, rows, cols = weight_shape
        if self.strategy == "tensor":
            return (*lead, 1)
        if self.strategy == "channel":
            return (*lead, rows, 1)
        return (*lead, math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))

    def check_tensor(self, key: str, info: Any, scale_key: str | None, scale_info: Any) -> None:
        if info.dtype not in FP8_DTYPES:
            return
        if scale_key is None:
            raise CheckpointError(f"{key} is stored in FP8 but has no {key}_scale; the checkpoint is incomplete")
        want, got = self.scale_shape(tuple(info.shape)), tuple(scale_info.shape)
        same = math.prod(got) == 1 if self.strategy == "tensor" else got in (want, want[:-1])
        if not same:
            raise CheckpointError(
                f"{scale_key} has shape {list(got)} but {key} {list(info.shape)} with {self.label} scales needs "
                f"{list(want)}; the checkpoint's scales do not match its quantization_config"
            )

    def dequant(self, value: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """As compressed-tensors dequantises: the values in the scale's dtype times their scale, then ``dtype``."""
        s = scale
        if self.strategy == "block":
            s = _expand(s, *value.shape[-2:], self.block)
        elif self.strategy == "channel":
            s = s.reshape(*value.shape[:-1], 1)
        else:
            s = s.reshape(*value.shape[:-2], 1, 1) if s.numel() > 1 else s.reshape(())
        return (value.to(s.dtype) * s).to(dtype)

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        return nbytes * itemsize if stored_dtype in FP8_DTYPES else nbytes

    def quantizes(self, key: str, tensor: torch.Tensor, role: Any) -> bool:
        """Every linear weight matrix (attention, dense and shared MLPs, every expert); not the embeddings, LM
        head, norms or router (llm-compressor's usual ``ignore``)."""
        return linear_weight(key, tensor, role)

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        """``key`` and ``key_scale``: blocks as vLLM quantises them (:func:`premoe.core.quant.fp8.quantize_fp8`);
        channels and tensors by the same rule over each row or the whole tensor."""
        if self.strategy == "block":
            q, s = quantize_fp8(tensor, self.block)
        elif self.strategy == "tensor":
            q, s = quantize_fp8(tensor, None)
        else:
            rows = tensor.shape[-2]
            q, s = quantize_fp8(tensor, (1, tensor.shape[-1]))  # one block per row: a scale per output channel
            s = s.reshape(*tensor.shape[:-2], rows, 1)
        return {key: q, f"{key}_scale": s.float()}

    def config(self) -> dict[str, Any]:
        weights: dict[str, Any] = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": self.strategy,
            "dynamic": False,
            "group_size": None,
            "block_structure": list(self.block) if self.block else None,
        }
        return {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": {
                        "num_bits": 8,
                        "type": "float",
                        "symmetric": True,
                        "dynamic": True,
                        "strategy": "token",
                    },
                }
            },
            "ignore": ["lm_head", "re:.*mlp.gate$"],
        }


class CompressedPacked(QuantFormat):
    """compressed-tensors ``pack-quantized``: ``bits``-bit integers (4 or 8) packed into int32, one scale per
    ``group`` inputs (``None``: per output channel); with ``symmetric=False`` also one zero point per scale
    (``weight_zero_point``, packed along the output rows: [ceil(out * bits / 32), groups])."""

    method: ClassVar[str | None] = "compressed-tensors"

    def __init__(self, bits: int = 4, group: int | None = 128, symmetric: bool = True):
        self.bits, self.group, self.symmetric = bits, group, symmetric

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "CompressedPacked":
        """Raises UnsupportedModelError: other bit widths, types or strategies."""
        w = weight_scheme(qc)
        kind, bits, symmetric, strategy = w.get("type"), w.get("num_bits"), w.get("symmetric", True), w.get("strategy")
        group = w.get("group_size")
        ok = kind == "int" and bits in (4, 8) and strategy in ("group", "channel")
        if not ok or (strategy == "group" and not (isinstance(group, int) and group > 0)):
            raise UnsupportedModelError(
                f"compressed-tensors pack-quantized weights of type {kind!r}, {bits} bits, symmetric={symmetric}, "
                f"strategy {strategy!r}, group_size {group!r} are not supported: premoe reads {READS}"
            )
        return cls(int(bits), int(group) if strategy == "group" else None, bool(symmetric))

    @property
    def dequant_companions(self) -> tuple[str, ...]:
        return () if self.symmetric else ("zero",)

    @property
    def transformers_reloads(self) -> bool:
        """transformers cannot fuse packed per-expert weights into its fused experts (source or export)."""
        return False

    @property
    def per_word(self) -> int:
        return 32 // self.bits

    @property
    def label(self) -> str:
        how = f"groups of {self.group}" if self.group else "per channel"
        return f"compressed-tensors int{self.bits} ({how}{'' if self.symmetric else ', zero points'})"

    def companion(self, key: str) -> tuple[str, str] | None:
        """``x.weight_scale`` and ``x.weight_shape`` belong to ``x.weight_packed`` (the main tensor)."""
        for suffix, kind in (("weight_scale", "scale"), ("weight_shape", "shape"), ("weight_zero_point", "zero")):
            if key.endswith(suffix):
                return key.removesuffix(suffix) + "weight_packed", kind
        return None

    def target(self, key: str) -> str:
        """``x.weight_packed`` stands for ``x.weight`` in memory."""
        return key.removesuffix("_packed") if key.endswith("weight_packed") else key

    def check_tensor(self, key: str, info: Any, scale_key: str | None, scale_info: Any) -> None:
        if not key.endswith("weight_packed"):
            super().check_tensor(key, info, scale_key, scale_info)
            return
        if info.dtype != "I32" or scale_key is None:
            raise CheckpointError(f"{key} must be int32 with a {key.removesuffix('_packed')}_scale beside it")
        *lead, rows, words = info.shape
        cols = words * self.per_word
        want = (*lead, rows, 1) if self.group is None else (*lead, rows, -(-cols // self.group))
        if tuple(scale_info.shape) != want or (self.group is not None and cols % self.group):
            raise CheckpointError(
                f"{scale_key} has shape {list(scale_info.shape)} but {key} {list(info.shape)} ({cols} inputs) with "
                f"{self.label} scales needs {list(want)}; the group size does not divide the inputs or the scales "
                "do not match the quantization_config"
            )

    def check_companion(self, key: str, info: Any, kind: str, companion: str, companion_info: Any) -> None:
        """Zero points: only on asymmetric weights, packed along the rows, one per scale."""
        if kind != "zero":
            return
        if self.symmetric:
            raise CheckpointError(f"{companion} is a zero point but the quantization_config says symmetric weights")
        *lead, rows, words = info.shape
        groups = 1 if self.group is None else -(-(words * self.per_word) // self.group)
        want = (*lead, -(-rows // self.per_word), groups)
        if tuple(companion_info.shape) != want or companion_info.dtype != "I32":
            raise CheckpointError(
                f"{companion} has shape {list(companion_info.shape)} ({companion_info.dtype}) but {key} "
                f"{list(info.shape)} needs int32 {list(want)}; the zero points do not match the weights"
            )

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """int32 words -> the signed integers they hold, [..., words * 32 / bits] (little-endian bit order)."""
        raw = packed.contiguous().view(torch.uint8)
        if self.bits == 4:
            raw = torch.stack((raw & 0x0F, raw >> 4), dim=-1).flatten(-2)
        return raw.to(torch.int16) - (1 << (self.bits - 1))

    def pack(self, q: torch.Tensor) -> torch.Tensor:
        """Signed integers [..., C] -> int32 words (C padded to whole words): the inverse of :meth:`unpack`."""
        cols = q.shape[-1]
        u = (q.to(torch.int16).contiguous() + (1 << (self.bits - 1))).to(torch.uint8)
        u = torch.nn.functional.pad(u, (0, -cols % self.per_word))  # padding: zero bits, after the offset
        if self.bits == 4:
            u = u[..., 0::2] | (u[..., 1::2] << 4)
        return u.contiguous().view(-1).view(torch.int32).reshape(*u.shape[:-1], -1)  # 1-D view: any leading shape

    def dequant(self, value: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
        """As compressed-tensors dequantises: the integers in the scale's dtype, less their zero point
        (``scale`` = (scale, packed zero points) for asymmetric weights), times their scale, then ``dtype``
        ([..., words * 32 / bits] columns; a group size dividing the inputs, as checked, leaves none over)."""
        zero = None
        if isinstance(scale, tuple):
            scale, packed_zero = scale
            rows = value.shape[-2]
            zero = self.unpack(packed_zero.transpose(-1, -2)).transpose(-1, -2)[..., :rows, :].to(scale.dtype)
        q = self.unpack(value).to(scale.dtype)
        group = self.group or q.shape[-1]
        cols = scale.shape[-1] * group
        q = q[..., :cols]
        if zero is not None:
            q = q - zero.repeat_interleave(group, dim=-1)[..., :cols]
        return (q * scale.repeat_interleave(group, dim=-1)).to(dtype)

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        return nbytes * (self.per_word // 4) * itemsize if key.endswith("weight_packed") else nbytes

    def quantizes(self, key: str, tensor: torch.Tensor, role: Any) -> bool:
        """The experts' weight matrices (W4A16 releases keep attention in bf16)."""
        return tensor.dim() == 2 and key.endswith(".weight") and role.kind == "expert"

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        """``key_packed``, ``key_scale`` (bf16) and ``key_shape``, round to nearest as compressed-tensors does
        (:func:`premoe.core.quant.gptq.round_to_nearest`)."""
        from premoe.core.quant.gptq import round_to_nearest

        cols = tensor.shape[-1]
        if self.group is not None and cols % self.group:
            raise ValueError(f"group size {self.group} does not divide {cols} inputs")
        if not self.symmetric:
            q, scale, zero = _asymmetric(tensor, self.bits, self.group)
            return {
                **self.parts(key, q, scale),
                f"{key}_zero_point": self.pack(zero.transpose(-1, -2)).transpose(-1, -2),
            }
        q, scale = round_to_nearest(tensor, self.bits, self.group)
        return self.parts(key, q, scale)

    def parts(self, key: str, q: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of integers ``q`` [..., out, in] with bf16 scales [..., out, in / group]."""
        rows, cols = q.shape[-2:]
        return {
            f"{key}_packed": self.pack(q),
            f"{key}_scale": scale.reshape(*q.shape[:-2], rows, -1),
            f"{key}_shape": torch.tensor([rows, cols], dtype=torch.int64),
        }

    def config(self) -> dict[str, Any]:
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": self.bits,
                        "type": "int",
                        "symmetric": self.symmetric,
                        "strategy": "group" if self.group else "channel",
                        "group_size": self.group,
                        "dynamic": False,
                    },
                }
            },
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$", "re:.*shared_expert.*"],
        }


def _asymmetric(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compressed-tensors' asymmetric round to nearest of ``w`` [..., out, in]: per group, min and max (each
    widened to include 0), scale = (max - min) / (2^bits - 1) in bf16 (0 becomes bf16's eps), zero point =
    round(q_min - min / scale) clamped to the range, q = clamp(round(w / scale + zero point)). Returns integers
    (int16), scales [..., out, groups] and zero points [..., out, groups] (int16)."""
    from premoe.core.quant.gptq import grid

    x = w.float()
    g = x.unflatten(-1, (-1, group)) if group is not None else x.unsqueeze(-2)
    lo, hi = grid(bits)
    mn = g.amin(-1).clamp(max=0.0)
    mx = g.amax(-1).clamp(min=0.0)
    scale = ((mx - mn) / (hi - lo)).to(torch.bfloat16)
    eps = torch.tensor(torch.finfo(torch.bfloat16).eps, dtype=torch.bfloat16)
    scale = torch.where(scale == 0, eps, scale)
    sf = scale.float()
    zero = torch.clamp(torch.round(lo - mn / sf), lo, hi)
    q = torch.clamp(torch.round(g / sf.unsqueeze(-1) + zero.unsqueeze(-1)), lo, hi).flatten(-2)
    return q.to(torch.int16), scale, zero.to(torch.int16)
