"""Calibration of dense models: streaming activation statistics of every layer's ``o_proj`` and
``down_proj`` inputs (the quantities SEAP, Wanda-sp and FLAP score), the weight column norms, and
the retrieval keys (mean hidden states of the task's prompts at every depth).

Statistics are kept as float64 sums over the real tokens of each batch (padding masked out), so
memory is flat in the number of samples and batching does not change the result.

A model larger than memory is calibrated layer by layer (:func:`observe_dense_streamed`): every
batch, the prompts' included, goes through one decoder layer built from the checkpoint before the
next is read, and the same statistics come out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from premoe.core.checkpoint import ByteReader
from premoe.core.config import config_from_dict, resolve_device, skeleton
from premoe.core.data import CalibrationData
from premoe.core.distributed import SINGLE, World, sum_in_rank_order, sum_int
from premoe.core.modules import set_tensor
from premoe.core.options import MemoryOptions, RunOptions
from premoe.core.store import PatternStore, TaskPattern, check_task_name
from premoe.dense.model import DenseInfo, inspect_dense, reader_getter
from premoe.errors import CheckpointError, InputError

log = logging.getLogger(__name__)
SITES = ("o", "down")  # the inputs of these projections are observed


class ActivationStats:
    """Per-channel float64 sums (count, sum, sum of squares) of the inputs of every layer's
    ``o_proj`` and ``down_proj``, fed by forward pre-hooks; :attr:`mask` is the [B*S] token mask."""

    def __init__(self, model: torch.nn.Module, info: DenseInfo):
        self.info = info
        self.mask: torch.Tensor | None = None
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        self._hooks = []
        layers = model.get_submodule(info.decoder_prefix)
        for l, layer in enumerate(layers):
            for site, mod in (
                ("o", getattr(getattr(layer, info.spec.attn), info.spec.o)),
                ("down", getattr(getattr(layer, info.spec.mlp), info.spec.down)),
            ):
                self._hooks.append(mod.register_forward_pre_hook(self._hook(l, site)))
                width = mod.weight.shape[1]  # known on the meta device too: every rank has every sum, batches or not
                for key, w in ((f"{site}.sum", width), (f"{site}.sq", width)) + (
                    (("o.head_sq", info.heads),) if site == "o" else ()
                ):
                    self.sums.setdefault(key, torch.zeros(info.num_layers, w, dtype=torch.float64))

    def _hook(self, layer: int, site: str):
        def hook(mod, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if self.mask is not None:
                x = x[self.mask.to(x.device)]
            if site == "o":
                self._add(layer, "o.head_sq", head_energy(x, mod.weight.detach(), self.info.heads))
            x = x.double()
            for stat, v in (("sum", x.sum(0)), ("sq", (x * x).sum(0))):
                self._add(layer, f"{site}.{stat}", v)

        return hook

    def _add(self, layer: int, key: str, v: torch.Tensor) -> None:
        self.sums[key][layer] += v.cpu().double()

    def reduce(self, w: World) -> None:
        """Make the sums (and the token count) every data-parallel rank's, added in rank order."""
        if w.parallel:
            for key in sorted(self.sums):
                self.sums[key] = sum_in_rank_order(self.sums[key], w, "the activation statistics' reduction")
            self.n = sum_int(self.n, w, "the activation statistics' reduction")

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def means(self) -> dict[str, torch.Tensor]:
        """{"o.mean", "o.sq" (E[x^2]), "o.var", "down.mean", ...}: [L, C] float32."""
        out = {}
        for site in SITES:
            mean = self.sums[f"{site}.sum"] / self.n
            sq = self.sums[f"{site}.sq"] / self.n
            out[f"{site}.mean"] = mean.float()
            out[f"{site}.sq"] = sq.float()
            out[f"{site}.var"] = (sq - mean * mean).clamp_min(0).float()
        out["o.head_sq"] = (self.sums["o.head_sq"] / self.n).float()
        return out


