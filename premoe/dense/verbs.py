"""The verbs on dense models: plan, prune, eval, route, generate (``premoe.api`` dispatches here when
the model is a dense decoder, so users call the same commands for both kinds of model)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from premoe.core.checkpoint import ByteReader
from premoe.core.store import PatternStore
from premoe.dense.model import DenseInfo, DensePlan, build_dense, inspect_dense, reader_getter
from premoe.dense.plans import METHODS, compensation, make_dense_plan
from premoe.dense.scoring import pooled
from premoe.dense.switch import MIN_RUN_BYTES, switch_dense
from premoe.errors import InputError, StoreError, UnsupportedModelError

log = logging.getLogger(__name__)


def check_dense_store(store: str | Path | PatternStore, info: DenseInfo) -> PatternStore:
    st = store if isinstance(store, PatternStore) else PatternStore.open(store)
    st.check_model(info.fingerprint)
    return st


def stats_for(st: PatternStore, method: str, task: str | None, agnostic: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The statistics a method calibrates on: the task's own (SEAP), or every task pooled (the rest)."""
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    task_source = METHODS[method].source == "task" and not agnostic
    if task_source:
        if not task:
            raise InputError(f"--method {method} needs --task (or --agnostic for the pooled statistics)")
        return st.load(task).means, task
    names = sorted(st.tasks)
    if not names:
        raise StoreError(f"store {st.path} has no tasks; calibrate some first")
    return pooled([st.load(n).means for n in names]), "all-tasks (pooled)"


def weights_from_checkpoint(info: DenseInfo, reader: ByteReader):
    get = reader_getter(info, reader)
    return lambda layer, site: get(info.key(layer, site), None, None)


def refit_sources(st: PatternStore, method: str, task: str | None, agnostic: bool,
                  refit_data: list[str | Path] | None) -> tuple[list[list[str]], str]:
    """The texts ``--refit`` fits on (:func:`premoe.core.data.refit_sources`): ``refit_data``, else the
    calibration data the store recorded for the plan's statistics (the task's own for SEAP; every
    task's for the pooled methods)."""
    from premoe.core.data import refit_sources as recorded

    own = METHODS[method].source == "task" and not agnostic
    return recorded(st.tasks, [task] if own else sorted(st.tasks), refit_data)


def dense_plan(info: DenseInfo, store, task: str | None, sparsity: float, *, method: str = "seap", agnostic: bool = False,
               schedule: str | None = None, metric: str | None = None, whole_groups: bool = False,
               bias_comp: bool | None = None, seed: int = 0, reader: ByteReader | None = None,
               written: bool = True, refit: bool | None = False, refit_data: list[str | Path] | None = None,
               progress: bool = True) -> DensePlan:
    """The plan of ``task`` (or of all tasks pooled) at ``sparsity``, counted as ``premoe prune`` writes
    it (``written``; a task server, which holds the plan itself unpadded, counts it in memory). With
    ``refit`` the kept ``o_proj``/``down_proj`` columns and biases are re-fitted by least squares
    (:mod:`premoe.dense.refit`) on ``refit_data`` or on the calibration data the store recorded;
    ``None`` (what ``premoe prune``/``eval`` default to): re-fit when that data is still there
    unchanged (or ``refit_data`` is given), else warn and keep the plain slice."""
    st = check_dense_store(store, info)
    if method == "seap" and agnostic:
        method = "seap-gen"
    stats, name = stats_for(st, method, task, agnostic)
    if refit_data and refit is False:
        raise InputError("--refit-data cannot go with --no-refit")
    sources, about, skipped = [], "", None
    auto = refit is None and not refit_data
    if auto:  # auto: re-fit when the recorded calibration data is still there
        try:
            sources, about = refit_sources(st, method, task, agnostic, None)
            refit = True
        except InputError as e:
            log.warning("not re-fitted (%s); pass --refit-data FILE to re-fit, or --no-refit to silence this", e)
            refit, skipped = False, str(e).split(";")[0]
    elif refit or refit_data:
        refit = True
        sources, about = refit_sources(st, method, task, agnostic, refit_data)
    own = reader is None
    reader = reader or ByteReader()
    try:
        weights = weights_from_checkpoint(info, reader)
        plan = make_dense_plan(info, stats, method, sparsity, schedule=schedule, metric=metric, whole_groups=whole_groups,
                               bias_comp=bias_comp, weights=weights, seed=seed, task=name, written=written)
        if skipped:
            plan.info["refit_skipped"] = skipped
        if refit:
            from premoe.core.modelio import load_tokenizer
            from premoe.dense.refit import refit as refit_plan

            max_length = max(int((e.get("params") or {}).get("max_length", 2048)) for e in st.tasks.values())
            try:
                refit_plan(info, plan, load_tokenizer(info.path), sources, weights, about=about, max_length=max_length,
                           progress=progress, reader=reader)
            except UnsupportedModelError as e:  # a model that cannot run layer by layer
                if not auto:
                    raise
                log.warning("not re-fitted (%s)", e)
                plan.refit, plan.bias, plan.info["refit_skipped"] = {}, {}, "this model cannot run layer by layer"
                plan.info.pop("refit", None)
                if plan.info.get("bias_comp"):
                    plan.bias = compensation(info, plan, stats, weights)
        return plan
    finally:
        if own:
            reader.close()


