"""Safetensors checkpoints at the byte level.

premoe never needs a whole checkpoint in memory to prune it: every tensor of a pruned model is a
list of byte ranges of the source files (a kept per-expert tensor is one range; a fused [E, ...]
tensor or a router matrix sliced on dim 0 is one range per kept expert, since rows on dim 0 are
contiguous). :func:`write_safetensors` streams those ranges into a new file behind a header it
computes up front, so peak memory is one copy buffer.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data;
offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from premoe.errors import CheckpointError, MissingFileError

INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 256 * 1024 * 1024
_COPY_CHUNK = 16 * 1024 * 1024

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``nbytes`` bytes at absolute ``offset`` in ``file``."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def rows(self, ids: list[int], per: int = 1) -> list[tuple[Path, int, int]]:
        """Byte ranges of row blocks ``ids`` on dim 0, ``per`` rows each (contiguous runs merged)."""
        return self.select(0, ids, per)

    def select(self, dim: int, ids: list[int], per: int = 1) -> list[tuple[Path, int, int]]:
        """Byte ranges of the slices ``ids`` (blocks of ``per``) along ``dim``, in row-major order."""
        outer = math.prod(self.shape[:dim])
        size = self.shape[dim]
        inner = self.nbytes // max(outer * size, 1)  # bytes of one index along dim
        ranges: list[tuple[Path, int, int]] = []
        for o in range(outer):
            for i in ids:
                start = self.offset + (o * size + i * per) * inner
                length = per * inner
                if ranges and ranges[-1][1] + ranges[-1][2] == start:
                    ranges[-1] = (self.file, ranges[-1][1], ranges[-1][2] + length)
                else:
                    ranges.append((self.file, start, length))
        return ranges


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(
                    f"corrupt safetensors file {path}: shorter than its 8-byte header length; re-download or re-save it"
                )
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"corrupt safetensors file {path}: header length {n} exceeds the file; re-download or re-save it"
                )
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"corrupt safetensors file {path}: header is not JSON ({e}); re-download or re-save it"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {path}: header is not a JSON object")
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, meta in header.items():
        try:
            begin, end = meta["data_offsets"]
            shape = tuple(int(d) for d in meta["shape"])
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {path}: bad header entry for {name!r}") from None
        if not (0 <= begin <= end and base + end <= size):
            raise CheckpointError(
                f"corrupt safetensors file {path}: tensor {name!r} lies outside the file (truncated download?)"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, base + begin, end - begin)
    return tensors, metadata


Pieces = list[tuple[Path, int, int]]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, writable in place (no copy). The view keeps the
    tensor alive, so it may be taken from a temporary."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("need a contiguous CPU tensor")
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


class ByteReader:
    """Reads checkpoint byte ranges into tensors and counts the bytes read.

    With ``log`` (a list), every read is recorded as (tensor bytes, ranges), e.g. to replay it.
    """

    def __init__(self, log: list | None = None) -> None:
        self.bytes_read = 0
        self.log = log
        self._files: dict[Path, Any] = {}

    def read_into(self, dest: torch.Tensor, pieces: Pieces) -> int:
        """Fill ``dest`` (contiguous CPU) with the concatenation of ``pieces``."""
        if dest.nbytes == 0:
            return 0
        view = tensor_bytes(dest)
        pos = 0
        for path, offset, length in pieces:
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = open(path, "rb", buffering=0)
            f.seek(offset)
            end = pos + length
            while pos < end:
                got = f.readinto(view[pos:end])
                if not got:
                    raise CheckpointError(f"{path} is truncated; re-download it")
                pos += got
        if pos != dest.nbytes:
            raise CheckpointError(
                f"read {pos} bytes for a tensor of {dest.nbytes}; the checkpoint does not match its config"
            )
        self.bytes_read += pos
        if self.log is not None:
            self.log.append((dest.nbytes, list(pieces)))
        return pos

    def tensor(self, dtype: str, shape: tuple[int, ...], pieces: Pieces) -> torch.Tensor:
        if dtype not in TORCH_DTYPES:
            raise CheckpointError(f"dtype {dtype} cannot be loaded by premoe")
        t = torch.empty(shape, dtype=TORCH_DTYPES[dtype])
        self.read_into(t, pieces)
        return t

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "ByteReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Checkpoint:
    """The safetensors weights of a model directory (single file or sharded with an index)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"corrupt {index}: {e}; re-download it") from None
            files = sorted({self.directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise MissingFileError(
                    f"{index} lists shards that are missing: {', '.join(missing[:3])}; finish the download"
                )
        else:
            weight_map = None
            files = sorted(self.directory.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in self.directory.glob("*.bin")] + [p.name for p in self.directory.glob("*.pt*")]
            hint = (
                (
                    " (found pickle weights, which premoe never loads: re-save the model with "
                    "`save_pretrained(..., safe_serialization=True)`)"
                )
                if pickles
                else ""
            )
            raise MissingFileError(f"no .safetensors weights in {self.directory}{hint}")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            tensors, _ = read_header(f)
            for name, info in tensors.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"tensor {name!r} appears in both {self.tensors[name].file.name} and {f.name}"
                    )
                self.tensors[name] = info
        if weight_map is not None:
            absent = [k for k in weight_map if k not in self.tensors]
            if absent:
                raise CheckpointError(
                    f"{index} lists tensors that no shard holds (e.g. {absent[0]!r}); re-download the checkpoint"
                )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def tensor(self, name: str, rows: list[int] | None = None) -> torch.Tensor:
        """Load one tensor (or some of its dim-0 rows) into a CPU tensor."""
        info = self.tensors[name]
        if info.dtype not in TORCH_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}, which premoe cannot decode")
        ranges = info.rows(rows) if rows is not None else [(info.file, info.offset, info.nbytes)]
        shape = (len(rows), *info.shape[1:]) if rows is not None else info.shape
        with ByteReader() as reader:
            return reader.tensor(info.dtype, shape, ranges)

    def raw(self, name: str, reader: "ByteReader | None" = None) -> torch.Tensor:
        """The bytes of one tensor, as a flat uint8 tensor (any dtype)."""
        info = self.tensors[name]
        own = reader is None
        reader = reader or ByteReader()
        try:
            return reader.tensor("U8", (info.nbytes,), [(info.file, info.offset, info.nbytes)])
        finally:
            if own:
                reader.close()


