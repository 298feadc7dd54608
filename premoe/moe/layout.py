"""Where each tensor of a model lives in its checkpoint, and what each checkpoint key is to premoe.

Hub checkpoints name tensors differently from the modules transformers 5 builds: per-expert keys
(``mlp.experts.{e}.gate_proj.weight``) are stacked into fused [E, 2I, H] parameters, Mixtral's
``block_sparse_moe`` becomes ``mlp``, Granite's ``input_linear`` becomes ``experts.gate_up_proj``...
Rather than keep its own list of names, premoe asks transformers: every key goes through the
model's own conversion mapping (``get_model_conversion_mapping``, what ``from_pretrained`` applies),
so any layout transformers loads, premoe reads. Quantisation companions (FP8 ``*_scale_inv``,
MXFP4 ``*_scales``) follow the tensor they scale.

:func:`map_checkpoint` gives every key a :class:`KeyRole` (used by the byte-level export) and every
in-memory tensor a :class:`Source` (used to build models, or single layers, from byte ranges).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from premoe.core.checkpoint import TensorInfo
from premoe.core.quant import QuantFormat
from premoe.errors import CheckpointError, UnsupportedModelError
from premoe.moe.arch import ArchSpec, find_moe_layers

_LAYER = re.compile(r"^(?P<root>(?:.*\.)?(?:layers|blocks))\.(?P<layer>\d+)\.")


@dataclass(frozen=True)
class KeyRole:
    """What one checkpoint key is.

    ``kind``: ``expert`` (one expert's tensor; ``span`` locates its id in the key, ``part`` its
    position among the tensors concatenated into the fused parameter), ``fused`` (all experts on
    dim 0, ``rows`` rows each; 0: one row per router slot), ``router`` (router rows and biases,
    experts along ``dim``), ``beyond`` (a layer past ``num_hidden_layers``, e.g. DeepSeek-V3's MTP
    layer, which transformers ignores) or ``other`` (everything else, shared experts included).
    ``target`` is the in-memory tensor it feeds; ``companion`` marks a quantisation scale.
    """

    kind: str
    layer: int | None = None
    expert: int | None = None
    target: str | None = None
    part: int = 0
    dim: int = 0
    rows: int = 1
    span: tuple[int, int] | None = None
    companion: str | None = None


@dataclass
class Source:
    """How to build one in-memory tensor from checkpoint keys.

    ``kind``: ``plain`` (one key), ``router`` (one key, experts along ``dim``), ``fused`` (one key,
    ``rows`` rows per expert on dim 0) or ``split`` (``parts[(expert, part)]`` = key, concatenated
    on dim 1 per expert, then stacked). ``scales`` maps a key to its quantisation scale key.
    """

    kind: str
    layer: int | None = None
    key: str | None = None
    dim: int = 0
    rows: int = 1
    parts: dict[tuple[int, int], str] = field(default_factory=dict)
    n_parts: int = 1
    scales: dict[str, str] = field(default_factory=dict)
    extras: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> {kind: key}: zero points, global scales
    keys: list[tuple[str, str]] = field(default_factory=list)  # convert: (source pattern, key), in checkpoint order
    converter: Any = None  # convert: the transformers WeightConverter that builds the tensor


@dataclass
class CheckpointLayout:
    roles: dict[str, KeyRole]
    sources: dict[str, Source]
    moe: dict[int, dict[str, Any]]  # layer -> {"prefix": block name, "router": {name: dim}, "experts": {name: rows}}


def _converter_ops_ok(converter) -> bool:
    """Per-expert keys stacked on dim 0 (and concatenated on dim 1): expressible as byte ranges."""
    names = [type(op).__name__ for op in getattr(converter, "operations", [])]
    ok = names in (["MergeModulelist"], ["MergeModulelist", "Concatenate"])
    if ok:
        ops = converter.operations
        ok = ops[0].dim == 0 and (len(ops) == 1 or ops[1].dim == 1)
    return ok


def _expert_local(converter) -> bool:
    """Ops on fused [E, ...] tensors that never mix experts (they act on dims past the first), so they can
    be applied to any subset of experts' rows: Interleave, Transpose, Concatenate on later dims."""
    for op in getattr(converter, "operations", []):
        name = type(op).__name__
        dims = [op.dim0, op.dim1] if name == "Transpose" else [getattr(op, "dim", 0)]
        if name not in ("Interleave", "Transpose", "Concatenate") or any(d == 0 for d in dims):
            return False
    return True


