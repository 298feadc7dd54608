"""The MoE backend (PreMoe): every verb on a model whose decoder layers route tokens to experts.

Each method wires the option bundles into the MoE modules that do the work: calibration
(:mod:`premoe.moe.calibration`), plans from stored patterns (:mod:`premoe.moe.patterns`) and their re-fit
(:mod:`premoe.moe.refit_checkpoint`), the byte-range export (:mod:`premoe.moe.export`), evaluation
(:mod:`premoe.moe.evaluate`), query routing (:mod:`premoe.moe.router`), the TAER task server
(:mod:`premoe.moe.server`) and the sweep (:mod:`premoe.moe.sweep`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from premoe.core.data import CalibrationData
from premoe.core.options import EngineOptions, MemoryOptions, Options, RefitOptions, RunOptions, SignatureSpec
from premoe.core.store import PatternStore
from premoe.moe.model import ModelInfo, as_info
from premoe.moe.options import MoeCalibration, MoeSelection, MoeSweep, QuantizeOptions
from premoe.moe.plans import PrunePlan

# what generate, chat and serve take: a task server's options
SERVING = (RunOptions, MoeSelection, SignatureSpec, RefitOptions, EngineOptions, "cache_mb", "dequantize_experts")


class MoeKind:
    name: ClassVar[str] = "moe"
    label: ClassVar[str] = "MoE"
    hint: ClassVar[str] = "`keep` (experts kept per MoE layer)"
    accepts: ClassVar[dict[str, tuple[type[Options] | str, ...]]] = {
        "calibrate": (RunOptions, MemoryOptions, MoeCalibration, "refit_keep"),
        "refit": (MoeSelection, RefitOptions),
        "plan": (MoeSelection, RefitOptions, QuantizeOptions),
        "prune": (MoeSelection, RefitOptions, QuantizeOptions),
        "eval": (RunOptions, MemoryOptions, MoeSelection, RefitOptions),
        "route": (RunOptions, SignatureSpec),
        "generate": SERVING,
        "chat": SERVING,
        "serve": SERVING,
        "sweep": (MemoryOptions, MoeSweep),
    }
    unsupported: ClassVar[dict[str, str]] = {}

    def inspect(self, model: Any) -> ModelInfo:
        return as_info(model)

    def calibrate(
        self,
        model: Any,
        data: CalibrationData,
        task: str,
        store: Any,
        *,
        run: RunOptions,
        memory: MemoryOptions,
        calibration: MoeCalibration | None,
        overwrite: bool,
    ):
        from premoe.moe.calibration import calibrate

        return calibrate(
            model,
            data,
            task,
            store,
            run=run,
            memory=memory,
            calibration=calibration or MoeCalibration(),
            overwrite=overwrite,
        )

    def plan(
        self,
        info: ModelInfo,
        store: Any,
        task: str | None,
        *,
        agnostic: bool,
        selection: MoeSelection,
        refit: RefitOptions,
        progress: bool,
        seed: int = 0,
        quantize: QuantizeOptions | None = None,
        shard=None,
    ) -> PrunePlan:
        """The pattern's plan (every stored task pooled with ``agnostic``), its kept experts re-fitted as
        ``refit`` says (the rows held in ``plan.weights`` until :meth:`PrunePlan.close`) and, with ``quantize``,
        written quantised by the export (GPTQ's rounding made in the re-fit's pass). ``shard``: a data-parallel
        rank (:mod:`premoe.core.distributed`) shares the re-fit's pass; rank 0 then holds the rows."""
        from premoe.moe.patterns import load_pattern, plan_from_pattern
        from premoe.moe.quantize import resolve_quantize
        from premoe.moe.refit_checkpoint import refit_for

        chosen = selection.resolve(info.router)  # an impossible keep fails before the store is read
        quant = resolve_quantize(info, quantize)
        st = PatternStore.open(store)
        st.check_model(info.fingerprint)
        plan = plan_from_pattern(info, load_pattern(st, task, agnostic), chosen, seed=seed)
        plan.quantize = quant
        refit_for(
            info, st, plan, task, agnostic, refit, progress, quantize=quant, **({"shard": shard} if shard else {})
        )
        return plan

    def export(self, info: ModelInfo, plan: PrunePlan, out: Path, *, overwrite: bool, verify: bool, progress: bool):
        from premoe.moe.export import export_pruned

        return export_pruned(info, plan, out, overwrite=overwrite, verify=verify, progress=progress)

    def evaluate(
        self,
        info: ModelInfo,
        data: Any,
        plan: PrunePlan | None,
        *,
        run: RunOptions,
        memory: MemoryOptions,
        limit: int | None,
        max_new_tokens: int | None,
        perplexity: Any = None,
        window: int = 1024,
    ) -> dict[str, Any]:
        from premoe.moe.evaluate import evaluate_moe

        return evaluate_moe(
            info,
            data,
            plan,
            run=run,
            memory=memory,
            limit=limit,
            max_new_tokens=max_new_tokens,
            perplexity=perplexity,
            window=window,
        )

    def router(self, info: ModelInfo, store: Any, *, layers: int | None, signature: SignatureSpec, run: RunOptions):
        from premoe.moe.router import QueryRouter

        return QueryRouter(info, store, replace(signature, layers=layers or 1), device=run.device, dtype=run.dtype)

    def task_server(
        self,
        info: ModelInfo,
        store: Any,
        *,
        selection: MoeSelection,
        layers: int | None,
        signature: SignatureSpec,
        refit: RefitOptions,
        cache_mb: float,
        run: RunOptions,
        dequantize_experts: bool = False,
    ):
        from premoe.moe.server import TaskServer

        return TaskServer(
            info.path,
            store,
            selection,
            signature=replace(signature, layers=layers or 1),
            cache_bytes=int(cache_mb * 2**20),
            device=run.device,
            dtype=run.dtype,
            refit=refit.refit,
            hold=not dequantize_experts,
        )

    def refit(
        self,
        info: ModelInfo,
        store: Any,
        keeps: list[int],
        *,
        tasks: list[str] | None,
        selection: MoeSelection,
        refit: RefitOptions,
        progress: bool,
    ) -> dict[str, list[dict[str, Any]]]:
        from premoe.moe.refit_checkpoint import refit_tasks

        return refit_tasks(
            info, store, keeps, tasks=tasks, selection=selection, refit_data=refit.refit_data, progress=progress
        )

    def check_refit(self, info: ModelInfo, keeps: list[int]) -> None:
        """Raise unless :meth:`refit` can store re-fitted rows for ``keeps`` (checked before a calibration)."""
        from premoe.moe.refit_checkpoint import check_refit

        check_refit(info, keeps)

    def sweep(
        self,
        out: Path,
        info: ModelInfo,
        tasks: dict,
        *,
        sweep: MoeSweep,
        variants: tuple[str, ...] | None,
        memory: MemoryOptions,
        progress: bool,
        about: dict[str, Any],
    ) -> dict[str, Any]:
        from premoe.moe.sweep import sweep as run_sweep

        return run_sweep(out, info, tasks, sweep, variants=variants, memory=memory, progress=progress, about=about)

    def format_sweep(self, result: dict[str, Any]) -> str:
        from premoe.moe.sweep import format_summary

        return (
            "accuracy retained vs. dense (mean over tasks), by experts kept per layer:\n"
            + format_summary(result)
            + f"\nwrote results.json, results.csv, {', '.join(result['pictures'])} to {result['out']} in "
            f"{result['seconds']:.0f}s"
        )

    def describe_store(self, model: dict[str, Any]) -> str:
        """The store's model line of ``premoe inspect``."""
        return (
            f"{model['architecture']} ({model['model_type']}), {len(model['moe_layers'])} MoE layers x "
            f"{model['num_experts']} experts, top-{model['top_k']}, router sha256 {model['router_sha256'][:12]}"
        )
