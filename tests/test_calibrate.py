"""Calibration: streaming sums, padding, hooks, scorer semantics, data files and bad input."""

import pytest
import torch

import premoe
from premoe.core.data import iter_samples, write_jsonl
from premoe.core.options import RunOptions
from premoe.core.store import PatternStore
from premoe.errors import InputError, MissingFileError, UnsupportedModelError
from premoe.moe.loading import load_model
from premoe.moe.observe import Recording, RouterObserver, marker_params, observe

TEXTS = ["add 1+2=3", "reverse abcdef=fedcba", "sort 9382=2389", "count a in abca=2", "shift ab=bc"]


def test_batching_and_padding_do_not_change_statistics(family_dir):
    lm = load_model(family_dir("deepseek_v3"), device="cpu")
    params = marker_params(lm.info.router, "tcess", None, None)
    one = observe(
        lm.model,
        lm.layers,
        lm.info,
        lm.tokenizer,
        TEXTS,
        Recording(params),
        run=RunOptions(batch_size=1, progress=False),
    )
    many = observe(
        lm.model,
        lm.layers,
        lm.info,
        lm.tokenizer,
        TEXTS,
        Recording(params),
        run=RunOptions(batch_size=5, progress=False),
    )
    assert one.tokens == many.tokens == sum(len(lm.tokenizer(t).input_ids) for t in TEXTS)
    for name in one.sums:
        torch.testing.assert_close(one.sums[name], many.sums[name], rtol=1e-5, atol=1e-6)


def test_tcess_mass_per_token_is_one_for_renormalising_router(family_dir):
    lm = load_model(family_dir("mixtral"), device="cpu")
    means = observe(
        lm.model,
        lm.layers,
        lm.info,
        lm.tokenizer,
        TEXTS,
        Recording(marker_params(lm.info.router, "tcess", None, None)),
        run=RunOptions(progress=False),
    ).means()
    torch.testing.assert_close(means["tcess"].sum(-1), torch.ones(len(lm.layers)))  # weights sum to 1 per token
    torch.testing.assert_close(means["count"].sum(-1), torch.full((len(lm.layers),), 2.0))  # top-2


def test_hooks_are_removed_even_when_the_pass_fails(family_dir):
    lm = load_model(family_dir("gpt_oss"), device="cpu")
    params = marker_params(lm.info.router, "tcess", None, None)
    with pytest.raises(RuntimeError, match="boom"):
        with RouterObserver(lm.layers, lm.info.router, lm.info.spec, params):
            assert all(len(m.router._forward_hooks) == 1 for m in lm.layers)
            raise RuntimeError("boom")
    assert all(len(m.router._forward_hooks) == 0 for m in lm.layers)


def test_samples_are_streamed_not_loaded_up_front(family_dir):
    lm = load_model(family_dir("mixtral"), device="cpu")
    consumed = []

    def gen():
        for i in range(1000):
            consumed.append(i)
            yield TEXTS[i % len(TEXTS)]

    first_forward = []
    handle = lm.layers[0].router.register_forward_hook(
        lambda *a: first_forward.append(len(consumed)) if not first_forward else None
    )
    try:
        sums = observe(
            lm.model,
            lm.layers,
            lm.info,
            lm.tokenizer,
            gen(),
            Recording(marker_params(lm.info.router, "tcess", None, None)),
            run=RunOptions(batch_size=32, progress=False),
        )
    finally:
        handle.remove()
    assert first_forward[0] <= 256  # one sorting window, not the whole stream
    assert sums.tokens > 0 and all(s.shape == (len(lm.layers), 8) for s in sums.sums.values())


def test_k_and_r_are_recorded_and_change_scores(family_dir, tmp_path, small_data):
    src = family_dir("qwen3_moe")  # renormalises over the chosen experts
    a = premoe.calibrate(src, small_data, "a", tmp_path / "s", scorer="tcess", progress=False)
    b = premoe.calibrate(src, small_data, "b", tmp_path / "s", scorer="tcess", r=0.5, progress=False)
    assert PatternStore.open(tmp_path / "s").tasks["b"]["params"]["r"] == 0.5
    assert (b.scores <= a.scores + 1e-6).all() and not torch.allclose(a.scores, b.scores)  # r drops minor shares
    c = premoe.calibrate(src, small_data, "c", tmp_path / "s", scorer="tcess", k=1, progress=False)
    torch.testing.assert_close(c.scores, c.means["count"])  # k=1, renormalised: weight 1 -> top-1 frequency
    torch.testing.assert_close(c.scores.sum(-1), torch.ones(3))
    off = premoe.calibrate(src, small_data, "d", tmp_path / "s", scorer="official", progress=False)
    assert PatternStore.open(tmp_path / "s").tasks["d"]["params"]["official_k"] == 1
    assert torch.equal(off.scores, off.means["official"])


