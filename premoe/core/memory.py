"""How much memory this process may use, and how much a model needs in it.

:func:`available_bytes` is what the kernel would give us before reclaiming or killing: the smaller of
the machine's ``MemAvailable`` and the room left under this process's cgroup limit (v1 or v2), the
cgroup's page cache counted as free since the kernel reclaims it first.
"""

from __future__ import annotations

import os
from pathlib import Path

from premoe.errors import InputError

HEADROOM = 0.85  # the share of a budget a model may fill in memory; past it premoe streams the model
_CGROUP_ROOTS = (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup"))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit, or ``None`` without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    entries = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    v1 = [rel for _, ctrl, rel in entries if "memory" in ctrl.split(",")]
    v2 = [rel for _, ctrl, rel in entries if ctrl == ""]
    for rel in v1:
        d = _CGROUP_ROOTS[0] / rel.lstrip("/")
        limit = _read_int(d / "memory.limit_in_bytes")
        if limit is not None:
            used = _read_int(d / "memory.usage_in_bytes") or 0
            cache = _stat(d / "memory.stat").get("total_cache", 0)
            return None if limit >= 1 << 60 else max(limit - (used - cache), 0)
    for rel in v2:
        d = _CGROUP_ROOTS[1] / rel.lstrip("/")
        if (d / "memory.max").exists():
            limit = _read_int(d / "memory.max")
            used = _read_int(d / "memory.current") or 0
            cache = _stat(d / "memory.stat").get("file", 0)
            return None if limit is None else max(limit - (used - cache), 0)
    return None


def available_bytes() -> int:
    """Memory this process can still allocate without swapping or being killed."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62
    room = _cgroup_room()
    return min(avail, room) if room is not None else avail


def memory_budget(max_memory: float | None) -> int:
    """The memory budget in bytes: ``max_memory`` MB (``--max-memory``), else :func:`available_bytes`.

    Raises:
        InputError: ``max_memory`` is not positive.
    """
    if max_memory is None:
        return available_bytes()
    if max_memory <= 0:
        raise InputError(f"`max_memory` must be positive, got {max_memory}")
    return int(float(max_memory) * 1024 * 1024)


def fits(need: int, budget: int) -> bool:
    """Whether ``need`` bytes fit in ``budget`` with room to spare (what decides to stream a model)."""
    return need <= HEADROOM * budget


MMAP_FROM = 256 << 10  # allocations from this size on get their own mapping, returned to the system when freed
_RELEASING = False


def release_freed_blocks() -> None:
    """Have glibc serve allocations of :data:`MMAP_FROM` bytes and more by their own mappings and give freed heap
    back at once (``mallopt``; elsewhere nothing). A model holding its weights as stored dequantises them on
    every call: large blocks are allocated and freed each step, and glibc's default (a mapping threshold that
    rises as big blocks are freed, freed heap kept) lets the process grow by a sixth of what it holds over
    five prompts. Measured on an FP8 DeepSeek-V3-shaped model holding 1117 MB (``bench/held_memory.py``): peak
    RSS over the import baseline 1.28x the held bytes by default, 1.13x with this (it costs time: fresh pages
    for every dequantised weight, 1.7x the default's in a 5-prompt probe; a 32 MB threshold costs 1.3x but
    leaves 1.24x). Process-wide; called once by what holds weights as stored. ``PREMOE_KEEP_HEAP=1`` keeps
    glibc's default (faster, more memory); the test suite sets it, so the rest of its process is not slowed."""
    global _RELEASING
    if _RELEASING or os.environ.get("PREMOE_KEEP_HEAP") == "1":
        return
    _RELEASING = True
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return
    libc.mallopt(-3, MMAP_FROM)  # M_MMAP_THRESHOLD (also stops it from rising)
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give the heap's free top back at once
