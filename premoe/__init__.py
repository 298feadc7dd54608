"""premoe: keep only the parts of a model a task needs.

MoE models (PreMoe, arXiv 2505.17639): the experts a task routes to; dense models (SEAP, arXiv
2503.07605): the attention heads and FFN channels it uses. The Python API mirrors the CLI verbs, with
the flags as keyword arguments::

    import premoe
    premoe.calibrate("path/to/moe", "math.jsonl", task="math", store="patterns")
    premoe.prune("path/to/moe", "patterns", task="math", keep=64, out="moe-math-64")
    premoe.prune("path/to/dense", "dense-patterns", task="math", sparsity=0.5, out="dense-math-50")
    premoe.inspect("patterns")

Each function lives in the module of its verb (:mod:`premoe.verbs`); attributes are imported lazily, so
``import premoe`` and ``premoe --help`` do not pay for torch and transformers.
"""

from importlib import import_module

from premoe._version import __version__
from premoe.errors import PremoeError

_LAZY = {
    "calibrate": "verbs.calibrate",
    "refit": "verbs.refit",
    "plan": "verbs.prune",
    "prune": "verbs.prune",
    "evaluate": "verbs.eval",
    "inspect": "verbs.inspect",
    "route": "verbs.route",
    "router": "verbs.route",
    "generate": "verbs.generate",
    "task_server": "verbs.serve",
    "serve": "verbs.serve",
    "sweep": "verbs.sweep",
    "demo": "verbs.demo",
    "kind_of": "kinds",
    "pooled_pattern": "moe.patterns",
    "inspect_model": "moe.model",
    "load_model": "moe.loading",
}

__all__ = ["__version__", "PremoeError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'premoe' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
