"""Built-in task suite: small generative tasks with checkable answers.

Each task maps a random generator to a ``(prompt, completion)`` pair; accuracy is greedy-decoded
exact match of the completion. Samples are assigned to a split by a hash of the prompt, so the
training, calibration and evaluation splits never share a prompt whatever the seeds.
"""

from __future__ import annotations

import hashlib
import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
# Split by hash(prompt) % 10: 0 -> eval, 1 -> calib, the rest -> train.
SPLITS = {"eval": (0,), "calib": (1,), "train": tuple(range(2, 10))}


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    return f"reverse {w}=", w[::-1]


def _shift(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 6)
    return f"shift {w}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _count(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 4, 10, "abcde")
    c = rng.choice("abcde")
    return f"count {c} in {w}=", str(w.count(c))


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7, string.digits)
    return f"sort {w}=", "".join(sorted(w))


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    make: Callable[[random.Random], tuple[str, str]]


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("add", "arithmetic: sum of two numbers below 100", _add),
        Task("reverse", "string transform: reverse a word", _reverse),
        Task("shift", "character mapping: each letter to the next one", _shift),
        Task("count", "counting: occurrences of a letter", _count),
        Task("sort", "sorting: the digits in ascending order", _sort),
    ]
}


def split_of(prompt: str) -> str:
    bucket = int.from_bytes(hashlib.sha1(prompt.encode()).digest()[:4], "little") % 10
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def samples(task: str, n: int, split: str = "eval", seed: int = 0) -> list[dict[str, str]]:
    """``n`` distinct ``{"prompt", "completion"}`` samples of ``task`` from ``split``."""
    if task not in TASKS:
        raise KeyError(f"unknown built-in task {task!r}; choose from {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{split}:{seed}")
    seen: set[str] = set()
    out = []
    for _ in range(200 * n + 1000):
        prompt, completion = TASKS[task].make(rng)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "completion": completion})
        if len(out) == n:
            return out
    raise RuntimeError(f"task {task!r} has fewer than {n} distinct {split} prompts")


# Character vocabulary of the built-in tokenizer (and of the tiny test models).
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list(" " + LETTERS + string.digits + "+=:-.,")


def char_tokenizer():
    """A character-level fast tokenizer (BOS added by default) that ``AutoTokenizer`` reloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def suite(calib_samples: int, eval_samples: int) -> dict[str, tuple[list[dict[str, str]], list[dict[str, str]]]]:
    """The built-in suite: {task: (calibration samples, evaluation samples)}."""
    return {t: (samples(t, calib_samples, "calib"), samples(t, eval_samples, "eval")) for t in TASKS}
