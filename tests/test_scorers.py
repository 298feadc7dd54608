"""Expert-importance scorers: hand-computed examples, expert-output statistics, pooling."""

import pytest
import torch
import torch.nn.functional as F

import premoe
from premoe.core.data import write_jsonl
from premoe.core.options import RunOptions
from premoe.moe.kernels import expert_forward
from premoe.moe.loading import load_model
from premoe.moe.observe import Recording, marker_params, observe
from premoe.moe.scoring import SCORERS, output_markers, pool_means, score, weight_ratio

IDX = torch.tensor([[0, 1], [1, 2]])
W = torch.tensor([[0.6, 0.4], [0.7, 0.3]])
NORMS = torch.tensor([[2.0, 1.0], [3.0, 4.0]])
GAIN = torch.tensor([0.5, 1.0])


def test_output_markers_by_hand():
    m = {k: v.sum(0).tolist() for k, v in output_markers(IDX, W, NORMS, GAIN, 3).items()}
    assert m["reap"] == pytest.approx([0.6 * 2, 0.4 * 1 + 0.7 * 3, 0.3 * 4])
    assert m["ean"] == pytest.approx([2.0, 1.0 + 3.0, 4.0])
    assert m["easyep"] == pytest.approx([0.6 * 2 * 0.5, 0.4 * 1 * 0.5 + 0.7 * 3 * 1.0, 0.3 * 4 * 1.0])


def test_reap_and_ean_are_means_over_routed_tokens():
    sums = {k: v.sum(0, keepdim=True) / 2 for k, v in output_markers(IDX, W, NORMS, GAIN, 3).items()}  # means over T=2
    sums["count"] = torch.tensor([[1.0, 2.0, 1.0]]) / 2
    assert score("reap", sums, (1, 3)).tolist()[0] == pytest.approx([1.2, 2.5 / 2, 1.2])
    assert score("ean", sums, (1, 3)).tolist()[0] == pytest.approx([2.0, 2.0, 4.0])
    assert score("easyep", sums, (1, 3)).tolist()[0] == pytest.approx([0.3, 1.15, 0.6])
    sums["count"][0, 2] = 0  # never routed: score 0, not a division by zero
    assert score("reap", sums, (1, 3))[0, 2] == 0


def test_weight_ratio_by_hand():
    assert weight_ratio([torch.tensor([1.0, -1.0]), torch.tensor([[1.0, -1.0]])]) == pytest.approx(1.0)
    assert weight_ratio([torch.tensor([3.0, 0.0, 0.0, 0.0])]) == pytest.approx(1.5 / 0.75)  # RMS / mean|w|


def test_missing_statistics_name_the_fix():
    with pytest.raises(ValueError, match="recalibrate with `scorer='reap'` or `all_stats=True`"):
        score("reap", {"tcess": torch.zeros(1, 3)}, (1, 3))
    with pytest.raises(ValueError, match="unknown scorer"):
        score("magic", {}, (1, 3))
    assert torch.equal(score("random", None, (2, 3), seed=4), score("random", None, (2, 3), seed=4))


def test_pool_means_is_token_weighted():
    a = {"x": torch.tensor([[1.0, 0.0]])}
    b = {"x": torch.tensor([[0.0, 1.0]]), "only_b": torch.ones(1, 2)}
    pooled, tokens = pool_means([(a, 1), (b, 3)])
    assert tokens == 4 and set(pooled) == {"x"}
    assert pooled["x"].tolist() == [[0.25, 0.75]]


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "deepseek_v3", "granitemoe"])
def test_expert_forward_reproduces_the_experts_module(family, family_dir):
    lm = load_model(family_dir(family), device="cpu", dtype="float32")  # the formula, not bf16 rounding
    layer = lm.layers[0]
    torch.manual_seed(0)
    h = torch.randn(12, lm.model.config.hidden_size)
    out = layer.router(h)
    w, idx = out[1], out[2]
    expected = layer.experts(h, idx, w)
    mine = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for s in range(idx.shape[1]):
            mine[t] += w[t, s] * expert_forward(layer.experts, int(idx[t, s]), h[t : t + 1])[0]
    torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


