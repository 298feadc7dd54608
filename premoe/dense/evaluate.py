"""Accuracy of a dense model, whole or pruned to a plan (built from the checkpoint's byte ranges), on a data file."""

from __future__ import annotations

from typing import Any

from premoe.core.checkpoint import ByteReader
from premoe.dense.model import DenseInfo, DensePlan, build_dense


def evaluate_dense(info: DenseInfo, data, plan: DensePlan | None, *, batch_size: int = 64, max_new_tokens=None,
                   limit=None, device="cpu", dtype="auto", progress: bool = True) -> dict[str, Any]:
    from premoe.core.evaluation import choice_accuracy, exact_match, read_eval_data
    from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype

    gen, mc = read_eval_data(data, limit)
    with ByteReader() as reader:
        net = build_dense(info, plan, reader)
        dt = resolve_dtype(dtype)
        net.to(device=resolve_device(device), dtype=None if dt == "auto" else dt)
        tok = load_tokenizer(info.path)
        out: dict[str, Any] = {"model": str(info.path), "data": str(data), "bytes_read": reader.bytes_read}
    out["exact_match"] = exact_match(net, tok, gen, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     progress=progress) if gen else None
    out["generate_samples"] = len(gen)
    out["mc_accuracy"] = choice_accuracy(net, tok, mc, progress=progress) if mc else None
    out["mc_samples"] = len(mc)
    if plan is not None:
        out.update(method=plan.method, task=plan.task, sparsity=plan.info["sparsity"], schedule=plan.info["schedule"],
                   refit=bool(plan.refit))
    return out
