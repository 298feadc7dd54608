"""``torchrun -m premoe calibrate``: data-parallel calibration with torch.distributed (gloo) on this machine.

Properties: the statistics of 1, 2 and 3 ranks (and of two torchrun agents joined over 127.0.0.1 as two
nodes) equal one process's within 1e-6 relative, and so do the scores and kept sets; only rank 0 writes;
ranks that disagree (data) stop before any work with one line; a rank that dies leaves the others with one
line and the store untouched; verbs that are not data-parallel refuse torchrun in one line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import premoe
from premoe.assets import TINY_MODEL
from premoe.core.data import write_jsonl
from premoe.core.store import PatternStore
from premoe.core.tasks import samples

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PREMOE_DIST_TIMEOUT": "60"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_like_the_ranks():
    """One process's reference runs with the ranks' one torch thread: the bytes of a solve depend on how many
    threads split its reductions (2 threads against 1 changed exports' last bits on an AMD EPYC; the same count
    gives the same bytes run after run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, args: list[str], nnodes: int = 1, node_rank: int | None = None, port: int | None = None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
    if nnodes > 1:  # the cluster recipe's dynamic rendezvous (docs/distributed.md), on 127.0.0.1
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "premoe-test", "--rdzv-conf", "join_timeout=60"]
    else:
        cmd += ["--master-port", str(port or free_port())]
    return cmd + ["-m", "premoe", *args]


