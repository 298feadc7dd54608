"""The shipped tiny MoE and the demo pipeline (fast settings; the full demo is `premoe demo`)."""

import json

import torch
from expected import REPORTED_EXACT_MATCH, SHIPPED_EXACT_MATCH

from premoe.assets import TINY_DENSE, TINY_MODEL
from premoe.core.evaluation import exact_match
from premoe.core.tasks import TASKS, samples
from premoe.moe.loading import load_model
from premoe.moe.model import inspect_model
from premoe.verbs.demo import demo, format_table


def test_shipped_model_is_small_and_solves_every_task():
    info = inspect_model(TINY_MODEL)
    assert info.spec.name == "qwen3_moe" and info.num_experts >= 16
    assert info.checkpoint.nbytes < 8 * 2**20  # a few MB
    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    for task in TASKS:
        assert exact_match(lm.model, lm.tokenizer, samples(task, 60, "eval"), progress=False) >= SHIPPED_EXACT_MATCH, (
            task
        )
    report = json.loads((TINY_MODEL / "training_report.json").read_text())
    assert min(report["eval_exact_match_bf16_weights"].values()) >= REPORTED_EXACT_MATCH


def test_shipped_dense_model_is_small_gqa_and_solves_every_task():
    from premoe.dense.model import inspect_dense, load_dense

    info = inspect_dense(TINY_DENSE)
    assert info.spec.name == "llama" and info.kv_heads < info.heads  # GQA
    assert info.checkpoint.nbytes < 8 * 2**20
    _, lm, tok = load_dense(TINY_DENSE, dtype="float32")
    for task in TASKS:
        assert exact_match(lm, tok, samples(task, 60, "eval"), progress=False) >= SHIPPED_EXACT_MATCH, task
    report = json.loads((TINY_DENSE / "training_report.json").read_text())
    assert min(report["eval_exact_match_bf16_weights"].values()) >= REPORTED_EXACT_MATCH


def test_demo_runs_end_to_end(tmp_path):
    r = demo(keeps=[8], eval_samples=20, calib_samples=16, workdir=tmp_path, progress=False, sparsities=[0.5])
    methods = [(row["method"], row["keep"]) for row in r["rows"]]
    assert methods == [("dense", 32), ("default", 8), ("tcess", 8), ("agnostic", 8), ("random", 8)]
    dense, default, tcess, agnostic, rnd = r["rows"]
    assert tcess["bytes"] < dense["bytes"] and tcess["bytes"] == rnd["bytes"] == default["bytes"]
    assert default["mean"] > tcess["mean"] > rnd["mean"]
    assert set(tcess["accuracy"]) == set(TASKS)
    table = format_table(r)
    assert "default: EASY-EP + re-fit" in table and "TCESS, --no-refit (paper)" in table and "random" in table
    cfg = json.loads((tmp_path / "models" / "add-8-default" / "config.json").read_text())["premoe"]
    assert cfg["scorer"] == "easyep" and cfg["refit"]["tokens"] > 0
    plain = json.loads((tmp_path / "models" / "add-8" / "config.json").read_text())["premoe"]
    assert plain["scorer"] == "tcess" and "refit" not in plain
    # the dense (SEAP) part: every method at 50%, through real exports
    d = r["dense"]
    assert [(row["method"], row.get("requested")) for row in d["rows"]] == [
        ("dense", None),
        ("seap", 0.5),
        ("seap+refit", 0.5),
        ("seap-gen", 0.5),
        ("wanda-sp", 0.5),
        ("flap", 0.5),
        ("random", 0.5),
    ]
    rows = {row["method"]: row for row in d["rows"]}
    assert rows["seap"]["mean"] > rows["random"]["mean"]
    assert (
        rows["seap+refit"]["mean"] > rows["seap"]["mean"] and rows["seap+refit"]["sparsity"] == rows["seap"]["sparsity"]
    )
    assert abs(rows["seap"]["sparsity"] - 0.5) < 0.03 and rows["seap"]["bytes"] < 0.7 * rows["dense"]["bytes"]
    assert "SEAP, --no-refit" in table and "SEAP (default: + re-fit)" in table and "Wanda-sp" in table
    assert (tmp_path / "dense" / "models" / "add-50" / "config.json").is_file()
    assert "refit" in json.loads((tmp_path / "dense" / "models" / "add-refit-50" / "config.json").read_text())["premoe"]
