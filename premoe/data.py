"""Reading task samples.

A data file is JSONL (``.jsonl``/``.json``), one object per line with either ``"text"`` or
``"prompt"`` and ``"completion"`` (the two are concatenated), or ``.txt`` with one sample per line.
Blank lines are skipped. Files are read lazily, so calibration memory does not grow with their size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError, MissingFileError

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


def _sample_of(obj: object, where: str) -> str:
    if isinstance(obj, dict):
        if isinstance(obj.get("text"), str):
            return obj["text"]
        if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            return obj["prompt"] + obj["completion"]
    raise InputError(f"{where}: expected an object with \"text\" or \"prompt\"+\"completion\" strings")


def iter_samples(path: str | Path, max_samples: int | None = None) -> Iterator[str]:
    """Yield the samples of a data file in order (at most ``max_samples``)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES | {".txt"}:
        raise InputError(f"data file {path}: unsupported extension {suffix!r}; use .jsonl (prompt/completion or text) or .txt")
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_samples is not None and n >= max_samples:
                return
            if not line.strip():
                continue
            if suffix == ".txt":
                sample = line.rstrip("\r\n")
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                sample = _sample_of(obj, f"{path}:{lineno}")
            if not sample:
                raise InputError(f"{path}:{lineno}: empty sample")
            n += 1
            yield sample


def scan(path: str | Path, max_samples: int | None = None) -> tuple[int, str]:
    """Validate every line before any expensive work; return (samples, sha256 of the file).

    Raises:
        InputError: a malformed line, or no samples at all.
    """
    n = sum(1 for _ in iter_samples(path, max_samples))
    if n == 0:
        raise InputError(f"data file {path} holds no samples; add lines of {{\"prompt\", \"completion\"}} or text")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return n, h.hexdigest()


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
