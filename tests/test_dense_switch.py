"""Dense task switching (premoe.dense.switch, DenseServer.load): slices assembled in order, and the task
server's switches equal fresh builds while reading only what the resident model lacks. The switch
contract over every dense family row is in tests/contract/test_dense_family.py."""

import pytest
import torch

import premoe
from premoe.core.checkpoint import ByteReader
from premoe.core.data import write_jsonl
from premoe.core.tasks import samples
from premoe.dense.model import build_dense
from premoe.dense.server import DenseServer
from premoe.dense.switch import assemble
from premoe.testing import assert_same_dense, build_dense_model, switch_bytes


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


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-switch")
    model = build_dense_model(d / "m", "llama", trained_norms=True)
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
        assert read == switch_bytes(info, plans[prev], plans[task], server.column_run_bytes)
        fresh = build_dense(info, plans[task], ByteReader()).to(dtype=dtype)
        assert_same_dense(server.model, fresh)
    reply = server.generate("add 1+2=", max_new_tokens=2, task="sort")
    assert not reply.switched and reply.bytes_read == 0
    reply = server.generate("add 1+2=", max_new_tokens=2, task="reverse")
    assert reply.switched and reply.bytes_read == switch_bytes(
        info, plans["sort"], plans["reverse"], server.column_run_bytes
    )
    assert reply.to_dict()["bytes_read"] == reply.bytes_read
