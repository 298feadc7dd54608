"""Writing a structurally pruned dense checkpoint straight from the source safetensors.

Unchanged tensors are copied as byte ranges; each pruned projection is read, sliced (and, for
plans whose layers differ, zero-padded to the largest layer's counts) and written one tensor at a
time, so memory stays at about one weight matrix; shards of at most 5 GB with an index, as the hub
does. ``config.json`` gets the kept head, KV-head and channel counts (plus the bias flags when
compensation is written) and a ``premoe`` block; the
result is a plain checkpoint of the same family that ``AutoModelForCausalLM`` loads. Written to a
temporary directory, verified by reloading, then renamed into place.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from premoe._version import __version__
from premoe.core.checkpoint import TORCH_DTYPES, ByteReader, OutTensor, fmt_bytes
from premoe.core.outdir import (
    DEFAULT_SHARD_BYTES,
    PLAN_FILE,
    check_out_dir,
    copy_side_files,
    staging_dir,
    write_weights,
)
from premoe.dense.model import (
    DenseInfo,
    DensePlan,
    bias_flags,
    kept_params,
    pruned_config,
    reader_getter,
    refit_getter,
    slices,
)
from premoe.errors import CheckpointError, UnsupportedModelError

log = logging.getLogger(__name__)
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class DenseExportResult:
    out: Path
    plan: DensePlan
    bytes_written: int
    bytes_source: int
    params_kept: int
    params_source: int
    sparsity: float  # decoder linear weights removed, as written
    padded: bool
    seconds: float
    verified: bool = False

    def summary(self) -> str:
        """One line: the method, the share of decoder weights removed, the kept counts and the bytes written."""
        p = self.plan
        h, g, c = p.counts()
        how = (", re-fitted" if p.refit else "") + (
            f", not re-fitted: {p.info['refit_skipped']}" if p.info.get("refit_skipped") else ""
        )
        return (
            f"pruned ({p.method}, {p.info['schedule']}{how}) for task {p.task!r}: {self.sparsity:.1%} of decoder "
            f"linear weights removed ({self.params_kept:,} of {self.params_source:,}); {h} heads / {g} KV heads / "
            f"{c} FFN channels per layer{' (zero-padded)' if self.padded else ''}; {fmt_bytes(self.bytes_written)} "
            f"of {fmt_bytes(self.bytes_source)} ({self.bytes_written / max(self.bytes_source, 1):.1%}) -> {self.out} "
            f"in {self.seconds:.1f}s" + (" (reload verified)" if self.verified else "")
        )


def _padded_ids(info: DenseInfo, plan: DensePlan, layer: int) -> dict[str, list[int | None]]:
    """Kept indices per pruned dim, padded with ``None`` (a zero slice) to the largest layer's counts;
    query heads are padded inside each KV group so the grouping stays valid."""
    h_max, g_max, c_max = plan.counts()
    d = info.head_dim
    per_group = h_max // g_max
    heads: list[int | None] = []
    kv: list[int | None] = list(plan.kv[layer]) + [None] * (g_max - len(plan.kv[layer]))
    for g in kv:
        real = [h for h in plan.heads[layer] if g is not None and h // info.group == g]
        heads += real + [None] * (per_group - len(real))
    ch = list(plan.channels[layer]) + [None] * (c_max - len(plan.channels[layer]))
    rows = lambda ids: [None if i is None else i * d + j for i in ids for j in range(d)]  # noqa: E731
    return {"q": rows(heads), "kv": rows(kv), "ch": ch}


def _sliced(get, name: str, dim: int, ids: list[int | None], dtype: torch.dtype, extra: torch.Tensor | None):
    def make():
        real = [i for i in ids if i is not None]
        value = get(name, dim, real)
        if len(real) != len(ids):  # zero padding
            shape = list(value.shape)
            shape[dim] = len(ids)
            full = torch.zeros(shape, dtype=value.dtype)
            pos = torch.tensor([j for j, i in enumerate(ids) if i is not None])
            full.index_copy_(dim, pos, value)
            value = full
        if extra is not None:
            value = (value.float() + extra.float()).to(dtype)
        return value.to(dtype).contiguous()

    return make


def plan_tensors(info: DenseInfo, plan: DensePlan, reader: ByteReader) -> list[OutTensor]:
    get = refit_getter(info, plan, reader_getter(info, reader))
    out: list[OutTensor] = []
    cut: dict[str, tuple[int, str]] = {}
    for l in range(info.num_layers):
        kinds = {"q": "q", "k": "kv", "v": "kv", "o": "q", "gate": "ch", "up": "ch", "down": "ch"}
        for name, (dim, _ids) in slices(info, plan, l).items():
            proj = next((p for p in kinds if name in (info.key(l, p), info.key(l, p, "bias"))), None)
            if proj is None:  # per-head norms
                t = info.checkpoint.tensors[name]
                cut[name] = (dim, "q" if t.shape[0] == info.heads * info.head_dim else "kv", l)
            else:
                cut[name] = (dim, kinds[proj], l)
    padded = {l: _padded_ids(info, plan, l) for l in range(info.num_layers)}
    for name in sorted(info.checkpoint.tensors):
        t = info.checkpoint.tensors[name]
        if name in cut:
            dim, kind, l = cut[name]
            ids = padded[l][kind]
            shape = list(t.shape)
            shape[dim] = len(ids)
            out.append(
                OutTensor(name, t.dtype, tuple(shape), make=_sliced(get, name, dim, ids, TORCH_DTYPES[t.dtype], None))
            )
        else:
            out.append(OutTensor(name, t.dtype, tuple(t.shape), [(t.file, t.offset, t.nbytes)]))
    # compensation biases (and the zero biases their config flags bring along)
    if plan.bias:
        flags = bias_flags(info, plan)
        dtype_name = info.checkpoint.tensors[info.key(0, "o")].dtype
        dt = TORCH_DTYPES[dtype_name]
        have = {t.name for t in out}
        for l in range(info.num_layers):
            sizes = {
                "q": len(padded[l]["q"]),
                "k": len(padded[l]["kv"]),
                "v": len(padded[l]["kv"]),
                "o": info.hidden,
                "gate": len(padded[l]["ch"]),
                "up": len(padded[l]["ch"]),
                "down": info.hidden,
            }
            groups = {info.spec.attn_bias_key: ("q", "k", "v", "o"), info.spec.mlp_bias_key: ("gate", "up", "down")}
            for flag, projs in groups.items():
                if flag not in flags:
                    continue
                for p in projs:
                    name = info.key(l, p, "bias")
                    comp = plan.bias.get(f"{l}.{p}")
                    if name in have:
                        if comp is not None:  # an existing bias plus the compensation
                            t = info.checkpoint.tensors[name]
                            out = [o for o in out if o.name != name]
                            out.append(
                                OutTensor(
                                    name,
                                    t.dtype,
                                    tuple(t.shape),
                                    make=_sliced(get, name, 0, list(range(t.shape[0])), dt, comp),
                                )
                            )
                        continue
                    value = torch.zeros(sizes[p]) if comp is None else comp

                    def make(v=value):
                        return v.to(dt).contiguous()

                    out.append(OutTensor(name, dtype_name, (sizes[p],), make=make))
    return out


def _config(info: DenseInfo, plan: DensePlan, padded: bool, written_sparsity: float) -> dict:
    cfg = pruned_config(info, plan, bias=bool(plan.bias))
    cfg["premoe"] = {
        "version": __version__,
        "kind": "dense",
        "method": plan.method,
        "task": plan.task,
        "sparsity": written_sparsity,
        "padded": padded,
        "source": {"heads": info.heads, "kv_heads": info.kv_heads, "intermediate_size": info.intermediate},
        **{k: v for k, v in plan.info.items() if k != "sparsity"},
        "pruned_sparsity": plan.info.get("sparsity"),
    }
    return cfg


def verify_export(path: Path, info: DenseInfo, plan: DensePlan, reload: bool = True) -> None:
    """Check the export before it is moved into place: premoe reads it back (config and every tensor's
    shape, as :func:`inspect_dense` checks a source checkpoint), then, with ``reload``, plain
    ``AutoModelForCausalLM`` loads it, every layer has the plan's shapes, and it runs."""
    import warnings

    from transformers import AutoModelForCausalLM

    from premoe.dense.model import inspect_dense

    try:
        new = inspect_dense(path)
    except (CheckpointError, UnsupportedModelError) as e:
        raise CheckpointError(f"self-check failed: the export does not read back ({e})") from None
    if (new.heads, new.kv_heads, new.intermediate) != plan.counts():
        raise CheckpointError(
            f"self-check failed: the export reads back with {(new.heads, new.kv_heads, new.intermediate)} "
            f"heads / KV heads / channels, not {plan.counts()}"
        )
    if not reload:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    except Exception as e:  # noqa: BLE001 - any loader failure means a broken export
        raise CheckpointError(
            f"self-check failed: transformers cannot load the export ({type(e).__name__}: {e})"
        ) from None
    h, g, c = plan.counts()
    for layer in model.get_submodule(info.decoder_prefix):
        attn, mlp = getattr(layer, info.spec.attn), getattr(layer, info.spec.mlp)
        got = (
            getattr(attn, info.spec.q).out_features,
            getattr(attn, info.spec.k).out_features,
            getattr(mlp, info.spec.gate).out_features,
        )
        if got != (h * info.head_dim, g * info.head_dim, c):
            raise CheckpointError(f"self-check failed: reloaded layer shapes {got} differ from the plan")
        if plan.bias and getattr(mlp, info.spec.down).bias is None and info.spec.mlp_bias_key:
            raise CheckpointError("self-check failed: the compensation bias was dropped on reload")
    with torch.inference_mode():
        logits = model(torch.tensor([[0, 1, 2]]) % model.config.vocab_size).logits
    if not torch.isfinite(logits).all():
        raise CheckpointError("self-check failed: the reloaded model produces non-finite logits")


