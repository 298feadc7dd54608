"""The ``recon`` scorer: experts ranked by what the pruned block will output (issue 10, item 1).

Scores rank experts one at a time, but after pruning every token is re-routed to its best
*surviving* experts with renormalised weights. ``recon`` chooses by that: on a bounded number of
calibration tokens per layer (:data:`TOKENS`), it removes experts one by one (greedy backward
elimination), each time the one whose removal changes the layer's routed output least, the
re-routing done by the family's own rule (:func:`premoe.moe.routing.route` with the removed experts
excluded: top-k, renormalisation, selection bias, expert groups). The elimination order is one
nested ranking, so one calibration serves every keep count. With group-limited routers it removes
from the groups with the most survivors first, so every keep that is a multiple of the groups is
balanced (``--group-policy balanced``, the default).

A token's damage is how far the pruned block turns the residual stream leaving it,
``1 - cos(x + y', x + y)`` (``x``: the stream entering the block, ``y``/``y'``: the dense/pruned
routed output), which is what the next layer's norm sees and is bounded, so no single token
outweighs the rest. It is computed from per-token statistics, so the elimination needs no weights
and no forward pass: for each token its ``c`` candidate experts (the ones it is routed to, then the
best by routing score; :func:`candidates`), their outputs' Gram matrix ``G`` and their products with
``y`` and ``x``: a routing with weights ``w`` over the candidates gives ``y' = Y'w``, and every
product above is a quadratic in ``w``.
A token routed, after pruning, to an expert outside its candidates counts that expert's output as
zero (with ``c`` at least 4 x top-k and 32 this is rare; exact when ``c`` is every expert).

Memory: ``TOKENS x c^2`` floats per layer (8 MB for c = 32) until the layer's ranking is computed,
right after the layer has seen its tokens (streamed calibration: when the layer is freed).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from premoe.core.distributed import SINGLE, World, broadcast
from premoe.moe.arch import RouterSpec
from premoe.moe.kernels import slot_outputs
from premoe.moe.routing import gate_scores, route

TOKENS = 2048  # calibration tokens per layer the selection uses
MIN_CANDIDATES = 32  # candidate experts per token: at least this many (or all), and 4 x top-k
_CHUNK = 1 << 22  # elements per batched routing (rows x experts): bounds the elimination's memory


def candidate_count(spec: RouterSpec) -> int:
    return min(spec.num_experts, max(4 * spec.top_k, MIN_CANDIDATES))


def unsupported(spec: RouterSpec, weight_on_input: bool, has_experts: bool) -> str | None:
    """Why ``recon`` cannot score this family (``None`` when it can)."""
    if not has_experts:
        return "its experts cannot be run one by one"
    if weight_on_input:
        return "its routing weight scales the expert's input, not its output"
    if spec.slots:
        return "it has zero-computation experts"
    return None


def candidates(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None, c: int) -> torch.Tensor:
    """[T, c] each token's candidate experts: the ones the dense model routes it to, then its best by
    routing score (selection bias included, groups ignored)."""
    idx, _ = route(logits, spec, bias=bias)
    _, choice = gate_scores(logits, spec, bias)
    choice = choice[:, : spec.num_experts].scatter(1, idx, float("inf"))
    return choice.topk(c, dim=-1).indices


@dataclass
class TokenStats:
    """One layer's per-token statistics (T tokens, c candidates each), all on one device."""

    logits: torch.Tensor  # [T, S] router logits
    cand: torch.Tensor  # [T, c] candidate expert ids
    gram: torch.Tensor  # [T, c, c] products of the candidates' outputs
    cross: torch.Tensor  # [T, c] candidates' outputs . dense routed output y
    norm2: torch.Tensor  # [T] |y|^2
    rcross: torch.Tensor  # [T, c] candidates' outputs . residual x
    rnorm2: torch.Tensor  # [T] |x|^2
    rdot: torch.Tensor  # [T] x . y

    def apply(self, fn) -> "TokenStats":
        """``fn`` applied to every field."""
        return TokenStats(*(fn(getattr(self, f.name)) for f in fields(self)))

    def __getitem__(self, rows) -> "TokenStats":
        return self.apply(lambda t: t[rows])

    @classmethod
    def cat(cls, parts: list["TokenStats"]) -> "TokenStats":
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def token_stats(
    logits, cand, outs: torch.Tensor, target: torch.Tensor, residual: torch.Tensor | None = None
) -> TokenStats:
    """From the candidates' outputs [T, c, D], the dense routed output [T, D] and the residual stream
    entering the block [T, D] (default zero), the statistics :func:`damage` and :func:`routed_error` need."""
    outs, target = outs.float(), target.float()
    x = torch.zeros_like(target) if residual is None else residual.float()
    return TokenStats(
        logits.float(),
        cand,
        outs @ outs.transpose(1, 2),
        (outs @ target[:, :, None])[..., 0],
        (target * target).sum(-1),
        (outs @ x[:, :, None])[..., 0],
        (x * x).sum(-1),
        (x * target).sum(-1),
    )


