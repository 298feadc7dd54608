"""The parts of ``--engine vllm`` that run inside vLLM's worker processes.

* The ``premoe`` load format (:func:`register`, a ``vllm.general_plugins`` entry point): vLLM's own default
  loader, fed the tensors of the first task's pruned export straight from the source checkpoint
  (:meth:`premoe.vllm.source.EngineSource.initial_weights`), so start-up is a normal vLLM load of that
  export (every weight checked by vLLM's loader), without writing the export to disk.
* :class:`ExpertSwitcher`, the ``worker_extension_cls``: ``premoe_switch(task)`` writes the experts that
  differ (:func:`premoe.vllm.slots.plan_switch`) and every router row into the running model, in place;
  ``premoe_commit`` / ``premoe_rollback`` end the switch on every rank.

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
staging) on every rank, so tensor-parallel ranks never end up holding different tasks. The staging holds the
switch's new experts, as many bytes as the overwritten ones an undo log would keep.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch

from premoe.vllm.slots import Slot, Write, fresh_slots, plan_switch

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


class _SwitchState:
    """One worker's view of the engine: the source, the slots of every MoE layer, the staged switch."""

    def __init__(self, worker):
        from premoe.vllm.source import EngineSource

        self.model = worker.model_runner.model
        self.source = EngineSource.open(worker.vllm_config.model_config.model)
        self.task = self.source.spec.task
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
        plan = self.source.plan(self.task)
        self.slots = {
            layer: fresh_slots(plan.kept[layer], self.source.refitted(self.task, layer), self.task)
            for layer in self.source.info.moe_layers
        }
        self.source.read_routers()
        self.pending: tuple[list, dict, str] | None = None

    def _stage_layer(self, layer: int, writes: list[Write], new: list[Slot], task: str) -> tuple[list, dict]:
        """Read, slice and pack what ``layer`` needs (nothing is written): ``([(local slot, w13, w2)], router
        tensors)``."""
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
        return staged, self.source.routers(layer, new, task)

    @torch.inference_mode()
    def switch(self, task: str) -> dict[str, Any]:
        """Stage ``task``'s experts that differ, every layer read and packed before any is written; the engine
        is untouched until :meth:`commit` writes them, so a failed read leaves nothing to undo."""
        if self.pending is not None:
            return {"ok": False, "error": "a switch is pending commit or rollback"}
        t0, before = time.perf_counter(), self.source.bytes_read
        new_slots, staged, experts = dict(self.slots), {}, 0
        try:
            plan = self.source.plan(task)
            for layer in self.source.info.moe_layers:
                new, writes = plan_switch(self.slots[layer], plan.kept[layer], self.source.refitted(task, layer), task)
                if writes or task != self.task:
                    staged[layer] = self._stage_layer(layer, writes, new, task)
                    experts += len(staged[layer][0])
                new_slots[layer] = new
        except Exception as e:  # noqa: BLE001 - nothing was written; report, let the driver roll back every rank
            return {"ok": False, "error": f"{type(e).__name__}: {e}", "bytes_read": self.source.bytes_read - before}
        self.pending = (staged, new_slots, task)
        return {
            "ok": True,
            "bytes_read": self.source.bytes_read - before,
            "experts_written": experts,
            "seconds": time.perf_counter() - t0,
        }

    @torch.inference_mode()
    def commit(self) -> None:
        """Write the staged switch: first every router (re-packed by the layer's own method; a failure there
        restores the routers already written and raises, experts untouched), then the experts, plain memory
        copies into their slots, which do not fail midway."""
        if self.pending is None:
            return
        staged, new_slots, task = self.pending
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
        self.slots, self.task = new_slots, task

    def rollback(self) -> None:
        """Drop a staged switch (nothing of it was written)."""
        self.pending = None


class ExpertSwitcher:
    """vLLM worker extension (``worker_extension_cls="premoe.vllm.worker.ExpertSwitcher"``): its methods
    run on every worker through ``collective_rpc``."""

    def _premoe(self) -> _SwitchState:
        state = getattr(self, "_premoe_state", None)
        if state is None:
            state = self._premoe_state = _SwitchState(self)
        return state

    def premoe_switch(self, task: str) -> dict[str, Any]:
        """Write ``task``'s experts that differ from the held ones (kept for :meth:`premoe_rollback`)."""
        try:
            return self._premoe().switch(task)
        except Exception as e:  # noqa: BLE001 - setting up failed: nothing was written
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
            "slots": {layer: [s.expert for s in v] for layer, v in state.slots.items()},
            "bytes_read": state.source.bytes_read,
            "loaded_bytes": LOADED_BYTES.get(str(self.vllm_config.model_config.model), 0),
        }
