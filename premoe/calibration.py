"""Calibration: run task samples through a model and score every routed expert for that task.

The model is observed through pass-through forward hooks on its routers (they record and return
normally; nothing is raised inside ``forward``). Each hook reduces the router logits of the real
tokens of a batch (padding masked out) to per-expert sums, so memory stays constant however many
samples are streamed through.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import MoeLayer, RouterSpec, decoder_layers
from .data import iter_records, scan
from .errors import InputError, StoreError
from .modelio import LoadedModel, ModelInfo, as_info, as_loaded, load_tokenizer, resolve_device
from .kernels import expert_forward
from .routing import route
from .scoring import (
    OUTPUT_SCORERS,
    OUTPUT_SUM_NAMES,
    SCORERS,
    SUM_NAMES,
    MarkerParams,
    RoutingSums,
    layer_markers,
    output_markers,
    score,
    weight_ratio,
)
from .store import PatternStore, TaskPattern, check_task_name

log = logging.getLogger(__name__)


class RouterObserver:
    """Accumulates :class:`RoutingSums` from every MoE router while the model runs.

    Use as a context manager (hooks are always removed on exit). Before each forward pass set
    :attr:`mask` to the flattened [B*S] attention mask so padding is not counted. With ``outputs``
    it also recomputes, after each MoE block has run, every chosen expert's output from its fused
    weight slices for its tokens (nothing is unfused), for the expert-output criteria (REAP, EAN,
    EASY-EP), keeping the residual entering the block for one layer.
    """

    def __init__(self, layers: list[MoeLayer], router: RouterSpec, arch, params: MarkerParams,
                 decoder: list | None = None, outputs: bool = False):
        self.layers = layers
        self.router = router
        self.arch = arch
        self.params = params
        self.outputs = outputs
        self.decoder = decoder
        device = next(layers[0].router.parameters()).device
        names = tuple(SUM_NAMES) + (tuple(OUTPUT_SUM_NAMES) if outputs else ())
        self.sums = RoutingSums.zeros(len(layers), router.num_experts, device if device.type != "meta" else None, names)
        self.mask: torch.Tensor | None = None
        self._residual: dict[int, torch.Tensor] = {}
        self._routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: list = []

    def _masked(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().reshape(-1, t.shape[-1])  # [B*S, ...]
        return t[self.mask.to(t.device)] if self.mask is not None else t

    def _hook(self, pos: int, layer: MoeLayer):
        at = self.router.logits_at

        def hook(module, args, output):
            logits = output[at] if isinstance(output, (tuple, list)) else output
            logits = self._masked(logits)
            self.sums.add(pos, layer_markers(logits, self.router, self.params, layer.selection_bias()))
            if self.outputs:
                self._routed[pos] = (self._masked(args[0]), logits)

        return hook

    def _residual_hook(self, pos: int):
        def hook(module, args):
            self._residual[pos] = args[0].detach()

        return hook

    def _block_hook(self, pos: int, layer: MoeLayer, decoder_layer):
        scale = self.router.scale or 1.0
        mult = float(getattr(decoder_layer, "residual_multiplier", 1.0) or 1.0)
        E, S = self.router.num_experts, self.router.width

        def hook(module, args, output):
            hidden, logits = self._routed.pop(pos)
            idx, w = route(logits, self.router, bias=layer.selection_bias(), scaled=True)
            res = self._residual.pop(pos, None)
            x = (self._masked(res) if res is not None else hidden).float()
            norms = torch.zeros(idx.shape, dtype=torch.float32, device=idx.device)
            routed = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
            for e in idx.unique().tolist():
                rows, slots = torch.where(idx == e)
                inp = hidden[rows]
                if self.arch.weight_on_input:
                    inp = inp * w[rows, slots, None].to(inp.dtype)
                out = expert_forward(layer.experts, e, inp).float()
                norms[rows, slots] = out.norm(dim=-1)
                routed.index_add_(0, rows, out if self.arch.weight_on_input else out * w[rows, slots, None])
            gain = (1 - torch.nn.functional.cosine_similarity(x, x + mult * routed, dim=-1)).clamp_min(0)
            marks = output_markers(idx, w / scale, norms, gain, S)
            self.sums.add(pos, {k: v[:, :E] for k, v in marks.items()})

        return hook

    def __enter__(self) -> "RouterObserver":
        for pos, layer in enumerate(self.layers):
            self._handles.append(layer.router.register_forward_hook(self._hook(pos, layer)))
            if self.outputs:
                if layer.experts is None:
                    raise InputError(f"the expert-output scorers need an experts module; {self.arch.name} has none")
                dec = self.decoder[layer.index]
                if self.arch.pre_moe_norm:
                    norm = dec.get_submodule(self.arch.pre_moe_norm)
                    self._handles.append(norm.register_forward_pre_hook(self._residual_hook(pos)))
                self._handles.append(layer.block.register_forward_hook(self._block_hook(pos, layer, dec)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._residual.clear()
        self._routed.clear()


def _batches(
    tokenizer, texts: Iterable[str], batch_size: int, max_length: int, skip_special: bool, window: int = 256
) -> Iterator[list[tuple[list[int], list[int]]]]:
    """Batches of (token ids, count mask); samples are length-sorted within windows to limit padding.
    With ``skip_special`` the count mask leaves out special tokens (BOS...)."""
    buf: list[str] = []

    def flush():
        enc = tokenizer(buf, truncation=True, max_length=max_length, return_special_tokens_mask=skip_special)
        masks = enc["special_tokens_mask"] if skip_special else [[0] * len(x) for x in enc["input_ids"]]
        rows = sorted(((ids, [1 - s for s in sp]) for ids, sp in zip(enc["input_ids"], masks) if ids), key=lambda r: len(r[0]))
        for i in range(0, len(rows), batch_size):
            yield rows[i : i + batch_size]

    for text in texts:
        buf.append(text)
        if len(buf) == window:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


@torch.inference_mode()
def observe(
    model: torch.nn.Module,
    layers: list[MoeLayer],
    info: ModelInfo,
    tokenizer,
    texts: Iterable[str],
    params: MarkerParams,
    *,
    batch_size: int = 16,
    max_length: int = 2048,
    total: int | None = None,
    progress: bool = True,
    desc: str = "calibrate",
    skip_special: bool = False,
    outputs: bool = False,
    **forward_kwargs,
) -> RoutingSums:
    """Stream ``texts`` through ``model`` and return the routing sums of ``layers``' routers.

    ``model`` is any module whose forward drives those routers: the causal LM for calibration, or
    a truncated signature view (:mod:`premoe.signature`).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress)
    decoder = decoder_layers(model) if outputs else None
    with RouterObserver(layers, info.router, info.spec, params, decoder, outputs) as obs:
        for batch in _batches(tokenizer, texts, batch_size, max_length, skip_special):
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch], device=device)
            attn = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch], device=device)
            counted = torch.tensor([c + [0] * (width - len(c)) for _, c in batch], device=device)
            obs.mask = counted.reshape(-1).bool()
            model(input_ids=ids, attention_mask=attn, use_cache=False, **forward_kwargs)
            obs.sums.tokens += int(counted.sum())
            bar.update(len(batch))
    bar.close()
    return obs.sums


