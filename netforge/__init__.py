"""netforge: Caffe-style, config-driven deep learning on NumPy.

    import netforge
    solver = netforge.Solver("solvers/lenet_solver.yaml")
    solver.solve()
    net = netforge.Net("models/lenet_train_test.yaml", "TEST", weights="lenet_iter_10000.npz")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from netforge.errors import ConfigError, NetforgeError
from netforge.net import Net
from netforge.solver import Solver

try:
    __version__ = version("netforge")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["ConfigError", "Net", "NetforgeError", "Solver", "__version__"]
