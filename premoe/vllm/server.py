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

import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

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
from premoe.vllm.source import EngineSpec, check_engine_model, write_engine_dir

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
        self.signature = signature or SignatureSpec()
        self.router = QueryRouter(self.info, self.store, self.signature)
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
        self.task: str | None = None
        self.directory: Path | None = None
        self._bytes = self.router.bytes_read
        self.switch_log: list[SwitchStats] = []
        self._refits: dict[str, bool] = {}

    # -- the TaskBackend interface ----------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return list(self.router.retriever.names)

    @property
    def bytes_read(self) -> int:
        """Bytes read so far by premoe's router and by every vLLM rank (checkpoint and stored re-fitted rows)."""
        return self._bytes

    def route(self, text: str):
        return self.router.route(text)

    def route_many(self, texts: list[str]) -> list:
        return self.router.route_many(texts)

    def load(self, task: str) -> SwitchStats:
        """Hold ``task``'s experts: start vLLM on it the first time, then switch in place.

        Raises:
            InputError: an unknown task. SwitchError: a rank failed; the previous task is still held.
        """
        if task not in self.tasks:
            raise InputError(f"unknown task {task!r}; the store has {', '.join(self.tasks)}")
        t0 = time.perf_counter()
        if self.model is None:
            read = self._start(task)
            stats = SwitchStats(task, bytes_read=read, experts_read=self.keep * len(self.info.moe_layers))
        elif task == self.task:
            return SwitchStats(task, experts_kept=self.keep * len(self.info.moe_layers))
        else:
            results = self.model.collective_rpc("premoe_switch", args=(task,))
            read = sum(r.get("bytes_read", 0) for r in results)
            self._bytes += read
            failed = [r["error"] for r in results if not r.get("ok")]
            if failed:
                self.model.collective_rpc("premoe_rollback")
                raise SwitchError(f"switching to task {task!r} failed, still serving {self.task!r}: {failed[0]}")
            try:
                self.model.collective_rpc("premoe_commit")
            except Exception as e:  # a router's re-packing failed: each rank restored its routers
                why = f"{type(e).__name__}: {e}"
                raise SwitchError(
                    f"writing task {task!r} into the engine failed, still serving {self.task!r}: {why}"
                ) from None
            self.model.reset_prefix_cache()  # cached KV blocks were computed with the other task's experts
            counts = [r.get("experts_written", 0) for r in results]
            written = sum(counts) if self.options.expert_parallel else max(counts)  # EP: each rank its own experts
            stats = SwitchStats(task, bytes_read=read, experts_read=written)
            stats.experts_kept = self.keep * len(self.info.moe_layers) - written
        self.task = task
        stats.seconds = time.perf_counter() - t0
        self.switch_log.append(stats)
        return stats

    def _start(self, task: str) -> int:
        from vllm import LLM

        from premoe.moe.patterns import plan_from_pattern
        from premoe.vllm.worker import LOAD_FORMAT, register

        plan = plan_from_pattern(self.info, self.store.load(task), self.selection)
        spec = EngineSpec(str(self.info.path), str(self.store.path), task, asdict(self.selection), self.refit)
        self.directory = write_engine_dir(self.info, plan, spec)
        register()
        opts = self.options
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
                enforce_eager=_cpu(),  # CPU: vLLM's compile pass costs minutes and gains little here
                skip_tokenizer_init=True,  # premoe tokenizes and detokenizes
                seed=0,
            )
        except Exception as e:  # vLLM's own validation (context length, memory, kernels): one line, not its traceback
            self.close()
            message = " ".join(str(e).split())
            raise EngineError(f"vLLM could not start the engine: {type(e).__name__}: {message[:600]}") from None
        held = self.model.collective_rpc("premoe_held")
        read = sum(h["bytes_read"] + h["loaded_bytes"] for h in held)
        self._bytes += read
        return read

    # -- generation -------------------------------------------------------------------------------------
    def run_batch(self, seqs: list[Sequence], check=None, admit=None, max_batch: int | None = None) -> None:
        """Generate ``seqs`` (and what ``admit`` adds) in vLLM; see :func:`premoe.vllm.batch.run_batch`."""
        from premoe.vllm.batch import run_batch

        run_batch(self.model, self.tokenizer, seqs, self.eos, check=check, admit=admit, max_batch=max_batch)

    def complete(self, prompt: str, max_new_tokens: int = 64) -> str:
        """The greedy completion of ``prompt`` by the held task's model."""
        seq = Sequence(self.tokenizer(prompt)["input_ids"], Sampling(max_new_tokens, temperature=0.0))
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

    def prompt_logprobs(self, prompts: list[list[int]]) -> list[list[float | None]]:
        """Each prompt token's log-probability given the ones before it (``None`` for the first)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        outs = self.model.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[None] + [d[t].logprob for t, d in zip(o.prompt_token_ids[1:], o.prompt_logprobs[1:])] for o in outs]

    def held(self) -> dict[str, Any]:
        """What rank 0 holds: the task and each MoE layer's slots (original expert ids)."""
        return self.model.collective_rpc("premoe_held")[0]

    def close(self) -> None:
        if self.model is not None:
            engine = getattr(self.model, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.model = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
