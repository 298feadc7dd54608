"""A model directory's ``config.json`` and what transformers builds from it, without weights: the config
object, the module skeleton on the meta device, and the tokenizer; devices and dtypes named by users."""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.core.modules import decoder_layers
from premoe.errors import CheckpointError, InputError, MissingFileError


def text_part(raw: dict[str, Any], text_key: str | None) -> dict[str, Any]:
    """The language model's config of a release (its ``text_config`` when multimodal, with the wrapper's
    word-embedding tying, which the wrapper's head follows)."""
    if not text_key:
        return raw
    text = dict(raw[text_key])
    if "tie_word_embeddings" in raw:
        text["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return text


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json"
    if not path.exists():
        raise MissingFileError(f"model directory {path} does not exist")
    if not cfg_path.is_file():
        raise MissingFileError(f"{path} has no config.json; point `model` at a HuggingFace model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object")
    return raw


def config_from_dict(raw: dict[str, Any], model_type: str):
    """A transformers config for ``raw`` read with ``model_type``'s config class, without premoe's own
    block and without quantisation (premoe handles quantised tensors itself)."""
    from transformers import AutoConfig, PretrainedConfig

    raw = {k: v for k, v in raw.items() if k not in ("premoe", "model_type", "quantization_config", "auto_map")}
    raw = PretrainedConfig._decode_special_floats(raw)  # {"__float__": "Infinity"}, as transformers writes it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoConfig.for_model(model_type, **raw)
    except Exception as e:  # noqa: BLE001 - also huggingface_hub's strict-dataclass validation errors
        raise CheckpointError(f"transformers cannot read this config.json as {model_type}: {e}") from None


def skeleton(config) -> nn.Module:
    """The causal-LM module tree on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


@lru_cache(maxsize=4)
def meta_model(config_json: str, model_type: str) -> tuple[nn.Module, str, int]:
    """(meta-device model, decoder prefix, number of decoder layers), cached per config."""
    model = skeleton(config_from_dict(json.loads(config_json), model_type))
    layers = decoder_layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    return model, prefix, len(layers)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"``: the current accelerator if there is one, else the CPU."""
    if device is None or str(device) == "auto":
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        return acc if acc is not None and torch.accelerator.is_available() else torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise InputError(f"invalid device {device!r}: {e}") from None


def resolve_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"invalid dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise MissingFileError(f"cannot load the tokenizer of {path}: {e}") from None
