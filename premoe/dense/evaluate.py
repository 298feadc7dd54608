"""Accuracy of a dense model, whole or pruned to a plan (built from the checkpoint's byte ranges), on a data file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from premoe.core.checkpoint import ByteReader
from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
from premoe.core.evaluation import read_eval_data, read_perplexity, score
from premoe.core.options import RunOptions
from premoe.dense.model import DenseInfo, DensePlan, build_dense


def evaluate_dense(
    info: DenseInfo,
    data: str | Path | None,
    plan: DensePlan | None,
    *,
    run: RunOptions = RunOptions(),
    limit: int | None = None,
    max_new_tokens: int | None = None,
    perplexity: str | Path | None = None,
    window: int = 1024,
) -> dict[str, Any]:
    """Greedy exact match of ``{"prompt", "completion"}`` lines and log-likelihood accuracy of
    ``{"prompt", "choices", "answer"}`` lines of ``data``, and perplexity on the file ``perplexity``, for
    ``info``'s model pruned to ``plan`` or whole."""
    gen, mc = read_eval_data(data, limit) if data is not None else ([], [])
    records = read_perplexity(perplexity) if perplexity is not None else None
    with ByteReader() as reader:
        net = build_dense(info, plan, reader)
        dt = resolve_dtype(run.dtype)
        net.to(device=resolve_device(run.device), dtype=None if dt == "auto" else dt)
        tok = load_tokenizer(info.path)
        out: dict[str, Any] = {
            "model": str(info.path),
            "data": None if data is None else str(data),
            "bytes_read": reader.bytes_read,
        }
    if perplexity is not None:
        out["perplexity_file"] = str(perplexity)
    out.update(score(net, tok, gen, mc, records, run, max_new_tokens, window))
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