def test_output_statistics_match_a_brute_force_computation(family_dir):
    """Mixtral: REAP/EAN/EASY-EP sums of the observer vs. a naive SwiGLU re-implementation."""
    lm = load_model(family_dir("mixtral"), device="cpu")
    texts = ["add 12+30=42", "reverse abcd=dcba"]
    params = marker_params(lm.info.router, "tcess", None, None)
    sums = observe(
        lm.model,
        lm.layers,
        lm.info,
        lm.tokenizer,
        texts,
        Recording(params, outputs=True),
        run=RunOptions(batch_size=2, progress=False),
    )
    layer = lm.layers[1]
    dec = lm.model.model.layers[1]
    captured = {}
    h1 = dec.post_attention_layernorm.register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0]))
    h2 = layer.experts.register_forward_hook(lambda m, a, o: captured.update(h=a[0], idx=a[1], w=a[2], r=o))
    reap, ean, easy = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    E = layer.experts
    try:
        for text in texts:  # one sample at a time: no padding to mask
            with torch.no_grad():
                lm.model(**lm.tokenizer(text, return_tensors="pt"))
            x = captured["x"].reshape(-1, captured["x"].shape[-1])
            gain = (1 - F.cosine_similarity(x, x + captured["r"], dim=-1)).clamp_min(0)
            for t in range(x.shape[0]):
                for s in range(captured["idx"].shape[1]):
                    e = int(captured["idx"][t, s])
                    gate, up = (captured["h"][t] @ E.gate_up_proj[e].T).chunk(2)
                    y = E.down_proj[e] @ (F.silu(gate) * up)
                    wt = float(captured["w"][t, s])
                    reap[e] += wt * y.norm()
                    ean[e] += y.norm()
                    easy[e] += wt * y.norm() * gain[t]
    finally:
        h1.remove()
        h2.remove()
    torch.testing.assert_close(sums.sums["reap"][1].float(), reap, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sums.sums["ean"][1].float(), ean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sums.sums["easyep"][1].float(), easy, rtol=1e-4, atol=1e-5)


def test_all_stats_give_every_scorer(family_dir, tmp_path, small_data):
    src = family_dir("qwen2_moe")
    p = premoe.calibrate(src, small_data, "t", tmp_path / "s", all_stats=True, progress=False)
    assert {"tcess", "count", "official", "prob", "reap", "ean", "easyep", "weights"} <= set(p.means)
    for name in SCORERS:
        s = score(name, p.means, tuple(p.scores.shape))
        assert s.shape == p.scores.shape and torch.isfinite(s).all()
    plans = {name: premoe.plan(src, tmp_path / "s", "t", 4, scorer=name).kept for name in ("tcess", "reap", "weights")}
    assert all(len(k) == 4 for kept in plans.values() for k in kept.values())


def test_weights_scorer_needs_no_forward_pass(family_dir, tmp_path, small_data, monkeypatch):
    import premoe.moe.calibration as cal

    monkeypatch.setattr(cal, "as_loaded", lambda *a, **k: pytest.fail("weights must not run the model"))
    p = premoe.calibrate(family_dir("gpt_oss"), small_data, "t", tmp_path / "s", scorer="weights", progress=False)
    assert set(p.means) == {"weights"} and (p.scores >= 1).all()  # RMS >= mean|w|


def test_scorer_without_its_statistics_is_refused(family_dir, tmp_path, small_data):
    src = family_dir("mixtral")
    premoe.calibrate(src, small_data, "t", tmp_path / "s", scorer="tcess", progress=False)  # router statistics only
    with pytest.raises(premoe.PremoeError, match="recalibrate with `scorer='reap'`"):
        premoe.plan(src, tmp_path / "s", "t", 4, scorer="reap")


def test_pooled_pattern_equals_calibrating_on_all_samples(family_dir, tmp_path):
    src = family_dir("deepseek_v3")
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "add 1+2=", "completion": "3"}, {"text": "add 40+2=42"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "reverse abc=", "completion": "cba"}])
    for name, files in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        premoe.calibrate(src, files, name, tmp_path / "s", all_stats=True, progress=False)
    pooled = premoe.pooled_pattern(tmp_path / "s", ["a", "b"])
    joint = premoe.core.store.PatternStore.open(tmp_path / "s").load("ab")
    assert pooled.info["tokens"] == joint.info["tokens"]
    for k in set(joint.means) - {"recon"}:
        torch.testing.assert_close(pooled.means[k], joint.means[k], rtol=1e-5, atol=1e-6)
    pa, pb = (premoe.core.store.PatternStore.open(tmp_path / "s").load(n) for n in "ab")
    ta, tb = pa.info["tokens"], pb.info["tokens"]  # recon is a ranking: pooled, the rankings' token-weighted mean
    torch.testing.assert_close(pooled.means["recon"], (ta * pa.means["recon"] + tb * pb.means["recon"]) / (ta + tb))
    agnostic = premoe.plan(src, tmp_path / "s", None, 4, agnostic=True)
    assert agnostic.task == "all-tasks"
    with pytest.raises(premoe.PremoeError, match="either `task` or `agnostic`"):
        premoe.plan(src, tmp_path / "s", "a", 4, agnostic=True)


def test_cli_scorer_names_match_the_table():
    from premoe.moe.options import SCORER_NAMES

    assert SCORER_NAMES == tuple(SCORERS)
