"""What ``premoe eval`` measures: greedy exact match on ``{"prompt", "completion"}`` samples, log-likelihood
accuracy on ``{"prompt", "choices", "answer"}`` samples, and perplexity on a text file.

Under torchrun each metric runs data-parallel (``shard``, :mod:`premoe.core.distributed`): generation batches,
multiple-choice samples and perplexity chunks are cut as one process cuts them, chunk ``c`` goes to rank
``c mod N``, and the counts and float64 log-likelihood sums are added in rank order. Every rank returns the
same numbers as one process (up to float64 rounding of the perplexity sum)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from premoe.core.distributed import SINGLE, World, sum_in_rank_order, sum_int


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of ``prompts`` (one batch, left-padded), special tokens removed."""
    device = next(p.device for p in model.parameters() if not p.is_meta)  # lazy models: layers are on meta
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    out = model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def exact_match(
    model,
    tokenizer,
    data: list[dict[str, str]],
    batch_size: int = 128,
    max_new_tokens: int | None = None,
    progress: bool = True,
    desc: str = "eval",
    shard: World = SINGLE,
) -> float:
    """Share of samples whose greedy completion equals ``completion`` (surrounding whitespace ignored)."""
    if not data:
        raise ValueError("no samples to evaluate")
    if max_new_tokens is None:
        longest = max(len(tokenizer(d["completion"], add_special_tokens=False).input_ids) for d in data)
        max_new_tokens = longest + 2
    right = 0
    starts = list(shard.share(range(0, len(data), batch_size)))
    bar = tqdm(total=len(starts), desc=desc, unit="batch", disable=not progress, leave=False)
    for i in starts:
        chunk = data[i : i + batch_size]
        outs = generate_greedy(model, tokenizer, [d["prompt"] for d in chunk], max_new_tokens)
        right += sum(o.strip() == d["completion"].strip() for o, d in zip(outs, chunk))
        bar.update(1)
    bar.close()
    return sum_int(right, shard, "the exact-match count") / len(data)


@torch.inference_mode()
def choice_logliks(model, tokenizer, prompt: str, choices: list[str]) -> list[float]:
    """Sum of log-probabilities of each choice as the continuation of ``prompt`` (lm-eval's ``acc``)."""
    device = next(p.device for p in model.parameters() if not p.is_meta)  # lazy models: layers are on meta
    ctx = tokenizer(prompt)["input_ids"]
    conts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    if not ctx or any(not c for c in conts):
        raise ValueError("a prompt or choice tokenizes to nothing")
    seqs = [ctx + c for c in conts]
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    out = []
    for i, c in enumerate(conts):
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=device)  # logits predicting each choice token
        out.append(float(logp[i, pos, torch.tensor(c, device=device)].sum()))
    return out


def choice_accuracy(
    model, tokenizer, data: list[dict], progress: bool = True, desc: str = "eval", shard: World = SINGLE
) -> float:
    """Share of multiple-choice samples whose answer has the highest log-likelihood."""
    if not data:
        raise ValueError("no samples to evaluate")
    right = 0
    for d in tqdm(list(shard.share(data)), desc=desc, unit="sample", disable=not progress, leave=False):
        lls = choice_logliks(model, tokenizer, d["prompt"], d["choices"])
        right += int(max(range(len(lls)), key=lls.__getitem__) == d["answer"])
    return sum_int(right, shard, "the multiple-choice count") / len(data)


def read_eval_data(path, limit: int | None = None) -> tuple[list[dict], list[dict]]:
    """Generation samples ({"prompt", "completion"}) and multiple-choice samples ({"prompt",
    "choices", "answer"}: an index or one of the choices) of a JSONL file.

    Raises:
        InputError / MissingFileError: a missing file, a malformed line, or no samples.
    """
    import json
    from pathlib import Path

    from premoe.errors import InputError, MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {path} does not exist")
    gen, mc = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(gen) + len(mc) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise InputError(f'{where}: expected an object with a "prompt" string')
            if "choices" in obj:
                choices, answer = obj["choices"], obj.get("answer")
                if not (
                    isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)
                ):
                    raise InputError(f'{where}: "choices" must be a list of at least two non-empty strings')
                if isinstance(answer, str) and answer in choices:
                    answer = choices.index(answer)
                if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
                    raise InputError(f'{where}: "answer" must be an index into "choices" or one of them')
                mc.append({"prompt": obj["prompt"], "choices": choices, "answer": answer})
            elif isinstance(obj.get("completion"), str):
                gen.append({"prompt": obj["prompt"], "completion": obj["completion"]})
            else:
                raise InputError(
                    f'{where}: expected "completion" (exact match) or "choices"+"answer" (multiple choice)'
                )
    if not gen and not mc:
        raise InputError(f"data file {path} holds no samples")
    return gen, mc


