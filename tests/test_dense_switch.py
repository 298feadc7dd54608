"""Dense task switching (premoe.dense.switch, DenseServer.load): the switched model equals a fresh
build of the new task, and a switch reads from the checkpoint only what the resident model lacks."""

import pytest
import torch

import premoe
from premoe.core.checkpoint import TORCH_DTYPES, ByteReader
from premoe.core.tasks import char_tokenizer, samples
from premoe.core.data import write_jsonl
from premoe.dense.model import DensePlan, build_dense, check_plan, inspect_dense, slices
from premoe.dense.switch import MIN_RUN_BYTES, assemble, read_columns, runs, switch_dense
from premoe.dense.server import DenseServer

FAMILIES = {  # name -> (model_type, config overrides, which compensation biases the family can hold)
    "llama": ("llama", {}, ("o", "down")),
    "llama-bias": ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
                   ("o", "down")),  # checkpoint biases + compensation, an untied LM head
    "gemma": ("gemma", {}, ("o",)),  # scaled embeddings
    "qwen2": ("qwen2", {}, ()),  # q/k/v biases cut with their heads
    "olmo2": ("olmo2", {}, ("o",)),  # q/k norms over all heads cut with them
}
PROMPTS = torch.tensor([[1, 5, 6, 7, 8, 9], [1, 9, 3, 4, 12, 2]])


def _build(path, model_type, seed=0, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = char_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:  # trained-looking biases and norms, so slicing them is visible
                p.normal_(0, 0.1 if n.endswith("bias") else 1.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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


def _expected_bytes(info, old: DensePlan, new: DensePlan, min_run_bytes: int) -> int:
    """What a switch should read, from the plans alone: the missing rows; the missing columns, or
    the whole tensor where their runs are short; and every checkpoint bias either plan compensates."""
    total = 0
    for l in range(info.num_layers):
        before, after = slices(info, old, l), slices(info, new, l)
        for name, (dim, ids) in after.items():
            t = info.checkpoint.tensors[name]
            missing = sorted(set(ids) - set(before[name][1]))
            per = t.nbytes // t.shape[dim]  # bytes of one slice along dim
            if not missing:
                continue
            if dim == 0 or len(missing) * per >= min_run_bytes * len(runs(missing)) * t.shape[0]:
                total += len(missing) * per
            else:
                total += t.nbytes
        for which in ("o", "down"):
            name = info.key(l, which, "bias")
            if name in info.checkpoint.tensors and (f"{l}.{which}" in old.bias or f"{l}.{which}" in new.bias):
                total += info.checkpoint.tensors[name].nbytes
    return total


def _same(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config.num_attention_heads == b.config.num_attention_heads
    with torch.no_grad():
        assert torch.equal(a(PROMPTS).logits, b(PROMPTS).logits)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    model_type, over, comp = FAMILIES[request.param]
    return inspect_dense(_build(tmp_path_factory.mktemp(request.param) / "m", model_type, **over)), comp


@pytest.mark.parametrize("min_run_bytes", [0, MIN_RUN_BYTES, 10**9])
def test_switch_equals_fresh_build_and_reads_only_what_is_missing(family, min_run_bytes):
    """A -> B -> A -> C over non-uniform plans (heads, KV groups, channels, compensation biases):
    every switched model is the fresh build, tensor for tensor, and reads the bytes the plans predict
    (B -> A: what B dropped), strictly fewer than a fresh build."""
    info, comp = family
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
            _same(model, fresh)
            assert read == _expected_bytes(info, prev, plan, min_run_bytes), (prev.task, plan.task)
            assert 0 < read < fresh_reader.bytes_read
            prev = plan
        before = reader.bytes_read
        model = switch_dense(model, info, c, c, reader, min_run_bytes)  # the same plan again: nothing to read
        assert reader.bytes_read == before
        _same(model, build_dense(info, c, ByteReader()))


def test_assemble_orders_kept_and_read_slices():
    full = torch.arange(10.0)[None] + 10 * torch.arange(3.0)[:, None]  # [3, 10], value 10 r + c
    old = full[:, [2, 5, 7, 9]].clone()
    asked = []

    def read(ids):
        asked.append(ids)
        return full[:, ids].double()  # converted to old's dtype

    out = assemble(old, [2, 5, 7, 9], [0, 5, 6, 9], 1, read)
    assert asked == [[0, 6]] and out.dtype == old.dtype and torch.equal(out, full[:, [0, 5, 6, 9]])
    assert torch.equal(assemble(old.T, [2, 5, 7, 9], [5, 9], 0, read), full[:, [5, 9]].T) and len(asked) == 1


def test_column_reads_ranges_or_whole_rows(family):
    """Long runs of columns are read as ranges (exactly their bytes); short runs read whole rows in
    chunks (the tensor's bytes, however small the chunk); both give the same values."""
    info, _ = family
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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-switch")
    model = _build(d / "m", "llama")
    for t in ("add", "reverse", "sort"):
        premoe.calibrate(model, write_jsonl(d / f"{t}.jsonl", samples(t, 24, "calib")), t, d / "store", progress=False)
    return model, d / "store"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_server_switches_equal_fresh_builds(served, dtype):
    """DenseServer A -> B -> A -> C: the same logits as a fresh build of each task (cast as the server
    casts), fewer bytes than that build, none when staying, and the reply reports them."""
    model, store = served
    server = DenseServer(model, store, 0.5, dtype=dtype)
    info = server.info
    plans = {t: server.plan(t) for t in ("add", "reverse", "sort")}
    assert plans["add"].channels != plans["reverse"].channels
    fresh_bytes = {}
    for t in plans:
        with ByteReader() as r:
            build_dense(info, plans[t], r)
            fresh_bytes[t] = r.bytes_read
    assert server.load("add") == fresh_bytes["add"]
    assert server.load("add") == 0
    for prev, task in (("add", "reverse"), ("reverse", "add"), ("add", "sort")):
        read = server.load(task)
        assert 0 < read < fresh_bytes[task]
        assert read == _expected_bytes(info, plans[prev], plans[task], server.column_run_bytes)
        fresh = build_dense(info, plans[task], ByteReader()).to(dtype=dtype)
        _same(server.model, fresh)
    reply = server.generate("add 1+2=", max_new_tokens=2, task="sort")
    assert not reply.switched and reply.bytes_read == 0
    reply = server.generate("add 1+2=", max_new_tokens=2, task="reverse")
    assert reply.switched and reply.bytes_read == _expected_bytes(info, plans["sort"], plans["reverse"], server.column_run_bytes)
    assert reply.to_dict()["bytes_read"] == reply.bytes_read
