"""The MoE option bundles: which experts a pruned model keeps (:class:`MoeSelection`) and how a task is
calibrated (:class:`MoeCalibration`), with the names their choices come from. Torch-free (the CLI's
parsers are built from these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from premoe.core.options import Options, check_choice, check_int, check_number, option
from premoe.errors import InputError

# premoe.moe.scoring.SCORERS implements these, in this order
SCORER_NAMES = ("tcess", "official", "frequency", "reap", "ean", "easyep", "recon", "weights", "random")
GROUP_POLICIES = ("balanced", "flatten")
# premoe.moe.compensate.COMPENSATIONS implements these (premoe sweep --variants)
COMPENSATION_NAMES = ("refit", "scale", "merge", "merge+refit", "router", "refit+router")
# premoe.moe.quantize writes these: scheme -> (weight type, bits)
QUANT_SCHEMES = {"w4a16": ("int", 4), "w8a16": ("int", 8), "fp8": ("float", 8)}
ROUNDINGS = ("gptq", "rtn")


@dataclass(frozen=True)
class ResolvedSelection:
    """A :class:`MoeSelection` checked against a model's router: the routing of the pruned model."""

    keep: int
    top_k: int  # after pruning
    n_group: int
    topk_group: int
    group_policy: str
    scorer: str | None


