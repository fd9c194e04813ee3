"""Compiled CPU kernels (numba), used by the NumPy backend when numba is installed.

These are the loops NumPy cannot express without copies: im2col/col2im into and out of the
(N·oh·ow, C·kh·kw) row layout (entries in Caffe's (c, i, j) order or in (i, j, c) order) and
Caffe's per-image (N, C·kh·kw, oh·ow) layout, max/average pooling, ReLU, and the SGD update in
one pass. Each kernel is single-threaded and releases the GIL; the backend runs them on parts
of the batch on every core (threads.py), or on every core at once with a shared work array
from which each takes its items (work_counter). Each has a pure-NumPy twin (numpy_backend.py, the
Pooling layer, Backend.relu, Backend.sgd_update) that the tests compare it with.
Install with ``pip install netforge[fast]``; set NETFORGE_NUMBA=0 to turn them off.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from netforge.backend.blas import NO_TRANS, ROW_MAJOR, TRANS

try:  # pragma: no cover - depends on the environment
    if os.environ.get("NETFORGE_NUMBA", "1") == "0":
        raise ImportError("disabled by NETFORGE_NUMBA=0")
    from numba import njit, types, uintp
    from numba.core import cgutils
    from numba.extending import intrinsic

    AVAILABLE = True
except ImportError:  # pragma: no cover
    AVAILABLE = False


# -- kernels made per geometry --------------------------------------------------------------------
#
# A convolution's or pooling's window loops are short (2x2, 3x3, 5x5) and their trip counts decide
# everything: with the geometry a compile-time constant, LLVM unrolls the window (for pooling, into
# a branch-free chain of compares and selects) and drops the bounds arithmetic, several times
# faster than the same loops over run-time bounds. So each geometry gets its own compiled kernel,
# made on first use (~0.3 s; numba's on-disk cache, keyed by the geometry, skips that in later
# processes). Windows that reach into the padding or past the border (the first/last rows and
# columns) take the clipped, general path of the same kernel.
#
# Indices that are known not to be negative are cast to ``uintp`` in the inner loops: numba wraps
# a negative signed index around (x[-1] is the last element), and that per-element test keeps
# LLVM from vectorizing the loop. Measured on LeNet's conv1 columns: 0.88 ms with signed indices,
# 0.05 ms with unsigned ones.

_made: dict[tuple[Any, ...], Any] = {}
_made_lock = threading.RLock()  # factories ask for the kernels they call


def _interior(n_out: int, size: int, extent: int, s: int, p: int) -> tuple[int, int]:
    """The range [lo, hi) of outputs whose window (``extent`` wide) lies inside [0, size)."""
    lo = min(-(-p // s), n_out)
    hi = max(lo, min((size + p - extent) // s + 1, n_out))
    return lo, hi


def _kernel(kind: str, geometry: tuple[int, ...]) -> Any:
    key = (kind, *geometry)
    kernel = _made.get(key)
    if kernel is None:
        with _made_lock:  # two workers asking at once compile it once
            kernel = _made.get(key)
            if kernel is None:
                kernel = _made[key] = _FACTORIES[kind](*geometry)
                _stable_uuids(kernel, "netforge.kernels:" + ":".join(map(str, key)))
    return kernel


# numba's on-disk cache finds a closure's compiled code by a hash of its cells pickled, and a
# numba function pickles with a uuid drawn anew in each process: a kernel whose closure holds
# another compiled function (pooling's window helpers, the fused convolutions' im2col) was
# compiled again in every process (~1 s each). Each such function gets a uuid derived from the
# key that made it instead, which is the same in every process. Its qualified name gets the key
# too: numba names a function's machine code by qualified name and a per-process counter, so a
# kernel loaded from the cache could otherwise link to another geometry's helper compiled in
# this process under the same name (seen: wrong outputs, then a corrupted heap).
def _set_uuid_once(function: Any, name: str) -> bool:
    """Give a compiled function the uuid ``name``; False where it has one already (made by
    _kernel) or this numba has no such call."""
    try:
        function._set_uuid(name)
    except (AssertionError, AttributeError):
        return False
    return True


def _stable_uuids(kernel: Any, name: str) -> None:
    if not _set_uuid_once(kernel, name):
        return
    kernel.py_func.__qualname__ += "_" + re.sub(r"\W", "_", name.split(":", 1)[-1])
    for cell in kernel.py_func.__closure__ or ():
        inner = cell.cell_contents
        if hasattr(inner, "py_func"):
            _stable_uuids(inner, f"{name}/{inner.py_func.__name__}")


# -- im2col and its adjoint col2im, in two column layouts ------------------------------------------
#
# One factory per layout makes both directions: ``adjoint`` is a compile-time constant, so each
# kernel keeps only its own statements, and the two walk the windows in the same order.
# im2col(image) fills ``cols``; col2im(cols) overwrites ``image`` with the sum of the column
# entries that came from each pixel.

def _make_rows(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int,
               adjoint: bool) -> Any:
    """The row layout (N·oh·ow, C·kh·kw). Each row (one output pixel) is walked from start to
    end and the image stays in the core's cache: im2col on cifar10_quick's conv2 (5 images)
    0.29 ms, against 0.45 ms when each image row was spread over the output rows using it."""
    @njit(nogil=True, cache=True)
    def kernel(image: Any, cols: Any, oh: int, ow: int, y_lo: int, y_hi: int, x_lo: int,
               x_hi: int) -> None:
        n_img, c_in, h, w = image.shape
        for n in range(n_img):
            if adjoint:
                image[n] = 0.0
            for y in range(oh):
                h0 = y * sh - ph
                for xx in range(ow):
                    row = cols[(n * oh + y) * ow + xx]
                    w0 = xx * sw - pw
                    if y_lo <= y < y_hi and x_lo <= xx < x_hi:
                        for c in range(c_in):
                            for i in range(kh):  # unrolled, as j
                                line = image[n, c, uintp(h0 + i * dh)]
                                k0 = (c * kh + i) * kw
                                for j in range(kw):
                                    if adjoint:
                                        line[uintp(w0 + j * dw)] += row[uintp(k0 + j)]
                                    else:
                                        row[uintp(k0 + j)] = line[uintp(w0 + j * dw)]
                        continue
                    for c in range(c_in):  # a window reaching into the padding
                        for i in range(kh):
                            hy = h0 + i * dh
                            k0 = (c * kh + i) * kw
                            for j in range(kw):
                                wx = w0 + j * dw
                                inside = 0 <= hy < h and 0 <= wx < w
                                if adjoint:
                                    if inside:
                                        image[n, c, hy, wx] += row[k0 + j]
                                else:
                                    row[k0 + j] = image[n, c, hy, wx] if inside else 0.0

    return kernel


def _make_hwc(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int,
              adjoint: bool) -> Any:
    """The row layout with each row's entries ordered (i, j, c): each image is copied into a
    padded (H, W, C) plane, and a row is kh·kw copies of C consecutive values (no window
    clipping: the padding is in the plane). im2col on cifar10_quick's conv2 (5 images, 32
    channels, pad 2) 0.37 -> 0.19 ms and col2im 0.34 -> 0.16 ms against the (c, i, j) rows,
    whose copies are kw values long (slower on LeNet's conv2, 20 channels 5x5: Convolution
    picks the order). col2im sums each pixel's entries in row order, as the (c, i, j) kernel
    does: the same bits."""
    @njit(nogil=True, cache=True)
    def kernel(image: Any, cols: Any, oh: int, ow: int) -> None:
        n_img, c_in, h, w = image.shape
        plane = np.zeros((h + 2 * ph, w + 2 * pw, c_in), image.dtype)
        for n in range(n_img):
            if adjoint:
                plane[:, :, :] = 0.0
            else:
                for c in range(c_in):
                    for y in range(h):
                        line = image[n, c, y]
                        for xx in range(w):
                            plane[y + ph, xx + pw, c] = line[xx]
            for y in range(oh):
                for xx in range(ow):
                    row = cols[(n * oh + y) * ow + xx]
                    for i in range(kh):  # unrolled, as j
                        for j in range(kw):
                            pixel = plane[y * sh + i * dh, xx * sw + j * dw]
                            k0 = (i * kw + j) * c_in
                            for c in range(c_in):
                                if adjoint:
                                    pixel[uintp(c)] += row[uintp(k0 + c)]
                                else:
                                    row[uintp(k0 + c)] = pixel[uintp(c)]
            if adjoint:
                for c in range(c_in):
                    for y in range(h):
                        line = image[n, c, y]
                        for xx in range(w):
                            line[xx] = plane[y + ph, xx + pw, c]

    return kernel


def _make_images(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int,
                 adjoint: bool) -> Any:
    """Caffe's per-image layout (N, C·kh·kw, oh·ow): each column row is a strided copy of an
    image row (contiguous at stride 1), which LLVM vectorizes."""
    @njit(nogil=True, cache=True)
    def kernel(image: Any, cols: Any, oh: int, ow: int, x_lo: int, x_hi: int) -> None:
        n_img, c_in, h, w = image.shape
        for n in range(n_img):
            if adjoint:
                image[n] = 0.0
            for c in range(c_in):
                for i in range(kh):
                    for j in range(kw):
                        col = cols[n, (c * kh + i) * kw + j]
                        shift = j * dw - pw
                        for y in range(oh):
                            hy = y * sh - ph + i * dh
                            base = y * ow
                            if hy < 0 or hy >= h:  # a row of padding
                                if not adjoint:
                                    for xx in range(ow):
                                        col[base + xx] = 0.0
                                continue
                            line = image[n, c, hy]
                            for xx in range(x_lo, x_hi):
                                if adjoint:
                                    line[uintp(xx * sw + shift)] += col[uintp(base + xx)]
                                else:
                                    col[uintp(base + xx)] = line[uintp(xx * sw + shift)]
                            for t in range(ow - x_hi + x_lo):  # the border, left then right
                                xx = t if t < x_lo else t + x_hi - x_lo
                                wx = xx * sw + shift
                                inside = 0 <= wx < w
                                if adjoint:
                                    if inside:
                                        line[wx] += col[base + xx]
                                else:
                                    col[base + xx] = line[wx] if inside else 0.0

    return kernel


def _make_shifted(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int,
                  adjoint: bool) -> Any:
    """The row-shift layout (N, C·kw, rows·ow), rows = H + 2·ph: entry (c·kw + j, y·ow + x)
    holds the padded image's pixel (y, x·sw + j·dw) (0 in the padding). Each padded input row
    appears once per j instead of once per (i, j): kh times fewer entries than Caffe's columns
    (conv_forward_shifted reads the kernel row i as the window shifted by i·dh·ow)."""
    @njit(nogil=True, cache=True)
    def kernel(image: Any, cols: Any, ow: int) -> None:
        n_img, c_in, h, w = image.shape
        rows = cols.shape[2] // ow
        for n in range(n_img):
            if adjoint:
                image[n] = 0.0
            for c in range(c_in):
                for j in range(kw):
                    col = cols[n, c * kw + j]
                    shift = j * dw - pw
                    lo = min(max(0, -(shift // sw)), ow)  # the x whose pixel is inside
                    hi = max(lo, min(ow, (w - 1 - shift) // sw + 1))
                    for y in range(rows):
                        hy = y - ph
                        base = y * ow
                        if hy < 0 or hy >= h:  # a row of padding
                            if not adjoint:
                                for xx in range(ow):
                                    col[uintp(base + xx)] = 0.0
                            continue
                        line = image[n, c, hy]
                        if not adjoint:
                            for xx in range(lo):
                                col[uintp(base + xx)] = 0.0
                            for xx in range(hi, ow):
                                col[uintp(base + xx)] = 0.0
                        for xx in range(lo, hi):
                            if adjoint:
                                line[uintp(xx * sw + shift)] += col[uintp(base + xx)]
                            else:
                                col[uintp(base + xx)] = line[uintp(xx * sw + shift)]

    return kernel


def _window_bounds(h: int, w: int, oh: int, ow: int,
                   geometry: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The output rows [y_lo, y_hi) and columns [x_lo, x_hi) whose windows lie inside."""
    kh, _, sh, _, ph, _, dh, _ = geometry
    return (*_interior(oh, h, dh * (kh - 1) + 1, sh, ph), *_column_bounds(w, ow, geometry))


