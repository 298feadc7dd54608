"""The ``recon`` scorer (premoe.moe.recon): exact re-routing by exclusion, the error algebra against a
brute-force pruned block, the greedy elimination, and its place in calibration."""

import pytest
import torch

import premoe
from premoe.core.data import write_jsonl
from premoe.errors import UnsupportedModelError
from premoe.moe.arch import RouterSpec
from premoe.moe.kernels import expert_forward
from premoe.moe.loading import load_model
from premoe.moe.model import inspect_model
from premoe.moe.recon import damage, eliminate, routed_error, token_stats, unsupported
from premoe.moe.routing import route
from premoe.testing import random_kept, sliced_router

ROWS = [{"prompt": f"add {i}+{i + 3}=", "completion": str(2 * i + 3)} for i in range(6)] + [{"text": "sort 321=123"}]


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen2_moe"])
@torch.no_grad()
def test_routed_error_is_the_pruned_blocks_error(family, family_dir):
    """With every expert a candidate, the error from the per-token statistics equals the error of the
    pruned block computed expert by expert (renormalised, sigmoid + groups + bias, softmax over the
    chosen with expert biases, and a softmax over all experts that is not renormalised)."""
    lm = load_model(family_dir(family), device="cpu", dtype="float32")
    layer, spec = lm.layers[0], lm.info.router
    E, T = spec.num_experts, 40
    torch.manual_seed(0)
    h = torch.randn(T, lm.model.config.hidden_size)
    out = layer.router(h)
    z = (out[spec.logits_at] if isinstance(out, (tuple, list)) else out).float()
    bias = layer.selection_bias()
    outs = torch.stack([expert_forward(layer.experts, e, h) for e in range(E)], 1)  # [T, E, D]
    idx, w = route(z, spec, bias=bias, scaled=True)
    dense = (outs.gather(1, idx[..., None].expand(-1, -1, h.shape[1])) * w[..., None]).sum(1)
    x = torch.randn(T, h.shape[1])  # the residual stream entering the block
    st = token_stats(z, torch.arange(E).expand(T, E), outs, dense, x)
    assert routed_error(st, spec, bias, torch.zeros(E, dtype=torch.bool)).max() < 1e-4
    keep = max(spec.top_k, E // 2)
    if spec.group_limited:
        keep = keep // spec.n_group * spec.n_group
    kept = random_kept(spec, keep, 1)
    gone = torch.ones(E, dtype=torch.bool)
    gone[kept] = False
    sidx, sw = route(z[:, kept], sliced_router(spec, keep), bias=None if bias is None else bias[kept], scaled=True)
    pruned = (outs.gather(1, torch.tensor(kept)[sidx][..., None].expand(-1, -1, h.shape[1])) * sw[..., None]).sum(1)
    want = ((pruned - dense) ** 2).sum(-1)
    got = routed_error(st, spec, bias, gone)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * float(want.max()))
    cos = torch.nn.functional.cosine_similarity((x + pruned).double(), (x + dense).double(), dim=-1)
    torch.testing.assert_close(damage(st, spec, bias, gone), 1 - cos, rtol=1e-3, atol=1e-6)


