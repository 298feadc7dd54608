"""Routing queries to stored tasks on an MoE model (TAER's retrieval step), reading no routed expert:
the query's signature comes from the first MoE layers' routers (:mod:`premoe.moe.signature`) and is
matched against the store's keys (:mod:`premoe.core.retrieval`)."""

from __future__ import annotations

from premoe.core.checkpoint import ByteReader
from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
from premoe.core.options import SignatureSpec
from premoe.core.retrieval import Retriever, RouteResult
from premoe.core.store import PatternStore
from premoe.moe.model import as_info
from premoe.moe.signature import SignatureModel


class QueryRouter:
    """Routes texts for one model and store, reading no routed expert.

    Builds the signature model from the checkpoint: embeddings, the decoder layers up to the
    ``spec.layers``-th MoE layer and their full routers (``bytes_read`` says how much that was).

    Raises:
        PremoeError: a store of another model or without tasks; signature layers out of range.
    """

    def __init__(self, model, store, spec: SignatureSpec | None = None, device=None, dtype=None):
        self.info = as_info(model)
        self.store = store if isinstance(store, PatternStore) else PatternStore.open(store)
        self.store.check_model(self.info.fingerprint)
        self.spec = spec or SignatureSpec()
        self.retriever = Retriever.from_store(self.store, self.spec)
        tokenizer = load_tokenizer(self.info.path)
        with ByteReader() as reader:
            self.signature_model = SignatureModel.from_checkpoint(self.info, tokenizer, self.spec.layers, reader)
            self.bytes_read = reader.bytes_read
        dev = resolve_device(device)
        dt = resolve_dtype(dtype) if dtype not in (None, "auto") else None
        if dev.type != "cpu" or dt is not None:
            self.signature_model.view.to(device=dev, dtype=dt)

    def route(self, text: str) -> RouteResult:
        return self.retriever.route(self.signature_model.signature(text))

    def route_many(self, texts: list[str]) -> list:
        """:meth:`route` of each text, their signatures computed in batches; an
        :class:`~premoe.errors.InputError` in place of a text that cannot be routed."""
        return self.retriever.route_many(self.signature_model.signatures(texts))
