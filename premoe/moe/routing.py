"""Family routing, reproduced as pure tensor functions.

:func:`route` turns router logits into the experts a token is sent to and the weights the model
really applies, for any k, following the family's own rule (a :class:`~premoe.moe.arch.RouterSpec`;
``tests/test_routing.py`` checks it against every family's transformers module). Legend: T =
tokens, E = routed experts, S = router slots (E plus zero-computation experts), k = experts per token.
"""

from __future__ import annotations

import torch

from premoe.moe.arch import RouterSpec


def gate_scores(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None):
    """Per-expert probabilities and the scores experts are chosen by.

    Args:
        logits: [T, S] router logits as the router module returns them (GPT-OSS: bias included;
            DeepSeek-V3: pre-sigmoid, correction bias excluded).
        spec: the model's routing semantics.
        bias: selection-only bias [S] (DeepSeek-V3 ``e_score_correction_bias``...).

    Returns:
        ``(probs, choice)``, both [T, S] float32. ``probs`` is the family's gate probability over all
        experts (softmax or sigmoid; for routers that choose on raw logits, the softmax over all
        experts, as a soft preference).
    """
    z = logits.float()
    if spec.score == "sigmoid":
        probs = z.sigmoid()
    else:
        probs = z.softmax(dim=-1)
    choice = z if spec.score == "logits" else probs
    if bias is not None:
        choice = (z if spec.bias_on_logits else choice) + bias.float()
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


def sparsemixer(logits: torch.Tensor, k: int, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's routing at inference: round by round, the best remaining expert, weighted by the
    softmax over the logits within a relative margin (2 x ``jitter``) of it, earlier picks masked out."""
    z = logits.float()
    scores = z.clone()
    idx, weights = [], []
    for _ in range(k):
        top, arg = scores.max(dim=-1, keepdim=True)
        factor = z.abs().clamp(min=top)
        masked = scores.masked_fill((top - z) / factor > 2 * jitter, float("-inf"))
        weights.append(masked.softmax(dim=-1).gather(-1, arg))
        idx.append(arg)
        scores = scores.scatter(-1, arg, float("-inf"))
    return torch.cat(idx, dim=-1), torch.cat(weights, dim=-1)


def route(
    logits: torch.Tensor,
    spec: RouterSpec,
    k: int | None = None,
    bias: torch.Tensor | None = None,
    scaled: bool = False,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts each token is routed to and their routing weights.

    Args:
        logits: [T, S] router logits.
        spec: routing semantics.
        k: experts per token (default: the model's top-k).
        bias: selection-only bias [S].
        scaled: multiply by the family's constant factor (``routed_scaling_factor``...; off for
            scoring, a constant does not change rankings).
        exclude: [S] or [T, S] bool, experts that do not exist (pruned): the routing is the one of
            the model without them (their logits sliced out, the spec's expert count and groups
            reduced to match) as long as at least k survive in the groups a token may use; past
            that, excluded experts fill the missing places with weight 0.

    Returns:
        ``(indices, weights)``: [T, k] long and [T, k] float32; with ``k`` equal to the model's
        top-k these are exactly the router module's outputs (up to order within a row). Indices at
        or past ``spec.num_experts`` are zero-computation experts.
    """
    k = spec.top_k if k is None else k
    z = logits.float()
    if exclude is not None:  # softmax over the survivors; sigmoid 0; never chosen while enough survive
        z = z.masked_fill(exclude, float("-inf"))
    if spec.weights == "sparsemixer":
        indices, weights = sparsemixer(z, k, spec.jitter)
        return indices, weights * spec.scale if scaled else weights
    probs, choice = gate_scores(z, spec, bias)
    if exclude is not None:  # a sigmoid's 0 plus a selection bias would still compete
        choice = choice.masked_fill(exclude, float("-inf"))
    if spec.group_limited:
        choice = choice.masked_fill(~_group_mask(choice, spec), spec.group_fill)
        if exclude is not None:  # the fill of unused groups must not bring excluded experts back
            choice = choice.masked_fill(exclude, float("-inf"))
    indices = choice.topk(k, dim=-1).indices
    if spec.weights == "softmax":
        weights = z.gather(1, indices).softmax(dim=-1)
    elif spec.weights == "sigmoid":
        weights = z.gather(1, indices).sigmoid()
    else:
        weights = probs.gather(1, indices)
    if spec.renorm_p is not None:
        weights = weights / weights.norm(p=spec.renorm_p, dim=-1, keepdim=True)
    elif spec.renormalize:
        denom = weights.sum(dim=-1, keepdim=True) + spec.eps
        if spec.renorm_min is not None:
            denom = denom.clamp_min(spec.renorm_min)
        weights = weights / denom
    if exclude is not None:  # only where fewer than k survive: an excluded expert's place carries nothing
        gone = (exclude if exclude.dim() == 2 else exclude.expand(z.shape[0], -1)).gather(1, indices)
        weights = weights.nan_to_num(0.0).masked_fill(gone, 0.0)
    if scaled:
        weights = weights * spec.scale
    return indices, weights