def export_dense(
    info: DenseInfo,
    plan: DensePlan,
    out: str | Path,
    *,
    overwrite: bool = False,
    verify: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> DenseExportResult:
    """Write ``info``'s checkpoint pruned to ``plan`` into ``out`` (atomically)."""
    t0 = time.perf_counter()
    out = Path(out)
    check_out_dir(out, info.path, overwrite)
    padded = not plan.uniform()
    if padded:
        log.warning(
            "layers keep different counts: padding every layer to the largest (%d heads, %d channels) so "
            "vanilla transformers loads it; use `schedule='uniform'` for the full size reduction",
            plan.counts()[0],
            plan.counts()[2],
        )
    with staging_dir(out) as tmp:
        with ByteReader() as reader:
            total = write_weights(tmp, plan_tensors(info, plan, reader), max_shard_bytes, progress)
        params_source = kept_params(info, None)
        params_kept = kept_params(info, plan, padded=padded)
        sparsity = round(1 - params_kept / params_source, 6)
        (tmp / "config.json").write_text(json.dumps(_config(info, plan, padded, sparsity), indent=2) + "\n")
        copy_side_files(info.path, tmp)
        plan_json = {
            **plan.to_json(),
            "bias_comp": sorted(plan.bias),
            "bytes": total,
            "bytes_source": info.checkpoint.nbytes,
            "sparsity_written": sparsity,
        }
        (tmp / PLAN_FILE).write_text(json.dumps(plan_json, indent=2) + "\n")
        if verify:
            from premoe.core.memory import available_bytes

            reload = total <= 0.6 * available_bytes()
            if not reload:
                log.warning(
                    "the pruned model needs %.0f MB in memory, more than is free: checked its layout without "
                    "reloading it in transformers",
                    total / 2**20,
                )
            verify_export(tmp, info, plan, reload=reload)
    return DenseExportResult(
        out,
        plan,
        total,
        info.checkpoint.nbytes,
        params_kept,
        params_source,
        sparsity,
        padded,
        time.perf_counter() - t0,
        verified=verify,
    )
