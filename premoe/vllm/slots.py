"""Which expert goes into which slot when the engine switches task (pure functions; no vLLM, no I/O).

The engine holds ``lanes × N`` expert slots per MoE layer: each lane holds one task's N experts, and with
more than one lane the worker masks each token's router to its own task's slots (:mod:`premoe.vllm.worker`).
A switch replaces the task of one lane. It keeps every slot the other lanes use, reuses a slot another lane
already holds with exactly what the new task needs (same expert, same down projection, same router row), keeps
every expert both the old and the new task of the lane keep where it is, puts each new expert into a slot the
lane frees, and rewrites the router rows in slot order, so it writes only the experts that differ. A slot whose
expert stays but whose down projection differs (one task has a re-fitted row for it, the other the
checkpoint's or its own) gets only its down projection rewritten. Slot order does not change what the model
computes: router row j always scores the expert in slot j.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """What one expert slot holds: the original expert id, whose down projection (``None``: the checkpoint's;
    a task name: that task's re-fitted row) and whose router row (likewise)."""

    expert: int
    down: str | None = None
    router: str | None = None


@dataclass(frozen=True)
class Write:
    """One slot to rewrite: ``full`` (gate, up and down) or only the down projection."""

    slot: int
    expert: int
    full: bool
    down: str | None


def want_slots(kept: list[int], refitted: set[int], task: str, router: bool = False) -> list[Slot]:
    """What ``task``'s slots must hold (ascending original ids, the order of a fresh load of its pruned model):
    its re-fitted down projections for ``refitted``, and its re-fitted router rows where ``router``."""
    return [Slot(e, task if e in refitted else None, task if router else None) for e in sorted(kept)]


def plan_lane(
    held: list[Slot | None], lanes: list[list[int]], lane: int, want: list[Slot]
) -> tuple[list[Slot | None], list[int], list[Write]]:
    """Switch lane ``lane`` to a task whose slots must hold ``want``: the slots afterwards, the lane's slots,
    and the writes that get there.

    ``held`` is every slot's content (``None``: nothing usable), ``lanes`` each lane's slots. Slots of the
    other lanes are never written; one of them is shared where it holds exactly a wanted slot.

    Raises:
        ValueError: ``want`` does not have one distinct expert per lane slot.
    """
    per = len(held) // max(len(lanes), 1)
    experts = {s.expert for s in want}
    if len(experts) != len(want) or len(want) != per:
        raise ValueError(f"a switch needs {per} distinct experts, got {sorted(s.expert for s in want)}")
    pinned = {j for k, slots in enumerate(lanes) if k != lane for j in slots}
    shared = {held[j]: j for j in sorted(pinned)}
    free = [j for j in range(len(held)) if j not in pinned]
    exact = {(s.expert, s.down): j for j in free if (s := held[j]) is not None}
    same_expert = {s.expert: j for j in free if (s := held[j]) is not None}
    new, mine, writes, placed, rest = list(held), [], [], set(), []
    for w in want:  # first what needs no write: shared slots, then free slots already holding it
        j = shared.get(w)
        if j is None:
            j = exact.get((w.expert, w.down))
            if j is not None and j in placed:
                j = None
        if j is None:
            rest.append(w)
            continue
        placed.add(j)
        new[j] = w
        mine.append(j)
    down_only = []
    for w in rest:  # then slots holding the expert with another down projection
        j = same_expert.get(w.expert)
        if j is not None and j not in placed:
            placed.add(j)
            down_only.append((j, w))
        else:
            down_only.append((None, w))
    open_slots = [j for j in free if j not in placed]
    for j, w in down_only:
        if j is None:
            j = open_slots.pop(0)
            writes.append(Write(j, w.expert, True, w.down))
        else:
            writes.append(Write(j, w.expert, False, w.down))
        new[j] = w
        mine.append(j)
    return new, sorted(mine), sorted(writes, key=lambda w: w.slot)


def plan_switch(held: list[Slot], kept: list[int], refitted: set[int], task: str) -> tuple[list[Slot], list[Write]]:
    """One lane: the slots after switching to ``task``, which keeps ``kept`` with re-fitted down projections for
    ``refitted``, and the writes that get there from ``held``.

    Raises:
        ValueError: ``kept`` does not have one distinct expert per slot.
    """
    new, _, writes = plan_lane(list(held), [list(range(len(held)))], 0, want_slots(kept, refitted, task))
    return new, writes


def slot_rows(slots: list[Slot], kept: list[int]) -> list[int]:
    """For each slot, the row of its expert in ``kept`` order (ascending ids, as a task's re-fitted router
    rows are stored)."""
    position = {e: i for i, e in enumerate(sorted(kept))}
    return [position[s.expert] for s in slots]