def head_energy(x: torch.Tensor, weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[H] summed squared norm of each attention head's contribution to the residual stream,
    sum over tokens of ||W_h x_h||^2, for ``x`` [N, H*d] the input of ``o_proj`` (weight [D, H*d]).
    Exact per head (the channels of one head are correlated; summing their separate E[x^2] ||w||^2
    misses that), computed as x_h^T (W_h^T W_h) x_h in float32, row blocks of the weight at a time."""
    n, width = x.shape
    d = width // heads
    xh = x.float().reshape(n, heads, d)
    gram = torch.zeros(heads, d, d, dtype=torch.float32, device=x.device)
    for r in range(0, weight.shape[0], 1024):
        w = weight[r : r + 1024].float().reshape(-1, heads, d)
        gram += torch.einsum("rhd,rhe->hde", w, w)
    return (torch.einsum("nhd,hde->nhe", xh, gram) * xh).sum((0, 2)).double()


def layer_norms(layer: torch.nn.Module, info: DenseInfo) -> dict[str, torch.Tensor]:
    """Column statistics of one decoder layer's ``o_proj``/``down_proj``: squared L2 norm (SEAP, FLAP)
    and mean absolute value (Wanda-sp), [C] float32."""
    out = {}
    for site, mod in (
        ("o", getattr(getattr(layer, info.spec.attn), info.spec.o)),
        ("down", getattr(getattr(layer, info.spec.mlp), info.spec.down)),
    ):
        w = mod.weight.detach()  # [D, C]
        sq = torch.zeros(w.shape[1], dtype=torch.float32, device=w.device)
        ab = torch.zeros_like(sq)
        for r in range(0, w.shape[0], 256):  # float32 copies of a block of rows, not of the whole weight
            x = w[r : r + 256].float()
            sq += (x * x).sum(0)
            ab += x.abs().sum(0)
        out[f"w.{site}.l2sq"] = sq.cpu()
        out[f"w.{site}.l1mean"] = (ab / w.shape[0]).cpu()
    return out


def weight_norms(model: torch.nn.Module, info: DenseInfo) -> dict[str, torch.Tensor]:
    """:func:`layer_norms` of every decoder layer, [L, C] float32."""
    per = [layer_norms(layer, info) for layer in model.get_submodule(info.decoder_prefix)]
    return {k: torch.stack([p[k] for p in per]) for k in per[0]}


def _batches(tok, texts: Iterable[str], batch_size: int, max_length: int, skip_special: bool):
    from premoe.core.data import token_batches

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for rows in token_batches(tok, texts, batch_size, max_length, skip_special):
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
        attn = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        count = torch.tensor([r[1] + [0] * (width - len(r[1])) for r in rows], dtype=torch.bool)
        yield ids, attn, count


@torch.inference_mode()
def observe_dense(
    model,
    info: DenseInfo,
    tok,
    texts: Iterable[str],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    total: int | None = None,
    progress: bool = True,
    desc: str = "calibrate",
    shard: World = SINGLE,
) -> tuple[dict[str, torch.Tensor], int]:
    """Activation statistics over ``texts`` (every real token counts once): (means, tokens). Under torchrun
    (``shard``) each rank runs its share of the batches and the sums are added in rank order."""
    dev = next(model.parameters()).device
    stats = ActivationStats(model, info)
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress)
    try:
        for ids, attn, _count in shard.share(_batches(tok, texts, batch_size, max_length, skip_special=False)):
            stats.mask = attn.reshape(-1).bool()
            stats.n += int(stats.mask.sum())
            model.model(input_ids=ids.to(dev), attention_mask=attn.to(dev)) if hasattr(model, "model") else model(
                input_ids=ids.to(dev), attention_mask=attn.to(dev)
            )
            bar.update(ids.shape[0])
    finally:
        stats.close()
        bar.close()
    stats.reduce(shard)
    if stats.n == 0:
        raise InputError("the tokenizer produced no tokens from the calibration data")
    return stats.means(), stats.n


@torch.inference_mode()
def prompt_features(
    model,
    info: DenseInfo,
    tok,
    texts: Iterable[str],
    *,
    layers: int | None = None,
    batch_size: int = 32,
    max_length: int = 2048,
    shard: World = SINGLE,
) -> torch.Tensor:
    """[N, K+1, D] per-prompt mean hidden states (special tokens left out) after the embeddings
    (index 0) and after each of the first K decoder layers (all of them by default), L2-normalised.
    Every depth is the residual stream before any final norm, so a model cut to K layers (the router)
    gives the same feature as the whole model at depth K. ``shard``: this rank's prompt batches only."""
    dev = next(model.parameters()).device
    feats = []
    config = model.model.config
    tied = config.__dict__.get("tie_last_hidden_states", None)
    config.tie_last_hidden_states = False  # the residual stream at every depth, the last one too (no final norm)
    try:
        for ids, attn, m in shard.share(prompt_batches(tok, texts, batch_size, max_length)):
            out = model.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), output_hidden_states=True)
            hs = out.hidden_states if layers is None else out.hidden_states[: layers + 1]
            per = torch.stack([token_mean(h, m) for h in hs], dim=1)  # [B, K+1, D]
            feats.append(torch.nn.functional.normalize(per, dim=-1).cpu())
    finally:
        config.tie_last_hidden_states = tied
    return torch.cat(feats) if feats else torch.zeros(0, 0, info.hidden)


