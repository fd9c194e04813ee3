"""Array backends. Layers compute through ``backend.xp`` and the backend's kernels, never by
importing numpy (or cupy) themselves, so the same layer code runs on either device.
"""

from __future__ import annotations

from netforge.backend.base import Backend
from netforge.backend.numpy_backend import NumpyBackend
from netforge.errors import ConfigError

__all__ = ["Backend", "NumpyBackend", "get_backend"]


def get_backend(mode: str = "CPU", dtype: str = "float32", device_id: int = 0) -> Backend:
    """The backend for a solver_mode: CPU → NumPy; GPU → CuPy when it is installed and usable."""
    mode = mode.upper()
    if mode == "CPU":
        return NumpyBackend(dtype)
    if mode == "GPU":
        try:
            from netforge.backend.cupy_backend import CupyBackend  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "solver_mode GPU needs the GPU backend, which is not available here "
                "(install netforge[gpu] on a machine with CUDA, or set solver_mode: CPU)"
            ) from None
        return CupyBackend(dtype, device_id)  # pragma: no cover
    raise ConfigError(f"unknown solver_mode '{mode}' (expected CPU or GPU)")
