"""``premoe route``, ``generate``, ``chat`` and ``serve``: task-adaptive expert retrieval (TAER) at query
time, with only the routed task's experts in memory."""

from __future__ import annotations

import json

from premoe.cli.flags import SERVE_POLICIES, add_serving_flags, add_signature_flags, fmt_bytes

def run(args) -> int:
    if args.command == "route":
        return _route(args)
    if args.command == "serve":
        return _http(args)
    return _serve(args)


def _add_route(sub):
    p = sub.add_parser("route", help="print the stored task nearest to a query (no experts loaded)")
    p.add_argument("query", nargs="?", help="the query text")
    p.add_argument("--model", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--data", help="route every line of this JSONL (prompt or text) or .txt file")
    p.add_argument("--json", action="store_true", help="one JSON object per query (task, distance, margin, ...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    add_signature_flags(p)


def _add_generate(sub):
    p = sub.add_parser("generate", help="route a prompt, load only its task's experts, and complete it")
    p.add_argument("prompt", nargs="?", help="the prompt text")
    p.add_argument("--data", help="answer every line of this JSONL (prompt or text) or .txt file")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    add_serving_flags(p)


def _add_chat(sub):
    p = sub.add_parser("chat", help="interactive: each message is routed; experts switch when the topic does")
    add_serving_flags(p)


def _add_serve(sub):
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server; each request is served by its task's pattern")
    add_serving_flags(p, http=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                                     "(default: $PREMOE_API_KEY if set)")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting before new ones get 503 (default 64)")
    g.add_argument("--max-batch", type=int, default=8, help="requests of one task generated together (default 8)")
    g.add_argument("--schedule", choices=SERVE_POLICIES, default="affinity",
                   help="affinity (default): stay on the resident task while others wait at most --max-wait-ms; "
                        "fcfs: strict arrival order")
    g.add_argument("--batching", choices=("continuous", "static"), default="continuous",
                   help="continuous (default): requests of the running task join the batch between tokens; "
                        "static: a batch runs to its end before the next starts")
    g.add_argument("--max-wait-ms", type=float, default=2000.0,
                   help="affinity: longest a request waits while another task is served (default 2000)")
    g.add_argument("--max-tokens", type=int, help="completion cap for requests that give no max_tokens "
                                                 "(default: the rest of the context)")
    g.add_argument("--max-body-kb", type=float, default=1024.0, help="largest request body (default 1024 KB)")
    g.add_argument("--drain-seconds", type=float, default=120.0,
                   help="on SIGTERM, how long in-flight requests may take to finish (default 120)")
    g.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (default warning)")


def _queries(args, text_arg: str) -> list[tuple[str, str]]:
    """(where, text) pairs from the positional text or --data."""
    from premoe.core.data import iter_records
    from premoe.errors import InputError

    text = getattr(args, text_arg)
    if (text is None) == (args.data is None):
        raise InputError(f"give either a {text_arg.upper()} or --data FILE")
    if text is not None:
        return [("query", text)]
    return [(f"{args.data}:{i}", r.prompt) for i, r in enumerate(iter_records(args.data, queries=True), 1)]


def _spec(args):
    from premoe.core.retrieval import signature_spec

    return signature_spec(args.layers or 1, args.stat, args.source, args.norm, args.metric)


def _route(args) -> int:
    from premoe.moe.router import QueryRouter
    from premoe.errors import InputError

    queries = _queries(args, "query")
    from premoe.api import model_kind

    if model_kind(args.model) == "dense":
        from premoe.dense.router import ROUTE_DEPTH, DenseRouter

        router = DenseRouter(args.model, args.store, ROUTE_DEPTH if args.layers is None else args.layers, device=args.device)
    else:
        router = QueryRouter(args.model, args.store, _spec(args), device=args.device, dtype=args.dtype)
    for where, q in queries:
        try:
            res = router.route(q)
        except InputError as e:
            raise InputError(f"{where}: {e}" if args.data else str(e)) from None
        print(json.dumps({**res.to_dict(), "signature_bytes_read": router.bytes_read}) if args.json else res.task, flush=True)
    return 0


def _task_server(args):
    """The task server (MoE or dense) that generate, chat and serve use, from the shared flags."""
    from premoe.api import model_kind
    from premoe.errors import InputError
    from premoe.moe.server import TaskServer

    if model_kind(args.model) == "dense":
        from premoe.dense.router import ROUTE_DEPTH
        from premoe.dense.server import DenseServer

        if args.keep is not None or args.top_k is not None:
            raise InputError("--keep/--top-k apply to MoE models only; for a dense model use --sparsity (and --method)")
        if args.sparsity is None:
            raise InputError("--sparsity (fraction of decoder weights removed) is required for a dense model")
        if args.cache_mb:
            raise InputError("--cache-mb applies to MoE models only (a dense switch reads only what it lacks)")
        if args.refit is not None:
            raise InputError("--refit/--no-refit apply to MoE models when serving (a dense model re-fits in `premoe prune`)")
        return DenseServer(args.model, args.store, args.sparsity, method=args.method or "seap",
                           depth=ROUTE_DEPTH if args.layers is None else args.layers, device=args.device,
                           dtype=args.dtype)
    if args.sparsity is not None or args.method is not None:
        raise InputError("--sparsity/--method apply to dense models only; for an MoE model use --keep")
    if args.keep is None:
        raise InputError("--keep (experts held per MoE layer) is required for an MoE model")
    if args.cache_mb < 0:
        raise InputError(f"--cache-mb must be >= 0, got {args.cache_mb}")
    return TaskServer(
        args.model, args.store, args.keep, top_k=args.top_k, group_policy=args.group_policy,
        signature=_spec(args), cache_bytes=int(args.cache_mb * 2**20),
        device=args.device, dtype=args.dtype, refit=args.refit,
    )


def _serve(args) -> int:
    from premoe.api import model_kind
    from premoe.errors import InputError

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.command == "chat" and model_kind(args.model) == "dense":
        raise InputError("chat is not available for dense models yet; use generate or serve")
    server = _task_server(args)
    if args.command == "chat":
        return _chat(server, args)
    return _answer(server, args)


def _http(args) -> int:
    import os

    from premoe.errors import InputError
    from premoe.server.app import ServeOptions
    from premoe.server.main import bind, serve

    for flag, value, low in (("--max-queue", args.max_queue, 1), ("--max-batch", args.max_batch, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--max-body-kb", args.max_body_kb, 1),
                             ("--max-wait-ms", args.max_wait_ms, 0), ("--drain-seconds", args.drain_seconds, 0)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be at least {low}, got {value}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535, got {args.port}")
    bind(args.host, args.port).close()  # fail on a taken port before loading anything
    server = _task_server(args)
    if not server.tasks:
        raise InputError(f"store {args.store} has no tasks; calibrate some first")
    server.load(server.tasks[0])  # build the resident model now, not on the first request
    opts = ServeOptions(api_key=args.api_key or os.environ.get("PREMOE_API_KEY") or None, max_queue=args.max_queue,
                        max_batch=args.max_batch, policy=args.schedule, max_wait=args.max_wait_ms / 1000,
                        continuous=args.batching == "continuous",
                        max_body_bytes=int(args.max_body_kb * 1024), max_tokens=args.max_tokens)
    return serve(server, opts, args.host, args.port, args.drain_seconds, args.log_level,
                 announce=lambda line: print(line, flush=True))


def _answer(server, args) -> int:
    """Route and answer the prompt (or every --data line) with a task server of either kind."""
    from premoe.errors import InputError

    for where, prompt in _queries(args, "prompt"):
        try:
            reply = server.generate(prompt, args.max_new_tokens)
        except InputError as e:
            raise InputError(f"{where}: {e}" if args.data else str(e)) from None
        print(json.dumps(reply.to_dict()) if args.json else f"[{reply.task}] {reply.text}", flush=True)
    return 0


def _chat(server, args) -> int:
    from premoe.errors import InputError

    tok = server.tokenizer
    templated = bool(getattr(tok, "chat_template", None))
    history: list[dict[str, str]] = []
    print(f"premoe chat: {len(server.retriever.names)} tasks, {server.keep} experts per MoE layer. "
          "Each message is routed; /task shows the current task, /clear forgets the conversation, /exit quits.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        msg = line.strip()
        if not msg:
            continue
        if msg in ("/exit", "/quit"):
            break
        if msg == "/clear":
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        if msg == "/task":
            print(f"(current task: {server.task or 'none yet'})", flush=True)
            continue
        try:
            route = server.route(msg)
        except InputError as e:
            print(f"premoe: {e}", flush=True)
            continue
        note = ""
        if route.task != server.task:
            st = server.load(route.task)
            note = f"switched to {route.task}: read {fmt_bytes(st.bytes_read)}, {st.experts_read} experts from disk, " \
                   f"{st.experts_from_cache} from cache"
        if templated:
            history.append({"role": "user", "content": msg})
            prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        else:
            prompt = msg
        from premoe.core.evaluation import generate_greedy

        text = generate_greedy(server.model, tok, [prompt], args.max_new_tokens)[0].strip()
        if templated:
            history.append({"role": "assistant", "content": text})
        if note:
            print(f"({note})", flush=True)
        print(f"[{route.task}] {text}", flush=True)
    return 0


PARSERS = {"route": _add_route, "generate": _add_generate, "chat": _add_chat, "serve": _add_serve}
