"""Task-adaptive expert retrieval (TAER): match a query's signature to the nearest stored task.

Every task in a store carries keys computed at calibration with the same signature procedure the
query goes through (:mod:`premoe.moe.signature`), so key and query are comparable by construction.
A :class:`SignatureSpec` says which key to compare and how: the statistic (``prob``: mean gate
probability; ``tcess``; ``count``; ``official``), which tokens the key was computed over
(``prompt``: the prompts of prompt/completion data, ``full``: prompt and completion), how many MoE
layers (M), the per-layer normalisation and the distance. The defaults were chosen on measured
routing accuracy of held-out queries (``bench/routing.py``; see the README).

Matching is exact nearest neighbour over a [tasks, M*E] matrix: one matrix product per query batch,
well under a millisecond for thousands of tasks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from premoe.core.options import SignatureSpec
from premoe.core.store import PatternStore
from premoe.errors import InputError, StoreError


def features(stats: torch.Tensor, spec: SignatureSpec) -> torch.Tensor:
    """[..., M, E] per-layer means -> [..., layers * E] comparable vectors."""
    x = stats[..., : spec.layers, :].float()
    if spec.norm == "l1":
        x = x / x.abs().sum(-1, keepdim=True).clamp_min(1e-12)
    elif spec.norm == "l2":
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.flatten(-2)


def distances(queries: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """[Q, D] x [T, D] -> [Q, T] distances (smaller is nearer)."""
    if metric == "cosine":
        q = queries / queries.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        k = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return 1.0 - q @ k.T
    if metric == "l1":
        return torch.cdist(queries, keys, p=1.0)
    return torch.cdist(queries, keys)


@dataclass
class RouteResult:
    """The nearest task, its distance, and how clearly it won (``margin`` = second - best)."""

    task: str
    distance: float
    margin: float | None
    second: str | None
    second_distance: float | None

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """Nearest-task search over a store's keys."""

    def __init__(self, names: list[str], table: torch.Tensor, spec: SignatureSpec):
        if not names:
            raise StoreError("the pattern store has no tasks to route to; calibrate some first")
        if table.shape[1] < spec.layers:
            raise InputError(
                f"the store's keys span {table.shape[1]} MoE layers but `layers` is {spec.layers}; "
                f"use `layers={table.shape[1]}` or recalibrate with `signature_layers={spec.layers}`"
            )
        self.names = names
        self.spec = spec
        self.keys = features(table, spec)

    @classmethod
    def from_store(cls, store: PatternStore, spec: SignatureSpec) -> "Retriever":
        names, table = store.signature_table(spec.key)
        return cls(names, table, spec)

    def route_stats(self, stats: torch.Tensor) -> list[RouteResult]:
        """Route queries given their [Q, M, E] (or [M, E]) statistic ``spec.stat``."""
        q = features(stats if stats.dim() == 3 else stats[None], self.spec)
        d = distances(q, self.keys, self.spec.metric)
        k = min(2, len(self.names))
        vals, idx = d.topk(k, dim=-1, largest=False)
        out = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            second = (self.names[i[1]], v[1]) if k > 1 else (None, None)
            out.append(RouteResult(self.names[i[0]], v[0], (v[1] - v[0]) if k > 1 else None, *second))
        return out

    def route(self, signature: dict[str, torch.Tensor]) -> RouteResult:
        """Route one query from its signature ({stat: [M, E]})."""
        return self.route_stats(signature[self.spec.stat])[0]

    def route_many(self, signatures: list) -> list:
        """Route each of ``signatures`` (as :meth:`route`) in one search; an exception standing in for a
        signature (a query that has none) stays in its place."""
        out = list(signatures)
        ok = [i for i, s in enumerate(signatures) if not isinstance(s, Exception)]
        if ok:
            found = self.route_stats(torch.stack([signatures[i][self.spec.stat] for i in ok]))
            for i, r in zip(ok, found):
                out[i] = r
        return out