@torch.inference_mode()
def observe_streamed(
    info: ModelInfo,
    tokenizer,
    texts: Iterable[str],
    params: MarkerParams,
    *,
    num_layers: int | None = None,
    experts: bool = True,
    batch_size: int = 16,
    max_length: int = 2048,
    progress: bool = True,
    desc: str = "calibrate",
    skip_special: bool = False,
    outputs: bool = False,
    hidden_budget: int = 1 << 62,
    reader=None,
    device=None,
    offload_dir: str | None = None,
) -> tuple[RoutingSums, dict[str, int]]:
    """:func:`observe` for a model larger than memory: the same batches, pushed through one decoder
    layer at a time (:class:`~premoe.streaming.LayerStream`); returns the sums and what the run held
    (largest layer, bytes of hidden states spilled to disk)."""
    from .streaming import LayerStream, make_batches

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = make_batches(_batches(tokenizer, texts, batch_size, max_length, skip_special), pad)
    stream = LayerStream(info, num_layers=num_layers, experts=experts, reader=reader, device=device)
    decoder = stream.layers if outputs else None
    with RouterObserver(stream.moe, info.router, info.spec, params, decoder, outputs) as obs:
        obs.sums.tokens = sum(int(b.counted.sum()) for b in batches)

        def before(b: int) -> None:
            obs.mask = batches[b].counted.to(stream.device)

        stats = stream.run(batches, hidden_budget, before, progress=progress, desc=desc, offload_dir=offload_dir)
    stats["bytes_read"] = stream.reader.bytes_read
    return obs.sums, stats