def evaluate_dense(info: DenseInfo, data, plan: DensePlan | None, *, batch_size: int = 64, max_new_tokens=None,
                   limit=None, device="cpu", dtype="auto", progress: bool = True) -> dict[str, Any]:
    from premoe.core.evaluation import choice_accuracy, exact_match, read_eval_data
    from premoe.core.modelio import load_tokenizer, resolve_device, resolve_dtype

    gen, mc = read_eval_data(data, limit)
    with ByteReader() as reader:
        net = build_dense(info, plan, reader)
        dt = resolve_dtype(dtype)
        net.to(device=resolve_device(device), dtype=None if dt == "auto" else dt)
        tok = load_tokenizer(info.path)
        out: dict[str, Any] = {"model": str(info.path), "data": str(data), "bytes_read": reader.bytes_read}
    out["exact_match"] = exact_match(net, tok, gen, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                     progress=progress) if gen else None
    out["generate_samples"] = len(gen)
    out["mc_accuracy"] = choice_accuracy(net, tok, mc, progress=progress) if mc else None
    out["mc_samples"] = len(mc)
    if plan is not None:
        out.update(method=plan.method, task=plan.task, sparsity=plan.info["sparsity"], schedule=plan.info["schedule"],
                   refit=bool(plan.refit))
    return out


# -- routing and selective loading ----------------------------------------------------------------

ROUTE_DEPTH = 0  # the mean token embedding: best or tied on held-out queries (bench/dense_routing.py)


@dataclass
class DenseRoute:
    task: str
    distance: float
    margin: float | None
    runner_up: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "distance": self.distance, "margin": self.margin, "runner_up": self.runner_up}


