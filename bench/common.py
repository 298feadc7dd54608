"""Helpers the benchmarks share: working directories, the interpreter's baseline RSS, and for the memory
benchmarks (``memory.py``) generated sharded checkpoints and CLI steps run in a cgroup-v1 memory group."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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
    code = (
        f"import {modules}; "
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024)"
    )
    return float(
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        ).stdout.strip()
    )


# ---------------------------------------------------------------------------------------------
# generated checkpoints, written tensor by tensor


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
        if self.shard:
            self._flush()
        weight_map = {}
        for i, (name, keys) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.rename(self.path / name, self.path / final)
            weight_map.update({k: final for k in keys})
        (self.path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": self.size}, "weight_map": weight_map})
        )
        return self.size


def meta_skeleton(path: Path, cfg: dict):
    """Write ``cfg`` as ``path/config.json`` and premoe's character tokenizer next to it; return the model
    that config builds, on the meta device (the names and shapes of the tensors to generate)."""
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from premoe.core.tasks import char_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    char_tokenizer().save_pretrained(path)
    c = CONFIG_MAPPING[cfg["model_type"]](
        **{k: v for k, v in cfg.items() if k not in ("model_type", "quantization_config")}
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(c)


def generated(path: Path, write: Callable[[Path], int]) -> Path:
    """``path``, after ``write(path)`` has generated the checkpoint there unless a finished one is there."""
    if not (path / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        write(path)
        print(f"generated {path} in {time.perf_counter() - t0:.0f}s", flush=True)
    return path


def drop_cache(model: Path) -> None:
    """Evict the checkpoint's files from the page cache (only those files), so the next reader is charged for them."""
    for f in model.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# one step: a command in a fresh process, optionally inside a memory-limited cgroup


def run_limited(cmd: list[str], limit: int | None, name: str = "premoe-bench") -> dict:
    """Run ``cmd`` (optionally inside a new cgroup with ``limit`` bytes); its wall time, and the group's peaks."""
    group = None
    prefix = []
    if limit is not None:
        group = CGROUP / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():
            try:
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping around the limit
            except OSError:
                pass
        (group / "memory.max_usage_in_bytes").write_text("0")
        prefix = ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        prefix + cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    done = threading.Event()
    anon = [0, 0]  # the group's peak anonymous memory, and anonymous + shared (its usage also counts page cache)

    def sample():
        while not done.wait(0.05):
            try:
                stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines())
            except (OSError, ValueError):
                return
            anon[0] = max(anon[0], int(stat.get("rss", 0)))
            anon[1] = max(anon[1], int(stat.get("rss", 0)) + int(stat.get("shmem", 0)))

    if group is not None:
        threading.Thread(target=sample, daemon=True).start()
    out, err = proc.communicate()
    done.set()
    wall = time.perf_counter() - t0
    result = {
        "cmd": " ".join(cmd),
        "returncode": proc.returncode,
        "seconds": wall,
        "stdout": out[-4000:],
        "stderr": err[-2000:],
    }
    if group is not None:
        result["cgroup_max_usage_mb"] = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        result["cgroup_peak_anon_mb"] = anon[0] / 2**20
        result["cgroup_peak_anon_shmem_mb"] = anon[1] / 2**20  # shared memory (/dev/shm) counted once
        oom = group / "memory.oom_control"
        result["oom_kills"] = oom.read_text().count("oom_kill 1") if oom.exists() else 0
        try:
            group.rmdir()
        except OSError:
            pass
    return result


def peak_rss_of(cmd: list[str], limit: int | None) -> dict:
    """:func:`run_limited` through a tiny launcher that reports the child's peak RSS (VmHWM) as ``peak_rss_mb``."""
    launcher = (
        "import json, os, resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print('\\nPEAK ' + json.dumps({'rc': r.returncode, 'maxrss_mb': u.ru_maxrss / 1024}))"
    )
    res = run_limited([sys.executable, "-c", launcher, *cmd], limit)
    line = next((ln for ln in res["stdout"].splitlines() if ln.startswith("PEAK ")), None)
    peak = json.loads(line[5:]) if line else {"rc": -1, "maxrss_mb": float("nan")}
    res.update(peak_rss_mb=peak["maxrss_mb"], returncode=peak["rc"] if res["returncode"] == 0 else res["returncode"])
    return res


def print_result(result: dict) -> None:
    """``result`` as JSON, each step without its output tails; the stderr of each failed step goes to stderr."""

    def clean(obj, name: str = ""):
        if isinstance(obj, dict) and "returncode" in obj and "stderr" in obj:  # a step of run_limited
            if obj["returncode"]:
                print(f"step {name!r} failed ({obj['returncode']}):\n{obj['stderr'][-2000:]}", file=sys.stderr)
            return {k: v for k, v in obj.items() if k not in ("stdout", "stderr")}
        return {k: clean(v, k) for k, v in obj.items()} if isinstance(obj, dict) else obj

    print(json.dumps(clean(result), indent=2))


def print_steps(steps: dict[str, dict], checkpoint_mb: float) -> None:
    """The table of a benchmark's steps run by :func:`peak_rss_of`: exit status, seconds, peak RSS."""
    w = max(20, *(len(n) for n in steps))
    print(f"{'step':<{w}} {'rc':>4} {'seconds':>8} {'peak RSS MB':>12} {'/ checkpoint':>12}")
    for name, st in steps.items():
        print(
            f"{name:<{w}} {st['returncode']:>4} {st['seconds']:>8.1f} {st['peak_rss_mb']:>12.0f} "
            f"{st['peak_rss_mb'] / checkpoint_mb:>12.2f}"
        )
