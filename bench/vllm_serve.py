"""Serving side by side: premoe's own engine with TAER, the vLLM engine with TAER, and plain ``vllm serve`` of
one task's pruned export (the ceiling: no routing, no switching), under the same bounded load.

Run it with the Python that has vLLM and premoe (``docs/serving.md#the-vllm-engine``). For each engine it starts
the server in a subprocess on 127.0.0.1, sends ``--requests`` held-out prompts of the built-in tasks in a
seeded random order from ``--clients`` real ``openai`` clients (greedy, ``--max-tokens`` each, bounded by
``--time-limit``), then reads /metrics (switches, checkpoint bytes) and the peak RSS of the server's process
tree (sum of VmHWM), and stops it with SIGTERM. The same thread count everywhere (``--threads``: torch's for
premoe's engine, ``VLLM_CPU_OMP_THREADS_BIND`` for vLLM's).

    python bench/vllm_serve.py                          # the shipped tiny MoE, keep 8 of 32
    python bench/vllm_serve.py --large 10               # a generated Qwen3-MoE checkpoint, 10 layers (~1.1 GB)
    python bench/vllm_serve.py --rounds 3               # every engine three times, interleaved; medians
    python bench/vllm_serve.py --ignore-eos             # every request generates --max-tokens: equal work

The machine's pace drifts (plain vLLM's own rate varied twofold within an hour here): compare engines within one
run, and prefer ``--rounds``, whose ratios are taken within each round and then their median reported.

Engines: ``premoe-hf`` (premoe's own), ``premoe-vllm`` (the vLLM engine holding one task), ``premoe-vllmN`` (the
vLLM engine holding N tasks at once, ``--held-tasks N``), ``vllm-serve`` (plain vLLM, one export); ``:on`` or
``:off`` after a vLLM engine's name sets ``--stage-switches`` (``premoe-vllm:off``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import metric, rss_mb, run_load  # noqa: E402


def tree_hwm_mb(pid: int) -> float:
    """Sum of peak resident memory (VmHWM) over ``pid`` and its descendants."""
    import psutil

    try:
        pids = [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in pids:
        try:
            total += rss_mb(p)
        except (OSError, StopIteration):  # ended meanwhile
            pass
    return total


def start(cmd: list[str], env: dict, marker: str, timeout: float = 600):
    """Start a server; returns (process, base url) once ``marker`` says where it listens."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        if marker in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}\n{''.join(lines[-40:])}")


def wait_healthy(url: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"{url} not healthy")


