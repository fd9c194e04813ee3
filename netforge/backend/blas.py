"""The OpenBLAS that NumPy links, reached directly through ctypes: its per-thread thread count
(threads.py) and its GEMM, which the compiled kernels call between their own loops (a fused
im2col + GEMM + layout change per block of images, with no Python, and so no GIL, in between).

NumPy's wheels bundle OpenBLAS in ``numpy.libs`` (Linux) or ``.dylibs`` (macOS); the symbols
differ between releases (``scipy_cblas_sgemm64_`` with 64-bit integers in NumPy 2's wheels,
``cblas_sgemm64_`` in NumPy 1.26's, plain ``cblas_sgemm`` with 32-bit integers in a system
build). Where none is found the callers fall back to NumPy's own calls.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable
from typing import Any

import numpy as np

# CBLAS's enumerations
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112


@functools.cache
def _libraries() -> tuple[ctypes.CDLL, ...]:
    base = os.path.dirname(np.__file__)
    candidates = [
        *glob.glob(os.path.join(base, "..", "numpy.libs", "*openblas*")),  # Linux wheels
        *glob.glob(os.path.join(base, ".dylibs", "*openblas*")),  # macOS wheels
        *glob.glob(os.path.join(base, "..", "numpy.libs", "*.dll")),  # Windows wheels
    ]
    found = []
    for path in candidates:
        try:
            found.append(ctypes.CDLL(path))
        except OSError:
            continue
    return tuple(found)


def thread_setter() -> Callable[[int], int] | None:
    """OpenBLAS's ``openblas_set_num_threads_local`` (OpenBLAS ≥ 0.3.27), or None."""
    for lib in _libraries():
        try:
            setter = lib.openblas_set_num_threads_local
        except AttributeError:
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
        return setter  # type: ignore[no-any-return]
    return None


_GEMM_NAMES = (("scipy_cblas_{}gemm64_", ctypes.c_int64), ("cblas_{}gemm64_", ctypes.c_int64),
               ("cblas_{}gemm", ctypes.c_int))


@functools.cache
def gemm(dtype: str) -> Any:
    """CBLAS's sgemm (dtype "float32") or dgemm ("float64") as a ctypes function that numba
    can call, or None:
    ``gemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)`` with the
    arrays as addresses (``array.ctypes.data``)."""
    letter = {"float32": "s", "float64": "d"}.get(np.dtype(dtype).name)
    if letter is None:
        return None
    real = ctypes.c_float if letter == "s" else ctypes.c_double
    for lib in _libraries():
        for pattern, integer in _GEMM_NAMES:
            try:
                fn = getattr(lib, pattern.format(letter))
            except AttributeError:
                continue
            fn.restype = None
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, integer, integer, integer,
                           real, ctypes.c_void_p, integer, ctypes.c_void_p, integer,
                           real, ctypes.c_void_p, integer]
            return fn
    return None


_for_dtype: dict[Any, Any] = {}


def gemm_for(dtype: Any) -> Any:
    """``gemm`` by a dtype (or anything np.dtype takes), cached on it: a dtype's name costs
    ~2.5 µs each time, and the fused calls ask on every part."""
    try:
        return _for_dtype[dtype]
    except KeyError:
        found = _for_dtype[dtype] = gemm(np.dtype(dtype).name)
        return found
