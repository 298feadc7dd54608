"""Building a model straight from safetensors, reading only the tensors a task needs.

The model skeleton is created on the meta device (no memory), then every parameter is read from
the checkpoint's byte ranges directly into its final storage: non-expert weights as they are,
routers sliced to the kept rows, and each MoE layer's fused expert tensors ([N, 2I, H] ...)
assembled from the kept experts only, whether the checkpoint stores one key per expert
(``experts.{e}.gate_proj.weight``...) or fused 3D tensors (GPT-OSS, Granite). The full model never
exists in memory, and :class:`ByteReader` counts every byte read.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import find_moe_layers
from .checkpoint import ByteReader, Pieces, TensorInfo
from .errors import CheckpointError, UnsupportedModelError
from .kernels import select_kernel
from .modelio import ModelInfo
from .plans import PrunePlan
from .surgery import config_updates


@dataclass(frozen=True)
class Source:
    """Where a (possibly assembled) tensor's bytes are."""

    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[Path, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(p[2] for p in self.pieces)


class CheckpointMap:
    """Maps in-memory parameter names of a model to checkpoint byte ranges."""

    def __init__(self, info: ModelInfo):
        self.info = info
        spec = info.spec
        self.block_prefix = {m: f"{info.decoder_prefix}.{m}.{spec.block_attr}" for m in info.moe_layers}
        self.plain: dict[str, str] = {}  # in-memory name -> checkpoint key (non-expert tensors)
        self.router: dict[tuple[int, str], str] = {}  # (layer, leaf) -> key
        self.per_expert: dict[tuple[int, int, str], str] = {}  # (layer, expert, rest) -> key
        self.fused: dict[tuple[int, str], str] = {}  # (layer, rest) -> key
        disk_blocks = [b for b in spec.disk_blocks if b != spec.block_attr]
        for name, role in info.roles.items():
            if role.kind == "router":
                self.router[(role.layer, role.rest.rsplit(".", 1)[-1])] = name
            elif role.kind == "expert":
                self.per_expert[(role.layer, role.expert, role.rest)] = name
            elif role.kind == "fused":
                self.fused[(role.layer, role.rest)] = name
            elif role.kind == "other":
                mem = name
                if role.layer in self.block_prefix:
                    for b in disk_blocks:
                        mem = mem.replace(f".{role.layer}.{b}.", f".{role.layer}.{spec.block_attr}.", 1)
                self.plain[mem] = name

    def _info(self, key: str) -> TensorInfo:
        return self.info.checkpoint.tensors[key]

    def router_source(self, layer: int, leaf: str, rows: list[int] | None) -> Source:
        key = self.router.get((layer, leaf))
        if key is None:
            raise CheckpointError(f"no router tensor {leaf!r} for MoE layer {layer} in the checkpoint")
        t = self._info(key)
        rows = list(range(t.shape[0])) if rows is None else rows
        return Source(t.dtype, (len(rows), *t.shape[1:]), tuple(t.rows(rows)))

    def expert_source(self, layer: int, param: str, experts: list[int]) -> Source:
        """The stacked [len(experts), ...] tensor of fused expert parameter ``param`` of ``layer``."""
        parts = dict(self.info.spec.expert_parts).get(param, ())
        fused_key = self.fused.get((layer, param)) or (self.fused.get((layer, parts[0])) if len(parts) == 1 else None)
        if fused_key is not None:
            t = self._info(fused_key)
            return Source(t.dtype, (len(experts), *t.shape[1:]), tuple(t.rows(experts)))
        if not parts:
            raise CheckpointError(f"no checkpoint tensors for expert parameter {param!r} of layer {layer}")
        pieces: Pieces = []
        dtype, row_shape = None, None
        for e in experts:
            rows = 0
            for part in parts:
                key = self.per_expert.get((layer, e, part))
                if key is None:
                    raise CheckpointError(f"no checkpoint tensor for expert {e} {part!r} of layer {layer}")
                t = self._info(key)
                dtype = dtype or t.dtype
                pieces.append((t.file, t.offset, t.nbytes))
                rows += t.shape[0]
                row_shape = t.shape[1:]
        shape = (len(experts), rows, *row_shape)
        return Source(dtype, shape, tuple(pieces))


class ZeroExperts(nn.Module):
    """Stands in for a layer's routed experts: contributes nothing (no weights)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _config_for(info: ModelInfo, plan: PrunePlan | None, num_layers: int | None):
    from transformers import AutoConfig

    raw = dict(info.raw_config)
    if plan is not None:
        raw.update(config_updates(raw, info.spec, plan))
    if num_layers is not None:
        raw["num_hidden_layers"] = num_layers
        if isinstance(raw.get("layer_types"), list):
            raw["layer_types"] = raw["layer_types"][:num_layers]
    raw.pop("premoe", None)
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def skeleton(config) -> nn.Module:
    """The causal-LM module tree on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _finish_buffers(model: nn.Module) -> None:
    """Materialise non-persistent buffers (rotary frequencies) the way transformers does after loading."""
    for mod in model.modules():
        meta = [n for n, b in mod._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for n in meta:
            mod._buffers[n] = torch.empty_like(mod._buffers[n], device="cpu")
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            continue
        model._init_weights(mod)


def _check_no_meta(model: nn.Module, skip: set[int] = frozenset()) -> None:
    left = [
        f"{name}.{leaf}" if name else leaf
        for name, mod in model.named_modules()
        if id(mod) not in skip
        for leaf, t in [*mod._parameters.items(), *mod._buffers.items()]
        if t is not None and t.is_meta
    ]
    if left:
        raise UnsupportedModelError(
            f"cannot build {type(model).__name__} from its checkpoint: no source for {left[:3]}; "
            "this checkpoint layout is not supported for selective loading"
        )


def build_model(
    info: ModelInfo,
    plan: PrunePlan | None,
    reader: ByteReader,
    *,
    num_layers: int | None = None,
    experts: bool = True,
    routers: dict[int, dict[str, torch.Tensor]] | None = None,
    base_only: bool = False,
    defer_experts: bool = False,
) -> nn.Module:
    """A causal LM built from ``info``'s checkpoint, reading only what it needs.

    Args:
        info: the source model directory.
        plan: keep only these experts per MoE layer (``None``: all experts).
        reader: counts the bytes read.
        num_layers: keep only the first decoder layers (signature models).
        experts: ``False`` replaces routed experts by :class:`ZeroExperts` and loads none.
        routers: full router tensors already in memory ({layer: {"weight": [E, H], ...}}); rows are
            sliced from them instead of read again.
        base_only: skip the LM head (signature models never produce logits).
        defer_experts: leave the routed experts unloaded (on the meta device) for
            :func:`premoe.serving.install_pattern` to fill.

    Returns:
        The model on the CPU, in the checkpoint's dtype, in eval mode.
    """
    from transformers import GenerationConfig

    config = _config_for(info, plan, num_layers)
    model = skeleton(config)
    cmap = CheckpointMap(info)
    spec = info.spec
    moe = {m.index: m for m in find_moe_layers(model, spec)}
    if not experts:
        for m in moe.values():
            setattr(m.block, spec.experts_attr, ZeroExperts())
    expert_owner = {id(m.experts): i for i, m in moe.items()}
    router_owner = {id(m.router): i for i, m in moe.items()}

    for mod_name, mod in model.named_modules():
        if base_only and mod_name.startswith("lm_head"):
            continue
        tensors = [*mod._parameters.items(), *((n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set)]
        for leaf, t in tensors:
            if t is None:
                continue
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            if id(mod) in expert_owner:
                if defer_experts:
                    continue
                layer = expert_owner[id(mod)]
                kept = plan.kept[layer] if plan is not None else list(range(info.num_experts))
                value = reader.tensor(*_unpack(cmap.expert_source(layer, leaf, kept)))
            elif id(mod) in router_owner:
                layer = router_owner[id(mod)]
                rows = plan.kept[layer] if plan is not None else None
                if routers is not None:
                    full_t = routers[layer][leaf]
                    value = (full_t if rows is None else full_t[rows]).clone()
                else:
                    value = reader.tensor(*_unpack(cmap.router_source(layer, leaf, rows)))
            elif full in cmap.plain:
                key = cmap.plain[full]
                ti = info.checkpoint.tensors[key]
                value = reader.tensor(ti.dtype, ti.shape, [(ti.file, ti.offset, ti.nbytes)])
            elif full in getattr(model, "all_tied_weights_keys", {}) or (leaf == "weight" and mod_name == "lm_head" and config.tie_word_embeddings):
                continue  # tied to the embeddings below
            else:
                raise CheckpointError(f"the checkpoint has no tensor for {full!r}; cannot build the model selectively")
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"{full}: checkpoint shape {list(value.shape)} but the model expects {list(t.shape)}")
            _set_tensor(model, full, value)
    if config.tie_word_embeddings and not base_only:
        model.tie_weights()
    _finish_buffers(model)
    deferred = {id(m.experts) for m in moe.values()} if defer_experts else set()
    _check_no_meta(model.base_model if base_only else model, skip=deferred)
    model.name_or_path = str(info.path)
    select_kernel(model)
    gen = info.path / "generation_config.json"
    if gen.is_file() and not base_only:
        try:
            model.generation_config = GenerationConfig.from_pretrained(info.path)
        except (OSError, ValueError, json.JSONDecodeError):
            pass
    return model


def _unpack(src: Source) -> tuple[str, tuple[int, ...], list]:
    return src.dtype, src.shape, list(src.pieces)


def read_routers(info: ModelInfo, reader: ByteReader, layers: list[int] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Every router tensor (all experts' rows) of the given MoE layers."""
    cmap = CheckpointMap(info)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (layer, leaf), _key in sorted(cmap.router.items()):
        if layers is None or layer in layers:
            out.setdefault(layer, {})[leaf] = reader.tensor(*_unpack(cmap.router_source(layer, leaf, None)))
    return out


def ideal_bytes(info: ModelInfo, plan: PrunePlan | None, full_routers: bool = False) -> dict[str, int]:
    """Bytes a pattern's model needs from the checkpoint: non-expert tensors + the kept experts.

    Routers count only the kept rows unless ``full_routers`` (a server keeps all rows to route
    and switch).
    """
    expert = non_expert = 0
    for name, role in info.roles.items():
        t = info.checkpoint.tensors[name]
        kept = info.num_experts if plan is None else plan.keep
        if role.kind == "beyond":
            continue
        if role.kind == "expert":
            if plan is None or role.expert in plan.kept[role.layer]:
                expert += t.nbytes
        elif role.kind == "fused":
            expert += t.nbytes // t.shape[0] * kept
        elif role.kind == "router" and not full_routers:
            non_expert += t.nbytes // t.shape[0] * kept
        else:
            non_expert += t.nbytes
    return {"non_expert": non_expert, "experts": expert, "total": non_expert + expert}
