"""The bounded request queue, the router and the worker that switches patterns and generates.

One worker thread owns the model. Between generation batches it picks the next batch by the
scheduling policy, switches the resident pattern if the batch's task differs, and generates the
whole batch together (see :mod:`premoe.server.engine`, or the task server's own ``run_batch`` where
it brings an engine: vLLM's). Requests are routed (unless their task is pinned) by the worker
between batches, or, where the backend says routing touches nothing generation uses
(``routes_concurrently``: the vLLM engine's router has its own signature model), by a router thread
as they arrive, so routing never holds up generation; it routes them in as few forwards as keep the worker
fed (gathering arrivals longer while a batch of routed requests already waits). A batch only ever holds
requests of one task, and the worker checks before every forward that the resident pattern is that task's,
so no request is answered by another task's pattern.

Policies:

* ``affinity`` (default): serve the task of the oldest waiting request once it has waited longer
  than ``max_wait`` seconds; otherwise the task with the most requests waiting, staying on the
  resident task while it has at least a quarter as many waiting as that task (counted up to
  ``max_batch``), so a switch buys a much fuller batch. Each batch takes up to ``max_batch`` of
  the chosen task's requests, oldest first, wherever they sit in the queue. A mixed stream thus
  switches about once per batch of tasks rather than once per request, and no request waits more
  than ``max_wait`` plus one batch for its turn.
* ``fcfs``: strict arrival order; a batch is the run of consecutive same-task requests at the
  head of the queue (the baseline that ``bench/serve_load.py`` measures against).

With ``continuous`` (default), requests of the running batch's task also join it between tokens
(up to ``max_batch`` running), under the same policy: fcfs admits only from the head of the queue;
affinity admits freely while the running task is the one to serve, and once another task's
requests have waited past ``max_wait`` or outnumber the running task's (running and waiting) two to
one, only joiners that end no later than the batch's longest sequence, so the batch drains at full
width and the switch happens. Each request is answered as soon as its own sequence ends.

A backend that holds several tasks at once (``lanes`` > 1: the vLLM engine's ``--held-tasks``) is scheduled
by :mod:`premoe.server.lanes`.

A backend that stages switches in the background (``stage_ahead``: the vLLM engine's ``--stage-switches``)
is asked to ``prepare`` the next switch as soon as it is known: with several tasks held, when a task is chosen
(its evicted tasks admit nothing meanwhile); with one, when the running batch drains for another task. The
switch itself then happens between steps once the reads have ended (``prepared``), or when the batch is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from functools import partial
from typing import Callable

from premoe.errors import PremoeError
from premoe.server.engine import Sequence, run_batch
from premoe.server.jobs import Job, QueueFull, ShuttingDown
from premoe.server.lanes import LaneScheduling
from premoe.server.options import POLICIES

log = logging.getLogger("premoe")

COALESCE = 0.005  # seconds the router thread gathers arrivals into one forward while the worker may run short
DEFER = 0.1  # seconds it gathers them while the worker has a batch of routed requests waiting


class Scheduler(LaneScheduling):
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
        self.router: threading.Thread | None = None
        self.busy = False  # the worker is generating a batch
        if getattr(backend, "routes_concurrently", False):
            self.router = threading.Thread(target=self._route_loop, name="premoe-router", daemon=True)

    # -- called from the event loop -------------------------------------------------------------
    def start(self) -> None:
        if self.router is not None:
            self.router.start()
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise ShuttingDown()
            if len(self.pending) >= self.max_queue:
                raise QueueFull()
            self.pending.append(job)
            self._gauge()
            self.cond.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish every queued and running one, and end the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in (self.router, self.thread):
            if t is not None and t.is_alive():
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def depth(self) -> int:
        return len(self.pending)

    # -- the worker thread ---------------------------------------------------------------------
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.pending))

    def _taken(self, jobs: list[Job]) -> None:
        """Remove ``jobs`` from the queue to run them (under the lock), and wake the router thread: with fewer
        routed requests waiting, it may route sooner (:meth:`_route_in`)."""
        for j in jobs:
            self.pending.remove(j)
        self._gauge()
        if jobs:
            self.cond.notify_all()

    def _ready(self) -> bool:
        """Whether the worker has something to do (under the lock): a routed request, or one to route."""
        return any(j.task is not None for j in self.pending) if self.router is not None else bool(self.pending)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._ready() and not (self.stopping and not self.pending):
                    self.cond.wait()
                if not self.pending and self.stopping:
                    return
            if self.router is None:
                self._route_waiting()
            lanes = getattr(self.backend, "lanes", 1) > 1
            with self.cond:
                batch = [] if lanes else self._pick()
                self._taken(batch)
            if batch or lanes:
                self.busy = True
                try:
                    self._serve_lanes() if lanes else self._serve(batch)
                finally:
                    with self.cond:
                        self.busy = False
                        self.cond.notify_all()

    def _routes(self, jobs: list[Job]) -> list:
        """Route results of ``jobs`` (an exception in place of one that failed): all in one call where the
        backend routes a queue at once, else one by one."""
        many = getattr(self.backend, "route_many", None)
        if many is not None:
            try:
                return many([j.text for j in jobs])
            except Exception as e:  # noqa: BLE001 - a worker must survive anything a request triggers
                log.exception("routing failed")
                return [e] * len(jobs)
        out = []
        for j in jobs:
            try:
                out.append(self.backend.route(j.text))
            except Exception as e:  # noqa: BLE001
                if not isinstance(e, PremoeError):
                    log.exception("routing failed")
                out.append(e)
        return out

    def _route_waiting(self) -> None:
        """Route every waiting request not routed yet (outside the lock, so submissions never wait
        for the model), then drop the cancelled and failed ones from the queue."""
        with self.cond:
            waiting = [j for j in self.pending if j.task is None and not j.cancelled]
        for j in waiting:
            if j.pinned is not None:
                j.task = j.pinned
        routed = [j for j in waiting if j.pinned is None]
        for job, r in zip(routed, self._routes(routed) if routed else []):
            if isinstance(r, Exception):
                job.finish_reason = "error"
                job.notify("error", (400, str(r)) if isinstance(r, PremoeError) else (500, f"routing failed: {r}"))
                continue
            job.distance, job.margin = float(r.distance), None if r.margin is None else float(r.margin)
            job.task = r.task  # last: a routed job is one whose task is set
        with self.cond:
            self.pending = [j for j in self.pending if not (j.cancelled or j.finish_reason == "error")]
            self._gauge()
            self.cond.notify_all()

    def _route_loop(self) -> None:
        """The router thread: routes requests as they arrive, until the server stops and none is left, in as
        few forwards as keep the worker fed (see :meth:`_route_in`)."""
        while True:
            with self.cond:
                while True:
                    unrouted = [j for j in self.pending if j.task is None]
                    if not unrouted:
                        if self.stopping:
                            return
                        self.cond.wait()
                        continue
                    wait = self._route_in(unrouted)
                    if wait <= 0:
                        break
                    self.cond.wait(wait)
            self._route_waiting()

    def _route_in(self, unrouted: list[Job]) -> float:
        """Seconds the router thread still gathers arrivals before routing ``unrouted`` in one forward (under the
        lock). An idle worker, a stopping server or a full batch (``max_batch``) gets them at once. While the worker
        generates, arrivals are gathered for ``COALESCE`` seconds where fewer than ``max_batch`` routed requests of
        the held tasks wait (the worker may run short), else for up to ``DEFER``: requests that would wait for a
        seat anyway are routed together, since a forward of one prompt costs nearly as much as one of eight
        (routing about two at a time under load took as much CPU as a third of vLLM's steps on the tiny model;
        docs/results/vllm.md)."""
        if not self.busy or self.stopping or len(unrouted) >= self.max_batch:
            return 0.0
        held = getattr(self.backend, "held_tasks", None)
        held = set(held) if held is not None else {getattr(self.backend, "task", None)} - {None}
        routed = sum(1 for j in self.pending if j.task is not None and (not held or j.task in held))
        bound = COALESCE if routed < self.max_batch else DEFER
        return bound - (time.monotonic() - unrouted[0].arrived)

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
        if self.policy == "fcfs" or time.monotonic() - oldest.arrived > self.max_wait:
            return self._take(oldest.task, self.max_batch)
        counts = Counter(j.task for j in ready)  # in order of each task's oldest request
        best = max(counts, key=counts.__getitem__)  # the first of the fullest: ties go to the longest waiting
        current = self.backend.task
        stay = 4 * counts.get(current, 0) >= min(counts[best], self.max_batch)  # a switch must buy a much fuller batch
        return self._take(current if stay else best, self.max_batch)

    def _load(self, task: str, evict: tuple[str, ...] | None = None, jobs: list[Job] | None = None) -> bool:
        """Load ``task`` (evicting the held tasks ``evict`` where the backend holds several); False if it failed,
        with the error told to ``jobs`` (default: every waiting request of ``task``, taken off the queue)."""
        m, now = self.metrics, time.monotonic()
        before = self.backend.bytes_read
        try:
            if evict is None:
                stats = self.backend.load(task)
            else:
                stats = self.backend.load(task, evict=evict)
        except Exception as e:  # noqa: BLE001
            log.exception("loading task %s failed", task)
            failed = jobs
            if failed is None:
                with self.cond:
                    failed = [j for j in self.pending if j.task == task]
                    self.pending = [j for j in self.pending if j.task != task]
                    self._gauge()
            for j in failed:
                j.finish_reason = "error"
                j.notify("error", (500, f"loading task {task!r} failed: {e}"))
            return False
        self.switches += 1
        if m is not None:
            m.switches.inc()
            if getattr(stats, "staged", False):
                m.switches_staged.inc()
            m.bytes_read.inc(self.backend.bytes_read - before)
            m.switch_seconds.observe(time.monotonic() - now)
        return True

    def _serve(self, batch: list[Job]) -> None:
        task = batch[0].task
        switched = self.backend.task != task or self.backend.model is None
        if switched and not self._load(task, jobs=batch):
            return
        for j in batch:
            j.switched = switched

        def more(room: int, live: list[Sequence]) -> list[Job]:
            horizon = max((s.sampling.max_tokens - len(s.out_ids) for s in live), default=0)
            joiners = self._joiners(task, room, len(live), horizon)
            self._stage_next(task, len(live) + len(joiners))
            return joiners

        def check(live: list[Sequence]) -> None:
            if self.backend.task != task:
                raise RuntimeError(f"resident pattern is {self.backend.task!r}, batch is for {task!r}")

        self._generate(batch, more, check)

    def _generate(self, batch: list[Job], more, check) -> None:
        """Generate ``batch``, admitting ``more(room, live sequences)`` between steps (continuous batching) and
        calling ``check(live sequences)`` before every step."""
        m = self.metrics
        running: list[Job] = []
        live: list[Sequence] = []

        def begin(jobs: list[Job]) -> list[Sequence]:
            start = time.monotonic()
            seqs = []
            for j in jobs:
                j.started = start
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
                        task=j.task,
                    )
                )
            live.extend(seqs)
            if m is not None and jobs:
                m.batches.observe(len(jobs))
                m.running.inc(len(jobs))
            return seqs

        def admit(room: int) -> list[Sequence]:
            live[:] = [s for s in live if s.finish_reason is None]
            return begin(more(room, live))

        try:
            seqs = begin(batch)
            runner = getattr(self.backend, "run_batch", None)  # an engine of its own (vLLM), else premoe's
            if runner is None:
                runner = partial(run_batch, self.backend.model, self.backend.tokenizer)
            runner(
                seqs,
                check=lambda: check([s for s in live if s.finish_reason is None]),
                admit=admit if self.continuous else None,
                max_batch=self.max_batch,
            )
        except Exception as e:  # noqa: BLE001
            log.exception("generation failed")
            for j in running:
                if j.finished is None:
                    j.finish_reason = "error"
                    j.notify("error", (500, f"generation failed: {e}"))
        finally:
            if m is not None:
                m.running.set(0)

    # -- switches staged in the background (a backend with ``prepare``: the vLLM engine) ---------------
    @property
    def backend_prepares(self) -> bool:
        """Whether the backend stages switches in the background (the vLLM engine's ``stage_ahead``)."""
        return bool(getattr(self.backend, "stage_ahead", False))

    def _preparing(self) -> tuple[str, tuple[str, ...]] | None:
        """The switch the backend is staging in the background: (task, the held tasks it evicts)."""
        return self.backend.preparing if self.backend_prepares else None

    def _stage_next(self, task: str, running: int) -> None:
        """While the batch of ``task`` drains for another task (one task held), start reading that task's experts
        in the background, so the switch after the batch only writes them."""
        if not self.backend_prepares or self.backend.preparing is not None:
            return
        with self.cond:
            ready = [j for j in self.pending if j.task is not None]
            if not ready:
                return
            if self.policy == "fcfs":
                nxt = ready[0].task  # the batch admits nothing past the head of the queue
            elif not self._draining(task, running):
                return
            else:
                others = [j for j in ready if j.task != task]
                counts = Counter(j.task for j in others)
                late = time.monotonic() - others[0].arrived > self.max_wait
                nxt = others[0].task if late else max(counts, key=counts.__getitem__)
        if nxt != task:
            self.backend.prepare(nxt)

    def _joiners(self, task: str, room: int, running: int = 0, horizon: int | None = None) -> list[Job]:
        """Waiting requests of ``task`` that may join the running batch (``running`` sequences, the longest
        with ``horizon`` tokens left) under the policy: fcfs only from the head of the queue; affinity
        freely while ``task`` is the one to serve, and only those that end within ``horizon`` once the
        batch should drain (another task's request waited past ``max_wait``, or another task has more
        than twice as many requests waiting as ``task`` has running and waiting)."""
        if not self.pending:
            return []
        if self.router is None:
            self._route_waiting()
        with self.cond:
            if self.policy == "affinity" and self._draining(task, running):
                fits = [j for j in self._take(task, len(self.pending)) if j.sampling.max_tokens <= (horizon or 0)]
                picked = fits[:room]
            else:
                picked = self._take(task, room)
            self._taken(picked)
            return picked

    def _draining(self, task: str, running: int) -> bool:
        """Whether the batch of ``task`` should drain so another task gets the model (affinity; under the lock)."""
        now = time.monotonic()
        counts = Counter(j.task for j in self.pending if j.task is not None)
        if any(t != task and now - j.arrived > self.max_wait for j in self.pending if (t := j.task) is not None):
            return True
        return max((c for t, c in counts.items() if t != task), default=0) > 2 * (running + counts.get(task, 0))

    def _finish(self, j: Job, s: Sequence) -> None:
        m = self.metrics
        j.finished, j.finish_reason = time.monotonic(), s.finish_reason
        j.completion_tokens, j.text_out = s.completion_tokens, s.text
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
