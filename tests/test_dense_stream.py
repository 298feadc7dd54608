"""Dense models larger than memory: layer-streamed calibration gives the in-memory statistics, is chosen
when the model does not fit, keeps hidden states on disk past its budget, and refuses bad input in one line."""

import pytest
import torch

import premoe
from premoe.cli import main
from premoe.core.config import load_tokenizer
from premoe.core.data import write_jsonl
from premoe.core.store import PatternStore
from premoe.core.streaming import activation_bytes
from premoe.core.tasks import samples
from premoe.dense.calibration import dense_sizes, observe_dense_streamed
from premoe.dense.model import inspect_dense
from premoe.errors import InputError
from premoe.testing import build_dense_model

FAMILIES = {  # model_type -> config overrides: plain GQA, Gemma's scaled embedding (a computed buffer), q/k/v biases
    "llama": {},
    "gemma": {},
    "qwen2": {},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-stream")
    return {name: build_dense_model(d / name, name, trained_norms=True, **over) for name, over in FAMILIES.items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-stream-data")
    rows = samples("add", 7, "calib") + [{"text": "reverse abc=cba"}]  # a sample without a prompt part too
    return write_jsonl(d / "add.jsonl", rows)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / a.abs().clamp_min(1e-6)).max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_streamed_statistics_equal_in_memory(models, data, family, tmp_path):
    """Activation sums, weight norms and the per-depth prompt centroids (the last one after the final norm)."""
    mem = premoe.calibrate(models[family], data, "mem", tmp_path / "s", stream=False, batch_size=3, progress=False)
    st = premoe.calibrate(models[family], data, "st", tmp_path / "s", stream=True, batch_size=3, progress=False)
    assert st.info["streamed"] and not mem.info["streamed"] and st.info["tokens"] == mem.info["tokens"]
    assert set(st.means) == set(mem.means) and set(st.signature) == set(mem.signature)
    for k in mem.means:
        assert st.means[k].shape == mem.means[k].shape, k
        assert max_rel(mem.means[k], st.means[k]) <= 1e-4, k
    for k in mem.signature:
        torch.testing.assert_close(st.signature[k], mem.signature[k], rtol=1e-4, atol=1e-6)
    # what the verbs read back from the store is the same too
    loaded = PatternStore.open(tmp_path / "s").load("st")
    torch.testing.assert_close(loaded.means["o.var"], mem.means["o.var"], rtol=1e-4, atol=1e-7)


def test_hidden_states_spill_to_disk_without_changing_results(models, tmp_path):
    info = inspect_dense(models["llama"])
    tok = load_tokenizer(info.path)
    texts = [r["prompt"] + r["completion"] for r in samples("add", 5, "calib")]
    prompts = [r["prompt"] for r in samples("add", 5, "calib")]
    kept = observe_dense_streamed(info, tok, texts, prompts, batch_size=2, progress=False)
    spilled = observe_dense_streamed(
        info, tok, texts, prompts, batch_size=2, progress=False, hidden_budget=0, offload_dir=str(tmp_path)
    )
    assert kept[3]["spilled"] == 0 and spilled[3]["spilled"] > 0
    assert not list(tmp_path.iterdir())  # the hidden-state file is gone
    for k in kept[0]:
        assert torch.equal(kept[0][k], spilled[0][k]), k
    assert torch.equal(kept[2], spilled[2])
    # one decoder layer held at a time; every tensor read at most once (the LM head never)
    assert spilled[3]["largest_layer"] <= dense_sizes(info)["largest_layer"]
    assert spilled[3]["bytes_read"] <= info.checkpoint.nbytes


def test_streaming_is_chosen_when_the_model_does_not_fit(models, data, tmp_path):
    info = inspect_dense(models["llama"])
    sizes = dense_sizes(info)
    act = activation_bytes(info, 2, 32)
    # room for the largest layer and a batch, not for the whole model
    budget_mb = (sizes["largest_layer"] + act + (sizes["total"] - sizes["largest_layer"]) / 2) / 2**20
    p = premoe.calibrate(
        info.path, data, "t", tmp_path / "s", max_memory=budget_mb, batch_size=2, max_length=32, progress=False
    )
    assert p.info["streamed"] is True and PatternStore.open(tmp_path / "s").tasks["t"]["streamed"] is True
    q = premoe.calibrate(info.path, data, "u", tmp_path / "s", batch_size=2, max_length=32, progress=False)
    assert q.info["streamed"] is False
    for k in q.means:
        assert max_rel(q.means[k], p.means[k]) <= 1e-4, k


def test_cli_says_it_streamed(models, data, tmp_path, capsys):
    code = main(
        [
            "-q",
            "calibrate",
            "--model",
            str(models["llama"]),
            "--data",
            str(data),
            "--task",
            "t",
            "--store",
            str(tmp_path / "s"),
            "--stream",
            "--offload-dir",
            str(tmp_path),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "streamed layer by layer" in out


def test_bad_input_is_one_line(models, data, tmp_path, capsys):
    src = models["llama"]
    with pytest.raises(InputError, match="too small for even one layer"):
        premoe.calibrate(src, data, "t", tmp_path / "s", max_memory=0.01, stream=True, progress=False)
    with pytest.raises(InputError, match="`max_memory` must be a number > 0"):
        premoe.calibrate(src, data, "t", tmp_path / "s", max_memory=-1, progress=False)
    with pytest.raises(InputError, match="`offload_dir`"):
        premoe.calibrate(src, data, "t", tmp_path / "s", stream=True, offload_dir=tmp_path / "missing", progress=False)
    with pytest.raises(InputError, match="`stream` does not apply to dense models in `premoe eval`"):
        premoe.evaluate(src, data, stream=True, progress=False)
    assert not (tmp_path / "s").exists()
    code = main(
        [
            "-q",
            "calibrate",
            "--model",
            str(src),
            "--data",
            str(data),
            "--task",
            "t",
            "--store",
            str(tmp_path / "s"),
            "--stream",
            "--max-memory",
            "0.01",
        ]
    )
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("premoe: error:") and len(err.strip().splitlines()) == 1
