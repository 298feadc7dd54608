"""Looking at a model directory (no weights loaded) and loading it.

:func:`inspect_model` reads ``config.json`` and the safetensors headers, builds the model skeleton on
the meta device to learn which decoder layers are MoE (transformers' own rule: DeepSeek's leading
dense layers, Qwen's ``mlp_only_layers``...), classifies every checkpoint key and fingerprints the
model by hashing its router tensors. :func:`premoe.core.loading.load_model` then loads weights and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.core.checkpoint import ByteReader, Checkpoint, tensor_bytes
from premoe.core.layout import CheckpointLayout, KeyRole, expert_slots, map_checkpoint
from premoe.core.modules import decoder_layers
from premoe.core.quant import QuantFormat, quant_format
from premoe.errors import CheckpointError, InputError, MissingFileError
from premoe.moe.arch import ArchSpec, RouterSpec, router_spec
from premoe.moe.families import resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of a model for pattern stores: shapes plus a hash of every router tensor."""

    model_type: str
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    router_sha256: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelFingerprint":
        d = dict(d)
        d["moe_layers"] = tuple(d["moe_layers"])
        return cls(**d)

    def differences(self, other: "ModelFingerprint") -> list[str]:
        out = []
        for key in ("model_type", "architecture", "num_layers", "num_experts", "top_k", "moe_layers"):
            a, b = getattr(self, key), getattr(other, key)
            if a != b:
                out.append(f"{key} {b} vs {a}")
        if not out and self.router_sha256 != other.router_sha256:
            out.append(f"router weights differ (hash {other.router_sha256[:12]} vs {self.router_sha256[:12]})")
        return out


@dataclass
class ModelInfo:
    """Everything premoe knows about a model directory without loading its weights."""

    path: Path
    raw_config: dict[str, Any]
    config: Any  # transformers PretrainedConfig
    spec: ArchSpec
    router: RouterSpec
    num_layers: int
    moe_layers: list[int]
    decoder_prefix: str
    checkpoint: Checkpoint
    layout: CheckpointLayout
    fingerprint: ModelFingerprint
    quant: QuantFormat = field(default_factory=QuantFormat)
    config_type: str = ""  # the model_type whose config class reads the language model's config
    text_key: str | None = None  # "text_config" when the checkpoint wraps its language model (multimodal releases)

    @property
    def model_config(self) -> dict[str, Any]:
        """The language model's part of ``config.json`` (all of it, unless the release is multimodal)."""
        return text_part(self.raw_config, self.text_key)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def roles(self) -> dict[str, KeyRole]:
        return self.layout.roles

    def slots(self, kept: list[int]) -> list[int]:
        """Router slots a layer keeps with these experts (zero-computation experts always stay)."""
        return expert_slots(kept, self.router.num_experts, self.router.width)


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
        raise MissingFileError(f"{path} has no config.json; point --model at a HuggingFace model directory")
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
def _meta_model(config_json: str, model_type: str) -> tuple[nn.Module, str, int]:
    """(meta-device model, decoder prefix, number of decoder layers), cached per config."""
    model = skeleton(config_from_dict(json.loads(config_json), model_type))
    layers = decoder_layers(model)
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    return model, prefix, len(layers)


def _hash_routers(ckpt: Checkpoint, roles: dict[str, KeyRole], moe_layers: list[int]) -> str:
    h = hashlib.sha256()
    by_layer: dict[int, list[str]] = {}
    for name, role in roles.items():
        if role.kind == "router":
            by_layer.setdefault(role.layer, []).append(name)
    with ByteReader() as reader:
        for layer in moe_layers:
            for name in sorted(by_layer.get(layer, []), key=lambda n: roles[n].target or n):
                info = ckpt.tensors[name]
                label = (roles[name].target or name).rsplit(".", 1)[-1]
                h.update(f"{layer}:{label}:{info.dtype}:{list(info.shape)};".encode())
                h.update(tensor_bytes(ckpt.raw(name, reader)))
    return h.hexdigest()


def inspect_model(path: str | Path) -> ModelInfo:
    """Read a model directory's config and checkpoint layout; no weights are loaded.

    Raises:
        MissingFileError: no directory, config.json or safetensors weights.
        UnsupportedModelError: the family is not in :data:`premoe.moe.families.ARCH_SPECS`, or its weights
            are quantised with a method premoe does not read.
        CheckpointError: corrupt files, or weights that do not match config.json.
    """
    path = Path(path)
    raw = read_config(path)
    spec, config_type, text_key = resolve(raw)  # before transformers sees it: a clear error for any family
    quant = quant_format(raw)
    model_raw = text_part(raw, text_key)
    config = config_from_dict(model_raw, config_type)
    rspec = router_spec(config, spec)
    ckpt = Checkpoint(path)
    model, prefix, num_layers = _meta_model(json.dumps(model_raw, sort_keys=True, default=str), config_type)
    layout = map_checkpoint(ckpt.tensors, model, spec, quant, rspec.num_experts, rspec.width, prefix, num_layers)
    moe = sorted(layout.moe)
    fp = ModelFingerprint(
        model_type=spec.name,
        architecture=(raw.get("architectures") or [type(config).__name__])[0],
        num_layers=num_layers,
        moe_layers=tuple(moe),
        num_experts=rspec.num_experts,
        top_k=rspec.top_k,
        router_sha256=_hash_routers(ckpt, layout.roles, moe),
    )
    return ModelInfo(path, raw, config, spec, rspec, num_layers, moe, prefix, ckpt, layout, fp, quant, config_type, text_key)


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


def as_info(model) -> ModelInfo:
    """The :class:`ModelInfo` of a path, a ModelInfo, or a loaded model (anything with ``.info``)."""
    if isinstance(getattr(model, "info", None), ModelInfo):
        return model.info
    if isinstance(model, ModelInfo):
        return model
    return inspect_model(model)
