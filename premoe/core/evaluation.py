"""Greedy-decoded exact-match accuracy on ``{"prompt", "completion"}`` samples."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


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
) -> float:
    """Share of samples whose greedy completion equals ``completion`` (surrounding whitespace ignored)."""
    if not data:
        raise ValueError("no samples to evaluate")
    if max_new_tokens is None:
        longest = max(len(tokenizer(d["completion"], add_special_tokens=False).input_ids) for d in data)
        max_new_tokens = longest + 2
    right = 0
    bar = tqdm(total=len(data), desc=desc, unit="sample", disable=not progress, leave=False)
    for i in range(0, len(data), batch_size):
        chunk = data[i : i + batch_size]
        outs = generate_greedy(model, tokenizer, [d["prompt"] for d in chunk], max_new_tokens)
        right += sum(o.strip() == d["completion"].strip() for o, d in zip(outs, chunk))
        bar.update(len(chunk))
    bar.close()
    return right / len(data)


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


def choice_accuracy(model, tokenizer, data: list[dict], progress: bool = True, desc: str = "eval") -> float:
    """Share of multiple-choice samples whose answer has the highest log-likelihood."""
    if not data:
        raise ValueError("no samples to evaluate")
    right = 0
    for d in tqdm(data, desc=desc, unit="sample", disable=not progress, leave=False):
        lls = choice_logliks(model, tokenizer, d["prompt"], d["choices"])
        right += int(max(range(len(lls)), key=lls.__getitem__) == d["answer"])
    return right / len(data)


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
