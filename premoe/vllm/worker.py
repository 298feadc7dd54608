"""The parts of ``--engine vllm`` that run inside vLLM's worker processes.

* The ``premoe`` load format (:func:`register`, a ``vllm.general_plugins`` entry point): vLLM's own default
  loader, fed the tensors of the first task's pruned export straight from the source checkpoint
  (:meth:`premoe.vllm.source.EngineSource.initial_weights`), so start-up is a normal vLLM load of that
  export (every weight checked by vLLM's loader), without writing the export to disk.
* :class:`ExpertSwitcher`, the ``worker_extension_cls``: ``premoe_switch(task, lane)`` stages the experts
  that differ (:func:`premoe.vllm.slots.plan_lane`) and every router row; ``premoe_commit`` /
  ``premoe_rollback`` end the switch on every rank (one rank: ``premoe_switch(..., commit=True)`` does both).
* With several tasks held (``--held-tasks`` above 1, :class:`_TaskMask`): every task of the store has a lane,
  the slots its task uses (tasks share slots that hold exactly what both need), and each MoE router's logits
  get -1e4 outside the slots of the token's own task, read from its request id (:func:`request_id`), so
  requests of every held task share vLLM's batches. A switch fills one lane and may empty others (``evict``).

How one expert is written: vLLM's own ``weight_loader`` of the layer cuts this rank's slice (tensor
parallel: the rank's share of the intermediate dimension; expert parallel: only experts local to the rank,
mapped to their local slot) into a one-expert staging buffer; then the kernel's own packing is applied to
that expert alone and copied into its slot. On the CPU the kernel prepacks experts
(``cpu_prepack_moe_weight``, per expert independent) after padding the intermediate dimension; on CUDA the
Triton kernels read the raw layout. Routers on the CPU are prepacked linear layers (oneDNN / sgl kernels);
they are rebuilt from the new rows through the layer's own ``process_weights_after_loading``.

Failure: a switch reads, slices and packs every layer's experts before writing any of them (``premoe_switch``
stages them), so a read that fails midway (unreadable shard, mismatched store) leaves the engine as it was,
serving the previous task, with nothing to copy back. No rank raises: each returns ``{"ok": ...}`` and the
driver then commits (``premoe_commit`` writes the staged routers, then the experts) or rolls back (drops the
staging) on every rank, so tensor-parallel ranks never end up holding different tasks. With one rank the
commit follows the staging in the same call; a commit that fails there restores its routers and reports.
The staging holds the switch's new experts, as many bytes as the overwritten ones an undo log would keep.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import torch

from premoe.vllm.slots import Slot, Write, plan_lane

LOAD_FORMAT = "premoe"
LOADED_BYTES: dict[str, int] = {}  # engine directory -> bytes the load format read there (this process)
_LAYER = re.compile(r"layers\.(\d+)\.")


def register() -> None:
    """Register the ``premoe`` load format with vLLM (idempotent; vLLM calls it in every process)."""
    from vllm.model_executor import model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if LOAD_FORMAT in model_loader._LOAD_FORMAT_TO_MODEL_LOADER:
        return

    class PremoeLoader(DefaultModelLoader):
        """vLLM's default loader, fed the first task's pruned tensors from the source checkpoint."""

        def download_model(self, model_config) -> None:  # nothing to download: the source is local
            pass

        def get_all_weights(self, model_config, model):
            from premoe.vllm.source import EngineSource

            self.counter_before_loading_weights = time.perf_counter()
            source = EngineSource.open(model_config.model)
            try:
                yield from source.initial_weights()
            finally:
                LOADED_BYTES[str(model_config.model)] = source.bytes_read
                source.close()

    model_loader.register_model_loader(LOAD_FORMAT)(PremoeLoader)


# -- writing one expert / one router tensor into a vLLM layer -----------------------------------------


def _staging(layer, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.nn.Parameter]:
    """A one-expert buffer and a parameter viewing it as every local expert (stride 0), for vLLM's loader."""
    buf = torch.empty(shape, dtype=dtype)  # vLLM's loader fills all of it
    view = buf.unsqueeze(0).expand(max(layer.local_num_experts, 1), *shape)
    return buf, torch.nn.Parameter(view, requires_grad=False)


