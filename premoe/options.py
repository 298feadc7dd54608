"""Every option bundle in one place (frozen values, validated when made; the CLI's flags are generated
from their fields). Torch-free.

* :class:`RunOptions`, :class:`MemoryOptions`, :class:`RefitOptions`, :class:`SignatureSpec`,
  :class:`EngineOptions` (:mod:`premoe.core.options`: shared by the kinds);
* :class:`MoeSelection`, :class:`MoeCalibration`, :class:`MoeSweep` (:mod:`premoe.moe.options`);
* :class:`DenseSelection`, :class:`DenseSweep` (:mod:`premoe.dense.options`);
* :class:`ServeOptions` (:mod:`premoe.server.options`).
"""

from premoe.core.options import EngineOptions, MemoryOptions, RefitOptions, RunOptions, SignatureSpec
from premoe.dense.options import DenseSelection, DenseSweep
from premoe.moe.options import MoeCalibration, MoeSelection, MoeSweep
from premoe.server.options import ServeOptions

__all__ = [
    "RunOptions",
    "MemoryOptions",
    "EngineOptions",
    "RefitOptions",
    "SignatureSpec",
    "MoeSelection",
    "MoeCalibration",
    "MoeSweep",
    "DenseSelection",
    "DenseSweep",
    "ServeOptions",
]
