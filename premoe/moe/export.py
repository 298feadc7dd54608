"""Writing a pruned HuggingFace checkpoint straight from the source safetensors.

The source is never loaded as a model: every output tensor is copied as byte ranges
(:mod:`premoe.core.checkpoint`), so pruning a checkpoint of any size needs one copy buffer of memory.
Per-expert keys (``experts.{e}.*``, how Mixtral, Qwen, DeepSeek and OLMoE are published and what
``save_pretrained`` writes) are dropped or renumbered to 0..N-1; fused tensors (GPT-OSS, Granite) and
router rows are sliced on dim 0. The result keeps the source's on-disk layout, so vanilla
transformers (and therefore vLLM/SGLang) load it. ``config.json`` gets the family's hub-native
expert-count key and a ``premoe`` block recording the kept experts; ``premoe_plan.json`` holds the
full plan. Everything is written to a temporary directory, verified, then renamed into place.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from premoe._version import __version__
from premoe.core.checkpoint import TORCH_DTYPES, OutTensor, fmt_bytes
from premoe.core.outdir import (
    DEFAULT_SHARD_BYTES,
    PLAN_FILE,
    check_out_dir,
    copy_side_files,
    staging_dir,
    write_weights,
)
from premoe.errors import CheckpointError
from premoe.moe.arch import find_moe_layers
from premoe.moe.model import ModelInfo
from premoe.moe.plans import PrunePlan
from premoe.moe.refit_checkpoint import down_targets
from premoe.moe.refit_weights import PART, RefitWeights
from premoe.moe.surgery import apply_config_updates, config_updates

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    out: Path
    plan: PrunePlan
    bytes_written: int
    bytes_source: int
    tensors: int
    seconds: float
    dropped: list[str] = field(default_factory=list)
    verified: bool = False

    def summary(self) -> str:
        """One line: what was kept, how it was chosen and re-fitted, and the bytes written."""
        p, fit = self.plan, self.plan.refit or {}
        how = (
            f", {p.scorer}"
            + (f", re-fitted on {fit['tokens']} tokens" if "tokens" in fit else "")
            + (f", not re-fitted: {fit['skipped']}" if "skipped" in fit else "")
            + (f", experts in {p.quantize.describe()}" if p.quantize is not None else "")
        )
        return (
            f"pruned to {p.top_k}/{p.keep} (top-k/experts per layer, from {p.top_k_before}/{p.num_experts}{how}) "
            f"for task {p.task!r}: {fmt_bytes(self.bytes_written)} of {fmt_bytes(self.bytes_source)} "
            f"({self.bytes_written / max(self.bytes_source, 1):.1%}) -> {self.out} in {self.seconds:.1f}s"
            + (" (reload verified)" if self.verified else "")
        )


DOWN_PARTS = ("scale", "zero", "global")  # companions a re-fit writes anew with the values (not activation scales)


def _part(info: ModelInfo, name: str) -> str:
    """The part of :meth:`RefitWeights.encoded` that checkpoint key ``name`` (a main tensor or its scale) holds."""
    found = info.quant.companion(name)
    main = found[0] if found is not None and found[1] in DOWN_PARTS else name
    return PART + name.removeprefix(info.quant.target(main))


def _refitted_rows(info: ModelInfo, name: str, ids: list[int], layer: int, refit: RefitWeights):
    """A fused down_proj tensor's (or its scale's) kept rows: the re-fitted experts' from ``refit`` (as stored,
    in the checkpoint's format), the others' bytes from the source."""
    t = info.checkpoint.tensors[name]
    part = _part(info, name)

    def make():
        rows = [
            refit.encoded(layer, e)[part] if refit.has(layer, e) else info.checkpoint.tensor(name, [e])[0] for e in ids
        ]
        return _stored(torch.stack(rows), t.dtype)

    return make


def _refitted_expert(info: ModelInfo, refit: RefitWeights, name: str, role, dtype: str):
    """One re-fitted expert's down projection (or its scale), as the checkpoint stores it, when it is written."""
    part = _part(info, name)
    return lambda: _stored(refit.encoded(role.layer, role.expert)[part], dtype)


def _stored(value: torch.Tensor, dtype: str) -> torch.Tensor:
    """``value`` in the checkpoint's dtype ``dtype`` (scales of E8M0 checkpoints as exponent bytes)."""
    from premoe.core.quant.fp8 import as_stored

    return as_stored(value, TORCH_DTYPES[dtype])


def _refitted_router(refit: RefitWeights, role, dtype: str):
    """A layer's re-fitted router rows, in the checkpoint's dtype, when they are written."""
    return lambda: refit.router(role.layer, role.target).to(TORCH_DTYPES[dtype])


