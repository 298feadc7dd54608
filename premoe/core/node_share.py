"""One copy per node of the layers data-parallel ranks stream (``--share-layers``).

Streamed under torchrun, every rank builds each decoder layer from the checkpoint and holds its own copy, so
N ranks on a node hold N copies and read the layer N times. With :class:`NodeShare`, the node's first rank
(torchrun's ``LOCAL_RANK`` 0) builds the layer, writes its tensors once into a file in shared memory
(``/dev/shm``, or ``$PREMOE_SHARE_DIR``), and every rank of the node, that one included, maps the file
read-only: one copy of the layer per node, read from the checkpoint once per node.

The hand-over is two barriers per layer. At the first, every rank has freed layer ``i - 1``: the first rank
unlinks its file (its memory goes), builds layer ``i`` and writes it; at the second, every rank maps it. So a
node holds one layer at a time (and, while the first rank moves it into shared memory, one tensor more); the
price is that the other ranks wait while the first one reads. The directory goes when the run ends, or fails.
Ranks map privately (copy on write), so a rank that wrote into a weight would change only its own copy.

Only CPU runs share: on GPUs each rank holds its layer in its own GPU's memory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from premoe.core.distributed import World, barrier, digest
from premoe.errors import InputError

DIR_ENV = "PREMOE_SHARE_DIR"
ALIGN = 64  # every tensor starts on a 64-byte boundary: a multiple of every dtype's size


class NodeShare:
    """Hands layers built by the node's first rank to the node's other ranks through shared memory.

    Every rank calls :meth:`build` for the same modules in the same order (a collective), inside ``with``.
    """

    def __init__(self, w: World, directory: str | Path | None = None):
        self.w = w
        self.leader = int(os.environ.get("LOCAL_RANK", "0")) == 0
        base = Path(directory or os.environ.get(DIR_ENV) or "/dev/shm")
        if not base.is_dir():
            raise InputError(f"shared-memory directory {base} does not exist; set {DIR_ENV} to a tmpfs directory")
        job = [os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")]
        self.dir = base / f"premoe-share-{os.getuid()}-{digest(job)}"  # one per job and node
        self.count = 0
        self.previous: Path | None = None

    def __enter__(self) -> NodeShare:
        if self.leader:
            self.dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            barrier(self.w, "the shared layers' last hand-over")  # every rank has mapped the last file
        if self.leader:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _drop_previous(self) -> None:
        if self.previous is not None:
            self.previous.unlink(missing_ok=True)
            self.previous.with_suffix(".json").unlink(missing_ok=True)

    def build(self, module: nn.Module, make: Callable[[], int], finish: Callable[[nn.Module], None]) -> int:
        """``module`` built by ``make`` (which fills it in place and returns its bytes) on the node's first rank,
        mapped from shared memory on every rank of the node; ``finish(module)`` then computes, on the other
        ranks, what is not shared (non-persistent buffers). Returns the bytes ``make`` reported (0 on the ranks
        that map only)."""
        path = self.dir / f"{self.count}.bin"
        self.count += 1
        held = 0
        barrier(self.w, "the shared layers' hand-over")  # every rank has freed the previous module
        if self.leader:
            self._drop_previous()  # its memory goes now, before the next one is built
            held = make()
            publish(module, path)
        barrier(self.w, "the shared layers' hand-over")
        self.previous = path
        attach(module, path)
        if not self.leader:
            finish(module)
        return held


def _tensors(module: nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """``(module path, leaf, tensor)`` of every loaded parameter and persistent buffer, in a fixed order."""
    out = []
    for name, mod in module.named_modules():
        for leaf, t in mod._parameters.items():
            if t is not None and not t.is_meta:
                out.append((name, leaf, t))
        for leaf, t in mod._buffers.items():
            if t is not None and not t.is_meta and leaf not in mod._non_persistent_buffers_set:
                out.append((name, leaf, t))
    return out


def publish(module: nn.Module, path: Path) -> None:
    """Write ``module``'s loaded tensors into ``path`` (raw, aligned) and their table into ``path.json``."""
    entries, offset, seen = [], 0, {}
    items = _tensors(module)
    for name, leaf, t in items:
        if t.device.type != "cpu":
            raise InputError("`share_layers` shares CPU memory; with GPUs every rank holds its own layer: drop it")
        key = id(t)
        if key not in seen:  # a tensor tied within the module is written once
            seen[key] = offset
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        entries.append({"module": name, "leaf": leaf, "dtype": str(t.dtype).removeprefix("torch."),
                        "shape": list(t.shape), "offset": seen[key]})  # fmt: skip
    t = None  # noqa: F841 - the last tensor's own copy can go once written
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
    try:  # reserve the bytes first: writing a mapping past a full tmpfs would kill the process (SIGBUS)
        os.posix_fallocate(fd, 0, max(offset, 1))
    except OSError as e:
        raise InputError(
            f"`share_layers`: {path.parent} has no room for a {offset / 2**20:.0f} MB layer ({e.strerror}); set "
            f"{DIR_ENV} to a larger tmpfs directory or drop `--share-layers`"
        ) from None
    finally:
        os.close(fd)
    storage = torch.UntypedStorage.from_file(str(tmp), shared=True, nbytes=max(offset, 1))
    mods = dict(module.named_modules())
    for i, e in enumerate(entries):
        view = _view(storage, e)
        view.copy_(items[i][2])  # the same bytes again for a tied tensor's second name
        items[i] = None
        _put(mods[e["module"]], e["leaf"], view)  # this copy goes now: at most one layer and one tensor held
    del storage
    os.replace(tmp, path)
    meta = path.with_suffix(".json")
    meta.with_suffix(".jtmp").write_text(json.dumps({"size": max(offset, 1), "tensors": entries}))
    os.replace(meta.with_suffix(".jtmp"), meta)


def attach(module: nn.Module, path: Path) -> None:
    """Point ``module``'s tensors at ``path``'s (mapped privately): its own copies, if any, are freed."""
    table = json.loads(path.with_suffix(".json").read_text())
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=table["size"])
    mods = dict(module.named_modules())
    for e in table["tensors"]:
        mod, leaf = mods[e["module"]], e["leaf"]
        _put(mod, leaf, _view(storage, e))


def _put(mod: nn.Module, leaf: str, t: torch.Tensor) -> None:
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[leaf] = t


def _view(storage: torch.UntypedStorage, e: dict) -> torch.Tensor:
    dtype = getattr(torch, e["dtype"])
    item = torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(storage, e["offset"] // item, e["shape"])


def node_share(w: World, enabled: bool, device: torch.device | str | None) -> NodeShare | None:
    """A :class:`NodeShare` when ``enabled`` and several ranks run (``None`` otherwise).

    Raises:
        InputError: the layers would run on a GPU.
    """
    if not enabled or not w.parallel:
        return None
    if device is not None and torch.device(device).type != "cpu":
        raise InputError(
            "`share_layers` shares CPU memory between a node's ranks; on GPUs every rank holds its layer on its own "
            "GPU: drop `--share-layers`"
        )
    return NodeShare(w)
