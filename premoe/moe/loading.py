"""Loading a whole model into memory (transformers' loader, or premoe's byte-range builder for quantised
and wrapped checkpoints), with its tokenizer and layout."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
from premoe.moe.arch import MoeLayer, find_moe_layers
from premoe.moe.model import ModelInfo, inspect_model


@dataclass
class LoadedModel:
    """A model in memory with everything premoe needs to observe or prune it."""

    info: ModelInfo
    model: Any  # transformers PreTrainedModel
    tokenizer: Any

    @property
    def layers(self) -> list[MoeLayer]:
        return find_moe_layers(self.model, self.info.spec)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load_model(
    path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto"
) -> LoadedModel:
    """Load a supported MoE checkpoint, its tokenizer and layout, ready for inference.

    Args:
        path: local HuggingFace model directory (safetensors).
        device: where to put it (default: the accelerator if any, else CPU).
        dtype: ``"auto"`` (the checkpoint's) or a torch dtype name.
    """
    from transformers import AutoModelForCausalLM

    info = inspect_model(path)
    dev = resolve_device(device)
    tokenizer = load_tokenizer(info.path)
    if info.quant.quantized or info.text_key or info.config_type != info.raw_config.get("model_type"):
        # transformers cannot (or, for quantised weights on a CPU, should not) load it itself: build it
        # from byte ranges, dequantising one tensor at a time
        from premoe.moe.selective import ByteReader, build_model

        dt = resolve_dtype(dtype)
        dt = None if dt == "auto" else dt
        with ByteReader() as reader:  # dequantised straight to the dtype asked for, not through the stored one
            model = build_model(info, None, reader, dtype=dt)
        model.to(device=dev, dtype=dt)
    else:
        kwargs: dict[str, Any] = {}
        if dev.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            kwargs["device_map"] = str(dev)  # load straight onto the device
        model = AutoModelForCausalLM.from_pretrained(info.path, dtype=resolve_dtype(dtype), **kwargs)
        if dev.type != "cpu" and "device_map" not in kwargs:
            model.to(dev)
    model.eval()
    from premoe.moe.kernels import select_kernel

    select_kernel(model)
    return LoadedModel(info, model, tokenizer)


def as_loaded(model: str | Path | LoadedModel, device=None, dtype="auto") -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model, device=device, dtype=dtype)
