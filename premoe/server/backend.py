"""What the HTTP server needs from a task server, MoE or dense, and how prompts are rendered.

Both :class:`premoe.moe.server.TaskServer` (experts of one task pattern resident) and
:class:`premoe.dense.server.DenseServer` (heads and channels of one task resident) satisfy
:class:`TaskBackend`; the server never asks which kind it holds.
"""

from __future__ import annotations

from typing import Any, Protocol

from premoe.errors import InputError


class TaskBackend(Protocol):
    tokenizer: Any
    model: Any  # the resident model (None before the first load)
    task: str | None  # the task whose pattern is resident

    @property
    def tasks(self) -> list[str]: ...

    @property
    def bytes_read(self) -> int: ...

    def route(self, text: str) -> Any: ...  # .task, .distance, .margin

    # Optional: ``route_many(texts)`` routes a queue at once (a list of results, an exception in place of a
    # text that cannot be routed); ``routes_concurrently = True`` when routing touches nothing generation
    # uses (its own signature model), so the server routes on a thread of its own while the model generates.

    def load(self, task: str) -> Any: ...


def context_length(backend: TaskBackend) -> int | None:
    """The model's context window (``max_position_embeddings`` of its text config), if it states one."""
    info = getattr(backend, "info", None)
    raw = getattr(info, "raw_config", None) or {}
    for part in (raw.get("text_config") or {}, raw):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(part.get(key), int) and part[key] > 0:
                return part[key]
    return None


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """The prompt the model sees for ``messages`` and whether it already holds the special tokens.

    With a chat template: the template, with the generation prompt appended. Without one (base
    models such as premoe's tiny ones): the message contents joined by newlines, tokenized like a
    plain completion prompt, so a single user message is answered exactly as ``premoe generate``
    answers the same text.
    """
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja raises its own errors for conversations a template refuses
            raise InputError(f"the model's chat template rejected these messages: {e}") from None
        return text, True
    return "\n".join(m["content"] for m in messages), False


def encode(tokenizer, text: str, templated: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=not templated)["input_ids"]
