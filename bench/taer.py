"""TAER benchmark: routing quality on the built-in suite, and serving costs on a generated model.

Quality (shipped tiny model, built-in tasks; keys from 64 calibration samples per task):
  * routing accuracy of held-out prompts;
  * end-to-end exact match when each prompt is served with its *retrieved* task's experts vs. its
    true task's ("oracle") experts, at --keep experts per layer.

Systems (a random-weight Qwen3-MoE of about --gb GB, bf16; two tasks with different patterns), each
measured in a fresh process on warm files:
  * bytes read for the first prompt vs. the ideal (non-expert tensors + the pattern's experts);
  * peak RSS while serving vs. that ideal (goal <= ideal * 1.15 + 300 MB) and vs. the dense model;
  * load time of a pattern vs. the same reads replayed raw into new memory, no model involved
    (throughput ratio, goal >= 0.7); a pure copy into already-resident memory is shown for scale;
  * a task switch: bytes read vs. the bytes of the experts the new pattern needs and the old lacks;
  * signature + retrieval time vs. one full prefill of the same prompt.

Scale: a store of --tasks tasks for the shipped model (the 5 built-in ones plus synthetic keys),
written through the store API; time to open its key table (cold, then cached) and per query.

    python bench/taer.py --gb 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import premoe  # noqa: E402
from premoe.assets import TINY_MODEL  # noqa: E402
from premoe.core.data import write_jsonl  # noqa: E402
from premoe.core.evaluation import exact_match  # noqa: E402
from premoe.core.tasks import TASKS, samples  # noqa: E402


def quality(keep: int, queries: int, calib: int) -> dict:
    from premoe.moe.loading import load_model
    from premoe.moe.router import QueryRouter
    from premoe.moe.selective import ByteReader, build_model

    work = Path(tempfile.mkdtemp(prefix="premoe-taer-q-"))
    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    for t in TASKS:
        premoe.calibrate(
            lm, write_jsonl(work / f"{t}.jsonl", samples(t, calib, "calib")), t, work / "store", progress=False
        )
    router = QueryRouter(TINY_MODEL, work / "store")
    evals = {t: samples(t, queries, "eval") for t in TASKS}
    routed = {t: [router.route(s["prompt"]).task for s in evals[t]] for t in TASKS}
    acc_route = sum(r == t for t in TASKS for r in routed[t]) / sum(map(len, routed.values()))
    models = {}
    for t in TASKS:
        with ByteReader() as r:
            models[t] = build_model(lm.info, premoe.plan(lm.info, work / "store", t, keep), r).float()
    oracle = retrieved = 0
    for t in TASKS:
        oracle += exact_match(models[t], lm.tokenizer, evals[t], progress=False) * len(evals[t])
        for task in set(routed[t]):  # serve each prompt with the pattern it was routed to
            group = [s for s, r in zip(evals[t], routed[t]) if r == task]
            retrieved += exact_match(models[task], lm.tokenizer, group, progress=False) * len(group)
    n = sum(map(len, evals.values()))
    return {
        "routing_accuracy": acc_route,
        "e2e_retrieved": retrieved / n,
        "e2e_oracle": oracle / n,
        "queries": n,
        "keep": keep,
        "signature_bytes_read": router.bytes_read,
    }


CHILD = r"""
import json, os, sys, time
def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) * 1024
mode, src, store, keep = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import torch, premoe, logging
logging.disable(logging.WARNING)
from transformers.utils import logging as hl; hl.disable_progress_bar()
torch.set_num_threads(1)
prompt = "the quick brown fox jumps over the lazy dog " * 6
out = {"rss_after_imports": rss("VmRSS:")}
if mode == "serve":
    from premoe.moe.server import TaskServer
    from premoe.moe.selective import ideal_bytes
    server = TaskServer(src, store, keep)
    reply = server.generate(prompt, max_new_tokens=8)
    out["peak_rss"] = rss("VmHWM:")
    ideal = ideal_bytes(server.info, server.plan_for(reply.task))
    ideal_full = ideal_bytes(server.info, server.plan_for(reply.task), full_routers=True)
    out.update(task=reply.task, bytes_read=reply.bytes_read, ideal=ideal, ideal_full_routers=ideal_full["total"])
    other = next(t for t in server.retriever.names if t != reply.task)
    a, b = server.plan_for(reply.task), server.plan_for(other)
    per_expert = {}
    for name, role in server.info.roles.items():
        t = server.info.checkpoint.tensors[name]
        if role.kind == "expert":
            per_expert[(role.layer, role.expert)] = per_expert.get((role.layer, role.expert), 0) + t.nbytes
    missing = sum(per_expert[(l, e)] for l, kept in b.kept.items() for e in kept if e not in a.kept[l])
    st = server.load(other)
    out.update(switch_bytes=st.bytes_read, switch_missing_expert_bytes=missing, switch_experts_read=st.experts_read,
               switch_experts_kept=st.experts_kept, switch_seconds=st.seconds)
    # signature + retrieval vs. one prefill of the same prompt with the served model
    ids = server.tokenizer(prompt, return_tensors="pt")
    def best(fn, n=5):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        return min(ts)
    with torch.inference_mode():
        out["route_seconds"] = best(lambda: server.route(prompt))
        out["prefill_seconds"] = best(lambda: server.model(**ids, use_cache=False, logits_to_keep=1))
    out["prompt_tokens"] = int(ids["input_ids"].shape[1])