def read_perplexity(path) -> list[tuple[str, str]]:
    """What :func:`perplexity` scores in a file, as (prompt, text) records: a plain UTF-8 text file is one
    record with no prompt (every token scored); a JSONL file holds ``{"text"}`` lines (the same, one per
    line) and ``{"prompt", "completion"}`` lines (the completion and the end-of-sequence token scored, given
    the prompt).

    Raises:
        MissingFileError / InputError: a missing file, one that is not UTF-8 text, or one with no text.
    """
    import json
    from pathlib import Path

    from premoe.errors import InputError, MissingFileError

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"perplexity file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"perplexity file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InputError(f"perplexity file {path} holds no text")
    if path.suffix != ".jsonl":
        return [("", text)]
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str) and obj["text"]:
            records.append(("", obj["text"]))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            records.append((obj["prompt"], obj["completion"]))
        else:
            raise InputError(f'{path}:{lineno}: expected {{"text"}} or {{"prompt", "completion"}} strings')
    if not records:
        raise InputError(f"perplexity file {path} holds no records")
    return records


def text_windows(tokenizer, records: list[tuple[str, str]], window: int) -> list[tuple[list[int], int]]:
    """The windows :func:`perplexity` runs, as (token ids, how many of the last ones are scored).

    A record without a prompt (text) is cut into non-overlapping windows of at most ``window`` tokens, each
    starting with the tokenizer's BOS token where it has one (so every token is scored, the first of each
    window with only BOS before it; without BOS the first token of each window is context only). A record
    with a prompt is one window, BOS + prompt + completion + EOS (the prompt cut from the left if it must),
    the completion and EOS scored."""
    from premoe.errors import InputError

    if window < 2:
        raise InputError(f"the perplexity window must be at least 2 tokens, got {window}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    out = []
    for prompt, text in records:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if prompt:
            scored = (ids + ([eos] if eos is not None else []))[: window - 1]
            context = (head + tokenizer(prompt, add_special_tokens=False)["input_ids"])[-(window - len(scored)) :]
            if scored:
                out.append((context + scored, len(scored)))
            continue
        step = window - len(head)
        for i in range(0, len(ids), step):
            chunk = ids[i : i + step]
            if head:
                out.append((head + chunk, len(chunk)))
            elif len(chunk) > 1:
                out.append((chunk, len(chunk) - 1))
    if not out:
        raise InputError("the perplexity text has no token to score")
    return out


@torch.inference_mode()
def perplexity(
    model,
    tokenizer,
    records: list[tuple[str, str]],
    window: int = 1024,
    progress: bool = True,
    desc: str = "ppl",
    shard: World = SINGLE,
) -> dict[str, float]:
    """Token-weighted perplexity of ``model`` on ``records`` (:func:`read_perplexity`): exp(total negative
    log-likelihood / scored tokens) over the windows of :func:`text_windows`. Returns ``{"perplexity",
    "nll", "tokens", "window"}`` (``nll``: mean per scored token, in nats). Windows run a few at a time, as
    many as keep the logits under about 256M values."""
    device = next(p.device for p in model.parameters() if not p.is_meta)
    windows = sorted(text_windows(tokenizer, records, window), key=lambda w: len(w[0]))
    vocab = int(getattr(model.config, "vocab_size", None) or 1)
    budget = max(1, (1 << 28) // max(vocab, 1))  # tokens of logits per forward
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count, i = 0.0, 0, 0
    bar = tqdm(total=len(windows), desc=desc, unit="window", disable=not progress, leave=False)
    chunks = []
    while i < len(windows):  # chunks cut as one process cuts them, whatever the number of ranks
        n = 1
        while i + n < len(windows) and (n + 1) * len(windows[i + n][0]) <= budget:
            n += 1
        chunks.append(windows[i : i + n])
        i += n
    for chunk in shard.share(chunks):
        width = len(chunk[-1][0])
        ids = torch.tensor([w + [pad] * (width - len(w)) for w, _ in chunk], device=device)
        mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w, _ in chunk], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for j, (w, scored) in enumerate(chunk):
            start = len(w) - scored  # the scored tokens are w[start:], predicted from positions start-1 ..
            pred = logits[j, start - 1 : len(w) - 1].float()
            total += float(torch.nn.functional.cross_entropy(pred, ids[j, start : len(w)], reduction="sum"))
            count += scored
        bar.update(len(chunk))
    bar.close()
    total = float(sum_in_rank_order(torch.tensor([total], dtype=torch.float64), shard, "the perplexity sums")[0])
    count = sum_int(count, shard, "the perplexity sums")
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "window": window}


def score(
    model,
    tokenizer,
    gen: list[dict],
    mc: list[dict],
    records: list[tuple[str, str]] | None,
    run,
    max_new_tokens: int | None,
    window: int,
) -> dict:
    """Every metric ``premoe eval`` reports for one built model (``run``: its
    :class:`premoe.core.options.RunOptions`, batch size and progress): ``exact_match`` over ``gen``,
    ``mc_accuracy`` over ``mc``, ``perplexity`` over ``records`` (each ``None`` when there is nothing of its kind)."""
    from premoe.core.distributed import world

    w = world()
    progress = run.progress and w.main
    out: dict = {
        "exact_match": exact_match(model, tokenizer, gen, run.batch_size, max_new_tokens, progress, shard=w)
        if gen
        else None,
        "generate_samples": len(gen),
        "mc_accuracy": choice_accuracy(model, tokenizer, mc, progress=progress, shard=w) if mc else None,
        "mc_samples": len(mc),
        "perplexity": None,
    }
    if records:
        ppl = perplexity(model, tokenizer, records, window, progress=progress, shard=w)
        out.update(perplexity=ppl["perplexity"], nll=ppl["nll"], perplexity_tokens=ppl["tokens"], window=window)
    return out