def _expert_span(original: str, renamed: str, pattern: str) -> tuple[int, int] | None:
    """Where the expert id matched by ``*`` in ``pattern`` is in ``original`` (the key before renaming).
    Patterns are regular expressions whose ``*.`` stands for a module index, as transformers reads them."""
    rx = pattern.replace("*.", r"(\d+)\.")
    m = None
    for m in re.finditer(rx, renamed):
        pass
    if m is None:
        return None
    tail = renamed[m.end(1) :]
    digits = m.group(1)
    if not original.endswith(tail):
        return None
    end = len(original) - len(tail)
    start = end - len(digits)
    return (start, end) if original[start:end] == digits else None


def moe_tensor_names(model: nn.Module, spec: ArchSpec) -> dict[int, dict[str, Any]]:
    """{layer: {"prefix", "router": {full name: dim}, "experts": {full name: rows}}} of a (meta) model."""
    names = {id(mod): name for name, mod in model.named_modules()}
    out = {}
    for m in find_moe_layers(model, spec):
        prefix = names[id(m.block)]
        out[m.index] = {
            "prefix": prefix,
            "router": {f"{prefix}.{p}": d for p, d in m.router_tensors.items()},
            "experts": {f"{prefix}.{p}": r for p, r in m.expert_tensors.items()},
            "bias": f"{prefix}.{m.bias_path}" if m.bias_path else None,
        }
    return out


