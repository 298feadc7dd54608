"""Scheduling for a backend that holds several tasks at once (``lanes`` > 1: the vLLM engine's ``--held-tasks``),
the part of :class:`premoe.server.scheduler.Scheduler` that decides which held tasks admit requests, which task
to load next and which to evict.

A backend that holds several tasks at once (``lanes`` > 1: the vLLM engine's ``--held-tasks``) runs
requests of every held task in the same batch, and loads another task between steps while the held ones keep
generating, evicting held tasks where it does not fit beside them (``backend.evictions``). Only tasks with
nothing running are evicted, those with the fewest waiting first. fcfs loads the task at the head of the
queue; affinity the task whose request waited past ``max_wait``, else the one with the most waiting, and while
the engine has work only where that fills at least a quarter of ``max_batch`` seats. Where that task does not
fit even with every idle task evicted, the held task with the least work (running and waiting) drains (no new
requests of it join) once the task's request waited past ``max_wait`` or it has more than twice as many
waiting. The check before every step is that every running request's task is held.
"""

from __future__ import annotations

import time
from collections import Counter

from premoe.server.engine import Sequence
from premoe.server.jobs import Job


class LaneScheduling:
    """Methods of :class:`~premoe.server.scheduler.Scheduler` for several held tasks (its queue, lock, policy and
    backend)."""

    # -- several held tasks (a backend with ``lanes`` > 1: the vLLM engine's --held-tasks) ------------
    def _serve_lanes(self) -> None:
        """One run of the engine holding several tasks: requests of every held task share it, and another task is
        loaded between steps (evicting held tasks with nothing running where it does not fit) while the held
        ones run on."""
        jobs = self._admit_lanes(self.max_batch, Counter())
        if not jobs:
            return

        def more(room: int, live: list[Sequence]) -> list[Job]:
            return self._admit_lanes(room, Counter(s.task for s in live))

        def check(live: list[Sequence]) -> None:
            held = set(self.backend.held_tasks)
            stray = {s.task for s in live} - held
            if stray:
                raise RuntimeError(f"the engine holds {sorted(held)}, running requests are for {sorted(stray)}")

        self._generate(jobs, more, check)

    def _admit_lanes(self, room: int, running: Counter) -> list[Job]:
        """Up to ``room`` waiting requests to run now (``running``: live sequences by task): those of the held
        tasks first, then another task loaded beside them (see :meth:`_lane_plan`) and its requests. A backend
        that stages switches in the background (``prepare``) reads the new task's experts while the held tasks
        run on, and the switch is written at the first step after the reads end (the tasks it evicts admit
        nothing meanwhile)."""
        if self.router is None and self.pending:
            self._route_waiting()
        staging = self._preparing()
        with self.cond:
            picked = self._lane_take(room, running, () if staging is None else staging[1])
            self._taken(picked)
            running.update(j.task for j in picked)
            plan = self._lane_plan(room - len(picked), running) if staging is None else None
        busy = sum(running.values()) > 0
        if plan is not None and busy and self.backend_prepares and self.backend.prepare(*plan):
            staging, plan = plan, None  # read while the engine runs; written once the reads end
        if staging is not None and (not busy or self.backend.prepared()):
            plan = staging
        if plan is not None and self._load(*plan):
            with self.cond:
                loaded = [j for j in self._lane_take(room - len(picked), running) if j.task == plan[0]]
                for j in loaded:
                    j.switched = True
                self._taken(loaded)
            picked += loaded
        return picked

    def _held(self) -> list[str]:
        return list(self.backend.held_tasks) if self.backend.model is not None else []

    def _lane_take(self, room: int, running: Counter, leaving: tuple[str, ...] = ()) -> list[Job]:
        """Up to ``room`` routed waiting requests of held tasks, oldest first (fcfs: only from the head of the
        queue), none of a task whose lane drains (:meth:`_lane_drain`) or that a staged switch evicts
        (``leaving``; under the lock)."""
        held = set(self._held()) - set(leaving)
        drain = self._lane_drain(running) if self.policy == "affinity" else None
        out = []
        for j in self.pending:
            if len(out) >= room:
                break
            if j.task is None:
                continue
            if j.task not in held or j.task == drain:
                if self.policy == "fcfs":
                    break
                continue
            out.append(j)
        return out

    def _lane_plan(self, room: int, running: Counter) -> tuple[str, tuple[str, ...]] | None:
        """The task to load now and the held tasks to evict for it (``()``: it fits beside them), or ``None``
        (under the lock). Only tasks with nothing running are evicted, those with the fewest waiting first. fcfs
        loads the task at the head of the queue; affinity the task whose request waited past ``max_wait``, else
        the one with the most waiting, and while the engine has work only to fill at least a quarter of
        ``max_batch`` seats (``room``) with it."""
        ready = [j for j in self.pending if j.task is not None]
        held = self._held()
        if not ready or room <= 0:
            return None
        waiting = [j for j in ready if j.task not in held]
        if not waiting or (self.policy == "fcfs" and ready[0].task in held):
            return None
        if self.policy == "fcfs":
            target = ready[0].task
        else:
            counts = Counter(j.task for j in waiting)  # in order of each task's oldest request
            late = time.monotonic() - waiting[0].arrived > self.max_wait
            target = waiting[0].task if late else max(counts, key=counts.__getitem__)
            busy = sum(running.values()) > 0 or any(j.task in held for j in ready)
            if busy and not late and 4 * min(counts[target], room) < self.max_batch:
                return None
        evict = self.backend.evictions(target, self._idle_order(held, running, ready))
        return None if evict is None else (target, tuple(evict))

    @staticmethod
    def _idle_order(held: list[str], running: Counter, ready: list[Job]) -> list[str]:
        """The held tasks that may be evicted (nothing running), those with the fewest waiting first."""
        waiting = Counter(j.task for j in ready)
        return sorted((t for t in held if running[t] == 0), key=lambda t: (waiting[t], held.index(t)))

    def _lane_drain(self, running: Counter) -> str | None:
        """The held task whose requests should stop joining so that another task gets its room (affinity; under
        the lock): where the task to load next (the one whose request waited past ``max_wait``, else the one
        with the most waiting) does not fit even with every idle task evicted, and that request waited past
        ``max_wait`` or that task has more than twice as many waiting as the held task with the least work
        (running and waiting), that held task."""
        held = self._held()
        others = [j for j in self.pending if j.task is not None and j.task not in held]
        if not held or not others:
            return None
        ready = [j for j in self.pending if j.task is not None]
        waiting = Counter(j.task for j in ready)
        counts = Counter(j.task for j in others)  # in order of each task's oldest request
        late = time.monotonic() - others[0].arrived > self.max_wait
        target = others[0].task if late else max(counts, key=counts.__getitem__)
        if self.backend.evictions(target, self._idle_order(held, running, ready)) is not None:
            return None  # it can be loaded without draining anything
        busy = [t for t in held if running[t] > 0]
        if not busy:
            return None
        least = min(busy, key=lambda t: (running[t] + waiting[t], held.index(t)))
        if late:
            return least
        return least if counts[target] > 2 * (running[least] + waiting[least]) else None
