"""Serving a dense model with task routing: each prompt is answered by a model holding only its task's
heads and FFN channels, switched in place when the task changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from premoe.core.checkpoint import ByteReader
from premoe.dense.model import DensePlan, build_dense
from premoe.dense.options import DenseSelection
from premoe.dense.patterns import dense_plan
from premoe.dense.router import ROUTE_DEPTH, DenseRoute, DenseRouter
from premoe.dense.switch import MIN_RUN_BYTES, switch_dense
from premoe.errors import InputError


@dataclass
class DenseReply:
    text: str
    task: str
    distance: float
    margin: float | None
    switched: bool
    bytes_read: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DenseServer:
    """Routes each prompt and answers it with a model holding only its task's heads and channels,
    built from the checkpoint (kept rows of q/k/v/gate/up read as byte ranges).

    A task switch (:func:`premoe.dense.switch.switch_dense`) reads only what the new task needs and
    the resident model lacks. Embeddings, norms, the LM head and uncut biases stay in memory. Every
    pruned tensor keeps the rows/columns both plans keep and reads the missing ones: rows as byte
    ranges; o_proj/down_proj columns as byte ranges when their runs average at least
    ``column_run_bytes`` (256: a 128-dim bf16 head), else whole rows in 16 MiB chunks (for scattered
    FFN channels, one range per channel per row is far slower than the rows). Compensated biases are
    re-read. The switched model equals a model built afresh for the new task (same dtypes, same
    logits). Switching back A->B->A reads what B dropped; staying on a task reads nothing. ``load``
    and each :class:`DenseReply` report the checkpoint bytes read (a task's first plan with bias
    compensation also reads its o_proj/down_proj weights).
    """

    def __init__(
        self,
        model,
        store,
        selection: DenseSelection | float,
        *,
        depth: int | str = ROUTE_DEPTH,
        device="cpu",
        dtype="auto",
    ):
        from premoe.core.config import resolve_device, resolve_dtype

        if not isinstance(selection, DenseSelection):
            selection = DenseSelection(sparsity=selection)
        self.sparsity = selection.required()
        self.selection = selection
        self.router = DenseRouter(model, store, depth, device)
        self.info, self.store = self.router.info, self.router.store
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.tokenizer = self.router.tokenizer
        self.task: str | None = None
        self.model = None
        self._plans: dict[str, DensePlan] = {}
        self.reader = ByteReader()
        self.column_run_bytes = MIN_RUN_BYTES

    def plan(self, task: str) -> DensePlan:
        if task not in self._plans:
            self._plans[task] = dense_plan(
                self.info, self.store, task, self.selection, reader=self.reader, written=False
            )
        return self._plans[task]

    @property
    def tasks(self) -> list[str]:
        """The stored tasks prompts are routed to."""
        return list(self.router.names)

    @property
    def bytes_read(self) -> int:
        """Checkpoint bytes read so far (the router's embeddings and every build or switch)."""
        return self.router.bytes_read + self.reader.bytes_read

    def route(self, text: str) -> DenseRoute:
        """The stored task nearest to ``text`` (reads nothing more)."""
        return self.router.route(text)

    def load(self, task: str) -> int:
        """Make ``task``'s model resident (built, or switched from the resident one); returns the bytes read."""
        if task == self.task and self.model is not None:
            return 0
        if task not in self.router.names:
            raise InputError(f"unknown task {task!r}; the store has {', '.join(self.router.names)}")
        before = self.reader.bytes_read
        plan = self.plan(task)
        old, old_task = self.model, self.task
        self.model, self.task = None, None  # a failed switch leaves no half-built model: the next load builds afresh
        if old is None:
            model = build_dense(self.info, plan, self.reader)
        else:
            model = switch_dense(old, self.info, self._plans[old_task], plan, self.reader, self.column_run_bytes)
        del old
        model.to(device=self.device, dtype=None if self.dtype == "auto" else self.dtype)
        self.model, self.task = model, task
        return self.reader.bytes_read - before

    def complete(self, prompt: str, max_new_tokens: int = 64) -> str:
        """The greedy completion of ``prompt`` by the resident task's model."""
        from premoe.core.evaluation import generate_greedy

        return generate_greedy(self.model, self.tokenizer, [prompt], max_new_tokens)[0]

    def generate(self, prompt: str, max_new_tokens: int = 64, task: str | None = None) -> DenseReply:
        route = self.router.route(prompt) if task is None else DenseRoute(task, 0.0, None, None)
        switched = route.task != self.task
        read = self.load(route.task) if switched else 0
        text = self.complete(prompt, max_new_tokens)
        return DenseReply(text, route.task, route.distance, route.margin, switched, read)
