"""Re-fitting a whole checkpoint (``premoe prune``/``eval`` default, ``premoe refit``): the dense model's
calibration tokens recorded in one pass (whole, or one decoder layer at a time), each MoE layer solved
by :mod:`premoe.moe.refit` and its new weights spilled to disk (:class:`premoe.moe.refit_weights.RefitWeights`),
the policy of when to re-fit, and re-fits stored with task patterns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from premoe.core.distributed import SINGLE, World
from premoe.core.options import RefitOptions, RunOptions
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.arch import MoeLayer
from premoe.moe.refit import (
    ROUTER_TOKENS,
    RefitSolver,
    _joined,
    _record,
    capture,
    check_supported,
    dense_output,
    pruned_routing,
    refit_layer,
    router_delta,
)
from premoe.moe.refit_weights import RefitWeights

REQUANT = "gptq"  # how re-fitted experts are rounded where the format has a grid: "gptq", or "rtn" (to nearest)


def round_on_grid(fmt, m: MoeLayer, h: torch.Tensor, z: torch.Tensor, kept: list[int], routing, new: dict) -> dict:
    """The re-fitted down projections ``new`` ({expert: [D, I] float32}) rounded by GPTQ onto the checkpoint
    format's grid (:meth:`QuantFormat.rounding_grid`), each with the Gram matrix of its routing-weighted
    activations under the pruned router (the re-fit's own system matrix), so that the rounding moves the
    layer's output on the calibration tokens least; formats without a grid are left to round to nearest."""
    from premoe.core.quant.gptq import gptq_on_grid
    from premoe.moe.quantize import ExpertGrams

    grid = fmt.rounding_grid()
    if grid is None:
        return new
    grams = ExpertGrams(m, h, z, kept, routing)
    out = {}
    for e, w in new.items():
        gram = grams(e, True, w.shape[1])
        out[e] = gptq_on_grid(w.float(), gram.to(w.device), grid, grid.group)[0]
    return out


def down_quant(info, layer: int, dtype: torch.dtype) -> tuple | None:
    """``RefitWeights.put``'s ``quant`` for ``layer``: the checkpoint's format when it stores the layer's down
    projections quantised, else ``None``."""
    name = down_targets(info).get(layer)
    if not info.quant.quantized or name is None or not info.layout.sources[name].scales:
        return None
    return info.quant, bool(info.spec.packed_transposed), dtype


def plan_key(plan) -> str:
    """Digest of what a re-fit depends on in ``plan``: each layer's kept experts and the pruned routing."""
    import hashlib

    what = {
        "kept": {str(k): sorted(v) for k, v in sorted(plan.kept.items())},
        "top_k": plan.top_k,
        "n_group": plan.n_group,
        "topk_group": plan.topk_group,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def pick_texts(tok, sources: Sequence[Sequence[str]], tokens: int, max_length: int) -> list[str]:
    """Texts in order from each source until it has given an equal share of ``tokens``."""
    share = -(-tokens // max(len(sources), 1))
    out = []
    for texts in sources:
        got = 0
        for text in texts:
            if got >= share:
                break
            out.append(text)
            got += len(tok(text, truncation=True, max_length=max_length)["input_ids"])
    return out


def down_targets(info) -> dict[int, str]:
    """Per MoE layer, the in-memory name of its experts' fused ``down_proj``, where the checkpoint holds it
    as per-expert keys or as a fused tensor in the in-memory layout (what ``--refit`` can rewrite).

    Raises:
        UnsupportedModelError: a layer's down projections are stored any other way.
    """
    out = {}
    for layer, names in info.layout.moe.items():
        target = next((n for n in names["experts"] if n.endswith(".down_proj")), None)
        src = info.layout.sources.get(target) if target else None
        if src is None or src.kind not in ("split", "fused") or src.converter is not None:
            raise UnsupportedModelError(
                f"`refit` rewrites the experts' down projections, but {info.spec.name} stores "
                f"layer {layer}'s in a layout premoe does not rewrite; use `refit=False`"
            )
        out[layer] = target
    return out


def router_target(info, layer: int) -> str | None:
    """In-memory name of ``layer``'s router weight where the checkpoint stores it as one plain key with the
    experts on dim 0 (what the router re-fit rewrites), else ``None``."""
    for name, dim in info.layout.moe[layer]["router"].items():
        src = info.layout.sources.get(name)
        if (
            dim == 0
            and name.endswith(".weight")
            and src is not None
            and src.kind == "router"
            and src.key
            and src.converter is None
            and not src.scales
        ):
            return name
    return None


def check_refit_model(info) -> None:
    """Raise unless ``premoe prune --refit`` can write ``info``'s re-fitted experts (one line, naming --no-refit)."""
    if not info.quant.requantizes:
        raise UnsupportedModelError(
            f"`refit` writes the re-fitted experts back in the checkpoint's format, and {info.quant.label} "
            "cannot be written yet; use `refit=False`"
        )
    if info.spec.weight_on_input or info.router.slots or not info.spec.experts:
        raise UnsupportedModelError(
            f"`refit` re-fits experts routed by output weight in transformers' fused experts "
            f"interface; {info.spec.name}'s experts are laid out otherwise; use `refit=False`"
        )


def refit_model(
    info, plan, tok, sources: Sequence[Sequence[str]], *, directory: str | Path | None = None, **kwargs
) -> RefitWeights:
    """Re-fit the kept experts of every MoE layer of ``plan``: :func:`refit_models` for one plan."""
    return refit_models(info, [plan], tok, sources, directories=[directory], **kwargs)[0]


def refit_models(
    info,
    plans: Sequence,
    tok,
    sources: Sequence[Sequence[str]],
    *,
    about: str = "",
    directories: Sequence[str | Path | None] | None = None,
    solver: RefitSolver = RefitSolver(),
    run: RunOptions = RunOptions(device="cpu"),
    reader=None,
    stream: bool | None = None,
    shard: World = SINGLE,
) -> list[RefitWeights]:
    """Re-fit the kept experts of every MoE layer of each of ``plans`` on up to ``solver.tokens`` calibration
    tokens per layer from ``sources`` (texts, equal shares), in one pass over the model (``run``: batches,
    tokens per text, device of a streamed run, progress): the dense model's MoE-block inputs and router
    logits are recorded in float32 and each layer is re-fitted for every plan
    (:func:`refit_layer`), then, with ``solver.router``, the kept experts' router rows with the re-fitted
    experts (:func:`router_delta`, where the checkpoint stores the router weight as one plain key); the
    new weights are spilled to disk (``directories``: one per plan, default temporary ones).

    A model that fits in memory is built whole (``stream``: force either way); a larger one runs one
    decoder layer at a time, each built from the checkpoint and re-fitted before it is freed. Memory
    then: one decoder layer, one layer's recorded tokens and the hidden states (spilled to disk past
    the machine's memory budget).

    ``shard`` (a data-parallel rank under torchrun, :mod:`premoe.core.distributed`): each rank runs its share
    of the texts (in memory: text ``i`` on rank ``i mod N``; streamed: batch ``b`` on rank ``b mod N``) and
    records their tokens; rank 0 gathers each layer's tokens in the order one process records them, solves
    and writes. The other ranks' re-fits stay empty.
    """
    from premoe.core.memory import fits, memory_budget
    from premoe.moe.streaming import resident_sizes

    check_refit_model(info)
    tokens, lam, sweeps, router = solver.tokens, solver.lam, solver.sweeps, solver.router
    texts = pick_texts(tok, sources, tokens, run.max_length)
    if not texts:
        raise InputError("the refit data has no texts; pass `refit_data` or use `refit=False`")
    outs = [
        RefitWeights({"data": about, "tokens": 0, "ridge": lam, "sweeps": sweeps}, d)
        for d in (directories or [None] * len(plans))
    ]
    routings = [pruned_routing(info.router, plan) for plan in plans]
    from premoe.moe.selective import Materializer

    stored = Materializer(info, None, None).dtype_of  # the model is fitted in float32, rows are kept as stored
    downs = down_targets(info)

    def solve(m: MoeLayer, h: torch.Tensor, z: torch.Tensor, y: torch.Tensor | None) -> None:
        check_supported(m.experts, info.router, info.spec.weight_on_input, info.spec.name)
        dt = stored(downs[m.index])
        quant = down_quant(info, m.index, dt)
        cast = torch.float32 if quant else dt  # quantised: encoded from the float32 solution
        name = router_target(info, m.index) if router else None
        path = name.removeprefix(info.layout.moe[m.index]["prefix"] + ".") if name else None
        if y is None and solver.down:
            y = dense_output(m, h.to(m.experts.down_proj.device, torch.float32), z, info.router).float()
        for plan, routing, out in zip(plans, routings, outs):
            out.about["tokens"] = len(h)
            kept = sorted(plan.kept[m.index])
            new = refit_layer(m, h, z, kept, info.router, lam, sweeps, routing, target=y) if solver.down else {}
            if new and quant and REQUANT == "gptq":
                new = round_on_grid(info.quant, m, h, z, kept, routing, new)
            if solver.quantize is not None:
                from premoe.moe.quantize import quantize_layer

                parts = quantize_layer(info, m, h, z, kept, routing, new, downs[m.index], solver.quantize)
                out.put_quantized(m.index, parts)
            rows = {}
            if new and path is not None and path in m.router_tensors:
                w = m.tensor(path)
                delta = router_delta(m.experts, kept, h, z, routing, m.selection_bias(), y, new, lam)
                rows[name] = (w[kept].float() + delta.to(w.device)).to(stored(name))
                out.about["router_tokens"] = min(len(h), ROUTER_TOKENS)
            out.put(m.index, {e: (w.T if m.experts.is_transposed else w).to(cast) for e, w in new.items()}, rows, quant)

    budget = memory_budget(None)
    run = dataclasses.replace(run, progress=run.progress and shard.main)
    try:
        if stream is False or (stream is None and fits(resident_sizes(info)["total"], budget)):
            _refit_in_memory(info, tok, texts, tokens, run.max_length, solve, reader, run.progress, shard)
        else:
            _refit_streamed(info, tok, texts, tokens, solve, run, reader, budget, shard)
    except BaseException:
        for out in outs:
            out.close()
        raise
    return outs


def _refit_in_memory(info, tok, texts, tokens, max_length, solve, reader, progress, shard: World = SINGLE) -> None:
    from tqdm.auto import tqdm

    from premoe.core.checkpoint import ByteReader
    from premoe.moe.arch import find_moe_layers
    from premoe.moe.selective import build_model

    with contextlib.nullcontext(reader) if reader is not None else ByteReader() as r:
        model = build_model(info, None, r, dtype=torch.float32).float()  # targets not rounded to the storage dtype
    layers = find_moe_layers(model, info.spec)
    if shard.parallel:
        check_share(len(texts), shard, "texts")
        mine = [texts[i] for i in shard.share(range(len(texts)))]
        got = capture(model, layers, info.router, tok, mine, 1 << 62, max_length, joined=False)  # one block a text
        captured = gathered(got, tokens, shard)
        if captured is None:
            return  # rank 0 solves
    else:
        captured = capture(model, layers, info.router, tok, texts, tokens, max_length)
    for m, (h, z, y) in tqdm(list(zip(layers, captured)), desc="refit", unit="layer", disable=not progress):
        solve(m, h, z, y)


def check_share(items: int, shard: World, what: str) -> None:
    """Raise unless every data-parallel rank gets at least one of ``items``."""
    if items < shard.size:
        raise InputError(
            f"{shard.size} data-parallel ranks but the re-fit has {items} {what}: run fewer ranks (or, streamed, "
            "smaller batches)"
        )


def gathered(got, tokens: int, shard: World) -> list | None:
    """Rank 0: each layer's (h, z, y), its blocks gathered from every rank and put back in the order one process
    records them (:meth:`World.merged`), up to ``tokens`` tokens; ``None`` on the other ranks. ``got``: this
    rank's per-layer (h blocks, z blocks, y blocks), one block per text or batch of its share."""
    from premoe.core.distributed import gather_blocks

    out = []
    for h, z, y in got:
        widths = [max((b.shape[1] for b in blocks), default=0) for blocks in (h, z, y)]
        widths = [int(x) for x in gather_int_max(widths, shard)]
        per = [
            gather_blocks(blocks, wd, torch.float32, shard, "the re-fit's token gather") if wd else None
            for blocks, wd in zip((h, z, y), widths)
        ]
        if shard.main:
            out.append(_joined(tuple(shard.merged(p) if p is not None else [] for p in per), tokens))
    return out if shard.main else None


def gather_int_max(values: list[int], shard: World) -> list[int]:
    """The element-wise maximum of ``values`` over the ranks (block widths a rank without blocks does not know)."""
    from premoe.core.distributed import gather

    parts = gather(torch.tensor(values, dtype=torch.int64), shard, "the re-fit's token gather")
    return torch.stack(parts).amax(0).tolist()


def _refit_streamed(info, tok, texts, tokens, solve, run: RunOptions, reader, budget, shard: World = SINGLE) -> None:
    from premoe.core.config import resolve_device
    from premoe.core.data import token_batches
    from premoe.core.streaming import activation_bytes, hidden_room
    from premoe.moe.streaming import LayerStream, make_batches, resident_sizes

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    every = list(token_batches(tok, texts, run.batch_size, run.max_length, False))
    if shard.parallel:
        check_share(len(every), shard, "batches")
    batches = make_batches(shard.share(every), pad)
    stream = LayerStream(
        info,
        reader=reader,
        device=resolve_device(run.device),
        num_layers=max(info.moe_layers) + 1,
        dtype=torch.float32,
        compute_dtype=torch.float32,
    )  # targets not rounded to the storage dtype
    moe = {m.index: m for m in stream.moe}
    got = {m.index: ([], [], []) for m in stream.moe}
    mask: dict[str, torch.Tensor] = {}
    hooks = [hk for m in stream.moe for hk in _record(m, info.router, got[m.index], mask, tokens)]

    def before(b: int) -> None:
        mask["m"] = batches[b].counted

    def done(i: int, layer) -> None:
        if i not in moe:
            return
        if not shard.parallel:
            solve(moe[i], *_joined(got.pop(i), tokens))
            return
        found = gathered([got.pop(i)], tokens, shard)
        if found is not None:
            solve(moe[i], *found[0])

    act = activation_bytes(info, run.batch_size, min(run.max_length, 2048))
    room = hidden_room(resident_sizes(info), act, budget)
    try:
        stream.run(batches, room, before, progress=run.progress, desc="refit (streamed)", done=done)
    finally:
        for hk in hooks:
            hk.remove()


def refit_for(
    info,
    store,
    plan,
    task: str | None,
    agnostic: bool,
    options: RefitOptions = RefitOptions(),
    progress: bool = True,
    quantize=None,
    shard: World = SINGLE,
) -> RefitWeights | None:
    """The re-fit ``premoe prune`` and ``premoe eval`` apply to ``plan``: recorded in ``plan.refit`` and held in
    ``plan.weights`` (also returned).

    ``options.refit``: ``False`` never; ``True`` always (a one-line error when it cannot); ``None`` (the
    default) when it can: the data (``options.refit_data``, else the calibration data the store recorded for
    the task, or for every task with ``agnostic``) is still there unchanged and the checkpoint's experts can
    be rewritten, else a warning and the plain slice. A plan that keeps every expert needs nothing.

    ``quantize`` (a :class:`premoe.moe.quantize.ExpertQuant` rounding by GPTQ) needs the pass whatever
    ``options.refit`` says (its Gram matrices come from the same tokens; a stored re-fit is recomputed), and
    fails in one line where the data is gone. ``shard``: this process's data-parallel rank (rank 0 holds the
    re-fit; see :func:`refit_models`).
    """
    import logging

    from premoe.core.config import load_tokenizer
    from premoe.core.data import refit_sources
    from premoe.core.store import PatternStore
    from premoe.errors import PremoeError

    gptq = quantize is not None and quantize.gptq
    down = options.refit is not False and any(len(v) < info.num_experts for v in plan.kept.values())
    if not down and not gptq:
        return None  # not asked, or every expert kept: nothing to correct
    st = store if isinstance(store, PatternStore) else PatternStore.open(store)
    if not options.refit_data and not agnostic and not gptq:
        stored = stored_refit(st, task, plan)
        if stored is not None:
            plan.refit, plan.weights = dict(stored.about), stored
            return stored
    try:
        check_refit_model(info)
        down_targets(info)
        sources, about = refit_sources(st.tasks, sorted(st.tasks) if agnostic else [task], options.refit_data)
        solver = RefitSolver(router=down, down=down, quantize=quantize if gptq else None)
        weights = refit_model(
            info,
            plan,
            load_tokenizer(info.path),
            sources,
            about=about,
            solver=solver,
            run=RunOptions(device="cpu", progress=progress),
            shard=shard,
        )
    except PremoeError as e:
        if gptq:
            raise type(e)(f"{e}, or `quantize_rounding='rtn'` (GPTQ rounds with those tokens)") from None
        if options.refit:
            raise
        logging.getLogger(__name__).warning("not re-fitting the kept experts: %s", e)
        plan.refit = {"skipped": str(e)}
        return None
    if down:
        plan.refit = dict(weights.about)
    plan.weights = weights
    return weights


def stored_refit(store, task: str, plan) -> RefitWeights | None:
    """``task``'s re-fit for ``plan``'s kept set that ``premoe refit`` stored with the pattern, if any."""
    found = store.refit_dir(task, plan_key(plan))
    if found is None:
        return None
    directory, entry = found
    return RefitWeights.open(directory, {**entry.get("about", {}), "stored": entry["dir"]})


def task_refit(store, task: str, plan, want: bool | None, model) -> RefitWeights | None:
    """What a task server serves ``task`` with: its stored re-fit for ``plan`` (``want`` ``None``: if the store
    has one; ``True``: it must; ``False``: never, the checkpoint's rows).

    Raises:
        InputError: ``want`` is ``True`` and the store has no re-fit of ``task`` for this keep count.
    """
    found = None if want is False else stored_refit(store, task, plan)
    if found is None and want:
        raise InputError(
            f"task {task!r} has no re-fitted rows for `keep` {plan.keep} in store {store.path}; "
            f"run `premoe refit --model {model} --store {store.path} --keep {plan.keep}` or pass `refit=False`"
        )
    return found


def store_refits(
    info,
    store,
    task: str,
    plans: Sequence,
    refit_data: Sequence | None = None,
    progress: bool = True,
    shard: World = SINGLE,
    **kwargs,
) -> list[dict[str, Any]]:
    """Re-fit ``task``'s kept experts for each of ``plans`` (one pass over the model) on ``refit_data``
    or the task's recorded calibration data, and store the rows with the pattern (``premoe refit``);
    returns each plan's manifest entry. Plans that keep every expert are skipped.

    Raises:
        UnsupportedModelError / InputError: as ``premoe prune --refit`` (other
            expert layout, calibration data gone or changed).
    """
    import shutil

    from premoe.core.config import load_tokenizer
    from premoe.core.data import refit_sources

    plans = [p for p in plans if any(len(v) < info.num_experts for v in p.kept.values())]
    if not plans:
        return []
    check_refit_model(info)
    down_targets(info)
    sources, about = refit_sources(store.tasks, [task], refit_data)
    dirs = [store.refit_workdir() for _ in plans]
    try:
        outs = refit_models(
            info,
            plans,
            load_tokenizer(info.path),
            sources,
            about=about,
            directories=dirs,
            run=RunOptions(device="cpu", progress=progress),
            shard=shard,
            **kwargs,
        )
        if not shard.main:
            return []  # rank 0 stores and reports
        entries = []
        for plan, out, d in zip(plans, outs, dirs):
            key = plan_key(plan)
            meta = {
                "keep": plan.keep,
                "top_k": plan.top_k,
                "group_policy": plan.group_policy,
                "scorer": plan.scorer,
                "experts": sum(len(v) for v in out.experts.values()),
                "about": out.about,
            }
            store.add_refit(task, key, meta, d)
            entries.append({**meta, "key": key})
        return entries
    finally:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def check_refit(info, keeps: Sequence[int], selection=None) -> None:
    """Raise unless ``premoe refit`` can store re-fitted rows of ``info`` for each of ``keeps`` (``selection``
    with its keep replaced by each): checked before any calibration or pass over the model."""
    from dataclasses import replace

    from premoe.moe.options import MoeSelection

    for k in keeps:
        replace(selection or MoeSelection(), keep=k).resolve(info.router)
    check_refit_model(info)
    down_targets(info)


def refit_tasks(
    info,
    store,
    keeps: Sequence[int],
    *,
    tasks: Sequence[str] | None = None,
    selection=None,
    refit_data: Sequence = (),
    progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """``premoe refit``: for each of ``tasks`` (default: every task in the store) and keep count, the down
    projections and router rows of the experts ``selection`` keeps (its keep replaced by each of ``keeps``),
    re-fitted under re-routing on the task's calibration data (or ``refit_data``) in one pass over the model
    per task, and stored with the pattern. Returns {task: one manifest entry per keep count}.

    Raises:
        PremoeError: impossible keep, unknown task, quantised checkpoint or unsupported expert layout,
            calibration data gone or changed.
    """
    from dataclasses import replace

    from premoe.core.distributed import agree, world
    from premoe.core.store import PatternStore
    from premoe.moe.options import MoeSelection
    from premoe.moe.patterns import plan_from_pattern

    selection = selection or MoeSelection()
    check_refit(info, keeps, selection)
    st = store if isinstance(store, PatternStore) else PatternStore.open(store)
    st.check_model(info.fingerprint)
    names = list(tasks) if tasks else sorted(st.tasks)
    w = world()
    patterns = {n: st.tasks[n].get("sha256") for n in names if n in st.tasks}
    what = {"tasks": names, "keeps": list(keeps), "selection": repr(selection), "data": [str(d) for d in refit_data]}
    agree({"model": info.fingerprint.to_dict(), "patterns": patterns, **what}, w, "refit")
    if not names:
        raise InputError(f"store {st.path} has no tasks; calibrate one first")
    if refit_data and (not tasks or len(names) > 1):
        raise InputError("`refit_data` is the data of one task's rows; name that one task in `tasks`")
    out = {}
    for name in names:
        pattern = st.load(name)
        plans = [plan_from_pattern(info, pattern, replace(selection, keep=k)) for k in keeps]
        out[name] = store_refits(info, st, name, plans, list(refit_data) or None, progress=progress, shard=w)
    return out