def marker_params(router: RouterSpec, scorer: str, k: int | None, r: float | None) -> MarkerParams:
    """Selection settings; ``k``/``r`` apply to the chosen scorer, the other statistics use defaults."""
    if k is not None and not 1 <= k <= router.num_experts:
        raise InputError(f"--k must be between 1 and the {router.num_experts} experts per layer, got {k}")
    if r is not None and not 0.0 < r <= 1.0:
        raise InputError(f"--r must be in (0, 1], got {r}")
    if scorer == "official":
        return MarkerParams(k=router.top_k, official_k=k or 1, official_r=r)
    return MarkerParams(k=k or router.top_k, r=r)


def _records(files: list[Path], max_samples: int | None) -> Iterator:
    n = 0
    for f in files:
        for rec in iter_records(f, None if max_samples is None else max_samples - n):
            n += 1
            yield rec


def weight_stats(info: ModelInfo, progress: bool = False) -> torch.Tensor:
    """[L, E] calibration-free statistic (:func:`~premoe.scoring.weight_ratio`) of every routed expert,
    read expert by expert from the checkpoint (dequantised where quantised)."""
    from .selective import ByteReader, Materializer

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


def calibrate(
    model: str | Path | LoadedModel,
    data: str | Path | list[str | Path],
    task: str,
    store: str | Path,
    *,
    scorer: str = "tcess",
    max_samples: int | None = None,
    k: int | None = None,
    r: float | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 2048,
    device: str | None = None,
    dtype: str | None = "auto",
    overwrite: bool = False,
    progress: bool = True,
    signature_layers: int = 4,
    all_stats: bool = False,
    stream: bool | None = None,
    max_memory: float | None = None,
    offload_dir: str | None = None,
) -> TaskPattern:
    """Calibrate ``task`` on the samples in ``data`` and add its pattern to ``store``.

    Args:
        model: model directory (or a :class:`~premoe.modelio.LoadedModel` to reuse).
        data: JSONL (``text`` or ``prompt``+``completion``) or .txt file of task samples; several
            files are pooled into one task (task-agnostic calibration).
        task: task name in the store.
        store: pattern-store directory (created if missing).
        scorer: the task's default scorer (see :data:`premoe.scoring.SCORERS`): ``tcess``
            (default), ``official``, ``frequency``, ``reap``, ``ean``, ``easyep``, ``weights``, ``random``.
        max_samples: use at most this many samples.
        k: experts per token that count as selected (default: the model's top-k; ``official``: 1).
        r: minimum share of a token's top-k routing weight for an expert to count.
        seed: seed of the ``random`` scorer.
        batch_size / max_length: samples per forward pass; tokens kept per sample.
        device / dtype: where and in which precision to run the model.
        overwrite: replace the task if the store already has it.
        progress: show a progress bar.
        signature_layers: MoE layers the stored retrieval keys span (capped at the model's);
            queries can then be routed with any ``--layers`` up to this.
        all_stats: compute every scorer's statistics in this one pass (expert outputs and weights
            included), so the task can later be pruned or evaluated with any ``--scorer``.
        stream: run the model one decoder layer at a time (``None``: when it would not fit in memory).
        max_memory: memory budget in MB (default: what the machine and this process's cgroup leave);
            decides streaming and how many hidden states stay in memory rather than on disk.
        offload_dir: where hidden states past the budget go (default: the system's temporary directory).

    Returns:
        The stored :class:`~premoe.store.TaskPattern`.

    Raises:
        PremoeError: bad input (files, task name, scorer, k/r, store of another model...), before any
            model weights are loaded.
    """
    check_task_name(task)
    if scorer not in SCORERS:
        raise InputError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    if max_samples is not None and max_samples < 1:
        raise InputError(f"--max-samples must be positive, got {max_samples}")
    if batch_size < 1 or max_length < 1:
        raise InputError("--batch-size and --max-length must be positive")
    files = [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    if not files:
        raise InputError("give at least one --data file")
    scanned = [scan(f, max_samples) for f in files]
    n_samples = min(sum(n for n, _ in scanned), max_samples or sum(n for n, _ in scanned))
    info: ModelInfo = as_info(model)
    st = PatternStore(store)
    if st.exists():
        st.check_model(info.fingerprint)
        if task in st.tasks and not overwrite:
            raise StoreError(f"task {task!r} already exists in {st.path}; pass --overwrite to replace it")
    params = marker_params(info.router, scorer, k, r)
    shape = (len(info.moe_layers), info.num_experts)
    if signature_layers < 1:
        raise InputError(f"--signature-layers must be positive, got {signature_layers}")
    sig_layers = min(signature_layers, len(info.moe_layers))
    outputs = all_stats or scorer in OUTPUT_SCORERS
    run_model = all_stats or SCORERS[scorer].needs_model

    lm = None
    use_stream = False
    if run_model and not isinstance(model, LoadedModel):
        from .memory import memory_budget
        from .streaming import activation_bytes, plan_memory, resident_sizes

        budget = memory_budget(max_memory)
        tok = load_tokenizer(info.path)
        longest = max(len(tok(rec.text, truncation=True, max_length=max_length)["input_ids"])
                      for rec in _records(files, max_samples))  # the real batch shape, not the cap
        use_stream = plan_memory(info, budget, batch_size, longest, stream)
        sizes = resident_sizes(info)
        hidden_budget = max(int(0.8 * budget) - sizes["largest_layer"] - sizes["outside"]
                            - activation_bytes(info, batch_size, longest), 0)
    if run_model and use_stream:
        sums, run = observe_streamed(
            info, tok, (rec.text for rec in _records(files, max_samples)), params, batch_size=batch_size,
            max_length=max_length, progress=progress, desc=f"calibrate {task} (streamed)", outputs=outputs,
            hidden_budget=hidden_budget, device=resolve_device(device),
            offload_dir=offload_dir,
        )
        tokens, means = sums.tokens, sums.means()
    elif run_model:
        lm = as_loaded(model, device=device, dtype=dtype)
        tok = lm.tokenizer
        sums = observe(
            lm.model, lm.layers, lm.info, tok, (rec.text for rec in _records(files, max_samples)), params,
            batch_size=batch_size, max_length=max_length, total=n_samples, progress=progress,
            desc=f"calibrate {task}", outputs=outputs, logits_to_keep=1,
        )
        tokens, means = sums.tokens, sums.means()
    else:
        tok = model.tokenizer if isinstance(model, LoadedModel) else load_tokenizer(info.path)
        tokens = sum(len(tok(rec.text, truncation=True, max_length=max_length)["input_ids"])
                     for rec in _records(files, max_samples))
        means = {}
    if tokens == 0:
        raise InputError(f"data file {files[0]}: the tokenizer produced no tokens")
    if all_stats or scorer == "weights":
        means["weights"] = weight_stats(info, progress)
    scores = score(scorer, means, shape, seed)
    from .signature import SignatureModel

    signature, sig_tokens = {}, {}
    sig_model = None
    if not use_stream:
        sig_model = SignatureModel(lm.model, info, tok, sig_layers) if lm else SignatureModel.from_checkpoint(info, tok, sig_layers)
    for source in ("prompt", "full"):
        texts = (rec.prompt if source == "prompt" else rec.text for rec in _records(files, max_samples))
        if sig_model is not None:
            sums = sig_model.stats(texts, batch_size=batch_size, max_length=max_length, total=n_samples,
                                   progress=progress, desc=f"keys ({source})")
        else:  # the first MoE layers without their experts, streamed like the model
            sums, _ = observe_streamed(
                info, tok, texts, MarkerParams(k=info.router.top_k), num_layers=info.moe_layers[sig_layers - 1] + 1,
                experts=False, batch_size=batch_size, max_length=max_length, progress=progress,
                desc=f"keys ({source}, streamed)", skip_special=True, hidden_budget=hidden_budget, offload_dir=offload_dir,
            )
        signature.update({f"{source}.{key}": v for key, v in sums.means().items()})
        sig_tokens[source] = sums.tokens
    data_info = [{"path": str(f.resolve()), "sha256": sha} for f, (_, sha) in zip(files, scanned)]
    pattern = TaskPattern(
        name=task,
        layers=list(info.moe_layers),
        scores=scores,
        means=means,
        info={
            "samples": n_samples,
            "tokens": tokens,
            "scorer": scorer,
            "params": {**params.to_dict(), "seed": seed, "max_length": max_length},
            "data": data_info[0] if len(data_info) == 1 else data_info,
            "signature": {"layers": sig_layers, "tokens": sig_tokens},
            "streamed": use_stream,
        },
        signature=signature,
    )
    st.add(pattern, info.fingerprint, overwrite=overwrite)
    log.info("calibrated %s: %d samples, %d tokens -> %s", task, n_samples, tokens, st.path)
    return pattern
