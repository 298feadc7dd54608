"""premoe: keep only the experts a task needs (PreMoe, arXiv 2505.17639).

Python API (mirrors the CLI verbs)::

    import premoe
    premoe.calibrate("path/to/moe", "math.jsonl", task="math", store="patterns")
    premoe.prune("path/to/moe", "patterns", task="math", keep=64, out="moe-math-64")
"""

from ._version import __version__
from .api import calibrate, inspect_store, plan, prune

inspect = inspect_store  # the CLI verb's name
from .errors import PremoeError
from .modelio import inspect_model, load_model


def demo(**kwargs):
    """Run the built-in demo (see :func:`premoe.demo.demo`)."""
    from .demo import demo as _demo

    return _demo(**kwargs)


__all__ = ["__version__", "calibrate", "prune", "plan", "inspect", "inspect_store", "inspect_model", "load_model", "demo", "PremoeError"]
