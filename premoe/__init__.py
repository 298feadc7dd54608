"""premoe: keep only the experts a task needs (PreMoe, arXiv 2505.17639).

Python API (mirrors the CLI verbs)::

    import premoe
    premoe.calibrate("path/to/moe", "math.jsonl", task="math", store="patterns")
    premoe.refit("path/to/moe", "patterns", keep=64)  # optional: re-fitted rows stored with the patterns
    premoe.prune("path/to/moe", "patterns", task="math", keep=64, out="moe-math-64")
    premoe.inspect("patterns")

Attributes are imported lazily, so ``premoe --help`` does not pay for torch and transformers.
"""

from importlib import import_module

from premoe._version import __version__
from premoe.errors import PremoeError

_LAZY = {
    "calibrate": "api",
    "refit": "api",
    "prune": "api",
    "plan": "api",
    "inspect_store": "api",
    "route": "api",
    "evaluate": "api",
    "pooled_pattern": "api",
    "serve": "api",
    "inspect_model": "moe.model",
    "load_model": "moe.loading",
}

__all__ = ["__version__", "calibrate", "refit", "prune", "plan", "pooled_pattern", "evaluate", "inspect", "inspect_store", "route",
           "serve", "inspect_model",
           "load_model", "demo", "PremoeError"]


def demo(**kwargs):
    """Run the built-in demo (see :func:`premoe.showcase.demo`)."""
    return import_module(".showcase", __name__).demo(**kwargs)


def __getattr__(name: str):
    if name == "inspect":  # the CLI verb's name
        name = "inspect_store"
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'premoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
