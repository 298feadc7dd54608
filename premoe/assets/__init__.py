"""The tiny models shipped with premoe (trained by ``scripts/train_tiny_moe.py`` and
``scripts/train_tiny_dense.py`` on the built-in task suite): what ``premoe demo``, the tests and the
benchmarks run on, with no download."""

from pathlib import Path

TINY_MODEL = Path(__file__).parent / "tiny-moe"  # Mixtral-style MoE
TINY_DENSE = Path(__file__).parent / "tiny-dense"  # Llama-style dense decoder (GQA)

__all__ = ["TINY_MODEL", "TINY_DENSE"]
