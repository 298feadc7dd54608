"""Quantised checkpoints: block-scaled FP8 and MXFP4, read as they are published and written back unchanged.

premoe never re-quantises. Pruning copies the kept experts' quantised bytes and their scales in
lockstep, so an export is in the source's format and ``quantization_config`` is kept as is (what
vLLM/SGLang load for the original). Anything that runs the model (calibration, selective loading,
evaluation) dequantises one tensor at a time with the pure functions below, exactly as
transformers does on the CPU (fp32 product of the value and its block's scale, then the model's
dtype).

Formats, as published:

* ``quant_method: "fp8"`` (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, GLM-4.x-FP8...): ``*.weight`` in
  float8 (e4m3 or e5m2) with ``*.weight_scale_inv``, one float32 (or E8M0) scale per
  ``weight_block_size`` block ([128, 128] in DeepSeek-V3), or one per tensor without a block size.
  Fused 3D expert tensors carry ``<name>_scale_inv`` with a leading expert dimension.
* ``quant_method: "mxfp4"`` (GPT-OSS): fused expert tensors ``<name>_blocks`` [E, rows, G, 16]
  (two FP4 e2m1 values per byte, low nibble first) and ``<name>_scales`` [E, rows, G] (E8M0
  exponents, bias 127), 32 values per scale. The GPT-OSS experts hold the dequantised matrix
  transposed ([E, in, out]), as transformers' loader does.

Any other ``quant_method`` (GPTQ, AWQ, compressed-tensors, bitsandbytes...) is refused before any
work, never misread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from premoe.errors import CheckpointError, UnsupportedModelError

SUPPORTED_METHODS = ("fp8", "mxfp4")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # values per scale
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class QuantFormat:
    """How a checkpoint's weights are stored. ``method`` is ``None`` for plain floating-point weights."""

    method: str | None = None
    block: tuple[int, int] | None = None  # FP8 weight_block_size (None: one scale per tensor)

    @property
    def label(self) -> str:
        if self.method == "fp8":
            return f"fp8 (blocks {self.block[0]}x{self.block[1]})" if self.block else "fp8 (per tensor)"
        return self.method or "none"

    def companion(self, key: str) -> tuple[str, str] | None:
        """``(main key, kind)`` when ``key`` is a scale or block tensor belonging to another tensor.

        FP8: ``x.weight_scale_inv`` belongs to ``x.weight``, ``x.gate_up_proj_scale_inv`` to
        ``x.gate_up_proj``, and static activation scales (``x.input_scale``) to ``x.weight``.
        MXFP4: ``x_scales`` belongs to ``x_blocks`` (the blocks are the main tensor).
        """
        if self.method == "fp8":
            if key.endswith("_scale_inv"):
                return key.removesuffix("_scale_inv"), "scale"
            for suffix in (".input_scale", ".activation_scale"):
                if key.endswith(suffix):
                    return key.removesuffix(suffix) + ".weight", "activation"
        elif self.method == "mxfp4" and key.endswith("_scales"):
            return key.removesuffix("_scales") + "_blocks", "scale"
        return None

    def target(self, key: str) -> str:
        """The tensor name a main key stands for in memory (MXFP4 ``x_blocks`` -> ``x``)."""
        if self.method == "mxfp4" and key.endswith("_blocks"):
            return key.removesuffix("_blocks")
        return key


def quant_format(raw_config: dict[str, Any]) -> QuantFormat:
    """The checkpoint's quantisation, from its ``config.json``.

    Raises:
        UnsupportedModelError: a quantisation method premoe does not read, or a malformed FP8 block size.
    """
    qc = raw_config.get("quantization_config")
    if qc is None and isinstance(raw_config.get("text_config"), dict):
        qc = raw_config["text_config"].get("quantization_config")
    if not qc:
        return QuantFormat()
    if not isinstance(qc, dict):
        raise UnsupportedModelError("config.json has a quantization_config that is not an object; fix or remove it")
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method not in SUPPORTED_METHODS:
        raise UnsupportedModelError(
            f"quantization method {qc.get('quant_method')!r} is not supported: premoe reads unquantised checkpoints, "
            f"block-scaled FP8 (quant_method \"fp8\") and MXFP4 (\"mxfp4\"); dequantise the model first or use its "
            "unquantised release"
        )
    block = None
    if method == "fp8" and qc.get("weight_block_size") is not None:
        wb = qc["weight_block_size"]
        if not (isinstance(wb, (list, tuple)) and len(wb) == 2 and all(isinstance(b, int) and b > 0 for b in wb)):
            raise UnsupportedModelError(f"quantization_config.weight_block_size must be two positive integers, got {wb!r}")
        block = (int(wb[0]), int(wb[1]))
    return QuantFormat(method, block)


# ---------------------------------------------------------------------------------------------
# Shapes (checked before any work) and dequantisation (pure tensor functions)


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


def check_mxfp4_pair(name: str, blocks_shape, scale_name: str, scales_shape) -> None:
    blocks_shape, scales_shape = tuple(blocks_shape), tuple(scales_shape)
    if len(blocks_shape) < 2 or blocks_shape[-1] != MXFP4_GROUP // 2 or blocks_shape[:-1] != scales_shape:
        raise CheckpointError(
            f"{scale_name} has shape {list(scales_shape)} but {name} {list(blocks_shape)} needs "
            f"{list(blocks_shape[:-1])} (one scale per {MXFP4_GROUP} values); the MXFP4 tensors do not match"
        )


def _scale_values(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.uint8:  # E8M0 exponents stored as bytes
        return (scale.to(torch.float32) - 127.0).exp2()
    return scale.to(torch.float32)


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, dtype: torch.dtype) -> torch.Tensor:
    """[..., R, C] float8 weight times its [..., ceil(R/b0), ceil(C/b1)] block scales (or one scale)."""
    w = weight.to(torch.float32)
    s = _scale_values(scale)
    if block is None or s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    return (w * _expand(s, *w.shape[-2:], block)).to(dtype)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., G, 16] packed FP4 + [..., G] E8M0 scales -> [..., G * 32] values."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    b = blocks.to(torch.uint8)
    vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)  # [..., G, 32]
    out = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1))
    return out.flatten(-2).to(dtype)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int] | None, dtype=torch.float8_e4m3fn):
    """(float8 weight, float32 ``weight_scale_inv``) of ``w`` [..., R, C]: the layout DeepSeek-V3 publishes.
    Used to build test and benchmark checkpoints; premoe itself never quantises a model it prunes."""
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


def quantize_mxfp4(w: torch.Tensor):
    """(blocks uint8 [..., G, 16], scales uint8 [..., G]) of ``w`` [..., C] (C a multiple of 32), round to
    nearest FP4 value: the GPT-OSS hub layout. Used to build test checkpoints."""
    w = w.float()
    if w.shape[-1] % MXFP4_GROUP:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of {MXFP4_GROUP}, got {w.shape[-1]}")
    g = w.unflatten(-1, (-1, MXFP4_GROUP))  # [..., G, 32]
    amax = g.abs().amax(dim=-1).clamp_min(2.0**-126)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)  # largest FP4 magnitude is 6 = 1.5 * 2^2
    scaled = g / torch.exp2(exp).unsqueeze(-1)
    lut = torch.tensor(FP4_VALUES[:8])
    idx = (scaled.abs().unsqueeze(-1) - lut).abs().argmin(dim=-1)
    idx = idx + 8 * (scaled < 0).long() * (idx > 0).long()
    packed = (idx[..., 0::2] | (idx[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)
