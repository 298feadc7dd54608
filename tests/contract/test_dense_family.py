"""The dense family contract: every row of premoe.testing.DENSE_FAMILIES, built as its row's variant
(tied or untied head, bias flags, sharded or one file, storage dtype; the test id names it) and
calibrated on three tasks, goes through the same checks: byte-range builds equal in-memory slices for
every method, exports reload in vanilla transformers (plain and re-fitted), routing, evaluation,
generation, and task switches that equal fresh builds while reading only what is missing.

To add a family: a DenseSpec row in premoe/dense/families.py and a tiny config in
premoe.testing.DENSE_FAMILIES."""

import json

import pytest
import torch

import premoe
from premoe.core.checkpoint import TORCH_DTYPES, ByteReader
from premoe.core.data import write_jsonl
from premoe.core.options import RefitOptions
from premoe.core.tasks import samples
from premoe.dense.families import DENSE_SPECS
from premoe.dense.model import DensePlan, build_dense, check_plan, inspect_dense, kept_params, prune_in_memory
from premoe.dense.options import DenseSelection
from premoe.dense.patterns import dense_plan
from premoe.dense.switch import MIN_RUN_BYTES, read_columns, switch_dense
from premoe.testing import DENSE_FAMILIES, assert_same_dense, build_dense_family, dense_variant, switch_bytes

TASKS = ("add", "reverse", "sort")


def compensable(name: str) -> tuple[str, ...]:
    """The projections whose compensation bias the family's config can hold."""
    spec = DENSE_SPECS[name]
    return tuple(w for w, key in (("o", spec.attn_bias_key), ("down", spec.mlp_bias_key)) if key)


@pytest.fixture(scope="module", params=[pytest.param(n, id=f"{n}-{dense_variant(n)}") for n in DENSE_FAMILIES])
def dense_family(request, tmp_path_factory):
    """(name, model directory, store with the three built-in tasks) for every dense row, as its variant."""
    d = tmp_path_factory.mktemp(f"{request.param}-{dense_variant(request.param)}")
    model = build_dense_family(request.param, d / "model")
    for t in TASKS:
        premoe.calibrate(model, write_jsonl(d / f"{t}.jsonl", samples(t, 24, "calib")), t, d / "store", progress=False)
    return request.param, model, d / "store"


def test_built_as_its_variant(dense_family):
    """The checkpoint is what the row's variant (the test id) says: head tying, bias flags, shards, dtype."""
    from transformers import AutoModelForCausalLM

    from premoe.core.checkpoint import INDEX_NAME
    from premoe.testing import bias_keys

    name, model, _ = dense_family
    v = dense_variant(name)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["dtype"] == v.dtype and all(cfg[k] is v.bias for k in bias_keys(name))
    assert (model / INDEX_NAME).is_file() is v.sharded and (len(list(model.glob("*.safetensors"))) > 1) is v.sharded
    assert ("lm_head.weight" in inspect_dense(model).checkpoint.tensors) is not v.tied
    full = AutoModelForCausalLM.from_pretrained(model)
    assert (full.get_output_embeddings().weight.data_ptr() == full.get_input_embeddings().weight.data_ptr()) is v.tied


