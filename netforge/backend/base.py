"""The interface every array backend provides."""

from __future__ import annotations

from typing import Any

import numpy as np


class Backend:
    """An array module (``xp``) plus the few kernels that need a device-specific fast path.

    ``xp`` is numpy or cupy. ``dtype`` is the float type of every blob (float32 by default;
    float64 for gradient checks). Random numbers are drawn on the host from a numpy
    ``Generator`` that the net owns, so that runs with one seed are repeatable.
    """

    name = "abstract"
    xp: Any

    def __init__(self, dtype: str = "float32"):
        self.dtype = np.dtype(dtype)

    # -- arrays -------------------------------------------------------------------------------
    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.xp.zeros(shape, dtype=dtype or self.dtype)

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.xp.empty(shape, dtype=dtype or self.dtype)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        return self.xp.asarray(a, dtype=dtype or self.dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def synchronize(self) -> None:
        """Wait for queued device work (a no-op on the CPU); used for timing."""

    # -- kernels (implemented per backend) --------------------------------------------------------
    def im2col(self, x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
               dh: int, dw: int) -> Any:
        raise NotImplementedError

    def col2im(self, col: Any, shape: tuple[int, ...], kh: int, kw: int, sh: int, sw: int,
               ph: int, pw: int, dh: int, dw: int) -> Any:
        raise NotImplementedError
