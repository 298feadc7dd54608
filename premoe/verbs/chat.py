"""``premoe chat``: an interactive session where every message is routed to its stored task, and the held
pattern switches when the topic does (MoE models).

``/task`` shows the current task, ``/clear`` forgets the conversation, ``/exit`` quits.
"""

from __future__ import annotations

from premoe.core.options import defaults_of, kwargs_of
from premoe.errors import InputError
from premoe.verbs.serve import add_serving_flags, task_server

HELP = "interactive: each message is routed; experts switch when the topic does"


def chat(server, max_new_tokens: int = 64, read=input, write=print) -> int:
    """Run the conversation loop on a :func:`~premoe.verbs.serve.task_server` until ``/exit`` or end of input."""
    from premoe.core.checkpoint import fmt_bytes

    tok = server.tokenizer
    templated = bool(getattr(tok, "chat_template", None))
    history: list[dict[str, str]] = []
    write(
        f"premoe chat: {len(server.tasks)} tasks, {server.keep} experts per MoE layer. Each message is routed; "
        "/task shows the current task, /clear forgets the conversation, /exit quits.",
        flush=True,
    )
    while True:
        try:
            msg = read("> ").strip()
        except EOFError:
            break
        if not msg:
            continue
        if msg in ("/exit", "/quit"):
            break
        if msg == "/clear":
            history.clear()
            write("(conversation cleared)", flush=True)
            continue
        if msg == "/task":
            write(f"(current task: {server.task or 'none yet'})", flush=True)
            continue
        try:
            route = server.route(msg)
        except InputError as e:
            write(f"premoe: {e}", flush=True)
            continue
        note = ""
        if route.task != server.task:
            st = server.load(route.task)
            note = (
                f"switched to {route.task}: read {fmt_bytes(st.bytes_read)}, {st.experts_read} experts from disk, "
                f"{st.experts_from_cache} from cache"
            )
        if templated:
            history.append({"role": "user", "content": msg})
            prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        else:
            prompt = msg
        text = server.complete(prompt, max_new_tokens).strip()
        if templated:
            history.append({"role": "assistant", "content": text})
        if note:
            write(f"({note})", flush=True)
        write(f"[{route.task}] {text}", flush=True)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help=HELP, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=defaults_of(chat)["max_new_tokens"],
        help="tokens generated per message (default 64)",
    )
    add_serving_flags(p, defaults_of(task_server))


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be positive, got {args.max_new_tokens}")
    return chat(task_server(**kwargs_of(task_server, args, verb="chat")), args.max_new_tokens)
