"""premoe eval, premoe sweep, and lm-evaluation-harness on an exported pruned model."""

import csv
import json
import math

import pytest
import torch
from expected import EVAL_DENSE_PRUNED_EXACT_MATCH, EVAL_EXACT_MATCH, EVAL_MC_ACCURACY, EVAL_PRUNED_EXACT_MATCH

import premoe
from premoe.assets import TINY_MODEL
from premoe.cli import main
from premoe.core.data import write_jsonl
from premoe.core.evaluation import choice_logliks, exact_match, read_eval_data
from premoe.core.tasks import samples
from premoe.errors import InputError
from premoe.moe.loading import load_model


@pytest.fixture(scope="module")
def add_setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("evalsetup")
    calib = write_jsonl(work / "add_calib.jsonl", samples("add", 32, "calib"))
    evals = write_jsonl(work / "add_eval.jsonl", samples("add", 40, "eval"))
    premoe.calibrate(TINY_MODEL, calib, "add", work / "store", all_stats=True, dtype="float32", progress=False)
    premoe.calibrate(
        TINY_MODEL,
        write_jsonl(work / "sort.jsonl", samples("sort", 32, "calib")),
        "sort",
        work / "store",
        all_stats=True,
        dtype="float32",
        progress=False,
    )
    return work, evals


def test_eval_dense_exported_and_on_the_fly_agree(add_setup):
    work, evals = add_setup
    dense = premoe.evaluate(TINY_MODEL, evals, dtype="float32", progress=False)
    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    direct = exact_match(lm.model, lm.tokenizer, samples("add", 40, "eval"), progress=False)
    assert dense["exact_match"] == direct >= EVAL_EXACT_MATCH
    premoe.prune(TINY_MODEL, work / "store", "add", 12, work / "add-12", scorer="reap", overwrite=True, progress=False)
    exported = premoe.evaluate(work / "add-12", evals, dtype="float32", progress=False)
    on_the_fly = premoe.evaluate(
        TINY_MODEL, evals, store=work / "store", task="add", keep=12, scorer="reap", dtype="float32", progress=False
    )
    assert on_the_fly["exact_match"] == exported["exact_match"]  # the same model, built two ways
    assert on_the_fly["bytes_read"] < 0.6 * premoe.inspect_model(TINY_MODEL).checkpoint.nbytes
    assert on_the_fly["scorer"] == "reap" and on_the_fly["keep"] == 12
    agnostic = premoe.evaluate(
        TINY_MODEL, evals, store=work / "store", agnostic=True, keep=12, dtype="float32", progress=False
    )
    premoe.prune(TINY_MODEL, work / "store", None, 12, work / "all-12", agnostic=True, overwrite=True, progress=False)
    pooled = premoe.evaluate(work / "all-12", evals, dtype="float32", progress=False)
    assert agnostic["task"].startswith("all-tasks") and agnostic["exact_match"] == pooled["exact_match"]


