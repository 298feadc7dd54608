"""Helpers the benchmarks share."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CGROUP = Path("/sys/fs/cgroup/memory")


def require_cgroup(ap) -> None:
    """Stop with a usage error unless a writable cgroup-v1 memory controller is there (root)."""
    if not (CGROUP / "cgroup.procs").exists() or not os.access(CGROUP, os.W_OK):
        ap.error(f"needs a writable cgroup-v1 memory controller at {CGROUP} (run as root)")


@contextlib.contextmanager
def work_dir(work: Path | None, prefix: str) -> Iterator[Path]:
    """``work`` (created), or a temporary directory removed afterwards."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)

def baseline_rss_mb(modules: str) -> float:
    """RSS (MB) of a fresh Python that has imported ``modules`` (comma-separated) and holds no model:
    the interpreter cost a benchmark's peak RSS is compared against."""
    code = (f"import {modules}; "
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip())
