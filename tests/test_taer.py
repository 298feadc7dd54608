"""TAER: signatures, retrieval, selective loading, runtime task switching and the serving CLI."""

import json

import pytest
import torch
from expected import ROUTING_ACCURACY, ROUTING_MARGIN

import premoe
from premoe.assets import TINY_MODEL
from premoe.cli import main
from premoe.core.data import write_jsonl
from premoe.core.options import SignatureSpec
from premoe.core.retrieval import Retriever
from premoe.core.store import PatternStore
from premoe.core.tasks import TASKS, samples
from premoe.errors import InputError, StoreError
from premoe.moe.loading import load_model
from premoe.moe.model import inspect_model
from premoe.moe.router import QueryRouter
from premoe.moe.selective import ByteReader, build_model, ideal_bytes
from premoe.moe.server import ExpertCache, TaskServer
from premoe.moe.surgery import apply_plan_
from premoe.testing import FAMILIES, TWO_TASKS, state_equal
from premoe.testing import build_model as build_tiny

A = TWO_TASKS["a"]


def test_selective_build_from_sharded_checkpoint(tmp_path):
    model, tok = build_tiny(*FAMILIES["deepseek_v3"][:2])
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="60KB")
    tok.save_pretrained(src)
    assert len(list(src.glob("*.safetensors"))) > 2
    premoe.calibrate(src, write_jsonl(tmp_path / "a.jsonl", A), "a", tmp_path / "s", progress=False)
    info = inspect_model(src)
    plan = premoe.plan(info, tmp_path / "s", "a", 4)
    with ByteReader() as r:
        built = build_model(info, plan, r)
    apply_plan_(model, info.spec, plan)
    assert state_equal(built, model)


def test_first_prompt_reads_exactly_the_ideal_bytes(two_tasks):
    src, store = two_tasks("qwen3_moe")
    server = TaskServer(src, store, 4)
    reply = server.generate("add 3+4=", max_new_tokens=3)
    assert reply.switched and reply.experts_per_layer == 4
    assert reply.bytes_read == ideal_bytes(server.info, server.plan_for(reply.task), full_routers=True)["total"]
    again = server.generate("add 5+4=", max_new_tokens=3)
    assert again.task == reply.task and again.bytes_read == 0 and not again.switched


def test_expert_cache_serves_switches_back(two_tasks):
    src, store = two_tasks("mixtral")
    server = TaskServer(src, store, 4, cache_bytes=10 * 2**20)
    server.load("a")
    server.load("b")
    back = server.load("a")
    assert back.bytes_read == 0 and back.experts_read == 0 and back.experts_from_cache > 0
    with ByteReader() as r:
        assert state_equal(server.model, build_model(server.info, server.plan_for("a"), r))


def test_expert_cache_is_lru_under_budget():
    cache = ExpertCache(budget_bytes=3 * 400)

    def row(v):
        return {"w": torch.full((100,), float(v))}  # 400 bytes

    for i in range(3):
        cache.put((0, i), row(i))
    assert cache.pop((0, 0))["w"][0] == 0  # hit, removed
    cache.put((0, 3), row(3))
    cache.put((0, 4), row(4))  # evicts the least recently used: (0, 1)
    assert (0, 1) not in cache and (0, 2) in cache and cache.bytes <= cache.budget
    cache.put((0, 9), {"w": torch.zeros(1000)})  # larger than the budget: not cached
    assert (0, 9) not in cache
    assert ExpertCache(0).budget == 0


@pytest.fixture(scope="module")
def builtin_store(tmp_path_factory):
    work = tmp_path_factory.mktemp("builtin")
    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    for t in TASKS:
        premoe.calibrate(
            lm, write_jsonl(work / f"{t}.jsonl", samples(t, 32, "calib")), t, work / "store", progress=False
        )
    return work / "store"


def test_routing_on_the_builtin_suite(builtin_store):
    prompts, truth = [], []
    for t in TASKS:
        for s in samples(t, 40, "eval"):
            prompts.append(s["prompt"])
            truth.append(t)
    results, nbytes = premoe.route(TINY_MODEL, builtin_store, prompts)
    acc = sum(r.task == t for r, t in zip(results, truth)) / len(truth)
    assert acc >= ROUTING_ACCURACY
    # every prompt won by a clear margin over the runner-up (distances are sorted, so margin >= 0 always holds)
    assert all(r.second != r.task and r.margin == pytest.approx(r.second_distance - r.distance) for r in results)
    assert min(r.margin for r in results) > ROUTING_MARGIN
    assert nbytes < inspect_model(TINY_MODEL).checkpoint.nbytes / 4


def test_retrieval_finds_nearest_among_thousands():
    gen = torch.Generator().manual_seed(0)
    table = torch.rand(5000, 2, 16, generator=gen)
    names = [f"t{i}" for i in range(5000)]
    r = Retriever(names, table, SignatureSpec(layers=2))
    res = r.route_stats(table[[17, 4242]] + 1e-4)
    assert [x.task for x in res] == ["t17", "t4242"]
    assert res[0].distance < res[0].second_distance


def test_store_of_another_model_empty_store_and_empty_query(two_tasks, family_dir, tmp_path):
    src, store = two_tasks("qwen2_moe")
    with pytest.raises(StoreError, match="built for another model"):
        QueryRouter(family_dir("olmoe"), store)
    with pytest.raises(StoreError, match="built for another model"):
        TaskServer(family_dir("olmoe"), store, 4)
    router = QueryRouter(src, store)
    for bad in ("", "   "):
        with pytest.raises(InputError, match="empty"):
            router.route(bad)
    with pytest.raises(InputError, match="layers"):
        QueryRouter(src, PatternStore.open(store), SignatureSpec(layers=9))
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["tasks"] = {}
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="no tasks"):
        QueryRouter(src, store)