elif mode == "dense":
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    ids = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=8, do_sample=False)
    out["peak_rss"] = rss("VmHWM:")
elif mode == "load":
    import ctypes, statistics
    from premoe.moe.model import inspect_model
    from premoe.moe.selective import ByteReader, build_model
    info = inspect_model(src)
    plan = premoe.plan(info, store, "a", keep)
    reads = []
    with ByteReader(log=reads) as r:
        build_model(info, plan, r)  # warms the files and records every read the load makes
    total = sum(n for n, _ in reads)
    def replay(fresh):  # the same reads, into new tensors (fresh) or one resident buffer; no model
        files = {}
        resident = None if fresh else torch.empty(max(n for n, _ in reads), dtype=torch.uint8)
        keep_alive = []
        for n, pieces in reads:
            buf = torch.empty(n, dtype=torch.uint8) if fresh else resident
            view = memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")
            pos = 0
            for path, off, length in pieces:
                f = files.get(path) or files.setdefault(path, open(path, "rb", buffering=0))
                f.seek(off)
                end = pos + length
                while pos < end:
                    pos += f.readinto(view[pos:end])
            if fresh:
                keep_alive.append(buf)
        for f in files.values():
            f.close()
    raw_fresh, raw_resident, load_times = [], [], []
    replay(False)
    for _ in range(5):
        t0 = time.perf_counter(); replay(True); raw_fresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); replay(False); raw_resident.append(time.perf_counter() - t0)
        with ByteReader() as r:
            t0 = time.perf_counter(); m = build_model(info, plan, r); load_times.append(time.perf_counter() - t0)
            nbytes = r.bytes_read
        del m
    med = statistics.median
    out.update(raw_seconds=med(raw_fresh), raw_resident_seconds=med(raw_resident), load_seconds=med(load_times),
               bytes=total, load_bytes=nbytes, reads=len(reads))
