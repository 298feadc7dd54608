"""Batched token generation for the server: one forward per step for every sequence of a batch,
each with its own sampling settings, stop strings and cancellation.

Pure tensor functions (:func:`sample_next`) and a thin loop (:func:`run_batch`) over a
transformers causal LM with a KV cache. Prompts are left-padded with position ids taken from the
attention mask, as ``model.generate`` does, so a greedy completion here equals
:func:`premoe.core.evaluation.generate_greedy`'s. Finished or cancelled sequences leave the batch
(their rows are dropped from the cache), so a long request does not make short ones pay.
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


def _advance(seq: Sequence, token: int, tokenizer, eos: set[int]) -> None:
    """Append ``token`` to ``seq``; emit the text that is now final; set ``finish_reason`` when done."""
    if token in eos:
        seq.finish_reason = "stop"
    else:
        seq.out_ids.append(token)
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
        delta, seq.text = full[len(seq.text):], full
        seq.emit(delta)


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


@torch.inference_mode()
def run_batch(model, tokenizer, seqs: list[Sequence], pad_id: int | None = None,
              check: Callable[[], None] | None = None) -> None:
    """Generate every sequence of ``seqs`` to its end (stop, length or cancellation), in one batch.

    ``check`` runs before every forward (the server asserts the resident pattern there).
    """
    from transformers import DynamicCache

    live = [s for s in seqs if not s.is_cancelled()]
    for s in seqs:
        if s.is_cancelled():
            s.finish_reason = "cancelled"
    if not live:
        return
    device = next(p.device for p in model.parameters() if not p.is_meta)
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id or 0)
    eos = eos_ids(model, tokenizer)
    width = max(len(s.prompt_ids) for s in live)
    ids = torch.full((len(live), width), pad, dtype=torch.long)
    mask = torch.zeros((len(live), width), dtype=torch.long)
    for i, s in enumerate(live):
        ids[i, width - len(s.prompt_ids):] = torch.tensor(s.prompt_ids)
        mask[i, width - len(s.prompt_ids):] = 1
        if s.sampling.seed is not None and s.sampling.temperature > 0:
            s.generator = torch.Generator(device=device).manual_seed(s.sampling.seed)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    step_ids = ids
    while live:
        if check is not None:
            check()
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[:, -1, :]
        tokens = []
        for i, s in enumerate(live):
            t = sample_next(logits[i], s.sampling.temperature, s.sampling.top_p, s.generator)
            tokens.append(t)
            _advance(s, t, tokenizer, eos)
            if s.finish_reason is None and s.is_cancelled():
                s.finish_reason = "cancelled"
        alive = [i for i, s in enumerate(live) if s.finish_reason is None]
        if not alive:
            break
        if len(alive) < len(live):
            index = torch.tensor(alive, device=device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            tokens = [tokens[i] for i in alive]
            live = [live[i] for i in alive]
        step_ids = torch.tensor(tokens, device=device).unsqueeze(-1)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
        positions = positions[:, -1:] + 1