def cal_args(data: Path, store: Path, *extra: str) -> list[str]:
    base = ["-q", "calibrate", "--model", str(TINY_MODEL), "--data", str(data), "--task", "t", "--store", str(store)]
    return base + ["--batch-size", "4", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return write_jsonl(d / "t.jsonl", samples("add", 18, "calib") + samples("sort", 18, "calib"))


@pytest.fixture(scope="module")
def single_store(data, tmp_path_factory):
    """One process's calibration of the same data, batches of 4."""
    store = tmp_path_factory.mktemp("single") / "store"
    premoe.calibrate(TINY_MODEL, data, "t", store, batch_size=4, progress=False)
    return store


@pytest.fixture(scope="module")
def single(single_store):
    return PatternStore.open(single_store).load("t")


def assert_same_pattern(a, b) -> None:
    assert a.info["tokens"] == b.info["tokens"] and a.info["signature"] == b.info["signature"]
    for name in a.means:
        x, y = a.means[name].double(), b.means[name].double()
        assert float(((x - y).abs() / x.abs().clamp_min(1e-12)).max()) <= 1e-6, name
    for name in a.signature:
        torch.testing.assert_close(a.signature[name], b.signature[name], rtol=1e-6, atol=1e-12)
    assert torch.equal(
        torch.argsort(a.scores, descending=True, stable=True), torch.argsort(b.scores, descending=True, stable=True)
    )


@pytest.mark.parametrize("n", [2, 3])
def test_statistics_do_not_depend_on_the_number_of_ranks(n, data, single, single_store, tmp_path):
    """36 samples in batches of 4 are 9 batches: 3 ranks get 3 each, 2 ranks 5 and 4."""
    store = tmp_path / "store"
    run = subprocess.run(torchrun(n, cal_args(data, store)), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("calibrated task") == 1  # rank 0 reports, the others stay quiet
    assert_same_pattern(single, PatternStore.open(store).load("t"))
    for keep in (16, 8, 4):  # the same kept experts from either store
        one, many = (premoe.plan(TINY_MODEL, s, "t", keep, progress=False).kept for s in (single_store, store))
        assert one == many


def test_streamed_calibration_is_data_parallel_too(data, single, tmp_path):
    store = tmp_path / "store"
    run = subprocess.run(torchrun(2, cal_args(data, store, "--stream")), capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    got = PatternStore.open(store).load("t")
    assert got.info["streamed"] is True
    assert_same_pattern(single, got)


@pytest.mark.parametrize("extra", [[], ["--share-layers"]], ids=["in-memory", "shared-layers"])
def test_two_nodes_on_one_machine_give_the_same_result(extra, data, single, tmp_path):
    """Two torchrun agents (``--nnodes 2``), one process each, meeting at 127.0.0.1. With ``--share-layers`` each
    node's only rank is that node's first: each builds its own layers."""
    store, port = tmp_path / "store", free_port()
    procs = [
        subprocess.Popen(
            torchrun(1, cal_args(data, store, *extra), nnodes=2, node_rank=r, port=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for r in (0, 1)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert_same_pattern(single, PatternStore.open(store).load("t"))


def test_ranks_of_a_node_share_one_copy_of_each_layer(data, tmp_path):
    """``--share-layers``: streamed, the node's first rank builds each layer into shared memory and every rank maps
    it; the statistics are one process's, and nothing is left in the shared directory. 36 samples in batches of
    32 are 2 batches: the third rank has none and still takes part in every hand-over."""
    shm = tmp_path / "shm"
    shm.mkdir()
    one = premoe.calibrate(TINY_MODEL, data, "t", tmp_path / "one", batch_size=32, stream=True, progress=False)
    args = cal_args(data, tmp_path / "three", "--share-layers")
    args[args.index("--batch-size") + 1] = "32"
    env = {**ENV, "PREMOE_SHARE_DIR": str(shm)}
    run = subprocess.run(torchrun(3, args), capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = PatternStore.open(tmp_path / "three").load("t")
    assert got.info["streamed"] is True
    assert_same_pattern(PatternStore.open(tmp_path / "one").load("t"), got)
    assert one.info["tokens"] == got.info["tokens"]
    assert not any(shm.iterdir())


def test_shared_layers_are_mapped_copy_on_write(tmp_path):
    """What the first rank publishes, every rank maps: the same values, ties kept, non-persistent buffers left to
    each rank; a rank writing into its mapping changes only its own copy."""
    from torch import nn

    from premoe.core.node_share import attach, publish

    def make() -> nn.Module:
        m = nn.Sequential(nn.Linear(6, 4, bias=True), nn.LayerNorm(4), nn.Linear(4, 6, bias=False))
        m[0].register_buffer("steps", torch.arange(3), persistent=True)
        m[0].register_buffer("cache", torch.ones(2), persistent=False)
        return m

    torch.manual_seed(0)
    built = make()
    built[2].weight = nn.Parameter(built[0].weight.detach().T.contiguous())  # a second tensor ...
    built[1].weight = built[0].bias  # ... and one tied within the module
    want = {k: v.clone() for k, v in built.state_dict().items()}
    path = tmp_path / "0.bin"
    publish(built, path)
    assert all(torch.equal(built.state_dict()[k], v) for k, v in want.items())
    a, b = make().to("meta"), make().to("meta")
    a[1].weight, b[1].weight = a[0].bias, b[0].bias
    for m in (a, b):
        attach(m, path)
        assert all(torch.equal(m.state_dict()[k], v) for k, v in want.items() if k != "0.cache")
        assert m[0].cache.is_meta  # not shared: each rank computes it
    with torch.no_grad():
        a[0].weight.add_(1.0)
    assert torch.equal(b[0].weight, want["0.weight"]) and not torch.equal(a[0].weight, b[0].weight)


def test_shared_layers_refuse_gpu_runs():
    from premoe.core.distributed import World
    from premoe.core.node_share import node_share
    from premoe.errors import InputError

    assert node_share(World(0, 1), True, "cpu") is None  # one process: nothing to share
    assert node_share(World(0, 2), False, "cpu") is None
    with pytest.raises(InputError, match="drop `--share-layers`"):
        node_share(World(0, 2), True, "cuda:0")


def test_sweep_is_data_parallel_and_writes_what_one_process_writes(tmp_path):
    """``torchrun -m premoe sweep``: every calibration, evaluation and perplexity split across the ranks, the same
    rows as one process's; rank 0 alone prints and writes."""
    kw = {"keeps": [16, 8], "scorers": ["tcess", "easyep"], "calib_samples": 8, "eval_samples": 12}
    one = premoe.sweep(tmp_path / "one", progress=False, **kw)
    args = ["-q", "sweep", "--out", str(tmp_path / "two"), "--keep", "16", "8", "--scorers", "tcess", "easyep",
            "--calib-samples", "8", "--eval-samples", "12", "--json"]  # fmt: skip
    run = subprocess.run(torchrun(2, args), capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.strip().splitlines()) == 1  # one JSON line, from rank 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert len(one["rows"]) == len(two["rows"]) > 0
    for a, b in zip(one["rows"], two["rows"]):
        assert {k: v for k, v in a.items() if k not in ("nll_sum", "perplexity")} == {
            k: v for k, v in b.items() if k not in ("nll_sum", "perplexity")
        }
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-9)
    stores = [PatternStore.open(tmp_path / d / "work" / "store") for d in ("one", "two")]
    assert sorted(stores[0].tasks) == sorted(stores[1].tasks) == sorted(one["tasks"])
    for task in one["tasks"]:
        assert_same_pattern(stores[0].load(task), stores[1].load(task))


@pytest.mark.parametrize("extra", [[], ["--share-layers"]], ids=["in-memory", "shared-layers"])
def test_dense_calibration_and_prune_are_data_parallel(extra, data, tmp_path):
    """Dense models (SEAP): 3 ranks' activation statistics and retrieval key equal one process's, and the pruned
    export with its re-fit (Gram matrices added in rank order on rank 0) answers as one process's: the same
    tensors and config, log-probabilities within 1e-2 and the same greedy tokens. Not byte for byte: the float64
    sums associate differently (ranks' partial sums, then added), and the re-fit's solve amplifies the last bit
    of its float32 Gram matrices (on an AMD EPYC, up to 170 of 32768 bf16 weights of an o_proj moved, by at most
    0.008; the log-probabilities by at most 0.003)."""
    from premoe.assets import TINY_DENSE

    stream = bool(extra)
    premoe.calibrate(TINY_DENSE, data, "t", tmp_path / "one", batch_size=4, stream=stream, progress=False)
    args = cal_args(data, tmp_path / "three", *extra)
    args[args.index("--model") + 1] = str(TINY_DENSE)
    run = subprocess.run(torchrun(3, args), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (PatternStore.open(tmp_path / d).load("t") for d in ("one", "three"))
    assert a.info["tokens"] == b.info["tokens"] and a.info["signature"] == b.info["signature"]
    assert b.info["streamed"] is stream
    for name in a.means:
        x, y = a.means[name].double(), b.means[name].double()
        assert float(((x - y).abs() / x.abs().clamp_min(1e-12)).max()) <= 1e-6, name
    torch.testing.assert_close(a.signature["prompt.hidden"], b.signature["prompt.hidden"], rtol=1e-6, atol=1e-7)
    if stream:
        return
    premoe.prune(TINY_DENSE, tmp_path / "one", task="t", out=tmp_path / "p1", sparsity=0.5, progress=False)
    prune = ["-q", "prune", "--model", str(TINY_DENSE), "--store", str(tmp_path / "one"), "--task", "t",
             "--sparsity", "0.5", "--out", str(tmp_path / "p3")]  # fmt: skip
    run = subprocess.run(torchrun(3, prune), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("re-fitted") == 1  # rank 0 reports
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from premoe.core.config import load_tokenizer

    one, three = (load_file(tmp_path / d / "model.safetensors") for d in ("p1", "p3"))
    assert one.keys() == three.keys()
    assert all(t.dtype == three[k].dtype and t.shape == three[k].shape for k, t in one.items())
    assert (tmp_path / "p1" / "config.json").read_text() == (tmp_path / "p3" / "config.json").read_text()
    tok = load_tokenizer(tmp_path / "p1")
    texts = [s["prompt"] + s["completion"] for t in ("add", "sort") for s in samples(t, 4, "eval")]
    enc = tok(texts, return_tensors="pt", padding=True)
    counted = enc["attention_mask"].bool()
    with torch.inference_mode():
        a, b = (
            AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32)(**enc).logits.log_softmax(-1)
            for d in ("p1", "p3")
        )
    assert float((a - b).abs()[counted].max()) <= 1e-2
    assert torch.equal(a.argmax(-1)[counted], b.argmax(-1)[counted])


def test_dense_sweep_is_data_parallel(tmp_path):
    from premoe.assets import TINY_DENSE

    kw = {"sparsities": [0.5], "methods": ["seap", "flap"], "calib_samples": 8, "eval_samples": 12}
    one = premoe.sweep(tmp_path / "one", model=TINY_DENSE, progress=False, **kw)
    args = ["-q", "sweep", "--out", str(tmp_path / "two"), "--model", str(TINY_DENSE), "--sparsities", "0.5",
            "--methods", "seap", "flap", "--calib-samples", "8", "--eval-samples", "12", "--json"]  # fmt: skip
    run = subprocess.run(torchrun(2, args), capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert len(one["rows"]) == len(two["rows"]) > 0 and one["routing"] == two["routing"]
    for a, b in zip(one["rows"], two["rows"]):
        assert {k: v for k, v in a.items() if k not in ("nll_sum", "perplexity")} == {
            k: v for k, v in b.items() if k not in ("nll_sum", "perplexity")
        }
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-6), (a["method"], a["task"])


def rank_env(rank: int, size: int, port: int) -> dict[str, str]:
    """What torchrun sets for one process of a job (to start ranks by hand with different arguments)."""
    return {
        **ENV,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_WORLD_SIZE": str(size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PREMOE_DIST_TIMEOUT": "20",
    }


def test_ranks_with_different_data_stop_before_any_work(data, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", samples("reverse", 36, "calib"))
    port, store = free_port(), tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "premoe", *cal_args(d, store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=rank_env(r, 2, port),
        )
        for r, d in ((0, data), (1, other))
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert "differs from rank 0 in data" in line and "same model, data and flags" in line, line
    assert not store.exists() or not any((store / "tasks").glob("*"))


def test_a_rank_that_dies_stops_the_others_with_one_line_and_writes_nothing(data, tmp_path):
    port, store = free_port(), tmp_path / "store"
    crash = (
        "import datetime, os, torch.distributed as d;"
        "d.init_process_group('gloo', timeout=datetime.timedelta(seconds=20)); os._exit(1)"
    )
    main = subprocess.Popen(
        [sys.executable, "-m", "premoe", *cal_args(data, store)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=rank_env(0, 2, port),
    )
    dead = subprocess.run([sys.executable, "-c", crash], env=rank_env(1, 2, port), timeout=120)
    _, err = main.communicate(timeout=120)
    assert dead.returncode == 1 and main.returncode == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("premoe: error (rank 0): rank 0 of 2:") and "nothing was written" in line, line
    assert not (store / "tasks").exists() or not any((store / "tasks").glob("*"))


def test_verbs_that_are_not_data_parallel_refuse_torchrun(tmp_path):
    """``inspect`` does not run data-parallel."""
    run = subprocess.run(
        torchrun(2, ["inspect", "--store", str(tmp_path)]), capture_output=True, text=True, env=ENV, timeout=120
    )
    assert run.returncode != 0
    assert "`premoe inspect` does not run under torchrun" in run.stderr


@pytest.mark.parametrize("stream", [False, True])
def test_recon_and_all_stats_are_data_parallel(stream, data, tmp_path):
    """The ``recon`` scorer's token budget spans the ranks: rank 0 gathers the first tokens in one process's batch
    order, eliminates, and every rank gets the scores; every statistic of ``--all-stats`` equals one process's."""
    extra = ["--all-stats", "--scorer", "recon", *(["--stream"] if stream else [])]
    premoe.calibrate(TINY_MODEL, data, "t", tmp_path / "one", batch_size=4, scorer="recon", all_stats=True,
                     stream=stream, progress=False)  # fmt: skip
    run = subprocess.run(torchrun(2, cal_args(data, tmp_path / "two", *extra)), capture_output=True, text=True,
                         env=ENV, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (PatternStore.open(tmp_path / d).load("t") for d in ("one", "two"))
    assert "recon" in a.means and "weights" in a.means
    assert_same_pattern(a, b)
    assert torch.equal(a.means["recon"], b.means["recon"])


def test_eval_is_data_parallel_and_equals_one_process(data, single_store, tmp_path):
    """Generation batches and perplexity chunks split across 2 and 3 ranks: the same exact match, and the
    perplexity within float64 rounding, on the dense model and on a pattern applied on the fly."""
    import json

    evals = write_jsonl(tmp_path / "eval.jsonl", samples("add", 10, "eval") + samples("sort", 9, "eval"))
    for n, extra in ((2, []), (3, ["--store", str(single_store), "--task", "t", "--keep", "8", "--no-refit"])):
        args = ["-q", "eval", "--model", str(TINY_MODEL), "--data", str(evals), "--perplexity", str(evals)]
        args += ["--batch-size", "4", "--json", *extra]
        one = premoe.evaluate(
            TINY_MODEL, evals, perplexity=evals, batch_size=4, progress=False,
            **({"store": single_store, "task": "t", "keep": 8, "refit": False} if extra else {}),
        )  # fmt: skip
        run = subprocess.run(torchrun(n, args), capture_output=True, text=True, env=ENV, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        assert len(lines) == 1  # rank 0 prints
        got = json.loads(lines[0])
        assert got["exact_match"] == one["exact_match"] and got["perplexity_tokens"] == one["perplexity_tokens"]
        assert abs(got["nll"] - one["nll"]) <= 1e-9 * abs(one["nll"])


def test_prune_s_refit_pass_is_data_parallel_and_the_export_is_identical(single_store, tmp_path):
    """The default prune's re-fit and GPTQ's Gram matrices (``--quantize w4a16``) over 3 ranks: each runs its share
    of the texts, rank 0 gathers the tokens in one process's order, solves and writes: the same bytes."""
    one = tmp_path / "one"
    premoe.prune(TINY_MODEL, single_store, "t", 8, one, progress=False, quantize="w4a16")
    args = ["-q", "prune", "--model", str(TINY_MODEL), "--store", str(single_store), "--task", "t", "--keep", "8"]
    args += ["--out", str(tmp_path / "many"), "--quantize", "w4a16"]
    run = subprocess.run(torchrun(3, args), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("pruned to") == 1 and "re-fitted on" in run.stdout
    assert (one / "model.safetensors").read_bytes() == (tmp_path / "many" / "model.safetensors").read_bytes()


def test_stored_refits_are_data_parallel(single_store, tmp_path):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(single_store, a)
    shutil.copytree(single_store, b)
    premoe.refit(TINY_MODEL, a, [8, 4], progress=False)
    args = ["-q", "refit", "--model", str(TINY_MODEL), "--store", str(b), "--keep", "8", "4"]
    run = subprocess.run(torchrun(2, args), capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("stored re-fitted rows") == 2
    files = sorted(p.relative_to(a) for p in a.rglob("layer*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("layer*.safetensors"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_calibrate_with_refit_keep_is_data_parallel(data, single_store, tmp_path):
    """``calibrate --refit-keep``: the data-parallel calibration, then the data-parallel re-fit from the store rank 0
    has just written; the stored re-fits are byte for byte those of one process re-fitting the same store."""
    import shutil

    a = tmp_path / "a"
    shutil.copytree(single_store, a)
    premoe.refit(TINY_MODEL, a, [8], progress=False)
    run = subprocess.run(torchrun(2, cal_args(data, tmp_path / "b", "--refit-keep", "8")), capture_output=True,
                         text=True, env=ENV, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("stored re-fitted rows") == 1
    b = tmp_path / "b"
    files = sorted(p.relative_to(a) for p in a.rglob("layer*.safetensors"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("layer*.safetensors"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


STREAMED = """
import sys
from safetensors.torch import save_file
from premoe.core.config import load_tokenizer
from premoe.core.data import refit_sources
from premoe.core.distributed import world
from premoe.core.options import RunOptions
from premoe.core.store import PatternStore
from premoe.moe.model import inspect_model
from premoe.moe.options import MoeSelection
from premoe.moe.patterns import load_pattern, plan_from_pattern
from premoe.moe.refit_checkpoint import refit_model

model, store, out = sys.argv[1:4]
info, st = inspect_model(model), PatternStore.open(store)
plan = plan_from_pattern(info, load_pattern(st, "t", False), MoeSelection(keep=8).resolve(info.router))
sources, about = refit_sources(st.tasks, ["t"], None)
w = world()
got = refit_model(info, plan, load_tokenizer(model), sources, about=about, stream=True,
                  run=RunOptions(device="cpu", batch_size=3, progress=False), shard=w)
if w.main:
    save_file({f"{l}.{e}": got.get(l, e).contiguous() for l, es in got.experts.items() for e in es}, out)
"""


def test_streamed_refit_is_data_parallel(single_store, tmp_path):
    """One decoder layer at a time: every rank streams its batches through the layer, rank 0 gathers the layer's
    tokens, solves, and the stream moves on; the rows equal one streamed process's."""
    script = tmp_path / "streamed.py"
    script.write_text(STREAMED)
    base = [str(script), str(TINY_MODEL), str(single_store)]
    kw = dict(capture_output=True, text=True, env=ENV, timeout=300)
    one = subprocess.run([sys.executable, *base, str(tmp_path / "one.safetensors")], **kw)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    many = subprocess.run(cmd + [*base, str(tmp_path / "many.safetensors")], **kw)
    assert many.returncode == 0, many.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "many.safetensors")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rank_that_hangs_stops_the_others_within_the_timeout(data, tmp_path):
    port, store = free_port(), tmp_path / "store"
    hang = (
        "import datetime, time, torch.distributed as d;"
        "d.init_process_group('gloo', timeout=datetime.timedelta(seconds=60)); time.sleep(60)"
    )
    env = {**rank_env(0, 2, port), "PREMOE_DIST_TIMEOUT": "5"}
    stuck = subprocess.Popen([sys.executable, "-c", hang], env=rank_env(1, 2, port))
    import time

    time.sleep(3)  # the stuck rank is waiting to join before rank 0 starts: the 5 s is the collective's, not the join's
    main = subprocess.Popen(
        [sys.executable, "-m", "premoe", *cal_args(data, store)], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        _, err = main.communicate(timeout=120)
    finally:
        stuck.kill()
    line = err.strip().splitlines()[-1]
    assert main.returncode == 2 and "Traceback" not in err
    assert "a peer rank stopped or timed out" in line and "nothing was written" in line, line
    assert not (store / "tasks").exists() or not any((store / "tasks").glob("*"))


RECON = """
import sys, torch
from safetensors.torch import save_file
from premoe.assets import TINY_MODEL
from premoe.core.distributed import SINGLE, world
from premoe.moe.model import inspect_model
from premoe.moe.recon import LayerRecon

spec = inspect_model(TINY_MODEL).router
D, S = 8, spec.width
w = world() if sys.argv[2] == "many" else SINGLE
rec = LayerRecon(spec, tokens=50, shard=w)  # 7 batches of 11 tokens: the budget cuts the fifth
weights = torch.randn(S, D, D, generator=torch.Generator().manual_seed(0))
for b in w.share(range(7)):
    g = torch.Generator().manual_seed(100 + b)
    h = torch.randn(11, D, generator=g)
    rec.add(lambda e, x: x @ weights[e], h, torch.randn(11, S, generator=g), None, torch.randn(11, D, generator=g),
            torch.randn(11, D, generator=g))
scores = rec.finish()
if w.main:
    save_file({"scores": scores.contiguous()}, sys.argv[1])
"""


def test_recon_budget_is_cut_in_one_process_s_batch_order(tmp_path):
    """Seven batches of 11 tokens and a budget of 50 over 3 ranks: the scores equal one process's, which saw
    batches 0-3 whole and 6 tokens of batch 4."""
    from safetensors.torch import load_file

    script = tmp_path / "recon.py"
    script.write_text(RECON)
    kw = dict(capture_output=True, text=True, env=ENV, timeout=300)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.safetensors"), "one"], **kw)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port", str(free_port())]
    many = subprocess.run(cmd + [str(script), str(tmp_path / "many.safetensors"), "many"], **kw)
    assert many.returncode == 0, many.stderr[-3000:]
    a, b = load_file(tmp_path / "one.safetensors")["scores"], load_file(tmp_path / "many.safetensors")["scores"]
    assert torch.equal(a, b)


def test_shared_layers_say_when_shared_memory_is_full(tmp_path, monkeypatch):
    """A tmpfs without room for a layer is one line naming the fix, not a crash when the mapping is written."""
    from torch import nn

    from premoe.core import node_share
    from premoe.errors import InputError

    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node_share.os, "posix_fallocate", full)
    with pytest.raises(InputError, match="PREMOE_SHARE_DIR to a larger tmpfs directory"):
        node_share.publish(nn.Linear(4, 4), tmp_path / "0.bin")
