"""Every verb of a plain install (no extras) on the shipped models and tiny quantised checkpoints.

Run by ``.ci/run`` in a fresh virtual environment holding ``pip install .`` only, so a dependency that
only the test extras bring in fails here. Each step is the real ``premoe`` command in a subprocess; the
server is started on a free 127.0.0.1 port, asked one completion with the standard library's HTTP client
and stopped with SIGTERM (it must drain and exit 0).

    python .ci/smoke.py [--keep-work]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PREMOE = [sys.executable, "-m", "premoe", "-q"]
steps: list[tuple[str, float]] = []


def premoe(name: str, *args, stdin: str | None = None) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run([*PREMOE, *map(str, args)], capture_output=True, text=True, input=stdin, timeout=600)
    steps.append((name, time.perf_counter() - t0))
    if proc.returncode != 0:
        sys.exit(f"smoke: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def torchrun(name: str, n: int, *args) -> str:
    """``premoe`` under ``torchrun --nproc-per-node n`` on a free 127.0.0.1 port (torch's own launcher)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", str(port)]
    proc = subprocess.run([*cmd, "-m", "premoe", "-q", *map(str, args)], capture_output=True, text=True, timeout=600)
    steps.append((name, time.perf_counter() - t0))
    if proc.returncode != 0:
        sys.exit(f"smoke: {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def serve(name: str, *args) -> None:
    """Start ``premoe serve --port 0``, get one completion over HTTP, stop it with SIGTERM."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*PREMOE, "serve", "--port", "0", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://[\w.:\[\]]+", line)
        if url is None:
            proc.kill()
            sys.exit(f"smoke: {name}: server did not start:\n{line}{proc.stderr.read()[-3000:]}")
        body = json.dumps({"model": "auto", "prompt": "add 1+2=", "max_tokens": 4}).encode()
        req = urllib.request.Request(url.group(0) + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            reply = json.loads(resp.read())
        if not reply.get("choices"):
            sys.exit(f"smoke: {name}: no completion in {reply}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    steps.append((name, time.perf_counter() - t0))
    if code != 0:
        sys.exit(f"smoke: {name}: server exited {code} after SIGTERM:\n{proc.stderr.read()[-3000:]}")


def checkpoints(work: Path) -> dict[str, tuple[Path, int]]:
    """{label: (model directory, experts to keep)}: the shipped bf16 MoE, and tiny FP8 and MXFP4 ones built
    in their hub layouts."""
    from premoe.assets import TINY_MODEL
    from premoe.testing import FAMILIES, build_model, quantize_checkpoint, save_model

    out = {"bf16 (shipped tiny MoE)": (TINY_MODEL, 16)}
    for label, family, method, extra in (
        ("block FP8 (DeepSeek-V3 layout)", "deepseek_v3", "fp8", {}),
        ("MXFP4 (GPT-OSS layout)", "gpt_oss", "mxfp4", {"intermediate_size": 64}),
    ):
        model_type, overrides, _ = FAMILIES[family]
        src = save_model(*build_model(model_type, {**overrides, **extra}), work / family)
        out[label] = (quantize_checkpoint(src, work / f"{family}-{method}", method), 4)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep-work", action="store_true", help="keep the working directory")
    args = ap.parse_args()
    from premoe.assets import TINY_DENSE, TINY_MODEL
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples

    work = Path(tempfile.mkdtemp(prefix="premoe-smoke-"))
    try:
        calib = {t: write_jsonl(work / f"{t}.jsonl", samples(t, 16, "calib")) for t in ("add", "sort")}
        evals = write_jsonl(work / "eval.jsonl", samples("add", 8, "eval"))
        for label, (model, keep) in checkpoints(work).items():
            store, out = work / f"store-{model.name}", work / f"pruned-{model.name}"
            for t, f in calib.items():
                premoe(
                    f"{label}: calibrate {t}", "calibrate", "--model", model, "--data", f, "--task", t, "--store", store
                )
            premoe(f"{label}: inspect", "inspect", "--store", store)
            line = premoe(
                f"{label}: prune",
                "prune",
                "--model",
                model,
                "--store",
                store,
                "--task",
                "add",
                "--keep",
                keep,
                "--out",
                out,
            )
            if "reload verified" not in line:
                sys.exit(f"smoke: {label}: prune did not verify its export: {line}")
            premoe(f"{label}: eval (export)", "eval", "--model", out, "--data", evals)
            premoe(
                f"{label}: eval (on the fly)",
                "eval",
                "--model",
                model,
                "--data",
                evals,
                "--store",
                store,
                "--task",
                "add",
                "--keep",
                keep,
            )
            premoe(f"{label}: route", "route", "--model", model, "--store", store, "add 1+2=")
            premoe(
                f"{label}: generate",
                "generate",
                "--model",
                model,
                "--store",
                store,
                "--keep",
                keep,
                "--max-new-tokens",
                4,
                "add 1+2=",
            )
            serve(f"{label}: serve", "--model", model, "--store", store, "--keep", keep)
        store = work / f"store-{TINY_MODEL.name}"
        premoe("bf16: refit", "refit", "--model", TINY_MODEL, "--store", store, "--keep", 8, "--task", "add")
        w4 = work / "pruned-w4a16"
        premoe("bf16: prune --quantize w4a16 (GPTQ)", "prune", "--model", TINY_MODEL, "--store", store, "--task", "add",
               "--keep", 8, "--out", w4, "--quantize", "w4a16")  # fmt: skip
        premoe("w4a16 export: eval", "eval", "--model", w4, "--data", evals)
        torchrun("bf16: torchrun calibrate (2 ranks)", 2, "calibrate", "--model", TINY_MODEL, "--data", calib["add"],
                 "--task", "add2", "--store", store)  # fmt: skip
        premoe(
            "bf16: chat",
            "chat",
            "--model",
            TINY_MODEL,
            "--store",
            store,
            "--keep",
            16,
            "--max-new-tokens",
            4,
            stdin="add 1+2=\n/task\n/exit\n",
        )
        dense, store = TINY_DENSE, work / "store-dense"
        for t, f in calib.items():
            premoe(f"dense: calibrate {t}", "calibrate", "--model", dense, "--data", f, "--task", t, "--store", store)
        premoe(
            "dense: prune",
            "prune",
            "--model",
            dense,
            "--store",
            store,
            "--task",
            "add",
            "--sparsity",
            0.3,
            "--out",
            work / "dense-pruned",
        )
        premoe(
            "dense: eval",
            "eval",
            "--model",
            dense,
            "--data",
            evals,
            "--store",
            store,
            "--task",
            "add",
            "--sparsity",
            0.3,
        )
        premoe("dense: route", "route", "--model", dense, "--store", store, "add 1+2=")
        premoe(
            "dense: generate",
            "generate",
            "--model",
            dense,
            "--store",
            store,
            "--sparsity",
            0.3,
            "--max-new-tokens",
            4,
            "add 1+2=",
        )
        serve("dense: serve", "--model", dense, "--store", store, "--sparsity", 0.3)
        premoe(
            "sweep",
            "sweep",
            "--out",
            work / "sweep",
            "--keep",
            16,
            "--scorers",
            "tcess",
            "--calib-samples",
            8,
            "--eval-samples",
            8,
        )
        premoe("demo", "demo", "--keep", 16, "--sparsity", 0.5, "--calib-samples", 8, "--eval-samples", 8)
    finally:
        if args.keep_work:
            print(f"smoke: work kept in {work}")
        else:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    width = max(len(n) for n, _ in steps)
    for name, seconds in steps:
        print(f"  {name:<{width}}  {seconds:6.1f}s")
    print(
        f"smoke: {len(steps)} steps passed in {sum(s for _, s in steps):.0f}s (plain install, python "
        f"{sys.version.split()[0]})"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