def summarize(load: dict, metrics_text: str, hwm: float) -> dict:
    res = load["results"]
    done = [r for r in res if r is not None and "error" not in r]
    lat = sorted(r["seconds"] for r in done)
    return {
        "answered": len(done),
        "errors": sum(1 for r in res if r is not None and "error" in r),
        "requests_per_s": len(done) / load["wall"],
        "tokens_per_s": sum(r["tokens"] for r in done) / load["wall"],
        "p50_s": lat[len(lat) // 2] if lat else None,
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "switches": metric(metrics_text, "premoe_pattern_switches_total"),
        "switches_staged": metric(metrics_text, "premoe_switches_staged_total"),
        "switch_pause_s": metric(metrics_text, "premoe_switch_seconds_sum"),
        "bytes_read_mb": metric(metrics_text, "premoe_checkpoint_bytes_read_total") / 2**20,
        "peak_rss_mb": hwm,
        "texts": [None if r is None or "error" in r else r["text"] for r in res],
    }


def run_engine(name: str, args, premoe_cmd: list[str], env: dict, export: Path, work: list) -> dict:
    """Start engine ``name``, send it ``work`` and summarize the run (see :func:`summarize`)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    if name.startswith("premoe-"):
        kind, _, staging = name.split("-")[1].partition(":")
        held = kind[4:] if kind.startswith("vllm") else ""
        cmd = [c.replace("{port}", str(port)) for c in premoe_cmd] + ["--engine", kind[:4] if held else kind]
        if held:
            cmd += ["--held-tasks", held]
        if staging:
            cmd += ["--stage-switches", staging]
        pinned = args.pinned  # each request names its task: no routing
        proc, model_of = start(cmd, env, "listening on"), (lambda w: w[0] if pinned else "auto")
    else:
        # `vllm serve` itself; the CPU wheel's `vllm` script looks up the package under the name "vllm" and fails
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export), "--port", str(port)]
        cmd += ["--host", "127.0.0.1", "--enforce-eager", "--max-num-seqs", str(args.max_batch)]
        cmd += ["--served-model-name", "export", "--disable-log-stats"]
        proc, model_of = start(cmd, env, "Application startup complete"), (lambda w: "export")
    try:
        wait_healthy(url)
        t0 = time.monotonic()
        load = run_load(url, work, args, model_of)
        text = httpx.get(url + "/metrics").text
        hwm = tree_hwm_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    out = summarize(load, text, hwm)
    out["load_s"] = time.monotonic() - t0
    return out


def median_run(runs: list[dict]) -> dict:
    """One engine's runs as one: the median of each number, every run's requests/s, the first run's texts."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs if r[key] is not None)
    out["requests_per_s_runs"] = [r["requests_per_s"] for r in runs]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", type=int, default=0, help="generate a Qwen3-MoE checkpoint with this many layers")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--tasks", nargs="+", default=["add", "reverse", "shift", "count", "sort"])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=600.0)
    ap.add_argument(
        "--engines", nargs="+", default=["premoe-hf", "premoe-vllm", "premoe-vllm2", "vllm-serve"], help="see above"
    )
    ap.add_argument("--work", type=Path, help="keep generated checkpoints and stores here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--rounds", type=int, default=1, help="run every engine this many times, interleaved; report medians"
    )
    ap.add_argument(
        "--ignore-eos",
        action="store_true",
        help="every request generates --max-tokens (vLLM's ignore_eos): the same work for every engine, whose "
        "answers otherwise differ in length (plain vLLM answers every task with one task's export)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--pinned", action="store_true", help="premoe engines: each request names its task (no routing: its cost)"
    )
    args = ap.parse_args(argv)

    import premoe
    from premoe.assets import TINY_MODEL
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples

    work_dir = args.work or Path(tempfile.mkdtemp(prefix="premoe-vllm-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    model = TINY_MODEL
    if args.large:
        from common import generated
        from memory import make_qwen3_moe, qwen3_moe_config

        cfg = qwen3_moe_config(args.large, 1024, 32, 512, 4)
        model = generated(work_dir / f"qwen3moe-{args.large}l", lambda p: make_qwen3_moe(p, cfg))
    store = work_dir / f"store-{Path(model).name}"
    if not store.exists():
        for t in args.tasks:
            data = write_jsonl(work_dir / f"{t}.jsonl", samples(t, 32, "calib"))
            premoe.calibrate(model, data, t, store, progress=False)
    export = work_dir / f"export-{Path(model).name}-{args.tasks[0]}-{args.keep}"
    if not export.exists():
        premoe.prune(model, store, args.tasks[0], args.keep, export, refit=False, progress=False)
    per = -(-args.requests // len(args.tasks))
    work = [(t, r["prompt"]) for t in args.tasks for r in samples(t, per, "eval")][: args.requests]
    random.Random(args.seed).shuffle(work)
    size_mb = sum(f.stat().st_size for f in Path(model).glob("*.safetensors")) / 2**20

    bind = "0" if args.threads == 1 else f"0-{args.threads - 1}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    premoe_cmd = [sys.executable, "-m", "premoe", "-q", "serve", "--model", str(model), "--store", str(store)]
    premoe_cmd += ["--keep", str(args.keep), "--port", "{port}", "--max-batch", str(args.max_batch)]
    premoe_cmd += ["--max-queue", str(args.requests), "--no-refit"]
    report = {"model": str(model), "checkpoint_mb": size_mb, "requests": len(work), "rounds": args.rounds}
    runs: dict[str, list[dict]] = {name: [] for name in args.engines}
    for rnd in range(args.rounds):  # engines interleaved: a slow spell of the machine hits every engine alike
        for name in args.engines:
            runs[name].append(run_engine(name, args, premoe_cmd, env, export, work))
            print(f"{name}: done (round {rnd + 1} of {args.rounds})", flush=True)
    report["engines"] = {name: median_run(rs) for name, rs in runs.items()}
    texts = {n: r.pop("texts") for n, r in report["engines"].items()}
    for name in [n for n in texts if n.startswith("premoe-vllm") and "premoe-hf" in texts]:
        pairs = [(a, b) for a, b in zip(texts["premoe-hf"], texts[name]) if a is not None and b is not None]
        report[f"{name}_answers_equal_hf"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    print(
        f"{Path(model).name} ({size_mb:.0f} MB), keep {args.keep}: {len(work)} requests, {args.clients} clients, "
        f"{args.max_tokens} tokens max, {args.threads} threads"
    )
    print(
        f"{'engine':<16} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} {'switches':>8} {'staged':>6} "
        f"{'pause s':>7} {'MB read':>8} {'RSS MB':>7}"
    )
    for name, r in report["engines"].items():
        print(
            f"{name:<16} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>7.1f} {r['p50_s']:>7.3f} {r['p99_s']:>7.3f} "
            f"{r['switches']:>8.0f} {r['switches_staged']:>6.0f} {r['switch_pause_s']:>7.2f} "
            f"{r['bytes_read_mb']:>8.1f} {r['peak_rss_mb']:>7.0f}"
        )
    for a in [n for n in runs if n.startswith("premoe-vllm")]:
        for b in ("vllm-serve", "premoe-hf"):
            if b in runs:  # ratios within each round (the machine's pace drifts between rounds), then their median
                keys = ("tokens_per_s", "requests_per_s")
                ratios = {key: [x[key] / y[key] for x, y in zip(runs[a], runs[b])] for key in keys}
                report[f"{a}/{b}"] = {key: statistics.median(r) for key, r in ratios.items()}
                report[f"{a}/{b}"]["requests_per_s_rounds"] = ratios["requests_per_s"]
                each = " ".join(f"x{r:.2f}" for r in ratios["requests_per_s"])
                print(
                    f"{a} / {b}: output tokens/s x{report[f'{a}/{b}']['tokens_per_s']:.2f}, "
                    f"requests/s x{report[f'{a}/{b}']['requests_per_s']:.2f}"
                    + (f" (median of rounds: {each})" if args.rounds > 1 else "")
                )
    for key in [k for k in report if k.endswith("_answers_equal_hf")]:
        print(f"answers of {key.split('_')[0]} equal to premoe-hf's: {report[key]:.0%}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
