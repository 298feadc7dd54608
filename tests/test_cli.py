"""The ``premoe`` command line: every verb, JSON output, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from premoe.cli import main
from premoe.core.data import write_jsonl


def run(capsys, *argv):
    capsys.readouterr()  # drop output of fixtures that built models
    code = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_calibrate_prune_inspect(family_dir, tmp_path, small_data, capsys):
    src = family_dir("qwen2_moe")
    code, out, _ = run(
        capsys,
        "calibrate",
        "--model",
        src,
        "--data",
        small_data,
        "--task",
        "math",
        "--store",
        tmp_path / "s",
        "--max-samples",
        4,
    )
    assert code == 0 and "calibrated task 'math'" in out and "4 samples" in out
    code, out, _ = run(
        capsys,
        "calibrate",
        "--model",
        src,
        "--data",
        small_data,
        "--task",
        "freq",
        "--store",
        tmp_path / "s",
        "--scorer",
        "frequency",
    )
    assert code == 0
    code, out, _ = run(
        capsys,
        "prune",
        "--model",
        src,
        "--store",
        tmp_path / "s",
        "--task",
        "math",
        "--keep",
        4,
        "--out",
        tmp_path / "out",
    )
    assert code == 0 and "2/4" in out and "reload verified" in out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 4
    code, out, _ = run(capsys, "inspect", "--store", tmp_path / "s", "--json")
    summary = json.loads(out)
    assert code == 0 and set(summary["tasks"]) == {"math", "freq"}
    assert summary["tasks"]["math"]["samples"] == 4 and summary["model"]["num_experts"] == 8
    # the default (EASY-EP) records the router and expert-output statistics; weights need --all-stats
    assert summary["tasks"]["math"]["scorers"] == ["tcess", "official", "frequency", "reap", "ean", "easyep", "random"]
    assert summary["tasks"]["freq"]["scorers"] == ["tcess", "official", "frequency", "random"]  # router only
    code, out, _ = run(capsys, "inspect", "--store", tmp_path / "s")
    assert code == 0 and "math" in out and "frequency" in out


@pytest.mark.parametrize(
    "make_argv, match",
    [
        (
            lambda d, s, t: ["calibrate", "--model", t / "missing", "--data", d, "--task", "x", "--store", t / "s"],
            "does not exist",
        ),
        (
            lambda d, s, t: ["calibrate", "--model", s, "--data", t / "empty.jsonl", "--task", "x", "--store", t / "s"],
            "holds no samples",
        ),
        (
            lambda d, s, t: ["prune", "--model", s, "--store", t / "s", "--task", "x", "--keep", 1, "--out", t / "o"],
            "below the 2 experts",
        ),
        (
            lambda d, s, t: [
                "prune",
                "--model",
                s,
                "--store",
                t / "nostore",
                "--task",
                "x",
                "--keep",
                4,
                "--out",
                t / "o",
            ],
            "no pattern store",
        ),
        (lambda d, s, t: ["inspect", "--store", t / "nostore"], "no pattern store"),
    ],
)
def test_errors_are_one_line_with_status_2(family_dir, tmp_path, small_data, capsys, make_argv, match):
    (tmp_path / "empty.jsonl").write_text("")
    code, out, err = run(capsys, *make_argv(small_data, family_dir("mixtral"), tmp_path))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("premoe: error: ") and match in lines[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_unknown_task_and_foreign_store(family_dir, tmp_path, small_data, capsys):
    assert (
        run(
            capsys,
            "calibrate",
            "--model",
            family_dir("mixtral"),
            "--data",
            small_data,
            "--task",
            "a",
            "--store",
            tmp_path / "s",
        )[0]
        == 0
    )
    code, _, err = run(
        capsys,
        "prune",
        "--model",
        family_dir("mixtral"),
        "--store",
        tmp_path / "s",
        "--task",
        "b",
        "--keep",
        4,
        "--out",
        tmp_path / "o",
    )
    assert code == 2 and "task 'b' is not in store" in err and "tasks: a" in err
    code, _, err = run(
        capsys,
        "prune",
        "--model",
        family_dir("granitemoe"),
        "--store",
        tmp_path / "s",
        "--task",
        "a",
        "--keep",
        4,
        "--out",
        tmp_path / "o",
    )
    assert code == 2 and "built for another model" in err


def test_entry_point_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "premoe", "--help"], capture_output=True, text=True, check=True).stdout
    for verb in ("calibrate", "prune", "inspect", "demo"):
        assert verb in out


def test_txt_data_via_cli(family_dir, tmp_path, capsys):
    f = tmp_path / "d.txt"
    f.write_text("add 1+2=3\nreverse ab=ba\n")
    code, out, _ = run(
        capsys, "calibrate", "--model", family_dir("olmoe"), "--data", f, "--task", "t", "--store", tmp_path / "s"
    )
    assert code == 0 and "2 samples" in out
    write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}])


def _broken_checkpoint(src, tmp_path, how):
    """A sharded copy of ``src`` broken in one way users meet: a missing shard, a shard cut mid-tensor,
    an unsupported quantisation method."""
    import shutil

    from transformers import AutoModelForCausalLM

    d = tmp_path / f"broken-{how}"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(d, max_shard_size="60KB")
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy2(f, d / f.name)
    shards = sorted(d.glob("model-*.safetensors"))
    if how == "missing-shard":
        shards[-1].unlink()
    elif how == "truncated":
        data = shards[0].read_bytes()
        shards[0].write_bytes(data[: len(data) - 100])
    elif how == "gptq":
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize(
    "how, match",
    [
        ("missing-shard", "lists shards that are missing"),
        ("truncated", "truncated download"),
        ("gptq", "quantization method 'gptq' is not supported"),
    ],
)
def test_broken_checkpoints_fail_in_one_line_before_writing(family_dir, tmp_path, small_data, capsys, how, match):
    model = _broken_checkpoint(family_dir("qwen3_moe"), tmp_path, how)
    for argv in (
        ["calibrate", "--model", model, "--data", small_data, "--task", "x", "--store", tmp_path / "s"],
        ["route", "--model", model, "--store", tmp_path / "s", "add"],
    ):
        code, out, err = run(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1 and match in lines[0], err
    assert not (tmp_path / "s").exists()


def test_memory_budget_too_small_fails_in_one_line(family_dir, tmp_path, small_data, capsys):
    code, out, err = run(
        capsys,
        "calibrate",
        "--model",
        family_dir("qwen3_moe"),
        "--data",
        small_data,
        "--task",
        "x",
        "--store",
        tmp_path / "s",
        "--stream",
        "--max-memory",
        "0.01",
    )
    assert code == 2 and "too small for even one layer" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()
