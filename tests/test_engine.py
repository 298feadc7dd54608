"""``--engine``: the slot arithmetic of an in-place switch, the engine options and the refusals, without vLLM
(the engine itself is tested in ``tests/test_vllm.py``, where vLLM is installed)."""

from __future__ import annotations

import random

import pytest

from premoe.assets import TINY_DENSE, TINY_MODEL
from premoe.core.options import EngineOptions
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.model import inspect_model
from premoe.testing.builders import build_family, quantize_checkpoint
from premoe.vllm import available
from premoe.vllm.slots import Slot, plan_switch, slot_rows, want_slots
from premoe.vllm.source import check_engine_model


@pytest.mark.parametrize("seed", range(20))
def test_a_switch_writes_only_what_differs_and_holds_exactly_the_new_set(seed):
    rng = random.Random(seed)
    n, keep = 32, rng.choice([2, 8, 16, 31])
    a, b = rng.sample(range(n), keep), rng.sample(range(n), keep)
    fa, fb = set(rng.sample(a, keep // 2)), set(rng.sample(b, keep // 2))
    held = want_slots(a, fa, "A")
    new, writes = plan_switch(held, b, fb, "B")
    assert sorted(s.expert for s in new) == sorted(b)
    assert all(s.down == ("B" if s.expert in fb else None) for s in new)
    full = {w.expert for w in writes if w.full}
    assert full == set(b) - set(a)  # every new expert read once, nothing the old task kept
    for j, (old, now) in enumerate(zip(held, new)):
        if old.expert in b:  # kept experts stay in their slot
            assert now.expert == old.expert
        written = [w for w in writes if w.slot == j]
        assert bool(written) == (old != now)
        if written and not written[0].full:
            assert old.expert == now.expert and old.down != now.down


def test_router_rows_follow_the_slots():
    slots = [Slot(7), Slot(2), Slot(5)]
    assert slot_rows(slots, [2, 5, 7]) == [2, 0, 1]
    with pytest.raises(ValueError, match="distinct"):
        plan_switch(slots, [1, 1, 2], set(), "x")


def test_engine_options_are_checked_once():
    assert EngineOptions().engine == "auto"
    with pytest.raises(InputError, match="`engine`"):
        EngineOptions(engine="trt")
    with pytest.raises(InputError, match="`tensor_parallel`"):
        EngineOptions(engine="vllm", tensor_parallel=0)
    with pytest.raises(InputError, match="need `engine` vllm"):
        EngineOptions(engine="hf", tensor_parallel=2)


def test_engines_refuse_what_they_cannot_serve(tmp_path):
    from premoe.verbs.serve import task_server

    with pytest.raises(InputError, match="`engine` does not apply to dense models"):
        task_server(TINY_DENSE, tmp_path / "none", sparsity=0.5, engine="vllm")
    if not available():
        with pytest.raises(InputError, match="needs vLLM"):
            task_server(TINY_MODEL, tmp_path / "none", keep=8, engine="vllm")
    with pytest.raises(InputError, match="`cache_mb` does not apply to `engine` vllm"):
        task_server(TINY_MODEL, tmp_path / "none", keep=8, engine="vllm", cache_mb=1.0)
    check_engine_model(inspect_model(TINY_MODEL))  # the shipped model is served
    fp8 = quantize_checkpoint(TINY_MODEL, tmp_path / "fp8", "fp8")
    with pytest.raises(UnsupportedModelError, match="quantised .*--engine hf"):
        check_engine_model(inspect_model(fp8))
    oss = build_family("gpt_oss", tmp_path / "oss")
    with pytest.raises(UnsupportedModelError, match="--engine hf"):
        check_engine_model(inspect_model(oss))


def test_cli_without_vllm_says_how_to_get_it(tmp_path, capsys):
    from premoe.cli import main

    if available():
        pytest.skip("vLLM is installed here")
    code = main(
        ["generate", "--model", str(TINY_MODEL), "--store", str(tmp_path), "--keep", "8", "--engine", "vllm", "x"]
    )
    err = capsys.readouterr().err
    assert code != 0 and "needs vLLM" in err and "--engine hf" in err and "Traceback" not in err
