"""Accuracy of an MoE model, whole, exported or pruned on the fly to a plan (only its experts read from the
checkpoint), on a data file; a model larger than memory runs with its decoder layers loaded on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from premoe.core.checkpoint import ByteReader
from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
from premoe.core.evaluation import read_eval_data, read_perplexity, score
from premoe.core.memory import fits, memory_budget
from premoe.core.options import MemoryOptions, RunOptions
from premoe.moe.held import held_to_
from premoe.moe.kernels import select_kernel
from premoe.moe.loading import load_model
from premoe.moe.model import ModelInfo
from premoe.moe.plans import PrunePlan
from premoe.moe.streaming import inference_model, resident_sizes


def evaluate_moe(
    info: ModelInfo,
    data: str | Path | None,
    plan: PrunePlan | None,
    *,
    run: RunOptions = RunOptions(),
    memory: MemoryOptions = MemoryOptions(),
    limit: int | None = None,
    max_new_tokens: int | None = None,
    perplexity: str | Path | None = None,
    window: int = 1024,
) -> dict[str, Any]:
    """Greedy exact match of ``{"prompt", "completion"}`` lines and log-likelihood accuracy of
    ``{"prompt", "choices", "answer"}`` lines of ``data``, and perplexity on the file ``perplexity``
    (:func:`premoe.core.evaluation.read_perplexity`, windows of ``window`` tokens), for ``info``'s model
    pruned to ``plan`` (its re-fitted rows, ``plan.weights``, included) or whole (``None``).

    transformers loads a whole unquantised model that fits in memory; anything else is built from byte
    ranges, with its layers loaded on demand when it does not fit ``memory.max_memory`` MB (``memory.stream``
    forces either way).
    """
    gen, mc = read_eval_data(data, limit) if data is not None else ([], [])
    records = read_perplexity(perplexity) if perplexity is not None else None
    result: dict[str, Any] = {"model": str(info.path), "data": None if data is None else str(data)}
    if perplexity is not None:
        result["perplexity_file"] = str(perplexity)
    if plan is not None:
        result.update(
            task=plan.task,
            keep=plan.keep,
            scorer=plan.scorer,
            top_k=plan.top_k,
            refit=plan.refit if plan.weights is not None else None,
            pruning=f"{plan.scorer} pattern of {plan.task}, {plan.keep} experts per layer",
        )
    budget = memory_budget(memory.max_memory)
    by_transformers = (
        plan is None
        and memory.stream is None
        and memory.max_memory is None
        and not info.quant.quantized
        and fits(resident_sizes(info)["total"], budget)
    )
    with ByteReader() as reader:
        if by_transformers:
            lm = load_model(info.path, device=run.device, dtype=run.dtype)
            net, tokenizer = lm.model, lm.tokenizer
        else:
            net, lazy = inference_model(
                info,
                plan,
                reader,
                budget=budget,
                stream=memory.stream,
                device=resolve_device(run.device),
                refit=None if plan is None else plan.weights,
                hold=True,  # a quantised checkpoint's experts stay as stored, dequantised one at a time
            )
            if not lazy:
                dt = resolve_dtype(run.dtype)
                net.to(device=resolve_device(run.device), dtype=None if dt == "auto" else dt)
                held_to_(net, resolve_device(run.device), None if dt == "auto" else dt)
                select_kernel(net)
            result["streamed"] = lazy
            tokenizer = load_tokenizer(info.path)
        result.update(score(net, tokenizer, gen, mc, records, run, max_new_tokens, window))
        if reader.bytes_read:
            result["bytes_read"] = reader.bytes_read
    return result