def test_random_scorer_is_seeded_and_needs_no_forward(family_dir, tmp_path, small_data, monkeypatch):
    import premoe.moe.calibration as cal

    monkeypatch.setattr(cal, "as_loaded", lambda *a, **k: pytest.fail("random must not load weights"))
    src = family_dir("olmoe")
    a = premoe.calibrate(src, small_data, "a", tmp_path / "s", scorer="random", seed=1, progress=False)
    b = premoe.calibrate(src, small_data, "b", tmp_path / "s", scorer="random", seed=1, progress=False)
    c = premoe.calibrate(src, small_data, "c", tmp_path / "s", scorer="random", seed=2, progress=False)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    assert a.info["tokens"] > 0


def test_data_formats(tmp_path):
    jl = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "xyz"}])
    assert list(iter_samples(jl)) == ["ab", "xyz"]
    txt = tmp_path / "d.txt"
    txt.write_text("one\n\n two \n")
    assert list(iter_samples(txt)) == ["one", " two "]
    assert list(iter_samples(txt, max_samples=1)) == ["one"]


@pytest.mark.parametrize(
    "content, suffix, match",
    [
        ("", ".jsonl", "holds no samples"),
        ("\n\n", ".txt", "holds no samples"),
        ('{"text": "ok"}\n{bad json\n', ".jsonl", r"d.jsonl:2: invalid JSON"),
        ('{"prompt": "only prompt"}\n', ".jsonl", r"d.jsonl:1: expected an object"),
        ('["text"]\n', ".jsonl", "expected an object"),
        ("x", ".csv", "unsupported extension"),
    ],
)
def test_bad_data_files_fail_before_loading_the_model(family_dir, tmp_path, monkeypatch, content, suffix, match):
    import premoe.moe.calibration as cal

    monkeypatch.setattr(cal, "as_loaded", lambda *a, **k: pytest.fail("must fail before loading weights"))
    f = tmp_path / f"d{suffix}"
    f.write_text(content)
    with pytest.raises(InputError, match=match):
        premoe.calibrate(family_dir("mixtral"), f, "t", tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_bad_arguments(family_dir, tmp_path, small_data):
    src = family_dir("mixtral")
    with pytest.raises(MissingFileError, match="does not exist"):
        premoe.calibrate(tmp_path / "nomodel", small_data, "t", tmp_path / "s")
    with pytest.raises(MissingFileError, match="data file"):
        premoe.calibrate(src, tmp_path / "nodata.jsonl", "t", tmp_path / "s")
    with pytest.raises(InputError, match="invalid task name"):
        premoe.calibrate(src, small_data, "../evil", tmp_path / "s")
    with pytest.raises(InputError, match="`scorer` must be one of"):
        premoe.calibrate(src, small_data, "t", tmp_path / "s", scorer="magic")
    with pytest.raises(InputError, match="`k` must be between"):
        premoe.calibrate(src, small_data, "t", tmp_path / "s", k=9)
    with pytest.raises(InputError, match="`r` must be"):
        premoe.calibrate(src, small_data, "t", tmp_path / "s", r=1.5)
    assert not (tmp_path / "s").exists()


def test_unsupported_architecture_lists_supported(tmp_path, small_data):
    from transformers import BloomConfig, BloomForCausalLM

    BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(
        tmp_path / "bloom"
    )
    with pytest.raises(
        UnsupportedModelError,
        match=r"'bloom'.*deepseek_v3.*gpt_oss.*mixtral.*olmoe.*qwen3_moe.*dense families: .*llama",
    ):
        premoe.calibrate(tmp_path / "bloom", small_data, "t", tmp_path / "s")


def test_missing_weights_and_corrupt_checkpoint(family_dir, tmp_path, small_data):
    import shutil

    from premoe.errors import CheckpointError

    src = family_dir("mixtral")
    broken = tmp_path / "m"
    shutil.copytree(src, broken)
    (broken / "model.safetensors").write_bytes(b"\x00\x01")
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        premoe.calibrate(broken, small_data, "t", tmp_path / "s")
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MissingFileError, match="never loads"):
        premoe.calibrate(broken, small_data, "t", tmp_path / "s")
