"""Accuracy of an MoE model, whole, exported or pruned on the fly to a plan (only its experts read from the
checkpoint), on a data file; a model larger than memory runs with its decoder layers loaded on demand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from premoe.core.checkpoint import ByteReader
from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
from premoe.core.evaluation import choice_accuracy, exact_match, read_eval_data
from premoe.core.memory import fits, memory_budget
from premoe.core.options import MemoryOptions, RunOptions
from premoe.moe.kernels import select_kernel
from premoe.moe.loading import load_model
from premoe.moe.model import ModelInfo
from premoe.moe.plans import PrunePlan
from premoe.moe.streaming import inference_model, resident_sizes


def evaluate_moe(
    info: ModelInfo,
    data: str | Path,
    plan: PrunePlan | None,
    *,
    run: RunOptions = RunOptions(),
    memory: MemoryOptions = MemoryOptions(),
    limit: int | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Greedy exact match of ``{"prompt", "completion"}`` lines and log-likelihood accuracy of
    ``{"prompt", "choices", "answer"}`` lines of ``data``, for ``info``'s model pruned to ``plan`` (its
    re-fitted rows, ``plan.weights``, included) or whole (``None``).

    transformers loads a whole unquantised model that fits in memory; anything else is built from byte
    ranges, with its layers loaded on demand when it does not fit ``memory.max_memory`` MB (``memory.stream``
    forces either way).
    """
    gen, mc = read_eval_data(data, limit)
    result: dict[str, Any] = {"model": str(info.path), "data": str(data)}
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
            )
            if not lazy:
                dt = resolve_dtype(run.dtype)
                net.to(device=resolve_device(run.device), dtype=None if dt == "auto" else dt)
                select_kernel(net)
            result["streamed"] = lazy
            tokenizer = load_tokenizer(info.path)
        result["exact_match"] = (
            exact_match(
                net, tokenizer, gen, batch_size=run.batch_size, max_new_tokens=max_new_tokens, progress=run.progress
            )
            if gen
            else None
        )
        result["generate_samples"] = len(gen)
        result["mc_accuracy"] = choice_accuracy(net, tokenizer, mc, progress=run.progress) if mc else None
        result["mc_samples"] = len(mc)
        if reader.bytes_read:
            result["bytes_read"] = reader.bytes_read
    return result