def _candidate_weights(st: TokenStats, spec: RouterSpec, bias, exclude) -> torch.Tensor:
    """[T, c] the routing weight each candidate gets when ``exclude`` is removed (an expert routed to
    that is not a candidate is dropped)."""
    idx, w = route(st.logits, spec, bias=bias, scaled=True, exclude=exclude)
    match = st.cand[:, None, :] == idx[:, :, None]  # [T, k, c]
    return (match * w[..., None]).sum(1)


def _quad(wc: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    return (wc[:, None, :] @ gram @ wc[:, :, None])[:, 0, 0]


def routed_error(st: TokenStats, spec: RouterSpec, bias, exclude) -> torch.Tensor:
    """[T] squared error |y' - y|^2 of each token's routed output y' when ``exclude`` ([T, E] or [E]
    bool) is removed, against the dense one y."""
    wc = _candidate_weights(st, spec, bias, exclude)
    return (_quad(wc, st.gram) - 2 * (wc * st.cross).sum(-1) + st.norm2).clamp_min(0)


def damage(st: TokenStats, spec: RouterSpec, bias, exclude) -> torch.Tensor:
    """[T] ``1 - cos(x + y', x + y)``: how far removing ``exclude`` turns each token's residual stream
    leaving the block (what the next layer's norm sees; bounded, so no token outweighs the rest)."""
    wc = _candidate_weights(st, spec, bias, exclude).double()
    wy, wx = (wc * st.cross).sum(-1), (wc * st.rcross).sum(-1)
    dot = st.rnorm2 + st.rdot + wx + wy
    new2 = (st.rnorm2 + 2 * wx + _quad(wc, st.gram.double())).clamp_min(0)
    old2 = st.rnorm2 + 2 * st.rdot + st.norm2
    return (1 - dot / (new2 * old2).sqrt().clamp_min(1e-30)).clamp_min(0)


def _local(spec: RouterSpec) -> bool:
    """Whether removing an expert a token is not routed to leaves that token's routing as it is (no
    softmax denominator over all experts, no margin over all logits)."""
    if spec.weights == "sparsemixer":
        return False
    if spec.weights in ("softmax", "sigmoid") or spec.score == "sigmoid":
        return True
    return (spec.renormalize and spec.renorm_min is None) or spec.renorm_p is not None


def _affected(logits, spec: RouterSpec, bias, alive: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[T, E] bool: the (token, expert) pairs where removing the expert can change the token's output."""
    T, E = idx.shape[0], spec.num_experts
    if not _local(spec):
        return alive.expand(T, E).clone()
    out = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx, True)
    if spec.group_limited:  # removing a group's best (two best) changes that group's score
        _, choice = gate_scores(logits, spec, bias)
        choice = choice[:, :E].masked_fill(~alive, float("-inf")).view(T, spec.n_group, -1)
        m = 1 if spec.group_score == "max" else 2
        top = choice.topk(min(m, choice.shape[-1]), dim=-1).indices  # [T, G, m]
        top = top + (torch.arange(spec.n_group) * (E // spec.n_group))[None, :, None]
        out.scatter_(1, top.reshape(T, -1), True)
    return out & alive


OBJECTIVES = {"damage": damage, "error": routed_error}


def eliminate(st: TokenStats, spec: RouterSpec, bias=None, objective: str = "damage") -> torch.Tensor:
    """[E] scores in [0, 1] from greedy backward elimination (higher: removed later, keep first).

    Each step removes the surviving expert whose removal least raises the sum over tokens of
    ``objective`` (:func:`damage`, or :func:`routed_error`); ties go to the lower id. Group-limited
    routers: only experts of the groups with the most survivors are candidates for removal, so the
    survivors stay balanced.
    """
    cost = OBJECTIVES[objective]
    E = spec.num_experts
    alive = torch.ones(E, dtype=torch.bool)
    group = torch.arange(E) // (E // spec.n_group) if spec.group_limited else torch.zeros(E, dtype=torch.long)
    order: list[int] = []
    rows_per_chunk = max(1, _CHUNK // max(E, st.gram.shape[-1] ** 2))
    while alive.sum() > 1:
        dead = ~alive
        cur = cost(st, spec, bias, dead).double()
        idx, _ = route(st.logits, spec, bias=bias, exclude=dead)
        counts = torch.zeros(int(group.max()) + 1, dtype=torch.long).index_add_(0, group, alive.long())
        eligible = alive & (counts[group] == counts.max())
        t, e = (_affected(st.logits, spec, bias, alive, idx) & eligible).nonzero(as_tuple=True)
        delta = torch.zeros(E, dtype=torch.float64)
        for s in range(0, len(t), rows_per_chunk):
            tt, ee = t[s : s + rows_per_chunk], e[s : s + rows_per_chunk]
            excl = dead.expand(len(tt), E).clone()
            excl[torch.arange(len(tt)), ee] = True
            delta.index_add_(0, ee, cost(st[tt], spec, bias, excl).double() - cur[tt])
        delta[~eligible] = float("inf")
        out = int(torch.argmin(delta))  # first minimum: the lowest id among ties
        alive[out] = False
        order.append(out)
    order += alive.nonzero().flatten().tolist()
    scores = torch.zeros(E)
    scores[torch.tensor(order)] = torch.arange(E, dtype=torch.float32) / max(E - 1, 1)
    return scores


class LayerRecon:
    """Collects one MoE layer's per-token statistics from the calibration pass (first :data:`TOKENS`
    real tokens) and turns them into its ``recon`` scores."""

    def __init__(self, spec: RouterSpec, tokens: int = TOKENS, objective: str = "damage", shard: World = SINGLE):
        self.spec = spec
        self.tokens = tokens
        self.objective = objective
        self.shard = shard
        self.c = candidate_count(spec)
        self.parts: list[TokenStats] = []
        self.blocks: list[int] = []  # tokens recorded per call of :meth:`add` (one batch each)
        self.seen = 0
        self.bias: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.done = False

    @property
    def full(self) -> bool:
        return self.seen >= self.tokens

    @torch.inference_mode()
    def add(self, forward, hidden, logits, bias, residual, routed, mult: float = 1.0, chunk: int = 128) -> None:
        """Record up to the remaining budget of tokens: ``forward(e, x)`` runs expert ``e``; ``hidden``
        [T, D] the block input, ``logits`` [T, S], ``residual`` [T, D] the stream entering the block,
        ``routed`` [T, D] the dense routed output (routing weights and scale applied); ``mult``: the
        decoder layer's residual multiplier."""
        n = min(self.tokens - self.seen, hidden.shape[0])
        if n <= 0 or self.scores is not None:
            return
        self.bias = None if bias is None else bias.detach().float().cpu()
        hidden, logits, residual, routed = hidden[:n], logits[:n].float(), residual[:n], routed[:n]
        cand = candidates(logits, self.spec, None if bias is None else bias.float(), self.c)
        for s in range(0, n, chunk):
            cc, h = cand[s : s + chunk], hidden[s : s + chunk]
            outs = slot_outputs(cc, lambda e, rows: forward(e, h[rows]), h.shape[-1])
            st = token_stats(
                logits[s : s + chunk], cc, mult * outs, mult * routed[s : s + chunk].float(), residual[s : s + chunk]
            )
            self.parts.append(st.apply(torch.Tensor.cpu))
        self.seen += n
        self.blocks.append(n)

    def finish(self) -> torch.Tensor | None:
        """The layer's scores [E] (computed once, from what was recorded; ``None`` if nothing was).

        A data-parallel rank (``shard``) records the first :data:`TOKENS` tokens of its own batches; rank 0
        gathers every rank's batches, puts them in the order one process runs them (batch ``b`` is rank
        ``b mod N``'s), keeps the first :data:`TOKENS` tokens, eliminates, and every rank gets its scores. Every
        rank must call this for the same layers in the same order."""
        if self.done:
            return self.scores
        self.done = True
        if self.shard.parallel:
            st = self._gathered()
        else:
            st = TokenStats.cat(self.parts) if self.parts else None
        self.parts = []
        if st is not None:
            self.scores = eliminate(st, self.spec, self.bias, self.objective)
        if self.shard.parallel:
            found = torch.tensor([float(self.scores is not None)]) if self.shard.main else torch.zeros(1)
            if broadcast(found, self.shard, "the recon scores")[0]:
                E = self.spec.num_experts
                mine = self.scores if self.scores is not None else torch.zeros(E)
                self.scores = broadcast(mine.float().cpu(), self.shard, "the recon scores")
        return self.scores

    def _gathered(self) -> TokenStats | None:
        """Rank 0: every rank's recorded tokens in one process's batch order, cut at the budget."""
        from premoe.core.distributed import gather_blocks

        S, c = self.spec.width, self.c
        shapes = {"logits": (S,), "cand": (c,), "gram": (c, c), "cross": (c,), "norm2": (), "rcross": (c,),
                  "rnorm2": (), "rdot": ()}  # fmt: skip
        mine = TokenStats.cat(self.parts) if self.parts else None
        per = {}
        for f in fields(TokenStats):
            shape = shapes[f.name]
            width = int(torch.Size(shape).numel())
            dtype = torch.int64 if f.name == "cand" else torch.float32
            whole = getattr(mine, f.name).reshape(-1, width).to(dtype) if mine is not None else None
            blocks = list(torch.split(whole, self.blocks)) if whole is not None else []
            got = gather_blocks(blocks, width, dtype, self.shard, "the recon tokens")
            per[f.name] = (got, shape)
        if not self.shard.main:
            return None
        if not self.shard.merged(per["logits"][0]):
            return None
        fieldsd = {  # one process's batch order (every field has the same blocks), cut at the budget
            name: torch.cat(self.shard.merged(got)).reshape(-1, *shape)[: self.tokens]
            for name, (got, shape) in per.items()
        }
        return TokenStats(**fieldsd)