print(json.dumps(out))
"""


def make_model(path: Path, gb: float) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from premoe.core.tasks import char_tokenizer

    tok = char_tokenizer()
    hidden, inter, experts = 1024, 256, 64
    layers = max(2, round(gb * 2**30 / (2 * 3 * hidden * inter * experts)))
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=experts,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():  # decisive routers, as in trained models
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(path, max_shard_size="500MB")
    tok.save_pretrained(path)


def child(mode: str, src: Path, store: Path, keep: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(src), str(store), str(keep)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if res.returncode:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{mode} failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def systems(gb: float, keep_frac: float, workdir: Path | None) -> dict:
    work = workdir or Path(tempfile.mkdtemp(prefix="premoe-taer-s-"))
    src = work / "model"
    if not (src / "config.json").exists():
        make_model(src, gb)
    from premoe.moe.model import inspect_model

    info = inspect_model(src)
    keep = max(info.router.top_k, round(info.num_experts * keep_frac))
    store = work / "store"
    if not store.exists():  # two tasks with different (random) patterns and different key texts
        for name, seed, text in (
            ("a", 0, "the quick brown fox jumps over the lazy dog"),
            ("b", 1, "0123456789 + 98765 = "),
        ):
            (work / f"{name}.txt").write_text((text + "\n") * 4)
            premoe.calibrate(src, work / f"{name}.txt", name, store, scorer="random", seed=seed, progress=False)
    for f in sorted(src.glob("*.safetensors")):  # warm the page cache
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    serve = child("serve", src, store, keep)
    dense = child("dense", src, store, keep)
    load = child("load", src, store, keep)
    return {
        "checkpoint_bytes": info.checkpoint.nbytes,
        "layers": len(info.moe_layers),
        "experts": info.num_experts,
        "keep": keep,
        "serve": serve,
        "dense": dense,
        "load": load,
    }


def scale(n_tasks: int) -> dict:
    import statistics

    from premoe.core.store import PatternStore, TaskPattern
    from premoe.moe.loading import load_model
    from premoe.moe.router import QueryRouter

    work = Path(tempfile.mkdtemp(prefix="premoe-taer-scale-"))
    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    for t in TASKS:
        premoe.calibrate(
            lm, write_jsonl(work / f"{t}.jsonl", samples(t, 16, "calib")), t, work / "store", progress=False
        )
    st = PatternStore.open(work / "store")
    template = st.load(next(iter(TASKS)))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(n_tasks - len(TASKS)):  # synthetic tasks: random gate distributions as keys
        sig = {k: torch.rand(v.shape, generator=gen).softmax(-1) for k, v in template.signature.items()}
        st.add(
            TaskPattern(
                f"synthetic-{i:05d}",
                template.layers,
                torch.rand(template.scores.shape, generator=gen),
                {},
                {"samples": 1, "tokens": 1, "scorer": "random"},
                sig,
            ),
            lm.info.fingerprint,
        )
    build = time.perf_counter() - t0
    timings = {}
    for label in ("open_cold", "open_cached", "open_after_add"):
        if label == "open_cold":
            (work / "store" / "signatures.safetensors").unlink(missing_ok=True)
        if label == "open_after_add":  # one more task: only its file is read
            premoe.calibrate(lm, work / "add.jsonl", "add-again", work / "store", progress=False)
        t0 = time.perf_counter()
        router = QueryRouter(TINY_MODEL, work / "store")
        timings[label] = time.perf_counter() - t0
    prompts = [s["prompt"] for t in TASKS for s in samples(t, 20, "eval")]
    sigs = [router.signature_model.signature(p) for p in prompts]
    search, full = [], []
    for p, g in zip(prompts, sigs):
        t0 = time.perf_counter()
        router.retriever.route(g)
        search.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        router.route(p)
        full.append(time.perf_counter() - t0)
    truth = [t for t in TASKS for _ in range(20)]
    correct = sum(router.route(p).task in (t, f"{t}-again") for p, t in zip(prompts, truth))
    return {
        "tasks": len(router.retriever.names),
        "store_build_seconds": build,
        **timings,
        "search_ms": 1000 * statistics.median(search),
        "route_ms": 1000 * statistics.median(full),
        "accuracy_among_all": correct / len(prompts),
    }


def report(q: dict | None, s: dict | None, sc: dict | None = None) -> None:
    mb = 2**20
    if q:
        print(f"routing accuracy on {q['queries']} held-out built-in prompts: {q['routing_accuracy']:.3f}")
        print(
            f"end-to-end exact match at keep {q['keep']}: retrieved pattern {q['e2e_retrieved']:.3f}, "
            f"oracle pattern {q['e2e_oracle']:.3f} (difference "
            f"{100 * (q['e2e_oracle'] - q['e2e_retrieved']):.1f} points)"
        )
    if sc:
        print(
            f"\nstore of {sc['tasks']} tasks: opened in {sc['open_cold']:.2f}s without its key cache, "
            f"{sc['open_cached']:.2f}s "
            f"with it, {sc['open_after_add']:.2f}s after one more task was added (signature model build "
            f"included); per query: search {sc['search_ms']:.2f} ms, signature + search "
            f"{sc['route_ms']:.1f} ms; built-in prompts still routed right among all: {sc['accuracy_among_all']:.3f}"
        )
    if not s:
        return
    sv, d, ld = s["serve"], s["dense"], s["load"]
    ideal = sv["ideal"]["total"]
    print(
        f"\ngenerated Qwen3-MoE: {s['checkpoint_bytes'] / mb:.0f} MB, {s['layers']} MoE layers x {s['experts']} "
        f"experts, keep {s['keep']}"
    )
    print(
        f"bytes read, first prompt: {sv['bytes_read'] / mb:.1f} MB vs ideal {ideal / mb:.1f} MB "
        f"(non-expert {sv['ideal']['non_expert'] / mb:.1f} + experts {sv['ideal']['experts'] / mb:.1f}): "
        f"{sv['bytes_read'] / ideal:.4f}x (all router rows are kept for switching: "
        f"{(sv['ideal_full_routers'] - ideal) / mb:.1f} MB)"
    )
    goal = ideal * 1.15 + 300 * mb
    print(
        f"peak RSS serving: {sv['peak_rss'] / mb:.0f} MB (after imports {sv['rss_after_imports'] / mb:.0f} MB) vs goal "
        f"ideal*1.15+300MB = {goal / mb:.0f} MB; dense model peak {d['peak_rss'] / mb:.0f} MB "
        f"({sv['peak_rss'] / d['peak_rss']:.2f}x of dense)"
    )
    print(
        f"pattern load: {ld['load_bytes'] / mb:.0f} MB in {ld['load_seconds']:.3f}s vs the same {ld['reads']} "
        "reads raw into new "
        f"memory {ld['raw_seconds']:.3f}s: {ld['raw_seconds'] / ld['load_seconds']:.2f} of raw throughput "
        f"(into already-resident memory, a pure copy: {ld['raw_resident_seconds']:.3f}s; medians of 5)"
    )
    print(
        f"task switch: read {sv['switch_bytes'] / mb:.1f} MB = experts missing from the held pattern "
        f"{sv['switch_missing_expert_bytes'] / mb:.1f} MB ({sv['switch_experts_read']} read, "
        f"{sv['switch_experts_kept']} kept in memory)"
    )
    print(
        f"signature + retrieval: {1000 * sv['route_seconds']:.1f} ms vs full prefill of the same "
        f"{sv['prompt_tokens']}-token "
        f"prompt {1000 * sv['prefill_seconds']:.1f} ms: ratio {sv['route_seconds'] / sv['prefill_seconds']:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--keep-frac", type=float, default=0.5)
    ap.add_argument("--keep", type=int, default=16, help="experts kept per layer in the quality part")
    ap.add_argument("--queries", type=int, default=100, help="held-out prompts per task")
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--part", choices=("all", "quality", "systems", "scale"), default="all")
    ap.add_argument("--tasks", type=int, default=2000, help="tasks in the scale test's store")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    t0 = time.perf_counter()
    q = quality(args.keep, args.queries, args.calib) if args.part in ("all", "quality") else None
    s = systems(args.gb, args.keep_frac, args.workdir) if args.part in ("all", "systems") else None
    sc = scale(args.tasks) if args.part in ("all", "scale") else None
    report(q, s, sc)
    if args.json:
        args.json.write_text(json.dumps({"quality": q, "systems": s, "scale": sc}, indent=2, default=str))
    print(f"\n({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
