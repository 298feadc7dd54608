"""What a quantisation format is to premoe: a class with a fixed contract (transformers' ``HfQuantizer`` idea).

Every caller asks the checkpoint's format (``info.quant``) rather than comparing method names. The base
class is the unquantised checkpoint (:class:`Plain`); :mod:`premoe.core.quant.fp8` and
:mod:`premoe.core.quant.mxfp4` override what their published layouts need.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from premoe.errors import CheckpointError

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


class QuantFormat:
    """How a checkpoint's weights are stored (this base: plain floating-point weights).

    Hooks: :meth:`companion` and :meth:`target` (which keys are scales, and which in-memory tensor a key
    stands for), :meth:`check_tensor` (a tensor and its scale agree, before any work), :meth:`dequant`
    (one tensor to the compute dtype), :meth:`resident_bytes` (what a stored tensor takes once
    dequantised), and for building hub-layout checkpoints :meth:`quantizes` / :meth:`encode` /
    :meth:`config`.
    """

    method: ClassVar[str | None] = None  # the config's quant_method
    transposes: ClassVar[bool] = False  # whether ``encode(..., transposed=True)`` swaps the last two dims
    requantizes: ClassVar[bool] = True  # whether a re-fitted weight can be written back in this format

    @property
    def transformers_reloads(self) -> bool:
        """Whether transformers can load a checkpoint in this format with fused experts (the export self-check
        reloads it there; where transformers cannot load the source either, premoe's read-back is the check)."""
        return True

    @property
    def quantized(self) -> bool:
        return self.method is not None

    @property
    def dequant_companions(self) -> tuple[str, ...]:
        """Companion kinds besides ``scale`` that :meth:`dequant` needs (``"zero"``: then its ``scale`` argument
        is the tuple (scale, zero point) as stored)."""
        return ()

    @property
    def label(self) -> str:
        return self.method or "none"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(vars(self).items()))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    # -- keys ---------------------------------------------------------------------------------------

    def companion(self, key: str) -> tuple[str, str] | None:
        """``(main key, kind)`` when ``key`` is a scale (``"scale"``) or static activation scale
        (``"activation"``) belonging to another tensor, else ``None``."""
        return None

    def target(self, key: str) -> str:
        """The tensor name a main key stands for in memory."""
        return key

    # -- checks ---------------------------------------------------------------------------------------

    def check_tensor(self, key: str, info: Any, scale_key: str | None, scale_info: Any) -> None:
        """Raise :class:`CheckpointError` unless ``key`` (a :class:`premoe.core.checkpoint.TensorInfo`) and
        its scale agree with this format. The base refuses FP8 tensors: the config must say how to read them."""
        if info.dtype in FP8_DTYPES:
            raise CheckpointError(
                f"{key} is stored in FP8 but config.json has no fp8 quantization_config; add it or "
                "re-download the config"
            )

    def check_companion(self, key: str, info: Any, kind: str, companion: str, companion_info: Any) -> None:
        """Raise :class:`CheckpointError` unless companion ``companion`` (of ``kind`` other than ``scale``:
        ``zero``, ``shape``, ``activation``) fits its main tensor ``key``. The base accepts them."""

    # -- values ---------------------------------------------------------------------------------------

    def dequant(self, value: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``value`` and its ``scale`` as a ``dtype`` tensor."""
        raise CheckpointError(f"{self.label} checkpoints have no scales to apply")

    def resident_bytes(self, key: str, stored_dtype: str, nbytes: int, itemsize: int) -> int:
        """Bytes ``key`` (``nbytes`` on disk) takes in memory once dequantised to ``itemsize`` bytes per value."""
        return nbytes

    # -- writing hub-layout checkpoints (tests and benchmarks) ----------------------------------------

    def quantizes(self, key: str, tensor: torch.Tensor, role: Any) -> bool:
        """Whether the published layout stores ``key`` (a tensor of ``role``) quantised."""
        return False

    def encode(self, key: str, tensor: torch.Tensor, transposed: bool = False) -> dict[str, torch.Tensor]:
        """The checkpoint tensors that store ``tensor`` in this format (``transposed``: its last two dims are
        swapped on disk, as GPT-OSS publishes packed experts)."""
        return {key: tensor}

    def config(self) -> dict[str, Any] | None:
        """The ``quantization_config`` of a checkpoint in this format."""
        return None

    def rounding_grid(self) -> Any:
        """The grid GPTQ rounds a re-fitted weight [out, in] onto before :meth:`encode` writes it (``scale``,
        ``snap`` and ``group`` as :func:`premoe.core.quant.gptq.gptq_on_grid` takes them), where encoding the
        rounded values gives them back exactly; ``None``: the re-fit is rounded to nearest by :meth:`encode`."""
        return None

    def decode(
        self, parts: dict[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, transposed: bool = False
    ) -> torch.Tensor:
        """The ``dtype`` tensor of ``shape`` (in-memory orientation) that ``encode(key, t, transposed)`` stored as
        ``parts``: what a reader of a checkpoint holding those parts computes with."""
        scales = {c[0]: v for k, v in parts.items() if (c := self.companion(k)) is not None and c[1] == "scale"}
        extra = {(c[0], c[1]): v for k, v in parts.items() if (c := self.companion(k)) is not None}
        main = next(k for k in parts if self.companion(k) is None)
        wanted = [extra[(main, kind)] for kind in self.dequant_companions if (main, kind) in extra]
        scale = (scales[main], *wanted) if wanted else scales.get(main)
        value = self.dequant(parts[main], scale, torch.float32) if main in scales else parts[main]
        transposed = transposed and self.transposes
        rows, cols = (shape[-1], shape[-2]) if transposed else (shape[-2], shape[-1])
        value = value[..., :rows, :cols]  # blocks padded past the shape
        return (value.transpose(-1, -2) if transposed else value).to(dtype)


def linear_weight(key: str, tensor: torch.Tensor, role: Any) -> bool:
    """Whether ``key`` is a linear weight matrix FP8 releases quantise: attention, dense and shared MLPs, every
    expert; not the embeddings, LM head, norms or router."""
    return (
        tensor.dim() == 2
        and key.endswith(".weight")
        and role.kind in ("expert", "other")
        and "embed" not in key
        and "lm_head" not in key
        and "norm" not in key
    )


class Plain(QuantFormat):
    """Unquantised weights (bf16, fp16, fp32)."""
