"""``premoe prune --quantize``: the kept experts written quantised in compressed-tensors format, what vLLM
serves.

* ``w4a16`` / ``w8a16``: ``pack-quantized`` symmetric INT4 / INT8 weights, one bf16 scale per group of
  inputs (128, or the largest of 64/32/16 that divides every expert's inputs), rounded by GPTQ
  (:func:`premoe.core.quant.gptq.gptq`) with each kept expert's input Gram matrix from the re-fit's pass: the
  hidden states of the tokens the pruned router sends to it for its gate/up projections, its routing-weighted
  activations (the re-fit's own system matrix) for its down projection. ``rtn`` rounds to nearest and needs
  no pass over the data.
* ``fp8``: ``float-quantized`` FP8 in 128x128 blocks with float32 scales (DeepSeek-V3's geometry), rounded to
  nearest as vLLM quantises blocks.

Only the kept experts' weight matrices are quantised; attention, shared experts, routers, norms and
embeddings stay in the source's dtype (``quantization_config`` targets the experts by name). The
re-fitted down projections are quantised after the re-fit. Sources store their experts as per-expert keys
(``experts.{e}.gate_proj.weight``...), the layout compressed-tensors quantises, unquantised (bf16/fp16/fp32)
or, for ``w4a16``/``w8a16``, in FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8: block or compressed-tensors FP8). From
FP8 the experts are rounded from their dequantised values and every other FP8 weight (attention, shared
experts, dense layers) is written dequantised to the config's dtype, since one checkpoint has one
``quantization_config`` (what Kimi-K2-Thinking's INT4 release looks like). Anything else is refused in one line.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from premoe.core.checkpoint import OutTensor
from premoe.core.quant import CompressedFp8, CompressedPacked, Fp8Blocks, QuantFormat
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.options import QuantizeOptions

GROUPS = (128, 64, 32, 16)  # the default group size: the first that divides every expert's inputs
FP8_BLOCK = (128, 128)
PART = "weight"  # the key a quantised weight's parts are encoded under
GRAM_BYTES = 2**30  # float64 Gram matrices batched into one GPTQ call

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertQuant:
    """A checked ``--quantize``: the scheme, its rounding, the output format, and the regular expressions that
    name the quantised modules in its ``quantization_config``."""

    scheme: str
    rounding: str
    fmt: QuantFormat
    targets: tuple[str, ...]  # the config's regular expressions naming the quantised modules

    @property
    def gptq(self) -> bool:
        return self.rounding == "gptq"

    @property
    def bits(self) -> int:
        return getattr(self.fmt, "bits", 8)

    def about(self) -> dict[str, Any]:
        group = getattr(self.fmt, "group", None)
        return {"scheme": self.scheme, "rounding": self.rounding, "group_size": group, "format": self.fmt.label}

    def describe(self) -> str:
        return f"{self.scheme} ({self.rounding}, {self.fmt.label})"

    def config(self) -> dict[str, Any]:
        """``quantization_config``: the format's, targeting the experts' weight matrices by name."""
        qc = self.fmt.config()
        group = qc["config_groups"]["group_0"]
        group["targets"] = list(self.targets)
        if isinstance(
            self.fmt, CompressedFp8
        ):  # llm-compressor's FP8_BLOCK: activations quantised per token in groups of 128
            group["input_activations"] = {
                "num_bits": 8,
                "type": "float",
                "symmetric": True,
                "dynamic": True,
                "strategy": "group",
                "group_size": FP8_BLOCK[1],
            }
        qc["ignore"] = ["lm_head"]
        return qc


def _split_weights(info, layer: int) -> dict[str, Any]:
    """The layer's expert weight matrices as per-expert keys: in-memory name -> :class:`Source`.

    Raises:
        UnsupportedModelError: they are stored fused or converted.
    """
    out = {}
    for name in info.layout.moe[layer]["experts"]:
        if name.endswith("_bias"):
            continue
        src = info.layout.sources.get(name)
        if src is None or src.kind != "split" or src.converter is not None:
            raise UnsupportedModelError(
                f"`quantize` writes per-expert keys as compressed-tensors quantises them, but {info.spec.name} stores "
                f"layer {layer}'s {name.rsplit('.', 1)[-1]} as fused tensors; prune without `quantize`"
            )
        out[name] = src
    return out


def _inputs(info, src) -> int:
    """The inputs of an expert weight matrix (its checkpoint keys' last dim)."""
    return info.checkpoint.tensors[next(iter(src.parts.values()))].shape[-1]


def _targets(info) -> tuple[str, ...]:
    """Regular expressions naming every expert's projection modules (``re:.*\\.experts\\.\\d+\\.(down_proj|...)$``)."""
    found: dict[str, set[str]] = {}
    for layer in info.layout.moe:
        for src in _split_weights(info, layer).values():
            for key in src.parts.values():
                role = info.roles[key]
                a, b = role.span
                module = key.removesuffix(".weight")
                parent = key[:a].rstrip(".").rsplit(".", 1)[-1]
                found.setdefault(parent, set()).add(module[b:].lstrip("."))
    return tuple(
        f"re:.*\\.{re.escape(p)}\\.\\d+\\.({'|'.join(re.escape(leaf) for leaf in sorted(leaves))})$"
        for p, leaves in sorted(found.items())
    )


def resolve_quantize(info, options: QuantizeOptions | None) -> ExpertQuant | None:
    """Check ``options`` against ``info`` before any work and choose the group size.

    Raises:
        InputError: a quantised source the scheme does not apply to, a group size that does not divide the
            experts' inputs.
        UnsupportedModelError: experts not stored as per-expert keys, a quantised router or fused tensor.
    """
    if options is None or options.quantize is None:
        return None
    if info.quant.quantized and (options.float_weights or not isinstance(info.quant, (Fp8Blocks, CompressedFp8))):
        raise InputError(
            f"`quantize` {options.quantize} does not apply to {info.path}, already quantised ({info.quant.label}): "
            "it writes INT4/INT8 experts from bf16/fp16/fp32 or FP8 checkpoints, FP8 from unquantised ones; prune "
            "it without `quantize` (its kept experts are written as they are stored)"
        )
    if not info.spec.experts or info.spec.weight_on_input or info.router.slots:
        raise UnsupportedModelError(
            f"`quantize` writes experts in transformers' fused experts interface; {info.spec.name}'s are laid out "
            "otherwise; prune without `quantize`"
        )
    if info.quant.quantized:
        scaled = scale_keys(info)
        odd = next((k for k in scaled if info.roles[k].kind in ("router", "fused")), None)
        if odd is not None:
            raise UnsupportedModelError(
                f"`quantize` from {info.quant.label} writes the non-expert weights dequantised, but {odd} (a router "
                "or fused tensor) is quantised too; prune it without `quantize`"
            )
    widths = {_inputs(info, src) for layer in info.layout.moe for src in _split_weights(info, layer).values()}
    targets = _targets(info)
    if options.float_weights:
        rows = {info.checkpoint.tensors[k].shape[0] for layer in info.layout.moe
                for s in _split_weights(info, layer).values() for k in s.parts.values()}  # fmt: skip
        if any(r % FP8_BLOCK[0] for r in rows):
            log.warning(
                "the experts' output widths %s are not multiples of %d: vLLM's FP8 MoE kernels will not load this "
                "export (premoe reads it)",
                sorted(rows),
                FP8_BLOCK[0],
            )
        return ExpertQuant(options.quantize, "rtn", CompressedFp8("block", FP8_BLOCK), targets)
    bits = options.bits
    group = options.quantize_group
    if group is None:
        group = next((g for g in GROUPS if all(w % g == 0 for w in widths)), None)
        if group is None:
            raise InputError(
                f"no group size of {', '.join(map(str, GROUPS))} divides the experts' inputs {sorted(widths)}; "
                "pass `quantize_group`"
            )
    elif any(w % group for w in widths):
        raise InputError(
            f"`quantize_group` {group} does not divide the experts' inputs {sorted(widths)}; pass a divisor of "
            f"{math.gcd(*widths)}"
        )
    return ExpertQuant(options.quantize, options.rounding, CompressedPacked(bits, group), targets)


# -- GPTQ on one MoE layer (inside the re-fit's pass) ------------------------------------------------------


class ExpertGrams:
    """Per kept expert (original id), on demand: the Gram matrix [D, D] of the hidden states the pruned router
    sends it (for its gate/up projections) and [I, I] of its routing-weighted activations (for its down
    projection), float64, zeros where no token goes. Only the tokens' rows and activations are kept; each Gram
    matrix is made when a GPTQ batch needs it, so a layer's memory is one batch of them, not one per expert
    (DeepSeek-V3's [7168, 7168] float64 is 411 MB)."""

    def __init__(self, m, h: torch.Tensor, logits: torch.Tensor, kept: list[int], routing):
        from premoe.moe.refit import rerouted

        self.x = h.to(m.experts.down_proj.device, torch.float32)
        self.sel = {
            kept[p]: v for p, v in rerouted(m.experts, self.x, logits, kept, routing, m.selection_bias()).items()
        }

    def __call__(self, e: int, down: bool, n: int) -> torch.Tensor:
        got = self.sel.get(e)
        if got is None:
            return torch.zeros(n, n, dtype=torch.float64, device=self.x.device)
        rows, a, _ = got
        v = a.double() if down else self.x[rows].double()
        return v.T @ v


def _disk_weights(info, m, name: str, src, e: int, down: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Expert ``e``'s weight matrices of in-memory tensor ``name``, per checkpoint key, as stored ([out, in],
    float32): the layer's own, or ``down`` (the re-fitted [D, I]) for its down projection."""
    experts = m.experts
    w = down if down is not None else getattr(experts, name.rsplit(".", 1)[-1])[e].float()
    if down is None and experts.is_transposed:
        w = w.T
    n = w.shape[0] // src.n_parts
    out = {}
    for p in range(src.n_parts):
        key = src.parts[(e, p)]
        part = w[p * n : (p + 1) * n]
        if tuple(part.shape) != tuple(info.checkpoint.tensors[key].shape):
            raise UnsupportedModelError(f"`quantize` cannot map {key} {info.checkpoint.tensors[key].shape} to memory")
        out[key] = part
    return out


@torch.inference_mode()
def quantize_layer(
    info,
    m,
    h: torch.Tensor,
    logits: torch.Tensor,
    kept: list[int],
    routing,
    down: dict[int, torch.Tensor],
    down_name: str,
    q: ExpertQuant,
) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ of every kept expert's weight matrices of MoE layer ``m`` (the dense model's, float32) on its
    recorded block inputs ``h`` and router logits; ``down``: re-fitted down projections [D, I] by expert, of the
    in-memory tensor ``down_name``.
    Returns {checkpoint key: the parts :meth:`QuantFormat` stores for it, under :data:`PART`}."""
    from premoe.core.quant.gptq import gptq

    grams = ExpertGrams(m, h, logits, kept, routing)
    jobs = []  # (key, weight [out, in], expert, is the down projection)
    for name, src in _split_weights(info, m.index).items():
        is_down = name == down_name
        for e in kept:
            ws = _disk_weights(info, m, name, src, e, down.get(e) if is_down else None)
            jobs += [(key, w, e, is_down) for key, w in ws.items()]
    out: dict[str, dict[str, torch.Tensor]] = {}
    by_shape: dict[tuple, list] = {}
    for job in jobs:
        by_shape.setdefault(tuple(job[1].shape), []).append(job)
    for (rows, cols), group in by_shape.items():
        group.sort(key=lambda j: (j[2], j[3]))  # an expert's matrices side by side: one Gram matrix for its gate and up
        step = max(1, GRAM_BYTES // (cols * cols * 8 * 3))
        for i in range(0, len(group), step):
            chunk = group[i : i + step]
            made: dict[tuple[int, bool], torch.Tensor] = {}
            for _, _, e, is_down in chunk:
                if (e, is_down) not in made:
                    made[(e, is_down)] = grams(e, is_down, cols)
            W = torch.stack([j[1] for j in chunk])
            H = torch.stack([made[(j[2], j[3])] for j in chunk])
            del made
            codes, scales = gptq(W, H, q.bits, q.fmt.group)
            for (key, _, _, _), c, s in zip(chunk, codes, scales):
                out[key] = {k: v.cpu() for k, v in q.fmt.parts(PART, c, s).items()}
    return out


# -- the export's tensors ------------------------------------------------------------------------------


def _out_specs(q: ExpertQuant, shape: tuple[int, int]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The stored parts of a [out, in] weight: {part name: (safetensors dtype, shape)}."""
    rows, cols = shape
    if isinstance(q.fmt, CompressedPacked):
        words = -(-cols // q.fmt.per_word)
        group = q.fmt.group
        return {
            f"{PART}_packed": ("I32", (rows, words)),
            f"{PART}_scale": ("BF16", (rows, cols // group if group else 1)),
            f"{PART}_shape": ("I64", (2,)),
        }
    b0, b1 = FP8_BLOCK
    return {PART: ("F8_E4M3", (rows, cols)), f"{PART}_scale": ("F32", (-(-rows // b0), -(-cols // b1)))}


class ExportQuantizer:
    """Turns a kept expert's weight key into its quantised output tensors, each computed when written: the
    GPTQ parts the re-fit's pass stored, else the weight (re-fitted down projection, or the source's)
    rounded to nearest. ``downs``: each MoE layer's in-memory down projection name. One weight's parts are held
    at a time."""

    def __init__(self, info, q: ExpertQuant, downs: dict[int, str], refit=None):
        from premoe.moe.selective import compute_dtype

        self.info, self.q, self.refit, self.downs = info, q, refit, downs
        self.scales = scale_keys(info)
        self.dtype = compute_dtype(info)
        splits = [s for layer in info.layout.moe for s in _split_weights(info, layer).values()]
        self.keys = {k for s in splits for k in s.parts.values()}
        self._last: tuple[str, dict[str, torch.Tensor]] | None = None

    def handles(self, name: str) -> bool:
        return name in self.keys

    def _parts(self, name: str, role) -> dict[str, torch.Tensor]:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        parts = self.refit.quantized(role.layer, name) if self.refit is not None else None
        if parts is None:
            w = None
            if self.refit is not None and self.refit.has(role.layer, role.expert) and self._is_down(role):
                w = self.refit.get(role.layer, role.expert)
            if w is None:
                w = self.source(name, torch.float32)
            parts = self.q.fmt.encode(PART, w.float())
        self._last = (name, parts)
        return parts

    def source(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Checkpoint tensor ``name`` as values: dequantised with its scale where it has one, else as stored."""
        value = self.info.checkpoint.tensor(name)
        scale = self.scales.get(name)
        return value if scale is None else self.info.quant.dequant(value, self.info.checkpoint.tensor(scale), dtype)

    def rest(self, name: str, role) -> OutTensor | None | bool:
        """How a quantised source's tensor ``name`` is written: dequantised to the config's dtype (an
        :class:`OutTensor`; a quantised weight outside the experts), dropped (``None``: a scale or static
        activation scale; the kept experts' new parts replace theirs) or as the rest of the export does
        (``False``: everything else, and every tensor of an unquantised source)."""
        from premoe.core.checkpoint import TORCH_DTYPES

        if not self.info.quant.quantized:
            return False
        if role.companion is not None:
            return None
        if name not in self.scales or role.kind != "other":
            return False
        label = next(k for k, v in TORCH_DTYPES.items() if v == self.dtype)
        shape = tuple(self.info.checkpoint.tensors[name].shape)
        return OutTensor(name, label, shape, make=lambda: self.source(name, self.dtype).contiguous())

    def _is_down(self, role) -> bool:
        return role.target == self.downs.get(role.layer)

    def tensors(self, name: str, renamed: str, role) -> list[OutTensor]:
        base = renamed.removesuffix(PART)
        shape = tuple(self.info.checkpoint.tensors[name].shape)
        out = []
        for part, (dtype, pshape) in _out_specs(self.q, shape).items():

            def make(part=part):
                return self._parts(name, role)[part]

            out.append(OutTensor(base + part, dtype, pshape, make=make))
        return out


# -- the rest of a quantised source --------------------------------------------------------------------


def scale_keys(info) -> dict[str, str]:
    """{main key: its scale key} of a quantised checkpoint (empty for an unquantised one)."""
    out = {}
    for key in info.checkpoint.tensors if info.quant.quantized else ():
        c = info.quant.companion(key)
        if c is not None and c[1] == "scale":
            out[c[0]] = key
    return out
