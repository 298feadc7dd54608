"""What several verbs share on the command line: the model, store and pattern flags, and reading queries.

Torch-free, like every verb module at import time: ``premoe --help`` builds all the parsers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from premoe.core.options import RefitOptions, add_flags
from premoe.dense.options import DenseSelection
from premoe.errors import InputError
from premoe.moe.options import MoeSelection


def add_model(p, help: str = "HuggingFace model directory (safetensors), MoE or dense") -> None:
    p.add_argument("--model", required=True, help=help)


def add_store(p, required: bool = True, help: str = "pattern-store directory") -> None:
    p.add_argument("--store", required=required, help=help)


def add_pattern(p) -> None:
    """``--task`` / ``--agnostic``: which stored pattern decides."""
    p.add_argument("--task", help="calibrated task whose statistics decide")
    p.add_argument("--agnostic", action="store_true", help="pool every task in the store instead (task-agnostic)")


def add_selection(
    p, defaults: dict[str, Any] | None = None, dense_only: tuple[str, ...] | None = None, moe_skip: tuple[str, ...] = ()
) -> None:
    """The flags of both kinds of model's selections (a model refuses the other kind's), and the re-fit's."""
    add_flags(p, MoeSelection, defaults=defaults, skip=moe_skip, title="MoE models (PreMoe: experts)")
    add_flags(
        p,
        DenseSelection,
        defaults=defaults,
        only=dense_only,
        title="dense models (SEAP: attention heads and FFN channels)",
    )


def add_refit(p, defaults: dict[str, Any] | None = None) -> None:
    add_flags(p, RefitOptions, defaults=defaults, title="compensation (MoE and dense)")


def queries(text: str | None, data: str | Path | None, name: str) -> list[tuple[str, str]]:
    """(where, text) pairs from a positional ``text`` or every line of a ``data`` file (JSONL prompt or
    text, or .txt); ``name`` is the positional argument's name."""
    from premoe.core.data import iter_records

    if (text is None) == (data is None):
        raise InputError(f"give either `{name}` or `data`")
    if text is not None:
        return [("query", text)]
    return [(f"{data}:{i}", r.prompt) for i, r in enumerate(iter_records(data, queries=True), 1)]