def centroid(feats: torch.Tensor, shape: tuple[int, int], w: World = SINGLE) -> tuple[torch.Tensor, int]:
    """The mean of every rank's prompt features ``feats`` [N_rank, K+1, D] (``shape`` = (K+1, D); float64 sums
    added in rank order), and how many prompts that is: a task's retrieval key."""
    count = sum_int(len(feats), w, "the retrieval keys' reduction")
    total = feats.double().sum(0) if len(feats) else torch.zeros(shape, dtype=torch.float64)
    total = sum_in_rank_order(total, w, "the retrieval keys' reduction")
    if not count:
        return torch.zeros(0, 0), 0
    return (total / count).float(), count


def prompt_batches(tok, texts: Iterable[str], batch_size: int, max_length: int):
    """Batches of prompts in input order: (ids [B, S], attention mask [B, S], weights [B, S, 1] of the
    tokens a prompt's feature averages: its non-special tokens, or all of them if it has no other)."""
    texts = list(texts)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i : i + batch_size], truncation=True, max_length=max_length, return_special_tokens_mask=True)
        width = max(max(len(x) for x in enc["input_ids"]), 1)
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in enc["input_ids"]])
        attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in enc["input_ids"]])
        count = torch.tensor([[1 - s for s in sp] + [0] * (width - len(sp)) for sp in enc["special_tokens_mask"]])
        m = (count * attn).float()[..., None]
        yield ids, attn, torch.where(m.sum(1, keepdim=True) > 0, m, attn.float()[..., None])


def token_mean(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[B, D] mean of hidden states ``h`` [B, S, D] over the tokens weighted by ``m`` [B, S, 1]."""
    m = m.to(h.device)
    return (h.float() * m).sum(1) / m.sum(1).clamp_min(1)


# -- a model larger than memory: one decoder layer at a time ----------------------------------------


class DenseFiller:
    """Reads the meta tensors of a dense skeleton's modules from the checkpoint (whole tensors, as byte
    ranges), converted to ``dtype`` when given: what :class:`~premoe.core.streaming.LayerRunner` builds
    each layer with."""

    def __init__(self, info: DenseInfo, reader: ByteReader, dtype: torch.dtype | None = None):
        self.info, self.dtype = info, dtype
        self.get = reader_getter(info, reader)

    def fill(self, model: torch.nn.Module, prefixes: Iterable[str] | None = None, skip: set[int] = frozenset()) -> int:
        wanted = None if prefixes is None else tuple(prefixes)
        held = 0
        for mod_name, mod in model.named_modules():
            if id(mod) in skip or (
                wanted is not None and not any(mod_name == p or mod_name.startswith(p + ".") for p in wanted)
            ):
                continue
            for leaf, t in [
                *mod._parameters.items(),
                *((n, b) for n, b in mod._buffers.items() if n not in mod._non_persistent_buffers_set),
            ]:
                if t is None or not t.is_meta:
                    continue
                name = f"{mod_name}.{leaf}" if mod_name else leaf
                if name in self.info.checkpoint.tensors:
                    value = self.get(name, None, None)
                elif leaf == "bias":
                    value = torch.zeros(t.shape, dtype=t.dtype)
                else:
                    raise CheckpointError(f"the checkpoint has no tensor for {name!r}")
                if tuple(value.shape) != tuple(t.shape):
                    raise CheckpointError(
                        f"{name}: checkpoint shape {list(value.shape)} but the model expects {list(t.shape)}"
                    )
                if self.dtype is not None and value.is_floating_point():
                    value = value.to(self.dtype)
                set_tensor(mod, leaf, value)
                held += value.nbytes
        return held


def dense_sizes(info: DenseInfo, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes each part of the model takes in memory (in ``dtype`` when given, else as stored): ``total``,
    ``largest_layer`` (a decoder layer, or the embeddings / LM head if larger) and ``outside`` (all but the
    decoder layers)."""
    from premoe.core.checkpoint import TORCH_DTYPES

    prefix = f"{info.decoder_prefix}."
    per_layer: dict[int, int] = {}
    outside: dict[str, int] = {}
    for name, t in info.checkpoint.tensors.items():
        nbytes = t.nbytes
        stored = TORCH_DTYPES.get(t.dtype)
        if dtype is not None and stored is not None and stored.is_floating_point:
            nbytes = nbytes // stored.itemsize * dtype.itemsize
        if name.startswith(prefix):
            layer = int(name[len(prefix) :].split(".", 1)[0])
            per_layer[layer] = per_layer.get(layer, 0) + nbytes
        else:
            module = name.rpartition(".")[0]
            outside[module] = outside.get(module, 0) + nbytes
    return {
        "total": sum(per_layer.values()) + sum(outside.values()),
        "largest_layer": max([*per_layer.values(), *outside.values(), 0]),
        "outside": sum(outside.values()),
    }


