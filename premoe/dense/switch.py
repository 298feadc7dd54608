"""Switching a pruned dense model from one task's plan to another's, reading only what it lacks.

Every tensor the two plans treat alike (embeddings, final norm, LM head, per-layer norms, uncut
biases) is moved to the new model as it is. Each pruned tensor (q/k/v/gate/up rows and their biases,
OLMo-2's q/k norms, o_proj/down_proj columns) is assembled in the new plan's order from the slices
the old model holds and the ones it lacks, which are read from the checkpoint:

- rows (dim 0): one byte range per run of missing rows;
- columns (dim 1, ``o_proj`` over heads, ``down_proj`` over channels): one byte range per run of
  missing columns in every row when the runs average at least ``min_run_bytes`` (default
  :data:`MIN_RUN_BYTES` = 256, one 128-dim bf16 head), else whole rows, :data:`CHUNK_BYTES` at a
  time, from which the missing columns are selected (``ByteReader.bytes_read`` then counts the
  whole rows). A range costs about 2 us of Python and syscall whatever its length: from the page
  cache, 8 missing heads of a [4096, 4096] bf16 ``o_proj`` take 43 ms as ranges (8 MiB) vs 31 ms as
  rows (32 MiB), but 1500 scattered channels of a [4096, 14336] ``down_proj`` take 13.6 s as ranges
  (12 MiB) vs 58 ms as rows (112 MiB).

The result equals :func:`premoe.dense.model.build_dense` of the new plan (followed by the same
``.to(device, dtype)``): reused slices were converted once already, read slices are converted to
the dtype and device of the tensor they join.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from premoe.core.checkpoint import TORCH_DTYPES, ByteReader, Pieces, TensorInfo
from premoe.dense.model import (
    DenseInfo,
    DensePlan,
    Getter,
    bias_compensation,
    fill_pruned,
    pruned_config,
    pruned_skeleton,
    reader_getter,
    slices,
)

MIN_RUN_BYTES = 256
CHUNK_BYTES = 16 * 1024 * 1024


def runs(ids: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ids (``ids`` ascending) as (first id, length)."""
    out: list[tuple[int, int]] = []
    for i in ids:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def column_pieces(t: TensorInfo, ids: list[int]) -> Pieces:
    """Byte ranges of columns ``ids`` of the 2-D ``t`` in row-major order: one per run per row
    (what ``t.select(1, ids)`` gives, built per run rather than per id)."""
    rows, cols = t.shape
    item = t.nbytes // max(rows * cols, 1)
    spans = [(first * item, n * item) for first, n in runs(ids)]
    return [(t.file, t.offset + r * cols * item + start, length) for r in range(rows) for start, length in spans]


def read_rows(t: TensorInfo, reader: ByteReader, ids: list[int]) -> torch.Tensor:
    """Rows ``ids`` of ``t`` (dim 0), one byte range per run."""
    return reader.tensor(t.dtype, (len(ids), *t.shape[1:]), t.select(0, ids))