def _is_down(role, down: dict[int, str]) -> bool:
    """Whether ``role`` is a re-fitted layer's down projection or its quantisation scale (zero point, global
    scale)."""
    return role.target == down.get(role.layer) and (role.companion is None or role.companion in DOWN_PARTS)


def plan_tensors(
    info: ModelInfo, plan: PrunePlan, refit: RefitWeights | None = None
) -> tuple[list[OutTensor], list[str]]:
    """The output tensors (as source byte ranges), in source order, and the keys dropped outright.

    Per-expert keys (and their quantisation scales) of kept experts are renumbered 0..N-1 where the
    expert id sits in the key; fused expert tensors, router rows and biases (and scales with an
    expert dimension) are sliced along it. Zero-computation experts keep their slots after the kept
    experts. Everything else is copied as it is. With ``refit`` the kept experts' down projections and
    router rows it holds replace the source's (:mod:`premoe.moe.refit_checkpoint`); with ``plan.quantize`` the
    kept experts' weight matrices are written quantised (:mod:`premoe.moe.quantize`).
    """
    down = down_targets(info) if refit is not None else {}
    quantizer = None
    if plan.quantize is not None:
        from premoe.moe.quantize import ExportQuantizer

        quantizer = ExportQuantizer(info, plan.quantize, down_targets(info), refit)
    out, dropped = [], []
    slots = {layer: info.slots(ids) for layer, ids in plan.kept.items()}
    position = {layer: {e: i for i, e in enumerate(ids)} for layer, ids in slots.items()}
    tensors = info.checkpoint.tensors
    for name in sorted(tensors, key=lambda n: (str(tensors[n].file), tensors[n].offset)):
        t, role = tensors[name], info.roles[name]
        whole = [(t.file, t.offset, t.nbytes)]
        rest = quantizer.rest(name, role) if quantizer is not None and role.kind != "beyond" else False
        if rest is None:
            continue  # a quantised source's scale: its weight is written dequantised, or re-quantised
        if rest is not False:
            out.append(rest)
        elif role.kind == "beyond":
            dropped.append(name)
        elif role.kind == "expert":
            new = position[role.layer].get(role.expert)
            if new is not None:
                a, b = role.span
                renamed = f"{name[:a]}{new}{name[b:]}"
                if quantizer is not None and quantizer.handles(name):
                    out += quantizer.tensors(name, renamed, role)
                elif _is_down(role, down) and refit.has(role.layer, role.expert):
                    make = _refitted_expert(info, refit, name, role, t.dtype)
                    out.append(OutTensor(renamed, t.dtype, t.shape, make=make))
                else:
                    out.append(OutTensor(renamed, t.dtype, t.shape, whole))
        elif role.kind == "router" and t.shape:
            dim = role.dim if t.shape[role.dim] == info.router.width else 0
            ids = slots[role.layer]
            shape = (*t.shape[:dim], len(ids), *t.shape[dim + 1 :])
            if refit is not None and role.target in refit.routers.get(role.layer, ()) and dim == 0:
                out.append(OutTensor(name, t.dtype, shape, make=_refitted_router(refit, role, t.dtype)))
            else:
                out.append(OutTensor(name, t.dtype, shape, t.select(dim, ids)))
        elif role.kind == "fused" and t.shape:
            ids = slots[role.layer] if role.rows == 0 else plan.kept[role.layer]
            per = max(role.rows, 1)  # rows per expert (per router slot), of this tensor or scale
            shape = (len(ids) * per, *t.shape[1:])
            if _is_down(role, down) and refit.experts.get(role.layer):
                out.append(OutTensor(name, t.dtype, shape, make=_refitted_rows(info, name, ids, role.layer, refit)))
            else:
                out.append(OutTensor(name, t.dtype, shape, t.rows(ids, per)))
        else:
            out.append(OutTensor(name, t.dtype, t.shape, whole))
    return out, dropped


def pruned_config(info: ModelInfo, plan: PrunePlan, dropped_layers: bool) -> dict:
    updates = config_updates(info.model_config, info.spec, info.config, plan)
    if info.text_key:  # a multimodal release: the language model's keys live in its text config
        updates = {f"{info.text_key}.{k}": v for k, v in updates.items()}
    cfg = apply_config_updates(info.raw_config, updates)
    if dropped_layers and "num_nextn_predict_layers" in cfg:
        cfg["num_nextn_predict_layers"] = 0  # the MTP layer's experts were not pruned, so it was dropped
    cfg["premoe"] = {
        "version": __version__,
        "task": plan.task,
        "scorer": plan.scorer,
        "num_experts_before": plan.num_experts,
        "top_k_before": plan.top_k_before,
        "group_policy": plan.group_policy,
        "kept_experts": {str(k): v for k, v in plan.kept.items()},
        "source_router_sha256": plan.source.get("router_sha256"),
    }
    if plan.refit:
        cfg["premoe"]["refit"] = plan.refit
    if plan.quantize is not None:
        cfg["quantization_config"] = plan.quantize.config()
        cfg["premoe"]["quantize"] = plan.quantize.about()
    return cfg