def rank_slices(layer, slot: int, gate_up: torch.Tensor | None, down: torch.Tensor):
    """This rank's slice of one expert (``slot``: its id in the pruned model), cut by vLLM's own loader:
    ``(w13 [2I_rank, H] or None, w2 [H, I_rank])``, or ``None`` where the expert lives on another rank."""
    cfg = layer.moe_config
    inter, hidden = cfg.intermediate_size_per_partition, cfg.hidden_dim
    dtype = layer.w2_weight.dtype
    w13 = None
    if gate_up is not None:
        w13, param = _staging(layer, (2 * inter, hidden), dtype)
        gate, up = gate_up.chunk(2, dim=0)
        for shard, value in (("w1", gate), ("w3", up)):
            if not layer.weight_loader(param, value, "w13_weight", shard, slot, return_success=True):
                return None
    w2, param = _staging(layer, (hidden, inter), dtype)
    if not layer.weight_loader(param, down, "w2_weight", "w2", slot, return_success=True):
        return None
    return w13, w2


class _ExpertKernel:
    """How one layer's kernel stores an expert: packs a rank slice into the form its slot holds."""

    def __init__(self, layer):
        from vllm.platforms import current_platform

        self.layer = layer
        method = layer.quant_method
        backend = getattr(method, "unquantized_backend", None)
        backend = getattr(backend, "name", str(backend))
        if type(method).__name__ != "UnquantizedFusedMoEMethod" or getattr(layer, "w13_bias", None) is not None:
            raise RuntimeError(f"premoe cannot switch experts of {type(method).__name__} layers (with biases: no)")
        self.cpu = current_platform.is_cpu()
        self.experts = method.moe_kernel.fused_experts if self.cpu else None
        if self.cpu and getattr(self.experts, "_use_zentorch", False):
            self.cpu = False  # zentorch keeps the raw layout
        elif not self.cpu and backend not in ("TRITON", "BATCHED_TRITON"):
            # CUDA-only branch: other backends shuffle experts into layouts premoe does not rebuild per expert
            raise RuntimeError(f"premoe switches experts on vLLM's Triton MoE backends only, not {backend}")

    def pack(self, w13: torch.Tensor | None, w2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        if not self.cpu:
            return w13, w2
        from vllm._custom_ops import cpu_prepack_moe_weight

        inter = w2.shape[1]
        padded = self.experts._padded_intermediate_size(self.layer.moe_config)
        isa = self.experts.isa
        if w13 is not None:
            if padded != inter:  # as CPUUnquantizedExperts._pad_moe_intermediate lays it out
                new = w13.new_zeros(2 * padded, w13.shape[1])
                new[:inter], new[padded : padded + inter] = w13[:inter], w13[inter:]
                w13 = new
            w13 = cpu_prepack_moe_weight(w13.unsqueeze(0).contiguous(), isa)[0]
        if padded != inter:
            new = w2.new_zeros(w2.shape[0], padded)
            new[:, :inter] = w2
            w2 = new
        return w13, cpu_prepack_moe_weight(w2.unsqueeze(0).contiguous(), isa)[0]


def _write_router(model, key: str, value: torch.Tensor, undo: list) -> None:
    """Write router tensor ``key`` (checkpoint name = the vLLM parameter's path) and rebuild its packed form."""
    path, _, leaf = key.rpartition(".")
    module = model.get_submodule(path)
    old = getattr(module, leaf)
    method = getattr(module, "quant_method", None)
    repack = leaf == "weight" and hasattr(module, "cpu_linear") and method is not None
    if old.shape == value.shape and not repack:  # the raw tensor is what runs: copy in place
        undo.append(("copy", old, old.detach().clone()))
        old.data.copy_(value.to(old.dtype))
        return
    undo.append(("router", module, leaf, old, getattr(module, "cpu_linear", None)))
    setattr(module, leaf, torch.nn.Parameter(value.to(old.dtype).clone(), requires_grad=False))
    if repack:
        method.process_weights_after_loading(module)


def _undo(entries: list) -> None:
    for entry in reversed(entries):
        if entry[0] == "copy":
            entry[1].data.copy_(entry[2])
        else:
            _, module, leaf, old, linear = entry
            setattr(module, leaf, old)
            if linear is not None:
                module.cpu_linear = linear


def request_id(task: str | None, n: int) -> str:
    """A vLLM request id that names the request's task (hex, so any task name fits), for the router mask."""
    return f"premoe.{(task or '').encode().hex()}.{n}"


def request_task(rid: str) -> str | None:
    """The task :func:`request_id` put into ``rid`` (``None``: not a premoe request, or no task)."""
    parts = rid.split(".")
    if len(parts) < 3 or parts[0] != "premoe" or not parts[1]:
        return None
    try:
        return bytes.fromhex(parts[1]).decode()
    except ValueError:
        return None


MASK = -1e4  # added to the router logits of the slots outside a token's task: exp() and sigmoid() give exactly 0


class _TaskMask:
    """Restricts each token's router to its own task's slots when the engine holds several tasks.

    Each router module of the model gets its ``forward`` wrapped: its logits get, per token, the row of its
    lane in ``tables[layer]`` ([lanes + 1, slots]: 0 on the lane's slots, ``MASK`` elsewhere; the last row all
    0, for padding). The token -> request layout comes from the model runner (``input_batch.req_ids``,
    ``query_start_loc``), the task from the request id (:func:`request_task`), the lane from the held tasks.
    Python runs at every step, so this needs eager execution (on CUDA the server starts vLLM with
    ``enforce_eager``: a captured graph would replay the first step's mask).
    """

    def __init__(self, state: "_SwitchState", runner):
        self.state, self.runner = state, runner
        self.tables: dict[int, torch.Tensor] = {}
        self._cache: dict[tuple, torch.Tensor] = {}
        self._key: tuple | None = None
        self._lanes: torch.Tensor | None = None

    def install(self, routers: dict[int, torch.nn.Module]) -> None:
        for layer, module in routers.items():
            module.forward = self._wrap(module.forward, layer)

    def update(self) -> None:
        """Rebuild the tables from the state's lanes (after a commit)."""
        st = self.state
        self.tables, self._cache, self._key = {}, {}, None
        for layer, lanes in st.lane_slots.items():
            width = len(st.slots[layer])
            table = torch.full((len(lanes) + 1, width), MASK, dtype=torch.float32)
            table[-1] = 0
            for k, slots in enumerate(lanes):
                if slots:
                    table[k, slots] = 0
            self.tables[layer] = table

    def _token_lanes(self, tokens: int) -> torch.Tensor:
        batch = self.runner.input_batch
        n = batch.num_reqs
        ids = tuple(batch.req_ids[:n])
        starts = self.runner.query_start_loc.np[: n + 1]
        key = (ids, starts.tobytes(), tokens)
        if key != self._key:
            import numpy as np

            lanes = np.array([self.state.lane_of(rid) for rid in ids], dtype=np.int64)
            per = np.repeat(lanes, np.diff(starts).astype(np.int64))
            pad = len(self.state.lane_tasks)
            out = np.full(tokens, pad, dtype=np.int64)
            out[: min(tokens, len(per))] = per[:tokens]
            self._key, self._lanes, self._cache = key, torch.from_numpy(out), {}
        return self._lanes

    def _mask(self, layer: int, logits: torch.Tensor) -> torch.Tensor:
        lanes = self._token_lanes(logits.shape[0])
        key = (layer, logits.device, logits.dtype)
        mask = self._cache.get(key)
        if mask is None:
            table = self.tables[layer].to(device=logits.device, dtype=logits.dtype)
            mask = self._cache[key] = table.index_select(0, lanes.to(logits.device))
        return mask

    def _wrap(self, forward, layer: int):
        def masked(*args, **kwargs):
            out = forward(*args, **kwargs)
            logits = out[0] if isinstance(out, tuple) else out
            logits = logits + self._mask(layer, logits)
            return (logits, *out[1:]) if isinstance(out, tuple) else logits

        return masked


class _SwitchState:
    """One worker's view of the engine: the source, the slots of every MoE layer, each lane's task and slots, the
    staged switch."""

    def __init__(self, worker):
        from premoe.vllm.source import EngineSource

        self.model = worker.model_runner.model
        self.source = EngineSource.open(worker.vllm_config.model_config.model)
        spec = self.source.spec
        self.task = spec.task  # the last task switched to: requests that name none are served by it
        self.layers: dict[int, Any] = {}
        for name, module in self.model.named_modules():
            if hasattr(module, "w13_weight") and hasattr(module, "weight_loader"):
                found = _LAYER.search(name)
                if found:
                    self.layers[int(found.group(1))] = module
        missing = set(self.source.info.moe_layers) - set(self.layers)
        if missing:
            raise RuntimeError(f"vLLM's model has no fused MoE layer for premoe's MoE layers {sorted(missing)}")
        self.kernels = {layer: _ExpertKernel(module) for layer, module in self.layers.items()}
        src = self.source
        kept = src.start_experts()
        self.slots: dict[int, list[Slot | None]] = {}
        self.lane_slots: dict[int, list[list[int]]] = {}
        self.mask: _TaskMask | None = None
        if spec.lanes == 1:  # started as the first task's export: its slots, in its kept order
            self.lane_tasks: list[str | None] = [self.task]
            wanted = src.wanted(self.task)
            for layer in src.info.moe_layers:
                self.slots[layer] = list(wanted[layer])
                self.lane_slots[layer] = [list(range(len(self.slots[layer])))]
        else:  # started with the checkpoint's rows of engine_experts; no lane holds a task until the first switch
            self.lane_tasks = [None] * spec.lanes
            for layer in src.info.moe_layers:
                self.slots[layer] = [Slot(e) for e in kept[layer]]
                self.lane_slots[layer] = [[] for _ in range(spec.lanes)]
            self.mask = _TaskMask(self, worker.model_runner)
            self.mask.update()
            self.mask.install(self._router_modules())
        self.source.read_routers()
        self.pending: tuple | None = None
        self._staging: tuple[threading.Thread | None, dict] | None = None  # a background staging, its result

    def _router_modules(self) -> dict[int, torch.nn.Module]:
        """Each MoE layer's router module (the one holding its router weight)."""
        out = {}
        for layer, entry in self.source.info.layout.moe.items():
            for name in entry["router"]:
                key = self.source.info.layout.sources[name].key
                if key.endswith(".weight"):
                    out[layer] = self.model.get_submodule(key.rpartition(".")[0])
        missing = set(self.source.info.moe_layers) - set(out)
        if missing:
            raise RuntimeError(f"premoe found no router weight for MoE layers {sorted(missing)} in vLLM's model")
        return out

    def lane_of(self, rid: str) -> int:
        """The lane serving request ``rid`` (its task's; a request naming no task: the last task switched to).

        Raises:
            RuntimeError: the task is not held (the server never sends one; this keeps tasks from mixing).
        """
        task = request_task(rid) or self.task
        try:
            return self.lane_tasks.index(task)
        except ValueError:
            held = self.lane_tasks
            raise RuntimeError(f"premoe: request {rid} is for task {task!r}; the engine holds {held}") from None

    def _stage_layer(self, layer: int, writes: list[Write]) -> list:
        """Read, slice and pack the experts ``layer`` needs (nothing is written): ``[(local slot, w13, w2)]``."""
        module, kernel = self.layers[layer], self.kernels[layer]
        staged = []
        for w in writes:
            local = module._map_global_expert_id_to_local_expert_id(w.slot)
            if local < 0:
                continue  # another rank's expert (expert parallel)
            gate_up = self.source.gate_up(layer, w.expert) if w.full else None
            sliced = rank_slices(module, w.slot, gate_up, self.source.down(layer, w.expert, w.down))
            if sliced is not None:
                staged.append((local, *kernel.pack(*sliced)))
        return staged

    @staticmethod
    def _view(slots: list[Slot | None], lanes: list[list[int]]) -> list[Slot | None]:
        """The slots some lane uses (the others as ``None``: their router rows are zero and masked)."""
        used = {j for lane in lanes for j in lane}
        return [s if j in used else None for j, s in enumerate(slots)]

    def switch(
        self, task: str, lane: int = 0, commit: bool = False, background: bool = False, evict: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        """Stage ``task`` into lane ``lane``, the lanes ``evict`` emptied: its experts that differ, every layer read
        and packed before any is written; the engine is untouched until :meth:`commit` writes them (at once with
        ``commit``), so a failed read leaves nothing to undo. ``background``: plan now, read on a thread of this
        process while the engine keeps stepping, and return at once (``"ready"``: nothing had to be read, the
        staging is done); :meth:`finish` waits for the reads (and commits with ``commit``)."""
        if self.pending is not None or self._staging is not None:
            return {"ok": False, "error": "a switch is pending commit or rollback"}
        count = len(self.lane_tasks)
        if not all(0 <= k < count for k in (lane, *evict)):
            return {"ok": False, "error": f"lanes {[lane, *evict]} do not all exist (the engine has {count})"}
        t0, before = time.perf_counter(), self.source.bytes_read
        try:
            plan = self._plan(task, lane, tuple(evict))
        except Exception as e:  # noqa: BLE001 - nothing was written; report, let the driver roll back every rank
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "bytes_read": self.source.bytes_read - before}
        box: dict[str, Any] = {}
        if background and any(writes for _, _, writes, _ in plan.values()):
            args = (task, lane, evict, plan, t0, before, box)
            thread = threading.Thread(target=self._read, args=args, name="premoe-stage")
            thread.daemon = True
            self._staging = (thread, box)
            thread.start()
            return {"ok": True, "ready": False}
        self._read(task, lane, evict, plan, t0, before, box)
        if background:  # nothing to read: staged already; finish() returns this
            self._staging = (None, box)
            return {"ok": box["ok"], "ready": True}
        return self._commit_now(box) if commit and box["ok"] else box

    def staged(self) -> bool:
        """Whether a background staging has ended (or none runs)."""
        return self._staging is None or self._staging[0] is None or not self._staging[0].is_alive()

    def finish(self, commit: bool = False) -> dict[str, Any]:
        """Wait for the background staging and return its result, committed with ``commit`` where it succeeded."""
        if self._staging is None:
            return {"ok": False, "error": "no switch is being staged"}
        thread, box = self._staging
        if thread is not None:
            thread.join()
        self._staging = None
        result = box or {"ok": False, "error": "staging ended without a result", "bytes_read": 0}
        return self._commit_now(result) if commit and result["ok"] else result

    def _commit_now(self, result: dict[str, Any]) -> dict[str, Any]:
        try:
            self.commit()
        except Exception as e:  # noqa: BLE001 - commit restored the routers it wrote; experts untouched
            why = f"writing into the engine failed: {type(e).__name__}: {e}"
            return {"ok": False, "error": why, "bytes_read": result.get("bytes_read", 0)}
        return result

    def _plan(self, task: str, lane: int, evict: tuple[int, ...] = ()) -> dict[int, tuple]:
        """What lane ``lane`` needs for ``task`` once the lanes ``evict`` are emptied, each MoE layer: ``(new slots,
        the lane's slots, writes, lanes)`` (reads only the store's pattern)."""
        wanted, out = self.source.wanted(task), {}
        for layer in self.source.info.moe_layers:
            lanes = [[] if k in evict else list(x) for k, x in enumerate(self.lane_slots[layer])]
            new, mine, writes = plan_lane(self.slots[layer], lanes, lane, wanted[layer])
            lanes[lane] = mine
            out[layer] = (new, mine, writes, lanes)
        return out

    @torch.inference_mode()
    def _read(
        self, task: str, lane: int, evict: tuple[int, ...], plan: dict[int, tuple], t0: float, before: int, box: dict
    ) -> None:
        """Read, slice and pack what ``plan`` writes into :attr:`pending` (nothing is written); the result, as
        :meth:`switch` returns it (``before``: the source's bytes read when the switch began), goes into ``box``.
        Runs on the staging thread in the background."""
        src = self.source
        new_slots, new_lanes, staged, experts = dict(self.slots), dict(self.lane_slots), {}, 0
        try:
            for layer, (new, _mine, writes, lanes) in plan.items():
                view = self._view(new, lanes)
                if writes or view != self._view(self.slots[layer], self.lane_slots[layer]):
                    staged[layer] = (self._stage_layer(layer, writes), src.routers(layer, view))
                    experts += len(staged[layer][0])
                new_slots[layer], new_lanes[layer] = new, lanes
        except BaseException as e:  # noqa: BLE001 - nothing was written; the driver rolls back every rank
            box.update({"ok": False, "error": f"{type(e).__name__}: {e}", "bytes_read": src.bytes_read - before})
            return
        tasks = [None if k in evict else t for k, t in enumerate(self.lane_tasks)]
        tasks[lane] = task
        self.pending = (staged, new_slots, new_lanes, tasks, task)
        seconds = time.perf_counter() - t0
        box.update({"ok": True, "bytes_read": src.bytes_read - before, "experts_written": experts, "seconds": seconds})

    @torch.inference_mode()
    def commit(self) -> None:
        """Write the staged switch: first every router (re-packed by the layer's own method; a failure there
        restores the routers already written and raises, experts untouched), then the experts, plain memory
        copies into their slots, which do not fail midway; then the lanes' masks."""
        if self._staging is not None:
            raise RuntimeError("a switch is still being staged: finish it first")
        if self.pending is None:
            return
        staged, new_slots, new_lanes, tasks, task = self.pending
        self.pending, undo = None, []
        try:
            for _experts, routers in staged.values():
                for key, value in routers.items():
                    _write_router(self.model, key, value, undo)
        except BaseException:
            _undo(undo)
            raise
        for layer, (experts, _routers) in staged.items():
            module = self.layers[layer]
            for local, w13, w2 in experts:
                if w13 is not None:
                    module.w13_weight[local].copy_(w13)
                module.w2_weight[local].copy_(w2)
        self.slots, self.lane_slots, self.lane_tasks, self.task = new_slots, new_lanes, tasks, task
        if self.mask is not None:
            self.mask.update()

    def rollback(self) -> None:
        """Drop a staged switch (nothing of it was written), waiting for a background staging to end first."""
        if self._staging is not None:
            if self._staging[0] is not None:
                self._staging[0].join()
            self._staging = None
        self.pending = None


class ExpertSwitcher:
    """vLLM worker extension (``worker_extension_cls="premoe.vllm.worker.ExpertSwitcher"``): its methods
    run on every worker through ``collective_rpc``."""

    def _premoe(self) -> _SwitchState:
        state = getattr(self, "_premoe_state", None)
        if state is None:
            state = self._premoe_state = _SwitchState(self)
        return state

    def premoe_switch(
        self, task: str, lane: int = 0, commit: bool = False, background: bool = False, evict: tuple[int, ...] = ()
    ) -> dict[str, Any]:
        """Stage ``task``'s experts that differ from those lane ``lane`` holds (:meth:`premoe_commit` writes them;
        ``commit``: write them now, for an engine of one rank; ``background``: stage on a thread while the engine
        keeps stepping, :meth:`premoe_finish` ends it; ``evict``: lanes emptied by the same switch)."""
        try:
            return self._premoe().switch(task, lane, commit, background, tuple(evict))
        except Exception as e:  # noqa: BLE001 - setting up failed: nothing was written
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "bytes_read": 0}

    def premoe_staged(self) -> bool:
        """Whether the switch staged in the background (``premoe_switch(..., background=True)``) is ready."""
        return self._premoe().staged()

    def premoe_finish(self, commit: bool = False) -> dict[str, Any]:
        """Wait for the background staging; its result, as ``premoe_switch``'s (written now with ``commit``)."""
        try:
            return self._premoe().finish(commit)
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "bytes_read": 0}

    def premoe_commit(self) -> None:
        self._premoe().commit()

    def premoe_rollback(self) -> None:
        self._premoe().rollback()

    def premoe_held(self) -> dict[str, Any]:
        """The task and each MoE layer's slots (original expert ids), for tests and ``/metrics``."""
        state = self._premoe()
        return {
            "task": state.task,
            "lanes": list(state.lane_tasks),
            "slots": {layer: [s.expert if s is not None else None for s in v] for layer, v in state.slots.items()},
            "lane_experts": {
                layer: [sorted(state.slots[layer][j].expert for j in lane) for lane in lanes]
                for layer, lanes in state.lane_slots.items()
            },
            "bytes_read": state.source.bytes_read,
            "loaded_bytes": LOADED_BYTES.get(str(self.vllm_config.model_config.model), 0),
            "threads": torch.get_num_threads(),  # the model's CPU threads on this rank
        }
