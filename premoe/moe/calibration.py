"""Calibration: run task samples through a model and score every routed expert for that task.

The model is observed through pass-through forward hooks on its routers (they record and return
normally; nothing is raised inside ``forward``). Each hook reduces the router logits of the real
tokens of a batch (padding masked out) to per-expert sums, so memory stays constant however many
samples are streamed through.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from premoe.core.config import load_tokenizer
from premoe.core.data import CalibrationData
from premoe.core.options import MemoryOptions, RunOptions
from premoe.core.store import PatternStore, TaskPattern, check_task_name
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.loading import LoadedModel, as_loaded
from premoe.moe.model import ModelInfo, as_info
from premoe.moe.observe import Recording, marker_params, observe, observe_streamed
from premoe.moe.options import MoeCalibration
from premoe.moe.recon import unsupported as recon_unsupported
from premoe.moe.scoring import (
    OUTPUT_SCORERS,
    SCORERS,
    MarkerParams,
    score,
    weight_ratio,
)

log = logging.getLogger(__name__)


def weight_stats(info: ModelInfo, progress: bool = False) -> torch.Tensor:
    """[L, E] calibration-free statistic (:func:`~premoe.moe.scoring.weight_ratio`) of every routed expert,
    read expert by expert from the checkpoint (dequantised where quantised)."""
    from premoe.moe.selective import ByteReader, Materializer

    out = torch.zeros(len(info.moe_layers), info.num_experts)
    bar = tqdm(total=out.numel(), desc="expert weights", unit="expert", disable=not progress)
    with ByteReader() as reader:
        mat = Materializer(info, None, reader)
        for i, layer in enumerate(info.moe_layers):
            names = list(info.layout.moe[layer]["experts"])
            for e in range(info.num_experts):
                out[i, e] = weight_ratio([mat.expert_rows(n, [e]) for n in names])
                bar.update(1)
    bar.close()
    return out


DEFAULT_SCORER = "easyep"  # the default where expert outputs can be observed (README: tight keep counts)


def default_scorer(info: ModelInfo) -> str:
    """:data:`DEFAULT_SCORER` when every MoE layer has an experts module premoe can run expert by expert
    (what the expert-output statistics need), else ``tcess`` (router logits only)."""
    runnable = all(v["experts"] for v in info.layout.moe.values()) and info.spec.experts
    return DEFAULT_SCORER if runnable else "tcess"


def calibrate(
    model: str | Path | ModelInfo | LoadedModel,
    cal: CalibrationData,
    task: str,
    store: str | Path,
    *,
    run: RunOptions = RunOptions(),
    memory: MemoryOptions = MemoryOptions(),
    calibration: MoeCalibration = MoeCalibration(),
    overwrite: bool = False,
) -> TaskPattern:
    """Calibrate ``task`` on the samples of ``cal`` and add its pattern to ``store``.

    Args:
        model: model directory (or a :class:`~premoe.moe.loading.LoadedModel` to reuse).
        cal: the task's samples (``text`` or ``prompt``+``completion``), checked before any model is loaded.
        task: task name in the store.
        store: pattern-store directory (created if missing).
        run: device, dtype, batch size, tokens kept per sample, progress bars.
        memory: for a model larger than memory: stream it one decoder layer at a time (``stream``; default
            when it would not fit in ``max_memory`` MB or what the machine and this process's cgroup
            leave), hidden states past the budget in ``offload_dir``.
        calibration: ``scorer``, the task's default scorer (see :data:`premoe.moe.scoring.SCORERS`):
            ``tcess`` (PreMoe's), ``official``, ``frequency``, ``reap``, ``ean``, ``easyep``, ``recon``
            (greedy elimination by the pruned block's output error, :mod:`premoe.moe.recon`), ``weights``,
            ``random``; default :data:`DEFAULT_SCORER` (EASY-EP, which held up best at tight keep counts
            across the families measured) where the model's experts can be run one by one, else ``tcess``.
            Router statistics (``tcess``, ``official``, ``frequency``) are recorded whatever the scorer.
            ``all_stats`` computes every scorer's statistics in this one pass, so the task can later be
            pruned or evaluated with any scorer; ``k``/``r`` select the experts a token counts for (default:
            the model's top-k, no threshold; ``official``: 1); ``seed`` seeds ``random``;
            ``signature_layers``: MoE layers the stored retrieval keys span (capped at the model's).
        overwrite: replace the task if the store already has it.

    Returns:
        The stored :class:`~premoe.core.store.TaskPattern`.

    Raises:
        PremoeError: bad input (task name, scorer, k/r, store of another model...), before any model
            weights are loaded.
    """
    from dataclasses import replace

    from premoe.core.distributed import agree, local_device, world

    check_task_name(task)
    w = world()
    run = replace(run, progress=run.progress and w.main, device=local_device(run.device, w))  # progress: rank 0
    opts, n_samples = calibration, cal.samples
    batch_size, max_length, progress = run.batch_size, run.max_length, run.progress
    info: ModelInfo = as_info(model)
    scorer = opts.scorer or default_scorer(info)
    st = PatternStore(store)
    st.check_new_task(info.fingerprint, task, overwrite)
    agree(
        {
            "model": info.fingerprint.to_dict(),
            "data": cal.sha256,
            "task": task,
            "options": [repr(opts), run.batch_size, run.max_length, run.dtype, repr(memory.stream)],
        },
        w,
        "calibrate",
    )
    params = marker_params(info.router, scorer, opts.k, opts.r)
    shape = (len(info.moe_layers), info.num_experts)
    sig_layers = min(opts.signature_layers, len(info.moe_layers))
    outputs = opts.all_stats or scorer in OUTPUT_SCORERS
    why_not = recon_unsupported(info.router, info.spec.weight_on_input, bool(info.spec.experts))
    if scorer == "recon" and why_not:
        raise UnsupportedModelError(f"`scorer='recon'` cannot score {info.spec.name}: {why_not}; use `scorer='easyep'`")
    recon = (opts.all_stats or scorer == "recon") and not why_not
    run_model = opts.all_stats or SCORERS[scorer].needs_model
    offload_dir = memory.offload_dir

    lm = None
    use_stream = False
    if run_model and not isinstance(model, LoadedModel):
        from premoe.core.memory import memory_budget
        from premoe.moe.streaming import activation_bytes, plan_memory, resident_sizes

        budget = memory_budget(memory.max_memory)
        tok = load_tokenizer(info.path)
        longest = max(
            len(tok(rec.text, truncation=True, max_length=max_length)["input_ids"]) for rec in cal.records()
        )  # the real batch shape, not the cap
        use_stream = plan_memory(info, budget, batch_size, longest, True if memory.share_layers else memory.stream)
        sizes = resident_sizes(info)
        hidden_budget = max(
            int(0.8 * budget) - sizes["largest_layer"] - sizes["outside"] - activation_bytes(info, batch_size, longest),
            0,
        )
    if run_model and use_stream:
        sums, _ = observe_streamed(
            info,
            tok,
            (rec.text for rec in cal.records()),
            Recording(params, outputs, recon, shard=w),
            run=run,
            desc=f"calibrate {task} (streamed)",
            hidden_budget=hidden_budget,
            offload_dir=offload_dir,
            share_layers=memory.share_layers,
        )
        tokens, means = reduced(sums, w).tokens, sums.means()
    elif run_model:
        lm = as_loaded(model, device=run.device, dtype=run.dtype)
        tok = lm.tokenizer
        sums = observe(
            lm.model,
            lm.layers,
            lm.info,
            tok,
            (rec.text for rec in cal.records()),
            Recording(params, outputs, recon, shard=w),
            run=run,
            total=-(-n_samples // w.size),
            desc=f"calibrate {task}",
            logits_to_keep=1,
        )
        tokens, means = reduced(sums, w).tokens, sums.means()
    else:
        tok = model.tokenizer if isinstance(model, LoadedModel) else load_tokenizer(info.path)
        tokens = sum(len(tok(rec.text, truncation=True, max_length=max_length)["input_ids"]) for rec in cal.records())
        means = {}
    if tokens == 0:
        raise InputError(f"data file {cal.files[0]}: the tokenizer produced no tokens")
    if opts.all_stats or scorer == "weights":
        means["weights"] = weight_stats(info, progress)
    scores = score(scorer, means, shape, opts.seed)
    from premoe.moe.signature import SignatureModel

    signature, sig_tokens = {}, {}
    sig_model = None
    if not use_stream:
        sig_model = (
            SignatureModel(lm.model, info, tok, sig_layers)
            if lm
            else SignatureModel.from_checkpoint(info, tok, sig_layers)
        )
    for source in ("prompt", "full"):
        texts = (rec.prompt if source == "prompt" else rec.text for rec in cal.records())
        if sig_model is not None:
            sums = sig_model.stats(texts, run=run, total=-(-n_samples // w.size), desc=f"keys ({source})", shard=w)
        else:  # the first MoE layers without their experts, streamed like the model
            sums, _ = observe_streamed(
                info,
                tok,
                texts,
                Recording(MarkerParams(k=info.router.top_k), skip_special=True, shard=w),
                run=RunOptions(device="cpu", batch_size=batch_size, max_length=max_length, progress=progress),
                num_layers=info.moe_layers[sig_layers - 1] + 1,
                experts=False,
                desc=f"keys ({source}, streamed)",
                hidden_budget=hidden_budget,
                offload_dir=offload_dir,
                share_layers=memory.share_layers,
            )
        signature.update({f"{source}.{key}": v for key, v in reduced(sums, w).means().items()})
        sig_tokens[source] = sums.tokens
    pattern = TaskPattern(
        name=task,
        layers=list(info.moe_layers),
        scores=scores,
        means=means,
        info={
            "samples": n_samples,
            "tokens": tokens,
            "scorer": scorer,
            "params": {**params.to_dict(), "seed": opts.seed, "max_length": max_length},
            "data": cal.describe(),
            "signature": {"layers": sig_layers, "tokens": sig_tokens},
            "streamed": use_stream,
        },
        signature=signature,
    )
    if w.main:  # rank 0 writes; every rank holds the same reduced statistics
        st.add(pattern, info.fingerprint, overwrite=overwrite)
        log.info("calibrated %s: %d samples, %d tokens -> %s", task, n_samples, tokens, st.path)
    return pattern


def reduced(sums, w):
    """``sums`` (a :class:`RoutingSums` of this rank's batches) made the sums over every rank's, in rank order
    (:func:`premoe.core.distributed.sum_in_rank_order`); unchanged in a single process."""
    from premoe.core.distributed import sum_in_rank_order, sum_int

    if w.parallel:
        for name in sorted(sums.sums):
            sums.sums[name] = sum_in_rank_order(sums.sums[name], w, "the calibration statistics' reduction")
        sums.tokens = sum_int(sums.tokens, w, "the calibration statistics' reduction")
    return sums
