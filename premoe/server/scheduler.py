"""The bounded request queue and the worker that routes, switches patterns and generates.

One worker thread owns the model. Between generation batches it routes every waiting request
(unless its task is pinned), picks the next batch by the scheduling policy, switches the resident
pattern if the batch's task differs, and generates the whole batch together (see
:mod:`premoe.server.engine`, or the task server's own ``run_batch`` where it brings an engine: vLLM's).
A batch only ever holds requests of one task, and the worker checks
before every forward that the resident pattern is that task's, so no request is answered by
another task's pattern.

Policies:

* ``affinity`` (default): stay on the resident task while it has requests waiting and no other
  request has waited longer than ``max_wait`` seconds; otherwise serve the task of the oldest
  waiting request. Each batch takes up to ``max_batch`` of the chosen task's requests, oldest
  first, wherever they sit in the queue. A mixed stream thus switches about once per batch of
  tasks rather than once per request, and no request waits more than ``max_wait`` plus one batch
  for its turn.
* ``fcfs``: strict arrival order; a batch is the run of consecutive same-task requests at the
  head of the queue (the baseline that ``bench/serve_load.py`` measures against).

With ``continuous`` (default), requests of the running batch's task also join it between tokens
(up to ``max_batch`` running), under the same policy: fcfs admits only from the head of the queue,
affinity stops admitting once another task's request has waited past ``max_wait``, so the batch
drains and the switch happens. Each request is answered as soon as its own sequence ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from premoe.errors import PremoeError
from premoe.server.engine import Sampling, Sequence, run_batch
from premoe.server.options import POLICIES

log = logging.getLogger("premoe")


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


class Scheduler:
    def __init__(
        self,
        backend,
        *,
        max_queue: int = 64,
        max_batch: int = 8,
        policy: str = "affinity",
        max_wait: float = 2.0,
        metrics=None,
        continuous: bool = True,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}; choose from {', '.join(POLICIES)}")
        self.backend, self.metrics = backend, metrics
        self.max_queue, self.max_batch, self.policy, self.max_wait = max_queue, max_batch, policy, max_wait
        self.continuous = continuous
        self.pending: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.switches = 0
        self.served = 0
        self.history: deque[Job] = deque(maxlen=1024)  # finished jobs, newest last (tests and benchmarks read it)
        self.thread = threading.Thread(target=self._loop, name="premoe-worker", daemon=True)

    # -- called from the event loop -------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise ShuttingDown()
            if len(self.pending) >= self.max_queue:
                raise QueueFull()
            self.pending.append(job)
            self._gauge()
            self.cond.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued and running one, and end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def depth(self) -> int:
        return len(self.pending)

    # -- the worker thread ---------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.pending))

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                if not self.pending and self.stopping:
                    return
            self._route_waiting()
            with self.cond:
                batch = self._pick()
                for j in batch:
                    self.pending.remove(j)
                self._gauge()
            if batch:
                self._serve(batch)

    def _route(self, job: Job) -> None:
        if job.cancelled:
            return
        if job.pinned is not None:
            job.task = job.pinned
            return
        try:
            r = self.backend.route(job.text)
        except PremoeError as e:
            job.finish_reason = "error"
            job.notify("error", (400, str(e)))
            return
        except Exception as e:  # noqa: BLE001 - a worker must survive anything a request triggers
            log.exception("routing failed")
            job.finish_reason = "error"
            job.notify("error", (500, f"routing failed: {e}"))
            return
        job.task, job.distance, job.margin = r.task, float(r.distance), None if r.margin is None else float(r.margin)

    def _route_waiting(self) -> None:
        """Route every waiting request not routed yet (outside the lock, so submissions never wait
        for the model), then drop the cancelled and failed ones from the queue."""
        with self.cond:
            waiting = [j for j in self.pending if j.task is None]
        for job in waiting:
            self._route(job)
        with self.cond:
            self.pending = [j for j in self.pending if not (j.cancelled or j.finish_reason == "error")]

    def _take(self, task: str, n: int) -> list[Job]:
        """Up to ``n`` routed waiting requests of ``task``, oldest first: fcfs only from the run at the
        head of the queue, affinity from anywhere in it."""
        out = []
        for j in self.pending:
            if j.task is None:
                continue
            if j.task != task:
                if self.policy == "fcfs":
                    break
                continue
            if len(out) == n:
                break
            out.append(j)
        return out

    def _pick(self) -> list[Job]:
        ready = [j for j in self.pending if j.task is not None]
        if not ready:
            return []
        oldest = ready[0]
        if self.policy == "fcfs":
            return self._take(oldest.task, self.max_batch)
        current = self.backend.task
        stay = any(j.task == current for j in ready) and time.monotonic() - oldest.arrived <= self.max_wait
        return self._take(current if stay else oldest.task, self.max_batch)

    def _serve(self, batch: list[Job]) -> None:
        task, m = batch[0].task, self.metrics
        now = time.monotonic()
        switched = self.backend.task != task or self.backend.model is None
        try:
            if switched:
                before = self.backend.bytes_read
                self.backend.load(task)
                self.switches += 1
                if m is not None:
                    m.switches.inc()
                    m.bytes_read.inc(self.backend.bytes_read - before)
                    m.switch_seconds.observe(time.monotonic() - now)
        except Exception as e:  # noqa: BLE001
            log.exception("loading task %s failed", task)
            for j in batch:
                j.finish_reason = "error"
                j.notify("error", (500, f"loading task {task!r} failed: {e}"))
            return
        running: list[Job] = []

        def begin(jobs: list[Job], joined_switch: bool) -> list[Sequence]:
            start = time.monotonic()
            seqs = []
            for j in jobs:
                j.switched, j.started = joined_switch, start
                j.notify("start", j)
                running.append(j)
                if m is not None:
                    m.queue_wait.observe(start - j.arrived)
                seqs.append(
                    Sequence(
                        j.prompt_ids,
                        j.sampling,
                        emit=self._emitter(j),
                        is_cancelled=lambda j=j: j.cancelled,
                        on_done=lambda s, j=j: self._finish(j, s),
                    )
                )
            if m is not None and jobs:
                m.batches.observe(len(jobs))
                m.running.inc(len(jobs))
            return seqs

        def admit(room: int) -> list[Sequence]:
            return begin(self._joiners(task, room), False)

        def check() -> None:
            if self.backend.task != task:
                raise RuntimeError(f"resident pattern is {self.backend.task!r}, batch is for {task!r}")

        try:
            seqs = begin(batch, switched)
            runner = getattr(self.backend, "run_batch", None)  # an engine of its own (vLLM), else premoe's
            if runner is None:
                runner = partial(run_batch, self.backend.model, self.backend.tokenizer)
            runner(seqs, check=check, admit=admit if self.continuous else None, max_batch=self.max_batch)
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            for j in running:
                if j.finished is None:
                    j.finish_reason = "error"
                    j.notify("error", (500, f"generation failed: {e}"))
        finally:
            if m is not None:
                m.running.set(0)

    def _joiners(self, task: str, room: int) -> list[Job]:
        """Waiting requests of ``task`` that may join the running batch under the policy: fcfs only
        from the head of the queue; affinity while no request of another task has waited past
        ``max_wait`` (otherwise the batch drains so the scheduler can switch)."""
        if not self.pending:
            return []
        self._route_waiting()
        with self.cond:
            now = time.monotonic()
            if self.policy == "affinity" and any(
                j.task not in (None, task) and now - j.arrived > self.max_wait for j in self.pending
            ):
                return []
            picked = self._take(task, room)
            for j in picked:
                self.pending.remove(j)
            self._gauge()
            return picked

    def _finish(self, j: Job, s: Sequence) -> None:
        m = self.metrics
        j.finished, j.finish_reason = time.monotonic(), s.finish_reason
        j.completion_tokens, j.text_out = len(s.out_ids), s.text
        self.served += 1
        self.history.append(j)
        if m is not None:
            m.prompt_tokens.inc(len(j.prompt_ids))
            m.completion_tokens.inc(j.completion_tokens)
            m.latency.observe(j.finished - j.arrived)
            m.task_requests.labels(j.task, "pinned" if j.pinned else "routed").inc()
            m.running.dec()
        j.notify("done", j)

    def _emitter(self, job: Job) -> Callable[[str], None]:
        def emit(delta: str) -> None:
            if job.first_token is None:
                job.first_token = time.monotonic()
                if self.metrics is not None:
                    self.metrics.first_token.observe(job.first_token - job.arrived)
            job.notify("delta", delta)

        return emit
