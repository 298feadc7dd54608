"""The dense option bundle: which attention heads and FFN channels a pruned model keeps
(:class:`DenseSelection`), with the names its choices come from. Torch-free (the CLI's parsers are built
from these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from premoe.core.options import Options, check_choice, option
from premoe.errors import InputError

# premoe.dense.plans.METHODS implements these, in this order
METHOD_NAMES = ("seap", "seap-gen", "wanda-sp", "flap", "random")
SCHEDULES = ("uniform", "logistic", "adaptive")
# premoe.dense.scoring.METRICS implements these, in this order
SCORE_NAMES = ("sf", "sw", "sw-paper", "sw-code")


@dataclass(frozen=True)
class DenseSelection(Options):
    """Which heads and FFN channels a dense model keeps: ``sparsity`` of its decoder linear weights removed,
    chosen by ``method``."""

    kind: ClassVar[str | None] = "dense"
    sparsity: float | None = option(
        None, "dense: fraction of decoder linear weights removed, in [0, 1) (e.g. 0.5)", type=float
    )
    method: str = option(
        "seap",
        "dense: seap (the task's statistics), seap-gen (all tasks pooled), wanda-sp, flap, random",
        choices=METHOD_NAMES,
    )
    schedule: str | None = option(
        None,
        "dense layer allocation: uniform counts (default; plain transformers/vLLM "
        "load), SEAP's logistic depth schedule or FLAP's adaptive ranking (exports are "
        "zero-padded to the largest layer)",
        choices=SCHEDULES,
    )
    whole_groups: bool = option(
        False, "dense, GQA: remove whole KV groups instead of the same number of query heads from every group"
    )
    bias_comp: bool | None = option(
        None, "dense: FLAP bias compensation of the removed inputs' mean (default: on for flap only)"
    )
    score: str | None = option(
        None, "dense: importance score (default: the method's; sf = SEAP s_F, sw = Wanda-sp)", choices=SCORE_NAMES
    )

    def __post_init__(self):
        if self.sparsity is not None and not (isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1):
            raise InputError(f"`sparsity` must be in [0, 1), got {self.sparsity!r}")
        check_choice("method", self.method, METHOD_NAMES, optional=False)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("score", self.score, SCORE_NAMES)

    def required(self) -> float:
        """``sparsity``, which a dense model needs.

        Raises:
            InputError: it was not given.
        """
        if self.sparsity is None:
            raise InputError("`sparsity` (fraction of decoder weights removed, e.g. 0.5) is required for a dense model")
        return float(self.sparsity)


@dataclass(frozen=True)
class DenseSweep(Options):
    """What a dense sweep compares: sparsities and methods, on each method's layer allocation or one for all."""

    kind: ClassVar[str | None] = "dense"
    sparsities: tuple[float, ...] = option(
        (), "dense: fractions of decoder weights removed (default 0.2 0.35 0.5)", type=float, nargs="+"
    )
    methods: tuple[str, ...] = option((), "dense: methods compared (default: all)", choices=METHOD_NAMES, nargs="+")
    schedule: str | None = option(
        None,
        "dense: give every method this layer allocation, to compare criteria on one "
        "structure (default: each method's own: uniform, FLAP adaptive)",
        choices=SCHEDULES,
    )
    count: str = option(
        "written",
        "dense: count sparsity in the checkpoint premoe prune writes (FLAP's layer-varying "
        "plans are padded there, so they are made sparser in memory to match) or in memory "
        "(as the papers do)",
        choices=("written", "memory"),
    )

    def __post_init__(self):
        object.__setattr__(self, "sparsities", tuple(self.sparsities or ()))
        object.__setattr__(self, "methods", tuple(self.methods or ()))
        for s in self.sparsities:
            if not (isinstance(s, (int, float)) and 0 <= s < 1):
                raise InputError(f"`sparsities` must be in [0, 1), got {s!r}")
        for m in self.methods:
            check_choice("methods", m, METHOD_NAMES, optional=False)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("count", self.count, ("written", "memory"), optional=False)
