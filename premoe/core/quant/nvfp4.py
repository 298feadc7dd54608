"""NVFP4 weights (FP4 e2m1, two per byte, an e4m3 scale per 16 inputs and a float32 scale per tensor), in the two
layouts they are published in:

* compressed-tensors ``format: "nvfp4-pack-quantized"`` (llm-compressor's NVFP4A16 / NVFP4):
  ``*.weight_packed`` (uint8, low nibble first), ``*.weight_scale`` (e4m3, [out, in / 16]) and
  ``*.weight_global_scale`` (float32): value = fp4 x (scale / global scale);
* NVIDIA ModelOpt (``quant_method: "modelopt"``, NVIDIA's FP4 releases): ``*.weight`` (uint8),
  ``*.weight_scale`` and ``*.weight_scale_2`` (float32, the inverse of the global scale):
  value = fp4 x scale x scale_2.

The per-tensor scale is a second dequant companion (``"global"``) beside the per-group scale. Re-fitted experts
are written back with compressed-tensors' own quantiser rules (:func:`quantize_nvfp4`), each expert's down
projection with a global scale of its own, as it has in the published layouts.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from premoe.core.quant.base import FP8_DTYPES, QuantFormat
from premoe.core.quant.compressed import READS, weight_scheme
from premoe.core.quant.mxfp4 import FP4_MIDPOINTS, FP4_VALUES
from premoe.errors import CheckpointError, UnsupportedModelError

NVFP4_GROUP = 16  # values per FP8 scale
FP8_MAX = 448.0
FP4_MAX = 6.0


class CompressedNvfp4(QuantFormat):
    """compressed-tensors ``nvfp4-pack-quantized``: FP4 (e2m1) weights, two per byte, an FP8 (e4m3) scale per 16
    inputs and a float32 global scale per tensor."""

    method: ClassVar[str | None] = "compressed-tensors"

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "CompressedNvfp4":
        """Raises UnsupportedModelError: anything but symmetric FP4 in groups of 16."""
        w = weight_scheme(qc)
        kind, bits, symmetric, group = w.get("type"), w.get("num_bits"), w.get("symmetric", True), w.get("group_size")
        if kind != "float" or bits != 4 or not symmetric or group != NVFP4_GROUP:
            raise UnsupportedModelError(
                f"compressed-tensors nvfp4-pack-quantized weights of type {kind!r}, {bits} bits, "
                f"symmetric={symmetric}, group_size {group!r} are not supported: premoe reads {READS}"
            )
        return cls()

    @property
    def transformers_reloads(self) -> bool:
        """transformers cannot fuse packed per-expert weights into its fused experts (source or export)."""
        return False

    @property
    def label(self) -> str:
        return "compressed-tensors nvfp4 (groups of 16)"

    @property
    def dequant_companions(self) -> tuple[str, ...]:
        return ("global",)

    def companion(self, key: str) -> tuple[str, str] | None:
        """``x.weight_scale`` and ``x.weight_global_scale`` belong to ``x.weight_packed``; so does the static
        activation scale ``x.input_global_scale``."""
        for suffix, kind in (("weight_global_scale", "global"), ("weight_scale", "scale")):
            if key.endswith(suffix):
                return key.removesuffix(suffix) + "weight_packed", kind
        if key.endswith("input_global_scale"):
            return key.removesuffix("input_global_scale") + "weight_packed", "activation"
        return None

    def target(self, key: str) -> str:
        return key.removesuffix("_packed") if key.endswith("weight_packed") else key

    def check_tensor(self, key: str, info: Any, scale_key: str | None, scale_info: Any) -> None:
        if info.dtype != "U8":
            super().check_tensor(key, info, scale_key, scale_info)
            return
        if scale_key is None:
            raise CheckpointError(f"{key} is packed FP4 but has no scale beside it; the checkpoint is incomplete")
        *lead, rows, half = info.shape
        want = (*lead, rows, half * 2 // NVFP4_GROUP)
        if tuple(scale_info.shape) != want or (half * 2) % NVFP4_GROUP or scale_info.dtype not in FP8_DTYPES:
            raise CheckpointError(
                f"{scale_key} has shape {list(scale_info.shape)} ({scale_info.dtype}) but {key} {list(info.shape)} "
                f"({half * 2} inputs) needs float8 {list(want)}: one scale per 16 inputs"
            )

    def check_companion(self, key: str, info: Any, kind: str, companion: str, companion_info: Any) -> None:
        if kind == "global" and (math.prod(companion_info.shape) != 1 or companion_info.dtype != "F32"):
            raise CheckpointError(
                f"{companion} has shape {list(companion_info.shape)} ({companion_info.dtype}) but a global scale is "
                "one float32 value"
            )

    def dequant(self, value: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
        """fp4 x (scale / global scale), in float32 as compressed-tensors computes it, then ``dtype``
        (``scale`` = (FP8 scales, global scale) as stored)."""
        scale, global_scale = scale
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=value.device)
        b = value.to(torch.uint8)
        q = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)
        s = scale.to(torch.float32) / global_scale.to(torch.float32).reshape(*([1] * scale.dim()))
        return (q * s.repeat_interleave(NVFP4_GROUP, dim=-1)).to(dtype)

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        return nbytes * 2 * itemsize if key.endswith("weight_packed") else nbytes

    def quantizes(self, key: str, tensor: torch.Tensor, role: Any) -> bool:
        """The experts' weight matrices (a test checkpoint in the layout; NVIDIA's releases also quantise
        attention)."""
        return tensor.dim() == 2 and key.endswith(".weight") and role.kind == "expert"

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        """``key_packed``, ``key_scale`` and ``key_global_scale`` by compressed-tensors' recipe
        (:func:`quantize_nvfp4`)."""
        packed, scale, global_scale = quantize_nvfp4(tensor)
        return {f"{key}_packed": packed, f"{key}_scale": scale, f"{key}_global_scale": global_scale}

    def config(self) -> dict[str, Any]:
        return {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 4,
                        "type": "float",
                        "symmetric": True,
                        "strategy": "tensor_group",
                        "group_size": NVFP4_GROUP,
                        "dynamic": False,
                    },
                }
            },
            "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$", "re:.*shared_expert.*"],
        }


class ModelOptNvfp4(CompressedNvfp4):
    """NVIDIA ModelOpt's own NVFP4 layout (``quant_method: "modelopt"``, ``quant_algo: "NVFP4"`` or
    ``"W4A16_NVFP4"``; NVIDIA's FP4 releases): ``*.weight`` uint8 (two FP4 e2m1 values per byte, low nibble
    first), ``*.weight_scale`` e4m3 per 16 inputs and ``*.weight_scale_2`` float32 per tensor (the inverse of
    compressed-tensors' global scale): value = fp4 x scale x scale_2, as vLLM's ModelOpt kernels compute it."""

    method: ClassVar[str | None] = "modelopt"
    ALGOS: ClassVar[tuple[str, ...]] = ("NVFP4", "W4A16_NVFP4")

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "ModelOptNvfp4":
        """Raises UnsupportedModelError: another ModelOpt algorithm or group size."""
        inner = qc.get("quantization") if isinstance(qc.get("quantization"), dict) else qc
        algo = str(inner.get("quant_algo", "")).upper()
        group = inner.get("group_size", NVFP4_GROUP)
        if algo not in cls.ALGOS or group != NVFP4_GROUP:
            raise UnsupportedModelError(
                f"ModelOpt quant_algo {inner.get('quant_algo')!r} with group_size {group!r} is not supported: premoe "
                f"reads ModelOpt {' and '.join(cls.ALGOS)} in groups of {NVFP4_GROUP}; dequantise the model first"
            )
        return cls()

    @property
    def label(self) -> str:
        return "modelopt nvfp4 (groups of 16)"

    def companion(self, key: str) -> tuple[str, str] | None:
        """``x.weight_scale`` and ``x.weight_scale_2`` belong to ``x.weight``; so does ``x.input_scale``."""
        for suffix, kind in (("weight_scale_2", "global"), ("weight_scale", "scale")):
            if key.endswith(suffix):
                return key.removesuffix(suffix) + "weight", kind
        if key.endswith(".input_scale"):
            return key.removesuffix(".input_scale") + ".weight", "activation"
        return None

    def target(self, key: str) -> str:
        return key

    def dequant(self, value: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
        """fp4 x scale x scale_2 in float32, then ``dtype`` (``scale`` = (e4m3 scales, scale_2) as stored)."""
        scale, scale_2 = scale
        return super().dequant(value, (scale, 1.0 / scale_2.to(torch.float32)), dtype)

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        return nbytes * 2 * itemsize if stored_dtype == "U8" else nbytes

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        """``key`` (uint8), ``key_scale`` and ``key_scale_2`` (= 1 / compressed-tensors' global scale)."""
        parts = super().encode(key, tensor, transposed)
        return {
            key: parts[f"{key}_packed"],
            f"{key}_scale": parts[f"{key}_scale"],
            f"{key}_scale_2": (1.0 / parts[f"{key}_global_scale"]).reshape(()),
        }

    def config(self) -> dict[str, Any]:
        return {
            "quant_method": "modelopt",
            "quant_algo": "NVFP4",
            "group_size": NVFP4_GROUP,
            "exclude_modules": ["lm_head", "*self_attn*", "*mlp.gate", "*shared_expert*"],
        }


def round_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """FP4 (e2m1) codes [..] (uint8: magnitude index in bits 0-2, sign in bit 3) of the nearest FP4 value of ``x``,
    saturating at 6, ties to even as compressed-tensors' ``cast_to_fp4`` rounds (0.25 -> 0, 0.75 -> 1, 1.25 -> 1,
    1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4). A negative value that rounds to zero keeps its sign bit."""
    a = x.abs()
    mids = torch.tensor(FP4_MIDPOINTS, dtype=a.dtype, device=a.device)
    up = torch.bucketize(a, mids, right=False)  # ties toward zero ...
    tie = (a.unsqueeze(-1) == mids).any(-1)
    magnitude = torch.where(tie & (up % 2 == 1), up + 1, up)  # ... except where the code above is the even one
    return (magnitude | (torch.signbit(x).long() << 3)).to(torch.uint8)


def quantize_nvfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` [..., rows, cols] as NVFP4 by compressed-tensors' rules (``generate_gparam``, ``calculate_qparams``,
    ``_quantize`` with ``cast_to_fp4``), in float32: global scale = 448 x 6 / max|w| (1 for an all-zero tensor);
    per 16 inputs, scale = max|x| / 6 x global scale clamped to 448 and cast to e4m3 (a zero scale stored as
    0.125, e4m3's eps); values x / (scale / global scale), clamped to +-6, to the nearest FP4 value, ties to
    even. Returns (packed codes [..., rows, cols / 2] uint8, low nibble first; e4m3 scales [..., rows, cols /
    16]; the float32 global scale [1]).

    Raises:
        ValueError: ``cols`` is not a multiple of 16.
    """
    x = w.float()
    cols = x.shape[-1]
    if cols % NVFP4_GROUP:
        raise ValueError(f"NVFP4 needs a multiple of {NVFP4_GROUP} inputs, got {cols}")
    amax = x.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    global_scale = FP8_MAX * FP4_MAX / amax
    if not torch.isfinite(global_scale):
        global_scale = torch.ones_like(global_scale)
    g = x.unflatten(-1, (-1, NVFP4_GROUP))
    scale = (g.abs().amax(-1) / FP4_MAX * global_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    scale = torch.where(scale.float() == 0, 0.125, scale.float()).to(torch.float8_e4m3fn)
    q = (g / (scale.float() / global_scale).unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX)
    code = round_to_fp4(q).flatten(-2)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed, scale, global_scale.reshape(1)
