"""Accuracy of a dense model, whole or pruned to a plan (built from the checkpoint's byte ranges), on a data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from premoe.core.checkpoint import ByteReader
from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
from premoe.core.evaluation import choice_accuracy, exact_match, read_eval_data
from premoe.core.options import RunOptions
from premoe.dense.model import DenseInfo, DensePlan, build_dense


def evaluate_dense(
    info: DenseInfo,
    data: str | Path,
    plan: DensePlan | None,
    *,
    run: RunOptions = RunOptions(),
    limit: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Greedy exact match of ``{"prompt", "completion"}`` lines and log-likelihood accuracy of
    ``{"prompt", "choices", "answer"}`` lines of ``data``, for ``info``'s model pruned to ``plan`` or whole."""
    gen, mc = read_eval_data(data, limit)
    with ByteReader() as reader:
        net = build_dense(info, plan, reader)
        dt = resolve_dtype(run.dtype)
        net.to(device=resolve_device(run.device), dtype=None if dt == "auto" else dt)
        tok = load_tokenizer(info.path)
        out: dict[str, Any] = {"model": str(info.path), "data": str(data), "bytes_read": reader.bytes_read}
    out["exact_match"] = (
        exact_match(net, tok, gen, batch_size=run.batch_size, max_new_tokens=max_new_tokens, progress=run.progress)
        if gen
        else None
    )
    out["generate_samples"] = len(gen)
    out["mc_accuracy"] = choice_accuracy(net, tok, mc, progress=run.progress) if mc else None
    out["mc_samples"] = len(mc)
    if plan is not None:
        sparsity = plan.info["sparsity"]
        out.update(
            method=plan.method,
            task=plan.task,
            sparsity=sparsity,
            schedule=plan.info["schedule"],
            refit=bool(plan.refit),
            pruning=f"{plan.method}{', re-fitted' if plan.refit else ''} for {plan.task}, {sparsity:.1%} of "
            "decoder weights removed",
        )
    return out
