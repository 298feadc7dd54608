"""``--held-tasks``: the vLLM engine holding several tasks at once, without vLLM (the engine itself is tested in
``tests/test_vllm.py``): the slot arithmetic of a lane switch, the request ids that carry a request's task to
the router mask, the refusals, and the scheduler that batches requests of every held task together and switches
only lanes with nothing running."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from premoe.assets import TINY_MODEL
from premoe.core.options import EngineOptions
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.model import inspect_model
from premoe.moe.plans import PrunePlan
from premoe.server.engine import Sampling
from premoe.server.scheduler import Job, Scheduler
from premoe.testing.builders import build_family
from premoe.vllm.slots import Slot, evictions, fits, plan_lane, want_slots
from premoe.vllm.source import check_lanes, engine_experts
from premoe.vllm.worker import request_id, request_task


def _random_want(rng, n, keep, task):
    kept = rng.sample(range(n), keep)
    refitted = set(rng.sample(kept, rng.randrange(keep + 1))) if rng.random() < 0.5 else set()
    return want_slots(kept, refitted, task, router=rng.random() < 0.2)


@pytest.mark.parametrize("seed", range(30))
def test_a_lane_switch_leaves_the_other_lanes_alone_and_writes_only_what_it_lacks(seed):
    rng = random.Random(seed)
    n, keep, lanes = 32, rng.choice([2, 4, 8]), rng.choice([2, 3])
    slots: list[Slot | None] = [Slot(e) for e in rng.sample(range(n), lanes * keep)]
    lane_slots: list[list[int]] = [[] for _ in range(lanes)]
    tasks: list[str | None] = [None] * lanes
    for step in range(8):  # a sequence of switches, each checked against the state before it
        lane, task = rng.randrange(lanes), f"t{step}"
        want = _random_want(rng, n, keep, task)
        new, mine, writes = plan_lane(slots, lane_slots, lane, want)
        key = lambda s: (s.expert, s.down or "", s.router or "")  # noqa: E731
        assert sorted(key(new[j]) for j in mine) == sorted(key(s) for s in want)  # the lane holds what it wants
        assert len(set(mine)) == keep
        others = {j for k, js in enumerate(lane_slots) if k != lane for j in js}
        for j in others:  # the other lanes' slots are never written, shared only where equal
            assert new[j] == slots[j] and all(w.slot != j for w in writes)
        for j in set(mine) & others:
            assert slots[j] in want
        for w in writes:
            before = slots[w.slot]
            assert w.slot in mine and new[w.slot].expert == w.expert and new[w.slot].down == w.down
            if w.full:  # a full write only where no usable copy of the expert was free to take
                assert before is None or before.expert != w.expert
            else:
                assert before.expert == w.expert and before.down != w.down
        unwritten = set(mine) - {w.slot for w in writes}
        for j in unwritten:  # a slot taken as it was already held the expert and its down projection
            assert (slots[j].expert, slots[j].down) == (new[j].expert, new[j].down)
        slots, tasks[lane] = new, task
        lane_slots = [mine if k == lane else js for k, js in enumerate(lane_slots)]
    assert all(len(js) == keep for js, t in zip(lane_slots, tasks) if t is not None)


def test_a_task_already_held_elsewhere_is_shared_without_writing():
    want = want_slots([1, 2, 3], set(), "b")
    slots = [Slot(1), Slot(2), Slot(3), Slot(7), Slot(8), Slot(9)]
    new, mine, writes = plan_lane(slots, [[0, 1, 2], [3, 4, 5]], 1, want)
    assert mine == [0, 1, 2] and writes == [] and new == slots
    refit = want_slots([1, 2, 3], {2}, "b")  # a re-fitted down projection is the task's own: not shared
    new, mine, writes = plan_lane(slots, [[0, 1, 2], [3, 4, 5]], 1, refit)
    assert [(w.expert, w.full) for w in writes] == [(2, True)] and 1 not in mine and {0, 2} <= set(mine)
    with pytest.raises(ValueError, match="distinct"):
        plan_lane(slots, [[0, 1, 2], [3, 4, 5]], 1, want_slots([1, 1, 2], set(), "x"))


def test_tasks_fit_together_where_their_slots_in_common_count_once():
    a, b, c = ({0: want_slots(k, set(), t)} for k, t in (([1, 2], "a"), ([2, 3], "b"), ([4, 5], "c")))
    assert fits([a, b], 3) and not fits([a, b], 2) and fits([a], 2) and fits([], 0)
    refit = {0: want_slots([1, 2], {2}, "r")}  # its re-fitted row of expert 2 is its own: a slot more
    assert not fits([a, refit], 2) and fits([a, refit], 3)
    wants = {"a": a, "b": b, "c": c}
    assert evictions(wants, ["a", "b"], "c", ["b", "a"], 4) == ["b"]  # first to go first, as few as needed
    assert evictions(wants, ["a", "b"], "c", ["a", "b"], 6) == []  # it fits as it is
    assert evictions(wants, ["a", "b"], "c", [], 4) is None  # nothing may go
    assert evictions(wants, ["a"], "b", ["a"], 3) == []  # shares expert 2 with a


@pytest.mark.parametrize("seed", range(20))
def test_every_task_that_fits_is_held_and_a_switch_never_touches_the_others(seed):
    """A lane per task, ``budget`` x N slots: tasks are loaded in random order, evicting (least recently loaded
    first) only where they do not fit; each load fits exactly when :func:`fits` says, the other held tasks'
    slots are never written, and the used slots always hold distinct contents (what two tasks share is held
    once)."""
    rng = random.Random(seed)
    n, keep, budget, count = 16, rng.choice([2, 4]), rng.choice([2, 3]), 6
    names = [f"t{i}" for i in range(count)]
    pool = rng.sample(range(n), min(n, keep * budget + 2))  # a small pool: tasks overlap
    wants = {
        t: {0: _random_want(rng, n, keep, t) if rng.random() < 0.3 else want_slots(rng.sample(pool, keep), set(), t)}
        for t in names
    }
    slots: list[Slot | None] = [Slot(e) for e in rng.sample(range(n), budget * keep)]
    lanes: list[list[int]] = [[] for _ in names]
    held: list[str] = []
    most = 0
    for _ in range(12):
        if len(held) == count:  # every task fits at once
            break
        task = rng.choice([t for t in names if t not in held])
        gone = evictions(wants, held, task, list(held), budget * keep)
        assert gone is not None  # evicting every held task always makes room for one
        after = [[] if names[k] in gone else js for k, js in enumerate(lanes)]
        lane = names.index(task)
        new, mine, writes = plan_lane(slots, after, lane, wants[task][0])
        others = {j for k, js in enumerate(after) if k != lane for j in js}
        assert all(w.slot not in others for w in writes) and all(new[j] == slots[j] for j in others)
        lanes, slots = [mine if k == lane else js for k, js in enumerate(after)], new
        held = [t for t in held if t not in gone] + [task]
        used = {j for js in lanes for j in js}
        assert len({slots[j] for j in used}) == len(used) <= budget * keep  # shared contents held once
        assert fits([wants[t] for t in held], budget * keep)
        most = max(most, len(held))
    with pytest.raises(ValueError, match="more expert slots"):  # a task that does not fit is refused
        full = [list(range(budget * keep))] + [[] for _ in names[1:]]
        plan_lane([Slot(100 + j) for j in range(budget * keep)], full, 1, wants[names[1]][0])
    assert most >= budget


@pytest.mark.parametrize("task", ["add", "a.b-c", "ünï/code", "x" * 200])
def test_request_ids_carry_any_task_name(task):
    rid = request_id(task, 17)
    assert request_task(rid) == task and request_task(rid + "-a1b2") == task  # vLLM may add a suffix
    assert request_task("cmpl-123") is None and request_task(request_id(None, 3)) is None


def test_engine_experts_start_with_the_first_task_and_the_others_likely_ones():
    plan = lambda kept: PrunePlan({0: kept}, 8, 2, 2, task="x")  # noqa: E731
    first, others = plan([0, 1]), [plan([5, 6]), plan([6, 7]), plan([6, 1])]
    assert engine_experts(8, first, others, 2) == {0: [0, 1, 5, 6]}  # 6 kept 3 times, then 5 before 7 (lower id)
    assert engine_experts(8, first, others, 1) == {0: [0, 1]}


def test_held_tasks_are_refused_where_a_mask_cannot_restrict_the_router(tmp_path):
    check_lanes(inspect_model(TINY_MODEL), 2)  # softmax top-k: served
    check_lanes(inspect_model(build_family("mixtral", tmp_path / "mixtral")), 3)
    dsv3 = inspect_model(build_family("deepseek_v3", tmp_path / "dsv3"))
    check_lanes(dsv3, 1)
    with pytest.raises(UnsupportedModelError, match="--held-tasks 2 .*--held-tasks 1"):
        check_lanes(dsv3, 2)
    with pytest.raises(InputError, match="held_tasks"):
        check_lanes(dsv3, 0)
    with pytest.raises(InputError, match="`held_tasks` must be an integer"):
        EngineOptions(engine="vllm", held_tasks=0)
    with pytest.raises(InputError, match="`held_tasks` and `stage_switches` need `engine` vllm"):
        EngineOptions(engine="hf", held_tasks=2)


class _Lanes:
    """An engine of ``budget`` x N slots (one MoE layer) holding every task whose slots fit together (``wants``:
    each task's slots; default: one expert of its own per task, so ``budget`` tasks): ``run_batch`` advances
    every live sequence one token per step and records each step's tasks; ``load`` records what ran when it
    evicted tasks."""

    routes_concurrently = False

    def __init__(self, budget: int, wants: dict | None = None):
        self.wants = wants or {t: {0: [Slot(i)]} for i, t in enumerate("abcde")}
        self.budget, self.slots = budget, budget * len(next(iter(self.wants.values()))[0])
        self.lanes = 1 if budget == 1 else len(self.wants)
        self.model, self.task = object(), None
        self.held: list[str] = []
        self.steps: list[Counter] = []
        self.loads: list[tuple[str, tuple[str, ...], Counter]] = []
        self.live: list = []

    @property
    def held_tasks(self):
        return tuple(self.held)

    @property
    def bytes_read(self):
        return 0

    def evictions(self, task, order=None):
        order = list(self.held) if order is None else order
        if self.lanes == 1:
            return list(self.held) if set(self.held) <= set(order) else None
        return evictions(self.wants, self.held, task, order, self.slots)

    def load(self, task, evict=None):
        if task in self.held:
            return
        gone = tuple(self.evictions(task) if evict is None else evict)
        self.loads.append((task, gone, Counter(s.task for s in self.live)))
        self.held = [t for t in self.held if t not in gone] + [task]
        assert fits([self.wants[t] for t in self.held], self.slots), (self.held, gone)
        self.task, self.most = task, max(getattr(self, "most", 0), len(self.held))

    def run_batch(self, seqs, check=None, admit=None, max_batch=None):
        self.live = list(seqs)
        while self.live:
            check()
            self.steps.append(Counter(s.task for s in self.live))
            for s in list(self.live):
                s.out_ids.append(0)
                if len(s.out_ids) >= s.sampling.max_tokens:
                    s.finish_reason = "length"
                    self.live.remove(s)
                    s.on_done(s)
            if admit is not None and len(self.live) < max_batch:
                self.live += admit(max_batch - len(self.live))
            if not self.live and admit is not None:
                self.live += admit(max_batch)


def _serve_stream(backend, tasks: list[str], max_batch: int = 8) -> list[Job]:
    s = Scheduler(backend, max_batch=max_batch, max_wait=60)
    jobs = []
    rng = random.Random(0)
    for t in tasks:
        sampling = Sampling(rng.randint(2, 12))
        jobs.append(Job("", [], sampling, lambda *_: None, task=t))
    s.pending = list(jobs)
    s.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and s.served < len(jobs):
        time.sleep(0.01)
    s.stop(5)
    assert s.served == len(jobs) and all(j.finish_reason == "length" for j in jobs)
    return jobs


def test_the_scheduler_batches_held_tasks_together_and_switches_only_idle_lanes():
    rng = random.Random(1)
    tasks = [rng.choice("abcde") for _ in range(120)]
    two = _Lanes(2)
    _serve_stream(two, tasks)
    assert any(len(step) == 2 for step in two.steps)  # requests of both held tasks in one step
    for task, gone, running in two.loads:  # a task evicted only with nothing of it running
        assert all(running[t] == 0 for t in gone) and task not in running
    assert all(len(step) <= 2 for step in two.steps)  # never more tasks in a step than lanes (check() too)

    one = _Lanes(1)  # the same stream, one task held at a time
    _serve_stream(one, tasks)
    width = lambda b: sum(sum(s.values()) for s in b.steps) / len(b.steps)  # noqa: E731
    assert width(two) > 1.2 * width(one), (width(two), width(one))


class _Staging(_Lanes):
    """``_Lanes`` whose switches are staged in the background (``prepare``): the reads end ``need`` steps after
    they start; ``staged`` records, for each load that used them, how many steps ran meanwhile."""

    stage_ahead = True

    def __init__(self, lanes: int, need: int = 3):
        super().__init__(lanes)
        self.need, self._prep, self.staged = need, None, []

    @property
    def preparing(self):
        return None if self._prep is None else self._prep[:2]

    def prepare(self, task, evict=None):
        if task in self.held or self._prep is not None:
            return False
        gone = tuple(self.evictions(task) if evict is None else evict)
        self._prep = (task, gone, len(self.steps))
        return True

    def prepared(self):
        return self._prep is not None and len(self.steps) - self._prep[2] >= self.need

    def load(self, task, evict=None):
        if task in self.held:
            return
        prep, self._prep = self._prep, None
        if prep is not None and prep[0] == task and evict in (None, prep[1]):
            self.staged.append(len(self.steps) - prep[2])
            evict = prep[1]
        super().load(task, evict)


@pytest.mark.parametrize("lanes", [1, 2])
def test_switches_are_staged_while_the_engine_runs_and_written_between_steps(lanes):
    rng = random.Random(2)
    tasks = [rng.choice("abcde") for _ in range(120)]
    backend = _Staging(lanes)
    _serve_stream(backend, tasks)
    assert backend.staged, "no switch was staged in the background"
    assert any(n > 0 for n in backend.staged)  # the engine stepped while the reads ran
    assert sum(backend.staged) >= backend.need  # ...and the writes waited for the reads where work remained
    for task, gone, running in backend.loads:  # the tasks evicted had nothing running
        assert all(running[t] == 0 for t in gone) and task not in running
    assert all(len(step) <= lanes for step in backend.steps)


def test_a_backend_that_does_not_stage_ahead_switches_in_the_foreground():
    rng = random.Random(2)
    tasks = [rng.choice("abcde") for _ in range(60)]
    backend = _Staging(1)
    backend.stage_ahead = False  # vLLM's threads take every core: reads in the background would slow each step
    _serve_stream(backend, tasks)
    assert backend.loads and not backend.staged


def test_stage_switches_is_a_vllm_option():
    assert EngineOptions(engine="vllm", stage_switches="on").vllm_only
    with pytest.raises(InputError, match="`stage_switches` must be one of"):
        EngineOptions(engine="vllm", stage_switches="sometimes")
    with pytest.raises(InputError, match="stage_switches` need `engine` vllm"):
        EngineOptions(engine="hf", stage_switches="off")


def test_tasks_that_share_experts_are_held_together_beyond_the_budget():
    """Slots for two tasks (budget 2, N = 2), five tasks of which four share expert 0: three of those are held
    at once (3 slots of 4), requests of tasks held together share steps, and a task is evicted only with nothing
    of it running."""
    wants = {t: {0: want_slots([0, e], set(), t)} for t, e in zip("abcd", (1, 2, 3, 4))}
    wants["e"] = {0: want_slots([5, 6], set(), "e")}
    rng = random.Random(3)
    tasks = [rng.choice("abcde") for _ in range(150)]
    backend = _Lanes(2, wants)
    _serve_stream(backend, tasks)
    assert backend.most == 3  # three tasks held, with slots for two
    assert max(len(step) for step in backend.steps) >= 2
    for task, gone, running in backend.loads:
        assert all(running[t] == 0 for t in gone) and task not in running
    for step in backend.steps:
        assert fits([wants[t] for t in step], 4)