@dataclass(frozen=True)
class MoeSelection(Options):
    """Which experts an MoE model keeps: ``keep`` per MoE layer (the same in every layer, so vLLM loads the
    result), ranked by ``scorer`` (default: the task's own), optionally routing ``top_k`` experts per token."""

    kind: ClassVar[str | None] = "moe"
    keep: int | None = option(None, "MoE: experts kept in every MoE layer", type=int)
    top_k: int | None = option(None, "MoE: also lower the experts routed per token (e.g. 4/64)", type=int)
    group_policy: str = option(
        "balanced",
        "MoE, group-limited routers (DeepSeek-V3): keep N/n_group per group, or flatten to plain top-k",
        choices=GROUP_POLICIES,
    )
    scorer: str | None = option(
        None, "MoE: rank experts with this scorer (default: the task's own)", choices=SCORER_NAMES
    )

    def __post_init__(self):
        check_int("keep", self.keep)
        check_int("top_k", self.top_k)
        check_choice("group_policy", self.group_policy, GROUP_POLICIES, optional=False)
        check_choice("scorer", self.scorer, SCORER_NAMES)

    def resolve(self, router) -> ResolvedSelection:
        """Check ``keep``/``top_k``/``group_policy`` against ``router`` (a :class:`premoe.moe.arch.RouterSpec`)
        before any work and work out the pruned model's routing.

        Group-limited routers (DeepSeek-V3, DeepSeek-V2 ``group_limited_greedy``) route into the best
        ``topk_group`` of ``n_group`` equal expert groups: ``balanced`` keeps ``keep / n_group`` experts in
        every group, ``flatten`` chooses freely and routes by plain top-k (see :mod:`premoe.moe.plans`).

        Raises:
            InputError: no keep count, or one the router cannot route with.
        """
        keep, top_k = self.keep, self.top_k
        E, K = router.num_experts, router.top_k
        if keep is None:
            raise InputError("`keep` (experts kept per MoE layer) is required for an MoE model")
        if keep > E:
            raise InputError(f"`keep` {keep} exceeds the model's {E} experts per layer")
        new_k = K if top_k is None else top_k
        if top_k is not None and top_k > K:
            raise InputError(f"`top_k` {top_k} exceeds the model's own top-k {K}; it can only be lowered")
        if keep < new_k:
            raise InputError(
                f"`keep` {keep} is below the {new_k} experts each token is routed to; keep at least {new_k} "
                "experts per layer (or lower `top_k`)"
            )

        def resolved(n_group: int, topk_group: int) -> ResolvedSelection:
            return ResolvedSelection(
                keep, new_k, n_group, topk_group, self.group_policy if router.group_limited else None, self.scorer
            )

        if not router.group_limited or self.group_policy == "flatten":
            if router.group_score == "top2sum" and keep < 2:
                raise InputError(
                    "DeepSeek-V3-style routers score expert groups by their two best experts; keep at least 2"
                )
            return resolved(router.n_group, router.topk_group) if not router.group_limited else resolved(1, 1)
        G, TG = router.n_group, router.topk_group
        if keep % G:
            raise InputError(
                f"`keep` {keep} is not a multiple of the router's {G} expert groups; use a multiple of {G} "
                "or `group_policy='flatten'`"
            )
        if router.group_score == "top2sum" and keep < 2 * G:
            raise InputError(
                f"`keep` {keep} leaves fewer than 2 experts in some of the {G} groups, but this router "
                f"scores groups by their two best experts; keep at least {2 * G} or use "
                "`group_policy='flatten'`"
            )
        if TG * (keep // G) < new_k:
            raise InputError(
                f"`keep` {keep} leaves {keep // G} experts in each of the {TG} groups a token may use, "
                f"fewer than top-k {new_k}; keep at least {G * -(-new_k // TG)} or use "
                "`group_policy='flatten'`"
            )
        return resolved(G, TG)


@dataclass(frozen=True)
class MoeCalibration(Options):
    """What an MoE calibration records besides the router statistics every scorer starts from."""

    kind: ClassVar[str | None] = "moe"
    scorer: str | None = option(
        None,
        "MoE: the task's default scorer (default: easyep where the experts can be run "
        "one by one, else tcess; router statistics are always recorded, so --scorer tcess "
        "at prune time needs no recalibration)",
        choices=SCORER_NAMES,
    )
    all_stats: bool = option(
        False, "MoE: also compute every other scorer's statistics in this pass (expert outputs, weights)"
    )
    k: int | None = option(None, "MoE: experts per token counted as selected (default: the model's top-k)", type=int)
    r: float | None = option(None, "MoE: minimum share of the top-k routing weight to count", type=float)
    seed: int = option(0, "seed of the random scorer", type=int)
    signature_layers: int = option(4, "MoE layers the stored retrieval keys span", type=int)

    def __post_init__(self):
        check_choice("scorer", self.scorer, SCORER_NAMES)
        check_int("k", self.k)
        check_number("r", self.r)
        if self.r is not None and self.r > 1:
            raise InputError(f"`r` must be in (0, 1], got {self.r}")
        check_int("signature_layers", self.signature_layers)


@dataclass(frozen=True)
class MoeSweep(Options):
    """What an MoE sweep compares: keep counts and scorers."""

    kind: ClassVar[str | None] = "moe"
    keeps: tuple[int, ...] = option(
        (),
        "MoE: experts kept per layer (default: 3/4, 1/2, 3/8, 1/4, 1/8 of the experts)",
        type=int,
        nargs="+",
        flag="--keep",
    )
    scorers: tuple[str, ...] = option((), "MoE: scorers compared (default: all)", choices=SCORER_NAMES, nargs="+")

    def __post_init__(self):
        object.__setattr__(self, "keeps", tuple(self.keeps or ()))
        object.__setattr__(self, "scorers", tuple(self.scorers or ()))
        for k in self.keeps:
            check_int("keeps", k)
        for s in self.scorers:
            check_choice("scorers", s, SCORER_NAMES, optional=False)


@dataclass(frozen=True)
class QuantizeOptions(Options):
    """``premoe prune --quantize``: the kept experts written quantised in compressed-tensors format
    (:mod:`premoe.moe.quantize`)."""

    kind: ClassVar[str | None] = "moe"
    quantize: str | None = option(
        None,
        "MoE: write the kept experts quantised in compressed-tensors format, as vLLM serves it: w4a16/w8a16 "
        "(INT4/INT8 weights, a bf16 scale per group of inputs) or fp8 (128x128 blocks); bf16/fp16/fp32 sources",
        choices=tuple(QUANT_SCHEMES),
    )
    quantize_rounding: str | None = option(
        None,
        "w4a16/w8a16: gptq (default; with the re-fit's input Gram matrices, one pass over the calibration data) "
        "or rtn (round to nearest, no pass); fp8 rounds to nearest",
        choices=ROUNDINGS,
    )
    quantize_group: int | None = option(
        None,
        "w4a16/w8a16: inputs per scale (default 128, or the largest of 64/32/16 dividing every expert's inputs)",
        type=int,
    )

    def __post_init__(self):
        check_choice("quantize", self.quantize, tuple(QUANT_SCHEMES))
        check_choice("quantize_rounding", self.quantize_rounding, ROUNDINGS)
        check_int("quantize_group", self.quantize_group)
        if self.quantize is None and (self.quantize_rounding or self.quantize_group):
            raise InputError("`quantize_rounding` and `quantize_group` need `quantize`")
        if self.float_weights and (self.quantize_rounding == "gptq" or self.quantize_group):
            raise InputError(
                "`quantize` fp8 rounds 128x128 blocks to nearest; `quantize_rounding` gptq and `quantize_group` "
                "apply to w4a16/w8a16"
            )

    @property
    def float_weights(self) -> bool:
        """Whether the scheme stores floating-point weights (FP8 blocks) rather than integers."""
        return QUANT_SCHEMES.get(self.quantize, ("", 0))[0] == "float"

    @property
    def bits(self) -> int:
        return QUANT_SCHEMES[self.quantize][1]

    @property
    def rounding(self) -> str:
        """The rounding used: as given, else GPTQ for integer schemes and round-to-nearest for FP8."""
        return self.quantize_rounding or ("rtn" if self.float_weights else "gptq")
