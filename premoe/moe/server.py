"""Serving with task-adaptive expert retrieval: route each prompt, hold only its task's experts.

:class:`TaskServer` keeps, in memory, the model's non-expert weights (read once), every router's
full weight matrix (small) and, per MoE layer, the N experts of the current task's pattern. For a
prompt it computes the signature with the backbone (no experts involved), retrieves the nearest
stored task and, if that task's pattern differs from the one held, switches: experts both patterns
keep stay where they are, experts in the cache are taken from it, and only the rest are read from
the checkpoint. Experts the new pattern drops go to an LRU cache bounded by ``cache_bytes`` (0:
dropped). Where ``premoe refit`` stored re-fitted down projections with a task's pattern for this
keep count, they are read from the store instead of the checkpoint's rows. The switched model is
bit-identical to one built fresh for the new task.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from premoe.core.config import load_tokenizer, resolve_device, resolve_dtype
from premoe.core.evaluation import generate_greedy
from premoe.core.modules import owner, set_tensor
from premoe.core.options import SignatureSpec
from premoe.core.retrieval import Retriever, RouteResult
from premoe.core.store import PatternStore
from premoe.errors import CheckpointError, InputError
from premoe.moe.arch import find_moe_layers
from premoe.moe.held import HeldExperts, install
from premoe.moe.kernels import select_kernel
from premoe.moe.model import ModelInfo, inspect_model
from premoe.moe.options import MoeSelection
from premoe.moe.patterns import plan_from_pattern
from premoe.moe.plans import PrunePlan, resolved
from premoe.moe.selective import ByteReader, Materializer, build_model, read_routers
from premoe.moe.signature import SignatureModel

log = logging.getLogger(__name__)


class ExpertCache:
    """LRU cache of experts' rows, {(layer, expert): {param: tensor}}, under a byte budget."""

    def __init__(self, budget_bytes: int = 0):
        self.budget = int(budget_bytes)
        self.bytes = 0
        self._items: OrderedDict[tuple[int, int], dict[str, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    def put(self, key: tuple[int, int], rows: dict[str, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in rows.values())
        if size > self.budget:
            return
        while self.bytes + size > self.budget:
            _, old = self._items.popitem(last=False)
            self.bytes -= sum(t.nbytes for t in old.values())
        self._items[key] = rows
        self.bytes += size

    def peek(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return self._items[key]

    def pop(self, key: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        rows = self._items.pop(key, None)
        if rows is not None:
            self.bytes -= sum(t.nbytes for t in rows.values())
        return rows


@dataclass
class SwitchStats:
    """What installing a pattern cost."""

    task: str
    bytes_read: int = 0
    experts_read: int = 0
    experts_kept: int = 0
    experts_from_cache: int = 0
    refit_bytes: int = 0  # re-fitted rows read from the pattern store
    seconds: float = 0.0  # how long serving paused for it
    staged: bool = False  # read while the engine kept serving (the vLLM engine's prepare()); seconds is the write


def install_pattern(
    model: nn.Module,
    info: ModelInfo,
    plan: PrunePlan,
    held: dict[int, list[int]],
    routers: dict[int, dict[str, torch.Tensor]],
    reader: ByteReader,
    cache: ExpertCache | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    refit=None,
    patched: dict[int, set[int]] | None = None,
    hold: bool = False,
) -> SwitchStats:
    """Make ``model`` (pruned to ``plan.keep`` experts per layer) hold ``plan``'s experts.

    ``held`` maps each MoE layer to the original ids its expert rows hold now (missing on a model
    whose experts were never loaded) and is updated in place. Rows are laid out as a fresh build
    lays them out (ascending original ids, then any zero-computation experts), so the result is
    identical to building from scratch. Experts never loaded before are created on ``device`` in
    ``dtype`` (default: CPU, the checkpoint's dtype; quantised experts: the config's dtype).
    ``routers`` holds every router tensor at full size ({layer: {in-memory name: tensor}}).
    ``refit``: the plan's re-fitted down projections (:class:`premoe.moe.refit_weights.RefitWeights`), which
    replace the checkpoint's rows of the experts they cover; ``patched`` ({layer: experts whose rows in
    memory are re-fitted ones}, updated in place) keeps those from being reused or cached as the
    checkpoint's. ``hold``: a quantised checkpoint's experts stay as stored (:mod:`premoe.moe.held`), the
    kept ones moved as stored bytes, the new ones read as stored; ``cache`` is not used then.
    """
    t0 = time.perf_counter()
    before = reader.bytes_read
    stats = SwitchStats(plan.task or "?")
    mat = Materializer(info, None, reader, dtype=dtype)
    hold = hold and info.quant.quantized
    if hold:
        cache = None
    patched = {} if patched is None else patched
    for m in find_moe_layers(model, info.spec):
        layer, new, old = m.index, plan.kept[m.index], held.get(m.index)
        mine = set(refit.experts.get(layer, ())) if refit is not None else set()
        was = patched.get(layer, set())
        if old == new and not mine and not was:
            stats.experts_kept += len(new)
            continue
        prefix = info.layout.moe[layer]["prefix"]
        old_pos = {e: i for i, e in enumerate(info.slots(old))} if old is not None else {}
        fresh: dict[str, torch.Tensor] = {}
        for path, rows in m.expert_tensors.items():
            name, cur = f"{prefix}.{path}", m.tensor(path)
            down = path.rsplit(".", 1)[-1] == "down_proj"
            per = max(rows, 1)
            ids = info.slots(new) if rows == 0 else new
            if hold:
                built = _held_switch(
                    mat,
                    name,
                    cur,
                    ids,
                    old_pos,
                    (mine if down else set()),
                    was if down else set(),
                    refit,
                    layer,
                    stats,
                    device,
                    dtype,
                )
                if built is not None:
                    fresh[path] = built
                    continue
            if isinstance(cur, HeldExperts):
                raise CheckpointError(f"{name}: held as stored before, but the new pattern's rows cannot be")
            if cur.is_meta:
                t = torch.empty(cur.shape, dtype=dtype or mat.dtype_of(name), device=device or "cpu")
            else:
                t = torch.empty_like(cur)
            for j, e in enumerate(ids):
                dst = t[j * per : (j + 1) * per]
                if down and e in mine:
                    value = refit.get(layer, e)
                    stats.refit_bytes += value.nbytes
                    dst.copy_(value.reshape(dst.shape))
                elif e in old_pos and not (down and e in was):
                    dst.copy_(cur[old_pos[e] * per : (old_pos[e] + 1) * per])
                elif (layer, e) in (cache or {}) and name in cache.peek((layer, e)):
                    dst.copy_(cache.peek((layer, e))[name])
                elif dst.device.type == "cpu" and dst.dtype == mat.dtype_of(name):
                    mat.read_expert_into(dst, name, e)
                else:  # other device or dtype: stage on the CPU, then convert
                    dst.copy_(mat.rows(name, [e]).reshape(dst.shape))
            fresh[path] = t
        for e in new:
            if e in old_pos:
                stats.experts_kept += 1
            elif cache is not None and (layer, e) in cache:
                cache.pop((layer, e))
                stats.experts_from_cache += 1
            else:
                stats.experts_read += 1
        if cache is not None and old:
            for e in set(old) - set(new):
                rows_of = {}
                for path, rows in m.expert_tensors.items():
                    if e in was and path.rsplit(".", 1)[-1] == "down_proj":
                        continue  # a re-fitted row is not the checkpoint's: read it again when needed
                    per = max(rows, 1)
                    rows_of[f"{prefix}.{path}"] = (
                        m.tensor(path)[old_pos[e] * per : (old_pos[e] + 1) * per].detach().clone()
                    )
                cache.put((layer, e), rows_of)
        for path, t in fresh.items():
            if isinstance(t, HeldExperts):
                install(*owner(m.block, path), t)
            else:
                set_tensor(m.block, path, t)
        for name, full in routers[layer].items():
            path = name.removeprefix(prefix + ".")
            dim = m.router_tensors[path]
            cur = m.tensor(path)
            value = full.index_select(dim, torch.tensor(info.slots(new))).to(device=cur.device, dtype=cur.dtype).clone()
            fitted = refit.router(layer, name) if refit is not None else None
            if fitted is not None:  # the task's re-fitted rows (read from the store)
                stats.refit_bytes += fitted.nbytes
                value.copy_(fitted)
            set_tensor(m.block, path, value)
        held[layer] = list(new)
        patched[layer] = mine & set(new)
    stats.bytes_read = reader.bytes_read - before
    stats.seconds = time.perf_counter() - t0
    return stats


def _held_switch(mat, name, cur, ids, old_pos, mine, was, refit, layer, stats, device, dtype) -> HeldExperts | None:
    """The held expert tensor ``name`` for slots ``ids``: rows kept from ``cur`` (a held tensor) as stored bytes,
    re-fitted rows (``mine``) from ``refit``, the others read as stored; ``None`` where it cannot be held."""
    from premoe.moe.held import HeldPart, held_tensor, stored_part

    if not mat.info.layout.sources[name].scales or cur.dim() != 3:
        return None

    def given(j: int, e: int):
        if e in mine:
            part = stored_part(mat.info.quant, refit.encoded(layer, e))
            stats.refit_bytes += part.value.nbytes + part.scale.nbytes
            return [part]
        if e in old_pos and e not in was and isinstance(cur, HeldExperts):
            i = old_pos[e]
            return [HeldPart(p.value[i], p.scale[i], tuple(x[i] for x in p.extras)) for p in cur.parts]
        return None

    dev = device or (cur.device if not cur.is_meta else torch.device("cpu"))
    held = held_tensor(mat, name, list(ids), tuple(cur.shape), given, device=dev)
    if held is not None and dtype is not None:
        held.dtype = dtype
    return held


def move_loaded_(model: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """Move loaded tensors to ``device`` (floating parameters to ``dtype``; held weights dequantise to it);
    unloaded experts stay put."""
    from premoe.moe.held import held_to_

    held_to_(model, device, dtype)
    for mod in model.modules():
        for n, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                t = p.to(device=device, dtype=dtype if (dtype is not None and p.is_floating_point()) else p.dtype)
                if t is not p:
                    mod._parameters[n] = nn.Parameter(t, requires_grad=False)
        for n, b in mod._buffers.items():
            if b is not None and not b.is_meta and b.device != device:
                mod._buffers[n] = b.to(device)


@dataclass
class Reply:
    """One served prompt."""

    task: str
    text: str
    route: RouteResult
    bytes_read: int
    experts_per_layer: int
    switched: bool
    seconds: dict[str, float] = field(default_factory=dict)
    refit: bool = False  # served with re-fitted rows from the pattern store

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "text": self.text,
            "distance": self.route.distance,
            "margin": self.route.margin,
            "second": self.route.second,
            "bytes_read": self.bytes_read,
            "experts_per_layer": self.experts_per_layer,
            "switched": self.switched,
            "refit": self.refit,
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
        }


def routed_reply(server, prompt: str, max_new_tokens: int, refitted=lambda task: False) -> Reply:
    """What a task server's ``generate`` answers: ``prompt`` routed, the task switched to if needed
    (``server.load``), then completed greedily (``server.complete``), with the bytes it caused to be read and
    timings. ``refitted(task)``: whether the task is served with stored re-fitted rows."""
    if max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be positive, got {max_new_tokens}")
    before = server.bytes_read
    t0 = time.perf_counter()
    route = server.route(prompt)
    t1 = time.perf_counter()
    switched = route.task != server.task
    if switched:
        server.load(route.task)
    t2 = time.perf_counter()
    text = server.complete(prompt, max_new_tokens)
    seconds = {"route": t1 - t0, "load": t2 - t1, "generate": time.perf_counter() - t2}
    return Reply(
        route.task, text, route, server.bytes_read - before, server.keep, switched, seconds, refitted(route.task)
    )


class TaskServer:
    """Routes prompts to stored task patterns and serves them with only those experts in memory.

    Args:
        model: source model directory (safetensors; never fully loaded).
        store: pattern store calibrated on that model.
        selection: the experts held per MoE layer (``keep``; an int: that many), and optionally a lower
            ``top_k``, the ``group_policy`` of group-limited routers (see :mod:`premoe.moe.plans`) and the
            ``scorer`` that ranks experts instead of each task's own.
        signature: how prompts are matched to tasks.
        cache_bytes: budget for experts dropped by a switch, kept for later switches (0: none).
        device: where to run (default: CPU; "auto": the accelerator if there is one).
        dtype: compute dtype (default: the checkpoint's).
        refit: use the re-fitted down projections ``premoe refit`` stored with each task's pattern for
            this keep count: ``None`` (default) where the store has them, ``True`` always (a task
            without them is an error), ``False`` never (the checkpoint's rows, the paper's TAER).
        hold: keep a quantised checkpoint's experts as stored (FP8, MXFP4), dequantised one expert at a time
            on use (:mod:`premoe.moe.held`; the expert cache is not used then); ``False``: dequantised whole.
    """

    def __init__(
        self,
        model: str | Path,
        store: str | Path,
        selection: MoeSelection | int,
        *,
        signature: SignatureSpec | None = None,
        cache_bytes: int = 0,
        device: str | None = "cpu",
        dtype: str | torch.dtype | None = None,
        refit: bool | None = None,
        hold: bool = True,
    ):
        if cache_bytes < 0:
            raise InputError(f"`cache_bytes` must be >= 0, got {cache_bytes}")
        self.info = inspect_model(model)
        self.refit = refit
        self.store = PatternStore.open(store)
        self.store.check_model(self.info.fingerprint)
        self.spec = signature or SignatureSpec()
        self.retriever = Retriever.from_store(self.store, self.spec)
        self.selection = resolved(selection, self.info.router)  # an impossible selection fails before any load
        self.keep = self.selection.keep
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype) if dtype not in (None, "auto") else None
        self.tokenizer = load_tokenizer(self.info.path)
        self.reader = ByteReader()
        self.cache = ExpertCache(cache_bytes)
        self.task: str | None = None
        self.held: dict[int, list[int]] = {}
        self.model: nn.Module | None = None
        self._signature: SignatureModel | None = None
        self._plans: dict[str, PrunePlan] = {}
        self._refits: dict[str, Any] = {}
        self.patched: dict[int, set[int]] = {}
        self.refit_bytes = 0
        self.hold = hold and self.info.quant.quantized
        if self.hold:
            from premoe.core.memory import release_freed_blocks

            release_freed_blocks()  # weights dequantised per call: their temporaries go back at once
        if self.hold and cache_bytes:
            log.warning("the expert cache is not used: a quantised checkpoint's experts are held as stored")

    def plan_for(self, task: str) -> PrunePlan:
        if task not in self._plans:
            pattern = self.store.load(task)
            self._plans[task] = plan_from_pattern(self.info, pattern, self.selection)
        return self._plans[task]

    def refit_for(self, task: str):
        """The re-fitted rows stored with ``task``'s pattern for this keep count, or ``None``
        (see ``refit``)."""
        if task not in self._refits:
            from premoe.moe.refit_checkpoint import task_refit

            found = task_refit(self.store, task, self.plan_for(task), self.refit, self.info.path)
            self._refits[task] = found
        return self._refits[task]

    def _ensure_backbone(self) -> None:
        """Read the non-expert weights and the full routers (once); experts stay unloaded."""
        if self.model is not None:
            return
        first = self.plan_for(self.retriever.names[0])  # any pattern: only its shapes are used here
        self.routers = read_routers(self.info, self.reader)
        self.model = build_model(
            self.info, first, self.reader, routers=self.routers, defer_experts=True, hold=self.hold
        )  # held: the quantised attention and dense weights stay as stored too
        move_loaded_(self.model, self.device, self.dtype)
        select_kernel(self.model)
        full = {
            layer: {
                n: t.to(self.device, self.dtype or t.dtype) if t.is_floating_point() else t.to(self.device)
                for n, t in tensors.items()
            }
            for layer, tensors in self.routers.items()
            if layer in self.info.moe_layers[: self.spec.layers]
        }
        self._signature = SignatureModel(self.model, self.info, self.tokenizer, self.spec.layers, routers=full)

    @property
    def tasks(self) -> list[str]:
        """The stored tasks prompts are routed to."""
        return list(self.retriever.names)

    @property
    def bytes_read(self) -> int:
        """Bytes read so far: the checkpoint's (backbone, routers and experts) and re-fitted rows from the store."""
        return self.reader.bytes_read + self.refit_bytes

    def route(self, text: str) -> RouteResult:
        """The stored task nearest to ``text`` (computes only the signature layers, no experts)."""
        self._ensure_backbone()
        return self.retriever.route(self._signature.signature(text))

    def route_many(self, texts: list[str]) -> list:
        """:meth:`route` of each text in batched forwards; an InputError in place of a text that cannot be routed."""
        self._ensure_backbone()
        return self.retriever.route_many(self._signature.signatures(texts))

    def load(self, task: str) -> SwitchStats:
        """Hold ``task``'s experts (reading only those not already in memory or in the cache)."""
        if task not in self.retriever.names:
            raise InputError(f"unknown task {task!r}; the store has {', '.join(self.retriever.names)}")
        self._ensure_backbone()
        stats = install_pattern(
            self.model,
            self.info,
            self.plan_for(task),
            self.held,
            self.routers,
            self.reader,
            self.cache,
            device=self.device,
            dtype=self.dtype,
            refit=self.refit_for(task),
            patched=self.patched,
            hold=self.hold,
        )
        if self.hold:
            select_kernel(self.model)  # held experts are dequantised one at a time: the kernel that asks so
        self.refit_bytes += stats.refit_bytes
        self.task = task
        return stats

    def complete(self, prompt: str, max_new_tokens: int = 64) -> str:
        """The greedy completion of ``prompt`` by the held task's model."""
        return generate_greedy(self.model, self.tokenizer, [prompt], max_new_tokens)[0]

    def generate(self, prompt: str, max_new_tokens: int = 64) -> Reply:
        """Route ``prompt``, switch patterns if needed, and complete it greedily."""
        return routed_reply(self, prompt, max_new_tokens, refitted=lambda task: self._refits.get(task) is not None)

    def close(self) -> None:
        self.reader.close()
