"""Quantised checkpoints, read as they are published: one class per format, looked up by ``quant_method``.

Pruning copies the kept experts' quantised bytes and their scales in lockstep, so an export is in the
source's format and ``quantization_config`` is kept as is (what vLLM/SGLang load for the original).
Anything that runs the model dequantises one tensor at a time through the format's :meth:`dequant`.
Formats: :class:`~premoe.core.quant.base.Plain` (no ``quantization_config``),
:class:`~premoe.core.quant.fp8.Fp8Blocks` (``"fp8"``), :class:`~premoe.core.quant.mxfp4.Mxfp4`
(``"mxfp4"``), compressed-tensors (``"compressed-tensors"``: :class:`~premoe.core.quant.compressed.CompressedFp8`
for ``float-quantized`` FP8, :class:`~premoe.core.quant.compressed.CompressedPacked` for symmetric or asymmetric
``pack-quantized`` INT4/INT8, :class:`~premoe.core.quant.compressed.CompressedNvfp4` for NVFP4),
:class:`~premoe.core.quant.compressed.ModelOptNvfp4` (``"modelopt"`` NVFP4). Any other ``quant_method`` or
compressed-tensors format (GPTQ, AWQ, bitsandbytes...) is refused before any work, never misread.
"""

from __future__ import annotations

from typing import Any, ClassVar

from premoe.core.quant.base import FP8_DTYPES, Plain, QuantFormat
from premoe.core.quant.compressed import READS, CompressedFp8, CompressedPacked
from premoe.core.quant.fp8 import Fp8Blocks, check_fp8_pair, dequant_fp8, fp8_scale_shape, quantize_fp8
from premoe.core.quant.mxfp4 import FP4_VALUES, MXFP4_GROUP, Mxfp4, check_mxfp4_pair, dequant_mxfp4, quantize_mxfp4
from premoe.core.quant.nvfp4 import CompressedNvfp4, ModelOptNvfp4
from premoe.errors import UnsupportedModelError

# compressed-tensors' ``format`` -> the class that reads it
CT_FORMATS: dict[str, type] = {
    "float-quantized": CompressedFp8,
    "pack-quantized": CompressedPacked,
    "nvfp4-pack-quantized": CompressedNvfp4,
}


class CompressedTensors:
    """``quant_method: "compressed-tensors"``: the class of its ``format`` (:data:`CT_FORMATS`)."""

    method: ClassVar[str] = "compressed-tensors"

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> QuantFormat:
        """Raises UnsupportedModelError: a format or scheme premoe does not read."""
        fmt = qc.get("format")
        if fmt not in CT_FORMATS:
            raise UnsupportedModelError(
                f"compressed-tensors format {fmt!r} is not supported: premoe reads {READS}; dequantise the model "
                "first or use another release"
            )
        return CT_FORMATS[fmt].from_config(qc)


FORMATS: dict[str, type] = {
    "fp8": Fp8Blocks,
    "mxfp4": Mxfp4,
    "compressed-tensors": CompressedTensors,
    "modelopt": ModelOptNvfp4,
}

__all__ = [
    "FORMATS",
    "FP8_DTYPES",
    "FP4_VALUES",
    "MXFP4_GROUP",
    "QuantFormat",
    "Plain",
    "Fp8Blocks",
    "CompressedFp8",
    "CompressedNvfp4",
    "ModelOptNvfp4",
    "CompressedPacked",
    "CompressedTensors",
    "Mxfp4",
    "quant_format",
    "check_fp8_pair",
    "check_mxfp4_pair",
    "dequant_fp8",
    "dequant_mxfp4",
    "fp8_scale_shape",
    "quantize_fp8",
    "quantize_mxfp4",
]


def quant_format(raw_config: dict[str, Any]) -> QuantFormat:
    """The checkpoint's format, from its ``config.json`` (``quantization_config``, or the text config's).

    Raises:
        UnsupportedModelError: a quantisation method premoe does not read, or a malformed config.
    """
    qc = raw_config.get("quantization_config")
    if qc is None and isinstance(raw_config.get("text_config"), dict):
        qc = raw_config["text_config"].get("quantization_config")
    if not qc:
        return Plain()
    if not isinstance(qc, dict):
        raise UnsupportedModelError("config.json has a quantization_config that is not an object; fix or remove it")
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    if method not in FORMATS:
        names = ", ".join(f'"{m}"' for m in FORMATS)
        raise UnsupportedModelError(
            f"quantization method {qc.get('quant_method')!r} is not supported: premoe reads unquantised checkpoints "
            f"and quant_method {names}; dequantise the model first or use its unquantised release"
        )
    return FORMATS[method].from_config(qc)
