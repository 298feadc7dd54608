"""Two kinds of model, one set of verbs: each kind is a backend (:class:`Kind`) and the verbs ask for it once.

:func:`kind_of` says which backend handles a model directory: :class:`premoe.moe.kind.MoeKind` (PreMoe:
routed experts) or :class:`premoe.dense.kind.DenseKind` (SEAP: attention heads and FFN channels). Each
backend lists, per verb, the option bundles it takes (``accepts``); :func:`check_options` refuses
options a backend does not take with one message shape, whichever verb and kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

from premoe.core.options import Options
from premoe.errors import InputError, UnsupportedModelError


class Kind(Protocol):
    """What the verbs need from a kind of model. ``info`` is the kind's description of a model directory
    (:meth:`inspect`); a plan is what a pruned model keeps (``PrunePlan`` / ``DensePlan``)."""

    name: ClassVar[str]  # "moe" or "dense"
    label: ClassVar[str]  # how messages name the kind
    hint: ClassVar[str]  # what selects a pruned model of this kind, for messages
    accepts: ClassVar[
        dict[str, tuple[type[Options] | str, ...]]
    ]  # verb -> the option bundles (and other options) it takes
    unsupported: ClassVar[dict[str, str]]  # verb -> why this kind has no such verb, and what to use

    def inspect(self, model: Any) -> Any:
        """The model directory's description (no weights loaded)."""

    def calibrate(
        self, info: Any, data: Any, task: str, store: Any, *, run: Any, memory: Any, calibration: Any, overwrite: bool
    ) -> Any:
        """Calibrate ``task`` on ``data`` (a :class:`premoe.core.data.CalibrationData`) into ``store``."""

    def plan(
        self, info: Any, store: Any, task: str | None, *, agnostic: bool, selection: Any, refit: Any, progress: bool
    ) -> Any:
        """The plan ``selection`` gives for ``task`` (or every task pooled), re-fitted as ``refit`` says."""

    def export(self, info: Any, plan: Any, out: Path, *, overwrite: bool, verify: bool, progress: bool) -> Any:
        """Write the pruned checkpoint; returns a result with a ``summary()`` line."""

    def evaluate(
        self,
        info: Any,
        data: Any,
        plan: Any,
        *,
        run: Any,
        memory: Any,
        limit: int | None,
        max_new_tokens: int | None,
        perplexity: Any = None,
        window: int = 1024,
    ) -> dict[str, Any]:
        """Accuracy on ``data`` and perplexity on the file ``perplexity`` of the model, or of it pruned to ``plan``."""

    def router(self, info: Any, store: Any, *, layers: int | None, signature: Any, run: Any) -> Any:
        """Routes texts to stored tasks (``route(text)``, ``bytes_read``)."""

    def task_server(
        self,
        info: Any,
        store: Any,
        *,
        selection: Any,
        layers: int | None,
        signature: Any,
        refit: Any,
        cache_mb: float,
        run: Any,
        dequantize_experts: bool = False,
    ) -> Any:
        """A task server (:class:`premoe.server.backend.TaskBackend`): routes prompts, holds one task's plan."""

    def sweep(
        self,
        out: Path,
        info: Any,
        tasks: dict,
        *,
        sweep: Any,
        variants: tuple[str, ...] | None,
        memory: Any,
        progress: bool,
        about: dict[str, Any],
    ) -> dict[str, Any]:
        """Every method at every size, on every task; writes results into ``out``."""

    def format_sweep(self, result: dict[str, Any]) -> str:
        """The sweep's summary table."""


def kind_of(model: Any) -> Kind:
    """The backend that handles ``model`` (a model directory, or a description or model one returned).

    Raises:
        UnsupportedModelError: neither a supported MoE family nor a supported dense family.
    """
    from premoe.core.config import read_config
    from premoe.dense.families import DENSE_SPECS, UNSUPPORTED, resolve_dense
    from premoe.dense.kind import DenseKind
    from premoe.dense.model import DenseInfo
    from premoe.moe.families import resolve
    from premoe.moe.kind import MoeKind
    from premoe.moe.loading import LoadedModel
    from premoe.moe.model import ModelInfo

    if isinstance(model, (ModelInfo, LoadedModel)):
        return MoeKind()
    if isinstance(model, DenseInfo):
        return DenseKind()
    raw = read_config(Path(model))
    try:
        resolve(raw)
        return MoeKind()
    except UnsupportedModelError as moe_error:
        try:
            resolve_dense(raw)
            return DenseKind()
        except UnsupportedModelError as dense_error:
            if raw.get("model_type") in UNSUPPORTED:
                raise dense_error from None
            if "MoE family premoe cannot prune" in str(moe_error):
                raise moe_error from None
            raise UnsupportedModelError(
                f"{moe_error}; dense families: {', '.join(sorted(DENSE_SPECS))} (premoe/dense/families.py)"
            ) from None


def backend(name: str) -> Kind:
    """The backend called ``name`` (``"moe"`` or ``"dense"``), e.g. the kind a result or a store records."""
    from premoe.dense.kind import DenseKind
    from premoe.moe.kind import MoeKind

    return {"moe": MoeKind, "dense": DenseKind}[name]()


def select(kind: Kind, *selections: Options) -> Any:
    """The one of ``selections`` made for ``kind`` (the others are refused by :func:`check_options`)."""
    return next(s for s in selections if s.kind == kind.name)


def check_options(kind: Kind, verb: str, *bundles: Options | None, **extra: bool) -> None:
    """Refuse options ``kind`` does not take in ``verb``: any bundle not in ``kind.accepts[verb]`` that has a
    field set away from its default, and any ``extra`` option (a name given ``True`` when the caller set
    it) ``kind`` does not take. One message shape for every verb and kind.

    Raises:
        InputError: naming the options, the kind and the verb (and what selects this kind's models).
    """
    if verb not in kind.accepts:
        why = kind.unsupported.get(verb, "")
        raise InputError(f"`premoe {verb}` is not available for {kind.label} models" + (f"; {why}" if why else ""))
    taken = kind.accepts[verb]
    for bundle in bundles:
        if bundle is None or type(bundle) in taken:
            continue
        names = list(bundle.given())
        if names:
            _refuse(kind, verb, names, other=bundle.kind not in (None, kind.name))
    names = [n for n, given in extra.items() if given and n not in taken]
    if names:
        _refuse(kind, verb, names, other=True)


def _refuse(kind: Kind, verb: str, names: list[str], other: bool) -> None:
    what = ", ".join(f"`{n}`" for n in names)
    hint = f"; {kind.label} models take {kind.hint}" if other and kind.hint else ""
    raise InputError(
        f"{what} {'does' if len(names) == 1 else 'do'} not apply to {kind.label} models in `premoe {verb}`{hint}"
    )
