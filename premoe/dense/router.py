"""Routing queries to stored tasks on a dense model: the nearest task centroid of the mean hidden state
after a few decoder layers (only the embeddings and those layers are read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from premoe.core.checkpoint import ByteReader
from premoe.dense.model import DenseInfo, inspect_dense, reader_getter
from premoe.dense.patterns import check_dense_store
from premoe.errors import InputError, StoreError

ROUTE_DEPTH = 0  # the mean token embedding: best or tied on held-out queries (bench/dense_routing.py)


@dataclass
class DenseRoute:
    task: str
    distance: float
    margin: float | None
    runner_up: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "distance": self.distance, "margin": self.margin, "runner_up": self.runner_up}


class DenseRouter:
    """Routes a query to the stored task whose prompt centroid is nearest (cosine) in the mean hidden
    state after ``depth`` decoder layers; only the embeddings and those layers are read.

    ``depth`` 0 (default): the mean token embedding; only the embedding matrix and one layer are
    read. ``bench/dense_routing.py`` measured it best or tied among all depths, and against SEAP's
    logistic-regression classifier on the same features, on held-out queries. ``"auto"``: the
    depth at which the stored centroids are best separated (largest
    smallest pairwise cosine distance, a property of the store alone), capped at half the layers.
    """

    def __init__(self, model, store, depth: int | str = ROUTE_DEPTH, device="cpu"):
        from premoe.core.config import load_tokenizer, resolve_device

        self.info = model if isinstance(model, DenseInfo) else inspect_dense(model)
        self.store = check_dense_store(store, self.info)
        self.names = sorted(self.store.tasks)
        if not self.names:
            raise StoreError(f"store {self.store.path} has no tasks to route to; calibrate some first")
        cents = torch.stack([self.store.load(n).signature["prompt.hidden"] for n in self.names])  # [T, L+1, D]
        self.centroids = torch.nn.functional.normalize(cents, dim=-1)
        if depth == "auto":
            depth = self.best_depth(self.centroids, max(1, self.info.num_layers // 2))
        if not (0 <= int(depth) <= self.info.num_layers):
            raise InputError(f"`layers` must be in 0..{self.info.num_layers} for this model, got {depth}")
        self.depth = int(depth)
        self.tokenizer = load_tokenizer(self.info.path)
        with ByteReader() as reader:
            self.model = _prefix_model(self.info, max(self.depth, 1), reader)
            self.bytes_read = reader.bytes_read
        self.model.to(resolve_device(device))

    @staticmethod
    def best_depth(centroids: torch.Tensor, max_depth: int) -> int:
        if centroids.shape[0] < 2:
            return 0
        sims = torch.einsum("tld,sld->lts", centroids, centroids)  # [L+1, T, T]
        eye = torch.eye(centroids.shape[0], dtype=torch.bool)
        closest = sims.masked_fill(eye, -2).amax(-1).amax(-1)  # most similar pair per depth
        return int(closest[: max_depth + 1].argmin())

    def features(self, texts: list[str]) -> torch.Tensor:
        from premoe.dense.calibration import prompt_features

        return prompt_features(self.model, self.info, self.tokenizer, texts, layers=self.depth)[:, self.depth]

    def route_many(self, texts: list[str]) -> list[DenseRoute]:
        for t in texts:
            if not t or not t.strip():
                raise InputError("empty query; give some text to route")
        q = self.features(texts)
        d = 1 - q @ self.centroids[:, self.depth].T  # [Q, T] cosine distance
        k = min(2, len(self.names))
        vals, idx = d.topk(k, dim=-1, largest=False)
        return [
            DenseRoute(self.names[i[0]], v[0], v[1] - v[0] if k > 1 else None, self.names[i[1]] if k > 1 else None)
            for v, i in zip(vals.tolist(), idx.tolist())
        ]

    def route(self, text: str) -> DenseRoute:
        return self.route_many([text])[0]


def _prefix_model(info: DenseInfo, layers: int, reader: ByteReader):
    """The embeddings and the first ``layers`` decoder layers (no LM head), from byte ranges."""
    from premoe.core.config import config_from_dict, skeleton
    from premoe.core.modules import finish_buffers
    from premoe.dense.model import fill_pruned, full_plan

    raw = dict(info.raw_config)
    raw["num_hidden_layers"] = layers
    for key in ("layer_types",):
        if isinstance(raw.get(key), list):
            raw[key] = raw[key][:layers]
    model = skeleton(config_from_dict(raw, info.spec.name))
    head = model.get_output_embeddings()
    skip = tuple(n for n, m in model.named_modules() if m is head)
    plan = full_plan(info)
    fill_pruned(model, info, plan, reader_getter(info, reader), skip_prefixes=skip)
    for name in skip:  # an untied head was never read (a tied one is the embeddings): not left on the meta device
        if any(p.is_meta for p in model.get_submodule(name).parameters()):
            model.set_submodule(name, torch.nn.Identity())
    finish_buffers(model)
    return model.eval()
