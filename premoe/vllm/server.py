"""The task server of ``--engine vllm``: premoe routes, vLLM generates, and a switch writes only the experts
that differ into the running engine.

:class:`VllmTaskServer` has the interface of :class:`premoe.moe.server.TaskServer` (``route``, ``load``,
``generate``, ``complete``, ``run_batch``, ``tasks``, ``task``, ``bytes_read``), so ``generate``, ``chat`` and
the HTTP server (routing, pinned tasks, streaming, batching, metrics, drain) run unchanged on it.

* Routing computes the query signature with premoe's own prefix model (embeddings and the first MoE layers'
  routers, no expert: :class:`premoe.moe.router.QueryRouter`), as on premoe's engine.
* vLLM starts on an engine directory (:mod:`premoe.vllm.source`) with the ``premoe`` load format: the first
  task's pruned model, read from the source checkpoint by vLLM's default loader.
* ``load(task)`` asks every worker to write the new task's differing experts and router rows
  (``collective_rpc("premoe_switch")``); if every rank succeeded it commits, else every rank rolls back and
  :class:`~premoe.errors.SwitchError` says why, with the previous task still served. Then the prefix cache
  is reset: cached KV blocks were computed with the other task's experts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from premoe.core.config import load_tokenizer
from premoe.core.options import EngineOptions, SignatureSpec
from premoe.core.store import PatternStore
from premoe.errors import InputError, PremoeError
from premoe.moe.model import inspect_model
from premoe.moe.options import MoeSelection
from premoe.moe.plans import resolved
from premoe.moe.router import QueryRouter
from premoe.moe.server import Reply, SwitchStats, routed_reply
from premoe.server.engine import Sampling, Sequence, eos_ids
from premoe.vllm.slots import evictions, fits
from premoe.vllm.source import EngineSpec, check_engine_model, check_lanes, engine_experts, write_engine_dir

INSTALL_HINT = "install vLLM into this Python (docs/serving.md#the-vllm-engine) or pass --engine hf"


class EngineError(PremoeError):
    """vLLM refused to start the engine (its message says why)."""


class SwitchError(PremoeError):
    """A task switch failed on some rank; every rank went back to the previous task."""


def _cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class VllmTaskServer:
    """Routes prompts to stored task patterns and serves them from a vLLM engine holding ``keep`` experts per
    MoE layer; see the module docstring. Arguments as :class:`premoe.moe.server.TaskServer`, plus ``engine``
    (tensor/expert parallel, context length, KV cache) and ``max_seqs`` (requests vLLM runs at once)."""

    routes_concurrently = True  # the router's signature model is its own: the HTTP server routes on a thread

    def __init__(
        self,
        model: str | Path,
        store: str | Path,
        selection: MoeSelection | int,
        *,
        signature: SignatureSpec | None = None,
        refit: bool | None = None,
        dtype: str | None = None,
        engine: EngineOptions = EngineOptions(engine="vllm"),
        max_seqs: int = 8,
    ):
        from premoe.vllm import available

        if not available():
            raise InputError(f"--engine vllm needs vLLM, which this Python does not have: {INSTALL_HINT}")
        self.info = inspect_model(model)
        check_engine_model(self.info)
        self.store = PatternStore.open(store)  # QueryRouter checks it is this model's
        self.selection = selection if isinstance(selection, MoeSelection) else MoeSelection(keep=selection)
        self.keep = resolved(self.selection, self.info.router).keep  # an impossible selection fails here
        self.budget = engine.held_tasks  # the engine holds budget x keep expert slots per MoE layer
        check_lanes(self.info, self.budget)
        if self.budget * self.keep > self.info.num_experts:
            raise InputError(
                f"--held-tasks {self.budget} x keep {self.keep} = {self.budget * self.keep} expert slots per layer, "
                f"more than the model's {self.info.num_experts} experts: hold fewer tasks or keep fewer experts"
            )
        self.signature = signature or SignatureSpec()
        self.router = QueryRouter(self.info, self.store, self.signature)
        # lanes of the router mask: one task held, or a lane per task (every task whose slots fit is held)
        self.lanes = 1 if self.budget == 1 else max(2, len(self.tasks))
        self._lane_of = {t: (0 if self.lanes == 1 else i) for i, t in enumerate(sorted(self.tasks))}
        self.refit = refit
        self.dtype = dtype if dtype not in (None, "auto") else None
        self.options, self.max_seqs = engine, max_seqs
        self.tokenizer = load_tokenizer(self.info.path)
        from transformers import GenerationConfig

        try:
            gen = GenerationConfig.from_pretrained(self.info.path)
        except (OSError, ValueError):
            gen = None
        self.eos = eos_ids(SimpleNamespace(generation_config=gen), self.tokenizer)
        self.model = None  # the vllm.LLM, once started
        self.task: str | None = None  # the last task loaded
        self.lane_tasks: list[str | None] = [None] * self.lanes  # each lane's task
        self._used: dict[str, int] = {}  # when each task was last loaded (least recently used is evicted first)
        self._source = None  # the engine directory's EngineSource: what each task's slots hold
        self._wants: dict[str, dict[int, list]] = {}  # each task's slots, per MoE layer
        self._fitted: dict[tuple, list[str] | None] = {}  # evictions() answers
        self._generation: dict[str, int] = {}  # loads of each task: its prefix-cache salt
        self._clock = 0
        self.directory: Path | None = None
        self._bytes = self.router.bytes_read
        self.switch_log: list[SwitchStats] = []
        self._refits: dict[str, bool] = {}
        self._prepared: tuple[str, int, tuple[int, ...]] | None = None  # (task, lane, evicted lanes) by prepare()
        self._prepared_at, self._ready = 0.0, False
        self._stage_seconds = 0.0  # how long the last background staging took

    # -- the TaskBackend interface ----------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.router.retriever.names)

    @property
    def held_tasks(self) -> tuple[str, ...]:
        """The tasks held now (one per lane holding one): requests of any of them can share a batch."""
        return tuple(t for t in self.lane_tasks if t is not None)

    def salt(self, task: str | None) -> str:
        """The prefix-cache salt of ``task``'s requests: new each time the task is loaded into a lane."""
        task = task or self.task or ""
        return f"{task}#{self._generation.get(task, 0)}"

    @property
    def bytes_read(self) -> int:
        """Bytes read so far by premoe's router and by every vLLM rank (checkpoint and stored re-fitted rows)."""
        return self._bytes

    def route(self, text: str):
        return self.router.route(text)

    def route_many(self, texts: list[str]) -> list:
        return self.router.route_many(texts)

    def load(self, task: str, evict: list[str] | tuple[str, ...] | None = None) -> SwitchStats:
        """Hold ``task``'s experts: start vLLM on it the first time, then switch in place. With ``--held-tasks`` above
        1 a held task is already served; another is added beside the held ones, after evicting ``evict`` (held
        tasks; default: :meth:`evictions`, least recently used first), as a staged switch (:meth:`prepare`) is.

        Raises:
            InputError: an unknown task, or ``evict`` leaves it no room. SwitchError: a rank failed; the previous
            tasks are still held.
        """
        if task not in self.tasks:
            raise InputError(f"unknown task {task!r}; the store has {', '.join(self.tasks)}")
        t0 = time.perf_counter()
        self._clock += 1
        if self.model is None:
            read = self._start(task)
            stats = SwitchStats(task, bytes_read=read, experts_read=self.keep * len(self.info.moe_layers))
            if self.lanes > 1:  # the engine started with budget x N experts and no task in any lane
                stats = self._switch(task, self._lane_of[task], ())
                stats.bytes_read += read
                stats.experts_read = self.budget * self.keep * len(self.info.moe_layers)
            else:  # started as the task's export: its one lane holds it
                self.lane_tasks[0], self._used[task] = task, self._clock
        elif task in self.lane_tasks:
            self.task, self._used[task] = task, self._clock
            return SwitchStats(task, experts_kept=self.keep * len(self.info.moe_layers))
        else:
            prepared = self._prepared
            if evict is None and prepared is not None and prepared[0] == task:
                lane, gone = prepared[1], prepared[2]
            else:
                lane, gone = self._target(task, evict)
            stats = self._switch(task, lane, gone)
        self.task = task
        stats.seconds = time.perf_counter() - t0
        self.switch_log.append(stats)
        return stats

    # -- which tasks fit together ------------------------------------------------------------------------
    def _wanted(self, task: str) -> dict[int, list]:
        if task not in self._wants:
            if self._source is None:
                from premoe.vllm.source import EngineSource

                self._source = EngineSource.open(self.directory)
            self._wants[task] = self._source.wanted(task)
        return self._wants[task]

    def evictions(self, task: str, order: list[str] | None = None) -> list[str] | None:
        """The held tasks to evict, taken from ``order`` (default: every held task, least recently used first), so
        that ``task`` fits beside the others in the engine's ``--held-tasks`` x N slots per MoE layer (tasks share
        the slots that hold exactly what both need): ``[]`` where it fits as it is, ``None`` where evicting
        all of ``order`` is not enough. One task held: the held task."""
        held = list(self.held_tasks)
        if order is None:
            order = sorted(held, key=lambda t: self._used.get(t, 0))
        if task in held:
            return []
        if self.lanes == 1:
            return held if set(held) <= set(order) else None
        if self.model is None:
            return [] if not held else None
        key = (tuple(held), task, tuple(order))  # the scheduler asks before every step: remember the answers
        if key not in self._fitted:
            if len(self._fitted) >= 4096:  # many tasks: keep the memory bounded
                self._fitted.clear()
            wants = {t: self._wanted(t) for t in [*held, task]}
            self._fitted[key] = evictions(wants, held, task, list(order), self.budget * self.keep)
        found = self._fitted[key]
        return None if found is None else list(found)

    def _target(self, task: str, evict: list[str] | tuple[str, ...] | None) -> tuple[int, tuple[int, ...]]:
        """``task``'s lane and the lanes to empty for it: ``evict``'s (checked), else :meth:`evictions`'."""
        if self.lanes == 1:
            return 0, ()
        gone = self.evictions(task) if evict is None else [t for t in evict if t in self.lane_tasks]
        stay = [t for t in self.held_tasks if t not in (gone or ())]
        if gone is None or not fits([self._wanted(t) for t in [*stay, task]], self.budget * self.keep):
            raise InputError(f"task {task!r} does not fit beside {stay} in --held-tasks {self.budget}: evict more")
        return self._lane_of[task], tuple(self.lane_tasks.index(t) for t in gone)

    # -- staging the next switch while the engine serves -----------------------------------------------
    @property
    def preparing(self) -> tuple[str, tuple[str, ...]] | None:
        """The switch being staged in the background (:meth:`prepare`): ``(task, the held tasks it evicts)``."""
        if self._prepared is None:
            return None
        task, lane, gone = self._prepared
        if self.lanes == 1:
            return task, tuple(t for t in self.lane_tasks if t is not None)
        return task, tuple(self.lane_tasks[k] for k in gone)

    @property
    def stage_ahead(self) -> bool:
        """Whether ``premoe serve`` should :meth:`prepare` switches (``--stage-switches``): ``on``, ``off``, or
        (``auto``) where the model runs on a GPU, so that the reads do not take CPU time from vLLM's steps. On
        the CPU, reads in the background did not pay in the configurations measured (docs/results/vllm.md):
        the steps they share the cores with slow down about as much as the pause they save, or more."""
        mode = self.options.stage_switches
        if mode != "auto" or self.model is None:
            return mode == "on"
        return not _cpu()

    def prepare(self, task: str, evict: list[str] | tuple[str, ...] | None = None) -> bool:
        """Start reading, slicing and packing ``task``'s differing experts, after evicting ``evict`` (as
        :meth:`load`), on a thread of every worker, while vLLM keeps stepping; the switch itself waits for
        :meth:`load` (which then only writes what was staged). False where there is nothing to stage: the engine
        has not started, ``task`` is held, or another switch is being staged."""
        if self.model is None or task in self.lane_tasks or self._prepared is not None or task not in self.tasks:
            return False
        lane, gone = self._target(task, evict)
        results = self.model.collective_rpc("premoe_switch", args=(task, lane, False, True, gone))
        if not all(r.get("ok") for r in results):  # a rank refused to start: load() will switch in the foreground
            self.model.collective_rpc("premoe_rollback")
            return False
        self._prepared, self._prepared_at = (task, lane, gone), time.perf_counter()
        self._ready = all(r.get("ready") for r in results)  # nothing to read: staged already
        return True

    def prepared(self) -> bool:
        """Whether the switch :meth:`prepare` started is staged on every rank (``load`` will not wait for reads).
        Asks the ranks only once the last staging's duration has nearly passed: each question waits for vLLM's
        step to end."""
        if self._prepared is None:
            return False
        if self._ready:
            return True
        if time.perf_counter() - self._prepared_at < 0.8 * self._stage_seconds:
            return False
        return all(self.model.collective_rpc("premoe_staged"))

    def cancel(self) -> None:
        """Drop the switch :meth:`prepare` started (waits for its reads to end; nothing was written)."""
        if self._prepared is not None:
            self._prepared = None
            self.model.collective_rpc("premoe_rollback")

    def _switch(self, task: str, lane: int, gone: tuple[int, ...]) -> SwitchStats:
        """Write ``task`` into lane ``lane``, the lanes ``gone`` emptied, on every rank: staged everywhere, then
        committed everywhere (one rank: staged and committed in one call, so the engine pauses for one call
        between its steps, not two). Where :meth:`prepare` staged this very switch, only its commit is left
        (after waiting for its reads)."""
        was = ", ".join(repr(t) for t in self.held_tasks or (self.task,))
        one_rank = self.options.tensor_parallel == 1  # nothing to agree on: stage and write in one call
        staged = self._prepared == (task, lane, gone)
        if staged:
            self._prepared = None
            results = self.model.collective_rpc("premoe_finish", args=(one_rank,))
            self._stage_seconds = max((r.get("seconds", 0.0) for r in results), default=0.0)
        else:
            self.cancel()
            results = self.model.collective_rpc("premoe_switch", args=(task, lane, one_rank, False, gone))
        read = sum(r.get("bytes_read", 0) for r in results)
        self._bytes += read
        failed = [r["error"] for r in results if not r.get("ok")]
        if failed:
            if not one_rank:
                self.model.collective_rpc("premoe_rollback")
            raise SwitchError(f"switching to task {task!r} failed, still serving {was}: {failed[0]}")
        if not one_rank:
            try:
                self.model.collective_rpc("premoe_commit")
            except Exception as e:  # a router's re-packing failed: each rank restored its routers
                why = f"{type(e).__name__}: {e}"
                raise SwitchError(f"writing task {task!r} into the engine failed, still serving {was}: {why}") from None
        for k in gone:
            self.lane_tasks[k] = None
        self.lane_tasks[lane], self._used[task] = task, self._clock
        self._generation[task] = self._generation.get(task, 0) + 1
        if self.lanes == 1:
            self.model.reset_prefix_cache()  # cached KV blocks were computed with the other task's experts
        counts = [r.get("experts_written", 0) for r in results]
        written = sum(counts) if self.options.expert_parallel else max(counts)  # EP: each rank its own experts
        stats = SwitchStats(task, bytes_read=read, experts_read=written, staged=staged)
        stats.experts_kept = self.keep * len(self.info.moe_layers) - written
        return stats

    def _start(self, task: str) -> int:
        from vllm import LLM

        from premoe.moe.patterns import plan_from_pattern
        from premoe.vllm.worker import LOAD_FORMAT, register

        plan = plan_from_pattern(self.info, self.store.load(task), self.selection)
        if self.lanes > 1:  # the config's geometry: budget x N experts
            others = [plan_from_pattern(self.info, self.store.load(t), self.selection) for t in self.tasks if t != task]
            plan = replace(plan, kept=engine_experts(self.info.num_experts, plan, others, self.budget))
        spec = EngineSpec(
            str(self.info.path), str(self.store.path), task, asdict(self.selection), self.refit, self.lanes, self.budget
        )
        self.directory = write_engine_dir(self.info, plan, spec)
        register()
        opts = self.options
        affinity = getattr(os, "sched_getaffinity", None)
        cores = len(affinity(0)) if affinity is not None else os.cpu_count() or 1  # before vLLM binds any thread
        if _cpu():
            if opts.kv_cache_gb is not None or "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(opts.kv_cache_gb or 2)
        try:
            self.model = LLM(
                model=str(self.directory),
                load_format=LOAD_FORMAT,
                worker_extension_cls="premoe.vllm.worker.ExpertSwitcher",
                dtype=self.dtype or "auto",
                tensor_parallel_size=opts.tensor_parallel,
                enable_expert_parallel=opts.expert_parallel,
                max_model_len=opts.max_model_len,
                max_num_seqs=self.max_seqs,
                # CPU: vLLM's compile pass costs minutes and gains little here. Several lanes: the router mask is
                # Python run at every step, which a captured CUDA graph would skip
                enforce_eager=_cpu() or self.lanes > 1,
                skip_tokenizer_init=True,  # premoe tokenizes and detokenizes
                seed=0,
            )
        except Exception as e:  # vLLM's own validation (context length, memory, kernels): one line, not its traceback
            self.close()
            message = " ".join(str(e).split())
            raise EngineError(f"vLLM could not start the engine: {type(e).__name__}: {message[:600]}") from None
        held = self.model.collective_rpc("premoe_held")
        self._share_cores(cores, sum(h["threads"] for h in held))
        read = sum(h["bytes_read"] + h["loaded_bytes"] for h in held)
        self._bytes += read
        return read

    def _share_cores(self, cores: int, engine_threads: int) -> None:
        """On the CPU, where vLLM runs the model in other processes, give this process's own torch work (the
        routing forward) only the cores vLLM's threads leave, at least one. Its parallel regions would otherwise
        wait on cores vLLM's step is using: on 2 cores, routed requests ran at x0.63 plain vLLM's rate with two
        threads here and x0.88 with one (docs/results/vllm.md)."""
        from vllm import envs

        in_process = not envs.VLLM_ENABLE_V1_MULTIPROCESSING and self.options.tensor_parallel == 1
        if _cpu() and not in_process:
            torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - engine_threads)))

    # -- generation -------------------------------------------------------------------------------------
    def run_batch(self, seqs: list[Sequence], check=None, admit=None, max_batch: int | None = None) -> None:
        """Generate ``seqs`` (and what ``admit`` adds) in vLLM; see :func:`premoe.vllm.batch.run_batch`.

        vLLM runs ``max_batch`` sequences at once; up to as many again are admitted and wait in vLLM's own queue,
        so a seat freed by a finished sequence is filled at vLLM's very next step, not one step later (premoe
        admits between steps, after it has seen the step's output)."""
        from premoe.vllm.batch import run_batch

        cap = 2 * (max_batch or self.max_seqs)
        run_batch(self.model, self.tokenizer, seqs, self.eos, check=check, admit=admit, max_batch=cap, salt=self.salt)

    def complete(self, prompt: str, max_new_tokens: int = 64) -> str:
        """The greedy completion of ``prompt`` by the last loaded task's model."""
        ids = self.tokenizer(prompt)["input_ids"]
        seq = Sequence(ids, Sampling(max_new_tokens, temperature=0.0), task=self.task)
        self.run_batch([seq])
        return seq.text

    def generate(self, prompt: str, max_new_tokens: int = 64) -> Reply:
        """Route ``prompt``, switch if needed, and complete it greedily."""
        return routed_reply(self, prompt, max_new_tokens, refitted=self._refitted)

    def _refitted(self, task: str) -> bool:
        """Whether ``task`` is served with re-fitted rows from the store (the workers load the same ones)."""
        if task not in self._refits:
            from premoe.moe.patterns import plan_from_pattern
            from premoe.moe.refit_checkpoint import task_refit

            plan = plan_from_pattern(self.info, self.store.load(task), self.selection)
            self._refits[task] = task_refit(self.store, task, plan, self.refit, self.info.path) is not None
        return self._refits[task]

    def prompt_logprobs(self, prompts: list[list[int]], tasks: list[str] | None = None) -> list[list[float | None]]:
        """Each prompt token's log-probability given the ones before it (``None`` for the first), by the model of
        the prompt's task in ``tasks`` (held; default: the last loaded task), all prompts in one batch."""
        from vllm import SamplingParams

        from premoe.vllm.worker import request_id

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        engine, outs = self.model.llm_engine, {}
        tasks = tasks or [self.task] * len(prompts)
        for i, (p, task) in enumerate(zip(prompts, tasks)):
            engine.add_request(request_id(task, i), {"prompt_token_ids": p, "cache_salt": self.salt(task)}, params)
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[int(o.request_id.split(".")[2].split("-")[0])] = o
        rows = []
        for i in range(len(prompts)):
            o = outs[i]
            rows.append([None] + [d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])])
        return rows

    def held(self) -> dict[str, Any]:
        """What rank 0 holds: the task and each MoE layer's slots (original expert ids)."""
        return self.model.collective_rpc("premoe_held")[0]

    def close(self) -> None:
        if self.model is not None:
            with contextlib.suppress(Exception):  # let a background staging end before the engine goes
                self.cancel()
            engine = getattr(self.model, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.model = None
        if self._source is not None:
            self._source.close()
            self._source = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
