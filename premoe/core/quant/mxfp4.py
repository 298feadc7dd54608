"""MXFP4 (``quant_method: "mxfp4"``), as GPT-OSS publishes it.

Fused expert tensors as ``<name>_blocks`` [E, rows, G, 16] (two FP4 e2m1 values per byte, low nibble
first) and ``<name>_scales`` [E, rows, G] (E8M0 exponents, bias 127), 32 values per scale, packed along
the input dimension (families that hold such experts transposed in memory say so in their family row,
:attr:`premoe.moe.arch.ArchSpec.packed_transposed`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from premoe.core.quant.base import QuantFormat
from premoe.errors import CheckpointError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # values per scale


class Mxfp4(QuantFormat):
    method: ClassVar[str | None] = "mxfp4"
    transposes: ClassVar[bool] = True

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "Mxfp4":
        return cls()

    def companion(self, key: str) -> tuple[str, str] | None:
        """``x_scales`` belongs to ``x_blocks`` (the blocks are the main tensor)."""
        if key.endswith("_scales"):
            return key.removesuffix("_scales") + "_blocks", "scale"
        return None

    def target(self, key: str) -> str:
        """``x_blocks`` stands for ``x`` in memory."""
        return key.removesuffix("_blocks") if key.endswith("_blocks") else key

    def check_tensor(self, key: str, info: Any, scale_key: str | None, scale_info: Any) -> None:
        if not key.endswith("_blocks"):
            super().check_tensor(key, info, scale_key, scale_info)
            return
        if scale_key is None:
            raise CheckpointError(f"{key} is MXFP4 but has no {key.removesuffix('_blocks')}_scales")
        check_mxfp4_pair(key, info.shape, scale_key, scale_info.shape)

    def dequant(self, value: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequant_mxfp4(value, scale, dtype)  # [..., rows, cols]

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        return nbytes * 2 * itemsize if key.endswith("_blocks") else nbytes  # two values per byte on disk

    def quantizes(self, key: str, tensor: torch.Tensor, role: Any) -> bool:
        """The fused expert matrices (not their biases)."""
        return role.kind == "fused" and tensor.dim() == 3 and not key.endswith("_bias")

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        blocks, scales = quantize_mxfp4(tensor.transpose(-1, -2).contiguous() if transposed else tensor)
        return {f"{key}_blocks": blocks, f"{key}_scales": scales}

    def rounding_grid(self) -> "Mxfp4Grid":
        """GPTQ rounds re-fitted experts onto MXFP4's grid (groups of 32 inputs)."""
        return Mxfp4Grid()

    def config(self) -> dict[str, Any]:
        return {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        }


def check_mxfp4_pair(name: str, blocks_shape, scale_name: str, scales_shape) -> None:
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 2 or blocks_shape[-1] != MXFP4_GROUP // 2 or blocks_shape[:-1] != scales_shape:
        raise CheckpointError(
            f"{scale_name} has shape {list(scales_shape)} but {name} {list(blocks_shape)} needs "
            f"{list(blocks_shape[:-1])} (one scale per {MXFP4_GROUP} values); the MXFP4 tensors do not match"
        )


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., G, 16] packed FP4 + [..., G] E8M0 scales -> [..., G * 32] values."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)  # [..., G, 32]
    out = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return out.flatten(-2).to(dtype)


FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between consecutive FP4 magnitudes


def mxfp4_scale(g: torch.Tensor) -> torch.Tensor:
    """The float32 power-of-two scale of each group [...] of ``g`` [..., 32] (already cast to bf16 and back):
    max|x| / 6 rounded up to a power of two (ROUND_UP; 0 for an all-zero group)."""
    dequant_scale = g.abs().amax(dim=-1) / 6.0
    bits = (dequant_scale.view(torch.int32) + 0x007FFFFF) & 0x7F800000  # 2^ceil(log2): ROUND_UP
    return bits.view(torch.float32)


def fp4_codes(q: torch.Tensor) -> torch.Tensor:
    """FP4 codes (magnitude index in bits 0-2, sign in bit 3) of the nearest FP4 value of ``q``, ties away from
    zero, saturating at 6; negative values that round to zero keep their sign bit."""
    magnitude = torch.bucketize(q.abs(), torch.tensor(FP4_MIDPOINTS, device=q.device), right=True)  # ties up
    return (magnitude | (torch.signbit(q).long() << 3)).to(torch.uint8)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks uint8 [..., G, 16], scales uint8 [..., G]) of ``w`` [..., C] along its last dimension, as
    OpenAI's and transformers' quantiser (``downcast_to_mxfp_torch``, ROUND_UP) writes GPT-OSS: the values
    cast to bf16 first; per 32 values, scale = max|x| / 6 rounded up to a power of two (0 for an all-zero
    group); x times 1 / scale to the nearest FP4 value, ties away from zero, saturating at 6; sign bit set
    for negative values (including those that round to zero); low nibble first. A last dimension that 32
    does not divide is zero-padded: G = ceil(C / 32)."""
    x = w.to(torch.bfloat16).float()
    cols = x.shape[-1]
    groups = -(-cols // MXFP4_GROUP)
    g = torch.nn.functional.pad(x, (0, groups * MXFP4_GROUP - cols)).unflatten(-1, (groups, MXFP4_GROUP))
    scale = mxfp4_scale(g)
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    code = fp4_codes(g * inverse.unsqueeze(-1))
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, (scale.view(torch.int32) >> 23).to(torch.uint8)


class Mxfp4Grid:
    """MXFP4's values for GPTQ (:func:`premoe.core.quant.gptq.gptq_on_grid`, groups of 32 inputs): a group's
    scale and a column's nearest value by :func:`quantize_mxfp4`'s rules, so that quantising the rounded
    weights again gives back exactly those values (their group maxima give the same or a smaller power of
    two under which every value is still on the grid)."""

    group: int = MXFP4_GROUP

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return mxfp4_scale(w.to(torch.bfloat16).float())

    def snap(self, col: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        inverse = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=col.device)
        return lut[fp4_codes(col.to(torch.bfloat16).float() * inverse).long()] * scale
