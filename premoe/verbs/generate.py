"""``premoe generate``: route each prompt to its stored task, hold only that task's pattern, and complete it.

A task switch reads only what the new task's pattern needs and the resident model lacks (MoE: the experts
it does not hold yet; dense: the heads and channels), so prompts of one task cost no reads after the first.
"""

from __future__ import annotations

import json
from pathlib import Path

from premoe.core.options import defaults_of, kwargs_of
from premoe.errors import InputError
from premoe.verbs.common import queries
from premoe.verbs.serve import add_serving_flags, task_server

HELP = "route a prompt, load only its task's experts (or heads and channels), and complete it"


def generate(model, store: str | Path, prompts: str | list[str], *, max_new_tokens: int = 64, **options) -> list:
    """Greedy completions of ``prompts``, each routed to its stored task and answered by a model holding only
    that task's pattern. ``options`` are :func:`premoe.verbs.serve.task_server`'s (``keep`` or ``sparsity``,
    routing, device...).

    Returns:
        One reply per prompt (``task``, ``text``, ``switched``, ``bytes_read``, ``to_dict()``).
    """
    if max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be positive, got {max_new_tokens}")
    server = task_server(model, store, verb="generate", **options)
    return [server.generate(p, max_new_tokens) for p in ([prompts] if isinstance(prompts, str) else prompts)]


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help=HELP, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("prompt", nargs="?", help="the prompt text")
    p.add_argument("--data", help="answer every line of this JSONL (prompt or text) or .txt file")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults_of(generate)["max_new_tokens"],
        help="tokens generated per prompt (default 64)",
    )
    add_serving_flags(p, defaults_of(task_server))


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be positive, got {args.max_new_tokens}")
    pairs = queries(args.prompt, args.data, "prompt")
    server = task_server(**kwargs_of(task_server, args, verb="generate"))
    for where, prompt in pairs:
        try:
            reply = server.generate(prompt, args.max_new_tokens)
        except InputError as e:
            raise InputError(f"{where}: {e}" if args.data else str(e)) from None
        print(json.dumps(reply.to_dict()) if args.json else f"[{reply.task}] {reply.text}", flush=True)
    return 0
