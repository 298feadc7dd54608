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


class ShardedWriter:
    """Writes a checkpoint the way the hub shards it, one shard in memory at a time: :meth:`put` tensors
    in order; :meth:`close` names the shards ``model-0000i-of-0000n.safetensors``, writes
    ``model.safetensors.index.json`` and returns the bytes written."""

    def __init__(self, path: Path, shard_bytes: int):
        self.path, self.shard_bytes = path, shard_bytes
        self.shard: dict = {}
        self.held = self.size = 0
        self.written: list[tuple[str, list[str]]] = []

    def put(self, name: str, tensor) -> None:
        self.shard[name] = tensor.contiguous()
        self.held += tensor.nbytes
        self.size += tensor.nbytes
        if self.held >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.written):05d}.safetensors"
        save_file(self.shard, self.path / name, metadata={"format": "pt"})
        self.written.append((name, list(self.shard)))
        self.shard, self.held = {}, 0

    def close(self) -> int:
        import json

        if self.shard:
            self._flush()
        weight_map = {}
        for i, (name, keys) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.rename(self.path / name, self.path / final)
            weight_map.update({k: final for k in keys})
        (self.path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.size}, "weight_map": weight_map}))
        return self.size


def print_steps(steps: dict[str, dict], checkpoint_mb: float) -> None:
    """The table of a benchmark's steps run by ``large_model.peak_rss_of``: exit status, seconds, peak RSS."""
    w = max(20, *(len(n) for n in steps))
    print(f"{'step':<{w}} {'rc':>4} {'seconds':>8} {'peak RSS MB':>12} {'/ checkpoint':>12}")
    for name, st in steps.items():
        print(f"{name:<{w}} {st['returncode']:>4} {st['seconds']:>8.1f} {st['peak_rss_mb']:>12.0f} "
              f"{st['peak_rss_mb'] / checkpoint_mb:>12.2f}")
