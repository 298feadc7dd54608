"""premoe.moe.routing reproduces every family's router, and the scorers' markers on hand-computed inputs."""

import pytest
import torch

from premoe.moe.arch import RouterSpec
from premoe.moe.routing import route
from premoe.moe.scoring import MarkerParams, layer_markers, official_marker, selection_marker, tcess_marker

SOFTMAX = RouterSpec("softmax", num_experts=4, top_k=2, renormalize=True)


def test_tcess_marker_is_routing_weight_of_chosen_experts():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 0.0]])
    idx, w = route(logits, SOFTMAX)
    m = tcess_marker(idx, w, 4)
    p0 = torch.softmax(logits[0], 0)
    assert torch.allclose(m[0], torch.tensor([p0[0] / (p0[0] + p0[1]), p0[1] / (p0[0] + p0[1]), 0, 0]))
    # second token: expert 2 plus the lowest-index tie among the others
    assert m[1, 2] > 0.5 and m[1].sum().item() == pytest.approx(1.0)


def test_tcess_threshold_r_drops_small_shares():
    idx = torch.tensor([[0, 1]])
    w = torch.tensor([[0.9, 0.1]])
    assert tcess_marker(idx, w, 3, r=0.2).tolist() == [[pytest.approx(0.9), 0.0, 0.0]]
    assert tcess_marker(idx, w, 3, r=None).tolist() == [[pytest.approx(0.9), pytest.approx(0.1), 0.0]]


def test_official_marker_inverts_ranking_with_negative_logits():
    # Expert 0 wins every token with a negative logit; expert 1 never wins.
    logits = torch.tensor([[-0.5, -2.0, -3.0], [-0.4, -2.5, -1.0]])
    off = official_marker(logits, k=1).mean(0)
    assert off.tolist() == pytest.approx([-0.45, 0.0, 0.0])
    assert off[0] < off[1]  # the always-chosen expert ranks below a never-chosen one
    sig = RouterSpec("sigmoid", num_experts=3, top_k=1, renormalize=True)
    idx, w = route(logits, sig)
    tcess = tcess_marker(idx, w, 3).mean(0)
    assert tcess.argmax().item() == 0  # TCESS ranks the expert the router actually picks first


def test_frequency_marker_counts_selections():
    idx = torch.tensor([[0, 2], [2, 1]])
    assert selection_marker(idx, 3).sum(0).tolist() == [1.0, 1.0, 2.0]


def test_group_limited_route_only_uses_best_groups():
    spec = RouterSpec(
        "sigmoid", num_experts=4, top_k=2, renormalize=True, n_group=2, topk_group=1, group_score="top2sum"
    )
    logits = torch.tensor([[3.0, -3.0, 2.0, 1.9]])  # group 0 = {0,1}: 0.95+0.05; group 1 = {2,3}: 0.88+0.87
    idx, w = route(logits, spec)
    assert sorted(idx[0].tolist()) == [2, 3]  # expert 0 has the best score but its group loses
    assert w.sum().item() == pytest.approx(1.0)


def test_layer_markers_sum_to_one_per_token_for_renormalising_router():
    logits = torch.randn(10, 4)
    marks = layer_markers(logits, SOFTMAX, MarkerParams(k=2))
    assert torch.allclose(marks["tcess"].sum(1), torch.ones(10))
    assert torch.equal(marks["count"].sum(1), torch.full((10,), 2.0))
    assert torch.allclose(marks["prob"].sum(1), torch.ones(10))
