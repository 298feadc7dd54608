"""Batched token generation for the server: one forward per step for every sequence of a batch,
each with its own sampling settings, stop strings and cancellation.

Pure tensor functions (:func:`sample_next`) and a thin loop (:func:`run_batch`) over a
transformers causal LM with a KV cache. Prompts are left-padded with position ids taken from the
attention mask, as ``model.generate`` does, so a greedy completion here equals
:func:`premoe.core.evaluation.generate_greedy`'s. Finished or cancelled sequences leave the batch
(their rows are dropped from the cache), so a long request does not make short ones pay, and new
sequences can join a running batch after their own prefill (continuous batching): the two KV
caches are left-padded to one length and concatenated, the padding masked out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Sampling:
    """Per-request decoding settings (OpenAI semantics; temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: end-of-sequence tokens do not end it (benchmarks of fixed lengths)


@dataclass
class Sequence:
    """One request's generation state. ``emit(delta_text)`` is called with each new piece of text."""

    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[str], None] = lambda _: None
    is_cancelled: Callable[[], bool] = lambda: False
    out_ids: list[int] = field(default_factory=list)
    text: str = ""  # text emitted so far (stop strings never appear in it)
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    on_done: Callable[["Sequence"], None] = lambda _: None  # called once, when finish_reason is set
    task: str | None = None  # the task whose experts answer it (an engine holding several tasks reads it)
    ended_on_eos: bool = False  # its last token was an end-of-sequence token (generated, not in ``out_ids``)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, an end-of-sequence token included, as vLLM and OpenAI's API count them."""
        return len(self.out_ids) + self.ended_on_eos


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token id from one row of logits: argmax at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest prefix whose mass reaches top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could start a stop string (so are not sent yet)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def advance(seq: Sequence, token: int, tokenizer, eos: set[int]) -> None:
    """Append ``token`` to ``seq``; emit the text that is now final; set ``finish_reason`` when done."""
    if token in eos and not seq.sampling.ignore_eos:
        seq.finish_reason, seq.ended_on_eos = "stop", True
    else:
        seq.out_ids.append(token)
    _emit(seq, tokenizer)


def finish(seq: Sequence, reason: str, tokenizer) -> None:
    """End ``seq`` for ``reason`` (an engine stopped it) and emit any text held back for stop strings."""
    seq.finish_reason = reason
    _emit(seq, tokenizer)


def _emit(seq: Sequence, tokenizer) -> None:
    full = tokenizer.decode(seq.out_ids, skip_special_tokens=True)
    stop_at = min((i for i in (full.find(s) for s in seq.sampling.stop) if i >= 0), default=-1)
    if stop_at >= 0:
        full, seq.finish_reason = full[:stop_at], "stop"
    elif seq.finish_reason is None and len(seq.out_ids) >= seq.sampling.max_tokens:
        seq.finish_reason = "length"
    if seq.finish_reason is None:
        if full.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return
        full = full[: len(full) - _holdback(full, seq.sampling.stop)]
    if len(full) > len(seq.text) and full.startswith(seq.text):
        delta, seq.text = full[len(seq.text) :], full
        seq.emit(delta)


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if t.shape[dim] == width:
        return t
    shape = list(t.shape)
    shape[dim] = width - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def mergeable(cache) -> bool:
    """Whether rows can be added to ``cache`` (plain growing key/value layers only; sliding-window,
    linear-attention or quantised layers keep state that cannot simply be padded)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers)


class _Rows:
    """The batch being decoded: its sequences, KV cache, attention mask and last positions."""

    def __init__(self, model, tokenizer, seqs: list[Sequence], device, pad: int):
        from transformers import DynamicCache

        width = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, width - len(s.prompt_ids) :] = 1
            if s.sampling.seed is not None and s.sampling.temperature > 0:
                s.generator = torch.Generator(device=device).manual_seed(s.sampling.seed)
        self.live, self.mask = list(seqs), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)
        self.step_ids = ids.to(device)

    def forward(self, model) -> torch.Tensor:
        return model(
            input_ids=self.step_ids,
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :]

    def advance(self, logits: torch.Tensor, tokenizer, eos: set[int]) -> None:
        """Pick every row's next token; rows that finish leave (their ``on_done`` runs)."""
        tokens = []
        for i, s in enumerate(self.live):
            t = sample_next(logits[i], s.sampling.temperature, s.sampling.top_p, s.generator)
            tokens.append(t)
            advance(s, t, tokenizer, eos)
            if s.finish_reason is None and s.is_cancelled():
                s.finish_reason = "cancelled"
            if s.finish_reason is not None:
                s.on_done(s)
        alive = [i for i, s in enumerate(self.live) if s.finish_reason is None]
        if len(alive) < len(self.live) and alive:
            index = torch.tensor(alive, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions = self.mask[index], self.positions[index]
        self.live = [self.live[i] for i in alive]
        tokens = [tokens[i] for i in alive]
        if self.live:
            self.step_ids = torch.tensor(tokens, device=self.mask.device).unsqueeze(-1)
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.live), 1)], dim=-1)
            self.positions = self.positions[:, -1:] + 1

    def absorb(self, other: "_Rows") -> None:
        """Append ``other``'s rows (after their prefill) to this batch, left-padding the shorter cache."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for a, b in zip(self.cache.layers, other.cache.layers):
            a.keys = torch.cat([_left_pad(a.keys, width - 1, -2), _left_pad(b.keys, width - 1, -2)])
            a.values = torch.cat([_left_pad(a.values, width - 1, -2), _left_pad(b.values, width - 1, -2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.step_ids = torch.cat([self.step_ids, other.step_ids])
        self.live += other.live


def start(seqs: list[Sequence]) -> list[Sequence]:
    """The sequences of ``seqs`` not cancelled yet (the cancelled ones are finished here)."""
    live = []
    for s in seqs:
        if s.is_cancelled():
            s.finish_reason = "cancelled"
            s.on_done(s)
        else:
            live.append(s)
    return live


@torch.inference_mode()
def run_batch(
    model,
    tokenizer,
    seqs: list[Sequence],
    pad_id: int | None = None,
    check: Callable[[], None] | None = None,
    admit: Callable[[int], list[Sequence]] | None = None,
    max_batch: int | None = None,
) -> None:
    """Generate every sequence of ``seqs`` to its end (stop, length or cancellation), in one batch.

    ``check`` runs before every forward (the server asserts the resident pattern there).
    ``admit(room)``, if given, is asked after every step for up to ``room`` more sequences
    (``max_batch`` minus those running): they are prefilled and join the running batch (continuous
    batching), when the model's KV cache allows rows to be added.
    """
    device = next(p.device for p in model.parameters() if not p.is_meta)
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    eos = eos_ids(model, tokenizer)
    cap = max_batch or 1 << 30
    rows: _Rows | None = None
    pending = start(seqs)
    while True:
        if rows is None or not rows.live:
            if not pending and admit is not None:
                pending = start(admit(cap))
            if not pending:
                return
            rows, pending = _Rows(model, tokenizer, pending, device, pad), []
        if check is not None:
            check()
        rows.advance(rows.forward(model), tokenizer, eos)
        if admit is None or not rows.live or len(rows.live) >= cap or not mergeable(rows.cache):
            continue
        new = start(admit(cap - len(rows.live)))
        if not new:
            continue
        if check is not None:
            check()
        joined = _Rows(model, tokenizer, new, device, pad)
        joined.advance(joined.forward(model), tokenizer, eos)
        if joined.live:
            rows.absorb(joined)
