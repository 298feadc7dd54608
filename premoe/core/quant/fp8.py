"""Block-scaled FP8 (``quant_method: "fp8"``), as DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8 and GLM-4.x-FP8 publish it.

``*.weight`` in float8 (e4m3 or e5m2) with ``*.weight_scale_inv``, one float32 (or E8M0) scale per
``weight_block_size`` block ([128, 128] in DeepSeek-V3), or one per tensor without a block size. Fused 3D
expert tensors carry ``<name>_scale_inv`` with a leading expert dimension. Dequantised as transformers
does on the CPU: the fp32 product of the value and its block's scale, then the model's dtype.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from premoe.core.quant.base import FP8_DTYPES, QuantFormat
from premoe.errors import CheckpointError, UnsupportedModelError


class Fp8Blocks(QuantFormat):
    """Block-scaled FP8; ``block`` is ``weight_block_size`` (``None``: one scale per tensor)."""

    method: ClassVar[str | None] = "fp8"

    def __init__(self, block: tuple[int, int] | None = None):
        self.block = block

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "Fp8Blocks":
        """Raises UnsupportedModelError: a malformed ``weight_block_size``."""
        wb = qc.get("weight_block_size")
        if wb is None:
            return cls(None)
        if not (isinstance(wb, (list, tuple)) and len(wb) == 2 and all(isinstance(b, int) and b > 0 for b in wb)):
            raise UnsupportedModelError(
                f"quantization_config.weight_block_size must be two positive integers, got {wb!r}"
            )
        return cls((int(wb[0]), int(wb[1])))

    @property
    def label(self) -> str:
        return f"fp8 (blocks {self.block[0]}x{self.block[1]})" if self.block else "fp8 (per tensor)"

    def companion(self, key: str) -> tuple[str, str] | None:
        """``x.weight_scale_inv`` belongs to ``x.weight``, ``x.gate_up_proj_scale_inv`` to ``x.gate_up_proj``,
        static activation scales (``x.input_scale``) to ``x.weight``."""
        if key.endswith("_scale_inv"):
            return key.removesuffix("_scale_inv"), "scale"
        for suffix in (".input_scale", ".activation_scale"):
            if key.endswith(suffix):
                return key.removesuffix(suffix) + ".weight", "activation"
        return None

    def check_tensor(self, key: str, info: Any, scale_key: str | None, scale_info: Any) -> None:
        if info.dtype not in FP8_DTYPES:
            return
        if scale_key is None:
            raise CheckpointError(f"{key} is stored in FP8 but has no {key}_scale_inv; the checkpoint is incomplete")
        check_fp8_pair(key, info.shape, scale_key, scale_info.shape, self.block)

    def dequant(self, value: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequant_fp8(value, scale, self.block, dtype)

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        return nbytes * itemsize if stored_dtype in FP8_DTYPES else nbytes  # one byte per value on disk

    def quantizes(self, key: str, tensor: torch.Tensor, role: Any) -> bool:
        """Every linear weight matrix (attention, dense and shared MLPs, every expert, fused experts); not the
        embeddings, LM head, norms or router."""
        if role.kind == "fused" and tensor.dim() == 3:
            return True
        return (
            tensor.dim() == 2
            and key.endswith(".weight")
            and role.kind in ("expert", "other")
            and "embed" not in key
            and "lm_head" not in key
            and "norm" not in key
        )

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        q, s = quantize_fp8(tensor, self.block)
        return {key: q, f"{key}_scale_inv": s.float()}

    def config(self) -> dict[str, Any]:
        return {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block) if self.block else None,
        }


def fp8_scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int] | None) -> tuple[int, ...] | None:
    """The scale shape a block-scaled FP8 tensor of ``weight_shape`` must have (``None``: per tensor)."""
    if block is None or len(weight_shape) < 2:
        return None
    *lead, rows, cols = weight_shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def check_fp8_pair(name: str, weight_shape, scale_name: str, scale_shape, block) -> None:
    """Raise :class:`CheckpointError` unless ``scale_shape`` matches ``weight_shape``'s blocks."""
    want = fp8_scale_shape(tuple(weight_shape), block)
    got = tuple(scale_shape)
    ok = (math.prod(got) == 1) if want is None else got == want
    if not ok:
        what = f"blocks of {block[0]}x{block[1]}" if block else "one scale per tensor"
        raise CheckpointError(
            f"{scale_name} has shape {list(got)} but {name} {list(weight_shape)} in {what} needs "
            f"{list(want) if want else [1]}; the checkpoint's scales do not match its weight_block_size "
            "(re-download it or fix quantization_config)"
        )


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # E8M0 exponents stored as bytes
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequant_fp8(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype
) -> torch.Tensor:
    """[..., R, C] float8 weight times its [..., ceil(R/b0), ceil(C/b1)] block scales (or one scale)."""
    w = weight.to(torch.float32)
    s = _scale_values(scale)
    if block is None or s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    return (w * _expand(s, *w.shape[-2:], block)).to(dtype)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None, dtype=torch.float8_e4m3fn):
    """(float8 weight, float32 ``weight_scale_inv``) of ``w`` [..., R, C]: the layout DeepSeek-V3 publishes.
    Used to build test and benchmark checkpoints."""
    w = w.float()
    fmax = torch.finfo(dtype).max
    if block is None:
        scale = (w.abs().amax() / fmax).clamp_min(1e-12)
        return (w / scale).to(dtype), scale.reshape(1)
    rows, cols = w.shape[-2:]
    gr, gc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    pad = torch.nn.functional.pad(w, (0, gc * block[1] - cols, 0, gr * block[0] - rows))
    tiles = pad.unflatten(-1, (gc, block[1])).unflatten(-3, (gr, block[0]))  # [..., gr, b0, gc, b1]
    scale = (tiles.abs().amax(dim=(-3, -1)) / fmax).clamp_min(1e-12)  # [..., gr, gc]
    return (w / _expand(scale, rows, cols, block)).to(dtype), scale


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[..., ceil(R/b0), ceil(C/b1)] block scales -> [..., R, C], one value per element."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
