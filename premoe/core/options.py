"""Option bundles: frozen values, each field validated once when the bundle is made, and the CLI flags
generated from the fields (their help, choices and defaults are written here and nowhere else).

A bundle is a frozen dataclass whose fields are made with :func:`option`. :func:`add_flags` turns its
fields into argparse flags named after them (``max_length`` -> ``--max-length``), so a flag's ``dest``
is the keyword argument of the Python function it feeds. Library errors name parameters in backticks
(```keep``` or ```schedule='uniform'```); :func:`cli_message` rewrites them as the flags that set them.

Nothing here imports torch: ``premoe --help`` builds every parser from these modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from premoe.errors import InputError

_UNSET = object()


def option(
    default: Any = None,
    help: str = "",
    *,
    choices: Sequence[str] | None = None,
    type: Any = None,
    nargs: str | None = None,
    metavar: str | None = None,
    flag: str | None = None,
    cli: bool = True,
) -> Any:
    """A bundle field: its default, help text and choices (what :func:`add_flags` turns into a flag).

    ``type`` is the argparse type of one value (default: the default's type, else ``str``); ``nargs``
    "+" makes a list flag (the field holds a tuple); a ``bool`` field with default ``False`` is a switch,
    one with default ``None`` a ``--x/--no-x`` pair. ``cli=False`` keeps a field out of the CLI.
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "type": type,
        "nargs": nargs,
        "metavar": metavar,
        "flag": flag,
        "cli": cli,
    }
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta)


