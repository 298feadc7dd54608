"""``premoe serve``: an OpenAI-compatible HTTP server that routes every request to its task and holds only
that task's pattern (MoE: its experts; dense: its heads and channels).

``model: "auto"`` routes a request by its own prompt; a task name pins that task. The HTTP layer is
:mod:`premoe.server` (FastAPI on uvicorn, bound to 127.0.0.1 unless ``--host`` says otherwise); the task
server under it is the model kind's (:meth:`premoe.kinds.Kind.task_server`), which ``premoe generate`` and
``premoe chat`` use too.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from premoe.core.options import (
    EngineOptions,
    RefitOptions,
    RunOptions,
    SignatureSpec,
    add_flags,
    defaults_of,
    kwargs_of,
)
from premoe.dense.options import DenseSelection
from premoe.errors import InputError
from premoe.moe.options import MoeSelection
from premoe.server.options import ServeOptions
from premoe.verbs.common import add_model, add_selection, add_store
from premoe.verbs.route import add_route_flags

HELP = "OpenAI-compatible HTTP server; each request is served by its task's pattern"


def task_server(
    model,
    store: str | Path,
    *,
    keep: int | None = None,
    top_k: int | None = None,
    group_policy: str = "balanced",
    scorer: str | None = None,
    sparsity: float | None = None,
    method: str = "seap",
    schedule: str | None = None,
    whole_groups: bool = False,
    bias_comp: bool | None = None,
    score: str | None = None,
    layers: int | None = None,
    stat: str = "prob",
    source: str = "prompt",
    norm: str = "l1",
    metric: str = "l1",
    cache_mb: float = 0.0,
    dequantize_experts: bool = False,
    refit: bool | None = None,
    device: str | None = "cpu",
    dtype: str = "auto",
    engine: str = "auto",
    tensor_parallel: int = 1,
    expert_parallel: bool = False,
    max_model_len: int | None = None,
    kv_cache_gb: float | None = None,
    held_tasks: int = 1,
    stage_switches: str = "auto",
    max_seqs: int = 8,
    verb: str = "serve",
):
    """A task server for ``model`` and ``store``: routes prompts to stored tasks and holds one task's pattern
    (:class:`premoe.moe.server.TaskServer` or :class:`premoe.dense.server.DenseServer`; ``load(task)``,
    ``route(text)``, ``generate(prompt, max_new_tokens)``).

    Args:
        keep / top_k / group_policy / scorer: MoE: the experts held per MoE layer (``keep`` required).
        sparsity / method / ...: dense: the heads and channels held (``sparsity`` required).
        layers / stat / source / norm / metric: how prompts are routed (see :func:`premoe.route`).
        cache_mb: MoE: keep experts a switch drops, up to this many MB.
        dequantize_experts: MoE, quantised checkpoints: hold the kept experts dequantised (faster on the CPU,
            about twice the memory) instead of as stored, dequantised one at a time on use (default).
        refit: MoE: load the re-fitted rows ``premoe refit`` stored for this keep count (``None``: where the
            store has them; ``False``: the checkpoint's rows).
        engine / tensor_parallel / expert_parallel / max_model_len / kv_cache_gb / held_tasks / stage_switches: MoE:
            which engine runs the model (:class:`premoe.core.options.EngineOptions`; ``"vllm"``:
            :class:`premoe.vllm.server.VllmTaskServer`).
        max_seqs: vLLM engine: requests it runs at once (``premoe serve``: ``--max-batch``).
    """
    from premoe.kinds import check_options, kind_of, select

    if not (isinstance(cache_mb, (int, float)) and cache_mb >= 0):
        raise InputError(f"`cache_mb` must be >= 0, got {cache_mb!r}")
    backend = kind_of(model)
    run = RunOptions(device, dtype)
    selections = (
        MoeSelection(keep, top_k, group_policy, scorer),
        DenseSelection(sparsity, method, schedule, whole_groups, bias_comp, score),
    )
    signature = SignatureSpec(1, stat, source, norm, metric)
    fit = RefitOptions(refit)
    engines = EngineOptions(
        engine, tensor_parallel, expert_parallel, max_model_len, kv_cache_gb, held_tasks, stage_switches
    )
    check_options(
        backend,
        verb,
        run,
        *selections,
        signature,
        fit,
        engines,
        cache_mb=bool(cache_mb),
        dequantize_experts=dequantize_experts,
    )
    info = backend.inspect(model)
    if _use_vllm(backend, info, engines, run, cache_mb):
        from premoe.vllm.server import VllmTaskServer

        return VllmTaskServer(
            info.path,
            store,
            select(backend, *selections),
            signature=dataclasses.replace(signature, layers=layers or 1),
            refit=fit.refit,
            dtype=run.dtype,
            engine=engines,
            max_seqs=max_seqs,
        )
    return backend.task_server(
        info,
        store,
        selection=select(backend, *selections),
        layers=layers,
        signature=signature,
        refit=fit,
        cache_mb=cache_mb,
        run=run,
        dequantize_experts=dequantize_experts,
    )


def _use_vllm(backend, info, engines: EngineOptions, run: RunOptions, cache_mb: float) -> bool:
    """Whether the vLLM engine runs the model: ``engine="vllm"`` (options it does not take are refused), or
    ``"auto"`` where vLLM is installed and serves this model with these options."""
    if engines.engine == "hf" or backend.name != "moe":
        return False
    if engines.engine == "vllm":
        for name, given in (("cache_mb", bool(cache_mb)), ("device", run.device not in (None, "cpu", "auto"))):
            if given:
                raise InputError(f"`{name}` does not apply to `engine` vllm (vLLM places the experts itself)")
        return True
    from premoe.errors import UnsupportedModelError
    from premoe.vllm import available
    from premoe.vllm.source import check_engine_model

    options = "`held_tasks` and `stage_switches` need"
    if not available() or cache_mb or run.device not in (None, "cpu", "auto"):
        if engines.vllm_only:
            raise InputError(f"{options} `engine` vllm, which cannot run here: " + _why_not_vllm(cache_mb, run))
        return False
    try:
        check_engine_model(info)
    except UnsupportedModelError as e:
        if engines.vllm_only:
            raise InputError(f"{options} `engine` vllm: {e}") from None
        return False
    return True


def _why_not_vllm(cache_mb: float, run: RunOptions) -> str:
    if cache_mb:
        return "drop `cache_mb`"
    if run.device not in (None, "cpu", "auto"):
        return f"drop `device` {run.device}"
    return "install vLLM into this Python (docs/serving.md#the-vllm-engine)"


def serve(server, options: ServeOptions = ServeOptions(), announce=print) -> int:
    """Serve a :func:`task_server` over HTTP until SIGTERM/SIGINT (in-flight requests drain first); returns the
    exit status.

    Raises:
        InputError: the port is taken, or the store has no tasks.
    """
    from premoe.server.main import bind
    from premoe.server.main import serve as run_http

    bind(options.host, options.port).close()  # fail on a taken port before loading anything
    if not server.tasks:
        raise InputError(f"store {server.store.path} has no tasks; calibrate some first")
    server.load(server.tasks[0])  # build the resident model now, not on the first request
    return run_http(server, options, announce=announce)


def add_serving_flags(p, defaults) -> None:
    """What ``generate``, ``chat`` and ``serve`` share: model, store, the held pattern and the routing."""
    add_model(p)
    add_store(p)
    add_selection(p, defaults)
    add_flags(p, RefitOptions, defaults=defaults, only=("refit",), title="compensation (MoE)")
    p.add_argument(
        "--cache-mb", type=float, default=0.0, help="MoE: keep experts a switch drops, up to this many MB (default 0)"
    )
    p.add_argument(
        "--dequantize-experts",
        action="store_true",
        help="MoE, FP8/MXFP4 checkpoints: hold the kept experts dequantised (faster on a CPU, about twice the "
        "memory) instead of as stored and dequantised one at a time on use",
    )
    add_flags(p, RunOptions, defaults=defaults, only=("device", "dtype"))
    add_flags(p, EngineOptions, defaults=defaults, title="engine (MoE)")
    add_route_flags(p, defaults)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help=HELP, description=__doc__.split("\n\n")[1])
    add_serving_flags(p, defaults_of(task_server))
    add_flags(p, ServeOptions, title="server")


def run(args) -> int:
    fields = {f.name for f in dataclasses.fields(ServeOptions)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    given["api_key"] = given.get("api_key") or os.environ.get("PREMOE_API_KEY") or None
    options = ServeOptions(**given)
    from premoe.server.main import bind

    bind(options.host, options.port).close()  # a taken port fails before the model is read
    server = task_server(**kwargs_of(task_server, args, max_seqs=options.max_batch))
    return serve(server, options, announce=lambda line: print(line, flush=True))
