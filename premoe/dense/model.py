"""A dense decoder as premoe sees it: geometry (heads, KV groups, FFN channels), checkpoint keys,
structured plans (kept heads and channels per layer), and building a pruned model from byte ranges
or from a model in memory.

Shapes: D = hidden size, H = query heads, G = KV heads (groups), g = H / G, d = head size,
I = FFN channels. ``q_proj`` [H*d, D], ``k_proj``/``v_proj`` [G*d, D], ``o_proj`` [D, H*d],
``gate_proj``/``up_proj`` [I, D], ``down_proj`` [D, I].
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from premoe.core.checkpoint import ByteReader, Checkpoint, tensor_bytes
from premoe.core.config import config_from_dict, meta_model, read_config, skeleton
from premoe.core.modules import set_tensor
from premoe.core.store import model_kind
from premoe.dense.families import DenseSpec, resolve_dense
from premoe.errors import CheckpointError, InputError, UnsupportedModelError

PROJ = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class DenseFingerprint:
    """Identity of a dense model for pattern stores: its shape and a hash of its weights (:func:`_identity_hash`)."""

    model_type: str
    architecture: str
    num_layers: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "dense",
            "model_type": self.model_type,
            "architecture": self.architecture,
            "num_layers": self.num_layers,
            "sha256": self.sha256,
        }

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """What differs from the model a store recorded (``"<what> <this model's> vs <the store's>"``)."""
        if model_kind(stored) != "dense":
            return [f"a dense {self.model_type} model vs an MoE {stored.get('model_type')} model"]
        out = [
            f"{key} {getattr(self, key)} vs {stored.get(key)}"
            for key in ("model_type", "architecture", "num_layers")
            if getattr(self, key) != stored.get(key)
        ]
        theirs = str(stored.get("sha256") or stored.get("router_sha256"))  # older dense stores name it router_sha256
        if not out and self.sha256 != theirs:
            out.append(f"weights differ (hash {self.sha256[:12]} vs {theirs[:12]})")
        return out


@dataclass
class DenseInfo:
    """Everything premoe knows about a dense model directory without loading its weights."""

    path: Path
    raw_config: dict[str, Any]
    config: Any
    spec: DenseSpec
    num_layers: int
    decoder_prefix: str
    checkpoint: Checkpoint
    fingerprint: DenseFingerprint
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    kind: str = "dense"

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def key(self, layer: int, proj: str, leaf: str = "weight") -> str:
        s = self.spec
        mod = {
            "q": (s.attn, s.q),
            "k": (s.attn, s.k),
            "v": (s.attn, s.v),
            "o": (s.attn, s.o),
            "gate": (s.mlp, s.gate),
            "up": (s.mlp, s.up),
            "down": (s.mlp, s.down),
        }[proj]
        return f"{self.decoder_prefix}.{layer}.{mod[0]}.{mod[1]}.{leaf}"

    def layer_params(self) -> int:
        """Decoder linear weights of one unpruned layer."""
        return self.hidden * (
            2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim + 3 * self.intermediate
        )

    @property
    def model_config(self) -> dict[str, Any]:
        return self.raw_config


def _identity_hash(ckpt: Checkpoint) -> str:
    """Shapes of every tensor, the bytes of every 1-D tensor (norms, biases) and the first 256 bytes of
    every other tensor: cheap to read, and different for any two models (fine-tunes included)."""
    h = hashlib.sha256()
    with ByteReader() as reader:
        for name in sorted(ckpt.tensors):
            info = ckpt.tensors[name]
            h.update(f"{name}:{info.dtype}:{list(info.shape)};".encode())
            if len(info.shape) == 1:
                h.update(tensor_bytes(ckpt.raw(name, reader)))
            else:
                h.update(
                    tensor_bytes(
                        reader.tensor("U8", (min(256, info.nbytes),), [(info.file, info.offset, min(256, info.nbytes))])
                    )
                )
    return h.hexdigest()


def inspect_dense(path: str | Path) -> DenseInfo:
    """Read a dense model directory's config and check its checkpoint; no weights are loaded.

    Raises:
        MissingFileError / CheckpointError: missing or corrupt files, or weights that do not match the config.
        UnsupportedModelError: a family without a row, or quantised weights.
    """
    path = Path(path)
    raw = read_config(path)
    spec = resolve_dense(raw)
    if raw.get("quantization_config"):
        method = (raw["quantization_config"] or {}).get("quant_method", "?")
        raise UnsupportedModelError(
            f"{path}: dense checkpoints quantised with {method} are not supported yet; prune the bf16/fp16 release"
        )
    config = config_from_dict(raw, spec.name)
    ckpt = Checkpoint(path)
    _, prefix, num_layers = meta_model(json.dumps(raw, sort_keys=True, default=str), spec.name)
    hidden = int(config.hidden_size)
    heads = int(getattr(config, spec.heads_key))
    kv = int(getattr(config, spec.kv_key, None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(getattr(config, spec.inter_key))
    if heads % kv:
        raise CheckpointError(f"{path}: {heads} attention heads are not a multiple of {kv} KV heads")
    fp = DenseFingerprint(
        model_type=spec.name,
        architecture=(raw.get("architectures") or [type(config).__name__])[0],
        num_layers=num_layers,
        sha256=_identity_hash(ckpt),
    )
    info = DenseInfo(path, raw, config, spec, num_layers, prefix, ckpt, fp, hidden, heads, kv, head_dim, inter)
    want = {
        "q": (heads * head_dim, hidden),
        "k": (kv * head_dim, hidden),
        "v": (kv * head_dim, hidden),
        "o": (hidden, heads * head_dim),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }
    for layer in range(num_layers):
        for proj, shape in want.items():
            key = info.key(layer, proj)
            if key not in ckpt.tensors:
                raise CheckpointError(
                    f"{path}: the checkpoint has no {key}; is this a {spec.name} checkpoint as published?"
                )
            if tuple(ckpt.tensors[key].shape) != shape:
                raise CheckpointError(
                    f"{path}: {key} has shape {list(ckpt.tensors[key].shape)}, the config says {list(shape)}"
                )
    return info


# -- plans ---------------------------------------------------------------------------------------


@dataclass
class DensePlan:
    """What a pruned dense model keeps: query heads, KV heads and FFN channels per layer (original
    ids, ascending), plus bias compensation of ``o_proj``/``down_proj`` ({"<layer>.o": [D]})."""

    heads: dict[int, list[int]]
    kv: dict[int, list[int]]
    channels: dict[int, list[int]]
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    method: str = ""
    # "<layer>.o|down" -> re-fitted kept columns: a tensor, or a callable returning it (spilled to disk)
    refit: dict[str, Any] = field(default_factory=dict)
    spill: Any = field(
        default=None, repr=False, compare=False
    )  # where spilled re-fitted weights live (a TemporaryDirectory)
    task: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def uniform(self) -> bool:
        """Same head, KV-head and channel counts in every layer (what a transformers config can say)."""
        return all(len({len(v) for v in d.values()}) <= 1 for d in (self.heads, self.kv, self.channels))

    def close(self) -> None:
        """Free re-fitted weights spilled to disk (the plan's re-fitted columns are unusable afterwards)."""
        if self.spill is not None:
            self.spill.cleanup()

    def counts(self) -> tuple[int, int, int]:
        """The largest kept (heads, KV heads, channels) of any layer."""
        return (
            max(map(len, self.heads.values())),
            max(map(len, self.kv.values())),
            max(map(len, self.channels.values())),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "task": self.task,
            "heads": {str(k): v for k, v in self.heads.items()},
            "kv_heads": {str(k): v for k, v in self.kv.items()},
            "channels": {str(k): v for k, v in self.channels.items()},
            **self.info,
        }


def kept_params(info: DenseInfo, plan: DensePlan | None, padded: bool = False) -> int:
    """Decoder linear weights a model pruned to ``plan`` holds (``padded``: as written when every
    layer is padded to the largest layer's counts)."""
    if plan is None:
        return info.layer_params() * info.num_layers
    D, d = info.hidden, info.head_dim
    if padded:
        h, g, c = plan.counts()
        return info.num_layers * D * (2 * h * d + 2 * g * d + 3 * c)
    return sum(
        D * (2 * len(plan.heads[l]) * d + 2 * len(plan.kv[l]) * d + 3 * len(plan.channels[l]))
        for l in range(info.num_layers)
    )


def check_plan(info: DenseInfo, plan: DensePlan) -> None:
    """Every layer keeps at least one head and channel, and whole, equal KV groups (valid for transformers)."""
    for l in range(info.num_layers):
        heads, kv, ch = plan.heads[l], plan.kv[l], plan.channels[l]
        if not heads or not kv or not ch:
            raise InputError(f"layer {l} would keep no attention head or FFN channel; lower `sparsity`")
        per = [sum(1 for h in heads if h // info.group == g) for g in kv]
        if len(set(per)) != 1 or sum(per) != len(heads):
            raise InputError(f"layer {l}: kept query heads {heads} do not form equal groups over KV heads {kv}")


# -- slicing -------------------------------------------------------------------------------------


def _rows(ids: list[int], per: int) -> list[int]:
    return [i * per + j for i in ids for j in range(per)]


def slices(info: DenseInfo, plan: DensePlan, layer: int) -> dict[str, tuple[int, list[int]]]:
    """{checkpoint key: (dim, kept indices)} of one layer's pruned tensors (weights and biases)."""
    d = info.head_dim
    q, kv, ch = _rows(plan.heads[layer], d), _rows(plan.kv[layer], d), plan.channels[layer]
    out: dict[str, tuple[int, list[int]]] = {}
    for proj, dim, ids in (
        ("q", 0, q),
        ("k", 0, kv),
        ("v", 0, kv),
        ("o", 1, q),
        ("gate", 0, ch),
        ("up", 0, ch),
        ("down", 1, ch),
    ):
        out[info.key(layer, proj)] = (dim, ids)
        if dim == 0 and info.key(layer, proj, "bias") in info.checkpoint.tensors:
            out[info.key(layer, proj, "bias")] = (0, ids)
    # other per-head tensors of the attention block (OLMo-2's q/k norms over all heads)
    attn = f"{info.decoder_prefix}.{layer}.{info.spec.attn}."
    for name, t in info.checkpoint.tensors.items():
        if name.startswith(attn) and name not in out and len(t.shape) == 1 and not name.endswith("bias"):
            if t.shape[0] == info.heads * d:
                out[name] = (0, q)
            elif t.shape[0] == info.kv_heads * d and info.kv_heads != info.heads:
                out[name] = (0, kv)
    return out


_VALID: dict[tuple, bool] = {}


def valid_counts(info: DenseInfo, heads: int, kv: int) -> bool:
    """Whether transformers' config class of this family accepts these head counts."""
    key = (info.spec.name, info.hidden, heads, kv)
    if key not in _VALID:
        raw = dict(info.raw_config)
        raw.update({info.spec.heads_key: heads, info.spec.kv_key: kv, "head_dim": info.head_dim})
        try:
            config_from_dict(raw, info.spec.name)
            _VALID[key] = True
        except CheckpointError:
            _VALID[key] = False
    return _VALID[key]


def pruned_config(info: DenseInfo, plan: DensePlan, bias: bool = False):
    """A transformers config for ``plan`` (the largest layer's counts; see :func:`pruned_skeleton`)."""
    raw = dict(info.raw_config)
    h, g, c = plan.counts()
    raw[info.spec.heads_key] = h
    raw[info.spec.kv_key] = g
    raw[info.spec.inter_key] = c
    raw["head_dim"] = info.head_dim  # no longer hidden / heads
    if bias:
        raw.update(bias_flags(info, plan))
    return raw


def bias_flags(info: DenseInfo, plan: DensePlan) -> dict[str, bool]:
    """Config flags that give ``o_proj``/``down_proj`` the biases compensation writes to.

    Raises:
        InputError: the family has no such flag (the compensation could not survive a vanilla reload).
    """
    flags = {}
    for which, key in (("o", info.spec.attn_bias_key), ("down", info.spec.mlp_bias_key)):
        if any(k.endswith(f".{which}") for k in plan.bias):
            if key is None:
                raise InputError(
                    f"{info.spec.name} has no config flag for a {which}_proj bias, so bias compensation would be lost "
                    "on a vanilla reload; use `bias_comp=False`"
                )
            flags[key] = True
    return flags


def pruned_skeleton(config_raw: dict[str, Any], info: DenseInfo, plan: DensePlan) -> nn.Module:
    """The pruned causal LM on the meta device; layers smaller than the config's counts get their own
    projection shapes (premoe's loader; a vanilla load needs :meth:`DensePlan.uniform` or padding)."""
    model = skeleton(config_from_dict(config_raw, info.spec.name))
    D, d = info.hidden, info.head_dim
    for l, layer in enumerate(model.get_submodule(info.decoder_prefix)):
        attn, mlp = getattr(layer, info.spec.attn), getattr(layer, info.spec.mlp)
        nh, ng, nc = len(plan.heads[l]), len(plan.kv[l]), len(plan.channels[l])
        shapes = {
            (attn, info.spec.q): (D, nh * d),
            (attn, info.spec.k): (D, ng * d),
            (attn, info.spec.v): (D, ng * d),
            (attn, info.spec.o): (nh * d, D),
            (mlp, info.spec.gate): (D, nc),
            (mlp, info.spec.up): (D, nc),
            (mlp, info.spec.down): (nc, D),
        }
        for (mod, name), (fin, fout) in shapes.items():
            lin = getattr(mod, name)
            if (lin.in_features, lin.out_features) != (fin, fout):
                with torch.device("meta"):
                    setattr(mod, name, nn.Linear(fin, fout, bias=lin.bias is not None, dtype=lin.weight.dtype))
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = nh // ng
        h_cfg, g_cfg, _ = plan.counts()
        for sub in attn.modules():  # norms over all heads (OLMo-2's q/k norms) follow the layer's counts
            w = getattr(sub, "weight", None)
            if isinstance(sub, nn.Linear) or not isinstance(w, nn.Parameter) or w.dim() != 1:
                continue
            size = {h_cfg * d: nh * d, g_cfg * d: ng * d}.get(w.shape[0], w.shape[0])
            if size != w.shape[0]:
                sub.weight = nn.Parameter(torch.empty(size, device="meta", dtype=w.dtype), requires_grad=False)
    return model


Getter = Callable[[str, int | None, list[int] | None], torch.Tensor]


def fill_pruned(
    model: nn.Module,
    info: DenseInfo,
    plan: DensePlan,
    get: Getter,
    skip_prefixes: tuple[str, ...] = (),
    dtype: torch.dtype | None = None,
) -> None:
    """Set every meta tensor of ``model`` from ``get(checkpoint key, dim, kept ids)`` (dim ``None``:
    the whole tensor); compensation biases are added to (or become) ``o_proj``/``down_proj`` biases,
    re-fitted columns (``plan.refit``) replace the sliced ones."""
    get = refit_getter(info, plan, get, dtype)
    cut = {}
    for l in range(info.num_layers):
        cut.update(slices(info, plan, l))
    tied = getattr(model, "all_tied_weights_keys", {}) or {}
    for mod_name, mod in model.named_modules():
        if any(mod_name == p or mod_name.startswith(p + ".") for p in skip_prefixes):
            continue
        for leaf, t in list(mod._parameters.items()) + [
            (n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set
        ]:
            if t is None or not t.is_meta:
                continue
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            if name in cut:
                value = get(name, *cut[name])
            elif name in info.checkpoint.tensors:
                value = get(name, None, None)
            elif name in tied or (leaf == "weight" and mod is model.get_output_embeddings()):
                continue
            elif leaf == "bias":  # a bias only compensation brings: in its weight's dtype (on its device)
                value = torch.zeros(t.shape, dtype=t.dtype)
            else:
                raise CheckpointError(f"the checkpoint has no tensor for {name!r}")
            comp = bias_compensation(info, plan, name)
            if comp is not None or name not in info.checkpoint.tensors:
                w = getattr(mod, "weight", None)
                like = w if isinstance(w, torch.Tensor) and not w.is_meta else value
                value = (value.to(torch.float32) + (0 if comp is None else comp.to(torch.float32))).to(like.dtype)
            if tuple(value.shape) != tuple(t.shape):
                raise CheckpointError(f"{name}: built shape {list(value.shape)} but the model expects {list(t.shape)}")
            set_tensor(mod, leaf, value)
    model.tie_weights()


def bias_compensation(info: DenseInfo, plan: DensePlan, name: str) -> torch.Tensor | None:
    """The compensation ``plan`` adds to checkpoint tensor ``name`` (an ``o_proj``/``down_proj`` bias), or ``None``."""
    if not plan.bias or not name.endswith(".bias"):
        return None
    prefix = f"{info.decoder_prefix}."
    if not name.startswith(prefix):
        return None
    layer = int(name[len(prefix) :].split(".", 1)[0])
    for which in ("o", "down"):
        if name == info.key(layer, which, "bias"):
            return plan.bias.get(f"{layer}.{which}")
    return None


def refit_getter(info: DenseInfo, plan: DensePlan, get: Getter, dtype: torch.dtype | None = None) -> Getter:
    """``get``, except that the ``o_proj``/``down_proj`` weights the plan re-fitted come from ``plan.refit``
    (already sliced to the kept columns, rounded to the checkpoint's dtype as an export writes them, then
    in ``dtype`` when given: what ``get`` returns for the other tensors)."""
    if not plan.refit:
        return get
    from premoe.core.checkpoint import TORCH_DTYPES

    names = {info.key(l, s): f"{l}.{s}" for l in range(info.num_layers) for s in ("o", "down")}

    def wrapped(name: str, dim: int | None, ids: list[int] | None) -> torch.Tensor:
        key = names.get(name)
        if key not in plan.refit:
            return get(name, dim, ids)
        w = plan.refit[key]
        w = w() if callable(w) else w
        if dim != 1 or ids is None or w.shape[1] != len(ids):
            raise CheckpointError(f"{name}: the re-fitted weight {list(w.shape)} does not match the plan's columns")
        w = w.to(TORCH_DTYPES[info.checkpoint.tensors[name].dtype])
        return w if dtype is None else w.to(dtype)

    return wrapped


def reader_getter(info: DenseInfo, reader: ByteReader) -> Getter:
    """Reads kept rows of a tensor as byte ranges; kept columns by reading the rows whole (one
    range) and selecting in memory, so a column cut costs one pass over the tensor."""
    from premoe.core.checkpoint import TORCH_DTYPES

    def get(name: str, dim: int | None, ids: list[int] | None) -> torch.Tensor:
        t = info.checkpoint.tensors[name]
        if t.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}, which premoe cannot decode")
        if dim is None:
            return reader.tensor(t.dtype, tuple(t.shape), [(t.file, t.offset, t.nbytes)])
        if dim == 0:
            return reader.tensor(t.dtype, (len(ids), *t.shape[1:]), t.select(0, ids))
        full = reader.tensor(t.dtype, tuple(t.shape), [(t.file, t.offset, t.nbytes)])
        return full.index_select(dim, torch.tensor(ids)).contiguous()

    return get


def build_dense(info: DenseInfo, plan: DensePlan | None, reader: ByteReader) -> nn.Module:
    """The (pruned) causal LM built from the checkpoint, reading only the kept rows of q/k/v/gate/up."""
    from premoe.core.modules import finish_buffers

    plan = plan or full_plan(info)
    raw = pruned_config(info, plan, bias=bool(plan.bias))
    model = pruned_skeleton(raw, info, plan)
    fill_pruned(model, info, plan, reader_getter(info, reader))
    finish_buffers(model)
    model.name_or_path = str(info.path)
    _generation_config(model, info.path)
    return model.eval()


def prune_in_memory(model: nn.Module, info: DenseInfo, plan: DensePlan) -> nn.Module:
    """A pruned model that shares every unpruned tensor with ``model`` (a loaded dense model)."""
    from premoe.core.modules import finish_buffers

    state = dict(model.state_dict())
    dev = next(model.parameters()).device

    def get(name, dim, ids):
        t = state[name]
        return t if dim is None else t.index_select(dim, torch.tensor(ids, device=t.device))

    raw = pruned_config(info, plan, bias=bool(plan.bias))
    pruned = pruned_skeleton(raw, info, plan)
    fill_pruned(pruned, info, plan, get, dtype=next(model.parameters()).dtype)
    finish_buffers(pruned)
    pruned.generation_config = model.generation_config
    return pruned.to(dev).eval()


def full_plan(info: DenseInfo) -> DensePlan:
    r = range(info.num_layers)
    return DensePlan(
        {l: list(range(info.heads)) for l in r},
        {l: list(range(info.kv_heads)) for l in r},
        {l: list(range(info.intermediate)) for l in r},
        method="dense",
    )


def _generation_config(model: nn.Module, path: Path) -> None:
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError, json.JSONDecodeError):
            pass


def load_dense(path: str | Path, device=None, dtype="auto"):
    """(DenseInfo, model, tokenizer) with transformers' own loader."""
    from transformers import AutoModelForCausalLM

    from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype

    info = inspect_dense(path)
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=resolve_dtype(dtype))
    model.to(resolve_device(device)).eval()
    return info, model, load_tokenizer(info.path)