def _column_bounds(w: int, ow: int, geometry: tuple[int, ...]) -> tuple[int, int]:
    _, kw, _, sw, _, pw, _, dw = geometry
    return _interior(ow, w, dw * (kw - 1) + 1, sw, pw)


def columns(image: np.ndarray, cols: np.ndarray, geometry: tuple[int, ...], oh: int, ow: int,
            layout: str, adjoint: bool) -> None:
    """im2col: ``image`` (N, C, H, W) -> ``cols``; adjoint (col2im): ``cols`` summed back over
    ``image``. ``cols`` is (N·oh·ow, C·kh·kw) for layout "rows" (entries c, i, j) and "hwc"
    (entries i, j, c), (N, C·kh·kw, oh·ow) for "images"; geometry = (kh, kw, sh, sw, ph, pw,
    dh, dw). The array read is made contiguous."""
    if adjoint:
        cols = np.ascontiguousarray(cols)
    else:
        image = np.ascontiguousarray(image)
    h, w = image.shape[2:]
    if layout == "rows":
        bounds: tuple[int, ...] = _window_bounds(h, w, oh, ow, geometry)
    elif layout == "images":
        bounds = _column_bounds(w, ow, geometry)
    else:
        bounds = ()
    if layout == "shifted":
        _kernel(("col2im_" if adjoint else "im2col_") + layout, geometry)(image, cols, ow)
        return
    _kernel(("col2im_" if adjoint else "im2col_") + layout, geometry)(image, cols, oh, ow,
                                                                      *bounds)


# -- pooling forward ---------------------------------------------------------------------------

# Windows that reach past the input (Caffe's CEIL rounding leaves the last row and column of
# windows hanging over the bottom and right edges, as in every 3x3 stride-2 pooling of an even
# size; padding does the same on all sides) would take the clipped path, with run-time bounds
# per window. Instead each plane is copied into a scratch plane that has room for every window
# and holds the neutral value outside the input (-inf for MAX, 0 for AVE), and every window
# takes the unrolled path: the same values compared or summed in the same order, so the same
# bits (AVE adds +0.0 for the cells outside). AVE always does this, so its kernels have no
# clipped path at all (backward on 24x24 2x2 planes 0.32 -> 0.13 ms as well, without the
# per-window test the unpadded loop had). MAX does this only without padding, where a
# window's first cell is always inside (its first valid value starts the comparison, as in the
# clipped path), and only when no window lies wholly outside the input (those give -FLT_MAX
# and no argmax). One core, 50 images, 32 channels: 3x3 stride-2 MAX on 32x32 1.61 -> 1.14 ms,
# on 16x16 0.58 -> 0.34 ms; AVE on 16x16 0.53 -> 0.40 ms, on 8x8 (64 channels) 0.34 -> 0.24 ms.

if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _padded_plane(plane: Any, scratch: Any, ph: int, pw: int) -> Any:
        """``plane`` copied into ``scratch`` at (ph, pw); the rest of scratch is untouched."""
        h, w = plane.shape
        rows, cols = min(h, scratch.shape[0] - ph), min(w, scratch.shape[1] - pw)
        for y in range(rows):
            src, dst = plane[y], scratch[y + ph]
            for xx in range(cols):
                dst[uintp(xx + pw)] = src[uintp(xx)]
        return scratch


def _make_max_pool_image(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                         with_arg: bool) -> Any:
    """MAX pooling of one image (the pooling kernels' and the fused convolutions' step)."""
    @njit(nogil=True, cache=True, inline="always")
    def clipped(p: Any, y: int, xx: int, h: int, w: int) -> tuple[Any, int]:
        h0, w0 = y * sh - ph, xx * sw - pw
        hs, he, ws, we = max(h0, 0), min(h0 + kh, h), max(w0, 0), min(w0 + kw, w)
        if hs >= he or ws >= we:
            return p.dtype.type(-3.4028234663852886e38), -1
        m, a = p[hs, ws], (hs - h0) * kw + (ws - w0)
        for hy in range(hs, he):
            for wx in range(ws, we):
                v = p[hy, wx]
                if v > m:
                    m, a = v, (hy - h0) * kw + (wx - w0)
        return m, a

    @njit(nogil=True, cache=True, inline="always")
    def window(p: Any, y0: int, x0: int) -> tuple[Any, int]:
        m, k = p[y0, x0], 0
        for i in range(kh):  # constant trip counts: unrolled
            for j in range(kw):
                v = p[y0 + i, x0 + j]
                up = v > m  # strict: the first of equal values wins
                k = i * kw + j if up else k
                m = v if up else m
        return m, k

    @njit(nogil=True, cache=True, inline="always")
    def block(p: Any, best: Any, arg: Any, rows: int, cols: int) -> None:
        """The windows from (0, 0) to (rows, cols) of plane p, all inside it: loops from 0
        with no test in them, which LLVM vectorizes (a per-row or per-column test, or a loop
        from a run-time start, made it 2-5x slower)."""
        for y in range(rows):
            b, a = best[y], arg[y] if with_arg else arg[0]
            for xx in range(cols):
                m, k = window(p, y * sh, xx * sw)
                b[xx] = m
                if with_arg:
                    a[xx] = k

    @njit(nogil=True, cache=True)
    def image(x: Any, best: Any, arg: Any, y_lo: int, y_hi: int, x_lo: int, x_hi: int,
              overhang: bool, scratch: Any) -> None:
        """One image: x (C, H, W) -> best, arg (C, oh, ow); ``arg`` is (1, 1, 1) without
        the argmax, ``scratch`` a plane with room for every window (see _padded_plane)
        when ``overhang``."""
        c_in, h, w = x.shape
        oh, ow = best.shape[1], best.shape[2]
        for c in range(c_in):
            p = x[c]
            if overhang:
                block(_padded_plane(p, scratch, 0, 0), best[c], arg[c] if with_arg else arg[0],
                      oh, ow)
            elif ph == 0 and pw == 0:
                block(p, best[c], arg[c] if with_arg else arg[0], y_hi, x_hi)
                for y in range(oh):  # the CEIL overhang: bottom rows, right columns
                    for xx in range(x_hi if y < y_hi else 0, ow):
                        m, k = clipped(p, y, xx, h, w)
                        best[c, y, xx] = m
                        if with_arg:
                            arg[c, y, xx] = k
            else:
                for y in range(oh):
                    b, a = best[c, y], arg[c, y] if with_arg else arg[0, 0]
                    inside = y_lo <= y < y_hi
                    for xx in range(ow):
                        if inside and x_lo <= xx < x_hi:
                            m, k = window(p, y * sh - ph, xx * sw - pw)
                        else:
                            m, k = clipped(p, y, xx, h, w)
                        b[xx] = m
                        if with_arg:
                            a[xx] = k

    return image


def _make_max_pool(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                   with_arg: bool) -> Any:
    image = _kernel("max_image" if with_arg else "max_values_image", (kh, kw, sh, sw, ph, pw))

    @njit(nogil=True, cache=True)
    def kernel(x: Any, best: Any, arg: Any, y_lo: int, y_hi: int, x_lo: int,
               x_hi: int, overhang: bool, scratch: Any, claim: Any, flags: Any,
               post: int) -> None:
        _start_helpers(flags, post)
        own = _claim_part(claim)
        while True:
            n = _next_item(claim, own)
            if n < 0:
                break
            image(x[n], best[n], arg[n] if with_arg else arg[0], y_lo, y_hi, x_lo, x_hi,
                  overhang, scratch)

    return kernel


