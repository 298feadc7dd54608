"""``premoe route``: the stored task nearest to a query, without loading any routed expert.

MoE models: the query's router statistics over the first ``--layers`` MoE layers (only the embeddings,
those decoder layers and their routers are read) against every task's stored keys. Dense models: the
query's mean hidden state after ``--layers`` decoder layers (default 0: the mean token embedding) against
every task's prompt centroid.
"""

from __future__ import annotations

import json
from pathlib import Path

from premoe.core.options import RunOptions, SignatureSpec, add_flags, defaults_of, kwargs_of
from premoe.errors import InputError
from premoe.verbs.common import add_model, add_store, queries

HELP = "print the stored task nearest to a query (no experts loaded)"
LAYERS_HELP = (
    "MoE: MoE layers the signature spans (default 1); dense: decoder layers run before comparing "
    "(default 0: the mean token embedding)"
)


def add_route_flags(p, defaults) -> None:
    """``--layers`` and the MoE signature flags (defaults chosen on routing accuracy; docs/serving.md)."""
    g = p.add_argument_group("retrieval")
    g.add_argument("--layers", type=int, help=LAYERS_HELP)
    add_flags(p, SignatureSpec, defaults=defaults, title="retrieval, MoE models")


def router(
    model,
    store: str | Path,
    *,
    layers: int | None = None,
    stat: str = "prob",
    source: str = "prompt",
    norm: str = "l1",
    metric: str = "l1",
    device: str | None = "cpu",
    dtype: str = "auto",
):
    """A router of queries to ``store``'s tasks for ``model`` (``route(text)``; ``bytes_read``: what building
    it read from the checkpoint)."""
    from premoe.kinds import check_options, kind_of

    backend = kind_of(model)
    run = RunOptions(device, dtype)
    signature = SignatureSpec(1, stat, source, norm, metric)
    check_options(backend, "route", run, signature)
    return backend.router(backend.inspect(model), store, layers=layers, signature=signature, run=run)


def route(
    model,
    store: str | Path,
    queries: str | list[str],
    *,
    layers: int | None = None,
    stat: str = "prob",
    source: str = "prompt",
    norm: str = "l1",
    metric: str = "l1",
    device: str | None = "cpu",
    dtype: str = "auto",
):
    """Route queries to the nearest stored task, loading no routed expert.

    Returns:
        ``(results, bytes_read)``: one result per query (``task``, ``distance``, ``margin``...), and the bytes
        read from the checkpoint to build the router.

    Raises:
        PremoeError: empty store, store of another model, empty query.
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    r = router(
        model, store, layers=layers, stat=stat, source=source, norm=norm, metric=metric, device=device, dtype=dtype
    )
    return [r.route(q) for q in queries], r.bytes_read


def add_parser(sub) -> None:
    p = sub.add_parser("route", help=HELP, description=__doc__.split("\n\n")[1])
    p.add_argument("query", nargs="?", help="the query text")
    add_model(p)
    add_store(p)
    p.add_argument("--data", help="route every line of this JSONL (prompt or text) or .txt file")
    p.add_argument("--json", action="store_true", help="one JSON object per query (task, distance, margin, ...)")
    defaults = defaults_of(route)
    add_flags(p, RunOptions, defaults=defaults, only=("device", "dtype"))
    add_route_flags(p, defaults)


def run(args) -> int:
    pairs = queries(args.query, args.data, "query")
    r = router(**kwargs_of(router, args))
    for where, q in pairs:
        try:
            res = r.route(q)
        except InputError as e:
            raise InputError(f"{where}: {e}" if args.data else str(e)) from None
        print(
            json.dumps({**res.to_dict(), "signature_bytes_read": r.bytes_read}) if args.json else res.task, flush=True
        )
    return 0