def test_perplexity_is_the_token_weighted_nll_transformers_computes(tmp_path):
    from premoe.core.evaluation import perplexity, read_perplexity, text_windows

    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    tok, net = lm.tokenizer, lm.model
    text = "\n".join(r["prompt"] + r["completion"] for r in samples("sort", 12, "eval"))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    windows = text_windows(tok, [("", text)], 16)
    assert [w[0][0] for w in windows] == [tok.bos_token_id] * len(windows)  # BOS heads every window
    assert sum(n for _, n in windows) == len(ids) and max(len(w) for w, _ in windows) <= 16  # every token once
    got = perplexity(net, tok, [("", text)], window=16, progress=False)
    nll, n = 0.0, 0
    for w, scored in windows:  # transformers' own loss, window by window, weighted by tokens
        x = torch.tensor([w])
        with torch.no_grad():
            nll += float(net(input_ids=x, labels=x).loss) * (len(w) - 1)
        n += len(w) - 1
    assert got["tokens"] == n and got["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # a JSONL of samples scores each completion and its end-of-sequence token, given the prompt
    rows = samples("sort", 5, "eval")
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    records = read_perplexity(path)
    assert records == [(r["prompt"], r["completion"]) for r in rows]
    sample_windows = text_windows(tok, records, 1024)
    assert [n for _, n in sample_windows] == [
        len(tok(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows
    ]
    (tmp_path / "t.txt").write_text("add 1+2=3\n")
    assert read_perplexity(tmp_path / "t.txt") == [("", "add 1+2=3\n")]  # plain text: one record, all scored


@pytest.mark.parametrize(
    "content, suffix, match",
    [
        (None, ".txt", "does not exist"),
        ("  \n", ".txt", "holds no text"),
        ('{"prompt": 1}\n', ".jsonl", "expected"),
        ("{oops\n", ".jsonl", "invalid JSON"),
        (b"\xff\xfe", ".txt", "not UTF-8"),
    ],
)
def test_perplexity_file_errors(tmp_path, content, suffix, match):
    from premoe.core.evaluation import read_perplexity
    from premoe.errors import PremoeError

    path = tmp_path / f"p{suffix}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(PremoeError, match=match):
        read_perplexity(path)


def test_eval_perplexity_is_the_same_measure_dense_on_the_fly_and_exported(add_setup, tmp_path):
    work, evals = add_setup
    kw = dict(perplexity=evals, dtype="float32", progress=False)
    dense = premoe.evaluate(TINY_MODEL, **kw)
    assert dense["exact_match"] is None and dense["perplexity"] >= 1.0 and dense["perplexity_tokens"] > 0
    fly = premoe.evaluate(TINY_MODEL, store=work / "store", task="add", keep=4, refit=False, **kw)
    premoe.prune(TINY_MODEL, work / "store", "add", 4, tmp_path / "out", refit=False, progress=False)
    exported = premoe.evaluate(tmp_path / "out", **kw)
    assert fly["perplexity"] == pytest.approx(exported["perplexity"], rel=1e-4)
    assert fly["perplexity"] > dense["perplexity"]  # 4 of 32 experts cost something
    with pytest.raises(InputError, match="nothing to evaluate"):
        premoe.evaluate(TINY_MODEL, progress=False)
    with pytest.raises(InputError, match="perplexity_window"):
        premoe.evaluate(TINY_MODEL, perplexity=evals, perplexity_window=1, progress=False)


def test_multiple_choice_log_likelihood(tmp_path):
    lm = load_model(TINY_MODEL, device="cpu", dtype=torch.float32)
    tok = lm.tokenizer
    lls = choice_logliks(lm.model, tok, "add 2+3=", ["5", "6"])
    ids = tok("add 2+3=5", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = lm.model(ids).logits.log_softmax(-1)
    assert lls[0] == pytest.approx(float(logp[0, -2, ids[0, -1]]), abs=1e-4)  # one-token continuation
    assert lls[0] > lls[1]
    rows = [
        {"prompt": s["prompt"], "choices": [s["completion"], s["completion"] + "9"], "answer": 0}
        for s in samples("add", 20, "eval")
    ]
    rows.append({"prompt": "sort 321=", "choices": ["132", "123"], "answer": "123"})
    res = premoe.evaluate(TINY_MODEL, write_jsonl(tmp_path / "mc.jsonl", rows), dtype="float32", progress=False)
    assert res["mc_samples"] == 21 and res["exact_match"] is None and res["mc_accuracy"] >= EVAL_MC_ACCURACY


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "x"}', 'expected "completion"'),
        ('{"prompt": "x", "choices": ["a"], "answer": 0}', "at least two"),
        ('{"prompt": "x", "choices": ["a", "b"], "answer": 2}', "index into"),
        ('{"completion": "x"}', '"prompt" string'),
        ("nope", "invalid JSON"),
    ],
)
def test_eval_data_errors(tmp_path, line, match):
    f = tmp_path / "d.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(InputError, match=match):
        read_eval_data(f)


def test_eval_cli(add_setup, capsys):
    work, evals = add_setup
    capsys.readouterr()
    assert (
        main(
            [
                "-q",
                "eval",
                "--model",
                str(TINY_MODEL),
                "--data",
                str(evals),
                "--store",
                str(work / "store"),
                "--task",
                "add",
                "--keep",
                "16",
                "--json",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["keep"] == 16 and res["generate_samples"] == 40 and res["exact_match"] >= EVAL_PRUNED_EXACT_MATCH
    assert main(["-q", "eval", "--model", str(TINY_MODEL), "--data", str(evals), "--keep", "16"]) == 2
    assert "needs --store" in capsys.readouterr().err


def test_sweep_writes_results_and_pictures(tmp_path):
    from premoe.verbs.sweep import sweep

    tasks = {t: (samples(t, 16, "calib"), samples(t, 10, "eval")) for t in ("add", "reverse")}
    res = sweep(tmp_path / "sw", tasks=tasks, keeps=[16, 8], scorers=["tcess", "reap", "random"], progress=False)
    rows = list(csv.DictReader(open(tmp_path / "sw" / "results.csv")))
    # tcess and reap in both modes, random once: 5 configurations x 2 keeps x 2 tasks
    assert len(rows) == 5 * 2 * 2 == len(res["rows"])
    assert {r["mode"] for r in rows if r["scorer"] == "random"} == {"specific"}
    summary = {(r["scorer"], r["mode"], r["keep"]): r["retention"] for r in res["summary"]}
    assert summary[("tcess", "specific", 16)] > summary[("random", "specific", 16)]
    for png in ("retention.png", "importance.png", "overlap.png"):
        data = (tmp_path / "sw" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert json.loads((tmp_path / "sw" / "results.json").read_text())["keeps"] == [16, 8]


def _lm_eval_exact_match(model_dir, evals, tmp_path, monkeypatch) -> float:
    """lm-eval's HF backend on a local JSONL task (offline): its exact match."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "premoe_task.yaml").write_text(
        "task: premoe_task\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {evals}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{completion}}"\n'
        "generation_kwargs:\n  until: ['</s>']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=["premoe_task"],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        device="cpu",
        batch_size=8,
    )
    return out["results"]["premoe_task"]["exact_match,none"]


def test_lm_eval_harness_runs_an_exported_pruned_model(add_setup, tmp_path, monkeypatch):
    """lm-eval's HF backend on a local JSONL task, offline: same exact match as premoe eval."""
    work, evals = add_setup
    premoe.prune(TINY_MODEL, work / "store", "add", 16, tmp_path / "add-16", progress=False)
    theirs = _lm_eval_exact_match(tmp_path / "add-16", evals, tmp_path, monkeypatch)
    ours = premoe.evaluate(tmp_path / "add-16", evals, dtype="float32", progress=False)["exact_match"]
    assert theirs == pytest.approx(ours)


def test_lm_eval_harness_runs_an_exported_dense_pruned_model(tmp_path, monkeypatch):
    """The same for a SEAP export of the shipped dense model: lm-eval agrees with premoe eval, and
    the task is still solved."""
    from premoe.assets import TINY_DENSE

    calib = write_jsonl(tmp_path / "add_calib.jsonl", samples("add", 32, "calib"))
    evals = write_jsonl(tmp_path / "add_eval.jsonl", samples("add", 40, "eval"))
    premoe.calibrate(TINY_DENSE, calib, "add", tmp_path / "store", progress=False)
    premoe.prune(TINY_DENSE, tmp_path / "store", "add", None, tmp_path / "add-20", sparsity=0.2, progress=False)
    theirs = _lm_eval_exact_match(tmp_path / "add-20", evals, tmp_path, monkeypatch)
    ours = premoe.evaluate(tmp_path / "add-20", evals, dtype="float32", progress=False)["exact_match"]
    assert theirs == pytest.approx(ours) and ours >= EVAL_DENSE_PRUNED_EXACT_MATCH


def test_sweep_streamed_equals_in_memory(family_dir, tmp_path):
    """A model larger than memory: calibration streamed, evaluation with layers loaded on demand."""
    from premoe.verbs.sweep import sweep

    tasks = {t: (samples(t, 8, "calib"), samples(t, 6, "eval")) for t in ("add", "sort")}
    kw = dict(model=family_dir("qwen3_moe"), tasks=tasks, keeps=[4], scorers=["tcess", "frequency"], progress=False)
    a = sweep(tmp_path / "a", **kw)
    b = sweep(tmp_path / "b", stream=True, **kw)
    assert [r["accuracy"] for r in a["rows"]] == [r["accuracy"] for r in b["rows"]]
    assert a["dense"] == b["dense"]