def test_key_table_cache_reads_only_new_tasks(two_tasks, monkeypatch, tmp_path):
    src, store = two_tasks("mixtral")
    st = PatternStore.open(store)
    names, table = st.signature_table("prompt.prob")
    assert names == ["a", "b"] and (store / "signatures.safetensors").is_file()
    premoe.calibrate(src, write_jsonl(tmp_path / "c.jsonl", A[:1]), "c", store, progress=False)
    loaded = []
    real_load = PatternStore.load
    monkeypatch.setattr(PatternStore, "load", lambda self, task: loaded.append(task) or real_load(self, task))
    names2, table2 = PatternStore.open(store).signature_table("prompt.prob")
    assert names2 == ["a", "b", "c"] and loaded == ["c"]  # unchanged tasks come from the cache
    assert torch.equal(table2[:2], table) and torch.equal(table2[2], real_load(st, "c").signature["prompt.prob"])
    loaded.clear()
    assert torch.equal(PatternStore.open(store).signature_table("prompt.prob")[1], table2) and not loaded


def test_keys_are_limited_to_calibrated_layers(two_tasks):
    src, store = two_tasks("mixtral")
    assert PatternStore.open(store).load("a").info["signature"]["layers"] == 3
    QueryRouter(src, store, SignatureSpec(layers=3)).route("add 1+1=")


def cli(capsys, *argv):
    capsys.readouterr()
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_route_and_generate(builtin_store, tmp_path, capsys):
    code, out, _ = cli(capsys, "route", "--model", TINY_MODEL, "--store", builtin_store, "add 12+30=")
    assert code == 0 and out.strip() == "add"
    code, out, _ = cli(capsys, "route", "--json", "--model", TINY_MODEL, "--store", builtin_store, "reverse abcdef=")
    obj = json.loads(out)
    assert obj["task"] == "reverse" and {"distance", "margin"} <= set(obj)
    data = write_jsonl(
        tmp_path / "q.jsonl", [{"prompt": "sort 9321="}, {"text": "shift abc="}, {"prompt": "sort 541="}]
    )
    code, out, _ = cli(capsys, "route", "--model", TINY_MODEL, "--store", builtin_store, "--data", data)
    assert out.split() == ["sort", "shift", "sort"]
    code, out, _ = cli(
        capsys,
        "generate",
        "--json",
        "--model",
        TINY_MODEL,
        "--store",
        builtin_store,
        "--keep",
        16,
        "--max-new-tokens",
        8,
        "--data",
        data,
    )
    replies = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["task"] for r in replies] == ["sort", "shift", "sort"]
    assert [r["text"] for r in replies] == ["1239", "bcd", "145"]
    assert replies[0]["bytes_read"] > replies[1]["bytes_read"] > 0 and replies[2]["experts_per_layer"] == 16
    assert replies[1]["switched"] and replies[2]["switched"]


def test_cli_chat_switches_with_the_topic(builtin_store, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("add 2+3=\n/task\nreverse abc=\nreverse wxyz=\n/exit\n"))
    code, out, _ = cli(
        capsys, "chat", "--model", TINY_MODEL, "--store", builtin_store, "--keep", 16, "--max-new-tokens", 6
    )
    assert code == 0
    replies = [line.split("] ")[0].lstrip("> ") + "]" for line in out.splitlines() if line.lstrip("> ").startswith("[")]
    assert replies == ["[add]", "[reverse]", "[reverse]"]
    assert "(current task: add)" in out and "[reverse] zyxw" in out
    assert out.count("switched to") == 2  # a topic change switches experts; the same topic does not


@pytest.mark.parametrize(
    "argv, match",
    [
        (["route", "--model", TINY_MODEL, "--store", "STORE"], "give either QUERY or --data"),
        (["route", "--model", TINY_MODEL, "--store", "STORE", "   "], "the query is empty"),
        (["generate", "--model", TINY_MODEL, "--store", "STORE", "--keep", 1, "x"], "below the 2 experts"),
        (["route", "--model", TINY_MODEL, "--store", "NOSTORE", "x"], "no pattern store"),
    ],
)
def test_cli_serving_errors(builtin_store, tmp_path, capsys, argv, match):
    argv = [str(builtin_store) if a == "STORE" else str(tmp_path / "none") if a == "NOSTORE" else a for a in argv]
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == "" and match in err and len(err.strip().splitlines()) == 1


def test_batched_signatures_equal_one_at_a_time(tmp_path):
    """A queue routed in one padded forward gets each text's own signature (float32: to rounding) and task;
    a text that cannot be routed gets its error in its place without failing the others."""
    task_samples = samples
    store = tmp_path / "store"
    for t in ("add", "sort"):
        premoe.calibrate(
            TINY_MODEL, write_jsonl(tmp_path / f"{t}.jsonl", task_samples(t, 16, "calib")), t, store, progress=False
        )
    router = QueryRouter(TINY_MODEL, store, dtype="float32")
    texts = [r["prompt"] for t in ("add", "sort") for r in task_samples(t, 6, "eval")]
    texts = texts[:3] + [" ", *texts[3:]]
    batched = router.signature_model.signatures(texts, budget=64)  # a small budget: several batches
    routed = router.route_many(texts)
    for text, sig, r in zip(texts, batched, routed):
        if not text.strip():
            assert isinstance(sig, InputError) and isinstance(r, InputError)
            continue
        alone = router.signature_model.signature(text)
        assert sig.keys() == alone.keys()
        assert all(torch.allclose(sig[k], alone[k], atol=1e-6) for k in sig)
        assert r.task == router.route(text).task
