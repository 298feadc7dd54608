"""Every option bundle in one place (frozen values, validated when made; the CLI's flags are generated
from their fields). Torch-free.

* :class:`RunOptions`, :class:`MemoryOptions`, :class:`RefitOptions`, :class:`SignatureSpec`
  (:mod:`premoe.core.options`: both kinds of model);
* :class:`MoeSelection`, :class:`MoeCalibration`, :class:`MoeSweep` (:mod:`premoe.moe.options`);
* :class:`DenseSelection`, :class:`DenseSweep` (:mod:`premoe.dense.options`);
* :class:`ServeOptions` (:mod:`premoe.server.options`).
"""

from premoe.core.options import MemoryOptions, RefitOptions, RunOptions, SignatureSpec
from premoe.dense.options import DenseSelection, DenseSweep
from premoe.moe.options import MoeCalibration, MoeSelection, MoeSweep
from premoe.server.options import ServeOptions

__all__ = [
    "RunOptions",
    "MemoryOptions",
    "RefitOptions",
    "SignatureSpec",
    "MoeSelection",
    "MoeCalibration",
    "MoeSweep",
    "DenseSelection",
    "DenseSweep",
    "ServeOptions",
]