def _make_ave_pool(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    @njit(nogil=True, cache=True, inline="always")
    def window(p: Any, y0: int, x0: int) -> float:
        s = 0.0
        for i in range(kh):  # constant trip counts: unrolled
            for j in range(kw):
                s += p[y0 + i, x0 + j]
        return s

    @njit(nogil=True, cache=True, inline="always")
    def block(p: Any, out: Any, size: Any) -> None:
        """Every window of plane p, all inside it: branch-free loops, as in MAX."""
        for y in range(out.shape[0]):
            o, sz = out[y], size[y]
            for xx in range(out.shape[1]):
                o[xx] = window(p, y * sh, xx * sw) / sz[xx]

    @njit(nogil=True, cache=True)
    def kernel(x: Any, out: Any, size: Any, padded: bool, claim: Any, flags: Any,
               post: int) -> None:
        _start_helpers(flags, post)
        c_in = x.shape[1]
        oh, ow = out.shape[2], out.shape[3]
        if padded:  # see _padded_plane
            scratch = np.zeros(((oh - 1) * sh + kh, (ow - 1) * sw + kw), x.dtype)
            own = _claim_part(claim)
            while True:
                n = _next_item(claim, own)
                if n < 0:
                    break
                for c in range(c_in):
                    block(_padded_plane(x[n, c], scratch, ph, pw), out[n, c], size)
            return
        own = _claim_part(claim)
        while True:  # no padding, no window past the edge
            n = _next_item(claim, own)
            if n < 0:
                break
            for c in range(c_in):
                block(x[n, c], out[n, c], size)

    return kernel


def _make_max_pool_backward_image(kh: int, kw: int, sh: int, sw: int, ph: int,
                                  pw: int) -> Any:
    @njit(nogil=True, cache=True)
    def image(dy: Any, arg: Any, dx: Any) -> None:
        """One image: dx (C, H, W) = dy (C, oh, ow) routed to each window's argmax."""
        oh, ow = dy.shape[1], dy.shape[2]
        for c in range(dx.shape[0]):
            d = dx[c]
            d[:, :] = 0.0
            for y in range(oh):
                g, a = dy[c, y], arg[c, y]
                for xx in range(ow):
                    k = a[xx]
                    if k >= 0:  # kw is a constant: // and % are cheap
                        d[y * sh - ph + k // kw, xx * sw - pw + k % kw] += g[xx]

    return image


def _make_max_pool_backward(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    image = _kernel("max_backward_image", (kh, kw, sh, sw, ph, pw))

    @njit(nogil=True, cache=True)
    def kernel(dy: Any, arg: Any, dx: Any, claim: Any, flags: Any, post: int) -> None:
        _start_helpers(flags, post)
        own = _claim_part(claim)
        while True:
            n = _next_item(claim, own)
            if n < 0:
                break
            image(dy[n], arg[n], dx[n])

    return kernel


def _make_ave_pool_backward(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Any:
    @njit(nogil=True, cache=True, inline="always")
    def spread(d: Any, dy: Any, size: Any) -> None:
        """Each dy / size added over its window of plane d, which holds every window."""
        for y in range(dy.shape[0]):
            for xx in range(dy.shape[1]):
                g = dy[y, xx] / size[y, xx]
                for i in range(kh):  # unrolled
                    for j in range(kw):
                        d[y * sh + i, xx * sw + j] += g

    @njit(nogil=True, cache=True)
    def kernel(dy: Any, dx: Any, size: Any, padded: bool, claim: Any, flags: Any,
               post: int) -> None:
        _start_helpers(flags, post)
        c_in, h, w = dx.shape[1:]
        oh, ow = dy.shape[2], dy.shape[3]
        if padded:  # the same sums in the same order, into a plane with room for every window
            scratch = np.empty(((oh - 1) * sh + kh, (ow - 1) * sw + kw), dx.dtype)
            rows, cols = min(h, scratch.shape[0] - ph), min(w, scratch.shape[1] - pw)
            own = _claim_part(claim)
            while True:
                n = _next_item(claim, own)
                if n < 0:
                    break
                for c in range(c_in):
                    scratch[:, :] = 0.0
                    spread(scratch, dy[n, c], size)
                    d = dx[n, c]
                    for y in range(rows):
                        src, dst = scratch[y + ph], d[y]
                        for xx in range(cols):
                            dst[uintp(xx)] = src[uintp(xx + pw)]
                        for xx in range(cols, w):  # columns no window reaches (FLOOR)
                            dst[xx] = 0.0
                    for y in range(rows, h):
                        d[y, :] = 0.0
            return
        own = _claim_part(claim)
        while True:  # no padding, no window past the edge
            n = _next_item(claim, own)
            if n < 0:
                break
            for c in range(c_in):
                d = dx[n, c]
                d[:, :] = 0.0
                spread(d, dy[n, c], size)

    return kernel


# -- the layout changes around a row-layout GEMM ---------------------------------------------------
#
# A convolution's GEMM on row-layout columns gives (N·P, C) rows; the blob is (N, C, P). NumPy's
# transposed copy (with the bias added) walks the rows with a stride of C elements: LeNet's conv2
# (50 images) 106 µs; this loop writes each output channel's pixels in order, 55 µs. In-process
# A/B: LeNet's train step 0.3 ms faster (of ~10.5), its inference 0.17 ms (of ~5.7), a
# cifar10_quick step 3 ms (of ~78).

def _make_rows_to_images(with_bias: bool) -> Any:
    @njit(nogil=True, cache=True)
    def kernel(rows: Any, bias: Any, out: Any) -> None:
        n_img, c, p = out.shape
        for n in range(n_img):
            base = n * p
            for o in range(c):
                b, dst = bias[o], out[n, o]
                for q in range(p):
                    v = rows[uintp(base + q), uintp(o)]
                    dst[uintp(q)] = v + b if with_bias else v

    return kernel


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _images_to_rows(images: Any, out: Any) -> None:
        n_img, c, p = images.shape
        for n in range(n_img):
            base = n * p
            for q in range(p):
                row = out[uintp(base + q)]
                for o in range(c):
                    row[uintp(o)] = images[uintp(n), uintp(o), uintp(q)]


def rows_to_images(rows: np.ndarray, bias: np.ndarray | None, out: np.ndarray) -> None:
    """out (N, C, P) = rows (N·P, C) per image transposed (+ bias per channel); contiguous."""
    kernel = _kernel("rows_to_images", (bias is not None,))
    kernel(rows, rows[0] if bias is None else bias, out)


def images_to_rows(images: np.ndarray, out: np.ndarray) -> None:
    """out (N·P, C) = images (N, C, P) per image transposed; contiguous arrays."""
    _images_to_rows(images, out)


# -- a convolution's forward, fused per block of images ------------------------------------------
#
# im2col, the GEMM (OpenBLAS's, called from here: blas.py) and the layout change (or bias) for a
# few images at a time, so each block's columns are read by the GEMM while they are still in
# the core's cache, and the whole part is one GIL-free call. The same operations on the same
# values as the unfused path (columns, then C = cols · W with beta 0, then the bias added): per
# image the same bits; OpenBLAS may round a GEMM over a block's rows differently in the last
# bit from one over the whole part's.

# Work shared by concurrent calls (Backend.shares_work): the items (images) are cut into parts
# and each call owns the next part not yet handed out, taking its items from the front; a call
# whose part has none left takes items from the back of another's, so a worker that started late
# or runs slower does fewer while each works mostly on its own part's data. A work array (int64,
# fields a cache line apart) holds CLAIMS, the count of parts handed out; PARTS, their number;
# and from RANGES on, each part's (first item left << 32 | end), changed by compare-and-swap.
CLAIMS, PARTS, RANGES = 0, 8, 16


def work_counter(parts: list[slice]) -> np.ndarray:
    """The work array for ``parts`` (slices of at most 2³¹ items), none taken yet."""
    work = np.zeros(RANGES + 8 * len(parts), np.int64)
    work[PARTS] = len(parts)
    for k, part in enumerate(parts):
        work[RANGES + 8 * k] = (part.start << 32) | part.stop
    return work


# (flags, n): a fused kernel stores n in flags[0] as it starts, without the GIL, when n > 0
# (BatchPool.take_post: the caller's kernel starting the other workers of a deferred job)
NO_POST = (np.zeros(1, np.int64), 0)

if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _start_helpers(flags: Any, post: int) -> None:
        if post:
            _store_release(flags, 0, post)

    @njit(nogil=True, cache=True)
    def _gemm_call(gemm: Any, trans_a: int, trans_b: int, m: int, n: int, k: int, alpha: Any,
                   a: Any, lda: int, b: Any, ldb: int, beta: Any, c: Any, ldc: int, flags: Any,
                   post: int) -> None:
        _start_helpers(flags, post)
        gemm(ROW_MAJOR, trans_a, trans_b, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data,
             ldb, beta, c.ctypes.data, ldc)


def _operand(a: np.ndarray) -> tuple[int, int] | None:
    """(CBLAS transpose flag, leading dimension) of a 2-D array whose rows or columns are
    contiguous, or None."""
    step = a.itemsize
    if a.strides[1] == step and a.strides[0] % step == 0 and a.strides[0] >= a.shape[1] * step:
        return NO_TRANS, a.strides[0] // step
    if a.strides[0] == step and a.strides[1] % step == 0 and a.strides[1] >= a.shape[0] * step:
        return TRANS, a.strides[1] // step
    return None


def gemm(gemm: Any, a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool,
         post: tuple[np.ndarray, int] = NO_POST) -> bool:
    """out (M, N) = a (M, K) · b (K, N) (+ out with ``accumulate``) through CBLAS's GEMM,
    from a compiled call that first stores ``post``; 2-D arrays of one dtype whose rows or
    columns are contiguous (out's rows). False, having done nothing, for other arrays."""
    ta, tb, tc = _operand(a), _operand(b), _operand(out)
    if ta is None or tb is None or tc is None or tc[0] != NO_TRANS:
        return False
    # alpha and beta in the arrays' dtype, the GEMM's own: when this call passed addresses
    # instead of arrays, Python floats here left numba nothing to tell the sgemm and dgemm
    # calls apart by, and it ran an sgemm call through the code compiled for dgemm (wrong
    # products; the arrays' types now tell them apart as well)
    real = out.dtype.type
    _gemm_call(gemm, ta[0], tb[0], out.shape[0], out.shape[1], a.shape[1], real(1.0), a, ta[1],
               b, tb[1], real(1.0 if accumulate else 0.0), out, tc[1], *post)
    return True


def _make_conv_images(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
                      dw: int) -> Any:
    """Per image: cols[n] = im2col(x[n]) (K, P); y[n] (O, P) = w (O, K) · cols[n] (+ bias).
    ``cols`` holds every image's columns (N, K, P) or one image's (1, K, P) as scratch."""
    im2col = _kernel("im2col_images", (kh, kw, sh, sw, ph, pw, dh, dw))

    @njit(nogil=True, cache=True)
    def kernel(gemm: Any, x: Any, w: Any, bias: Any, with_bias: bool, y: Any, cols: Any,
               oh: int, ow: int, x_lo: int, x_hi: int, flags: Any, post: int) -> None:
        _start_helpers(flags, post)
        n_img = x.shape[0]
        o_n, k = w.shape
        p = oh * ow
        one, zero = w.dtype.type(1.0), w.dtype.type(0.0)
        for n in range(n_img):
            col = cols[n:n + 1] if cols.shape[0] == n_img else cols[0:1]
            im2col(x[n:n + 1], col, oh, ow, x_lo, x_hi)
            out = y[n]
            gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, o_n, p, k, one, w.ctypes.data, k,
                 col.ctypes.data, p, zero, out.ctypes.data, p)
            if with_bias:
                for o in range(o_n):
                    b, line = bias[o], out[o]
                    for q in range(p):
                        line[q] += b

    return kernel


def _make_row_columns(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int,
                      channels_last: bool) -> Any:
    """im2col (or with ``back`` col2im) in the row layout, entries (i, j, c) or (c, i, j): one
    signature for both, for the fused kernels."""
    geometry = (kh, kw, sh, sw, ph, pw, dh, dw)
    name = "hwc" if channels_last else "rows"
    forward, adjoint = _kernel("im2col_" + name, geometry), _kernel("col2im_" + name, geometry)

    @njit(nogil=True, cache=True)
    def columns(image: Any, cols: Any, oh: int, ow: int, bounds: Any, back: bool) -> None:
        if channels_last:  # a constant: numba drops the other branch
            if back:
                adjoint(image, cols, oh, ow)
            else:
                forward(image, cols, oh, ow)
        elif back:
            adjoint(image, cols, oh, ow, bounds[0], bounds[1], bounds[2], bounds[3])
        else:
            forward(image, cols, oh, ow, bounds[0], bounds[1], bounds[2], bounds[3])

    return columns


def _make_conv_rows(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int,
                    channels_last: bool) -> Any:
    """Per block of images: cols = im2col rows of x[block] (block·P, K); rows = cols · wt
    (block·P, O); y[block] (O, P per image) = rows transposed (+ bias). ``cols`` holds every
    image's rows (N·P, K) or one block's as scratch; ``rows`` one block's."""
    columns = _kernel("row_columns", (kh, kw, sh, sw, ph, pw, dh, dw, channels_last))
    with_bias, without = _kernel("rows_to_images", (True,)), _kernel("rows_to_images", (False,))

    @njit(nogil=True, cache=True)
    def kernel(gemm: Any, x: Any, wt: Any, bias: Any, has_bias: bool, y: Any, cols: Any,
               rows: Any, block: int, oh: int, ow: int, bounds: Any, flags: Any,
               post: int) -> None:
        _start_helpers(flags, post)
        n_img = x.shape[0]
        k, o_n = wt.shape
        p = oh * ow
        one, zero = wt.dtype.type(1.0), wt.dtype.type(0.0)
        for n0 in range(0, n_img, block):
            n1 = min(n0 + block, n_img)
            at = n0 * p if cols.shape[0] == n_img * p else 0
            col = cols[at:at + (n1 - n0) * p]
            out = rows[:(n1 - n0) * p]
            columns(x[n0:n1], col, oh, ow, bounds, False)
            gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, (n1 - n0) * p, o_n, k, one, col.ctypes.data,
                 k, wt.ctypes.data, o_n, zero, out.ctypes.data, o_n)
            if has_bias:
                with_bias(out, bias, y[n0:n1])
            else:
                without(out, bias, y[n0:n1])

    return kernel


def _make_conv_rows_backward(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
                             dw: int, channels_last: bool) -> Any:
    """Per block of images: rows = dy[block] as rows (block·P, O); dW (O, K) += rowsᵀ · cols
    (the block's im2col rows, kept from forward or made again here); with ``down``, cols =
    rows · W and dx[block] = col2im(cols). ``cols`` holds every image's rows (kept) or one
    block's (scratch, with ``recompute``)."""
    columns = _kernel("row_columns", (kh, kw, sh, sw, ph, pw, dh, dw, channels_last))

    @njit(nogil=True, cache=True)
    def kernel(gemm: Any, x: Any, dy: Any, w: Any, dw: Any, dx: Any, down: bool, cols: Any,
               rows: Any, recompute: bool, block: int, oh: int, ow: int, bounds: Any,
               flags: Any, post: int) -> None:
        _start_helpers(flags, post)
        n_img = dy.shape[0]
        o_n, k = w.shape
        p = oh * ow
        one, zero = w.dtype.type(1.0), w.dtype.type(0.0)
        for n0 in range(0, n_img, block):
            n1 = min(n0 + block, n_img)
            m = (n1 - n0) * p
            at = 0 if recompute else n0 * p
            col, r = cols[at:at + m], rows[:m]
            if recompute:
                columns(x[n0:n1], col, oh, ow, bounds, False)
            _images_to_rows(dy[n0:n1], r)
            gemm(ROW_MAJOR, TRANS, NO_TRANS, o_n, k, m, one, r.ctypes.data, o_n,
                 col.ctypes.data, k, zero if n0 == 0 else one, dw.ctypes.data, k)
            if down:  # the block's columns are used up: they take the column gradient
                gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m, k, o_n, one, r.ctypes.data, o_n,
                     w.ctypes.data, k, zero, col.ctypes.data, k)
                columns(dx[n0:n1], col, oh, ow, bounds, True)

    return kernel


def _make_conv_images_backward(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
                               dw: int) -> Any:
    """Per image: dW (O, K) += dy[n] (O, P) · cols[n]ᵀ, cols[n] kept from forward or made
    again here; with ``down``, cols[n] = wᵀ · dy[n] and dx[n] = col2im(cols[n]). In-process
    A/B against NumPy's batched products: cifar10_quick's step -2.0 ms (7 of 10 rounds), LeNet's
    -0.1 ms (10 of 16), and no (N, K, O) temporary."""
    geometry = (kh, kw, sh, sw, ph, pw, dh, dw)
    forward, adjoint = _kernel("im2col_images", geometry), _kernel("col2im_images", geometry)

    @njit(nogil=True, cache=True)
    def kernel(gemm: Any, x: Any, dy: Any, w: Any, dw: Any, dx: Any, down: bool, cols: Any,
               recompute: bool, oh: int, ow: int, x_lo: int, x_hi: int, flags: Any,
               post: int) -> None:
        _start_helpers(flags, post)
        n_img = dy.shape[0]
        o_n, k = w.shape
        p = oh * ow
        one, zero = w.dtype.type(1.0), w.dtype.type(0.0)
        # dWᵀ (K, O) += colsₙ · dyₙᵀ: the large operand untransposed reads faster (as in
        # Backend.conv_backward_images)
        acc = np.empty((k, o_n), w.dtype)
        for n in range(n_img):
            col = cols[0:1] if recompute else cols[n:n + 1]
            if recompute:
                forward(x[n:n + 1], col, oh, ow, x_lo, x_hi)
            d = dy[n]
            gemm(ROW_MAJOR, NO_TRANS, TRANS, k, o_n, p, one, col.ctypes.data, p, d.ctypes.data, p,
                 zero if n == 0 else one, acc.ctypes.data, o_n)
            if down:  # the image's columns are used up: they take the column gradient
                gemm(ROW_MAJOR, TRANS, NO_TRANS, k, p, o_n, one, w.ctypes.data, k, d.ctypes.data, p,
                     zero, col.ctypes.data, p)
                adjoint(dx[n:n + 1], col, oh, ow, x_lo, x_hi)
        for o in range(o_n):
            for j in range(k):
                dw[o, j] = acc[j, o]

    return kernel


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _rows_by_kernel_row(w: Any) -> Any:
        """W (O, C, kh, kw) as (kh, O, C·kw): kernel row i's weights in the row-shift columns'
        (c, j) order (made by each part's call: no Python work before the workers start)."""
        o_n, c_in, kh, kw = w.shape
        wk = np.empty((kh, o_n, c_in * kw), w.dtype)
        for i in range(kh):
            for o in range(o_n):
                for c in range(c_in):
                    for j in range(kw):
                        wk[i, o, c * kw + j] = w[o, c, i, j]
        return wk

    @njit(nogil=True, cache=True)
    def _channel_sums(dy: Any, db: Any) -> None:
        """db (O,) = Σ over images and pixels of dy (N, O, P): summed over the images pixel by
        pixel first (vectorized: one add per element, not a chain of them), then 16 running
        sums over each channel's pixels, added up at the end. (Running sums per image ran at
        about one add per cycle: LeNet's conv1, 32 images, 100 µs of a 320 µs backward.)"""
        n_img, o_n, p = dy.shape
        pixels = np.zeros((o_n, p), dy.dtype)
        for n in range(n_img):
            for o in range(o_n):
                line, acc = dy[n, o], pixels[o]
                for q in range(p):
                    acc[uintp(q)] += line[uintp(q)]
        lanes = np.zeros((o_n, 16), dy.dtype)
        head = p - p % 16
        for o in range(o_n):
            line, acc = pixels[o], lanes[o]
            for q0 in range(0, head, 16):
                for lane in range(16):
                    acc[uintp(lane)] += line[uintp(q0 + lane)]
            for q in range(head, p):
                acc[0] += line[q]
        for o in range(o_n):
            total = lanes.dtype.type(0.0)
            for lane in range(16):
                total += lanes[o, lane]
            db[o] = total


# A row-shift convolution with at most FULL_COLUMNS_MAX inputs per output (C·kh·kw) copies its
# kh windows into Caffe's full columns and makes each image's output in one GEMM, the bias
# folded in (FULL_COLUMNS False: never). With K = C·kw = 5 (LeNet's conv1) the kh GEMMs each
# read and write the whole output for 5 products per element, and OpenBLAS ran one GEMM with
# K = 26 faster, the copies included (32 images on one core: 260 -> 206 µs). With more inputs
# the copies cost more than they save (cifar10_quick's conv1, 75 inputs: 2.7 -> 3.4 ms;
# LeNet's conv2, 500: 0.90 -> 1.20 ms).
FULL_COLUMNS, FULL_COLUMNS_MAX = True, 32

if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _full_operands(w: Any, bias: Any, with_bias: bool, p: int) -> tuple[Any, Any]:
        """For a call that makes full columns (p > 0): W (O, C, kh, kw) as (O, C·kh·kw)
        with the bias as one more column (``with_bias``), and scratch for one image's full
        columns (C·kh·kw (+ 1), p) whose extra last row holds ones; empty arrays otherwise."""
        o_n = w.shape[0]
        k = w.size // o_n if p > 0 else 0
        extra = 1 if with_bias and p > 0 else 0
        wb = np.empty((o_n if p > 0 else 0, k + extra), w.dtype)
        flat = w.reshape((o_n, w.size // o_n))
        for o in range(wb.shape[0]):
            for q in range(k):
                wb[o, q] = flat[o, q]
            if extra:
                wb[o, k] = bias[o]
        fc = np.empty((k + extra, p), w.dtype)
        if extra:
            for q in range(p):
                fc[k, q] = 1.0
        return wb, fc

    @njit(nogil=True, cache=True)
    def _full_columns(col: Any, fc: Any, kh: int, kw: int, step: int, p: int) -> None:
        """fc's row (c, i, j) = window i (``step`` elements on per kernel row) of row-shift
        column row (c, j) of one image's col (C·kw, rows·ow): Caffe's im2col columns."""
        for r in range(col.shape[0]):
            c, j = r // kw, r % kw
            line = col[r]
            for i in range(kh):
                src, dst = line[i * step:i * step + p], fc[(c * kh + i) * kw + j]
                for q in range(p):
                    dst[q] = src[q]

    @njit(nogil=True, cache=True)
    def _no_pooling(x: Any, best: Any, arg: Any, y_lo: int, y_hi: int, x_lo: int, x_hi: int,
                    overhang: bool, scratch: Any) -> None:
        """The per-image pooling step of a convolution that has none."""

    @njit(nogil=True, cache=True)
    def _no_unpooling(dy: Any, arg: Any, dx: Any) -> None:
        """The per-image pooling gradient of a convolution that has none."""


def _make_conv_shifted(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
                       dw: int, *pool: int, with_arg: bool = True) -> Any:
    """Per image: cols[n] = the row-shift columns of x[n] (C·kw, rows·ow); y[n] (O, P) =
    Σᵢ wk[i] (O, C·kw) · cols[n][:, i·dh·ow : i·dh·ow + P] (+ bias): kh GEMMs over windows of
    the same columns (stride 1 in height), wk = W by kernel row. ``cols`` holds every image's
    (N, C·kw, rows·ow) or one image's as scratch. With a ``pool`` geometry (kh, kw, sh, sw,
    ph, pw), each image's y[n], seen as (c1, h1, w1), is then MAX-pooled into pbest[n] (and its
    argmax into parg[n] ``with_arg``) while it is in cache; without, those arguments are
    unused. With ``full`` the kh windows are copied into Caffe's columns (C·kh·kw, P) with a
    row of ones under them and y[n] is one GEMM with the bias as the last column of the
    weights (see FULL_COLUMNS_MAX)."""
    im2col = _kernel("im2col_shifted", (kh, kw, sh, sw, ph, pw, dh, dw))
    pooled = bool(pool)
    pool_image = (_kernel("max_image" if with_arg else "max_values_image", pool) if pooled
                  else _no_pooling)

    @njit(nogil=True, cache=True)
    def kernel(gemm: Any, x: Any, w: Any, bias: Any, with_bias: bool, full: bool, y: Any,
               cols: Any, oh: int, ow: int, claim: Any, flags: Any, post: int, pbest: Any,
               parg: Any, c1: int, h1: int, w1: int, y_lo: int, y_hi: int, x_lo: int,
               x_hi: int, overhang: bool, pscratch: Any) -> None:
        _start_helpers(flags, post)
        wk = _rows_by_kernel_row(w)
        n_img = x.shape[0]
        o_n, ck = wk.shape[1], wk.shape[2]
        p, width = oh * ow, cols.shape[2]
        one, zero = wk.dtype.type(1.0), wk.dtype.type(0.0)
        wb, fc = _full_operands(w, bias, with_bias, p if full else 0)
        own = _claim_part(claim)
        while True:
            n = _next_item(claim, own)
            if n < 0:
                break
            col = cols[n:n + 1] if cols.shape[0] == n_img else cols[0:1]
            im2col(x[n:n + 1], col, ow)
            out = y[n]
            if full:
                _full_columns(col[0], fc, kh, kw, dh * ow, p)
                gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, o_n, p, fc.shape[0], one, wb.ctypes.data,
                     fc.shape[0], fc.ctypes.data, p, zero, out.ctypes.data, p)
            for i in range(0 if full else kh):
                gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, o_n, p, ck, one, wk[i].ctypes.data, ck,
                     col.ctypes.data + i * dh * ow * col.itemsize, width,
                     zero if i == 0 else one, out.ctypes.data, p)
            if with_bias and not full:
                for o in range(o_n):
                    b, line = bias[o], out[o]
                    for q in range(p):
                        line[q] += b
            if pooled:
                pool_image(out.reshape((c1, h1, w1)), pbest[n], parg[n] if with_arg else parg[0],
                           y_lo, y_hi, x_lo, x_hi, overhang, pscratch)

    return kernel


if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _column_gradient(gemm: Any, wk: Any, d: Any, cols: Any, step: int, p: int) -> None:
        """cols (1, C·kw, rows·ow) = Σᵢ wk[i]ᵀ · d placed at window i (i·step bytes on), the
        rest 0: one image's row-shift column gradient for its top gradient d (O, P)."""
        kh, o_n, ck = wk.shape
        width = cols.shape[2]
        one = wk.dtype.type(1.0)
        for r in range(ck):
            line = cols[0, r]
            for q in range(width):
                line[q] = 0.0
        for i in range(kh):
            gemm(ROW_MAJOR, TRANS, NO_TRANS, ck, p, o_n, one, wk[i].ctypes.data, ck,
                 d.ctypes.data, p, one, cols.ctypes.data + i * step, width)


def _make_conv_shifted_backward(kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int,
                                dw: int, *pool: int) -> Any:
    """For each chunk c of images (bounds[c] to bounds[c + 1], the parts of the work array
    ``claim``) this call owns: dW's kernel row i (C·kw, O) = Σₙ window i of cols[n] · dy[n]ᵀ
    over the chunk, the columns kept from forward or made again here, written into dw[c] (O,
    C, kh, kw) in the blob's order, and with ``with_db`` db[c] = Σ dy per channel; with
    ``down``, each image's column gradient Σᵢ wk[i]ᵀ · dy[n] (at window i of the zeroed
    ``scratch``) and dx[n] = its col2im, for the images it takes: its chunks' from the front
    as it goes, then those left at the back of the others'. With a ``pool`` geometry (kh, kw,
    sh, sw, ph, pw) the top gradient comes from the MAX pooling that follows: dy[n], seen as
    (c1, h1, w1), is made from the pooling's top gradient pdy[n] and argmax parg[n] where it is
    first needed (by the chunk's owner, which writes it into dy; an image whose bottom gradient
    another call takes gets its own copy in ``own``); without, those arguments are unused."""
    geometry = (kh, kw, sh, sw, ph, pw, dh, dw)
    forward, adjoint = _kernel("im2col_shifted", geometry), _kernel("col2im_shifted", geometry)
    pooled = bool(pool)
    unpool = _kernel("max_backward_image", pool) if pooled else _no_unpooling

    @njit(nogil=True, cache=True)
    def kernel(gemm: Any, x: Any, dy: Any, w: Any, dw: Any, db: Any, with_db: bool, dx: Any,
               down: bool, cols: Any, recompute: bool, oh: int, ow: int, bounds: Any,
               claim: Any, scratch: Any, flags: Any, post: int, pdy: Any, parg: Any, c1: int,
               h1: int, w1: int, own: Any) -> None:
        _start_helpers(flags, post)
        wk = _rows_by_kernel_row(w)
        o_n, ck = wk.shape[1], wk.shape[2]
        p, width = oh * ow, cols.shape[2]
        one, zero = wk.dtype.type(1.0), wk.dtype.type(0.0)
        step = dh * ow * cols.itemsize
        acc = np.empty((kh, ck, o_n), wk.dtype)
        # With C·kw ≥ 32, dy[n] is transposed first: OpenBLAS runs these small products
        # (K = P) faster with both operands untransposed (one core, 50 images: LeNet's conv2
        # backward 4.9 -> 4.0 ms, cifar10_quick's conv3 8.5 -> 7.2), but not with few rows
        # (cifar10_quick's conv1, C·kw = 15: 7.8 -> 10.9 ms).
        d_t = np.empty((p if ck >= 32 else 0, o_n), wk.dtype)
        c_in = ck // kw
        while True:
            chunk = _claim_part(claim)
            if chunk < 0:
                break
            lo, hi = bounds[chunk], bounds[chunk + 1]
            if hi <= lo:
                acc[...] = 0.0
            for n in range(lo, hi):
                col = cols[0:1] if recompute else cols[n:n + 1]
                if recompute:
                    forward(x[n:n + 1], col, ow)
                d = dy[n]
                if pooled:
                    unpool(pdy[n], parg[n], d.reshape((c1, h1, w1)))
                if ck >= 32:
                    for q in range(p):
                        line = d_t[q]
                        for o in range(o_n):
                            line[uintp(o)] = d[uintp(o), uintp(q)]
                for i in range(kh):
                    if ck >= 32:
                        gemm(ROW_MAJOR, NO_TRANS, NO_TRANS, ck, o_n, p, one,
                             col.ctypes.data + i * step, width, d_t.ctypes.data, o_n,
                             zero if n == lo else one, acc[i].ctypes.data, o_n)
                    else:
                        gemm(ROW_MAJOR, NO_TRANS, TRANS, ck, o_n, p, one,
                             col.ctypes.data + i * step, width, d.ctypes.data, p,
                             zero if n == lo else one, acc[i].ctypes.data, o_n)
                # the image's bottom gradient, unless another call has begun taking this
                # chunk's: then this call, the one that holds them up, makes only the weight
                # gradient, which no other call can, and leaves the rest of them to it
                if down and _untouched(claim, chunk, hi) and _take(claim, chunk, False) == n:
                    _column_gradient(gemm, wk, d, scratch, step, p)
                    adjoint(dx[n:n + 1], scratch, ow)
            out = dw[chunk]
            for o in range(o_n):  # (i, (c, j), o) -> the blob's (o, c, i, j)
                for c in range(c_in):
                    for i in range(kh):
                        for j in range(kw):
                            out[o, c, i, j] = acc[i, c * kw + j, o]
            if with_db:
                _channel_sums(dy[lo:hi], db[chunk])
        while down:  # bottom gradients left in the other calls' chunks
            n = _take_stolen(claim, -1)
            if n < 0:
                break
            d = dy[n]
            if pooled:  # the owner may be writing dy[n] now: a copy of one's own
                d = own
                unpool(pdy[n], parg[n], d.reshape((c1, h1, w1)))
            _column_gradient(gemm, wk, d, scratch, step, p)
            adjoint(dx[n:n + 1], scratch, ow)

    return kernel


def conv_forward_shifted(gemm: Any, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                         y: np.ndarray, cols: np.ndarray, geometry: tuple[int, ...], oh: int,
                         ow: int, post: tuple[np.ndarray, int] = NO_POST,
                         claim: np.ndarray | None = None,
                         pool: tuple[Any, ...] | None = None) -> None:
    """y (N, O, P) = Σᵢ W's kernel row i · (window i of the row-shift columns of x[n])
    (+ bias) per image for W (O, C, kh, kw), the columns written into ``cols`` (N, C·kw,
    rows·ow) or (1, ...); contiguous arrays of one dtype. With ``claim`` (an int64 counter
    shared by concurrent calls, 0 before the first) only the images this call takes from
    it, one at a time. ``pool`` = (geometry, best, arg or None): each image's output is then
    MAX-pooled as max_pool(y, best, arg, geometry) would (``arg`` None: max_pool_values)."""
    conv_forward_shifted_call(gemm, x, w, bias, y, cols, geometry, oh, ow, pool)(post, claim)


def conv_forward_shifted_call(gemm: Any, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                              y: np.ndarray, cols: np.ndarray, geometry: tuple[int, ...],
                              oh: int, ow: int, pool: tuple[Any, ...] | None = None
                              ) -> Callable[[tuple[np.ndarray, int], np.ndarray | None], None]:
    """conv_forward_shifted's argument work (views, the pooling's bounds, the compiled kernel)
    done once: the returned call(post, claim) runs it on these arrays, on one thread at a
    time (a pooling with windows past the edge has scratch of its own in it)."""
    kind, pooled = "conv_shifted", NO_POOL
    if pool is not None:
        pool_geometry, best, arg = pool
        y4 = y.reshape(y.shape[0], y.shape[1], oh, ow)
        y4, best, *more = _stacked(y4, best, pool_geometry, *(() if arg is None else (arg,)))
        kind = "conv_shifted_max" if arg is not None else "conv_shifted_max_values"
        geometry = (*geometry, *pool_geometry)
        pooled = (best, more[0] if more else NO_ARG, *y4.shape[1:],
                  *_max_pool_args(y4, best, pool_geometry))
    full = FULL_COLUMNS and w[0].size <= FULL_COLUMNS_MAX
    kernel, n = _kernel(kind, geometry), x.shape[0]
    head = (gemm, x, w, w[0, 0, 0] if bias is None else bias, bias is not None, full, y, cols,
            oh, ow)

    def call(post: tuple[np.ndarray, int], claim: np.ndarray | None) -> None:
        kernel(*head, work_counter([slice(0, n)]) if claim is None else claim, *post, *pooled)

    return call


def conv_backward_shifted(gemm: Any, x: np.ndarray, dy: np.ndarray, w: np.ndarray,
                          dw: np.ndarray, db: np.ndarray | None, dx: np.ndarray | None,
                          cols: np.ndarray, recompute: bool, geometry: tuple[int, ...],
                          oh: int, ow: int, post: tuple[np.ndarray, int] = NO_POST,
                          bounds: np.ndarray | None = None, claim: np.ndarray | None = None,
                          scratch: np.ndarray | None = None,
                          pool: tuple[Any, ...] | None = None) -> None:
    """dw (O, C, kh, kw): row i = Σₙ dy[n] · (window i of colsₙ)ᵀ, db (unless None) = Σ dy
    per channel and, unless ``dx`` is None, dx = the row-shift col2im of Σᵢ (W's row i)ᵀ ·
    dy[n] placed at window i; ``cols`` holds the kept columns (N, C·kw, rows·ow) or is one
    image's scratch (``recompute``). Work shared by concurrent calls: ``bounds`` (int64,
    chunks + 1) splits the images into chunks whose dw[c] (chunks, O, C, kh, kw) and db[c]
    are made separately, ``claim`` is a counter array (work_counter()) from which each call
    takes chunks, then images for dx, and ``scratch`` holds one image's columns. ``pool`` =
    (geometry, pdy, arg): dy is the bottom gradient of the MAX pooling with top gradient pdy
    and argmax ``arg``, made here image by image (max_pool_backward's values) and written into
    ``dy``."""
    conv_backward_shifted_call(gemm, x, dy, w, dw, db, dx, cols, recompute, geometry, oh, ow,
                               bounds, scratch, pool)(post, claim)


def conv_backward_shifted_call(gemm: Any, x: np.ndarray, dy: np.ndarray, w: np.ndarray,
                               dw: np.ndarray, db: np.ndarray | None, dx: np.ndarray | None,
                               cols: np.ndarray, recompute: bool, geometry: tuple[int, ...],
                               oh: int, ow: int, bounds: np.ndarray | None = None,
                               scratch: np.ndarray | None = None,
                               pool: tuple[Any, ...] | None = None
                               ) -> Callable[[tuple[np.ndarray, int], np.ndarray | None], None]:
    """conv_backward_shifted's argument work done once: the returned call(post, claim) runs it
    on these arrays, on one thread at a time (``scratch``, and with ``pool`` the copy of an
    image's top gradient, are its own)."""
    if bounds is None:
        bounds = np.array([0, dy.shape[0]], np.int64)
        dw, db = dw[None], None if db is None else db[None]
    if scratch is None:
        scratch = np.empty((1, *cols.shape[1:]), cols.dtype)
    kind, unpooled = "conv_shifted_backward", (*NO_UNPOOL, np.zeros((1, 1), dy.dtype))
    if pool is not None:
        pool_geometry, pdy, arg = pool
        dy4, pdy, arg = _stacked(dy.reshape(dy.shape[0], dy.shape[1], oh, ow), pdy,
                                 pool_geometry, arg)
        kind, geometry = "conv_shifted_backward_max", (*geometry, *pool_geometry)
        unpooled = (pdy, arg, *dy4.shape[1:], np.empty(dy.shape[1:], dy.dtype))
    kernel, n = _kernel(kind, geometry), dy.shape[0]
    head = (gemm, x, dy, w, dw, dw[:, 0, 0, 0] if db is None else db, db is not None,
            x if dx is None else dx, dx is not None, cols, recompute, oh, ow, bounds)
    copy = not unpooled[0].flags.c_contiguous  # a pooling top gradient copied at each call

    def call(post: tuple[np.ndarray, int], claim: np.ndarray | None) -> None:
        tail = (np.ascontiguousarray(unpooled[0]), *unpooled[1:]) if copy else unpooled
        kernel(*head, work_counter([slice(0, n)]) if claim is None else claim, scratch, *post,
               *tail)

    return call


def conv_backward_images(gemm: Any, x: np.ndarray, dy: np.ndarray, w: np.ndarray,
                         dw: np.ndarray, dx: np.ndarray | None, cols: np.ndarray,
                         recompute: bool, geometry: tuple[int, ...], oh: int, ow: int,
                         post: tuple[np.ndarray, int] = NO_POST) -> None:
    """dW (O, K) = Σₙ dy[n] · colsₙᵀ and, unless ``dx`` is None, dx = col2im(wᵀ · dy[n]) per
    image, for dy (N, O, P); ``cols`` holds the kept columns (N, K, P) or is one image's
    scratch (``recompute``); contiguous arrays of one dtype."""
    _kernel("conv_images_backward", geometry)(
        gemm, x, dy, w, dw, x if dx is None else dx, dx is not None, cols, recompute, oh, ow,
        *_column_bounds(x.shape[3], ow, geometry), *post)


def conv_backward_rows(gemm: Any, x: np.ndarray, dy: np.ndarray, w: np.ndarray, dw: np.ndarray,
                       dx: np.ndarray | None, cols: np.ndarray, rows: np.ndarray,
                       recompute: bool, block: int, geometry: tuple[int, ...], oh: int,
                       ow: int, channels_last: bool,
                       post: tuple[np.ndarray, int] = NO_POST) -> None:
    """dW (O, K) = Σ rowsᵀ · cols and, unless ``dx`` is None, dx = col2im(rows · w), for dy
    (N, O, P) as rows, ``block`` images at a time; ``cols`` holds the kept im2col rows of x
    (N·P, K), or is block-sized scratch they are made in again (``recompute``); contiguous
    arrays of one dtype."""
    bounds = np.array(_window_bounds(x.shape[2], x.shape[3], oh, ow, geometry), np.int64)
    _kernel("conv_rows_backward", (*geometry, channels_last))(
        gemm, x, dy, w, dw, x if dx is None else dx, dx is not None, cols, rows, recompute,
        block, oh, ow, bounds, *post)


def conv_forward_images(gemm: Any, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                        y: np.ndarray, cols: np.ndarray, geometry: tuple[int, ...], oh: int,
                        ow: int, post: tuple[np.ndarray, int] = NO_POST) -> None:
    """y (N, O, P) = w (O, K) · im2col(x)ₙ (+ bias) per image, its columns written into
    ``cols`` (N, K, P) or (1, K, P); contiguous arrays of one dtype, ``gemm`` its CBLAS GEMM."""
    _kernel("conv_images", geometry)(gemm, x, w, w[0] if bias is None else bias,
                                     bias is not None, y, cols, oh, ow,
                                     *_column_bounds(x.shape[3], ow, geometry), *post)


def conv_forward_rows(gemm: Any, x: np.ndarray, wt: np.ndarray, bias: np.ndarray | None,
                      y: np.ndarray, cols: np.ndarray, rows: np.ndarray, block: int,
                      geometry: tuple[int, ...], oh: int, ow: int, channels_last: bool,
                      post: tuple[np.ndarray, int] = NO_POST) -> None:
    """y (N, O, P) = (im2col rows of x) · wt (K, O) (+ bias), ``block`` images at a time; the
    rows written into ``cols`` (N·P, K) or (block·P, K), the products into ``rows``
    (block·P, O); contiguous arrays of one dtype."""
    bounds = np.array(_window_bounds(x.shape[2], x.shape[3], oh, ow, geometry), np.int64)
    _kernel("conv_rows", (*geometry, channels_last))(
        gemm, x, wt, wt[0] if bias is None else bias, bias is not None, y, cols, rows, block,
        oh, ow, bounds, *post)


_FACTORIES: dict[str, Any] = {
    "conv_images": _make_conv_images,
    "row_columns": _make_row_columns,
    "conv_rows": _make_conv_rows,
    "conv_rows_backward": _make_conv_rows_backward,
    "conv_images_backward": _make_conv_images_backward,
    "rows_to_images": _make_rows_to_images,
    "im2col_rows": lambda *g: _make_rows(*g, adjoint=False),
    "col2im_rows": lambda *g: _make_rows(*g, adjoint=True),
    "im2col_hwc": lambda *g: _make_hwc(*g, adjoint=False),
    "col2im_hwc": lambda *g: _make_hwc(*g, adjoint=True),
    "im2col_images": lambda *g: _make_images(*g, adjoint=False),
    "col2im_images": lambda *g: _make_images(*g, adjoint=True),
    "im2col_shifted": lambda *g: _make_shifted(*g, adjoint=False),
    "col2im_shifted": lambda *g: _make_shifted(*g, adjoint=True),
    "conv_shifted": _make_conv_shifted,
    "conv_shifted_max": _make_conv_shifted,
    "conv_shifted_max_values": lambda *g: _make_conv_shifted(*g, with_arg=False),
    "conv_shifted_backward": _make_conv_shifted_backward,
    "conv_shifted_backward_max": _make_conv_shifted_backward,
    "max": lambda *g: _make_max_pool(*g, with_arg=True),
    "max_values": lambda *g: _make_max_pool(*g, with_arg=False),
    "max_image": lambda *g: _make_max_pool_image(*g, with_arg=True),
    "max_values_image": lambda *g: _make_max_pool_image(*g, with_arg=False),
    "ave": _make_ave_pool,
    "max_backward": _make_max_pool_backward,
    "max_backward_image": _make_max_pool_backward_image,
    "ave_backward": _make_ave_pool_backward,
}


def _pool_bounds(x: np.ndarray, out: np.ndarray, geometry: tuple[int, ...]) -> tuple[int, ...]:
    kh, kw, sh, sw, ph, pw = geometry
    return (*_interior(out.shape[2], x.shape[2], kh, sh, ph),
            *_interior(out.shape[3], x.shape[3], kw, sw, pw))


def _clipped(bounds: tuple[int, ...], out: np.ndarray) -> bool:
    """Whether some window reaches past the input (padding or the CEIL overhang)."""
    y_lo, y_hi, x_lo, x_hi = bounds
    return (y_lo, y_hi, x_lo, x_hi) != (0, out.shape[2], 0, out.shape[3])


def _max_overhang(x: np.ndarray, out: np.ndarray, geometry: tuple[int, ...],
                  bounds: tuple[int, ...]) -> bool:
    """MAX's padded-plane path: no padding, some window past the bottom or right edge, none
    wholly outside the input."""
    _, _, sh, sw, ph, pw = geometry
    oh, ow = out.shape[2:]
    return (ph == pw == 0 and _clipped(bounds, out) and (oh - 1) * sh < x.shape[2]
            and (ow - 1) * sw < x.shape[3])


def _max_pool_args(x: np.ndarray, best: np.ndarray,
                   geometry: tuple[int, ...]) -> tuple[Any, ...]:
    """The bounds, overhang flag and scratch plane a MAX pooling kernel (or its per-image
    step) takes for input x and output best, (N, C, H, W) and (N, C, oh, ow)."""
    kh, kw, sh, sw = geometry[:4]
    bounds = _pool_bounds(x, best, geometry)
    overhang = _max_overhang(x, best, geometry, bounds)
    oh, ow = best.shape[2:]
    shape = ((oh - 1) * sh + kh, (ow - 1) * sw + kw) if overhang else (1, 1)
    return (*bounds, overhang, np.full(shape, -np.inf, x.dtype))


NO_ARG = np.zeros((1, 1, 1, 1), dtype=np.int32)  # the argmax of a MAX pooling that keeps none
# the pooling arguments of a row-shift convolution that pools nothing
NO_POOL = (np.zeros((1, 1, 1, 1), np.float32), NO_ARG, 1, 1, 1, 0, 0, 0, 0, False,
           np.zeros((1, 1), np.float32))
# ... and the pooling gradient's arguments of one whose top gradient comes from no pooling
# (its copy of a gradient, the last, in the gradient's dtype)
NO_UNPOOL = (np.zeros((1, 1, 1, 1), np.float32), NO_ARG, 1, 1, 1)

# Each pooling and ReLU kernel takes ``post`` = (flags, n) as the fused convolutions do: a
# deferred job's caller starts the other workers from inside it (BatchPool.take_post).

def _stacked(x: np.ndarray, out: np.ndarray, geometry: tuple[int, ...],
             *more: np.ndarray) -> tuple[np.ndarray, ...]:
    """(x, out, *more) with each image's planes as one when the windows tile every plane's
    rows exactly (no padding or overhang, kh ≤ sh, H = oh·sh): the planes stacked one under the
    other have the same windows, and the kernels' loops run over C·oh rows per image instead of
    C short planes (LeNet's pool2, 8×8 planes: forward 25% faster). Otherwise the arrays as
    they are."""
    kh, kw, sh, sw, ph, pw = geometry
    n, c, h, w = x.shape
    oh, ow = out.shape[2:]
    if (ph or pw or kh > sh or h != oh * sh or (ow - 1) * sw + kw > w
            or not all(a.flags.c_contiguous for a in (x, out, *more))):
        return (x, out, *more)
    rows = (n, 1, c * oh, ow)
    return x.reshape(n, 1, c * h, w), out.reshape(rows), *(a.reshape(rows) for a in more)


def _work(claim: np.ndarray | None, n: int) -> np.ndarray:
    """``claim``, or the work of a call that does all ``n`` images in order."""
    return work_counter([slice(0, n)]) if claim is None else claim


# Each pooling kernel makes the images it takes from ``claim`` (a work_counter over the images;
# all of them in order without one).

def max_pool(x: np.ndarray, best: np.ndarray, arg: np.ndarray, geometry: tuple[int, ...],
             post: tuple[np.ndarray, int] = NO_POST, claim: np.ndarray | None = None) -> None:
    x, best, arg = _stacked(np.ascontiguousarray(x), best, geometry, arg)
    _kernel("max", geometry)(x, best, arg, *_max_pool_args(x, best, geometry),
                             _work(claim, x.shape[0]), *post)


def max_pool_values(x: np.ndarray, best: np.ndarray, geometry: tuple[int, ...],
                    post: tuple[np.ndarray, int] = NO_POST,
                    claim: np.ndarray | None = None) -> None:
    x, best = _stacked(np.ascontiguousarray(x), best, geometry)
    _kernel("max_values", geometry)(x, best, NO_ARG, *_max_pool_args(x, best, geometry),
                                    _work(claim, x.shape[0]), *post)


def max_pool_backward(dy: np.ndarray, arg: np.ndarray, dx: np.ndarray,
                      geometry: tuple[int, ...], post: tuple[np.ndarray, int] = NO_POST,
                      claim: np.ndarray | None = None) -> None:
    dx, dy, arg = _stacked(dx, np.ascontiguousarray(dy), geometry, arg)
    _kernel("max_backward", geometry)(dy, arg, dx, _work(claim, dx.shape[0]), *post)


def ave_pool(x: np.ndarray, out: np.ndarray, size: np.ndarray, geometry: tuple[int, ...],
             post: tuple[np.ndarray, int] = NO_POST, claim: np.ndarray | None = None) -> None:
    x = np.ascontiguousarray(x)
    _kernel("ave", geometry)(x, out, size, _clipped(_pool_bounds(x, out, geometry), out),
                             _work(claim, x.shape[0]), *post)


def ave_pool_backward(dy: np.ndarray, dx: np.ndarray, size: np.ndarray,
                      geometry: tuple[int, ...], post: tuple[np.ndarray, int] = NO_POST,
                      claim: np.ndarray | None = None) -> None:
    dy = np.ascontiguousarray(dy)
    _kernel("ave_backward", geometry)(dy, dx, size, _clipped(_pool_bounds(dx, dy, geometry), dy),
                                      _work(claim, dx.shape[0]), *post)


# -- SoftmaxWithLoss -------------------------------------------------------------------------------
# A LeNet-sized loss (64 × 10) is a dozen NumPy calls of a few microseconds each, all of it
# overhead; one pass here for each direction. In a LeNet training step the layer's forward
# went from 0.15 to 0.05 ms and its backward from 0.06 to 0.02 ms; the step as a whole gained
# less than the A/B noise (+0.07 ms, 16 of 30 rounds): small operations right after the large
# ones are slow whatever they are (README, Performance). Labels are read as NumPy's
# astype(int64) reads them (truncated toward zero).

if AVAILABLE:
    @njit(nogil=True, cache=True, inline="always")
    def _class(v: Any, ignore: int, has_ignore: bool, k: int) -> tuple[int, bool]:
        """(class, counts) for a stored label v; class -1 with counts for a label outside
        [0, k) that is not ignored (NaN and huge values are such labels)."""
        if not (-9.2e18 < v < 9.2e18):
            return -1, True
        t = int(v)
        if has_ignore and t == ignore:
            return t, False
        return (t if 0 <= t < k else -1), True

    @njit(nogil=True, cache=True)
    def _softmax_loss(x: Any, labels: Any, ignore: int, has_ignore: bool, prob: Any,
                      floor: float) -> tuple[float, int, float, bool]:
        outer, k, inner = x.shape
        loss, count = 0.0, 0
        for o in range(outer):
            for i in range(inner):
                m = x[o, 0, i]
                for c in range(1, k):
                    m = max(m, x[o, c, i])
                s = x.dtype.type(0)
                for c in range(k):
                    e = np.exp(x[o, c, i] - m)
                    prob[o, c, i] = e
                    s += e
                for c in range(k):
                    prob[o, c, i] /= s
                v = labels[o * inner + i]
                t, counts = _class(v, ignore, has_ignore, k)
                if not counts:
                    continue
                if t < 0:  # the caller reports it
                    return 0.0, 0, float(v), True
                loss -= np.log(max(float(prob[o, t, i]), floor))
                count += 1
        return loss, count, 0.0, False

    @njit(nogil=True, cache=True)
    def _softmax_loss_backward(prob: Any, labels: Any, ignore: int, has_ignore: bool,
                               scale: Any, diff: Any) -> None:
        outer, k, inner = prob.shape
        for o in range(outer):
            for i in range(inner):
                t, counts = _class(labels[o * inner + i], ignore, has_ignore, k)
                for c in range(k):
                    diff[o, c, i] = prob[o, c, i] * scale if counts else 0.0
                if counts and t >= 0:
                    diff[o, t, i] -= scale


def softmax_loss(x: np.ndarray, labels: np.ndarray, ignore: int | None, prob: np.ndarray,
                 floor: float) -> tuple[float, int, float | None]:
    """prob = the softmax of x (outer, K, inner) along axis 1; returns (Σ −log max(p_label,
    floor) over the labels that count, how many count, None), or (0, 0, v) for the first label
    v (as stored) outside [0, K) that is not ``ignore``. ``labels`` holds outer·inner stored
    labels."""
    loss, count, bad, is_bad = _softmax_loss(x, labels, 0 if ignore is None else ignore,
                                             ignore is not None, prob, floor)
    return (0.0, 0, bad) if is_bad else (loss, count, None)


def softmax_loss_backward(prob: np.ndarray, labels: np.ndarray, ignore: int | None,
                          scale: float, diff: np.ndarray) -> None:
    """diff (outer, K, inner) = (prob − onehot(label))·scale, 0 where the label is ignored;
    each product and difference in float64, rounded once, as NumPy's with a float64 scale."""
    _softmax_loss_backward(prob, labels, 0 if ignore is None else ignore, ignore is not None,
                           float(scale), diff)


# -- ReLU ------------------------------------------------------------------------------------
# The same selects as the NumPy expressions in Backend.relu / relu_backward, so the same bits
# (slope 0 keeps max(x, 0)'s +0.0 for negative inputs).
#
# An in-place ReLU (Caffe's usual form: top = bottom) passes the same array twice. LLVM
# vectorizes these loops behind a run-time test that the arrays do not overlap, and runs them
# one element at a time when they do: each block of an in-place call goes to a loop that is
# given the one array for both, so the compiler sees no overlap to test (inlined, each call
# site its own copy). One core, 3.3M float32 in place: 1.06 -> 0.20 ms forward, 1.84 -> 0.42
# backward (0.45 and 0.72-0.83 ms with two arrays).

if AVAILABLE:
    @njit(nogil=True, cache=True, inline="always")
    def _relu_block(x: Any, y: Any, slope: Any, lo: int, hi: int) -> None:
        zero = x.dtype.type(0)
        for i in range(lo, hi):
            v = x[uintp(i)]
            if slope:
                y[uintp(i)] = v if v > zero else v * slope
            else:  # max(v, 0): NaN stays NaN, -0.0 becomes +0.0
                y[uintp(i)] = v if v > zero or v != v else zero

    @njit(nogil=True, cache=True, inline="always")
    def _relu_gradient_block(x: Any, dy: Any, dx: Any, slope: Any, lo: int, hi: int) -> None:
        zero = x.dtype.type(0)
        for i in range(lo, hi):
            g = dy[uintp(i)]
            dx[uintp(i)] = g if x[uintp(i)] > zero else g * slope

    @njit(nogil=True, cache=True)
    def _relu(x: Any, y: Any, slope: Any, block: int, claim: Any, flags: Any,
              post: int) -> None:
        _start_helpers(flags, post)
        own = _claim_part(claim)
        while True:
            b = _next_item(claim, own)
            if b < 0:
                break
            lo, hi = b * block, min((b + 1) * block, x.size)
            if x.ctypes.data == y.ctypes.data:  # in place: one array, no overlap to test
                _relu_block(y, y, slope, lo, hi)
            else:
                _relu_block(x, y, slope, lo, hi)

    @njit(nogil=True, cache=True)
    def _relu_backward(x: Any, dy: Any, dx: Any, slope: Any, block: int, claim: Any,
                       flags: Any, post: int) -> None:
        _start_helpers(flags, post)
        own = _claim_part(claim)
        while True:
            b = _next_item(claim, own)
            if b < 0:
                break
            lo, hi = b * block, min((b + 1) * block, x.size)
            if dy.ctypes.data == dx.ctypes.data:
                _relu_gradient_block(x, dx, dx, slope, lo, hi)
            else:
                _relu_gradient_block(x, dy, dx, slope, lo, hi)


# ReLU's items of shared work: blocks of this many elements (64 KB of float32)
RELU_BLOCK = 1 << 14


def relu_blocks(size: int) -> int:
    """How many RELU_BLOCK items a ReLU over ``size`` elements has."""
    return -(-size // RELU_BLOCK)


def relu(x: np.ndarray, y: np.ndarray, slope: float,
         post: tuple[np.ndarray, int] = NO_POST, claim: np.ndarray | None = None) -> None:
    """y = x where x > 0, else slope·x, on flat contiguous arrays of one dtype (with
    ``claim``, a work_counter over relu_blocks(x.size), the blocks this call takes)."""
    _relu(x, y, x.dtype.type(slope), RELU_BLOCK, _work(claim, relu_blocks(x.size)), *post)


def relu_backward(x: np.ndarray, dy: np.ndarray, dx: np.ndarray, slope: float,
                  post: tuple[np.ndarray, int] = NO_POST,
                  claim: np.ndarray | None = None) -> None:
    """dx = dy where x > 0, else slope·dy, on flat contiguous arrays of one dtype (``claim``
    as relu's)."""
    _relu_backward(x, dy, dx, x.dtype.type(slope), RELU_BLOCK,
                   _work(claim, relu_blocks(x.size)), *post)


# -- the solver's update ----------------------------------------------------------------------

if AVAILABLE:
    @njit(nogil=True, cache=True)
    def _sgd_update(w: Any, g: Any, h: Any, decay: Any, lr: Any, momentum: Any) -> None:
        for i in range(w.size):
            hi = h[i] * momentum + (g[i] + w[i] * decay) * lr
            h[i] = hi
            g[i] = hi  # Caffe's SGD leaves the update value in the diff
            w[i] -= hi


def sgd_update(w: np.ndarray, g: np.ndarray, h: np.ndarray, decay: float, lr: float,
               momentum: float) -> None:
    """In place on flat float32 arrays: h = momentum·h + lr·(g + decay·w); g = h (Caffe's
    update value); w -= h, each product and sum rounded to float32 as NumPy's passes round
    them."""
    f = np.float32
    _sgd_update(w, g, h, f(decay), f(lr), f(momentum))


# -- waiting without the GIL ---------------------------------------------------------------------
#
# The batch pool's threads hand work to each other through counters in a small int64 array
# (threads.py). Waking a sleeping thread through the OS takes 20-100 µs on a virtual machine, as
# much as a small layer's work; a thread spinning on the counter here, without the GIL, sees the
# change in about a microsecond. The loads and stores are atomic (acquire/release): LLVM reloads
# the counter on every turn, and what a thread wrote before its store is seen after the load.

if AVAILABLE:
    def _item_pointer(context: Any, builder: Any, array_type: Any, array: Any,
                      index: Any) -> Any:
        data = context.make_array(array_type)(context, builder, array)
        return cgutils.get_item_pointer(context, builder, array_type, data, [index])

    @intrinsic
    def _load_acquire(typingctx: Any, array: Any, index: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            pointer = _item_pointer(context, builder, signature.args[0], *args)
            return builder.load_atomic(pointer, "acquire", 8)

        return types.int64(array, index), codegen

    @intrinsic
    def _store_release(typingctx: Any, array: Any, index: Any, value: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            pointer = _item_pointer(context, builder, signature.args[0], args[0], args[1])
            builder.store_atomic(args[2], pointer, "release", 8)
            return context.get_dummy_value()

        return types.void(array, index, types.int64), codegen

    @intrinsic
    def _fetch_add(typingctx: Any, array: Any, index: Any) -> Any:
        """array[index] += 1 atomically; the value before."""
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            pointer = _item_pointer(context, builder, signature.args[0], *args)
            return builder.atomic_rmw("add", pointer, context.get_constant(types.int64, 1),
                                      "acq_rel")

        return types.int64(array, index), codegen

    @intrinsic
    def _compare_and_swap(typingctx: Any, array: Any, index: Any, expected: Any,
                          value: Any) -> Any:
        """array[index] = value if it holds ``expected``, atomically; whether it did."""
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            pointer = _item_pointer(context, builder, signature.args[0], args[0], args[1])
            pair = builder.cmpxchg(pointer, args[2], args[3], "acq_rel", "acquire")
            return builder.extract_value(pair, 1)

        return types.boolean(array, index, types.int64, types.int64), codegen

    @njit(nogil=True, cache=True)
    def _take(work: Any, part: int, from_back: bool) -> int:
        """The next item of a part of shared work (work_counter): its first left, or with
        ``from_back`` its last left; -1 when none is."""
        at = RANGES + 8 * part
        while True:
            v = _load_acquire(work, at)
            front, back = v >> 32, v & 0xFFFFFFFF
            if front >= back:
                return -1
            if from_back:
                if _compare_and_swap(work, at, v, (front << 32) | (back - 1)):
                    return back - 1
            elif _compare_and_swap(work, at, v, ((front + 1) << 32) | back):
                return front

    @njit(nogil=True, cache=True)
    def _untouched(work: Any, part: int, end: int) -> bool:
        """Whether no call has taken an item from the back of ``part`` (which ends at
        ``end``)."""
        return (_load_acquire(work, RANGES + 8 * part) & 0xFFFFFFFF) == end

    @njit(nogil=True, cache=True)
    def _claim_part(work: Any) -> int:
        """The part this call owns (the next not handed out), or -1 when none is left."""
        part = _fetch_add(work, CLAIMS)
        return part if part < work[PARTS] else -1

    @njit(nogil=True, cache=True)
    def _take_stolen(work: Any, own: int) -> int:
        """An item from the back of a part other than ``own`` (the last part first); -1 when
        none has any left."""
        for other in range(work[PARTS] - 1, -1, -1):
            if other != own:
                n = _take(work, other, True)
                if n >= 0:
                    return n
        return -1

    @njit(nogil=True, cache=True)
    def _next_item(work: Any, own: int) -> int:
        """The next item for the call owning part ``own`` (-1: none): its own part's front,
        then the others' backs; -1 when none is left."""
        n = _take(work, own, False) if own >= 0 else -1
        return n if n >= 0 else _take_stolen(work, own)

    @njit(nogil=True, cache=True)
    def _report_and_wait(flags: Any, report: Any, done: Any, index: Any, value: Any,
                         turns: Any) -> bool:
        if report >= 0:
            _store_release(flags, report, done)
        for _ in range(turns):
            if _load_acquire(flags, index) != value:
                return True
        return False


def report_and_wait(flags: np.ndarray, report: int, done: int, index: int, value: int,
                    turns: int) -> bool:
    """Without the GIL: store ``done`` in ``flags[report]`` (unless ``report`` < 0), then
    busy-wait while ``flags[index] == value`` for at most ``turns`` reads (about 1 ns each).
    True once it changed. ``flags`` is a contiguous int64 array."""
    return bool(_report_and_wait(flags, report, done, index, value, turns))


# Module-level compiled functions that the kernels' factories' functions call (_padded_plane,
# the work counters) are pickled with them when numba hashes a kernel's closure for its on-disk
# cache, uuid included: with a uuid drawn anew in each process, every kernel whose closure holds
# such a function (each MAX pooling, and so every convolution that pools) missed the cache and
# was compiled again in every process (LeNet's first training step 1.6 s, each run adding
# entries to the cache directory). A uuid made from the function's name is the same everywhere.
if AVAILABLE:
    for _name, _function in list(globals().items()):
        if hasattr(_function, "py_func"):
            _set_uuid_once(_function, f"netforge.kernels.{_name}")