def synthetic(E=6, T=200, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = RouterSpec("softmax", num_experts=E, top_k=2, renormalize=True)
    z = torch.randn(T, E, generator=g)
    outs = torch.randn(T, E, D, generator=g)
    idx, w = route(z, spec, scaled=True)
    dense = (outs.gather(1, idx[..., None].expand(-1, -1, D)) * w[..., None]).sum(1)
    return spec, z, outs, dense


def test_first_removal_is_the_cheapest_single_removal():
    spec, z, outs, dense = synthetic()
    E, T = spec.num_experts, z.shape[0]
    st = token_stats(z, torch.arange(E).expand(T, E), outs, dense, torch.randn(T, outs.shape[-1]))
    for objective, cost in (("damage", damage), ("error", routed_error)):
        scores = eliminate(st, spec, objective=objective)
        assert sorted(scores.tolist()) == pytest.approx([i / (E - 1) for i in range(E)])  # a ranking
        single = []
        for e in range(E):
            gone = torch.zeros(E, dtype=torch.bool)
            gone[e] = True
            single.append(float(cost(st, spec, None, gone).sum()))
        assert int(scores.argmin()) == min(range(E), key=single.__getitem__)


def test_an_expert_nobody_uses_goes_first_and_a_unique_one_last():
    spec, z, outs, dense = synthetic()
    z[:, 4] = -30.0  # never routed: removing it changes nothing
    z[:, 1] += 3.0  # routed to by nearly every token, with a large share
    idx, w = route(z, spec, scaled=True)
    D = outs.shape[-1]
    dense = (outs.gather(1, idx[..., None].expand(-1, -1, D)) * w[..., None]).sum(1)
    E, T = spec.num_experts, z.shape[0]
    x = torch.randn(T, D) * 0.1
    scores = eliminate(token_stats(z, torch.arange(E).expand(T, E), outs, dense, x), spec)
    assert int(scores.argmin()) == 4 and int(scores.argmax()) == 1


def test_group_limited_elimination_keeps_groups_balanced():
    g = torch.Generator().manual_seed(0)
    spec = RouterSpec(
        "sigmoid", num_experts=16, top_k=2, renormalize=True, n_group=4, topk_group=2, group_score="top2sum"
    )
    T, D = 150, 6
    z = torch.randn(T, 16, generator=g)
    z[:, :4] += 2.0  # group 0 is the favourite: a free choice would keep it all
    outs = torch.randn(T, 16, D, generator=g)
    bias = torch.randn(16, generator=g) * 0.1
    idx, w = route(z, spec, bias=bias, scaled=True)
    dense = (outs.gather(1, idx[..., None].expand(-1, -1, D)) * w[..., None]).sum(1)
    scores = eliminate(token_stats(z, torch.arange(16).expand(T, 16), outs, dense, torch.randn(T, D)), spec, bias)
    for keep in (4, 8, 12):
        best = scores.argsort(descending=True)[:keep]
        assert torch.bincount(best // 4, minlength=4).tolist() == [keep // 4] * 4


def test_calibrate_with_recon_and_prune(family_dir, tmp_path):
    src = family_dir("mixtral")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    pat = premoe.calibrate(src, data, "t", tmp_path / "s", scorer="recon", progress=False)
    E = pat.scores.shape[1]
    assert "recon" in pat.means and pat.info["scorer"] == "recon"
    for row in pat.scores:  # one full ranking per layer
        assert sorted(row.tolist()) == pytest.approx([i / (E - 1) for i in range(E)])
    res = premoe.prune(src, tmp_path / "s", "t", keep=E // 2, out=tmp_path / "out", refit=False, progress=False)
    assert res.plan.scorer == "recon"
    for pos, layer in enumerate(pat.layers):  # the kept experts are the last ones eliminated
        assert res.plan.kept[layer] == sorted(pat.scores[pos].argsort(descending=True)[: E // 2].tolist())


@pytest.mark.parametrize("family", ["llama4_text", "longcat_flash"])
def test_recon_refuses_what_it_cannot_score_and_all_stats_skips_it(family, family_dir, tmp_path):
    src = family_dir(family)
    info = inspect_model(src)
    assert unsupported(info.router, info.spec.weight_on_input, True)
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(UnsupportedModelError, match="use `scorer='easyep'`"):
        premoe.calibrate(src, data, "t", tmp_path / "s", scorer="recon", progress=False)
    pat = premoe.calibrate(src, data, "t", tmp_path / "s", all_stats=True, progress=False)
    assert "recon" not in pat.means and "easyep" in pat.means


def test_the_token_budget_is_filled_across_batches():
    """A layer's statistics stop at the budget, mid-batch, and equal one pass over the same first tokens."""
    from premoe.moe.recon import LayerRecon

    spec, z, outs, dense = synthetic(T=50)
    h = torch.randn(50, outs.shape[-1])
    W = torch.randn(spec.num_experts, outs.shape[-1], outs.shape[-1])
    fwd = lambda e, x: x @ W[e]  # noqa: E731  linear experts
    one, two = LayerRecon(spec, tokens=30), LayerRecon(spec, tokens=30)
    one.add(fwd, h[:30], z[:30], None, h[:30], dense[:30])
    for part in (slice(0, 20), slice(20, 50)):  # the second batch crosses the budget
        two.add(fwd, h[part], z[part], None, h[part], dense[part])
    assert two.full and two.seen == 30
    torch.testing.assert_close(one.finish(), two.finish())