@torch.inference_mode()
def observe_dense_streamed(
    info: DenseInfo,
    tok,
    texts: Iterable[str],
    prompts: Iterable[str],
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    hidden_budget: int = 1 << 62,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    offload_dir: str | None = None,
    progress: bool = True,
    desc: str = "calibrate",
    reader: ByteReader | None = None,
    shard: World = SINGLE,
    share_layers: bool = False,
):
    """:func:`observe_dense`, :func:`weight_norms` and :func:`prompt_features` in one pass for a model larger
    than memory: the calibration batches and the prompt batches go through one decoder layer at a time
    (:class:`~premoe.core.streaming.LayerRunner`), each layer read once and freed. Returns ``(means with
    the weight norms, tokens, prompt features [N, L+1, D], run)``; ``run``: the largest layer held, the
    bytes of hidden states spilled to disk and the bytes read. Under torchrun (``shard``) each rank runs its
    share of both kinds of batches, the sums are every rank's and the features this rank's;
    ``share_layers``: one copy of each layer per node (:mod:`premoe.core.node_share`)."""
    from premoe.core.data import token_batches
    from premoe.core.node_share import node_share
    from premoe.core.streaming import Batch, LayerRunner, make_batches

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = make_batches(shard.share(token_batches(tok, texts, batch_size, max_length, False)), pad)
    n_cal = len(batches)
    tokens = sum(int(b.counted.sum()) for b in batches)
    if sum_int(tokens, shard, "the calibration token count") == 0:  # before any layer is read
        raise InputError("the tokenizer produced no tokens from the calibration data")
    weights = []  # [B, S, 1] per prompt batch
    for ids, attn, m in shard.share(prompt_batches(tok, prompts, batch_size, max_length)):
        batches.append(Batch(ids, attn, torch.zeros(ids.numel(), dtype=torch.bool)))  # no calibration token
        weights.append(m)
    own = reader is None
    reader = reader or ByteReader()
    model = skeleton(config_from_dict(info.raw_config, info.spec.name))
    share = node_share(shard, share_layers, device)
    stream = LayerRunner(model, DenseFiller(info, reader, dtype), reader, device, share=share)
    stats = ActivationStats(stream.model, info)
    stats.n = tokens
    norms: list[dict[str, torch.Tensor]] = []
    feats: list[list[torch.Tensor]] = [[] for _ in weights]  # per prompt batch: [B, D] per depth

    def before(b: int) -> None:
        stats.mask = batches[b].counted.to(stream.device)

    def after(depth: int, b: int, hidden: torch.Tensor) -> None:
        if b >= n_cal:  # the residual stream, as prompt_features records it
            feats[b - n_cal].append(token_mean(hidden, weights[b - n_cal]).cpu())

    try:
        run = stream.run(
            batches,
            hidden_budget,
            before,
            progress=progress,
            desc=desc,
            offload_dir=offload_dir,
            after=after,
            built=lambda i, layer: norms.append(layer_norms(layer, info)),
        )
    finally:
        stats.close()
        if own:
            reader.close()
    stats.reduce(shard)
    means = stats.means()
    means.update({k: torch.stack([n[k] for n in norms]) for k in norms[0]})
    per = [torch.nn.functional.normalize(torch.stack(f, dim=1), dim=-1) for f in feats]  # [B, L+1, D]
    run["bytes_read"] = reader.bytes_read
    return means, stats.n, torch.cat(per) if per else torch.zeros(0, 0, info.hidden), run


