"""Looking at an MoE model directory (no weights loaded).

:func:`inspect_model` reads ``config.json`` and the safetensors headers, builds the model skeleton on
the meta device to learn which decoder layers are MoE (transformers' own rule: DeepSeek's leading
dense layers, Qwen's ``mlp_only_layers``...), classifies every checkpoint key and fingerprints the
model by hashing its router tensors. :func:`premoe.moe.loading.load_model` then loads weights and tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from premoe.core.checkpoint import ByteReader, Checkpoint, tensor_bytes
from premoe.core.config import config_from_dict, meta_model, read_config, text_part
from premoe.core.quant import Plain, QuantFormat, quant_format
from premoe.moe.arch import ArchSpec, RouterSpec, router_spec
from premoe.moe.families import resolve
from premoe.moe.layout import CheckpointLayout, KeyRole, expert_slots, map_checkpoint

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

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """What differs between this model and the one a pattern store was built for (``stored``: the
        store's record of it), as ``"<what> <this model's> vs <the store's>"``."""
        out = []
        for key in ("model_type", "architecture", "num_layers", "num_experts", "top_k", "moe_layers"):
            mine, theirs = getattr(self, key), stored.get(key)
            if key == "moe_layers":
                theirs = tuple(theirs or ())
            if mine != theirs:
                out.append(f"{key} {mine} vs {theirs}")
        if not out and self.router_sha256 != stored.get("router_sha256"):
            out.append(
                f"router weights differ (hash {self.router_sha256[:12]} vs {str(stored.get('router_sha256'))[:12]})"
            )
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
    quant: QuantFormat = field(default_factory=Plain)
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
    model, prefix, num_layers = meta_model(json.dumps(model_raw, sort_keys=True, default=str), config_type)
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
    return ModelInfo(
        path, raw, config, spec, rspec, num_layers, moe, prefix, ckpt, layout, fp, quant, config_type, text_key
    )


def as_info(model) -> ModelInfo:
    """The :class:`ModelInfo` of a path, a ModelInfo, or a loaded model (anything with ``.info``)."""
    if isinstance(getattr(model, "info", None), ModelInfo):
        return model.info
    if isinstance(model, ModelInfo):
        return model
    return inspect_model(model)
