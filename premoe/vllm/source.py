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
from premoe.vllm.slots import Slot, slot_rows

ENGINE_FILE = "premoe_engine.json"


@dataclass(frozen=True)
class EngineSpec:
    """What ``premoe_engine.json`` records."""

    source: str
    store: str
    task: str  # loaded at start-up
    selection: dict[str, Any]
    refit: bool | None = None

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

    def routers(self, layer: int, slots: list[Slot], task: str) -> dict[str, torch.Tensor]:
        """Every router tensor of ``layer`` with its rows in slot order, by checkpoint key (``task``'s re-fitted
        router rows where its re-fit holds them)."""
        self.read_routers()
        fit = self.refit(task)
        order = torch.tensor([s.expert for s in slots])
        out = {}
        for name, full in self._routers[layer].items():
            dim = self.info.layout.moe[layer]["router"][name]
            fitted = fit.router(layer, name) if fit is not None else None
            if fitted is not None:  # stored for the kept experts in ascending order
                self.refit_bytes += fitted.nbytes
                value = fitted.index_select(dim, torch.tensor(slot_rows(slots, self.plan(task).kept[layer])))
            else:
                value = full.index_select(dim, order)
            out[self.info.layout.sources[name].key] = value.contiguous()
        return out

    def initial_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of ``premoe prune``'s export of the first task (checkpoint names and layout; re-fitted
        rows where the store has them), read one at a time."""
        from premoe.moe.export import plan_tensors

        plan = self.plan(self.spec.task)
        tensors, _ = plan_tensors(self.info, plan, self.refit(self.spec.task))
        for t in tensors:
            yield t.name, (t.make() if t.make is not None else self.reader.tensor(t.dtype, t.shape, t.pieces))

    def close(self) -> None:
        self.reader.close()