def test_prune_export_and_reload(dense_family, tmp_path):
    """Every dense row: the pruned model built from byte ranges equals the in-memory slice of the
    loaded model; the export is a plain checkpoint that vanilla transformers reloads to the same
    logits, with the parameter count and file size of the requested sparsity."""
    from transformers import AutoModelForCausalLM

    name, model, store = dense_family
    info = inspect_dense(model)
    full = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    x = torch.tensor([[1, 5, 6, 7, 8, 9]])
    for method in ("seap", "seap-gen", "wanda-sp", "flap", "random"):
        plan = dense_plan(info, store, "add", DenseSelection(0.5, method=method, bias_comp=False))
        with ByteReader() as reader:
            built = build_dense(info, plan, reader).float()
            assert reader.bytes_read < info.checkpoint.nbytes
        mem = prune_in_memory(full, info, plan)
        assert torch.allclose(built(x).logits, mem(x).logits, atol=1e-5), method
    plan = dense_plan(info, store, "add", 0.5)
    res = premoe.prune(model, store, "add", None, tmp_path / "out", sparsity=0.5, refit=False, progress=False)
    assert abs(res.sparsity - 0.5) < 0.05 and res.sparsity == plan.info["sparsity"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.allclose(reloaded(x).logits, prune_in_memory(full, info, plan)(x).logits, atol=1e-5)
    n_linear = sum(p.numel() for n, p in reloaded.named_parameters() if n.endswith("proj.weight"))
    assert n_linear == kept_params(info, plan)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["premoe"]["kind"] == "dense" and cfg["num_key_value_heads"] == len(plan.kv[0])
    assert res.bytes_written < 0.75 * res.bytes_source
    # --refit: re-fitted columns (and biases where the family's config can hold them) reload unchanged
    fitted = dense_plan(info, store, "add", 0.5, refit=RefitOptions(True), progress=False)
    premoe.prune(model, store, "add", None, tmp_path / "fit", sparsity=0.5, refit=True, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fit", dtype=torch.float32)
    assert torch.allclose(reloaded(x).logits, prune_in_memory(full, info, fitted)(x).logits, atol=5e-3)


def _random_plan(info, seed, comp=()) -> DensePlan:
    """Valid GQA plan with per-layer counts (whole KV groups dropped in some layers) and, where the
    family allows, compensation biases on some layers."""
    g = torch.Generator().manual_seed(seed)

    def pick(n, k):
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    heads, kv, ch, bias = {}, {}, {}, {}
    for l in range(info.num_layers):
        groups = pick(info.kv_heads, int(torch.randint(1, info.kv_heads + 1, (1,), generator=g)))
        r = [1, 2, 4][int(torch.randint(0, 3, (1,), generator=g))]
        heads[l] = sorted(grp * info.group + j for grp in groups for j in pick(info.group, r))
        kv[l] = groups
        ch[l] = pick(info.intermediate, int(torch.randint(1, info.intermediate + 1, (1,), generator=g)))
        for which in comp:
            if torch.rand((), generator=g) < 0.5:
                bias[f"{l}.{which}"] = torch.randn(info.hidden, generator=g)
    plan = DensePlan(heads, kv, ch, bias=bias, method="random", task=f"plan{seed}")
    check_plan(info, plan)
    return plan


@pytest.mark.parametrize("min_run_bytes", [0, MIN_RUN_BYTES, 10**9])
def test_switch_equals_fresh_build_and_reads_only_what_is_missing(dense_family, min_run_bytes):
    """A -> B -> A -> C over non-uniform plans (heads, KV groups, channels, compensation biases):
    every switched model is the fresh build, tensor for tensor, and reads the bytes the plans predict
    (B -> A: what B dropped), strictly fewer than a fresh build."""
    name, model, _ = dense_family
    info, comp = inspect_dense(model), compensable(name)
    a, b, c = (_random_plan(info, s, comp) for s in (1, 2, 3))
    with ByteReader() as reader:
        model = build_dense(info, a, reader)
        prev = a
        for plan in (b, a, c):
            before = reader.bytes_read
            model = switch_dense(model, info, prev, plan, reader, min_run_bytes)
            read = reader.bytes_read - before
            with ByteReader() as fresh_reader:
                fresh = build_dense(info, plan, fresh_reader)
            assert_same_dense(model, fresh)
            assert read == switch_bytes(info, prev, plan, min_run_bytes), (prev.task, plan.task)
            assert 0 < read < fresh_reader.bytes_read
            prev = plan
        before = reader.bytes_read
        model = switch_dense(model, info, c, c, reader, min_run_bytes)  # the same plan again: nothing to read
        assert reader.bytes_read == before
        assert_same_dense(model, build_dense(info, c, ByteReader()))


def test_column_reads_ranges_or_whole_rows(dense_family):
    """Long runs of columns are read as ranges (exactly their bytes); short runs read whole rows in
    chunks (the tensor's bytes, however small the chunk); both give the same values."""
    info = inspect_dense(dense_family[1])
    t = info.checkpoint.tensors[info.key(0, "down")]
    item = TORCH_DTYPES[t.dtype].itemsize
    ids = [3, 4, 5, 6, 40, 77, 78]
    full = info.checkpoint.tensor(t.name)
    with ByteReader() as r:
        ranged = read_columns(t, r, ids, min_run_bytes=0)
        assert r.bytes_read == len(ids) * item * t.shape[0]
    with ByteReader() as r:
        rows = read_columns(t, r, ids, min_run_bytes=10**9, chunk_bytes=3 * t.shape[1] * item)
        assert r.bytes_read == t.nbytes
    assert torch.equal(ranged, full[:, ids]) and torch.equal(rows, full[:, ids])


def test_route_serve_and_evaluate(dense_family, tmp_path):
    """Routing reads the embeddings and one layer, never the LM head (Llama-3 and Qwen2.5-7B untie it), and
    sends held-out prompts to their task; the task server answers each prompt as a fresh build of its
    task's plan would, switching only on a change of task; evaluation on the fly equals evaluating the
    export."""
    from premoe.core.evaluation import generate_greedy
    from premoe.dense.router import DenseRouter
    from premoe.dense.server import DenseServer

    name, model, store = dense_family
    info = inspect_dense(model)
    router = DenseRouter(model, store)
    assert router.bytes_read < info.checkpoint.nbytes / 2
    for t in TASKS:
        assert [r.task for r in router.route_many([s["prompt"] for s in samples(t, 5, "eval")])] == [t] * 5

    server = DenseServer(model, store, 0.3)
    for task, switched in (("sort", True), ("add", True), ("add", False)):
        prompt = samples(task, 2, "eval")[int(not switched)]["prompt"]
        reply = server.generate(prompt, max_new_tokens=4)
        assert (reply.task, reply.switched) == (task, switched)
        assert (reply.bytes_read > 0) == switched
        fresh = build_dense(info, server.plan(task), ByteReader())
        assert reply.text == generate_greedy(fresh, server.tokenizer, [prompt], 4)[0]

    rows = samples("add", 4, "eval") + [
        {"prompt": f"add {i}+{i}=", "choices": [str(2 * i), str(i), f"{i}{i}", "0"], "answer": 0} for i in range(1, 9)
    ]
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    premoe.prune(model, store, "add", None, tmp_path / "out", sparsity=0.5, refit=False, progress=False)
    exported = premoe.evaluate(tmp_path / "out", data, progress=False)
    on_the_fly = premoe.evaluate(model, data, store=store, task="add", sparsity=0.5, refit=False, progress=False)
    assert (exported["generate_samples"], exported["mc_samples"]) == (4, 8)
    assert (on_the_fly["exact_match"], on_the_fly["mc_accuracy"]) == (exported["exact_match"], exported["mc_accuracy"])


# -- one toggle at a time, through every verb it could break ---------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_head_tying_through_route_generate_and_prune(tied, tmp_path, capsys):
    """Llama-3, Mistral and Qwen2.5-7B keep an LM head of their own: `premoe route` and `premoe generate`
    work on it (the router's prefix model never loads the head), and the export stores the head only
    when it is untied, equal to the source's."""
    from transformers import AutoModelForCausalLM

    from premoe.cli import main
    from premoe.testing import Variant, build_dense_model

    model = build_dense_model(tmp_path / "m", "llama", variant=Variant(tied=tied))
    info = inspect_dense(model)
    assert ("lm_head.weight" in info.checkpoint.tensors) is not tied
    for t in TASKS:
        premoe.calibrate(
            model, write_jsonl(tmp_path / f"{t}.jsonl", samples(t, 24, "calib")), t, tmp_path / "s", progress=False
        )
    prompts = [samples(t, 1, "eval")[0]["prompt"] for t in TASKS]
    capsys.readouterr()
    assert main(["-q", "route", "--model", str(model), "--store", str(tmp_path / "s"), *prompts[:1]]) == 0
    assert capsys.readouterr().out.split() == ["add"]
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": p} for p in prompts])
    assert (
        main(
            [
                "-q",
                "generate",
                "--json",
                "--model",
                str(model),
                "--store",
                str(tmp_path / "s"),
                "--sparsity",
                "0.3",
                "--max-new-tokens",
                "3",
                "--data",
                str(data),
            ]
        )
        == 0
    )
    replies = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["task"] for r in replies] == list(TASKS) and all(r["switched"] for r in replies)

    premoe.prune(model, tmp_path / "s", "add", None, tmp_path / "out", sparsity=0.5, refit=False, progress=False)
    out = inspect_dense(tmp_path / "out")
    assert ("lm_head.weight" in out.checkpoint.tensors) is not tied
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    assert torch.equal(reloaded.get_output_embeddings().weight, full.get_output_embeddings().weight)
    head, emb = reloaded.get_output_embeddings().weight, reloaded.get_input_embeddings().weight
    assert (head.data_ptr() == emb.data_ptr()) is tied


def test_sharded_fp16_source_through_prune_and_reload(tmp_path):
    """A sharded float16 checkpoint: the export (plain, and re-fitted) keeps float16 for every tensor and
    reloads in vanilla transformers to the in-memory slice of the float16 model."""
    from transformers import AutoModelForCausalLM

    from premoe.core.checkpoint import INDEX_NAME
    from premoe.testing import Variant, build_dense_model

    model = build_dense_model(tmp_path / "m", "qwen2", variant=Variant(tied=False, sharded=True, dtype="float16"))
    assert (model / INDEX_NAME).is_file() and len(list(model.glob("*.safetensors"))) > 2
    premoe.calibrate(
        model, write_jsonl(tmp_path / "add.jsonl", samples("add", 24, "calib")), "add", tmp_path / "s", progress=False
    )
    info = inspect_dense(model)
    full = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    x = torch.tensor([[1, 5, 6, 7, 8, 9]])
    for refit in (False, True):
        out = tmp_path / f"out-{refit}"
        premoe.prune(model, tmp_path / "s", "add", None, out, sparsity=0.5, refit=refit, progress=False)
        assert {t.dtype for t in inspect_dense(out).checkpoint.tensors.values()} == {"F16"}
        assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
        plan = dense_plan(info, tmp_path / "s", "add", 0.5, refit=RefitOptions(refit), progress=False)
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        torch.testing.assert_close(
            reloaded(x).logits, prune_in_memory(full, info, plan)(x).logits, atol=1e-5 if not refit else 5e-3, rtol=1e-4
        )
