"""A request on its way through premoe's server (:class:`Job`), and the queue's refusals."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from premoe.server.engine import Sampling


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


@dataclass
class Job:
    """One request on its way through the server. ``notify(kind, payload)`` is called from the
    worker thread: ``("start", job)``, ``("delta", text)``, ``("done", job)``, ``("error", (status, message))``."""

    text: str  # the prompt as the model sees it (routing input)
    prompt_ids: list[int]
    sampling: Sampling
    notify: Callable[[str, Any], None]
    pinned: str | None = None
    arrived: float = field(default_factory=time.monotonic)
    task: str | None = None
    distance: float | None = None
    margin: float | None = None
    switched: bool = False
    cancelled: bool = False
    started: float | None = None
    first_token: float | None = None
    finished: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    text_out: str = ""