def read_columns(
    t: TensorInfo,
    reader: ByteReader,
    ids: list[int],
    min_run_bytes: int = MIN_RUN_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Columns ``ids`` of the 2-D ``t`` ([rows, len(ids)]): byte ranges when the runs of ``ids``
    average at least ``min_run_bytes``, else whole rows ``chunk_bytes`` at a time."""
    rows, cols = t.shape
    item = TORCH_DTYPES[t.dtype].itemsize
    if len(ids) * item >= min_run_bytes * len(runs(ids)):
        return reader.tensor(t.dtype, (rows, len(ids)), column_pieces(t, ids))
    out = torch.empty((rows, len(ids)), dtype=TORCH_DTYPES[t.dtype])
    row_bytes = cols * item
    step = max(1, chunk_bytes // max(row_bytes, 1))
    idx = torch.tensor(ids)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        block = reader.tensor(t.dtype, (n, cols), [(t.file, t.offset + r * row_bytes, n * row_bytes)])
        out[r : r + n] = block.index_select(1, idx)
    return out


def assemble(
    old: torch.Tensor, old_ids: list[int], new_ids: list[int], dim: int, read: Callable[[list[int]], torch.Tensor]
) -> torch.Tensor:
    """The slices ``new_ids`` along ``dim``: those in ``old_ids`` taken from ``old`` (which holds the
    slices ``old_ids`` in that order), the others from ``read(missing ids)`` converted to ``old``'s
    dtype and device. ``read`` is not called when nothing is missing."""
    where = {i: p for p, i in enumerate(old_ids)}
    have = [k for k, i in enumerate(new_ids) if i in where]
    miss = [k for k, i in enumerate(new_ids) if i not in where]
    shape = list(old.shape)
    shape[dim] = len(new_ids)
    out = old.new_empty(shape)
    dev = old.device
    if have:
        src = torch.tensor([where[new_ids[k]] for k in have], device=dev)
        out.index_copy_(dim, torch.tensor(have, device=dev), old.index_select(dim, src))
    if miss:
        out.index_copy_(dim, torch.tensor(miss, device=dev), read([new_ids[k] for k in miss]).to(old))
    return out


def switch_getter(
    info: DenseInfo,
    state: dict[str, torch.Tensor],
    old: DensePlan,
    new: DensePlan,
    reader: ByteReader,
    min_run_bytes: int = MIN_RUN_BYTES,
) -> Getter:
    """A getter for :func:`premoe.dense.model.fill_pruned` that takes tensors out of ``state`` (the
    old model's, pruned to ``old``; each is popped, so it is freed once the new model is filled)
    and reads from the checkpoint only what they lack."""
    held: dict[str, tuple[int, list[int]]] = {}
    for l in range(info.num_layers):
        held.update(slices(info, old, l))
    fresh = reader_getter(info, reader)

    def get(name: str, dim: int | None, ids: list[int] | None) -> torch.Tensor:
        have = state.pop(name, None)
        if dim is None:
            # a compensated bias holds checkpoint + plan bias, and fill_pruned adds the new plan's to the raw one
            if (
                have is None
                or bias_compensation(info, old, name) is not None
                or bias_compensation(info, new, name) is not None
            ):
                return fresh(name, None, None)
            return have
        if have is None or held.get(name, (None,))[0] != dim:
            return fresh(name, dim, ids)
        t = info.checkpoint.tensors[name]
        read = (
            (lambda miss: read_rows(t, reader, miss))
            if dim == 0
            else (lambda miss: read_columns(t, reader, miss, min_run_bytes))
        )
        return assemble(have, held[name][1], ids, dim, read)

    return get


def take_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer of ``model`` by name, removed from the model (so the
    returned dict holds the only references)."""
    state: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for store, persistent in ((mod._parameters, None), (mod._buffers, mod._non_persistent_buffers_set)):
            for leaf, t in list(store.items()):
                if t is None or (persistent is not None and leaf in persistent):
                    continue
                state[f"{mod_name}.{leaf}" if mod_name else leaf] = t.detach()
    for mod in model.modules():
        for leaf in list(mod._parameters):
            mod._parameters[leaf] = None
        for leaf in list(mod._buffers):
            mod._buffers[leaf] = None
    return state


def switch_dense(
    model: nn.Module,
    info: DenseInfo,
    old: DensePlan,
    new: DensePlan,
    reader: ByteReader,
    min_run_bytes: int = MIN_RUN_BYTES,
) -> nn.Module:
    """``model`` (built for ``old``, possibly moved and cast since) turned into the model of ``new``:
    the new plan's skeleton filled from ``model``'s tensors and the checkpoint slices they lack.
    ``model`` is consumed (left without tensors). Tensors read whole (compensated biases) are on the
    CPU in the checkpoint's dtype, as :func:`premoe.dense.model.build_dense` leaves them: apply the
    same ``.to(device, dtype)`` afterwards. With ``new is old``, ``model`` is returned as it is."""
    from premoe.core.modules import finish_buffers

    if new is old:
        return model
    gen, name_or_path = getattr(model, "generation_config", None), getattr(model, "name_or_path", str(info.path))
    state = take_state(model)
    out = pruned_skeleton(pruned_config(info, new, bias=bool(new.bias)), info, new)
    fill_pruned(out, info, new, switch_getter(info, state, old, new, reader, min_run_bytes))
    state.clear()
    finish_buffers(out)
    out.name_or_path = name_or_path
    if gen is not None:
        out.generation_config = gen
    return out.eval()
