"""Writing a model directory safely: refuse a bad ``--out``, build it in a temporary directory beside
it, and rename it into place only when everything (the self-check included) succeeded."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from premoe.core.checkpoint import INDEX_NAME, OutTensor, write_safetensors
from premoe.errors import InputError

log = logging.getLogger(__name__)

PLAN_FILE = "premoe_plan.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained writes
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".pkl"}


def check_out_dir(out: Path, model_dir: Path, overwrite: bool) -> None:
    """Refuse an output directory that exists (unless ``overwrite``) or is the model itself."""
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise InputError(f"`out` {out} is inside the source model directory; choose a separate directory")
    if out.exists() and not overwrite:
        raise InputError(f"`out` {out} already exists; choose a new directory or pass `overwrite`")


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy everything of a model directory but its weights, config, index and premoe plan
    (tokenizer, generation config, chat template, licence...)."""
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name not in ("config.json", INDEX_NAME, PLAN_FILE) and p.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(p, dst / p.name)
        elif p.is_dir():
            log.info("not copying subdirectory %s", p)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out``; renamed to ``out`` (replacing it) when the block succeeds,
    removed when it fails, so nothing half-written is ever at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.rename(out, trash / "old")
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shards(tensors: list[OutTensor], max_bytes: int) -> list[list[OutTensor]]:
    """Consecutive groups of ``tensors`` of at most ``max_bytes`` each (a larger tensor alone)."""
    out: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + t.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append(t)
        size += t.nbytes
    return out


def write_weights(
    directory: Path, tensors: list[OutTensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True
) -> int:
    """Write ``tensors`` as the hub does: ``model.safetensors``, or shards of at most
    ``max_shard_bytes`` with a ``model.safetensors.index.json``; one tensor in memory at a time.
    Returns the tensor bytes written."""
    groups = shards(tensors, max_shard_bytes)
    total = sum(t.nbytes for t in tensors)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=not progress)
    weight_map = {}
    for i, shard in enumerate(groups, 1):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(directory / fname, shard, {"format": "pt"})
        weight_map.update({t.name: fname for t in shard})
        bar.update(sum(t.nbytes for t in shard))
    bar.close()
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return total