class DenseRouter:
    """Routes a query to the stored task whose prompt centroid is nearest (cosine) in the mean hidden
    state after ``depth`` decoder layers; only the embeddings and those layers are read.

    ``depth`` 0 (default): the mean token embedding; only the embedding matrix and one layer are
    read. ``bench/dense_routing.py`` measured it best or tied among all depths, and against SEAP's
    logistic-regression classifier on the same features, on held-out queries. ``"auto"``: the
    depth at which the stored centroids are best separated (largest
    smallest pairwise cosine distance, a property of the store alone), capped at half the layers.
    """

    def __init__(self, model, store, depth: int | str = ROUTE_DEPTH, device="cpu"):
        from premoe.core.modelio import load_tokenizer, resolve_device

        self.info = model if isinstance(model, DenseInfo) else inspect_dense(model)
        self.store = check_dense_store(store, self.info)
        self.names = sorted(self.store.tasks)
        if not self.names:
            raise StoreError(f"store {self.store.path} has no tasks to route to; calibrate some first")
        cents = torch.stack([self.store.load(n).signature["prompt.hidden"] for n in self.names])  # [T, L+1, D]
        self.centroids = torch.nn.functional.normalize(cents, dim=-1)
        if depth == "auto":
            depth = self.best_depth(self.centroids, max(1, self.info.num_layers // 2))
        if not (0 <= int(depth) <= self.info.num_layers):
            raise InputError(f"--layers must be in 0..{self.info.num_layers} for this model, got {depth}")
        self.depth = int(depth)
        self.tokenizer = load_tokenizer(self.info.path)
        with ByteReader() as reader:
            self.model = _prefix_model(self.info, max(self.depth, 1), reader)
            self.bytes_read = reader.bytes_read
        self.model.to(resolve_device(device))

    @staticmethod
    def best_depth(centroids: torch.Tensor, max_depth: int) -> int:
        if centroids.shape[0] < 2:
            return 0
        sims = torch.einsum("tld,sld->lts", centroids, centroids)  # [L+1, T, T]
        eye = torch.eye(centroids.shape[0], dtype=torch.bool)
        closest = sims.masked_fill(eye, -2).amax(-1).amax(-1)  # most similar pair per depth
        return int(closest[: max_depth + 1].argmin())

    def features(self, texts: list[str]) -> torch.Tensor:
        from premoe.dense.calibration import prompt_features

        return prompt_features(self.model, self.info, self.tokenizer, texts, layers=self.depth)[:, self.depth]

    def route_many(self, texts: list[str]) -> list[DenseRoute]:
        for t in texts:
            if not t or not t.strip():
                raise InputError("empty query; give some text to route")
        q = self.features(texts)
        d = 1 - q @ self.centroids[:, self.depth].T  # [Q, T] cosine distance
        k = min(2, len(self.names))
        vals, idx = d.topk(k, dim=-1, largest=False)
        return [DenseRoute(self.names[i[0]], v[0], v[1] - v[0] if k > 1 else None, self.names[i[1]] if k > 1 else None)
                for v, i in zip(vals.tolist(), idx.tolist())]

    def route(self, text: str) -> DenseRoute:
        return self.route_many([text])[0]


def _prefix_model(info: DenseInfo, layers: int, reader: ByteReader):
    """The embeddings and the first ``layers`` decoder layers (no LM head), from byte ranges."""
    from premoe.core.modelio import config_from_dict, skeleton
    from premoe.dense.model import fill_pruned, full_plan
    from premoe.core.modules import finish_buffers

    raw = dict(info.raw_config)
    raw["num_hidden_layers"] = layers
    for key in ("layer_types",):
        if isinstance(raw.get(key), list):
            raw[key] = raw[key][:layers]
    model = skeleton(config_from_dict(raw, info.spec.name))
    head = model.get_output_embeddings()
    skip = tuple(n for n, m in model.named_modules() if m is head)
    plan = full_plan(info)
    fill_pruned(model, info, plan, reader_getter(info, reader), skip_prefixes=skip)
    finish_buffers(model)
    return model.eval()


@dataclass
class DenseReply:
    text: str
    task: str
    distance: float
    margin: float | None
    switched: bool
    bytes_read: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class DenseServer:
    """Routes each prompt and answers it with a model holding only its task's heads and channels,
    built from the checkpoint (kept rows of q/k/v/gate/up read as byte ranges).

    A task switch (:func:`premoe.dense.switch.switch_dense`) reads only what the new task needs and
    the resident model lacks. Embeddings, norms, the LM head and uncut biases stay in memory. Every
    pruned tensor keeps the rows/columns both plans keep and reads the missing ones: rows as byte
    ranges; o_proj/down_proj columns as byte ranges when their runs average at least
    ``column_run_bytes`` (256: a 128-dim bf16 head), else whole rows in 16 MiB chunks (for scattered
    FFN channels, one range per channel per row is far slower than the rows). Compensated biases are
    re-read. The switched model equals a model built afresh for the new task (same dtypes, same
    logits). Switching back A->B->A reads what B dropped; staying on a task reads nothing. ``load``
    and each :class:`DenseReply` report the checkpoint bytes read (a task's first plan with bias
    compensation also reads its o_proj/down_proj weights).
    """

    def __init__(self, model, store, sparsity: float, *, method: str = "seap", schedule: str | None = None,
                 whole_groups: bool = False, depth: int | str = ROUTE_DEPTH, device="cpu", dtype="auto"):
        from premoe.core.modelio import resolve_device, resolve_dtype
        from premoe.dense.plans import check_sparsity

        check_sparsity(sparsity)
        self.router = DenseRouter(model, store, depth, device)
        self.info, self.store = self.router.info, self.router.store
        self.sparsity, self.method, self.schedule, self.whole_groups = sparsity, method, schedule, whole_groups
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.tokenizer = self.router.tokenizer
        self.task: str | None = None
        self.model = None
        self._plans: dict[str, DensePlan] = {}
        self.reader = ByteReader()
        self.column_run_bytes = MIN_RUN_BYTES

    def plan(self, task: str) -> DensePlan:
        if task not in self._plans:
            self._plans[task] = dense_plan(self.info, self.store, task, self.sparsity, method=self.method,
                                           schedule=self.schedule, whole_groups=self.whole_groups, reader=self.reader,
                                           written=False)
        return self._plans[task]

    @property
    def tasks(self) -> list[str]:
        """The stored tasks prompts are routed to."""
        return list(self.router.names)

    @property
    def bytes_read(self) -> int:
        """Checkpoint bytes read so far (the router's embeddings and every build or switch)."""
        return self.router.bytes_read + self.reader.bytes_read

    def route(self, text: str) -> DenseRoute:
        """The stored task nearest to ``text`` (reads nothing more)."""
        return self.router.route(text)

    def load(self, task: str) -> int:
        """Make ``task``'s model resident (built, or switched from the resident one); returns the bytes read."""
        if task == self.task and self.model is not None:
            return 0
        if task not in self.router.names:
            raise InputError(f"unknown task {task!r}; the store has {', '.join(self.router.names)}")
        before = self.reader.bytes_read
        plan = self.plan(task)
        old, old_task = self.model, self.task
        self.model, self.task = None, None  # a failed switch leaves no half-built model: the next load builds afresh
        if old is None:
            model = build_dense(self.info, plan, self.reader)
        else:
            model = switch_dense(old, self.info, self._plans[old_task], plan, self.reader, self.column_run_bytes)
        del old
        model.to(device=self.device, dtype=None if self.dtype == "auto" else self.dtype)
        self.model, self.task = model, task
        return self.reader.bytes_read - before

    def generate(self, prompt: str, max_new_tokens: int = 64, task: str | None = None) -> DenseReply:
        from premoe.core.evaluation import generate_greedy

        route = self.router.route(prompt) if task is None else DenseRoute(task, 0.0, None, None)
        switched = route.task != self.task
        read = self.load(route.task) if switched else 0
        text = generate_greedy(self.model, self.tokenizer, [prompt], max_new_tokens)[0]
        return DenseReply(text, route.task, route.distance, route.margin, switched, read)
