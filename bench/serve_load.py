"""Load benchmark of ``premoe serve``: concurrent OpenAI clients send a mixed-task stream to a
server on 127.0.0.1, once per scheduling policy, side by side.

For each scheduling configuration (policy and batching) it starts ``premoe serve --port 0`` in a
subprocess, sends ``--requests`` held-out prompts of the built-in tasks in a seeded random order from
``--clients`` threads (the real ``openai`` client, greedy, bounded by ``--time-limit``), then reads
the server's /metrics (pattern switches, checkpoint bytes) and its peak RSS (VmHWM), and stops it
with SIGTERM (a clean exit is checked). Every answer is compared with what ``premoe generate`` gives for the same
prompt and task (that task's pattern loaded alone, in this process): wrong-pattern answers are
requests served by another task than the one an independent router picks; wrong answers are
texts that differ.

    python bench/serve_load.py                       # the shipped tiny MoE, keep 8 of 32
    python bench/serve_load.py --dense --sparsity 0.3   # the shipped tiny dense model
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import baseline_rss_mb  # noqa: E402


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """Peak (VmHWM) or current (VmRSS) resident memory of a process."""
    return next(int(ln.split()[1]) for ln in open(f"/proc/{pid}/status") if ln.startswith(field + ":")) / 1024


def metric(text: str, name: str) -> float:
    return sum(
        float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{")
    )


def start_server(args, store: Path, config: str):
    policy, batching = config.split(":")
    cmd = [
        sys.executable,
        "-m",
        "premoe",
        "-q",
        "serve",
        "--model",
        str(args.model),
        "--store",
        str(store),
        "--port",
        "0",
        "--policy",
        policy,
        "--batching",
        batching,
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(args.requests),
    ]
    cmd += ["--sparsity", str(args.sparsity)] if args.dense else ["--keep", str(args.keep)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if "listening on" not in line:
        raise SystemExit(f"server did not start: {line}{proc.stderr.read()}")
    return proc, line.split("listening on ")[1].split(" ")[0]


def run_load(url: str, work: list[tuple[str, str]], args, model_of=lambda item: "auto") -> dict:
    """Send ``work`` ((task, prompt) pairs) from ``args.clients`` threads, asking for model ``model_of(item)``."""
    import openai

    c = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=args.time_limit)
    results: list = [None] * len(work)
    nxt, lock = iter(range(len(work))), threading.Lock()
    deadline = time.monotonic() + args.time_limit
    extra = {"ignore_eos": True} if getattr(args, "ignore_eos", False) else None  # vLLM's fixed-length load

    def client():
        while time.monotonic() < deadline:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            t0 = time.monotonic()
            try:
                out = c.completions.create(
                    model=model_of(work[i]),
                    prompt=work[i][1],
                    max_tokens=args.max_tokens,
                    temperature=0,
                    extra_body=extra,
                )
                results[i] = {
                    "task": ((out.model_extra or {}).get("premoe") or {}).get("task"),  # premoe's servers say
                    "text": out.choices[0].text,
                    "tokens": out.usage.completion_tokens,
                    "seconds": time.monotonic() - t0,
                }
            except openai.APIError as e:
                results[i] = {"error": str(e), "seconds": time.monotonic() - t0}

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"results": results, "wall": time.monotonic() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--dense", action="store_true", help="serve the shipped tiny dense model (SEAP)")
    ap.add_argument("--keep", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.3)
    ap.add_argument("--tasks", nargs="+", default=["add", "reverse", "shift", "count", "sort"])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument(
        "--configs",
        nargs="+",
        default=["affinity:continuous", "fcfs:continuous", "affinity:static", "fcfs:static"],
        help="POLICY:BATCHING pairs (--policy and --batching of premoe serve)",
    )
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per policy at most")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import httpx
    import torch

    import premoe
    from premoe.assets import TINY_DENSE, TINY_MODEL
    from premoe.core.data import write_jsonl
    from premoe.core.evaluation import generate_greedy
    from premoe.core.tasks import samples

    torch.set_num_threads(args.threads)
    args.model = args.model or (TINY_DENSE if args.dense else TINY_MODEL)
    tmp = Path(tempfile.mkdtemp(prefix="premoe-serve-bench-"))
    store = tmp / "store"
    for t in args.tasks:
        premoe.calibrate(args.model, write_jsonl(tmp / f"{t}.jsonl", samples(t, 64, "calib")), t, store, progress=False)
    per = -(-args.requests // len(args.tasks))
    work = [(t, r["prompt"]) for t in args.tasks for r in samples(t, per, "eval")][: args.requests]
    random.Random(args.seed).shuffle(work)

    if args.dense:
        from premoe.dense.server import DenseServer

        ref = DenseServer(args.model, store, args.sparsity)
    else:
        from premoe.moe.server import TaskServer

        ref = TaskServer(args.model, store, args.keep)
    kind = ref.info.raw_config["model_type"]
    module = f"transformers.models.{kind}.modeling_{kind}"
    routed = {p: ref.route(p).task for _, p in work}
    ref.load(args.tasks[0])
    weights_mb = (
        sum(t.nbytes for t in list(ref.model.parameters()) + list(ref.model.buffers()) if not t.is_meta) / 2**20
    )
    base_mb = baseline_rss_mb(
        f"torch, transformers, premoe.moe.server, premoe.dense.server, premoe.server.app, uvicorn, {module}"
    )

    report = {
        "model": str(args.model),
        "requests": len(work),
        "clients": args.clients,
        "max_batch": args.max_batch,
        "max_tokens": args.max_tokens,
        "baseline_rss_mb": base_mb,
        "resident_weights_mb": weights_mb,
        "policies": {},
    }
    for policy in args.configs:
        proc, url = start_server(args, store, policy)
        try:
            deadline = time.monotonic() + 60
            while httpx.get(url + "/health").status_code != 200:
                if time.monotonic() > deadline:
                    raise SystemExit("server not healthy")
                time.sleep(0.1)
            ready = rss_mb(proc.pid, "VmRSS")
            load = run_load(url, work, args)
            text = httpx.get(url + "/metrics").text
            rss = rss_mb(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        res = load["results"]
        done = [r for r in res if r is not None and "error" not in r]
        lat = sorted(r["seconds"] for r in done)
        report["policies"][policy] = {
            "answered": len(done),
            "errors": sum(1 for r in res if r is not None and "error" in r),
            "unsent": sum(1 for r in res if r is None),
            "seconds": load["wall"],
            "requests_per_s": len(done) / load["wall"],
            "p50_s": lat[len(lat) // 2] if lat else None,
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "switches": metric(text, "premoe_pattern_switches_total"),
            "switches_per_100": 100 * metric(text, "premoe_pattern_switches_total") / max(1, len(done)),
            "bytes_read_mb": metric(text, "premoe_checkpoint_bytes_read_total") / 2**20,
            "peak_rss_mb": rss,
            "ready_rss_mb": ready,
            "exit_code": code,
            "_answers": [(w, r) for w, r in zip(work, res)],
        }

    # correctness, after the servers are gone: premoe generate's answer for the same prompt and task
    for policy, rep in report["policies"].items():
        wrong_pattern = wrong = 0
        for (task, prompt), r in rep.pop("_answers"):
            if r is None or "error" in r:
                continue
            wrong_pattern += r["task"] != routed[prompt]
            ref.load(r["task"])
            wrong += generate_greedy(ref.model, ref.tokenizer, [prompt], args.max_tokens)[0] != r["text"]
        rep["wrong_pattern"], rep["wrong_answers"] = wrong_pattern, wrong
        rep["routed_to_own_task"] = sum(routed[p] == t for t, p in work) / len(work)

    print(
        f"premoe serve load: {report['requests']} requests, {args.clients} clients, max batch {args.max_batch}, "
        f"{args.max_tokens} tokens max, model {Path(report['model']).name}"
    )
    print(f"resident weights {weights_mb:.1f} MB; interpreter with torch/transformers/server {base_mb:.0f} MB")
    print(
        f"{'config':<20} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'sw/100':>7} {'MB read':>8} {'RSS MB':>7} "
        f"{'ready':>6} {'errors':>6} {'wrong pat':>9} {'wrong ans':>9} {'exit':>4}"
    )
    for policy, r in report["policies"].items():
        print(
            f"{policy:<20} {r['requests_per_s']:>7.2f} {r['p50_s']:>7.3f} {r['p99_s']:>7.3f} "
            f"{r['switches_per_100']:>7.1f} "
            f"{r['bytes_read_mb']:>8.1f} {r['peak_rss_mb']:>7.0f} {r['ready_rss_mb']:>6.0f} "
            f"{r['errors'] + r['unsent']:>6} "
            f"{r['wrong_pattern']:>9} {r['wrong_answers']:>9} {r['exit_code']:>4}"
        )
    base = report["policies"].get("fcfs:static")
    for name, a in report["policies"].items():
        if base is not None and a is not base:
            print(
                f"{name} vs fcfs:static: throughput x{a['requests_per_s'] / base['requests_per_s']:.2f}, "
                f"switches x{a['switches'] / max(base['switches'], 1):.2f}, p99 latency "
                f"x{a['p99_s'] / base['p99_s']:.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
