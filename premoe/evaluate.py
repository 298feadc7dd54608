"""Greedy-decoded exact-match accuracy on ``{"prompt", "completion"}`` samples."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


@torch.inference_mode()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of ``prompts`` (one batch, left-padded), special tokens removed."""
    device = next(model.parameters()).device
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