def map_checkpoint(
    tensors: dict[str, TensorInfo],
    model: nn.Module,
    spec: ArchSpec,
    quant: QuantFormat,
    num_experts: int,
    width: int,
    decoder_prefix: str,
    num_layers: int,
) -> CheckpointLayout:
    """Classify every checkpoint key against a (meta-device) model and check the checkpoint is complete.

    Raises:
        CheckpointError: a MoE layer without router weights or with missing experts, a routed tensor
            whose expert dimension does not match the config, or quantisation scales that do not
            match their weights.
        UnsupportedModelError: transformers converts this family's expert tensors in a way premoe
            cannot express as byte ranges.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, rename_source_key

    moe = moe_tensor_names(model, spec)
    router_names = {n: (layer, d) for layer, v in moe.items() for n, d in v["router"].items()}
    expert_names = {n: (layer, r) for layer, v in moe.items() for n, r in v["experts"].items()}
    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_state = model.state_dict(keep_vars=True)  # values are looked at: base_model_prefix handling

    roles: dict[str, KeyRole] = {}
    companions: dict[str, tuple[str, str]] = {}
    converted: dict[str, tuple[Any, str]] = {}  # non-expert keys transformers converts (fused qkv, stacked convs)
    wrapper = _wrapper_prefix(tensors, model, renamings, converters, meta_state, quant)
    for key in sorted(tensors):
        comp = quant.companion(key)
        if comp is not None:
            companions[key] = comp
            continue
        base = quant.target(key)
        shift = 0
        if wrapper and base.startswith(wrapper):  # the language model of a multimodal release
            base, shift = base[len(wrapper) :], len(wrapper)
        target, pattern = rename_source_key(base, renamings, converters, model.base_model_prefix, meta_state)
        layer = layer_of(target, decoder_prefix)
        if layer is not None and layer >= num_layers:
            roles[key] = KeyRole("beyond", layer)
            continue
        if pattern is not None and target not in expert_names:
            roles[key] = KeyRole("other", layer, None, target if target in meta_state else None, part=-1)
            converted[key] = (by_pattern[pattern], pattern)
            continue
        if pattern is not None and target in expert_names and _expert_local(by_pattern[pattern]):
            converted[key] = (by_pattern[pattern], pattern)  # fused on disk, rearranged per expert in memory
            pattern = None
        if pattern is not None and target in expert_names:
            conv = by_pattern[pattern]
            if not _converter_ops_ok(conv):
                raise UnsupportedModelError(
                    f"transformers builds {target} from {pattern!r} with {conv.operations}; premoe can only read "
                    "expert tensors that are stacked per expert (and concatenated on dim 1) as byte ranges"
                )
            renamed = base
            for r in renamings:
                renamed, _ = r.rename_source_key(renamed)
            span = _expert_span(base, renamed, pattern.lstrip("^"))
            if span is None:
                raise CheckpointError(f"cannot find the expert id in checkpoint key {key!r}")
            e = int(base[span[0] : span[1]])
            if e >= width:
                raise CheckpointError(f"{key}: expert id {e} but the config says {num_experts} experts per layer")
            layer = expert_names[target][0]
            span = (span[0] + shift, span[1] + shift)  # in the key as the checkpoint spells it
            roles[key] = KeyRole("expert", layer, e, target, part=conv.source_patterns.index(pattern), span=span)
        elif target in router_names:
            layer, dim = router_names[target]
            roles[key] = KeyRole("router", layer, None, target, dim=dim)
        elif target in expert_names:
            layer, rows = expert_names[target]
            first = tensors[key].shape[0] if tensors[key].shape else 0
            if first == width and width != num_experts:
                rows = 0
            elif first and first % num_experts == 0:
                rows = first // num_experts
            else:
                raise CheckpointError(
                    f"{key} has shape {list(tensors[key].shape)} but the config says {num_experts} experts; "
                    "the checkpoint does not match its config.json"
                )
            roles[key] = KeyRole("fused", layer, None, target, rows=rows)
        else:
            roles[key] = KeyRole("other", layer, None, target if target in meta_state else None)

    for key, (main, kind) in companions.items():
        role = roles.get(main)
        if role is None:
            raise CheckpointError(f"{key} is a quantisation scale, but its tensor {main} is not in the checkpoint")
        if role.kind in ("router", "fused") and tensors[key].shape:
            n = tensors[key].shape[role.dim] if role.kind == "router" else tensors[key].shape[0]
            if role.kind == "router" and n != width:
                raise CheckpointError(
                    f"{key}: the router {main} is quantised in blocks across experts; premoe cannot slice it"
                )
            if role.kind == "fused":
                role = replace(role, rows=0 if n == width and width != num_experts else n // num_experts)
        roles[key] = replace(role, companion=kind)
    _check_quant(tensors, companions, quant)
    sources = _sources(tensors, roles, companions, converted)
    _check_complete(moe, roles, sources, spec, num_experts, width, decoder_prefix)
    return CheckpointLayout(roles, sources, moe)


def _wrapper_prefix(tensors, model: nn.Module, renamings, converters, meta_state, quant: QuantFormat) -> str:
    """The prefix a multimodal release puts before its language model's keys when transformers' own
    mapping for the language model does not remove it (Kimi-K2.5: ``language_model.``), found from
    where the input embeddings are; empty when keys already map."""
    from transformers.core_model_loading import rename_source_key

    emb = model.get_input_embeddings()
    name = next((n for n, mod in model.named_modules() if mod is emb), None)
    if name is None:
        return ""
    wanted = f"{name}.weight"
    for key in tensors:
        base = quant.target(key)
        if base == wanted or not base.endswith("." + wanted):
            continue
        if rename_source_key(base, renamings, converters, model.base_model_prefix, meta_state)[0] in meta_state:
            return ""  # transformers' mapping already handles the prefix
        return base[: -len(wanted)]
    return ""


def _check_quant(tensors, companions, quant: QuantFormat) -> None:
    scales = {main: key for key, (main, kind) in companions.items() if kind == "scale"}
    for key, info in tensors.items():
        if key not in companions:
            scale = scales.get(key)
            quant.check_tensor(key, info, scale, tensors[scale] if scale else None)
    kinds: dict[str, set[str]] = {}
    for key, (main, kind) in companions.items():
        kinds.setdefault(main, set()).add(kind)
        if kind != "scale" and main in tensors:
            quant.check_companion(main, tensors[main], kind, key, tensors[key])
    for main in scales:
        missing = set(quant.dequant_companions) - kinds.get(main, set())
        if missing:
            raise CheckpointError(f"{main} has no {', '.join(sorted(missing))} beside it; the checkpoint is incomplete")


def _sources(tensors, roles: dict[str, KeyRole], companions, converted) -> dict[str, Source]:
    scale_of = {main: key for key, (main, kind) in companions.items() if kind == "scale"}
    extra_of: dict[str, dict[str, str]] = {}  # main key -> {companion kind: key} besides its scale
    for key, (main, kind) in companions.items():
        if kind not in ("scale", "activation", "shape"):
            extra_of.setdefault(main, {})[kind] = key
    sources: dict[str, Source] = {}
    for key, role in roles.items():
        if role.companion or role.target is None or role.kind == "beyond":
            continue
        if key in converted:  # built by transformers' own conversion ops from several keys, in pattern order
            conv, pattern = converted[key]
            kind = "fused" if role.kind == "fused" else "convert"
            src = sources.setdefault(role.target, Source(kind, role.layer, converter=conv, rows=role.rows))
            src.keys.append((pattern, key))
            if key in scale_of:
                src.scales[key] = scale_of[key]
            if key in extra_of:
                src.extras[key] = extra_of[key]
            first = conv.target_patterns[0]
            for t in conv.target_patterns[1:]:  # one key split into several tensors: each gets the same source
                sources.setdefault(role.target.replace(first, t), src)
            continue
        if role.kind == "expert":
            src = sources.setdefault(role.target, Source("split", role.layer))
            src.parts[(role.expert, role.part)] = key
            src.n_parts = max(src.n_parts, role.part + 1)
        else:
            kind = {"router": "router", "fused": "fused"}.get(role.kind, "plain")
            if role.target in sources:
                raise CheckpointError(
                    f"two checkpoint tensors feed {role.target} ({sources[role.target].key} and {key})"
                )
            sources[role.target] = Source(kind, role.layer, key, dim=role.dim, rows=role.rows)
        if key in scale_of:
            sources[role.target].scales[key] = scale_of[key]
        if key in extra_of:
            sources[role.target].extras[key] = extra_of[key]
    return sources


def _check_complete(moe, roles, sources, spec: ArchSpec, num_experts: int, width: int, decoder_prefix: str) -> None:
    for layer, names in moe.items():
        if not any(n in sources for n in names["router"]):
            raise CheckpointError(
                f"no router weights for MoE layer {layer} in the checkpoint (expected a tensor that loads into "
                f"'{next(iter(names['router']), names['prefix'] + '.' + spec.router)}'); is this a checkpoint "
                "transformers 5 loads?"
            )
        for name, rows in names["experts"].items():
            src = sources.get(name)
            if src is None:
                raise CheckpointError(
                    f"MoE layer {layer}: no checkpoint tensors for {name}; the checkpoint is incomplete"
                )
            if src.kind == "split":
                have = {e for e, _ in src.parts}
                need = set(range(num_experts))
                if not need <= have or any((e, p) not in src.parts for e in need for p in range(src.n_parts)):
                    raise CheckpointError(
                        f"MoE layer {layer}: found {len(have & need)} of {num_experts} routed experts for {name} "
                        "in the checkpoint; it is incomplete or does not match config.json"
                    )


def expert_slots(kept: list[int], num_experts: int, width: int) -> list[int]:
    """Router slots a layer keeps: the kept experts, then every zero-computation expert (LongCat-Flash)."""
    return list(kept) + list(range(num_experts, width))


def layer_of(name: str, decoder_prefix: str) -> int | None:
    m = _LAYER.match(name)
    return int(m["layer"]) if m and m["root"] == decoder_prefix else None


__all__ = ["KeyRole", "Source", "CheckpointLayout", "map_checkpoint", "moe_tensor_names", "expert_slots", "layer_of"]