def calibrate_dense(
    model: str | Path | DenseInfo,
    cal: CalibrationData,
    task: str,
    store: str | Path,
    *,
    run: RunOptions = RunOptions(),
    memory: MemoryOptions = MemoryOptions(),
    overwrite: bool = False,
) -> TaskPattern:
    """Calibrate ``task`` of a dense model: activation statistics and retrieval keys into ``store``.

    ``memory.stream`` runs the model one decoder layer at a time, read from the checkpoint (default: when it
    would not fit in ``memory.max_memory`` MB, else what the machine and this process's cgroup leave);
    hidden states past that budget go to ``memory.offload_dir`` (default: the system's temporary
    directory). The statistics are the same either way.
    """
    from premoe.core.config import load_tokenizer, resolve_dtype
    from premoe.core.distributed import agree, local_device, world
    from premoe.core.memory import memory_budget
    from premoe.core.streaming import activation_bytes, choose_stream, hidden_room
    from premoe.dense.model import load_dense

    check_task_name(task)
    w = world()
    n_samples = cal.samples
    batch_size, max_length, progress = run.batch_size, run.max_length, run.progress and w.main
    device, dtype, offload_dir = local_device(run.device, w), run.dtype, memory.offload_dir
    info = model if isinstance(model, DenseInfo) else inspect_dense(model)
    st = PatternStore(store)
    st.check_new_task(info.fingerprint, task, overwrite)
    agree(
        {
            "model": info.fingerprint.to_dict(),
            "data": cal.sha256,
            "task": task,
            "options": [batch_size, max_length, dtype, repr(memory.stream), memory.share_layers],
        },
        w,
        "calibrate",
    )
    budget = memory_budget(memory.max_memory)
    dt = resolve_dtype(dtype)
    dt = None if dt == "auto" else dt
    tok = load_tokenizer(info.path)
    longest = max(
        len(tok(r.text, truncation=True, max_length=max_length)["input_ids"]) for r in cal.records()
    )  # the real batch shape, not the cap
    sizes, act = dense_sizes(info, dt), activation_bytes(info, batch_size, longest)
    use_stream = choose_stream(sizes, act, budget, True if memory.share_layers else memory.stream)
    texts, prompts = (r.text for r in cal.records()), [r.prompt for r in cal.records()]
    if use_stream:
        means, tokens, feats, _ = observe_dense_streamed(
            info,
            tok,
            texts,
            prompts,
            batch_size=batch_size,
            max_length=max_length,
            hidden_budget=hidden_room(sizes, act, budget),
            device=resolve_device(device),
            dtype=dt,
            offload_dir=None if offload_dir is None else str(offload_dir),
            progress=progress,
            desc=f"calibrate {task} (streamed)",
            shard=w,
            share_layers=memory.share_layers,
        )
    else:
        _, lm, _ = load_dense(info.path, device=resolve_device(device), dtype=dtype)
        means, tokens = observe_dense(
            lm,
            info,
            tok,
            texts,
            batch_size=batch_size,
            max_length=max_length,
            total=-(-n_samples // w.size),
            progress=progress,
            desc=f"calibrate {task}",
            shard=w,
        )
        means.update(weight_norms(lm, info))
        feats = prompt_features(lm, info, tok, prompts, batch_size=batch_size, max_length=max_length, shard=w)
    key, n_prompts = centroid(feats, (info.num_layers + 1, info.hidden), w)
    signature = {"prompt.hidden": key}  # [L+1, D] centroid per depth
    pattern = TaskPattern(
        name=task,
        layers=[],
        scores=torch.zeros(0, 0),
        means=means,
        info={
            "kind": "dense",
            "samples": n_samples,
            "tokens": tokens,
            "scorer": "seap",
            "params": {"max_length": max_length},
            "data": cal.describe(),
            "signature": {"layers": info.num_layers, "prompts": n_prompts},
            "streamed": use_stream,
        },
        signature=signature,
    )
    if w.main:  # rank 0 writes; every rank holds the same reduced statistics
        st.add(pattern, info.fingerprint, overwrite=overwrite)
        log.info("calibrated %s (dense): %d samples, %d tokens -> %s", task, n_samples, tokens, st.path)
    return pattern
