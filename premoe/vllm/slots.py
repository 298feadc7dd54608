"""Which expert goes into which slot when the engine switches task (pure functions; no vLLM, no I/O).

The engine holds N expert slots per MoE layer. A fresh load lays the kept experts out in ascending
original id, as ``premoe prune`` writes them. A switch keeps every expert both tasks keep where it is,
puts each new expert into a slot the old task's dropped experts free, and rewrites the router rows in
slot order, so it writes only the experts that differ. A slot whose expert stays but whose down
projection differs (one task has a re-fitted row for it, the other the checkpoint's or its own) gets
only its down projection rewritten. Slot order does not change what the model computes: router row j
always scores the expert in slot j.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slot:
    """What one expert slot holds: the original expert id, and whose down projection (``None``: the
    checkpoint's; a task name: that task's re-fitted row)."""

    expert: int
    down: str | None = None


@dataclass(frozen=True)
class Write:
    """One slot to rewrite: ``full`` (gate, up and down) or only the down projection."""

    slot: int
    expert: int
    full: bool
    down: str | None


def fresh_slots(kept: list[int], refitted: set[int], task: str) -> list[Slot]:
    """The slots of a fresh load of ``task``'s pruned model (ascending original ids)."""
    return [Slot(e, task if e in refitted else None) for e in sorted(kept)]


def plan_switch(held: list[Slot], kept: list[int], refitted: set[int], task: str) -> tuple[list[Slot], list[Write]]:
    """The slots after switching to ``task``, which keeps ``kept`` with re-fitted down projections for
    ``refitted``, and the writes that get there from ``held``.

    Raises:
        ValueError: ``kept`` does not have one distinct expert per slot.
    """
    want = {e: (task if e in refitted else None) for e in kept}
    if len(want) != len(kept) or len(kept) != len(held):
        raise ValueError(f"a switch needs {len(held)} distinct experts, got {sorted(kept)}")
    where = {s.expert: j for j, s in enumerate(held)}
    free = [j for j, s in enumerate(held) if s.expert not in want]
    new, writes = list(held), []
    for e in sorted(want):
        j = where.get(e)
        if j is None:
            j = free.pop(0)
            writes.append(Write(j, e, True, want[e]))
        elif held[j].down != want[e]:
            writes.append(Write(j, e, False, want[e]))
        new[j] = Slot(e, want[e])
    return new, writes


def slot_rows(slots: list[Slot], kept: list[int]) -> list[int]:
    """For each slot, the row of its expert in ``kept`` order (ascending ids, as a task's re-fitted router
    rows are stored)."""
    position = {e: i for i, e in enumerate(sorted(kept))}
    return [position[s.expert] for s in slots]
