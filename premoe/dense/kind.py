"""The dense backend (SEAP): every verb on a decoder whose layers are plain attention and gated FFN.

Each method wires the option bundles into the dense modules that do the work: calibration
(:mod:`premoe.dense.calibration`), plans from stored statistics and their re-fit
(:mod:`premoe.dense.patterns`), the export (:mod:`premoe.dense.export`), evaluation
(:mod:`premoe.dense.evaluate`), query routing (:mod:`premoe.dense.router`), the task server
(:mod:`premoe.dense.server`) and the sweep (:mod:`premoe.dense.sweep`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from premoe.core.data import CalibrationData
from premoe.core.options import MemoryOptions, Options, RefitOptions, RunOptions
from premoe.dense.model import DenseInfo, DensePlan, inspect_dense
from premoe.dense.options import DenseSelection, DenseSweep


class DenseKind:
    name: ClassVar[str] = "dense"
    label: ClassVar[str] = "dense"
    hint: ClassVar[str] = "`sparsity` (fraction of decoder weights removed) and `method`"
    accepts: ClassVar[dict[str, tuple[type[Options] | str, ...]]] = {
        "calibrate": (RunOptions, MemoryOptions),
        "plan": (DenseSelection, RefitOptions),
        "prune": (DenseSelection, RefitOptions),
        "eval": (RunOptions, DenseSelection, RefitOptions),
        "route": (RunOptions,),
        "generate": (RunOptions, DenseSelection),
        "serve": (RunOptions, DenseSelection),
        "sweep": (DenseSweep,),
    }
    unsupported: ClassVar[dict[str, str]] = {
        "refit": "a dense model re-fits when it is pruned (`premoe prune`, `refit`)",
        "chat": "use `premoe generate` or `premoe serve`",
    }

    def inspect(self, model: Any) -> DenseInfo:
        return model if isinstance(model, DenseInfo) else inspect_dense(model)

    def calibrate(
        self,
        model: Any,
        data: CalibrationData,
        task: str,
        store: Any,
        *,
        run: RunOptions,
        memory: MemoryOptions,
        calibration: Any,
        overwrite: bool,
    ):
        from premoe.dense.calibration import calibrate_dense

        return calibrate_dense(model, data, task, store, run=run, memory=memory, overwrite=overwrite)

    def plan(
        self,
        info: DenseInfo,
        store: Any,
        task: str | None,
        *,
        agnostic: bool,
        selection: DenseSelection,
        refit: RefitOptions,
        progress: bool,
        seed: int = 0,
        shard: Any = None,
    ) -> DensePlan:
        from premoe.core.distributed import SINGLE
        from premoe.dense.patterns import dense_plan

        return dense_plan(
            info, store, task, selection, agnostic=agnostic, refit=refit, seed=seed, progress=progress,
            shard=shard or SINGLE,
        )  # fmt: skip

    def export(self, info: DenseInfo, plan: DensePlan, out: Path, *, overwrite: bool, verify: bool, progress: bool):
        from premoe.dense.export import export_dense

        return export_dense(info, plan, out, overwrite=overwrite, verify=verify, progress=progress)

    def evaluate(
        self,
        info: DenseInfo,
        data: Any,
        plan: DensePlan | None,
        *,
        run: RunOptions,
        memory: MemoryOptions,
        limit: int | None,
        max_new_tokens: int | None,
        perplexity: Any = None,
        window: int = 1024,
    ) -> dict[str, Any]:
        from premoe.dense.evaluate import evaluate_dense

        return evaluate_dense(
            info,
            data,
            plan,
            run=run,
            limit=limit,
            max_new_tokens=max_new_tokens,
            perplexity=perplexity,
            window=window,
        )

    def router(self, info: DenseInfo, store: Any, *, layers: int | None, signature: Any, run: RunOptions):
        from premoe.dense.router import ROUTE_DEPTH, DenseRouter

        return DenseRouter(info, store, ROUTE_DEPTH if layers is None else layers, device=run.device)

    def task_server(
        self,
        info: DenseInfo,
        store: Any,
        *,
        selection: DenseSelection,
        layers: int | None,
        signature: Any,
        refit: RefitOptions,
        cache_mb: float,
        run: RunOptions,
        dequantize_experts: bool = False,
    ):
        from premoe.dense.router import ROUTE_DEPTH
        from premoe.dense.server import DenseServer

        return DenseServer(
            info, store, selection, depth=ROUTE_DEPTH if layers is None else layers, device=run.device, dtype=run.dtype
        )

    def sweep(
        self,
        out: Path,
        info: DenseInfo,
        tasks: dict,
        *,
        sweep: DenseSweep,
        variants: tuple[str, ...] | None,
        memory: MemoryOptions,
        progress: bool,
        about: dict[str, Any],
    ) -> dict[str, Any]:
        from premoe.dense.sweep import sweep_dense

        return sweep_dense(out, info, tasks, sweep, variants=variants, progress=progress, about=about)

    def format_sweep(self, result: dict[str, Any]) -> str:
        from premoe.dense.sweep import format_dense_summary

        return format_dense_summary(result)

    def describe_store(self, model: dict[str, Any]) -> str:
        """The store's model line of ``premoe inspect``."""
        sha = str(model.get("sha256") or model.get("router_sha256"))
        return (
            f"{model['architecture']} ({model['model_type']}), dense, {model['num_layers']} layers, "
            f"weights sha256 {sha[:12]}"
        )
