"""compressed-tensors checkpoints (``quant_method: "compressed-tensors"``), as llm-compressor writes them.

Read: ``format: "float-quantized"`` FP8 weights, the layout many Qwen3 / GLM FP8 releases use: ``*.weight``
in float8 (e4m3) with ``*.weight_scale`` per tensor ([1]), per output channel ([out, 1]) or per block
(``block_structure``, [ceil(out/b0), ceil(in/b1)]); static activation scales (``*.input_scale``) ride along.
Dequantised as compressed-tensors does: the fp32 product of each value and its scale, then the model's dtype.

Refused in one line, naming what is read: every other compressed-tensors format (``pack-quantized`` INT4/INT8,
``nvfp4-pack-quantized``, ``int-quantized``...), asymmetric or non-8-bit float weights, other strategies.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from premoe.core.quant.base import FP8_DTYPES, QuantFormat
from premoe.core.quant.fp8 import dequant_fp8, quantize_fp8
from premoe.errors import CheckpointError, UnsupportedModelError

STRATEGIES = ("tensor", "channel", "block")
READS = 'compressed-tensors "float-quantized" FP8 weights (tensor, channel or block scales)'


class CompressedFp8(QuantFormat):
    """compressed-tensors ``float-quantized`` FP8; ``strategy``: ``tensor``, ``channel`` or ``block`` (``block``:
    the weights' ``block_structure``)."""

    method: ClassVar[str | None] = "compressed-tensors"

    def __init__(self, strategy: str = "channel", block: tuple[int, int] | None = None):
        self.strategy, self.block = strategy, block

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> "CompressedFp8":
        """Raises UnsupportedModelError: a format, strategy or weight type premoe does not read."""
        fmt = qc.get("format")
        if fmt != "float-quantized":
            raise UnsupportedModelError(
                f"compressed-tensors format {fmt!r} is not supported: premoe reads {READS}; dequantise the model "
                "first or use another release"
            )
        groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
        weights = [g.get("weights") for g in groups if g.get("weights")]
        if not weights:
            raise UnsupportedModelError("compressed-tensors config_groups name no weight quantisation; fix the config")
        kinds = {(w.get("type"), w.get("num_bits"), w.get("symmetric", True), w.get("strategy")) for w in weights}
        blocks = {tuple(w.get("block_structure") or ()) for w in weights}
        if len(kinds) != 1 or len(blocks) != 1:
            raise UnsupportedModelError(
                "compressed-tensors config_groups quantise weights in several ways; premoe reads one scheme per model"
            )
        (kind, bits, symmetric, strategy), block = kinds.pop(), blocks.pop()
        if kind != "float" or bits != 8 or not symmetric or strategy not in STRATEGIES:
            raise UnsupportedModelError(
                f"compressed-tensors weights of type {kind!r}, {bits} bits, symmetric={symmetric}, strategy "
                f"{strategy!r} are not supported: premoe reads {READS}"
            )
        if strategy == "block":
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
        if self.strategy == "block":
            return dequant_fp8(value, scale, self.block, dtype)
        s = scale.to(torch.float32)
        if self.strategy == "channel":
            s = s.reshape(*value.shape[:-1], 1)
        else:
            s = s.reshape(*value.shape[:-2], 1, 1) if s.numel() > 1 else s.reshape(())
        return (value.to(torch.float32) * s).to(dtype)

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        return nbytes * itemsize if stored_dtype in FP8_DTYPES else nbytes

    def quantizes(self, key: str, tensor: torch.Tensor, role: Any) -> bool:
        """Every linear weight matrix (attention, dense and shared MLPs, every expert); not the embeddings, LM
        head, norms or router (llm-compressor's usual ``ignore``)."""
        return (
            tensor.dim() == 2
            and key.endswith(".weight")
            and role.kind in ("expert", "other")
            and "embed" not in key
            and "lm_head" not in key
            and "norm" not in key
        )

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
