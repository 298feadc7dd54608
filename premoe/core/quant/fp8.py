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

from premoe.core.quant.base import FP8_DTYPES, QuantFormat, linear_weight
from premoe.errors import CheckpointError, UnsupportedModelError


class Fp8Blocks(QuantFormat):
    """Block-scaled FP8; ``block`` is ``weight_block_size`` (``None``: one scale per tensor)."""

    method: ClassVar[str | None] = "fp8"

    def __init__(self, block: tuple[int, int] | None = None, ue8m0: bool = False):
        self.block = block
        self.ue8m0 = ue8m0  # scales are powers of two (``scale_fmt: "ue8m0"``, DeepSeek-V3.1)

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "Fp8Blocks":
        """Raises UnsupportedModelError: a malformed ``weight_block_size``."""
        wb = qc.get("weight_block_size")
        ue8m0 = str(qc.get("scale_fmt", "")).lower() == "ue8m0"
        if wb is None:
            return cls(None, ue8m0)
        if not (isinstance(wb, (list, tuple)) and len(wb) == 2 and all(isinstance(b, int) and b > 0 for b in wb)):
            raise UnsupportedModelError(
                f"quantization_config.weight_block_size must be two positive integers, got {wb!r}"
            )
        return cls((int(wb[0]), int(wb[1])), ue8m0)

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
        return (role.kind == "fused" and tensor.dim() == 3) or linear_weight(key, tensor, role)

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        q, s = quantize_fp8(tensor, self.block, ue8m0=self.ue8m0)
        return {key: q, f"{key}_scale_inv": s.float()}

    def config(self) -> dict[str, Any]:
        out = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(self.block) if self.block else None,
        }
        return {**out, "scale_fmt": "ue8m0"} if self.ue8m0 else out


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
    rows, cols = w.shape[-2:]
    if rows % block[0] == 0 and cols % block[1] == 0 and tuple(s.shape[-2:]) == (rows // block[0], cols // block[1]):
        # whole blocks: scale in place through a blocked view (no expanded copy of the scales)
        w.view(*w.shape[:-2], rows // block[0], block[0], cols // block[1], block[1]).mul_(s[..., :, None, :, None])
        return w.to(dtype)
    return (w * _expand(s, rows, cols, block)).to(dtype)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= ``x`` (> 0), exactly (DeepGEMM's ``ceil_to_ue8m0``: exponent plus one
    unless the mantissa is zero), within E8M0's range [2^-126, 2^127]."""
    mantissa, exponent = torch.frexp(x.float())  # x = m * 2^e, m in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent.clamp(-126, 127))


def quantize_fp8(
    w: torch.Tensor, block: tuple[int, int] | None, dtype=torch.float8_e4m3fn, ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 ``weight_scale_inv``) of ``w`` [..., R, C], as vLLM quantises blocks itself
    (``per_block_cast_to_fp8``, run eagerly in float32): zero-pad to whole blocks, each block's absolute
    maximum clamped to at least 1e-4, scale = amax / 448 (``ue8m0``: rounded up to a power of two), values
    multiplied by 1 / scale, clamped to the format's range and cast (round to nearest even). Blocks that
    do not divide the shape are padded, never left unquantised. ``block=None``: one scale per tensor."""
    x = w.float()
    fmax = torch.finfo(dtype).max
    if block is None:
        sf = x.abs().amax().clamp(min=1e-4) / fmax
        sf = pow2_ceil(sf) if ue8m0 else sf
        return (x * (1.0 / sf)).clamp(-fmax, fmax).to(dtype), sf.reshape(1)
    rows, cols = x.shape[-2:]
    gr, gc = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    pad = torch.nn.functional.pad(x, (0, gc * block[1] - cols, 0, gr * block[0] - rows))
    tiles = pad.unflatten(-1, (gc, block[1])).unflatten(-3, (gr, block[0]))  # [..., gr, b0, gc, b1]
    sf = tiles.abs().amax(dim=(-3, -1)).clamp(min=1e-4) / fmax  # [..., gr, gc]
    sf = pow2_ceil(sf) if ue8m0 else sf
    q = (tiles * (1.0 / sf)[..., :, None, :, None]).clamp(-fmax, fmax).to(dtype)
    q = q.flatten(-2).flatten(-3, -2)[..., :rows, :cols]
    return q.contiguous(), sf


def encode_scale(scale: torch.Tensor, like: torch.dtype) -> torch.Tensor:
    """Float32 scales stored as the checkpoint stores its own: float32/bf16 as they are, uint8 as E8M0
    exponents (the scales must then be powers of two: ``ue8m0``)."""
    if like == torch.uint8:
        mantissa, exponent = torch.frexp(scale.float())
        if not bool((mantissa == 0.5).all()):
            raise ValueError("E8M0 scales must be powers of two; quantise with ue8m0=True")
        return (exponent - 1 + 127).to(torch.uint8)
    return scale.to(like)


def as_stored(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in a checkpoint's ``dtype``: scales of E8M0 checkpoints (uint8) as exponent bytes."""
    if value.dtype == dtype:
        return value
    if dtype == torch.uint8 and value.is_floating_point():
        return encode_scale(value, dtype)
    return value.to(dtype)


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """[..., ceil(R/b0), ceil(C/b1)] block scales -> [..., R, C], one value per element."""
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]
