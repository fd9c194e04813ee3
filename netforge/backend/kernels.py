"""Compiled CPU kernels (numba), used by the NumPy backend when numba is installed.

These are the loops NumPy cannot express without copies: im2col/col2im into and out of the
(C·kh·kw, N·oh·ow) column layout, and max/average pooling. The kernels are single-threaded:
OpenBLAS already uses every core for the GEMMs around them, and a second thread pool would
fight it for the cores. Each has a pure-NumPy twin in numpy_backend.py / the
Pooling layer that the tests compare it with. Install with ``pip install netforge[fast]``;
set NETFORGE_NUMBA=0 to turn them off.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:  # pragma: no cover - depends on the environment
    if os.environ.get("NETFORGE_NUMBA", "1") == "0":
        raise ImportError("disabled by NETFORGE_NUMBA=0")
    from numba import njit

    AVAILABLE = True
except ImportError:  # pragma: no cover
    AVAILABLE = False


if AVAILABLE:

    @njit(parallel=False, cache=True, nogil=True)
    def _im2col(x: Any, out: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                dh: int, dw: int, oh: int, ow: int) -> None:
        n_img, c_in, h, w = x.shape
        d = out.reshape(c_in, kh, kw, n_img, oh, ow)
        for c in range(c_in):
            for i in range(kh):
                for j in range(kw):
                    for n in range(n_img):
                        for y in range(oh):
                            hy = y * sh - ph + i * dh
                            if hy < 0 or hy >= h:
                                for xx in range(ow):
                                    d[c, i, j, n, y, xx] = 0.0
                                continue
                            for xx in range(ow):
                                wx = xx * sw - pw + j * dw
                                if 0 <= wx < w:
                                    d[c, i, j, n, y, xx] = x[n, c, hy, wx]
                                else:
                                    d[c, i, j, n, y, xx] = 0.0

    @njit(parallel=False, cache=True, nogil=True)
    def _col2im(col: Any, out: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                dh: int, dw: int, oh: int, ow: int) -> None:
        n_img, c_in, h, w = out.shape
        d = col.reshape(c_in, kh, kw, n_img, oh, ow)
        for c in range(c_in):
            for n in range(n_img):
                for y in range(h):
                    for xx in range(w):
                        out[n, c, y, xx] = 0.0
                for i in range(kh):
                    for j in range(kw):
                        for y in range(oh):
                            hy = y * sh - ph + i * dh
                            if hy < 0 or hy >= h:
                                continue
                            for xx in range(ow):
                                wx = xx * sw - pw + j * dw
                                if 0 <= wx < w:
                                    out[n, c, hy, wx] += d[c, i, j, n, y, xx]

    @njit(parallel=False, cache=True, nogil=True)
    def _max_pool(x: Any, best: Any, arg: Any, kh: int, kw: int, sh: int, sw: int,
                  ph: int, pw: int) -> None:
        n_img, c_in, h, w = x.shape
        oh, ow = best.shape[2], best.shape[3]
        lowest = best.dtype.type(-3.4028234663852886e38)
        for n in range(n_img):
            for c in range(c_in):
                for y in range(oh):
                    h0 = y * sh - ph
                    hs, he = max(h0, 0), min(h0 + kh, h)
                    for xx in range(ow):
                        w0 = xx * sw - pw
                        ws, we = max(w0, 0), min(w0 + kw, w)
                        if hs >= he or ws >= we:
                            best[n, c, y, xx] = lowest
                            arg[n, c, y, xx] = -1
                            continue
                        m = x[n, c, hs, ws]
                        a = (hs - h0) * kw + (ws - w0)
                        for hy in range(hs, he):
                            for wx in range(ws, we):
                                v = x[n, c, hy, wx]
                                if v > m:
                                    m = v
                                    a = (hy - h0) * kw + (wx - w0)
                        best[n, c, y, xx] = m
                        arg[n, c, y, xx] = a

    @njit(parallel=False, cache=True, nogil=True)
    def _max_pool_values(x: Any, best: Any, kh: int, kw: int, sh: int, sw: int,
                         ph: int, pw: int) -> None:
        n_img, c_in, h, w = x.shape
        oh, ow = best.shape[2], best.shape[3]
        lowest = best.dtype.type(-3.4028234663852886e38)
        for n in range(n_img):
            for c in range(c_in):
                for y in range(oh):
                    hs, he = max(y * sh - ph, 0), min(y * sh - ph + kh, h)
                    for xx in range(ow):
                        ws, we = max(xx * sw - pw, 0), min(xx * sw - pw + kw, w)
                        m = lowest
                        for hy in range(hs, he):
                            for wx in range(ws, we):
                                m = max(m, x[n, c, hy, wx])
                        best[n, c, y, xx] = m

    @njit(parallel=False, cache=True, nogil=True)
    def _max_pool_backward(dy: Any, arg: Any, dx: Any, kh: int, kw: int, sh: int, sw: int,
                           ph: int, pw: int) -> None:
        n_img, c_in, h, w = dx.shape
        oh, ow = dy.shape[2], dy.shape[3]
        for p in range(n_img * c_in):
            n, c = p // c_in, p % c_in
            for y in range(h):
                for xx in range(w):
                    dx[n, c, y, xx] = 0.0
            for y in range(oh):
                for xx in range(ow):
                    a = arg[n, c, y, xx]
                    if a >= 0:
                        dx[n, c, y * sh - ph + a // kw, xx * sw - pw + a % kw] += dy[n, c, y, xx]

    @njit(parallel=False, cache=True, nogil=True)
    def _ave_pool(x: Any, out: Any, size: Any, kh: int, kw: int, sh: int, sw: int,
                  ph: int, pw: int) -> None:
        n_img, c_in, h, w = x.shape
        oh, ow = out.shape[2], out.shape[3]
        for n in range(n_img):
            for c in range(c_in):
                for y in range(oh):
                    hs, he = max(y * sh - ph, 0), min(y * sh - ph + kh, h)
                    for xx in range(ow):
                        ws, we = max(xx * sw - pw, 0), min(xx * sw - pw + kw, w)
                        s = 0.0
                        for hy in range(hs, he):
                            for wx in range(ws, we):
                                s += x[n, c, hy, wx]
                        out[n, c, y, xx] = s / size[y, xx]

    @njit(parallel=False, cache=True, nogil=True)
    def _ave_pool_backward(dy: Any, dx: Any, size: Any, kh: int, kw: int, sh: int, sw: int,
                           ph: int, pw: int) -> None:
        n_img, c_in, h, w = dx.shape
        oh, ow = dy.shape[2], dy.shape[3]
        for p in range(n_img * c_in):
            n, c = p // c_in, p % c_in
            for y in range(h):
                for xx in range(w):
                    dx[n, c, y, xx] = 0.0
            for y in range(oh):
                for xx in range(ow):
                    g = dy[n, c, y, xx] / size[y, xx]
                    for i in range(kh):
                        hy = y * sh - ph + i
                        if hy < 0 or hy >= h:
                            continue
                        for j in range(kw):
                            wx = xx * sw - pw + j
                            if 0 <= wx < w:
                                dx[n, c, hy, wx] += g


def im2col(x: np.ndarray, out: np.ndarray, geometry: tuple[int, ...], oh: int,
           ow: int) -> np.ndarray:
    _im2col(np.ascontiguousarray(x), out, *geometry, oh, ow)
    return out


def col2im(col: np.ndarray, out: np.ndarray, geometry: tuple[int, ...], oh: int,
           ow: int) -> np.ndarray:
    _col2im(np.ascontiguousarray(col), out, *geometry, oh, ow)
    return out


def max_pool(x: np.ndarray, best: np.ndarray, arg: np.ndarray,
             geometry: tuple[int, ...]) -> None:
    _max_pool(np.ascontiguousarray(x), best, arg, *geometry)


def max_pool_values(x: np.ndarray, best: np.ndarray, geometry: tuple[int, ...]) -> None:
    _max_pool_values(np.ascontiguousarray(x), best, *geometry)


def max_pool_backward(dy: np.ndarray, arg: np.ndarray, dx: np.ndarray,
                      geometry: tuple[int, ...]) -> None:
    _max_pool_backward(np.ascontiguousarray(dy), arg, dx, *geometry)


def ave_pool(x: np.ndarray, out: np.ndarray, size: np.ndarray,
             geometry: tuple[int, ...]) -> None:
    _ave_pool(np.ascontiguousarray(x), out, size, *geometry)


def ave_pool_backward(dy: np.ndarray, dx: np.ndarray, size: np.ndarray,
                      geometry: tuple[int, ...]) -> None:
    _ave_pool_backward(np.ascontiguousarray(dy), dx, size, *geometry)
