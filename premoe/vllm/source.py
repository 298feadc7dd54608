"""What the vLLM engine reads: the source checkpoint and the pattern store, for one engine directory.

An engine directory is what vLLM is started on under ``--engine vllm``: the config of the pruned model
(N experts per MoE layer, as ``premoe prune`` writes it), the tokenizer files, and ``premoe_engine.json``
naming the source checkpoint, the store, the held selection and the first task. No weights: vLLM's
``premoe`` load format (:mod:`premoe.vllm.worker`) reads them from the source, the first task's experts
only, exactly the tensors a ``premoe prune`` export of that task would hold. Every worker process opens
the same directory, so every rank computes the same plans. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from premoe.core.checkpoint import ByteReader
from premoe.core.outdir import copy_side_files
from premoe.core.store import PatternStore
from premoe.errors import InputError, UnsupportedModelError
from premoe.moe.model import ModelInfo, inspect_model
from premoe.moe.options import MoeSelection
from premoe.moe.patterns import plan_from_pattern
from premoe.moe.plans import PrunePlan
from premoe.moe.selective import Materializer
from premoe.vllm.slots import Slot

ENGINE_FILE = "premoe_engine.json"


@dataclass(frozen=True)
class EngineSpec:
    """What ``premoe_engine.json`` records."""

    source: str
    store: str
    task: str  # loaded at start-up
    selection: dict[str, Any]
    refit: bool | None = None
    lanes: int = 1  # lanes of the router mask: 1 (one task held), else one per task of the store
    budget: int = 1  # --held-tasks: the engine holds budget x N expert slots per MoE layer

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def check_engine_model(info: ModelInfo) -> None:
    """Refuse, in one line, checkpoints whose experts the vLLM engine cannot switch per expert.

    Raises:
        UnsupportedModelError: quantised experts, zero-computation experts, or an in-memory expert layout
            other than fused ``gate_up_proj`` [E, 2I, H] (gate first) and ``down_proj`` [E, H, I] without biases.
    """
    if info.quant.quantized:
        raise UnsupportedModelError(
            f"--engine vllm serves bf16/fp16/fp32 checkpoints; {info.path} is quantised ({info.quant.label}): "
            "serve it with --engine hf"
        )
    if info.router.width != info.num_experts:
        raise UnsupportedModelError(
            f"--engine vllm does not serve routers with zero-computation experts ({info.spec.name}); use --engine hf"
        )
    for layer, entry in info.layout.moe.items():
        names = sorted(n.rsplit(".", 1)[-1] for n in entry["experts"])
        if names != ["down_proj", "gate_up_proj"] or entry.get("bias") or info.spec.packed_transposed:
            raise UnsupportedModelError(
                f"--engine vllm switches experts stored as gate_up_proj/down_proj without biases; {info.spec.name} "
                f"layer {layer} has {names}{' with biases' if entry.get('bias') else ''}: use --engine hf"
            )


def check_lanes(info: ModelInfo, lanes: int) -> None:
    """Refuse, in one line, holding several tasks on a router that a per-token mask cannot restrict exactly.

    With several tasks held, every token's router logits get -1e4 on the slots outside its own task. That
    is exact where the experts are chosen from a softmax (or a sigmoid) of the logits alone: the masked slots
    get a weight of exactly 0 and are never chosen. Group-limited routing (the groups would change), score
    corrections added after the nonlinearity (a masked slot could still be chosen) and sparsemixer are refused.

    Raises:
        InputError: ``lanes`` below 1. UnsupportedModelError: the router is one of those above.
    """
    if not isinstance(lanes, int) or lanes < 1:
        raise InputError(f"`held_tasks` must be a whole number of at least 1, got {lanes!r}")
    r = info.router
    if lanes == 1:
        return
    why = None
    leaves = {n.rsplit(".", 1)[-1] for e in info.layout.moe.values() for n in e["router"]}
    if r.weights == "sparsemixer" or r.jitter:
        why = f"it routes by {r.kind}"
    elif r.n_group > 1 or r.group_limited:
        why = "its routing is group-limited"
    elif leaves - {"weight", "bias"}:
        why = f"its router adds {', '.join(sorted(leaves - {'weight', 'bias'}))} to the scores"
    if why is not None:
        raise UnsupportedModelError(
            f"--held-tasks {lanes} needs a router a per-token mask restricts exactly; {info.spec.name}'s does not "
            f"({why}): use --held-tasks 1"
        )


def engine_experts(num_experts: int, first: PrunePlan, others: list[PrunePlan], budget: int) -> dict[int, list[int]]:
    """The ``budget`` x N experts an engine starts with, per MoE layer (ascending ids): the first task's N kept
    experts, then the experts the ``others`` (the store's other tasks) keep most often (ties: the lower id), so
    later switches find many of theirs already in place."""
    out = {}
    for layer, kept in first.kept.items():
        counts: dict[int, int] = {}
        for other in others:
            for e in other.kept[layer]:
                counts[e] = counts.get(e, 0) + 1
        mine = set(kept)
        rest = sorted((e for e in range(num_experts) if e not in mine), key=lambda e: (-counts.get(e, 0), e))
        out[layer] = sorted([*kept, *rest[: (budget - 1) * len(kept)]])
    return out


def write_engine_dir(info: ModelInfo, plan: PrunePlan, spec: EngineSpec, parent: str | Path | None = None) -> Path:
    """A new engine directory for ``plan``'s geometry (config, tokenizer files, ``premoe_engine.json``)."""
    from premoe.moe.export import pruned_config

    dropped = any(role.kind == "beyond" for role in info.roles.values())  # as plan_tensors drops them
    path = Path(tempfile.mkdtemp(prefix="premoe-vllm-", dir=parent))
    (path / "config.json").write_text(json.dumps(pruned_config(info, plan, dropped), indent=2) + "\n")
    copy_side_files(info.path, path)
    tmp = path / (ENGINE_FILE + ".tmp")
    tmp.write_text(spec.to_json())
    os.replace(tmp, path / ENGINE_FILE)
    return path


class EngineSource:
    """The source checkpoint and store behind an engine directory, read through one :class:`ByteReader`."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec
        self.info = inspect_model(spec.source)
        check_engine_model(self.info)
        self.store = PatternStore.open(spec.store)
        self.store.check_model(self.info.fingerprint)
        self.selection = MoeSelection(**spec.selection)
        self.reader = ByteReader()
        self.mat = Materializer(self.info, None, self.reader)
        self.refit_bytes = 0
        self._plans: dict[str, PrunePlan] = {}
        self._refits: dict[str, Any] = {}
        self._routers: dict[int, dict[str, torch.Tensor]] | None = None
        self._names = {}
        for layer, entry in self.info.layout.moe.items():
            by_leaf = {n.rsplit(".", 1)[-1]: n for n in entry["experts"]}
            self._names[layer] = (by_leaf["gate_up_proj"], by_leaf["down_proj"])

    @classmethod
    def open(cls, directory: str | Path) -> "EngineSource":
        path = Path(directory) / ENGINE_FILE
        try:
            spec = EngineSpec(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise InputError(f"{directory} is not a premoe engine directory ({path}: {e})") from None
        return cls(spec)

    @property
    def bytes_read(self) -> int:
        """Bytes read so far: the checkpoint's and re-fitted rows from the store."""
        return self.reader.bytes_read + self.refit_bytes

    def plan(self, task: str) -> PrunePlan:
        if task not in self._plans:
            self._plans[task] = plan_from_pattern(self.info, self.store.load(task), self.selection)
        return self._plans[task]

    def refit(self, task: str):
        """``task``'s stored re-fitted rows for this keep count (:class:`RefitWeights`), or ``None``."""
        if task not in self._refits:
            from premoe.moe.refit_checkpoint import task_refit

            found = task_refit(self.store, task, self.plan(task), self.spec.refit, self.info.path)
            self._refits[task] = found
        return self._refits[task]

    def refitted(self, task: str, layer: int) -> set[int]:
        """The experts of ``layer`` whose down projection ``task``'s re-fit replaces."""
        fit = self.refit(task)
        return set(fit.experts.get(layer, ())) if fit is not None else set()

    # -- expert and router tensors, in the checkpoint's dtype, transformers' in-memory layout ----------
    def gate_up(self, layer: int, expert: int) -> torch.Tensor:
        """Expert ``expert``'s gate and up projections, [2I, H] (gate rows first)."""
        return self.mat.rows(self._names[layer][0], [expert])[0]

    def down(self, layer: int, expert: int, task: str | None) -> torch.Tensor:
        """Expert ``expert``'s down projection, [H, I]: ``task``'s re-fitted row, or the checkpoint's (``None``)."""
        if task is not None:
            value = self.refit(task).get(layer, expert)
            self.refit_bytes += value.nbytes
            return value
        return self.mat.rows(self._names[layer][1], [expert])[0]

    def read_routers(self) -> None:
        """Read every router tensor at full size (once; small): a switch then reads no router bytes."""
        if self._routers is None:
            from premoe.moe.selective import read_routers

            self._routers = read_routers(self.info, self.reader)

    def router_refitted(self, task: str, layer: int) -> bool:
        """Whether ``task``'s re-fit replaces router rows of ``layer``."""
        fit = self.refit(task)
        return fit is not None and bool(fit.routers.get(layer))

    def routers(self, layer: int, slots: list[Slot | None]) -> dict[str, torch.Tensor]:
        """Every router tensor of ``layer`` with one row per slot, by checkpoint key: the checkpoint's row of the
        slot's expert, or the re-fitted row of the task named by ``Slot.router``; zeros for ``None`` (a slot no
        lane uses, masked)."""
        self.read_routers()
        ids = torch.tensor([s.expert if s is not None else 0 for s in slots])
        unused = [j for j, s in enumerate(slots) if s is None]
        fitted_by = {s.router for s in slots if s is not None and s.router is not None}
        out = {}
        for name, full in self._routers[layer].items():
            dim = self.info.layout.moe[layer]["router"][name]
            value = full.index_select(dim, ids)
            for task in sorted(fitted_by):
                fitted = self.refit(task).router(layer, name)
                if fitted is None:
                    continue
                self.refit_bytes += fitted.nbytes  # stored for the kept experts in ascending order
                row = {e: i for i, e in enumerate(sorted(self.plan(task).kept[layer]))}
                mine = [j for j, s in enumerate(slots) if s is not None and s.router == task]
                rows = torch.tensor([row[slots[j].expert] for j in mine])
                value.index_copy_(dim, torch.tensor(mine), fitted.index_select(dim, rows).to(value.dtype))
            if unused:
                value.index_fill_(dim, torch.tensor(unused), 0)
            out[self.info.layout.sources[name].key] = value.contiguous()
        return out

    def wanted(self, task: str) -> dict[int, list[Slot]]:
        """What ``task``'s slots must hold, per MoE layer (:func:`premoe.vllm.slots.want_slots`; reads no expert)."""
        from premoe.vllm.slots import want_slots

        kept = self.plan(task).kept
        return {
            layer: want_slots(kept[layer], self.refitted(task, layer), task, self.router_refitted(task, layer))
            for layer in self.info.moe_layers
        }

    def start_experts(self) -> dict[int, list[int]]:
        """The experts vLLM starts with, per MoE layer: the first task's kept experts (one lane), or
        :func:`engine_experts` (several)."""
        plan = self.plan(self.spec.task)
        if self.spec.lanes == 1:
            return plan.kept
        others = [self.plan(t) for t in self.store.tasks if t != self.spec.task]
        return engine_experts(self.info.num_experts, plan, others, self.spec.budget)

    def initial_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors vLLM starts with, in checkpoint names and layout, read one at a time. One lane: exactly
        ``premoe prune``'s export of the first task (re-fitted rows where the store has them). More: the
        checkpoint's rows of :func:`engine_experts` (the first task's experts and likely ones of the others);
        the worker then switches the first lane to the first task (its re-fitted rows) before serving."""
        import dataclasses

        from premoe.moe.export import plan_tensors

        plan, fit = self.plan(self.spec.task), self.refit(self.spec.task)
        if self.spec.lanes > 1:
            plan, fit = dataclasses.replace(plan, kept=self.start_experts()), None
        tensors, _ = plan_tensors(self.info, plan, fit)
        for t in tensors:
            yield t.name, (t.make() if t.make is not None else self.reader.tensor(t.dtype, t.shape, t.pieces))

    def close(self) -> None:
        self.reader.close()
