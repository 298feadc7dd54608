"""Building a model (or one part of it) straight from safetensors, reading only the tensors it needs.

The model skeleton is created on the meta device (no memory), then every tensor is read from the
checkpoint's byte ranges (:mod:`premoe.moe.layout` says which) into its final storage: non-expert
weights as they are, routers sliced to the kept rows, and each MoE layer's fused expert tensors
([N, 2I, H]...) assembled from the kept experts only, whether the checkpoint stores one key per
expert or fused 3D tensors. Quantised tensors (FP8, MXFP4) are dequantised one at a time to the
model's dtype. The full model never exists in memory, and :class:`ByteReader` counts every byte read.
:class:`Materializer` fills any subset of a skeleton's modules, which is how layer streaming
(:mod:`premoe.moe.streaming`) builds one decoder layer at a time.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch
from torch import nn

from premoe.core.checkpoint import TORCH_DTYPES, ByteReader
from premoe.core.config import config_from_dict, skeleton
from premoe.core.modules import backbone, finish_buffers, set_tensor
from premoe.errors import CheckpointError, UnsupportedModelError
from premoe.moe.arch import find_moe_layers
from premoe.moe.held import HeldExperts, HeldPart, HeldWeight, held_tensor, hold_linear, install, stored_part
from premoe.moe.kernels import select_kernel
from premoe.moe.layout import Source
from premoe.moe.model import ModelInfo
from premoe.moe.plans import PrunePlan
from premoe.moe.surgery import apply_config_updates, config_updates

__all__ = [
    "ByteReader",
    "Materializer",
    "ZeroExperts",
    "build_model",
    "read_routers",
    "ideal_bytes",
    "kept_bytes",
    "model_config",
    "skeleton",
    "compute_dtype",
]


class ZeroExperts(nn.Module):
    """Stands in for a layer's routed experts: contributes nothing (no weights)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def compute_dtype(info: ModelInfo) -> torch.dtype:
    """The dtype quantised tensors are dequantised to: the config's ``dtype`` (bfloat16 if it has none)."""
    name = info.raw_config.get("dtype") or info.raw_config.get("torch_dtype") or "bfloat16"
    value = getattr(torch, str(name), None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.bfloat16


def model_config(info: ModelInfo, plan: PrunePlan | None = None, num_layers: int | None = None):
    """The transformers config of ``info``'s model, pruned to ``plan`` and truncated to ``num_layers``."""
    raw = dict(info.model_config)
    if plan is not None:
        raw = apply_config_updates(raw, config_updates(raw, info.spec, info.config, plan))
    if num_layers is not None:
        if info.spec.layers_key != "num_hidden_layers":
            raw.pop("num_hidden_layers", None)  # derived from the family's own key
        total = info.num_layers
        raw[info.spec.layers_key] = num_layers
        for key, value in list(raw.items()):  # per-layer lists (layer_types, heads per layer...)
            if isinstance(value, list) and len(value) == total and key not in ("architectures",):
                raw[key] = value[:num_layers]
    return config_from_dict(raw, info.config_type)


class _Shapes:
    """Stands in for the model where a transformers conversion op asks for a parameter's shape."""

    def __init__(self, model: nn.Module | None, name: str, shape, dtype: torch.dtype | None = None):
        self.model, self.name, self.shape, self.dtype = model, name, shape, dtype

    def get_parameter(self, name: str):
        if name == self.name and self.shape is not None:  # in the dtype it is built in (ops may cast to it)
            return torch.empty(self.shape, device="meta", dtype=self.dtype)
        if self.model is None:
            raise KeyError(name)
        owner, _, leaf = name.rpartition(".")
        return getattr(self.model.get_submodule(owner), leaf)


class Materializer:
    """Reads the tensors of a skeleton built from ``info`` (optionally pruned to ``plan``).

    Args:
        info: the source model directory.
        plan: the experts each MoE layer keeps (``None``: all).
        reader: counts the bytes read.
        routers: full router tensors already in memory ({layer: {in-memory name: tensor}}); their rows
            are sliced from memory instead of read again.
        dtype: the dtype quantised tensors become (default: :func:`compute_dtype`).
        refit: re-fitted down projections and router rows of kept experts
            (:class:`premoe.moe.refit_weights.RefitWeights`) that replace the checkpoint's.
        hold: keep quantised expert tensors as stored (:class:`premoe.moe.held.HeldExperts`, dequantised one
            expert at a time on use) instead of dequantising them whole.
    """

    def __init__(
        self,
        info: ModelInfo,
        plan: PrunePlan | None,
        reader: ByteReader,
        routers: dict[int, dict[str, torch.Tensor]] | None = None,
        dtype: torch.dtype | None = None,
        refit=None,
        hold: bool = False,
    ):
        self.info = info
        self.refit = refit
        self.hold = hold and info.quant.quantized
        self.plan = plan
        self.reader = reader
        self.routers = routers
        self.dtype = dtype or compute_dtype(info)
        self.tensors = info.checkpoint.tensors
        self.expert_names = {n: (layer, r) for layer, v in info.layout.moe.items() for n, r in v["experts"].items()}
        self.expected: dict[str, tuple[int, ...]] = {}  # shapes of the tensors being built (for conversion ops)
        self.model: nn.Module | None = None
        self._pending: dict[str, torch.Tensor] = {}  # tensors split from one key, not yet asked for
        self.router_names = {n: (layer, d) for layer, v in info.layout.moe.items() for n, d in v["router"].items()}

    # -- raw reads -------------------------------------------------------------------------------

    def _read(self, key: str, pieces=None, shape=None) -> torch.Tensor:
        t = self.tensors[key]
        if t.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, which premoe cannot decode")
        return self.reader.tensor(t.dtype, shape or t.shape, pieces or [(t.file, t.offset, t.nbytes)])

    def _select(self, key: str, dim: int, ids: list[int], per: int = 1) -> torch.Tensor:
        t = self.tensors[key]
        shape = list(t.shape)
        shape[dim] = len(ids) * per
        return self._read(key, t.select(dim, ids, per), tuple(shape))

    def _block_rows(self, key: str, src: Source) -> int:
        """Rows of ``key`` per expert (per router slot for slot-indexed tensors) on dim 0."""
        return self.tensors[key].shape[0] // (self.info.router.width if src.rows == 0 else self.info.num_experts)

    def _scale(self, src: Source, key: str):
        """What :meth:`QuantFormat.dequant` takes for checkpoint key ``key``: its scale, or (scale, *the other
        companions its format asks for: zero points, a global scale)."""
        scale = self._read(src.scales[key])
        kinds = self.info.quant.dequant_companions
        if not kinds:
            return scale
        return (scale, *(self._read(src.extras[key][k]) for k in kinds))

    def _dequant(self, value: torch.Tensor, scale) -> torch.Tensor:
        if scale is None:
            return value
        return self.info.quant.dequant(value, scale, self.dtype)

    # -- one in-memory tensor --------------------------------------------------------------------

    def experts_for(self, layer: int) -> list[int] | None:
        return None if self.plan is None else self.plan.kept[layer]

    def value(self, name: str) -> torch.Tensor:
        """The in-memory tensor ``name`` of the (pruned) model."""
        src = self.info.layout.sources.get(name)
        if src is None:
            raise CheckpointError(f"the checkpoint has no tensor for {name!r}; cannot build the model from it")
        if name in self.router_names:
            layer, dim = self.router_names[name]
            kept = self.experts_for(layer)
            ids = None if kept is None else self.info.slots(kept)
            fitted = self.refit.router(layer, name) if self.refit is not None and ids is not None else None
            if fitted is not None:  # re-fitted rows of the kept experts
                return fitted
            if self.routers is not None and name in self.routers.get(layer, {}):
                full = self.routers[layer][name]
                return (full if ids is None else full.index_select(dim, torch.tensor(ids))).clone()
            return self.router_rows(name, ids)
        if name in self.expert_names:
            layer = self.expert_names[name][0]
            kept = self.experts_for(layer)
            return self.expert_rows(name, list(range(self.info.num_experts)) if kept is None else kept)
        if src.kind == "convert":
            if name in self._pending:
                return self._pending.pop(name)
            return self._convert(name, src)
        value = self._read(src.key)
        scale = self._scale(src, src.key) if src.key in src.scales else None
        return self._dequant(value, scale)

    def _convert(self, name: str, src: Source, ids: list[int] | None = None) -> torch.Tensor:
        """A tensor transformers builds from several keys: apply its own conversion ops to them (for fused
        expert tensors, to the rows of experts ``ids`` only; those ops never mix experts)."""
        conv = src.converter
        inputs: dict[str, list[torch.Tensor]] = {}
        for pattern, key in sorted(src.keys, key=lambda pk: (conv.source_patterns.index(pk[0]), pk[1])):
            if ids is None:
                v = self._read(key)
            else:
                v = self._select(key, 0, ids, self._block_rows(key, src))
            if key in src.scales:
                v = self._dequant(v, self._scale(src, key))
            inputs.setdefault(pattern, []).append(v)
        out: dict = inputs
        first = name
        for t in conv.target_patterns[1:]:  # the name transformers converts under: the first target's
            if t in name:
                first = name.replace(t, conv.target_patterns[0])
        shim = _Shapes(self.model, name, self.expected.get(name), self.dtype_of(name))
        try:
            for op in conv.operations:
                out = op.convert(
                    out,
                    source_patterns=conv.source_patterns,
                    target_patterns=conv.target_patterns,
                    config=self.info.config,
                    full_layer_name=first,
                    model=shim,
                )
        except Exception as e:  # an op premoe cannot drive outside transformers' loader
            raise UnsupportedModelError(
                f"cannot assemble {name} from {[k for _, k in src.keys]} with {conv.operations}: {e}"
            ) from None
        if len(out) > 1:  # one key split into several tensors: keep the others for when they are asked for
            for t, v in out.items():
                other = first.replace(conv.target_patterns[0], t)
                if other != name:
                    self._pending[other] = v[0] if isinstance(v, list) else v
            value = out.get(next(t for t in conv.target_patterns if first.replace(conv.target_patterns[0], t) == name))
        else:
            value = next(iter(out.values()))
        return value[0] if isinstance(value, list) else value

    def router_rows(self, name: str, ids: list[int] | None) -> torch.Tensor:
        src = self.info.layout.sources[name]
        value = self._read(src.key) if ids is None else self._select(src.key, src.dim, ids)
        if src.key in src.scales:
            value = self._dequant(value, self._scale(src, src.key))
        return value

    def slot_indexed(self, name: str) -> bool:
        """Whether the expert tensor ``name`` has a row block per router slot (zero-computation experts too)."""
        src = self.info.layout.sources[name]
        return self.expert_names[name][1] == 0 or (src.kind == "fused" and src.rows == 0)

    def expert_rows(self, name: str, experts: list[int]) -> torch.Tensor:
        """The expert tensor ``name`` holding only ``experts`` (original ids), in that order; tensors
        indexed by router slot also get the zero-computation experts' rows."""
        if self.hold:
            held = self.held_rows(name, experts, self.expected.get(name))
            if held is not None:
                return held
        value = self.rows(name, self.info.slots(experts) if self.slot_indexed(name) else list(experts))
        layer = self.expert_names[name][0]
        if self.refit is not None and self.refit.experts.get(layer) and name.endswith(".down_proj"):
            for j, e in enumerate(experts):
                if self.refit.has(layer, e):
                    value[j].copy_(self.refit.get(layer, e))
        return value

    def held_rows(self, name: str, experts: list[int], shape: tuple[int, ...] | None):
        """:meth:`expert_rows` held as stored (:class:`premoe.moe.held.HeldExperts`), re-fitted down projections
        in their stored form, or ``None`` where the tensor cannot be held (:func:`premoe.moe.held.held_refs`)."""
        if shape is None or not self.info.layout.sources[name].scales:
            return None
        layer = self.expert_names[name][0]
        slots = self.info.slots(experts) if self.slot_indexed(name) else list(experts)
        refitted = self.refit is not None and name.endswith(".down_proj")
        if refitted and self.refit.experts.get(layer) and not self.refit.stored_quantized(layer):
            return None  # re-fitted rows kept in float (a store written before re-quantising): held dequantised

        def given(j: int, slot: int):
            e = experts[j] if j < len(experts) else None
            if refitted and e is not None and self.refit.has(layer, e):
                return [stored_part(self.info.quant, self.refit.encoded(layer, e))]
            return None

        return held_tensor(self, name, slots, shape, given)

    def held_weight(self, name: str, shape: tuple[int, ...]) -> HeldWeight | None:
        """The plain quantised tensor ``name`` (a linear weight outside the routed experts) held as stored, or
        ``None`` where it is not one (not quantised, an expert or router tensor, converted by transformers)."""
        src = self.info.layout.sources.get(name)
        if (
            src is None
            or src.kind != "plain"
            or src.key not in src.scales
            or name in self.router_names
            or name in self.expert_names
        ):
            return None
        kinds = self.info.quant.dequant_companions
        if any(k not in src.extras.get(src.key, {}) for k in kinds):
            return None
        value = self._read(src.key)
        scale = self._read(src.scales[src.key])
        extras = tuple(self._read(src.extras[src.key][k]) for k in kinds)
        part = HeldPart(value[None], scale[None], tuple(x[None] for x in extras))
        return HeldWeight(self.info.quant, [part], (1, *shape), self.dtype)

    def dtype_of(self, name: str) -> torch.dtype:
        src = self.info.layout.sources[name]
        key = src.key or next(iter(src.parts.values()), None) or src.keys[0][1]
        return self.dtype if src.scales else TORCH_DTYPES[self.tensors[key].dtype]

    def rows(self, name: str, ids: list[int]) -> torch.Tensor:
        """The row blocks of expert tensor ``name`` for router slots ``ids`` (a slot without weights on disk,
        a zero-computation expert, reads as zeros)."""
        src = self.info.layout.sources[name]
        if src.kind == "fused" and src.converter is not None:
            return self._convert(name, src, ids)
        if src.kind == "fused":
            per = src.rows or 1
            value = self._select(src.key, 0, ids, per)
            if self.info.quant.dequant_companions:
                raise CheckpointError(f"{src.key}: {self.info.quant.label} on fused expert tensors is not supported")
            if src.key in src.scales:
                scale_key = src.scales[src.key]
                scale = self._select(scale_key, 0, ids, self._block_rows(scale_key, src))
                value = self._dequant(value, scale)
                if self.info.spec.packed_transposed:
                    value = value.transpose(-1, -2).contiguous()  # packed on disk [E, out, in] -> memory [E, in, out]
            return value
        keys = [src.parts.get((e, p)) for e in ids for p in range(src.n_parts)]
        if not src.scales and all(k is not None for k in keys) and len({self.tensors[k].dtype for k in keys}) == 1:
            # every byte straight into its final place, one read per key: no staging copies
            first = self.tensors[keys[0]]
            rows = sum(self.tensors[k].shape[0] for k in keys[: src.n_parts])
            pieces = [(self.tensors[k].file, self.tensors[k].offset, self.tensors[k].nbytes) for k in keys]
            return self.reader.tensor(first.dtype, (len(ids), rows, *first.shape[1:]), pieces)
        out: torch.Tensor | None = None
        missing = []
        for j, e in enumerate(ids):
            keys = [src.parts.get((e, p)) for p in range(src.n_parts)]
            if any(k is None for k in keys):  # a zero-computation expert without weights on disk
                missing.append(j)
                continue
            parts = []
            for key in keys:
                v = self._read(key)
                if key in src.scales:
                    v = self._dequant(v, self._scale(src, key))
                parts.append(v)
            block = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
            if out is None:  # filled expert by expert: no second copy of the layer
                out = torch.empty((len(ids), *block.shape), dtype=block.dtype)
            out[j].copy_(block)
            del parts, block
        if out is None:
            ref = self.rows(name, [next(iter(src.parts))[0]])
            out = torch.empty((len(ids), *ref.shape[1:]), dtype=ref.dtype)
        for j in missing:
            out[j].zero_()
        return out

    def read_expert_into(self, dest: torch.Tensor, name: str, slot: int) -> None:
        """Fill ``dest`` (the row block of router slot ``slot`` in expert tensor ``name``) from the
        checkpoint, without a staging copy when the bytes need no conversion."""
        src = self.info.layout.sources[name]
        fast = dest.device.type == "cpu" and dest.is_contiguous() and not src.scales
        if fast and src.kind == "split" and all((slot, p) in src.parts for p in range(src.n_parts)):
            keys = [src.parts[(slot, p)] for p in range(src.n_parts)]
            if all(TORCH_DTYPES.get(self.tensors[k].dtype) == dest.dtype for k in keys):
                self.reader.read_into(
                    dest, [(self.tensors[k].file, self.tensors[k].offset, self.tensors[k].nbytes) for k in keys]
                )
                return
        if (
            fast
            and src.kind == "fused"
            and src.converter is None
            and TORCH_DTYPES.get(self.tensors[src.key].dtype) == dest.dtype
        ):
            self.reader.read_into(dest, self.tensors[src.key].rows([slot], src.rows or 1))
            return
        dest.copy_(self.rows(name, [slot]).reshape(dest.shape))

    # -- whole modules ---------------------------------------------------------------------------

    def fill(self, model: nn.Module, prefixes: Iterable[str] | None = None, skip: set[int] = frozenset()) -> int:
        """Read every persistent tensor of ``model`` under ``prefixes`` (all when ``None``) that is still on
        the meta device; returns the bytes it now holds. Modules whose ``id`` is in ``skip`` stay empty."""
        wanted = None if prefixes is None else tuple(prefixes)
        self.model = model
        held = 0
        tied = getattr(model, "all_tied_weights_keys", {}) or {}
        keep_fp32 = _fp32_rule(model, compute_dtype(self.info))
        for mod_name, mod in model.named_modules():
            if id(mod) in skip:
                continue
            if wanted is not None and not any(mod_name == p or mod_name.startswith(p + ".") for p in wanted):
                continue
            for leaf, t in [
                *mod._parameters.items(),
                *((n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set),
            ]:
                if t is None or not t.is_meta:
                    continue
                full = f"{mod_name}.{leaf}" if mod_name else leaf
                if full not in self.info.layout.sources and (
                    full in tied or (leaf == "weight" and mod_name == "lm_head")
                ):
                    continue  # tied to the input embeddings
                self.expected[full] = tuple(t.shape)
                if self.hold and leaf == "weight" and isinstance(mod, nn.Linear):
                    weight = self.held_weight(full, tuple(t.shape))
                    if weight is not None:  # a quantised linear weight: held as stored, dequantised per forward
                        hold_linear(mod, weight)
                        held += weight.nbytes
                        continue
                value = self.value(full)
                if tuple(value.shape) != tuple(t.shape):
                    raise CheckpointError(
                        f"{full}: checkpoint shape {list(value.shape)} but the model expects {list(t.shape)}"
                    )
                if isinstance(value, HeldExperts):
                    install(mod, leaf, value)
                    held += value.nbytes
                    continue
                if keep_fp32 is not None and value.dtype in (torch.float16, torch.bfloat16) and keep_fp32.search(full):
                    value = value.float()
                set_tensor(mod, leaf, value)
                held += value.nbytes
        return held


def _fp32_rule(model: nn.Module, dtype: torch.dtype):
    """The pattern of the tensors transformers loads in float32 for a model of ``dtype`` (its
    ``_keep_in_fp32_modules[_strict]``: DeepSeek-V3's router weight and correction bias...), or ``None``."""
    get_plan = getattr(model, "_get_dtype_plan", None)
    plan = get_plan(dtype) if get_plan is not None else {}
    if not plan:
        return None
    from transformers.core_model_loading import build_glob_alternation

    return build_glob_alternation(list(plan))[0]


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
    dtype: torch.dtype | None = None,
    refit=None,
    hold: bool = False,
) -> nn.Module:
    """A causal LM built from ``info``'s checkpoint, reading only what it needs.

    Args:
        info: the source model directory.
        plan: keep only these experts per MoE layer (``None``: all experts).
        reader: counts the bytes read.
        num_layers: keep only the first decoder layers (signature models).
        experts: ``False`` replaces routed experts by :class:`ZeroExperts` and loads none.
        routers: full router tensors already in memory ({layer: {name: [E, H], ...}}); rows are
            sliced from them instead of read again.
        base_only: skip the LM head (signature models never produce logits).
        defer_experts: leave the routed experts unloaded (on the meta device) for
            :func:`premoe.moe.server.install_pattern` to fill.
        dtype: what quantised tensors are dequantised to (default: the config's dtype).
        hold: keep a quantised checkpoint's experts as stored, dequantised one expert at a time on use
            (:mod:`premoe.moe.held`).

    Returns:
        The model on the CPU, in the checkpoint's dtypes, in eval mode.
    """
    from transformers import GenerationConfig

    config = model_config(info, plan, num_layers)
    model = skeleton(config)
    spec = info.spec
    moe = {m.index: m for m in find_moe_layers(model, spec)}
    expert_mods = []
    for m in moe.values():
        if m.experts is None:
            continue
        if not experts:
            setattr(m.block, spec.experts, ZeroExperts())
        elif defer_experts:
            expert_mods.append(m.experts)
    skip = {id(x) for mod in expert_mods for x in mod.modules()}
    if base_only:
        skip |= (
            {id(x) for x in model.get_output_embeddings().modules()}
            if model.get_output_embeddings() is not None
            else set()
        )
    Materializer(info, plan, reader, routers, dtype, refit, hold).fill(model, skip=skip)
    if not base_only:
        model.tie_weights()
    finish_buffers(model)
    _check_no_meta(backbone(model)[0] if base_only else model, skip=skip)
    model.name_or_path = str(info.path)
    select_kernel(model)
    gen = info.path / "generation_config.json"
    if gen.is_file() and not base_only:
        try:
            model.generation_config = GenerationConfig.from_pretrained(info.path)
        except (OSError, ValueError, json.JSONDecodeError):
            pass
    return model


def read_routers(
    info: ModelInfo, reader: ByteReader, layers: list[int] | None = None
) -> dict[int, dict[str, torch.Tensor]]:
    """Every router tensor (all experts' rows) of the given MoE layers, by in-memory name."""
    mat = Materializer(info, None, reader)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for layer, names in sorted(info.layout.moe.items()):
        if layers is None or layer in layers:
            out[layer] = {n: mat.router_rows(n, None) for n in names["router"] if n in info.layout.sources}
    return out


def kept_bytes(info: ModelInfo, role, nbytes: int, plan: PrunePlan | None) -> int:
    """Bytes of a checkpoint key of ``nbytes`` (in any encoding) that a model pruned to ``plan`` keeps:
    all of it without a plan or for a key not indexed by expert, the kept experts' share otherwise
    (router slots: the kept experts plus any zero-computation experts)."""
    if plan is None or role.kind not in ("expert", "fused", "router"):
        return nbytes
    slots = info.slots(plan.kept[role.layer])
    if role.kind == "expert":
        return nbytes if role.expert in slots else 0
    if role.kind == "router" or role.rows == 0:
        return nbytes // info.router.width * len(slots)
    return nbytes // info.num_experts * plan.keep


def ideal_bytes(info: ModelInfo, plan: PrunePlan | None, full_routers: bool = False) -> dict[str, int]:
    """Bytes a pattern's model needs from the checkpoint: non-expert tensors + the kept experts.

    Routers count only the kept rows unless ``full_routers`` (a server keeps all rows to route
    and switch).
    """
    expert = non_expert = 0
    for name, role in info.roles.items():
        if role.kind == "beyond" or (role.kind == "other" and role.target is None):
            continue
        nbytes = info.checkpoint.tensors[name].nbytes
        if role.kind in ("expert", "fused"):
            expert += kept_bytes(info, role, nbytes, plan)
        else:
            non_expert += nbytes if full_routers and role.kind == "router" else kept_bytes(info, role, nbytes, plan)
    return {"non_expert": non_expert, "experts": expert, "total": non_expert + expert}
