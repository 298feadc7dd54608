"""Data-parallel runs under ``torchrun`` (torch.distributed; gloo, so CPU tensors and any device's runs).

``torchrun --nproc-per-node N [--nnodes M ...] -m premoe calibrate ...`` starts N x M processes. Each one
calls :func:`world` (the CLI does, first), which joins the process group that torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) describes; outside torchrun it is rank 0 of 1 and nothing
here does anything.

The rule every data-parallel verb follows:

* **Shares.** The samples are cut into batches exactly as one process cuts them (``--batch-size``
  consecutive samples after the length sort of :func:`premoe.core.data.token_batches`). Batch ``b`` goes to
  rank ``b mod N``. Every rank's batches are the ones a single process would run, with the same padding.
* **Agreement first.** Before any model weight is read, every rank's model fingerprint, data digest and
  options are compared (:func:`agree`). A mismatch stops every rank with one line naming what differs.
* **Reduction in a fixed order.** Statistics are float64 sums and counts. Every rank gathers every rank's
  partial sums and adds them in rank order (:func:`sum_in_rank_order`), so all ranks hold the same
  totals, bit for bit. They equal one process's sums up to float64 rounding: 1e-12 relative, far inside
  the 1e-6 the tests allow.
* **Rank 0 writes.** Rank 0 writes the store; the others write nothing. A rank that stops or hangs makes
  the others' next collective fail within ``PREMOE_DIST_TIMEOUT`` seconds (default 600). Each survivor
  then exits with one line. The store is written only after the last collective, so it stays as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, TypeVar

import torch

from premoe.errors import PremoeError

T = TypeVar("T")
TIMEOUT_ENV = "PREMOE_DIST_TIMEOUT"


class DistributedError(PremoeError, RuntimeError):
    """A data-parallel run cannot go on: a peer rank stopped, hung or disagrees."""


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` data-parallel processes (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank decides and writes (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's items: those at positions ``rank``, ``rank + size``, ... of ``items``."""
        for i, item in enumerate(items):
            if i % self.size == self.rank:
                yield item

    def merged(self, per_rank: list[list[T]]) -> list[T]:
        """Every rank's items (by rank, each in its :meth:`share` order) back in one process's order: item ``i``
        is rank ``i mod size``'s ``(i div size)``-th. Stops at the first one missing (a rank that stopped
        recording once its own budget was full: everything one process keeps comes before it)."""
        out: list[T] = []
        while len(per_rank[len(out) % self.size]) > len(out) // self.size:
            out.append(per_rank[len(out) % self.size][len(out) // self.size])
        return out


SINGLE = World()
_world: World | None = None


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """This process's :class:`World`, joining torchrun's process group on the first call (gloo, with
    ``PREMOE_DIST_TIMEOUT`` seconds for every collective).

    Raises:
        DistributedError: the process group cannot be joined (a rank missing, a port taken...).
    """
    global _world
    if _world is not None:
        return _world
    if not launched():
        _world = SINGLE
        return _world
    import datetime

    import torch.distributed as dist

    timeout = float(os.environ.get(TIMEOUT_ENV, "600"))
    if not dist.is_initialized():
        try:
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
        except Exception as e:  # noqa: BLE001 - torch raises several kinds; one line names the fix
            raise DistributedError(
                f"cannot join the torchrun process group ({_short(e)}); check --nnodes, --rdzv-endpoint and that "
                "every rank started"
            ) from None
    _world = World(dist.get_rank(), dist.get_world_size())
    return _world


def local_device(device: str | None, w: World) -> str | None:
    """``device`` for this rank: under torchrun, ``auto`` or ``cuda`` becomes the GPU torchrun's ``LOCAL_RANK``
    names (one process per GPU); anything else, and any single process, is left as it is."""
    if not w.parallel or device not in (None, "auto", "cuda") or not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"


def close() -> None:
    """Leave the process group (the CLI's last step)."""
    global _world
    if _world is not None and _world.parallel:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _world = None


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _collective(what: str):
    """Turn a failing collective into one line naming the step (a peer died, hung or was killed)."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except PremoeError:
            raise
        except Exception as e:  # noqa: BLE001 - gloo raises RuntimeError / DistBackendError subclasses
            w = _world or SINGLE
            raise DistributedError(
                f"rank {w.rank} of {w.size}: {what} failed, a peer rank stopped or timed out ({_short(e)}); "
                "nothing was written; see that rank's log"
            ) from None

    return guard()


def gather(t: torch.Tensor, w: World, what: str = "a reduction") -> list[torch.Tensor]:
    """Every rank's ``t`` (same shape and dtype everywhere), in rank order, on every rank (CPU)."""
    if not w.parallel:
        return [t]
    import torch.distributed as dist

    src = t.detach().cpu().contiguous()
    parts = [torch.empty_like(src) for _ in range(w.size)]
    with _collective(what):
        dist.all_gather(parts, src)
    return parts


def gather_blocks(
    blocks: list[torch.Tensor], width: int, dtype: torch.dtype, w: World, what: str = "a gather"
) -> list[list[torch.Tensor]] | None:
    """Every rank's list of row blocks ([n_i, width] each, any number of them, possibly none), on rank 0, by
    rank (``None`` on the other ranks). Three gathers: block counts, block lengths, the rows (padded)."""
    if not w.parallel:
        return [blocks]
    import torch.distributed as dist

    lengths = [int(b.shape[0]) for b in blocks]
    counts = [int(c[0]) for c in gather(torch.tensor([len(blocks)], dtype=torch.int64), w, what)]
    lens = gather(torch.tensor(lengths + [0] * (max(counts) - len(lengths)), dtype=torch.int64), w, what)
    rows = max(int(x.sum()) for x in lens)
    mine = torch.zeros(rows, width, dtype=dtype)
    if blocks:
        cat = torch.cat([b.detach().to("cpu", dtype) for b in blocks])
        mine[: cat.shape[0]] = cat
    parts = [torch.empty_like(mine) for _ in range(w.size)] if w.main else None
    with _collective(what):
        dist.gather(mine, parts, dst=0)
    if not w.main:
        return None
    out = []
    for r in range(w.size):
        sizes = [int(n) for n in lens[r][: counts[r]].tolist()]
        out.append(list(torch.split(parts[r][: sum(sizes)], sizes)) if sizes else [])
    return out


def sum_in_rank_order(t: torch.Tensor, w: World, what: str = "a reduction") -> torch.Tensor:
    """The sum of every rank's ``t``, added in rank order (the same bits on every rank), on ``t``'s device."""
    if not w.parallel:
        return t
    parts = gather(t, w, what)
    total = parts[0].clone()
    for p in parts[1:]:
        total += p
    return total.to(t.device)


def broadcast(t: torch.Tensor, w: World, what: str = "a broadcast") -> torch.Tensor:
    """Rank 0's ``t`` on every rank (same shape and dtype everywhere), on ``t``'s device."""
    if not w.parallel:
        return t
    import torch.distributed as dist

    buf = t.detach().cpu().contiguous().clone()
    with _collective(what):
        dist.broadcast(buf, src=0)
    return buf.to(t.device)


def sum_int(value: int, w: World, what: str = "a reduction") -> int:
    return int(sum_in_rank_order(torch.tensor([value], dtype=torch.int64), w, what)[0])


def digest(value: Any) -> str:
    """A short stable digest of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def agree(fields: dict[str, Any], w: World, verb: str) -> None:
    """Check that every rank runs ``verb`` on the same inputs (model, data, options...), before any work.

    Raises:
        DistributedError: one line naming the fields whose values differ between ranks.
    """
    if not w.parallel:
        return
    names = sorted(fields)
    mine = torch.tensor([[int(digest(fields[n]), 16) & ((1 << 62) - 1) for n in names]], dtype=torch.int64)
    size = torch.tensor([len(names)], dtype=torch.int64)
    if len({int(s[0]) for s in gather(size, w, f"`premoe {verb}`'s start")}) != 1:
        raise DistributedError(f"`premoe {verb}`: ranks run different versions of premoe; install the same one")
    parts = gather(mine, w, f"`premoe {verb}`'s start")
    differ = [n for i, n in enumerate(names) if len({int(p[0, i]) for p in parts}) > 1]
    if differ:
        ranks = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
        raise DistributedError(
            f"`premoe {verb}`: rank {ranks[0]} differs from rank 0 in {', '.join(differ)}; give every rank the same "
            "model, data and flags"
        )


def barrier(w: World, what: str = "a barrier") -> None:
    """Wait until every rank gets here (within ``PREMOE_DIST_TIMEOUT`` seconds)."""
    if not w.parallel:
        return
    import torch.distributed as dist

    with _collective(what):
        dist.barrier()


def sum_to_main(t: torch.Tensor, w: World, what: str = "a reduction") -> torch.Tensor | None:
    """The sum of every rank's ``t`` (same shape and dtype everywhere), added in rank order, on rank 0 (``None``
    on the other ranks). Point to point, one rank at a time: rank 0 holds its sum and one received copy, not
    one per rank (what a Gram matrix of a large layer needs)."""
    if not w.parallel:
        return t
    import torch.distributed as dist

    src = t.detach().cpu().contiguous()
    with _collective(what):
        if not w.main:
            dist.send(src, dst=0)
            return None
        total, buf = src.clone(), torch.empty_like(src)
        for r in range(1, w.size):
            dist.recv(buf, src=r)
            total += buf
    return total.to(t.device)


def agree_on_tasks(model: dict, tasks: dict, options: Any, w: World, verb: str) -> None:
    """:func:`agree` on a model fingerprint, tasks given as {name: (calibration, evaluation)} rows or files
    (compared by digest) and options: what a data-parallel sweep checks before any work."""
    if not w.parallel:
        return
    from premoe.core.data import samples_digest

    digests = {n: [samples_digest(c), samples_digest(e)] for n, (c, e) in tasks.items()}
    agree({"model": model, "tasks": digests, "options": options}, w, verb)
