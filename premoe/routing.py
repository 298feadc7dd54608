"""Family routing, reproduced as pure tensor functions.

:func:`route` turns router logits into the experts a token is sent to and the weights the model
really applies, for any k, following the family's own router (checked against the transformers
modules by ``tests/test_routing.py``). Legend: T = tokens, E = routed experts, k = experts per token.
"""

from __future__ import annotations

import torch

from .arch import RouterSpec


def gate_scores(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None):
    """Per-expert probabilities and the scores experts are chosen by.

    Args:
        logits: [T, E] router logits as the router module returns them (GPT-OSS: bias included;
            DeepSeek-V3: pre-sigmoid, correction bias excluded).
        spec: the model's routing semantics.
        bias: DeepSeek-V3 ``e_score_correction_bias`` [E], added for choosing only.

    Returns:
        ``(probs, choice)``, both [T, E] float32. ``probs`` is the family's gate probability over all
        experts (softmax, sigmoid; softmax over all E for top-k-softmax routers, as a soft preference).
    """
    z = logits.float()
    if spec.kind == "sigmoid":
        probs = z.sigmoid()
        choice = probs if bias is None else probs + bias.float()
    elif spec.kind == "softmax":
        probs = z.softmax(dim=-1)
        choice = probs
    elif spec.kind == "topk_softmax":
        probs = z.softmax(dim=-1)
        choice = z
    else:  # pragma: no cover - guarded by the ArchSpec table
        raise ValueError(f"unknown router kind {spec.kind!r}")
    return probs, choice


def _group_mask(choice: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    # [T, G, E/G] -> per-group score -> keep the best topk_group groups
    grouped = choice.view(choice.shape[0], spec.n_group, -1)
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:  # "top2sum" (DeepSeek-V3): sum of the two best (biased) scores in the group
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
    group_idx = group_scores.topk(spec.topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
    return mask.unsqueeze(-1).expand_as(grouped).reshape_as(choice)


def route(
    logits: torch.Tensor,
    spec: RouterSpec,
    k: int | None = None,
    bias: torch.Tensor | None = None,
    scaled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each token is routed to and their routing weights.

    Args:
        logits: [T, E] router logits.
        spec: routing semantics.
        k: experts per token (default: the model's top-k).
        bias: selection-only bias (DeepSeek-V3).
        scaled: multiply by the family's constant ``routed_scaling_factor`` (off for scoring; a
            constant does not change rankings).

    Returns:
        ``(indices, weights)``: [T, k] long and [T, k] float32; with ``k`` equal to the model's
        top-k these are exactly the router module's outputs (up to order within a row).
    """
    k = spec.top_k if k is None else k
    probs, choice = gate_scores(logits, spec, bias)
    if spec.group_limited:
        # DeepSeek-V2 masks with 0 (probabilities are >= 0), DeepSeek-V3 with -inf.
        fill = 0.0 if spec.group_score == "max" else float("-inf")
        choice = choice.masked_fill(~_group_mask(choice, spec), fill)
    indices = choice.topk(k, dim=-1).indices
    if spec.kind == "topk_softmax":
        weights = logits.float().gather(1, indices).softmax(dim=-1)
    else:
        weights = probs.gather(1, indices)
        if spec.renormalize:
            eps = 1e-20 if spec.kind == "sigmoid" else 0.0
            weights = weights / (weights.sum(dim=-1, keepdim=True) + eps)
    if scaled:
        weights = weights * spec.scale
    return indices, weights