class Options:
    """Base of the option bundles: ``kind`` says which kind of model a bundle's options are for
    (``"moe"``, ``"dense"``, or ``None`` for both)."""

    kind: ClassVar[str | None] = None

    def given(self) -> dict[str, Any]:
        """The fields set to something other than their default."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) != f.default}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def default(cls, name: str) -> Any:
        return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# -- checks used by the bundles' __post_init__ -----------------------------------------------------


def check_choice(name: str, value: Any, choices: Sequence[Any], optional: bool = True) -> None:
    if (value is None and optional) or value in choices:
        return
    raise InputError(f"`{name}` must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_int(name: str, value: Any, low: int = 1, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "positive" if low == 1 else f"at least {low}"
        raise InputError(f"`{name}` must be an integer {what}, got {value!r}")


def check_number(name: str, value: Any, low: float = 0.0, strict: bool = True, optional: bool = True) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if strict else value >= low)
    if not ok:
        raise InputError(f"`{name}` must be a number {'>' if strict else '>='} {low:g}, got {value!r}")


# -- the bundles every kind of model takes --------------------------------------------------------


@dataclass(frozen=True)
class RunOptions(Options):
    """Where and how a model runs."""

    device: str | None = option("auto", "auto (accelerator if any), cpu, cuda, cuda:1 ...")
    dtype: str = option("auto", "auto (the checkpoint's), float32, bfloat16, float16")
    batch_size: int = option(16, "samples per forward pass", type=int)
    max_length: int = option(2048, "tokens kept per sample", type=int)
    progress: bool = option(True, "show progress bars", cli=False)

    def __post_init__(self):
        check_int("batch_size", self.batch_size)
        check_int("max_length", self.max_length)


@dataclass(frozen=True)
class MemoryOptions(Options):
    """Models larger than memory: when to run one decoder layer at a time, within which budget."""

    stream: bool | None = option(
        None, "run the model one decoder layer at a time (default: when it would not fit in memory)"
    )
    max_memory: float | None = option(
        None,
        "memory budget in MB (default: what the machine and this process's cgroup leave free)",
        type=float,
        metavar="MB",
    )
    offload_dir: str | None = option(
        None, "where hidden states past the budget go (default: the system temp directory)"
    )
    share_layers: bool = option(
        False,
        "under torchrun, the ranks of a node hold one copy of each streamed layer, built by the node's first rank "
        "in shared memory (/dev/shm or $PREMOE_SHARE_DIR), instead of one copy each; implies --stream",
    )

    def __post_init__(self):
        check_number("max_memory", self.max_memory)
        if self.offload_dir is not None and not Path(self.offload_dir).is_dir():
            raise InputError(f"`offload_dir` {self.offload_dir} is not a directory")


@dataclass(frozen=True)
class RefitOptions(Options):
    """Least-squares re-fit of what pruning keeps, so each pruned layer still answers like the dense one."""

    refit: bool | None = option(
        None,
        "re-fit by least squares so each pruned layer's output matches the dense one on "
        "the calibration tokens (the store's recorded data, or --refit-data): MoE models "
        "the kept experts' down projections and router rows under re-routing, dense "
        "models the kept o_proj/down_proj columns and biases; plain weights, vanilla load "
        "(default: on when the recorded data is still there unchanged; --no-refit: the "
        "published methods)",
    )
    refit_data: tuple[str, ...] = option(
        (),
        "JSONL texts to re-fit on, each file weighted equally (default: the data the store was calibrated on)",
        nargs="+",
        metavar="FILE",
    )

    def __post_init__(self):
        object.__setattr__(self, "refit_data", tuple(str(p) for p in (self.refit_data or ())))
        if self.refit_data and self.refit is False:
            raise InputError("`refit_data` cannot go with `refit=False`")

    @property
    def auto(self) -> bool:
        """Re-fit where the data is still there (``refit`` left to its default and no ``refit_data``)."""
        return self.refit is None and not self.refit_data


# retrieval: how a query's signature is compared with the stored tasks' keys (premoe.core.retrieval)
ENGINES = ("auto", "hf", "vllm")
STAGING = ("auto", "on", "off")


@dataclass(frozen=True)
class EngineOptions(Options):
    """Which engine runs the model under ``generate``, ``chat`` and ``serve`` (MoE): premoe's own (HF
    transformers, eager) or vLLM, with task switches written into the running engine."""

    kind: ClassVar[str | None] = "moe"
    engine: str = option(
        "auto",
        "hf: premoe's own engine (transformers); vllm: vLLM holds the experts and a task switch writes only those "
        "that differ into it; auto: vllm where it is installed and serves the model, else hf",
        choices=ENGINES,
    )
    tensor_parallel: int = option(1, "vllm: tensor-parallel size (ranks each hold a slice of every expert)", type=int)
    expert_parallel: bool = option(False, "vllm: expert parallelism (ranks each hold whole experts)")
    max_model_len: int | None = option(None, "vllm: context length (default: the model's)", type=int)
    kv_cache_gb: float | None = option(
        None, "vllm on CPU: KV cache size in GiB (default: $VLLM_CPU_KVCACHE_SPACE, else 2)", type=float
    )
    held_tasks: int = option(
        1,
        "vllm: room for this many tasks' experts (x N per layer); every task whose experts fit there together is "
        "held (shared experts take one slot), requests of held tasks share batches, each token routed among its "
        "own task's experts",
        type=int,
    )
    stage_switches: str = option(
        "auto",
        "vllm, serve: read the next task's experts on a worker thread while the engine keeps serving, so it pauses "
        "only to write them; auto: on a GPU (on the CPU the reads slow vLLM's steps more than they save)",
        choices=STAGING,
    )

    def __post_init__(self):
        check_choice("engine", self.engine, ENGINES, optional=False)
        check_choice("stage_switches", self.stage_switches, STAGING, optional=False)
        check_int("tensor_parallel", self.tensor_parallel, optional=False)
        check_int("held_tasks", self.held_tasks, optional=False)
        check_int("max_model_len", self.max_model_len)
        check_number("kv_cache_gb", self.kv_cache_gb)
        if self.engine == "hf" and self.vllm_only:
            raise InputError(
                "`tensor_parallel`, `expert_parallel`, `held_tasks` and `stage_switches` need `engine` vllm"
            )

    @property
    def vllm_only(self) -> bool:
        """Whether an option only the vLLM engine takes is set."""
        return (
            self.tensor_parallel != 1 or self.expert_parallel or self.held_tasks != 1 or self.stage_switches != "auto"
        )


STATS = ("prob", "tcess", "count", "official")
SOURCES = ("prompt", "full")
NORMS = ("none", "l1", "l2")
METRICS = ("l2", "cosine", "l1")


@dataclass(frozen=True)
class SignatureSpec(Options):
    """How an MoE model's queries are compared with stored tasks: the router statistic of the first
    ``layers`` MoE layers, the tokens the stored keys were computed over, the per-layer normalisation and
    the distance (defaults chosen on measured routing accuracy, ``bench/routing.py``)."""

    kind: ClassVar[str | None] = "moe"
    layers: int = option(1, "MoE layers the signature spans", type=int, cli=False)
    stat: str = option("prob", "router statistic compared", choices=STATS)
    source: str = option("prompt", "keys from the calibration prompts or prompt+completion", choices=SOURCES)
    norm: str = option("l1", "per-layer normalisation", choices=NORMS)
    metric: str = option("l1", "distance", choices=METRICS)

    def __post_init__(self):
        for name, allowed in (("stat", STATS), ("source", SOURCES), ("norm", NORMS), ("metric", METRICS)):
            check_choice(name, getattr(self, name), allowed, optional=False)
        check_int("layers", self.layers)

    @property
    def key(self) -> str:
        return f"{self.source}.{self.stat}"


def signature_spec(layers: int = 1, stat=None, source=None, norm=None, metric=None) -> SignatureSpec:
    """A :class:`SignatureSpec` with the defaults for every setting left ``None``."""
    given = {k: v for k, v in dict(stat=stat, source=source, norm=norm, metric=metric).items() if v is not None}
    return SignatureSpec(layers=layers, **given)


# -- flags ----------------------------------------------------------------------------------------


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_flags(
    parser,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    only: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    required: Sequence[str] = (),
    title: str | None = None,
) -> None:
    """Add a flag for every CLI field of the bundle ``cls`` to ``parser`` (in an argument group ``title``).

    ``defaults`` overrides a field's default for this verb (the Python function of the verb has the same
    default, see :func:`defaults_of`); the flag's ``dest`` is the field name. ``only``/``skip`` select fields.
    """
    defaults = defaults or {}
    target = parser.add_argument_group(title) if title else parser
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip or (only is not None and f.name not in only):
            continue
        default = defaults.get(f.name, f.default)
        kwargs: dict[str, Any] = {"dest": f.name, "default": list(default) if isinstance(default, tuple) else default}
        help_text = meta.get("help", "")
        if isinstance(f.default, bool) or f.default is None and f.type in ("bool | None", "bool"):
            if default is None or default is True:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_true"
        else:
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("nargs"):
                kwargs["nargs"] = meta["nargs"]
            typ = meta.get("type") or (
                type(default) if default is not None and not isinstance(default, (str, tuple)) else None
            )
            if typ is not None:
                kwargs["type"] = typ
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if default not in (None, (), []) and "default:" not in help_text:
                help_text += f" (default: {' '.join(map(str, default)) if isinstance(default, tuple) else default})"
        if f.name in required:
            kwargs["required"] = True
            kwargs.pop("default")
            help_text += " (required)"
        target.add_argument(flag_name(f), help=help_text, **kwargs)


def defaults_of(fn, names: Sequence[str] | None = None) -> dict[str, Any]:
    """The keyword defaults of ``fn`` (a verb's Python function), so its flags default to the same values."""
    import inspect

    params = inspect.signature(fn).parameters
    return {
        n: p.default
        for n, p in params.items()
        if p.default is not inspect.Parameter.empty and (names is None or n in names)
    }


def kwargs_of(fn, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The keyword arguments of ``fn`` found in the parsed ``args`` (mlx-lm's ``fn(**vars(args))``, limited
    to what ``fn`` takes), updated with ``extra``."""
    import inspect

    params = inspect.signature(fn).parameters
    out = {n: getattr(args, n) for n in params if hasattr(args, n)}
    out.update(extra)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


_PARAM = re.compile(r"`([a-z_][a-z0-9_]*)(?:=([^`]*))?`")


def cli_message(message: str, parser: argparse.ArgumentParser | None) -> str:
    """A library message with its parameters (```keep```, ```schedule='uniform'```) written as the flags of
    ``parser`` that set them (``--keep``, ``--schedule uniform``); names without a flag stay as they are."""
    flags: dict[str, tuple[str, bool]] = {}
    if parser is not None:
        for action in parser._actions:  # argparse keeps no public list of a parser's actions
            if action.option_strings:
                paired = isinstance(action, argparse.BooleanOptionalAction)
                flag = action.option_strings[0] if paired else max(action.option_strings, key=len)
                flags[action.dest] = (flag, paired)
            elif action.dest not in ("help",):
                flags[action.dest] = (action.dest.upper(), False)

    def sub(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        if name not in flags:
            return m.group(0)
        flag, paired = flags[name]
        if value is None:
            return flag
        value = value.strip().strip("'\"")
        if value == "True":
            return flag
        if value == "False" and paired:
            return "--no-" + flag.removeprefix("--")
        return f"{flag} {value}"

    return _PARAM.sub(sub, message)