@dataclass
class OutTensor:
    """One tensor of a file to write, as the source byte ranges it concatenates, or (``make``) a
    function that computes it when it is written (one such tensor is in memory at a time)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: list[tuple[Path, int, int]] = field(default_factory=list)
    make: Any = None  # () -> torch.Tensor of ``shape``, in ``dtype``

    @property
    def nbytes(self) -> int:
        if self.make is not None:
            return math.prod(self.shape) * TORCH_DTYPES[self.dtype].itemsize
        return sum(p[2] for p in self.pieces)


def write_safetensors(path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None) -> int:
    """Stream ``tensors`` into a new safetensors file at ``path``; returns the bytes copied."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    pos = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    buf = bytearray(_COPY_CHUNK)
    view = memoryview(buf)
    handles: dict[Path, object] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            for t in tensors:
                if t.make is not None:
                    value = t.make()
                    if tuple(value.shape) != tuple(t.shape) or value.dtype != TORCH_DTYPES[t.dtype]:
                        raise CheckpointError(
                            f"{t.name}: computed {value.dtype} {list(value.shape)}, expected {t.dtype} {list(t.shape)}"
                        )
                    out.write(tensor_bytes(value.contiguous()))
                    continue
                for src, offset, length in t.pieces:
                    f = handles.get(src) or handles.setdefault(src, open(src, "rb"))
                    f.seek(offset)
                    while length:
                        n = f.readinto(view[: min(length, len(buf))])
                        if not n:
                            raise CheckpointError(f"{src} is truncated; re-download it")
                        out.write(view[:n])
                        length -= n
    finally:
        for f in handles.values():
            f.close()
    return pos


def fmt_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 MB``, ``7.0 GB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
