"""Which expert goes into which slot when the engine switches task (pure functions; no vLLM, no I/O).

The engine holds ``H × N`` expert slots per MoE layer (``--held-tasks H``, N kept experts per task). With one
task held (H = 1) its one *lane* holds the task's N experts and a switch replaces them. With H > 1 every task
of the store has a lane of its own, and a lane holds its task's N slots; tasks share the slots that hold
exactly what both need (same expert, same down projection, same router row), so the engine holds every task
whose slots fit together (:func:`fits`), at least H, and the worker masks each token's router to its own
task's slots (:mod:`premoe.vllm.worker`).

A switch fills one lane (:func:`plan_lane`). It keeps every slot the other lanes use, shares one of them where it
holds exactly what the new task needs, keeps every expert the lane's old task and the new one both keep where
it is, reuses free slots that already hold a needed expert, puts each other expert into a free slot, and
rewrites the router rows in slot order, so it writes only the experts that differ. A slot whose expert stays
but whose down projection differs (one task has a re-fitted row for it, the other the checkpoint's or its
own) gets only its down projection rewritten. Slot order does not change what the model computes: router row
j always scores the expert in slot j. Where the free slots are too few, tasks are evicted first
(:func:`evictions`): their lanes are emptied, which writes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
        ValueError: ``want`` repeats an expert, or needs more slots than the other lanes leave free.
    """
    experts = {s.expert for s in want}
    if len(experts) != len(want):
        raise ValueError(f"a switch needs distinct experts, got {sorted(s.expert for s in want)}")
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
    short = sum(j is None for j, _ in down_only) - len(open_slots)
    if short > 0:
        raise ValueError(f"the task needs {short} more expert slots than the other held tasks leave free")
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


def fits(wants: Sequence[Mapping[int, Sequence[Slot]]], slots: int) -> bool:
    """Whether tasks whose slots must hold ``wants`` (each: MoE layer -> its slots) fit together in ``slots``
    slots per layer: what two of them need exactly alike takes one slot."""
    if not wants:
        return True
    return all(len(set().union(*(w[layer] for w in wants))) <= slots for layer in wants[0])


def evictions(
    wants: Mapping[str, Mapping[int, Sequence[Slot]]], held: Sequence[str], task: str, order: Sequence[str], slots: int
) -> list[str] | None:
    """The held tasks to evict, taken from ``order`` (those that may go, first to go first), so that ``task`` fits
    beside the rest in ``slots`` slots per layer: ``[]`` where it fits as it is, ``None`` where evicting all of
    ``order`` is not enough."""
    stay = [t for t in held if t != task]
    out: list[str] = []
    for t in [None, *order]:
        if t is not None:
            if t not in stay:
                continue
            stay.remove(t)
            out.append(t)
        if fits([wants[x] for x in [*stay, task]], slots):
            return out
    return None