def verify_export(path: Path, info: ModelInfo, plan: PrunePlan, reload: bool = True) -> None:
    """Check the export before it is moved into place: premoe reads it back (config, every key's role
    through transformers' own conversion mapping, expert counts, quantisation scales), then, with
    ``reload``, plain ``AutoModelForCausalLM`` loads it and every weight must land (missing, unexpected
    or mis-shaped weights fail). A ``model_type`` transformers only knows through its ``architectures``
    (Kimi-K2's ``kimi_k2``) is reloaded through that class's config. Formats transformers cannot load with
    fused experts (compressed-tensors block FP8) get premoe's read-back only."""
    from transformers import AutoModelForCausalLM

    from premoe.core.config import config_from_dict
    from premoe.moe.model import inspect_model

    new = inspect_model(path)
    if new.num_experts != plan.keep or new.moe_layers != info.moe_layers:
        raise CheckpointError(
            f"self-check failed: the export reads back with {new.num_experts} experts in layers "
            f"{new.moe_layers}, not {plan.keep} in {info.moe_layers}"
        )
    if not reload:
        return
    if not new.quant.transformers_reloads:
        log.info("not reloading the export in transformers: it cannot load %s with fused experts", new.quant.label)
        return
    kwargs = {}
    loader = AutoModelForCausalLM
    arch = (new.raw_config.get("architectures") or [None])[0]
    import transformers

    if info.text_key and arch and hasattr(transformers, arch):
        loader = getattr(transformers, arch)  # a multimodal release: load it the way its users do
    elif new.config_type != new.raw_config.get("model_type"):
        config = config_from_dict(new.model_config, new.config_type)
        if new.quant.quantized:
            config.quantization_config = new.raw_config["quantization_config"]
        kwargs["config"] = config
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the other towers of multimodal releases
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, loading = loader.from_pretrained(path, dtype="auto", output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    problems = {k: v for k, v in loading.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if info.text_key and loader is AutoModelForCausalLM and problems.get("unexpected_keys"):
        # a multimodal release reloaded as its language model: the other towers are expected to be left over
        mapped = {r.target for r in new.roles.values() if r.target}
        problems["unexpected_keys"] = {k for k in problems["unexpected_keys"] if k in mapped}
        problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise CheckpointError(f"self-check failed: transformers reloads the pruned model with {problems}")
    if loader is not AutoModelForCausalLM:  # the multimodal model: check its language model
        model = getattr(model, "language_model", None) or getattr(
            getattr(model, "model", None), "language_model", model
        )
    for m in find_moe_layers(model, info.spec):
        path0, dim = next(iter(m.router_tensors.items()))
        got = m.tensor(path0).shape[dim]
        if got != len(info.slots(plan.kept[m.index])):
            raise CheckpointError(f"self-check failed: layer {m.index} reloads with {got} router rows, not {plan.keep}")
    del model


def export_pruned(
    info: ModelInfo,
    plan: PrunePlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    verify: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> ExportResult:
    """Write the checkpoint of ``info`` pruned to ``plan`` into ``out`` (atomically), with the kept experts'
    re-fitted rows where the plan holds them (``plan.weights``, :func:`premoe.moe.refit_checkpoint.refit_for`)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_out_dir(out, info.path, overwrite)
    tensors, dropped = plan_tensors(info, plan, plan.weights)
    with staging_dir(out) as tmp:
        total = write_weights(tmp, tensors, max_shard_bytes, progress)
        (tmp / "config.json").write_text(json.dumps(pruned_config(info, plan, bool(dropped)), indent=2) + "\n")
        copy_side_files(info.path, tmp)
        result = ExportResult(out, plan, total, info.checkpoint.nbytes, len(tensors), time.perf_counter() - t0, dropped)
        (tmp / PLAN_FILE).write_text(
            json.dumps(
                {**plan.to_dict(), "bytes": total, "bytes_source": result.bytes_source, "dropped": dropped}, indent=2
            )
            + "\n"
        )
        if verify:
            from premoe.core.memory import available_bytes
            from premoe.moe.streaming import resident_sizes

            need = resident_sizes(info, plan=plan)["total"]
            reload = need <= 0.6 * available_bytes()
            if not reload:
                log.warning(
                    "the pruned model needs %.0f MB in memory, more than is free: checked its layout without "
                    "reloading it in transformers",
                    need / 2**20,
                )
            verify_export(tmp, info, plan, reload=reload)
            result.verified = True
    result.seconds = time.perf_counter() - t0
    if dropped:
        log.warning("dropped %d tensors of layers past num_hidden_layers (e.g. %s)", len(dropped), dropped[0])
    return result
