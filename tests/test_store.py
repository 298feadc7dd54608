"""Pattern store: manifest, adding tasks, model mismatch, integrity and atomic writes."""

import json

import pytest
import torch

import premoe
from premoe.core.store import PatternStore, TaskPattern
from premoe.errors import StoreError
from premoe.moe.model import inspect_model


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_manifest_records_task_and_model(family_dir, tmp_path, small_data):
    src = family_dir("qwen3_moe")
    premoe.calibrate(src, small_data, "math", tmp_path / "s", max_samples=5, progress=False)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    info = inspect_model(src)
    assert m["format"] == "premoe-pattern-store" and m["version"] == 1
    assert m["model"] == info.fingerprint.to_dict()
    t = m["tasks"]["math"]
    assert t["samples"] == 5 and t["tokens"] > 5 and t["scorer"] == "easyep"  # the default
    assert t["params"]["k"] == info.router.top_k and t["params"]["r"] is None
    assert t["data"]["sha256"] and (tmp_path / "s" / t["file"]).is_file()
    p = PatternStore.open(tmp_path / "s").load("math")
    assert p.scores.shape == (len(info.moe_layers), info.num_experts)
    assert set(p.means) == {"tcess", "count", "official", "prob", "reap", "ean", "easyep"}  # router + expert outputs


def test_add_second_task_and_overwrite(family_dir, tmp_path, small_data):
    src = family_dir("mixtral")
    premoe.calibrate(src, small_data, "a", tmp_path / "s", progress=False)
    premoe.calibrate(src, small_data, "b", tmp_path / "s", scorer="frequency", progress=False)
    store = PatternStore.open(tmp_path / "s")
    assert set(store.tasks) == {"a", "b"} and store.tasks["b"]["scorer"] == "frequency"
    with pytest.raises(StoreError, match="already exists"):
        premoe.calibrate(src, small_data, "a", tmp_path / "s", progress=False)
    old_file = store.tasks["a"]["file"]
    premoe.calibrate(src, small_data, "a", tmp_path / "s", scorer="random", seed=3, overwrite=True, progress=False)
    new = PatternStore.open(tmp_path / "s").tasks["a"]
    assert new["scorer"] == "random" and new["file"] != old_file
    assert not (tmp_path / "s" / old_file).exists()  # the replaced file is cleaned up
    assert len(list((tmp_path / "s" / "tasks").glob("*.safetensors"))) == 2


def test_store_of_another_model_is_refused(family_dir, tmp_path, small_data):
    premoe.calibrate(family_dir("mixtral"), small_data, "a", tmp_path / "s", progress=False)
    before = snapshot(tmp_path / "s")
    with pytest.raises(StoreError, match="built for another model"):
        premoe.calibrate(family_dir("olmoe"), small_data, "b", tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="built for another model"):
        premoe.prune(family_dir("olmoe"), tmp_path / "s", "a", 4, tmp_path / "out", progress=False)
    assert snapshot(tmp_path / "s") == before


def test_same_shapes_different_router_weights_is_refused(tmp_path, small_data):
    from premoe.testing import FAMILIES, build_model, save_model

    a = save_model(*build_model(*FAMILIES["mixtral"][:2], seed=0), tmp_path / "a")
    b = save_model(*build_model(*FAMILIES["mixtral"][:2], seed=1), tmp_path / "b")
    premoe.calibrate(a, small_data, "t", tmp_path / "s", progress=False)
    with pytest.raises(StoreError, match="router weights differ"):
        premoe.prune(b, tmp_path / "s", "t", 4, tmp_path / "out", progress=False)


def test_interrupted_calibration_leaves_store_unchanged(family_dir, tmp_path, small_data, monkeypatch):
    src = family_dir("qwen2_moe")
    premoe.calibrate(src, small_data, "a", tmp_path / "s", progress=False)
    before = snapshot(tmp_path / "s")

    import premoe.moe.calibration as cal

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "observe", boom)
    with pytest.raises(KeyboardInterrupt):
        premoe.calibrate(src, small_data, "b", tmp_path / "s", progress=False)
    with pytest.raises(KeyboardInterrupt):  # a new store is not created either
        premoe.calibrate(src, small_data, "b", tmp_path / "new", progress=False)
    assert snapshot(tmp_path / "s") == before
    assert not (tmp_path / "new").exists()


def test_crash_while_writing_manifest_leaves_store_unchanged(family_dir, tmp_path, small_data, monkeypatch):
    src = family_dir("qwen2_moe")
    premoe.calibrate(src, small_data, "a", tmp_path / "s", progress=False)
    before = snapshot(tmp_path / "s")
    import premoe.core.store as store_mod

    def fail(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_write_json_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        premoe.calibrate(src, small_data, "b", tmp_path / "s", progress=False)
    with pytest.raises(OSError, match="disk full"):
        premoe.calibrate(src, small_data, "b", tmp_path / "new", progress=False)
    assert snapshot(tmp_path / "s") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "s"]


def test_corrupt_store_files(family_dir, tmp_path, small_data):
    src = family_dir("mixtral")
    premoe.calibrate(src, small_data, "a", tmp_path / "s", progress=False)
    store = PatternStore.open(tmp_path / "s")
    task_file = tmp_path / "s" / store.tasks["a"]["file"]
    data = bytearray(task_file.read_bytes())
    data[-1] ^= 0xFF
    task_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt"):
        store.load("a")
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupt store manifest"):
        PatternStore.open(tmp_path / "s")


def test_missing_and_foreign_store_dirs(tmp_path):
    with pytest.raises(StoreError, match="no pattern store"):
        PatternStore.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no pattern store"):
        PatternStore.open(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a premoe pattern store"):
        PatternStore.open(tmp_path / "other")
    fp = premoe.moe.model.ModelFingerprint("mixtral", "X", 1, (0,), 2, 1, "0" * 64)
    with pytest.raises(StoreError, match="not a premoe pattern store"):
        PatternStore(tmp_path / "other").add(TaskPattern("t", [0], torch.zeros(1, 2)), fp)


def test_calibrating_into_an_empty_directory_works(family_dir, tmp_path, small_data):
    (tmp_path / "s").mkdir()
    premoe.calibrate(family_dir("mixtral"), small_data, "a", tmp_path / "s", progress=False)
    assert set(PatternStore.open(tmp_path / "s").tasks) == {"a"}
