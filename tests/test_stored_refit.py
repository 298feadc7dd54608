"""Re-fitted rows stored with task patterns (``premoe refit``, ``calibrate --refit-keep``): prune and
eval reuse them instead of re-fitting, and TAER serving (generate, chat, serve) loads them instead of
the checkpoint's rows, switching tasks to exactly the model a fresh build with them gives."""

import json

import pytest
import torch
from safetensors.torch import load_file

import premoe
from premoe.cli import main
from premoe.core.data import write_jsonl
from premoe.core.store import PatternStore
from premoe.core.tasks import samples
from premoe.errors import InputError, StoreError
from premoe.moe.model import inspect_model
from premoe.moe.refit_checkpoint import plan_key, stored_refit
from premoe.moe.selective import ByteReader, build_model
from premoe.moe.server import TaskServer


def _data(tmp_path, task, n=24):
    return write_jsonl(tmp_path / f"{task}.jsonl", samples(task, n, "calib"))


@pytest.fixture
def refit_store(family_dir, tmp_path):
    """A store with tasks add and reverse; only add has re-fitted rows (keep 4)."""

    def make(family):
        src = family_dir(family)
        store = tmp_path / "s"
        premoe.calibrate(src, _data(tmp_path, "add"), "add", store, progress=False)
        premoe.calibrate(src, _data(tmp_path, "reverse"), "reverse", store, progress=False)
        premoe.refit(src, store, 4, tasks=["add"], progress=False)
        return src, store

    return make


def _state_equal(m1, m2) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return set(s1) == set(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_switching_with_stored_rows_equals_a_fresh_build_with_them(family, refit_store):
    """Per-expert keys (Qwen3), transposed fused experts (GPT-OSS), groups and a shared expert (DeepSeek-V3);
    tasks with and without stored rows, with the expert cache on, in both directions."""
    src, store = refit_store(family)
    server = TaskServer(src, store, 4, cache_bytes=64 * 2**20)
    info, st = server.info, PatternStore.open(store)
    for task in ("add", "reverse", "add", "reverse", "add"):
        stats = server.load(task)
        plan = server.plan_for(task)
        rows = stored_refit(st, task, plan)
        assert (rows is not None) == (task == "add") and (stats.refit_bytes > 0) == (task == "add")
        with ByteReader() as r:
            fresh = build_model(info, plan, r, refit=rows)
        assert _state_equal(server.model, fresh), task
    with ByteReader() as r:  # and the stored rows did change the model
        assert not _state_equal(server.model, build_model(info, server.plan_for("add"), r))


def test_prune_reuses_the_stored_rows_and_they_are_what_it_would_fit(tmp_path, family_dir, capsys):
    src = family_dir("qwen3_moe")
    store, data = tmp_path / "s", _data(tmp_path, "add")
    premoe.calibrate(src, data, "add", store, progress=False)
    full = inspect_model(src).num_experts
    assert main(["-q", "refit", "--model", str(src), "--store", str(store), "--keep", "4", "2", str(full)]) == 0
    assert f"--keep {full} keeps every expert, nothing to re-fit" in capsys.readouterr().out
    entry = PatternStore.open(store).tasks["add"]["refits"]
    assert sorted(e["keep"] for e in entry.values()) == [2, 4]
    reused = premoe.prune(src, store, "add", 4, tmp_path / "reused", progress=False)
    assert reused.plan.refit["stored"].startswith("refits/add-")
    fitted = premoe.prune(src, store, "add", 4, tmp_path / "fitted", refit_data=[data], progress=False)
    assert "stored" not in fitted.plan.refit
    a = load_file(next((tmp_path / "reused").glob("*.safetensors")))
    b = load_file(next((tmp_path / "fitted").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "reused" / "config.json").read_text())
    assert cfg["premoe"]["refit"]["stored"] == reused.plan.refit["stored"]


def test_recalibrating_a_task_drops_its_rows_and_a_corrupt_file_is_one_line(tmp_path, family_dir, capsys):
    src = family_dir("mixtral")
    store, data = tmp_path / "s", _data(tmp_path, "add")
    assert (
        main(
            [
                "-q",
                "calibrate",
                "--model",
                str(src),
                "--data",
                str(data),
                "--task",
                "add",
                "--store",
                str(store),
                "--refit-keep",
                "4",
            ]
        )
        == 0
    )
    st = PatternStore.open(store)
    ((key, entry),) = st.tasks["add"]["refits"].items()
    plan = premoe.plan(src, store, "add", 4)
    assert key == plan_key(plan)
    layer = next((store / entry["dir"]).glob("*.safetensors"))
    layer.write_bytes(layer.read_bytes()[:-8])  # truncated
    with pytest.raises(StoreError, match="truncated; rerun `premoe refit`"):
        stored_refit(st, "add", plan)
    assert main(["-q", "generate", "add 1+2=", "--model", str(src), "--store", str(store), "--keep", "4"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert (
        main(
            [
                "-q",
                "generate",
                "add 1+2=",
                "--model",
                str(src),
                "--store",
                str(store),
                "--keep",
                "4",
                "--no-refit",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    premoe.calibrate(src, data, "add", store, overwrite=True, progress=False)
    assert "refits" not in PatternStore.open(store).tasks["add"] and not (store / entry["dir"]).exists()


def test_refit_flags_refuse_what_cannot_work(tmp_path, family_dir, capsys):
    src = family_dir("qwen3_moe")
    store, data = tmp_path / "s", _data(tmp_path, "add")
    premoe.calibrate(src, data, "add", store, progress=False)
    base = ["-q", "generate", "add 1+2=", "--model", str(src), "--store", str(store), "--keep", "4"]
    assert main([*base, "--refit"]) == 2  # no stored rows for this keep
    assert "premoe refit --model" in capsys.readouterr().err
    assert main(["-q", "refit", "--model", str(src), "--store", str(store), "--keep", "999"]) == 2
    assert "keep" in capsys.readouterr().err
    assert (
        main(
            [
                "-q",
                "calibrate",
                "--model",
                str(src),
                "--data",
                str(data),
                "--task",
                "b",
                "--store",
                str(store),
                "--refit-keep",
                "999",
            ]
        )
        == 2
    )
    capsys.readouterr()
    assert "b" not in PatternStore.open(store).tasks  # refused before calibrating
    with pytest.raises(InputError, match="name that one task"):
        premoe.refit(src, store, 4, refit_data=[data], tasks=None)
    assert premoe.refit(src, store, inspect_model(src).num_experts, progress=False) == {"add": []}
