"""Reading task samples.

A data file is JSONL (``.jsonl``/``.json``), one object per line with either ``"text"`` or
``"prompt"`` and ``"completion"`` (the two are concatenated), or ``.txt`` with one sample per line.
Blank lines are skipped. Files are read lazily, so calibration memory does not grow with their size.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from premoe.errors import InputError, MissingFileError

JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}


@dataclass(frozen=True)
class Record:
    """One sample: ``text`` is what calibration reads; ``prompt`` is the part a user would send
    (the ``prompt`` field, or the whole text when there is none)."""

    prompt: str
    text: str


def _record_of(obj: object, where: str, queries: bool) -> Record:
    if isinstance(obj, dict):
        if isinstance(obj.get("prompt"), str) and (queries or isinstance(obj.get("completion"), str)):
            completion = obj.get("completion") if isinstance(obj.get("completion"), str) else ""
            return Record(obj["prompt"], obj["prompt"] + completion)
        if isinstance(obj.get("text"), str):
            return Record(obj["text"], obj["text"])
    want = '"prompt" or "text"' if queries else '"text" or "prompt"+"completion"'
    raise InputError(f"{where}: expected an object with {want} strings")


def iter_records(path: str | Path, max_samples: int | None = None, queries: bool = False) -> Iterator[Record]:
    """Yield the samples of a data file in order (at most ``max_samples``).

    With ``queries`` a ``prompt`` needs no ``completion`` (files of requests to route or answer).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES | {".txt"}:
        raise InputError(
            f"data file {path}: unsupported extension {suffix!r}; use .jsonl (prompt/completion or text) or .txt"
        )
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_samples is not None and n >= max_samples:
                return
            if not line.strip():
                continue
            if suffix == ".txt":
                text = line.rstrip("\r\n")
                rec = Record(text, text)
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                rec = _record_of(obj, f"{path}:{lineno}", queries)
            if not rec.text:
                raise InputError(f"{path}:{lineno}: empty sample")
            n += 1
            yield rec


def iter_samples(path: str | Path, max_samples: int | None = None) -> Iterator[str]:
    """The calibration texts of a data file (prompt and completion concatenated)."""
    return (r.text for r in iter_records(path, max_samples))


def scan(path: str | Path, max_samples: int | None = None) -> tuple[int, str]:
    """Validate every line before any expensive work; return (samples, sha256 of the file).

    Raises:
        InputError: a malformed line, or no samples at all.
    """
    n = sum(1 for _ in iter_samples(path, max_samples))
    if n == 0:
        raise InputError(f'data file {path} holds no samples; add lines of {{"prompt", "completion"}} or text')
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return n, h.hexdigest()


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@dataclass
class CalibrationData:
    """Calibration files, validated before any model is loaded (both kinds of model calibrate from it)."""

    files: list[Path]
    max_samples: int | None
    samples: int
    sha256: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, data, max_samples: int | None = None) -> "CalibrationData":
        """Raises InputError / MissingFileError: bad counts, no file, a malformed line, no samples."""
        if max_samples is not None and (
            isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
        ):
            raise InputError(f"`max_samples` must be positive, got {max_samples}")
        files = [Path(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
        if not files:
            raise InputError("give at least one `data` file")
        scanned = [scan(f, max_samples) for f in files]
        total = sum(n for n, _ in scanned)
        return cls(files, max_samples, min(total, max_samples or total), [sha for _, sha in scanned])

    def records(self) -> Iterator[Record]:
        """Every record of every file, at most ``max_samples`` in all."""
        n = 0
        for f in self.files:
            for rec in iter_records(f, None if self.max_samples is None else self.max_samples - n):
                n += 1
                yield rec

    def describe(self) -> dict | list[dict]:
        """What the store records about the data."""
        rows = [{"path": str(f.resolve()), "sha256": sha} for f, sha in zip(self.files, self.sha256)]
        return rows[0] if len(rows) == 1 else rows


def refit_sources(entries: dict[str, dict], names: list[str], refit_data: list | None) -> tuple[list[list[str]], str]:
    """The texts a ``--refit`` fits on, one list per equally weighted source, and a description: the
    ``refit_data`` files (each its own source), else the calibration data the store recorded for each of
    ``names`` (``entries``: the store's task entries), checked unchanged by sha256.

    Raises:
        InputError: the store records no data for a task, or the data is gone or changed.
    """
    if refit_data:
        sources = [[r.text for r in CalibrationData.open(f).records()] for f in refit_data]
        return sources, ", ".join(str(f) for f in refit_data)
    sources = []
    for name in names:
        entry = entries[name]
        rows = entry.get("data")
        rows = rows if isinstance(rows, list) else [rows]
        if not rows or any(not isinstance(r, dict) or "path" not in r for r in rows):
            raise InputError(f"the store does not record task {name!r}'s calibration data; pass `refit_data`")
        files = [Path(r["path"]) for r in rows]
        for f in files:
            if not f.is_file():
                raise InputError(f"task {name!r}'s calibration data {f} is gone; pass `refit_data` (its texts)")
        cal = CalibrationData.open(files, entry.get("samples"))
        if [r.get("sha256") for r in rows] != cal.sha256:
            raise InputError(
                f"task {name!r}'s calibration data {', '.join(map(str, files))} changed since calibration; "
                "pass `refit_data`"
            )
        sources.append([r.text for r in cal.records()])
    return sources, ("calibration data of " + ", ".join(names))


def token_batches(
    tokenizer, texts: Iterable[str], batch_size: int, max_length: int, skip_special: bool, window: int = 256
) -> Iterator[list[tuple[list[int], list[int]]]]:
    """Token batches of ``texts`` for a forward pass, as lists of (token ids, count mask) rows: samples are
    length-sorted within windows of ``window`` texts to limit padding, at most ``max_length`` tokens each.
    With ``skip_special`` the count mask leaves out special tokens (BOS...)."""
    buf: list[str] = []

    def flush():
        enc = tokenizer(buf, truncation=True, max_length=max_length, return_special_tokens_mask=skip_special)
        masks = enc["special_tokens_mask"] if skip_special else [[0] * len(x) for x in enc["input_ids"]]
        rows = sorted(
            ((ids, [1 - s for s in sp]) for ids, sp in zip(enc["input_ids"], masks) if ids), key=lambda r: len(r[0])
        )
        for i in range(0, len(rows), batch_size):
            yield rows[i : i + batch_size]

    for text in texts:
        buf.append(text)
        if len(buf) == window:
            yield from flush()
            buf = []
    if buf:
        yield from flush()


def samples_digest(rows_or_path) -> str:
    """A digest of a task's samples, a file's bytes or the rows themselves: what data-parallel ranks compare."""
    if isinstance(rows_or_path, (str, Path)):
        return hashlib.sha256(Path(rows_or_path).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(list(rows_or_path), sort_keys=True, default=str).encode()).hexdigest()
