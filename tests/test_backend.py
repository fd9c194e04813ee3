"""The NumPy backend: its kernels (im2col layouts agree, col2im is im2col's adjoint, compiled
against NumPy) and its batch parallelism (parts equal the whole batch, the worker pool)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from netforge.backend import NumpyBackend

B = NumpyBackend("float64")
CASES = [  # n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw
    (2, 3, 7, 6, 3, 2, 2, 1, 1, 0, 1, 2),
    (4, 5, 8, 8, 5, 5, 1, 1, 0, 0, 1, 1),
    (3, 2, 9, 9, 3, 3, 2, 2, 2, 2, 1, 1),
    (1, 1, 5, 5, 1, 1, 1, 1, 0, 0, 1, 1),
]


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "uint8"])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (5, 0, 2), (7, 13), (2, 3, 40, 41)])
def test_backend_arrays_start_on_cache_lines(dtype: str, shape: tuple[int, ...]) -> None:
    from netforge.backend.numpy_backend import ALIGNMENT, aligned_empty

    for _ in range(8):  # new blocks each time, wherever malloc puts them
        z, e = B.zeros(shape, dtype), B.empty(shape, dtype)
        for a in (z, e, aligned_empty(shape, dtype, alignment=4096)):
            assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.c_contiguous
            assert a.flags.writeable and not np.shares_memory(a, z if a is not z else e)
        if z.size:  # (an empty array's address is NumPy's to pick)
            assert z.ctypes.data % ALIGNMENT == 0 and e.ctypes.data % ALIGNMENT == 0
        assert not z.any()
        e[...] = 1  # the whole block is writable
        assert e.sum() == e.size
    assert B.zeros((4, 4)).dtype == np.float64  # the backend's dtype by default
    assert aligned_empty(5, "float32", alignment=4096).ctypes.data % 4096 == 0


@pytest.mark.parametrize("case", CASES)
def test_im2col_layouts_agree(case: tuple[int, ...]) -> None:
    n, c, h, w, *k = case
    x = np.random.default_rng(0).normal(size=(n, c, h, w))
    per_image = B.im2col(x, *k)                      # (N, K, P)
    rows = B.im2col_rows(x, *k)                      # (N·P, K)
    _, kk, p = per_image.shape
    np.testing.assert_array_equal(rows.reshape(n, p, kk).transpose(0, 2, 1), per_image)
    again = B.im2col_rows(x, *k, out=rows)
    assert again is rows
    kh, kw = k[:2]  # (i, j, c) rows: the (c, i, j) rows with each row's entries permuted
    hwc = B.im2col_rows(x, *k, channels_last=True)
    np.testing.assert_array_equal(
        hwc, rows.reshape(-1, c, kh, kw).transpose(0, 2, 3, 1).reshape(rows.shape))
    buffer = np.full(per_image.shape, 3.0)
    assert B.im2col(x, *k, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, per_image)


@pytest.mark.parametrize("case", CASES)
def test_col2im_is_the_adjoint(case: tuple[int, ...]) -> None:
    """<im2col(x), c> == <x, col2im(c)> for both layouts."""
    n, c, h, w, *k = case
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, c, h, w))
    cols = B.im2col(x, *k)
    rows = B.im2col_rows(x, *k)
    a = rng.normal(size=cols.shape)
    b = rng.normal(size=rows.shape)
    assert np.vdot(cols, a) == pytest.approx(np.vdot(x, B.col2im(a, x.shape, *k)))
    into = np.full(x.shape, 7.0)
    assert B.col2im(a, x.shape, *k, out=into) is into
    assert np.vdot(cols, a) == pytest.approx(np.vdot(x, into))
    out = np.full(x.shape, 7.0)
    back = B.col2im_rows(b, x.shape, *k, out=out)
    assert back is out
    assert np.vdot(rows, b) == pytest.approx(np.vdot(x, back))
    hwc = B.im2col_rows(x, *k, channels_last=True)
    back = B.col2im_rows(b, x.shape, *k, out=np.full(x.shape, 7.0), channels_last=True)
    assert np.vdot(hwc, b) == pytest.approx(np.vdot(x, back))


def test_pad() -> None:
    x = np.ones((1, 1, 2, 2))
    p = B.pad(x, 1, 2, value=-1.0, extra_h=1)
    assert p.shape == (1, 1, 5, 6)
    assert p[0, 0, 1, 2] == 1 and p[0, 0, 0, 0] == -1 and p.sum() == 4 - (30 - 4)
    assert B.pad(x, 0, 0) is x


# -- compiled kernels (numba) against the NumPy paths ------------------------------------------

kernels_available = pytest.mark.skipif(not NumpyBackend().compiled,
                                       reason="numba not installed (netforge[fast])")
BIG = [  # large enough for the compiled path
    (8, 16, 20, 18, 5, 5, 1, 1, 0, 0, 1, 1),
    (6, 12, 17, 19, 3, 3, 2, 2, 2, 1, 1, 1),
    (4, 8, 24, 24, 3, 2, 1, 2, 1, 0, 2, 1),
    (4, 8, 24, 22, 3, 3, 2, 3, 3, 4, 2, 2),  # windows wholly in the padding
]


@kernels_available
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_compiled_layout_changes_match_numpy(dtype: str, with_bias: bool) -> None:
    """rows (N·P, C) <-> images (N, C, P), as around a row-layout convolution GEMM: the
    compiled loops give NumPy's bits, and the bias is added only when given."""
    fast, slow = NumpyBackend(dtype), NumpyBackend(dtype, compiled=False)
    n, c, p = 7, 13, 611
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(n * p, c)).astype(dtype)
    bias = rng.normal(size=c).astype(dtype) if with_bias else None
    assert fast.use_compiled(rows.size)
    got, want = np.full((n, c, p), 9.0, dtype), np.full((n, c, p), 8.0, dtype)
    fast.rows_to_images(rows, bias, got)
    slow.rows_to_images(rows, bias, want)
    np.testing.assert_array_equal(got, want)
    if bias is None:
        np.testing.assert_array_equal(got[2, :, 5], rows[2 * p + 5])
    back = np.full(rows.shape, 3.0, dtype)
    fast.images_to_rows(rows.reshape(n, p, c).transpose(0, 2, 1).copy(), back)
    np.testing.assert_array_equal(back, rows)
    slow_back = np.empty_like(back)
    slow.images_to_rows(got, slow_back)
    fast.images_to_rows(got, back)
    np.testing.assert_array_equal(back, slow_back)


@kernels_available
@pytest.mark.parametrize("case", BIG)
def test_compiled_im2col_col2im_match_numpy(case: tuple[int, ...]) -> None:
    n, c, h, w, *k = case
    fast, slow = NumpyBackend("float64"), NumpyBackend("float64", compiled=False)
    x = np.random.default_rng(2).normal(size=(n, c, h, w))
    cols = fast.im2col_rows(x, *k)
    assert fast.use_compiled(cols.size)
    np.testing.assert_array_equal(cols, slow.im2col_rows(x, *k))
    d = np.random.default_rng(3).normal(size=cols.shape)
    np.testing.assert_allclose(fast.col2im_rows(d, x.shape, *k, out=np.empty(x.shape)),
                               slow.col2im_rows(d, x.shape, *k), rtol=1e-12, atol=1e-12)
    # rows in (i, j, c) order: the compiled kernel sums each pixel's entries in the (c, i, j)
    # kernel's order, so its col2im gives that kernel's bits on the permuted rows
    kh, kw = k[:2]
    hwc = fast.im2col_rows(x, *k, out=np.full(cols.shape, 5.0), channels_last=True)
    np.testing.assert_array_equal(hwc, slow.im2col_rows(x, *k, channels_last=True))
    back = fast.col2im_rows(d, x.shape, *k, out=np.full(x.shape, 7.0), channels_last=True)
    np.testing.assert_allclose(back, slow.col2im_rows(d, x.shape, *k, channels_last=True),
                               rtol=1e-12, atol=1e-12)
    as_cij = d.reshape(-1, kh, kw, c).transpose(0, 3, 1, 2).reshape(d.shape)
    assert back.tobytes() == fast.col2im_rows(np.ascontiguousarray(as_cij), x.shape,
                                              *k).tobytes()
    # Caffe's per-image layout (N, C·kh·kw, oh·ow), into reused buffers
    buffer = np.full((n, cols.shape[1], cols.shape[0] // n), 5.0)
    per_image = fast.im2col(x, *k, out=buffer)
    assert per_image is buffer
    np.testing.assert_array_equal(per_image, slow.im2col(x, *k))
    d = np.random.default_rng(4).normal(size=per_image.shape)
    out = np.full(x.shape, 7.0)
    assert fast.col2im(d, x.shape, *k, out=out) is out
    np.testing.assert_allclose(out, slow.col2im(d, x.shape, *k), rtol=1e-12, atol=1e-12)


@kernels_available
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("geometry", [
    "kernel_size: 2 stride: 2", "kernel_size: 3 stride: 2", "kernel_size: 3 stride: 2 pad: 1",
    "kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0",
    "kernel_size: 2 stride: 2 round_mode: FLOOR", "kernel_size: 1 stride: 2",
    "kernel_size: 2 stride: 3", "kernel_size: 4 stride: 3 pad: 2"])
@pytest.mark.parametrize("shape", [(8, 16, 21, 20), (8, 16, 20, 18)])  # odd H; H = oh·sh
@pytest.mark.parametrize("phase", [0, 1])  # TRAIN, TEST (MAX without the argmax)
def test_compiled_pooling_matches_numpy(pool: str, geometry: str, shape: tuple[int, ...],
                                        phase: int) -> None:
    """(8, 16, 20, 18) with kernel 2 stride 2 or kernel 1 stride 2 pools the planes stacked
    into one (kernels._stacked)."""
    from netforge.blob import Blob
    from tests.helpers import make_layer

    rng = np.random.default_rng(4)
    x = rng.normal(size=shape).round(1)  # rounding makes ties: first max must win
    outs = []
    for compiled in (True, False):
        layer = make_layer("Pooling", f"pooling_param {{ pool: {pool} {geometry} }}",
                           phase=phase)
        layer.backend = NumpyBackend("float64", compiled=compiled)
        bottom, tops = Blob(layer.backend, x.shape), [Blob(layer.backend)]
        bottom.data[...] = x
        layer.setup([bottom], tops)
        layer.reshape([bottom], tops)
        layer.forward([bottom], tops)
        tops[0].diff[...] = rng.normal(size=tops[0].shape) if not outs else outs[0][2]
        layer.backward(tops, [True], [bottom])
        outs.append((tops[0].data.copy(), bottom.diff.copy(), tops[0].diff.copy()))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-12)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)


@kernels_available
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("shape", "geometry"), [
    ((3, 4, 32, 32), (3, 3, 2, 2, 0, 0)),   # CEIL overhang at the bottom and right
    ((2, 3, 21, 20), (3, 3, 2, 2, 0, 0)),   # overhang on the right only
    ((2, 3, 17, 19), (3, 3, 2, 2, 1, 1)),   # padding (AVE only)
    ((2, 3, 21, 20), (2, 2, 3, 3, 0, 0)),   # a window wholly past the edge (AVE only)
    ((2, 3, 9, 11), (4, 3, 3, 2, 2, 1)),
])
def test_pooling_padded_planes_give_the_clipped_windows_bits(
        dtype: str, shape: tuple[int, ...], geometry: tuple[int, ...]) -> None:
    """Windows past the input run over a copy of the plane with -inf (MAX) or 0 (AVE) around
    it: MAX gives the clipped loops' maxima and argmaxes (ties, -inf and NaN included), AVE the
    sums of the cells inside each window in row-major order (forward, in float64 as the kernel
    adds) and the gradients added output by output, bit for bit."""
    from netforge.backend import kernels

    kh, kw, sh, sw, ph, pw = geometry
    n, c, h, w = shape
    oh, ow = -(-(h + 2 * ph - kh) // sh) + 1, -(-(w + 2 * pw - kw) // sw) + 1
    oh -= ph > 0 and (oh - 1) * sh >= h + ph
    ow -= pw > 0 and (ow - 1) * sw >= w + pw
    rng = np.random.default_rng(9)
    x = rng.normal(size=shape).round(1).astype(dtype)  # rounded: ties
    x.reshape(-1)[::13] = -np.inf
    x.reshape(-1)[5::29] = np.nan
    dy = rng.normal(size=(n, c, oh, ow)).astype(dtype)
    hs, ws = np.arange(oh) * sh - ph, np.arange(ow) * sw - pw
    size = np.maximum((np.minimum(hs + kh, h + ph) - hs)[:, None]
                      * (np.minimum(ws + kw, w + pw) - ws)[None, :], 1).astype(dtype)
    bounds = kernels._pool_bounds(x, dy, geometry)
    assert kernels._clipped(bounds, dy)
    out = np.full(dy.shape, 5.0, dtype)
    every = kernels.work_counter([slice(0, n)])
    kernels._kernel("ave", geometry)(x, out, size, True, every, *kernels.NO_POST)
    dx = np.full(shape, 3.0, dtype)
    every = kernels.work_counter([slice(0, n)])
    kernels._kernel("ave_backward", geometry)(dy, dx, size, True, every, *kernels.NO_POST)
    # the references: each window's cells inside the input, in row-major order
    ext_h, ext_w = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    inside = np.zeros((n, c, ext_h, ext_w), dtype=bool)
    inside[:, :, ph:ph + h, pw:pw + w] = True
    xpad = np.zeros((n, c, ext_h, ext_w))
    xpad[inside] = x.reshape(-1)
    sums = np.zeros(dy.shape)
    for i in range(kh):
        for j in range(kw):
            cells = (slice(None), slice(None), slice(i, i + sh * (oh - 1) + 1, sh),
                     slice(j, j + sw * (ow - 1) + 1, sw))
            sums = np.where(inside[cells], sums + xpad[cells], sums)
    want_out = (sums / size.astype(np.float64)).astype(dtype)
    grad = np.zeros((n, c, ext_h, ext_w), dtype)
    g = dy / size
    for y in range(oh):
        for xx in range(ow):
            grad[:, :, y * sh:y * sh + kh, xx * sw:xx * sw + kw] += g[:, :, y, xx, None, None]
    want_dx = np.ascontiguousarray(grad[:, :, ph:ph + h, pw:pw + w])
    for a, b in ((out, want_out), (dx, want_dx)):
        assert a.tobytes() == b.tobytes()
    if not kernels._max_overhang(x, dy, geometry, bounds):
        return
    results = []
    for overhang in (True, False):
        scratch = np.full((ext_h, ext_w) if overhang else (1, 1), -np.inf, dtype)
        best, arg = np.full(dy.shape, 5.0, dtype), np.full(dy.shape, 9, np.int32)
        kernels._kernel("max", geometry)(x, best, arg, *bounds, overhang, scratch,
                                         kernels.work_counter([slice(0, n)]), *kernels.NO_POST)
        values = np.full(dy.shape, 6.0, dtype)
        kernels._kernel("max_values", geometry)(x, values, arg[:1, :1, :1], *bounds, overhang,
                                                scratch, kernels.work_counter([slice(0, n)]),
                                                *kernels.NO_POST)
        results.append((best, arg, values))
    for a, b in zip(*results, strict=True):
        assert a.tobytes() == b.tobytes()
    assert (results[0][1] >= 0).all()


@pytest.mark.parametrize(("params", "channels"), [
    ("num_output: 4 kernel_size: 3 pad: 1", 4),
    ("num_output: 6 kernel_size: 2 stride: 2 group: 2", 4),
    ("num_output: 4 kernel_size: 3 pad: 1", 18),  # rows in (i, j, c) order
])
def test_convolution_in_parts_equals_whole_batch(monkeypatch: pytest.MonkeyPatch,
                                                 params: str, channels: int) -> None:
    """Convolution splits a batch into parts (one per worker, more past the column budget),
    run concurrently; the result must not depend on the split: the whole batch at once, one
    image per part, two workers with one part each, three workers with two parts each."""
    from netforge.layers.vision import _ConvolutionBase
    from tests.helpers import blob, make_layer, tops

    results = []
    for workers, budget, n_parts in ((1, 1 << 30, 1), (1, 1, 6), (2, 1 << 30, 2), (3, 1, 6)):
        monkeypatch.setattr(_ConvolutionBase, "COLUMN_BUDGET", budget)
        layer = make_layer("Convolution", f"convolution_param {{ {params} "
                                          "weight_filler { type: 'gaussian' } "
                                          "bias_filler { type: 'gaussian' } }")
        layer.backend = NumpyBackend("float64", workers=workers)
        layer.backend.parallel_min = 0
        if layer.backend.workers != workers:
            pytest.skip("no per-thread BLAS control here: batch parallelism is off")
        bottom, top = [blob((6, channels, 7, 6))], tops(1)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        assert len(layer._parts(bottom[0].data)) == n_parts
        assert layer.channels_last == (channels == 18)
        layer.forward(bottom, top)
        top[0].diff[...] = np.random.default_rng(5).normal(size=top[0].shape)
        for b in layer.blobs:
            b.diff[...] = 1.0  # backward accumulates into the parameter diffs
        layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), bottom[0].diff.copy(),
                        [b.diff.copy() for b in layer.blobs]))
    y1, dx1, dw1 = results[0]
    for y2, dx2, dw2 in results[1:]:
        np.testing.assert_allclose(y1, y2, rtol=1e-12)
        np.testing.assert_allclose(dx1, dx2, rtol=1e-12, atol=1e-14)
        for a, b in zip(dw1, dw2, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_convolution_parts_follow_the_phase_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """TRAIN splits by COLUMN_BUDGET (columns are kept for backward), other phases by the
    smaller TEST_COLUMN_BUDGET; the forward result does not depend on the split."""
    from netforge.layers.base import PHASE_TEST, PHASE_TRAIN
    from netforge.layers.vision import _ConvolutionBase
    from tests.helpers import blob, make_layer, tops

    monkeypatch.setattr(_ConvolutionBase, "COLUMN_BUDGET", 1 << 30)
    monkeypatch.setattr(_ConvolutionBase, "TEST_COLUMN_BUDGET", 1)
    outputs, counts = [], []
    for phase in (PHASE_TRAIN, PHASE_TEST):
        layer = make_layer("Convolution", "convolution_param { num_output: 3 kernel_size: 3 "
                           "weight_filler { type: 'gaussian' } }", phase=phase)
        layer.backend = NumpyBackend("float64", workers=1)
        bottom, top = [blob((5, 2, 6, 6))], tops(1)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        counts.append(len(layer._parts(bottom[0].data)))
        layer.forward(bottom, top)
        outputs.append(top[0].data.copy())
    assert counts == [1, 5]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-12)


def test_parallel_runs_parts_round_robin_and_reraises() -> None:
    """Part k runs on worker k mod W, each worker in order, results in part order; an error in
    any part is raised in the caller after every worker has stopped."""
    import threading

    backend = NumpyBackend("float64", workers=2)
    if backend.workers != 2:
        pytest.skip("no per-thread BLAS control here: batch parallelism is off")
    seen: dict[int, list[int]] = {0: [], 1: []}
    threads: dict[int, set[int]] = {0: set(), 1: set()}

    def record(slot: int, k: int) -> int:
        seen[slot].append(k)
        threads[slot].add(threading.get_ident())
        return k * k

    assert backend.parallel(record, 5) == [0, 1, 4, 9, 16]
    assert seen == {0: [0, 2, 4], 1: [1, 3]}
    assert threads[0] == {threading.get_ident()} and threading.get_ident() not in threads[1]

    def fail(slot: int, k: int) -> int:
        if k == 3:
            raise ValueError("part 3")
        return k

    with pytest.raises(ValueError, match="part 3"):
        backend.parallel(fail, 4)
    assert backend.parallel(lambda s, k: k, 3) == [0, 1, 2]  # the pool still works
    # A part that splits its own work runs the inner parts in its thread, as the same worker
    # (so per-worker scratch buffers stay apart), not deadlocked.
    nested = backend.parallel(lambda s, k: backend.parallel(lambda s2, j: (s2, j), 2), 2)
    assert nested == [[(0, 0), (0, 1)], [(1, 0), (1, 1)]]


def test_parallel_when_the_helpers_sleep_and_from_two_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's helpers spin briefly and then sleep: jobs handed to sleeping helpers (no
    spinning at all) still run every part, and two threads running nets at once both get every
    part done (the second runs its parts itself while the helpers are busy)."""
    import threading
    import time

    from netforge.backend import threads as pool_threads

    backend = NumpyBackend("float64", workers=2)
    if backend.workers != 2:
        pytest.skip("no per-thread BLAS control here: batch parallelism is off")
    monkeypatch.setattr(pool_threads, "SPIN_TURNS", 1)
    for count in (2, 3, 5):
        time.sleep(0.005)  # the helper is asleep by now
        assert backend.parallel(lambda s, k: (s, k), count) == [(k % 2, k) for k in range(count)]
    monkeypatch.undo()

    results: dict[int, list[list[int]]] = {}

    def net(name: int) -> None:
        def part(slot: int, k: int) -> int:
            time.sleep(0.001)
            return name * 100 + k

        results[name] = [backend.parallel(part, 4) for _ in range(20)]

    runners = [threading.Thread(target=net, args=(i,)) for i in range(2)]
    for t in runners:
        t.start()
    for t in runners:
        t.join(timeout=60)
    assert results == {i: [[i * 100 + k for k in range(4)]] * 20 for i in range(2)}


@kernels_available
@pytest.mark.parametrize("asleep", [False, True])
def test_deferred_jobs_start_their_helpers_from_the_callers_kernel(
        monkeypatch: pytest.MonkeyPatch, asleep: bool) -> None:
    """A deferred job's helpers start when the caller's first compiled call stores the job's
    number (take_post), or, when no call takes it, once the caller's first part is done; with
    helpers asleep as well. Outside a deferred job take_post gives 0 (store nothing)."""
    import time

    from netforge.backend import threads as pool_threads
    from netforge.backend.threads import BatchPool

    pool = BatchPool(2)
    if pool.workers != 2:
        pytest.skip("no per-thread BLAS control here: batch parallelism is off")
    monkeypatch.setattr(pool_threads, "DEFER", True)
    if asleep:
        monkeypatch.setattr(pool_threads, "SPIN_TURNS", 1)
    started: list[bool] = []

    def kernel_like(slot: int, k: int) -> tuple[int, int]:
        if slot == 0 and k == 0:
            flags, number = pool.take_post()
            # the job's number while the helpers wait for it; 0 when they were started in
            # Python already (they were asleep)
            started.append(bool(number == 0 or flags[0] != number))
            if number:
                flags[0] = number  # what the kernel's first store does
            assert pool.take_post()[1] == 0  # taken once
        return slot, k

    for count in (2, 5):
        time.sleep(0.005 if asleep else 0)
        assert pool.run(kernel_like, count, deferred=True) == [(k % 2, k) for k in range(count)]
        assert started.pop()
        time.sleep(0.005 if asleep else 0)
        assert pool.run(lambda s, k: (s, k), count, deferred=True) == [
            (k % 2, k) for k in range(count)]
    assert pool.take_post()[1] == 0
    assert pool.run(kernel_like, 2) == [(0, 0), (1, 1)]  # not deferred: nothing to take
    assert started == [True]


def test_batch_pool_runs_waiting_tasks_beside_a_balanced_job() -> None:
    """Tasks given to later() run on worker 1 before its parts of the next balanced job (not
    of another job), or on the caller at finish_later(); each thread's tasks wait for that
    thread's jobs; a task's error is raised by the job it ran in."""
    import threading

    from netforge.backend.threads import BatchPool

    pool = BatchPool(2)
    if pool.workers != 2:
        pytest.skip("no per-thread BLAS control here: batch parallelism is off")
    ran: list[tuple[str, str]] = []

    def task(name: str) -> Any:
        return lambda: ran.append((name, threading.current_thread().name))

    pool.later(task("a"))
    pool.later(task("b"))
    assert pool.run(lambda s, k: k, 2) == [0, 1] and ran == []  # not balanced: not taken
    assert pool.run(lambda s, k: len(ran), 2, balanced=True)[1] == 2  # worker 1: after them
    assert ran == [("a", "netforge-batch-1"), ("b", "netforge-batch-1")]
    pool.later(task("c"))
    pool.finish_later()
    assert ran[-1] == ("c", threading.current_thread().name)
    pool.finish_later()  # nothing left
    assert len(ran) == 3
    # another thread's task waits for that thread's jobs
    other = threading.Thread(target=lambda: pool.later(task("d")))
    other.start()
    other.join()
    pool.run(lambda s, k: k, 2, balanced=True)
    assert len(ran) == 3

    def fail() -> None:
        raise ValueError("task failed")

    pool.later(fail)
    with pytest.raises(ValueError, match="task failed"):
        pool.run(lambda s, k: k, 2, balanced=True)
    assert pool.run(lambda s, k: k, 2, balanced=True) == [0, 1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_batch_pool_reports_a_helper_that_died() -> None:
    """A helper thread that dies (here: an error in its wait) is an error in the caller, not a
    caller waiting forever for its parts."""
    import threading

    from netforge.backend.threads import BatchPool

    pool = BatchPool(2)
    if pool.workers != 2:
        pytest.skip("no per-thread BLAS control here: batch parallelism is off")
    assert pool.run(lambda s, k: k, 2) == [0, 1]
    spin, signal_done = pool._spin, pool._signal_done

    def crash_in_helpers(real: Any) -> Any:
        def patched(*args: int) -> Any:
            if threading.current_thread().name.startswith("netforge-batch"):
                raise RuntimeError("simulated crash")
            return real(*args)

        return patched

    # The two ways a helper reports a job done: it dies before either.
    pool._spin = crash_in_helpers(spin)  # type: ignore[method-assign]
    pool._signal_done = crash_in_helpers(signal_done)  # type: ignore[method-assign]
    outcome: list[str] = []

    def call() -> None:
        try:
            pool.run(lambda s, k: k, 2)
        except RuntimeError as e:
            outcome.append(str(e))

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    caller.join(timeout=30)
    assert not caller.is_alive(), "the caller hung, waiting for a helper that died"
    assert outcome and "batch worker 1 has stopped" in outcome[0]


@kernels_available
def test_report_and_wait() -> None:
    """The pool's GIL-free wait: stores the report, returns True as soon as the watched
    counter differs, False after the given number of reads if it never does."""
    from netforge.backend import kernels

    flags = np.zeros(16, dtype=np.int64)
    assert kernels.report_and_wait(flags, 8, 7, 0, 0, 1000) is False
    assert flags[8] == 7
    flags[0] = 3
    assert kernels.report_and_wait(flags, -1, 9, 0, 0, 1 << 40) is True  # returns at once
    assert list(flags[[0, 8]]) == [3, 7]


def test_batch_parts() -> None:
    """One part per worker once the work is worth splitting; more (a multiple of the workers)
    past the budget; never more parts than items."""
    backend = NumpyBackend("float64", workers=2)
    backend.workers = 2  # the split itself does not need threads
    backend.parallel_min = 100
    assert backend.batch_parts(64, 99) == [slice(0, 64)]
    assert backend.batch_parts(64, 100) == [slice(0, 32), slice(32, 64)]
    assert len(backend.batch_parts(64, 1000, budget=300)) == 4
    assert backend.batch_parts(1, 1000) == [slice(0, 1)]
    assert backend.batch_parts(3, 1000) == [slice(0, 2), slice(2, 3)]


@kernels_available
@pytest.mark.parametrize("geometry", ["kernel_size: 2 stride: 2",
                                      "kernel_size: 3 stride: 2 pad: 1"])
def test_test_phase_max_pooling_skips_argmax_but_still_backprops(geometry: str) -> None:
    """In TEST the compiled MAX pooling computes only the maxima; a backward (force_backward,
    gradcheck in TEST) recomputes the argmax. Both must equal the TRAIN-phase results."""
    from netforge.blob import Blob
    from tests.helpers import PHASE_TEST, PHASE_TRAIN, make_layer

    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 16, 21, 20))
    dy = None
    results = []
    for phase in (PHASE_TRAIN, PHASE_TEST):
        layer = make_layer("Pooling", f"pooling_param {{ pool: MAX {geometry} }}", phase=phase)
        bottom, top = Blob(layer.backend, x.shape), [Blob(layer.backend)]
        bottom.data[...] = x
        layer.setup([bottom], top)
        layer.reshape([bottom], top)
        layer.forward([bottom], top)
        if phase == PHASE_TEST:
            assert layer._argmax is None
        dy = rng.normal(size=top[0].shape) if dy is None else dy
        top[0].diff[...] = dy
        layer.backward(top, [True], [bottom])
        results.append((top[0].data.copy(), bottom.diff.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("compiled", [True, False])
def test_net_on_two_workers_matches_one(compiled: bool) -> None:
    """A whole net (Convolution, MAX and AVE Pooling, InnerProduct, loss) split over two
    workers gives the single worker's outputs and gradients up to summation order, and the
    same results again on a second run (sums over images are made per fixed part, whichever
    worker makes it); with the compiled kernels and with the NumPy paths."""
    from google.protobuf import text_format

    from netforge import Net
    from netforge.proto import pb

    text = """
    force_backward: true
    layer { name: "in" type: "Input" top: "data" top: "label"
            input_param { shape { dim: 6 dim: 3 dim: 12 dim: 12 } shape { dim: 6 } } }
    layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
            convolution_param { num_output: 5 kernel_size: 3 pad: 1
                                weight_filler { type: "xavier" }
                                bias_filler { type: "gaussian" } } }
    layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
            pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
    layer { name: "ave" type: "Pooling" bottom: "pool" top: "ave"
            pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
    layer { name: "ip" type: "InnerProduct" bottom: "ave" top: "ip"
            inner_product_param { num_output: 4 weight_filler { type: "xavier" }
                                  bias_filler { type: "gaussian" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    """
    rng = np.random.default_rng(11)
    x, label = rng.normal(size=(6, 3, 12, 12)), rng.integers(0, 4, size=6)
    results = []
    for workers in (1, 2, 2):
        backend = NumpyBackend("float64", workers=workers, compiled=compiled)
        if backend.workers != workers:
            pytest.skip("no per-thread BLAS control here: batch parallelism is off")
        backend.parallel_min = 0  # split even this small net
        backend.compiled_min = 0  # and use the compiled kernels where there are any
        p = pb.NetParameter()
        text_format.Parse(text, p)
        net = Net(p, "TRAIN", backend=backend, verbose=False, seed=3)
        net.forward(data=x, label=label)
        net.backward()
        results.append((net.loss, net.blobs["data"].diff.copy(),
                        [b.diff.copy() for layer in net.layers for b in layer.blobs]))
    (loss1, dx1, g1), (loss2, dx2, g2), (loss3, dx3, g3) = results
    assert np.abs(dx1).max() > 0
    assert loss1 == pytest.approx(loss2, rel=1e-12)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-10, atol=1e-14)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    assert loss2 == loss3 and np.array_equal(dx2, dx3)
    assert all(np.array_equal(a, b) for a, b in zip(g2, g3, strict=True))


def test_convolution_backward_twice_gives_the_same_gradients() -> None:
    """Backward writes dy·W over the columns it kept from forward; a second backward without
    a forward must recompute them, not read the overwritten buffer."""
    from tests.helpers import blob, make_layer, tops

    layer = make_layer("Convolution", "convolution_param { num_output: 4 kernel_size: 3 "
                                      "weight_filler { type: 'gaussian' } }")
    bottom, top = [blob((3, 2, 6, 6))], tops(1)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    top[0].diff[...] = np.random.default_rng(8).normal(size=top[0].shape)
    grads = []
    for _ in range(2):
        layer.blobs[0].diff[...] = 0
        layer.backward(top, [True], bottom)
        grads.append((layer.blobs[0].diff.copy(), bottom[0].diff.copy()))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-12)
    np.testing.assert_allclose(grads[0][1], grads[1][1], rtol=1e-12)


@pytest.mark.parametrize("params", [
    "num_output: 4 kernel_size: 3 pad: 1",
    "num_output: 3 kernel_size: 5 pad: 2 stride: 1",
    "num_output: 4 kernel_size: 3 stride: 1 dilation: 2 pad: 2",
    "num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 3"])
@pytest.mark.parametrize("channels", [2, 8])  # 8: large enough for the compiled im2col
def test_convolution_layouts_agree(monkeypatch: pytest.MonkeyPatch, params: str,
                                   channels: int) -> None:
    """One GEMM per image on Caffe's column layout, kh GEMMs per image on the row-shift
    columns, and the row layout (which the PyTorch oracle tests cover) give the same outputs
    and gradients."""
    from netforge.layers.vision import _ConvolutionBase
    from tests.helpers import blob, make_layer, tops

    rng = np.random.default_rng(12)
    x = rng.normal(size=(8, channels, 16, 17))  # 16·17 = 272 output pixels
    results = []
    for layout in ("rows", "images", "shifted"):
        monkeypatch.setattr(_ConvolutionBase, "_layout",
                            lambda self, pixels, dtype, layout=layout: layout)
        layer = make_layer("Convolution", f"convolution_param {{ {params} "
                                          "weight_filler { type: 'gaussian' } "
                                          "bias_filler { type: 'gaussian' } }")
        bottom, top = [blob(data=x.copy())], tops(1)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        top[0].diff[...] = np.random.default_rng(13).normal(size=top[0].shape)
        layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), bottom[0].diff.copy(),
                        [b.diff.copy() for b in layer.blobs]))
    (y1, dx1, g1) = results[0]
    assert np.abs(dx1).max() > 0 and np.abs(g1[0]).max() > 0
    for y2, dx2, g2 in results[1:]:
        np.testing.assert_allclose(y2, y1, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx2, dx1, rtol=1e-12, atol=1e-12)
        for a, b in zip(g2, g1, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_convolution_layout_choice() -> None:
    """With a backend that fuses the row-shift products: those for a stride of 1 in height,
    no groups and at least 64 output pixels. Otherwise per image when an image has at least
    256 output pixels and no fewer than its column entries (LeNet's conv1 without numba); the
    row layout for the rest (LeNet's conv2 without numba, grouped layers)."""
    from tests.helpers import blob, make_layer, tops

    def layout(channels: int, size: int, extra: str = "", fused: bool = True) -> str:
        layer = make_layer("Convolution", f"convolution_param {{ num_output: 4 kernel_size: 5 "
                                          f"{extra} }}")
        layer.backend = NumpyBackend("float64", compiled=fused)
        bottom, top = [blob(data=np.zeros((1, channels, size, size)))], tops(1)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        return str(layer._layout(top[0].shape[2] * top[0].shape[3], bottom[0].data.dtype))

    assert layout(1, 28, fused=False) == "images"      # 576 pixels, 25 entries
    assert layout(20, 12, fused=False) == "rows"       # 64 pixels
    assert layout(20, 24, fused=False) == "rows"       # 400 pixels, 500 entries
    assert layout(20, 30, fused=False) == "images"     # 676 pixels, 500 entries
    assert layout(2, 28, "group: 2", fused=False) == "rows"  # grouped: the group slices
    if not NumpyBackend().fuses_conv("float64"):
        return
    assert layout(1, 28) == layout(20, 12) == layout(20, 24) == "shifted"
    assert layout(20, 11) == "rows"                    # 49 pixels
    assert layout(2, 28, "group: 2") == "rows"
    assert layout(3, 40, "stride: 2") == "images"      # 324 pixels, 75 entries
    assert layout(3, 28, "stride: 2") == "rows"        # 144 pixels
    assert layout(3, 28, "stride_h: 1 stride_w: 2") == "shifted"
    assert layout(3, 40, "stride_h: 2 stride_w: 1") == "images"


@pytest.mark.parametrize(("layer_type", "channels", "params", "expected"), [
    ("Convolution", 20, "kernel_size: 5", False),   # LeNet's conv2: kw values at a time win
    ("Convolution", 32, "kernel_size: 5", True),    # cifar10_quick's conv2 and conv3
    ("Convolution", 18, "kernel_size: 3", True),
    ("Convolution", 17, "kernel_size: 3", False),
    ("Convolution", 32, "kernel_size: 7", True),    # 32 channels always
    ("Convolution", 31, "kernel_size: 7", False),
    ("Convolution", 6, "kernel_size: 1 stride: 2", True),
    ("Convolution", 64, "kernel_size: 3 group: 2", False),  # groups: Caffe's order
    ("Deconvolution", 64, "kernel_size: 3", False),
])
def test_convolution_row_entry_order(layer_type: str, channels: int, params: str,
                                     expected: bool) -> None:
    """Row-layout columns are ordered (i, j, c) where im2col's C-value copies beat Caffe's
    kw-value ones: C ≥ min(32, 6·kw), no groups, not Deconvolution."""
    from tests.helpers import blob, make_layer, tops

    layer = make_layer(layer_type, f"convolution_param {{ num_output: 4 {params} }}")
    layer.setup([blob(data=np.zeros((1, channels, 9, 9)))], tops(1))
    assert layer.channels_last is expected


def test_layer_buffers_grow_per_key_and_are_reused() -> None:
    """One scratch block per key: smaller shapes reuse it, a larger one replaces it, so parts
    of different sizes and changing batch sizes do not pile up memory."""
    from tests.helpers import make_layer

    layer = make_layer("ReLU")
    a = layer.buffer("rows.0", (4, 6))
    b = layer.buffer("rows.0", (3, 5))
    assert b.shape == (3, 5) and b.flags.c_contiguous and np.shares_memory(a, b)
    c = layer.buffer("rows.0", (5, 6))
    assert not np.shares_memory(a, c)
    assert np.shares_memory(c, layer.buffer("rows.0", (4, 6)))
    assert not np.shares_memory(c, layer.buffer("rows.1", (4, 6)))
    assert len(layer._bufs) == 2


def _parallel_in_child(queue: Any) -> None:
    backend = NumpyBackend("float64", workers=2)
    queue.put(backend.parallel(lambda s, k: (s, k), 4))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork of a threaded process
def test_batch_pool_works_in_a_forked_child() -> None:
    """A process forked after the pool started its threads (multiprocessing's default on
    Linux) must get threads of its own, not wait forever on its parent's."""
    import multiprocessing

    backend = NumpyBackend("float64", workers=2)
    if backend.workers != 2:
        pytest.skip("no per-thread BLAS control here: batch parallelism is off")
    backend.parallel(lambda s, k: k, 2)  # the parent's worker thread exists now
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_parallel_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in backend.parallel")
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [(0, 0), (1, 1), (0, 2), (1, 3)]


@kernels_available
@pytest.mark.parametrize("decay", [0.0, 5e-4])
def test_compiled_sgd_update_matches_numpy_bit_for_bit(decay: float) -> None:
    """The fused update rounds every product and sum to float32 as NumPy's passes do, so
    training gives the same weights with and without numba."""
    rng = np.random.default_rng(7)
    fast, slow = NumpyBackend(), NumpyBackend(compiled=False)
    arrays = [rng.normal(size=(300, 200)).astype(np.float32) for _ in range(3)]
    results = []
    for backend in (fast, slow):
        data, diff, history = (a.copy() for a in arrays)
        assert backend.compiled == (backend is fast)
        for _ in range(3):
            backend.sgd_update(data, diff, history, decay, 0.01, 0.9, np.empty_like(data))
        results.append((data, diff, history))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[0][0], arrays[0])
    np.testing.assert_array_equal(results[0][1], results[0][2])  # diff = history, as Caffe


@kernels_available
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("slope", [0.0, 0.01])
def test_compiled_relu_matches_numpy_bit_for_bit(dtype: str, slope: float) -> None:
    """The compiled ReLU (blocks of the flattened array shared out over every worker) gives
    NumPy's bits, signed zeros, infinities and NaNs included, in place and not."""
    fast, slow = NumpyBackend(dtype), NumpyBackend(dtype, compiled=False)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 5, 200, 201)).astype(dtype)  # over parallel_min: split in parts
    x.reshape(-1)[:6] = [-0.0, 0.0, np.nan, np.inf, -np.inf, -1.0]
    dy = rng.normal(size=x.shape).astype(dtype)
    dy.reshape(-1)[6:9] = [np.inf, -0.0, np.nan]
    assert fast.use_compiled(x.size) and x.size >= fast.parallel_min
    got, want = np.full_like(x, 7.0), np.full_like(x, 8.0)
    fast.relu(x, got, slope)
    slow.relu(x, want, slope)
    assert got.tobytes() == want.tobytes()
    assert np.signbit(got.reshape(-1)[0]) == bool(slope)  # max(-0.0, 0) is +0.0
    with np.errstate(invalid="ignore"):  # inf · 0 in NumPy's product
        dgot, dwant = np.full_like(x, 7.0), np.full_like(x, 8.0)
        fast.relu_backward(got, dy, dgot, slope)  # from the output, as in place
        slow.relu_backward(x, dy, dwant, slope)
        assert dgot.tobytes() == dwant.tobytes()
        inplace = x.copy()
        fast.relu(inplace, inplace, slope)
        assert inplace.tobytes() == want.tobytes()
        grad = dy.copy()
        fast.relu_backward(inplace, grad, grad, slope)
        assert grad.tobytes() == dwant.tobytes()
        # under compiled_min (LeNet's relu1: 64 x 500) the kernel runs on the caller alone
        small, dsmall = x.reshape(-1)[:32000].reshape(64, 500), dy.reshape(-1)[:32000]
        assert small.size < fast.compiled_min
        a, b, da, db = small.copy(), np.empty_like(small), dsmall.copy(), np.empty_like(small)
        fast.relu(a, a, slope)
        slow.relu(small, b, slope)
        fast.relu_backward(a, da.reshape(a.shape), da.reshape(a.shape), slope)
        slow.relu_backward(small, dsmall.reshape(a.shape), db, slope)
        assert a.tobytes() == b.tobytes() and da.tobytes() == db.tobytes()
    # shared work, played out one call after the other: the first call makes its own blocks,
    # then takes the second's from the back; the second finds none left
    from netforge.backend import kernels
    from netforge.backend.base import even_slices

    flat = x.reshape(-1)
    blocks = kernels.relu_blocks(flat.size)
    assert blocks > 2 and flat.size % kernels.RELU_BLOCK  # a short last block
    work = kernels.work_counter(even_slices(blocks, 2))
    shared, second = np.full_like(flat, 7.0), np.full_like(flat, 7.0)
    kernels.relu(flat, shared, slope, claim=work)
    kernels.relu(flat, second, slope, claim=work)
    assert shared.tobytes() == want.tobytes() and (second == 7.0).all()
    with np.errstate(invalid="ignore"):
        work = kernels.work_counter(even_slices(blocks, 2))
        dshared = np.full_like(flat, 7.0)
        kernels.relu_backward(flat, dy.reshape(-1), dshared, slope, claim=work)
        assert dshared.tobytes() == dwant.tobytes()


fused_available = pytest.mark.skipif(not NumpyBackend().fuses_conv("float32"),
                                     reason="needs numba and NumPy's OpenBLAS (blas.gemm)")


@fused_available
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["images", "rows", "hwc"])
@pytest.mark.parametrize("case", [BIG[0], BIG[3]])  # each case compiles kernels (~1 s)
def test_fused_convolution_forward_gives_the_unfused_bits(
        case: tuple[int, ...], layout: str, dtype: str) -> None:
    """conv_forward_* as one compiled call (im2col, OpenBLAS's GEMM, layout change and bias a
    block of images at a time) against the same steps made one after another over the whole
    batch (the Backend defaults): the same columns and, per image, the same bits (the row
    layout's GEMM over a block's rows may round differently in the last bit), with every
    image's columns left in a full buffer and with block-sized scratch, with and without a
    bias, blocks that do not divide the batch."""
    from netforge.backend.base import Backend, conv_out_size

    n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw = case
    geometry = case[4:]
    fast = NumpyBackend(dtype)
    fast.compiled_min = 1  # every size takes the compiled path
    rng = np.random.default_rng(21)
    x = rng.normal(size=(n, c, h, w)).astype(dtype)
    k, o = c * kh * kw, 7
    p = conv_out_size(h, kh, sh, ph, dh) * conv_out_size(w, kw, sw, pw, dw)
    w2 = rng.normal(size=(o, k)).astype(dtype)
    assert fast._fused_gemm(x, w2) is not None
    tol = 1e-4 if dtype == "float32" else 1e-12  # sums of up to 400 products ~1
    for block_bytes in (1, 3 * k * p * x.itemsize):  # blocks of 1 image, of 3 (n is even)
        fast.block_bytes = block_bytes
        block = fast.conv_block(n, k * p * x.itemsize)
        assert block == max(1, block_bytes // (k * p * x.itemsize)) and n % block in (0, n % 3)
        for bias in (rng.normal(size=o).astype(dtype), None):
            want = np.full((n, o, p), 3.0, dtype)
            got = np.full((n, o, p), 4.0, dtype)
            if layout == "images":
                full = np.full((n, k, p), 5.0, dtype)
                Backend.conv_forward_images(fast, x, w2, bias, want, full, geometry)
                for cols in (np.full((n, k, p), 6.0, dtype), np.empty((1, k, p), dtype)):
                    got[...] = 4.0
                    fast.conv_forward_images(x, w2, bias, got, cols, geometry)
                    assert got.tobytes() == want.tobytes()
                    if cols.shape[0] == n:  # kept for backward: every image's columns
                        assert cols.tobytes() == full.tobytes()
            else:
                last = layout == "hwc"
                wt = np.ascontiguousarray(w2.T)
                full = np.full((n * p, k), 5.0, dtype)
                Backend.conv_forward_rows(fast, x, wt, bias, want, full,
                                          np.empty((n * p, o), dtype), geometry, last)
                buffers = ((np.full((n * p, k), 6.0, dtype), np.empty((n * p, o), dtype)),
                           (np.empty((block * p, k), dtype), np.empty((block * p, o), dtype)))
                for cols, rows in buffers:
                    got[...] = 4.0
                    fast.conv_forward_rows(x, wt, bias, got, cols, rows, geometry, last)
                    # OpenBLAS may round a GEMM over fewer rows differently in the last bit
                    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
                    if cols.shape[0] == n * p:
                        assert cols.tobytes() == full.tobytes()


@fused_available
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize(("channels", "size", "params"), [
    (1, 20, "num_output: 6 kernel_size: 5"),  # row-shift (LeNet's conv1)
    (6, 10, "num_output: 5 kernel_size: 3 pad: 1"),  # row-shift, padded
    (3, 40, "num_output: 4 kernel_size: 5 stride: 2"),  # per image
    (6, 7, "num_output: 5 kernel_size: 3 pad: 1"),  # rows, (c, i, j)
    (32, 9, "num_output: 4 kernel_size: 3 stride: 2 pad: 1")])  # rows, (i, j, c)
def test_convolution_with_the_fused_forward_matches_numpy(phase: str, channels: int, size: int,
                                                          params: str) -> None:
    """A Convolution on the fused forward (two workers) against the same layer on NumPy
    alone: outputs, and the gradients made from the columns the fused forward kept (TRAIN) or
    that backward recomputed."""
    from netforge.layers.base import PHASE_TEST, PHASE_TRAIN
    from tests.helpers import blob, make_layer, tops

    fused = NumpyBackend("float64", workers=2)
    fused.compiled_min = 1
    x = np.random.default_rng(31).normal(size=(6, channels, size, size))
    results = []
    for backend in (fused, NumpyBackend("float64", compiled=False, workers=1)):
        layer = make_layer("Convolution", f"convolution_param {{ {params} "
                           "weight_filler { type: 'gaussian' } bias_filler { type: 'gaussian' } }",
                           phase=PHASE_TRAIN if phase == "TRAIN" else PHASE_TEST)
        layer.backend = backend
        bottom, top = [blob(data=x.copy())], tops(1)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        kept = getattr(layer, "_kept", {})
        assert (bool(kept) and backend is fused) == (phase == "TRAIN" and backend is fused)
        top[0].diff[...] = np.random.default_rng(32).normal(size=top[0].shape)
        layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), bottom[0].diff.copy(),
                        [b.diff.copy() for b in layer.blobs]))
    (y1, dx1, g1), (y2, dx2, g2) = results
    np.testing.assert_allclose(y1, y2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@fused_available
@pytest.mark.parametrize("layout", ["images", "rows", "hwc"])
@pytest.mark.parametrize("case", [BIG[0], BIG[3]])
def test_fused_convolution_backward_matches_the_unfused_steps(case: tuple[int, ...],
                                                              layout: str) -> None:
    """conv_backward_rows / conv_backward_images in one compiled call (a block of images, or
    one image, at a time: the weight gradient accumulated block by block, the column gradient
    and col2im) against the Backend defaults over the whole batch: with the columns kept from
    forward or made again, with and without the bottom gradient, blocks of one image and of
    three."""
    from netforge.backend.base import Backend, conv_out_size

    n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw = case
    geometry, last = case[4:], layout == "hwc"
    fast = NumpyBackend("float64")
    fast.compiled_min = 1
    rng = np.random.default_rng(41)
    x = rng.normal(size=(n, c, h, w))
    k, o = c * kh * kw, 5
    p = conv_out_size(h, kh, sh, ph, dh) * conv_out_size(w, kw, sw, pw, dw)
    dy = rng.normal(size=(n, o, p))
    weights = rng.normal(size=(o, k))
    images = layout == "images"
    cols = fast.im2col(x, *geometry) if images else fast.im2col_rows(x, *geometry,
                                                                      channels_last=last)

    def backward(kind: type[Backend], dw: Any, dx: Any, buffer: Any, block: int,
                 recompute: bool) -> None:
        """The given class's method, on the compiled backend."""
        if images:
            kind.conv_backward_images(fast, x, dy, weights, dw, dx, buffer, geometry, recompute)
        else:
            kind.conv_backward_rows(fast, x, dy, weights, dw, dx, buffer,
                                    np.empty((block * p, o)), geometry, last, recompute)

    want_dw, want_dx = np.empty((o, k)), np.empty(x.shape)
    backward(Backend, want_dw, want_dx, cols.copy(), n, False)
    for block_bytes in (1, 3 * k * p * 8):
        fast.block_bytes = block_bytes
        block = fast.conv_block(n, k * p * 8)
        for recompute in (False, True):
            for down in (True, False):
                got_dw, got_dx = np.full((o, k), 7.0), np.full(x.shape, 8.0)
                buffer = cols.copy()
                if recompute:
                    buffer = np.full((block, k, p) if images else (block * p, k), 9.0)
                backward(NumpyBackend, got_dw, got_dx if down else None, buffer, block,
                         recompute)
                np.testing.assert_allclose(got_dw, want_dw, rtol=1e-12, atol=1e-12)
                if down:
                    np.testing.assert_allclose(got_dx, want_dx, rtol=1e-12, atol=1e-12)
                else:
                    assert (got_dx == 8.0).all()
                    if not recompute:  # the kept columns stay usable
                        np.testing.assert_array_equal(buffer, cols)


@pytest.mark.parametrize("compiled", [True, False])
def test_backend_matmul_takes_transposed_and_sliced_operands(
        monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Backend.matmul (NumpyBackend: OpenBLAS's GEMM from a compiled call) on C-ordered,
    transposed and row-sliced operands, into a slice of rows, replacing or accumulating, in
    both dtypes one after the other (the float32 call once ran through the code compiled for
    float64); operands whose rows and columns are both strided take NumPy's matmul."""
    monkeypatch.setattr(NumpyBackend, "gemm_min", 0)  # these small products too
    rng = np.random.default_rng(71)
    for dtype in ("float64", "float32", "float64"):
        backend = NumpyBackend(dtype, compiled=compiled)
        tol = 1e-5 if dtype == "float32" else 1e-12
        a = rng.normal(size=(9, 12)).astype(dtype)
        b = rng.normal(size=(12, 7)).astype(dtype)
        cases = [(a, b), (a.T.copy().T, b), (a[:, 2:9].T, a[:, :5]), (b[:, 1:6].T, b.T[:5].T),
                 (a[::2, ::3], b[:4, ::2])]
        for x, y in cases:
            out = np.full((11, x.shape[0], y.shape[1]), 5.0, dtype)[3]  # rows of a block
            backend.matmul(x, y, out)
            np.testing.assert_allclose(out, x.astype(np.float64) @ y, rtol=tol, atol=tol)
            backend.matmul(x, y, out, accumulate=True)
            np.testing.assert_allclose(out, 2 * (x.astype(np.float64) @ y), rtol=tol, atol=tol)


SHIFTED = [  # n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw: stride 1 in height
    BIG[0],
    BIG[2],
    (3, 4, 10, 9, 3, 3, 1, 2, 2, 5, 1, 2),  # columns of x wholly in the padding
    (2, 3, 6, 7, 1, 1, 1, 1, 0, 0, 1, 1),
    (3, 1, 11, 10, 5, 5, 1, 2, 2, 1, 1, 1),  # few inputs per output: Caffe's full columns
    (2, 2, 9, 12, 2, 3, 1, 1, 1, 0, 2, 2),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", SHIFTED)
def test_shifted_columns_hold_caffes_columns_row_by_row(case: tuple[int, ...],
                                                        dtype: str) -> None:
    """Row-shift columns (N, C·kw, (H + 2·ph)·ow): window i (entries i·dh·ow to i·dh·ow + P)
    of row c·kw + j is Caffe's column row (c, i, j), bit for bit; the compiled kernel and its
    adjoint give the NumPy steps' bits, and the adjoint is the transpose."""
    from netforge.backend import kernels
    from netforge.backend.base import Backend, conv_out_size

    n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw = case
    geometry = case[4:]
    backend = NumpyBackend(dtype, compiled=False)
    oh, ow = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    rng = np.random.default_rng(51)
    x = rng.normal(size=(n, c, h, w)).astype(dtype)
    cols = Backend.shifted_columns(backend, x, geometry)
    assert cols.shape == (n, c * kw, (h + 2 * ph) * ow)
    caffe = backend.im2col(x, *geometry).reshape(n, c, kh, kw, oh * ow)
    for i in range(kh):
        window = cols.reshape(n, c, kw, -1)[..., i * dh * ow:i * dh * ow + oh * ow]
        assert window.tobytes() == np.ascontiguousarray(caffe[:, :, i]).tobytes()
    r = rng.normal(size=cols.shape).astype(dtype)
    back = Backend.shifted_columns_adjoint(backend, r, x.shape, geometry)
    tol = 1e-4 if dtype == "float32" else 1e-12
    assert float((cols * r).sum()) == pytest.approx(float((x * back).sum()), rel=tol)
    if not kernels.AVAILABLE:
        return
    got = np.full(cols.shape, 7.0, dtype)
    kernels.columns(x, got, geometry, oh, ow, "shifted", adjoint=False)
    assert got.tobytes() == cols.tobytes()
    image = np.full(x.shape, 8.0, dtype)
    kernels.columns(image, r, geometry, oh, ow, "shifted", adjoint=True)
    assert image.tobytes() == back.tobytes()


@fused_available
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", SHIFTED)
def test_fused_shifted_convolution_matches_the_numpy_steps(case: tuple[int, ...], dtype: str,
                                                           full: bool,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """conv_forward_shifted / conv_backward_shifted as one compiled call per part (per image:
    the columns, kh GEMMs accumulating in place, the bias, or with few inputs per output and
    ``full`` one GEMM over Caffe's columns copied from them, the bias folded in; backward the
    weight gradient per window, the bias gradient, the column gradient and its col2im) against
    the Backend defaults' NumPy steps and a convolution made from Caffe's columns: with every
    image's columns kept and with one image's scratch, with and without a bias and the bottom
    gradient."""
    from netforge.backend import kernels
    from netforge.backend.base import Backend, conv_out_size

    monkeypatch.setattr(kernels, "FULL_COLUMNS", full)

    n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw = case
    geometry = case[4:]
    fast = NumpyBackend(dtype)
    fast.compiled_min = 1
    rng = np.random.default_rng(61)
    x = rng.normal(size=(n, c, h, w)).astype(dtype)
    o = 5
    p = conv_out_size(h, kh, sh, ph, dh) * conv_out_size(w, kw, sw, pw, dw)
    weights = rng.normal(size=(o, c, kh, kw)).astype(dtype)
    dy = rng.normal(size=(n, o, p)).astype(dtype)
    caffe = fast.im2col(x, *geometry)  # (N, K, P)
    tol = 1e-4 if dtype == "float32" else 1e-12
    cols = Backend.shifted_columns(fast, x, geometry)
    for bias in (rng.normal(size=o).astype(dtype), None):
        want = np.matmul(weights.reshape(o, -1), caffe)
        if bias is not None:
            want += bias.reshape(1, -1, 1)
        for kind in (Backend, NumpyBackend):
            for buffer in (np.full(cols.shape, 6.0, dtype), np.empty((1, *cols.shape[1:]), dtype)):
                got = np.full((n, o, p), 4.0, dtype)
                kind.conv_forward_shifted(fast, x, weights, bias, got, buffer, geometry)
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
                if buffer.shape[0] == n:  # kept for backward: every image's columns
                    assert buffer.tobytes() == cols.tobytes()

    want_dw = np.einsum("nop,nkp->ok", dy, caffe).reshape(weights.shape)
    want_db = dy.astype(np.float64).sum(axis=(0, 2))
    want_dx = fast.col2im(np.matmul(weights.reshape(o, -1).T, dy), x.shape, *geometry)
    for kind in (Backend, NumpyBackend):
        for recompute in (False, True):
            for down in (True, False):
                dw, dx = np.full(weights.shape, 7.0, dtype), np.full(x.shape, 8.0, dtype)
                db = np.full(o, 6.0, dtype) if down else None  # with and without a bias
                buffer = (np.full((1, *cols.shape[1:]), 9.0, dtype) if recompute
                          else cols.copy())
                kind.conv_backward_shifted(fast, x, dy, weights, dw, db, dx if down else None,
                                           buffer, geometry, recompute)
                np.testing.assert_allclose(dw, want_dw, rtol=tol, atol=tol * 10)
                if db is not None:
                    np.testing.assert_allclose(db, want_db, rtol=tol, atol=tol * 10)
                if down:
                    np.testing.assert_allclose(dx, want_dx, rtol=tol, atol=tol * 10)
                else:
                    assert (dx == 8.0).all()
                    if not recompute:  # the kept columns stay usable
                        assert buffer.tobytes() == cols.tobytes()


@fused_available
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shifted_convolution_shares_out_images(dtype: str) -> None:
    """Shared work (Backend.shares_work), played out one call after the other: a call makes
    its own part's images, then takes those left at the back of the others' parts, so every
    image is made once, with the bits of a call that makes them all; backward makes the weight
    and bias gradients of each chunk it owns (whichever call that is) and the bottom gradients
    of the images it takes."""
    from netforge.backend import kernels
    from netforge.backend.base import even_slices

    geometry = (3, 3, 1, 1, 1, 1, 1, 1)
    n, c, size, o = 7, 4, 9, 5
    fast = NumpyBackend(dtype)
    fast.compiled_min = 1
    rng = np.random.default_rng(5)
    x = rng.normal(size=(n, c, size, size)).astype(dtype)
    weights = rng.normal(size=(o, c, 3, 3)).astype(dtype)
    bias = rng.normal(size=o).astype(dtype)
    dy = rng.normal(size=(n, o, size * size)).astype(dtype)
    cols = np.empty((n, c * 3, (size + 2) * size), dtype)
    want = np.empty((n, o, size * size), dtype)
    fast.conv_forward_shifted(x, weights, bias, want, cols, geometry)
    parts = even_slices(n, 2)

    work = fast.work_counter(parts)
    first, second = np.full_like(want, np.nan), np.full_like(want, np.nan)
    fast.conv_forward_shifted(x, weights, bias, first, np.empty_like(cols), geometry,
                              claim=work)  # owns part 0, then takes part 1 from the back
    fast.conv_forward_shifted(x, weights, bias, second, np.empty_like(cols), geometry,
                              claim=work)  # owns part 1: nothing left
    assert first.tobytes() == want.tobytes() and np.isnan(second).all()

    want_dx, want_dw, want_db = np.empty_like(x), np.empty_like(weights), np.empty(o, dtype)
    fast.conv_backward_shifted(x, dy, weights, want_dw, want_db, want_dx, cols.copy(),
                               geometry, False)
    scratch = np.empty((1, *cols.shape[1:]), dtype)
    dw = np.full((2, *weights.shape), np.nan, dtype)
    db, dx = np.full((2, o), np.nan, dtype), np.full_like(x, np.nan)
    work = fast.work_counter(parts)
    work[kernels.CLAIMS] = 1  # part 0 is another call's, which has not started yet
    fast.conv_backward_shifted(x, dy, weights, dw, db, dx, cols, geometry, False,
                               chunks=parts, claim=work, scratch=scratch)
    assert np.isnan(dw[0]).all() and np.isnan(db[0]).all()  # not this call's chunk
    assert dx.tobytes() == want_dx.tobytes()  # its own images, then all of part 0's
    work[kernels.CLAIMS], work[kernels.PARTS] = 0, 1  # now part 0's owner runs
    fast.conv_backward_shifted(x, dy, weights, dw, db, dx, cols, geometry, False,
                               chunks=parts, claim=work, scratch=scratch)
    assert dx.tobytes() == want_dx.tobytes()
    tol = 1e-4 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(dw[0] + dw[1], want_dw, rtol=tol, atol=tol)
    np.testing.assert_allclose(db[0] + db[1], want_db, rtol=tol, atol=tol)
    # a call whose chunk another has begun taking from the back makes the chunk's weight
    # gradient, then the bottom gradients left (here: all but the last image's)
    work = fast.work_counter(parts)
    last = parts[0].stop - 1
    work[kernels.RANGES] = (parts[0].start << 32) | last  # image `last` taken by another call
    work[kernels.PARTS] = 1
    dw2, db2, dx2 = np.full_like(dw, np.nan), np.full_like(db, np.nan), np.full_like(x, np.nan)
    fast.conv_backward_shifted(x, dy, weights, dw2, db2, dx2, cols, geometry, False,
                               chunks=parts, claim=work, scratch=scratch)
    assert dw2[0].tobytes() == dw[0].tobytes() and db2[0].tobytes() == db[0].tobytes()
    assert dx2[:last].tobytes() == want_dx[:last].tobytes() and np.isnan(dx2[last:]).all()
    for k, part in enumerate(parts):  # each chunk's sums are its own images'
        alone = np.empty_like(weights)
        fast.conv_backward_shifted(x[part], dy[part], weights, alone, None, None,
                                   cols[part].copy(), geometry, False)
        assert alone.tobytes() == dw[k].tobytes()


def test_a_backend_without_shared_work_refuses_a_claim() -> None:
    """The NumPy steps make every image in each call: a claim given to them (a caller that did
    not ask shares_work) is refused, not made twice over."""
    slow = NumpyBackend("float64", compiled=False, workers=2)
    assert not slow.shares_work(np.zeros((4, 3, 9, 9)))
    geometry = (3, 3, 1, 1, 1, 1, 1, 1)
    x, w = np.zeros((2, 3, 9, 9)), np.zeros((4, 3, 3, 3))
    cols, y = np.zeros((2, 9, 11 * 9)), np.zeros((2, 4, 81))
    with pytest.raises(ValueError, match="work_counter: the numpy backend does not share"):
        slow.work_counter([slice(0, 2)])
    with pytest.raises(ValueError, match="conv_forward_shifted: the numpy backend"):
        slow.conv_forward_shifted(x, w, None, y, cols, geometry, claim=np.zeros(24, np.int64))
    with pytest.raises(ValueError, match="conv_backward_shifted: the numpy backend"):
        slow.conv_backward_shifted(x, y, w, np.zeros_like(w), None, None, cols, geometry, False,
                                   claim=np.zeros(24, np.int64))
    # nor does it pool inside a convolution
    assert not slow.fuses_pooling(y)
    pool = ((2, 2, 2, 2, 0, 0), np.zeros((2, 4, 5, 5)), None)
    with pytest.raises(ValueError, match="conv_forward_shifted: the numpy backend does not "
                                         "pool inside a convolution"):
        slow.conv_forward_shifted(x, w, None, y, cols, geometry, pool=pool)
    with pytest.raises(ValueError, match="conv_backward_shifted: the numpy backend does not "
                                         "pool"):
        slow.conv_backward_shifted(x, y, w, np.zeros_like(w), None, None, cols, geometry, False,
                                   pool=pool)


@fused_available
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("size", "pad", "pool"), [
    (12, 0, (2, 2, 2, 2, 0, 0)),  # LeNet's: the planes stacked (windows tile the rows)
    (11, 2, (3, 3, 2, 2, 0, 0)),  # cifar10_quick's: CEIL overhang, the padded plane
    (9, 1, (3, 3, 2, 2, 1, 1)),  # padding: the clipped windows
])
def test_shifted_convolution_pools_each_image(dtype: str, size: int, pad: int,
                                              pool: tuple[int, ...]) -> None:
    """conv_forward_shifted with ``pool`` gives the convolution's output and the MAX pooling
    of it (values and argmax, or values alone) with the bits of the two calls one after the
    other; conv_backward_shifted with ``pool`` makes the top gradient from the pooling's (and
    writes it) and gives the bits of max_pool_backward followed by the plain call, also where
    another call has taken an image's bottom gradient before the chunk's owner made its top
    gradient (shared work played out one call after the other)."""
    from netforge.backend import kernels
    from netforge.backend.base import even_slices

    n, c, o, k = 6, 3, 4, 5
    geometry = (k, k, 1, 1, pad, pad, 1, 1)
    fast = NumpyBackend(dtype, workers=2)
    fast.compiled_min = 1
    assert fast.fuses_pooling(np.zeros(8, dtype))
    rng = np.random.default_rng(17)
    x = rng.normal(size=(n, c, size, size)).astype(dtype)
    weights = rng.normal(size=(o, c, k, k)).astype(dtype)
    bias = rng.normal(size=o).astype(dtype)
    side = size + 2 * pad - k + 1
    cols = np.empty((n, c * k, (size + 2 * pad) * side), dtype)
    want = np.empty((n, o, side * side), dtype)
    fast.conv_forward_shifted(x, weights, bias, want, cols, geometry)
    kh, _, sh, _, ph, _ = pool
    out = -(-(side + 2 * ph - kh) // sh) + 1
    out -= ph > 0 and (out - 1) * sh >= side + ph
    best, arg = np.empty((n, o, out, out), dtype), np.empty((n, o, out, out), np.int32)
    values = np.empty_like(best)
    kernels.max_pool(want.reshape(n, o, side, side), best, arg, pool)
    kernels.max_pool_values(want.reshape(n, o, side, side), values, pool)
    parts = even_slices(n, 2)
    for keep in (best, None):
        got, got_best, got_arg = (np.full_like(a, 7) for a in (want, best, arg))
        work = fast.work_counter(parts)
        for _ in parts:  # the first call makes every image: its own part, then the other's
            fast.conv_forward_shifted(x, weights, bias, got, cols.copy(), geometry, claim=work,
                                      pool=(pool, got_best, None if keep is None else got_arg))
        assert got.tobytes() == want.tobytes()
        assert got_best.tobytes() == (values if keep is None else best).tobytes()
        assert (got_arg == 7).all() if keep is None else got_arg.tobytes() == arg.tobytes()

    pdy = rng.normal(size=best.shape).astype(dtype)
    dy = np.empty_like(want)
    kernels.max_pool_backward(pdy, arg, dy.reshape(n, o, side, side), pool)
    want_dx, want_dw = np.empty_like(x), np.empty((2, *weights.shape), dtype)
    want_db = np.empty((2, o), dtype)
    fast.conv_backward_shifted(x, dy, weights, want_dw, want_db, want_dx, cols.copy(), geometry,
                               False, chunks=parts, claim=fast.work_counter(parts),
                               scratch=np.empty((1, *cols.shape[1:]), dtype))
    for other_first in (False, True):
        got_dy, dx = np.full_like(dy, 7), np.full_like(x, 7)
        dw, db = np.full_like(want_dw, 7), np.full_like(want_db, 7)
        # the first call owns every chunk, or (other_first) only part 1: part 0 is another
        # call's, which has not started, and the first takes its images' bottom gradients from
        # the back before their top gradients are made and written by part 0's owner
        work = fast.work_counter(parts)
        if other_first:
            work[kernels.CLAIMS] = 1
        for call in range(2):
            fast.conv_backward_shifted(x, got_dy, weights, dw, db, dx, cols.copy(), geometry,
                                       False, chunks=parts, claim=work,
                                       scratch=np.empty((1, *cols.shape[1:]), dtype),
                                       pool=(pool, pdy, arg))
            if call == 0:
                assert not (dx == 7).any() and not (got_dy[parts[1]] == 7).any()
                assert (got_dy[parts[0]] == 7).all() == other_first
                if other_first:
                    work[kernels.CLAIMS], work[kernels.PARTS] = 0, 1  # part 0's owner runs
        for a, b in ((got_dy, dy), (dx, want_dx), (dw, want_dw), (db, want_db)):
            assert a.tobytes() == b.tobytes()


@kernels_available
@pytest.mark.parametrize("kind", ["max", "ave"])
def test_pooling_shares_out_images(kind: str) -> None:
    """The pooling kernels with shared work: two calls on one work array, one after the other,
    make every image once (the first takes the second's part from the back), with the bits of
    one call over the whole batch; forward and backward."""
    from netforge.backend import kernels
    from netforge.backend.base import even_slices

    geometry = (2, 2, 2, 2, 0, 0)  # stacked planes
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 3, 8, 8)).astype(np.float32)
    dy = rng.normal(size=(5, 3, 4, 4)).astype(np.float32)
    parts = even_slices(5, 2)
    size = np.full((4, 4), 4.0, np.float32)

    def both(run: Any, *outs: np.ndarray) -> list[np.ndarray]:
        whole = [np.full_like(a, -7) for a in outs]
        run(*whole, claim=None)
        shared = [np.full_like(a, -7) for a in outs]
        work = kernels.work_counter(parts)
        run(*shared, claim=work)
        again = [np.full_like(a, -7) for a in outs]
        run(*again, claim=work)
        assert all((a == -7).all() for a in again)  # nothing left for the second call
        for a, b in zip(whole, shared, strict=True):
            assert a.tobytes() == b.tobytes()
        return whole

    if kind == "max":
        _, arg = both(lambda b, a, claim: kernels.max_pool(x, b, a, geometry, claim=claim),
                      np.empty_like(dy), np.empty(dy.shape, np.int32))
        both(lambda d, claim: kernels.max_pool_backward(dy, arg, d, geometry, claim=claim),
             np.empty_like(x))
    else:
        both(lambda y, claim: kernels.ave_pool(x, y, size, geometry, claim=claim),
             np.empty_like(dy))
        both(lambda d, claim: kernels.ave_pool_backward(dy, d, size, geometry, claim=claim),
             np.empty_like(x))


@kernels_available
def test_kernels_made_per_geometry_have_names_and_uuids_of_their_own() -> None:
    """numba names compiled code by qualified name and a per-process counter, and finds cached
    closures by their cells pickled (a numba function pickles with its uuid): each kernel made
    for a geometry, and each helper it calls, carries its key in both, so a kernel loaded from
    the cache links to its own helpers (not another geometry's, which gave wrong outputs) and
    is found again in the next process."""
    from netforge.backend import kernels

    names, uuids = set(), set()
    for geometry in ((3, 3, 2, 2, 2, 1, 1, 1, True), (3, 3, 2, 2, 1, 1, 1, 1, True)):
        kernel = kernels._kernel("conv_rows", geometry)
        key = "netforge.kernels:conv_rows:" + ":".join(map(str, geometry))
        assert kernel._uuid == key
        for f in [kernel, *(c.cell_contents for c in kernel.py_func.__closure__)]:
            if hasattr(f, "py_func"):
                names.add(f.py_func.__qualname__)
                uuids.add(f._uuid)
    assert len(names) == len(uuids) == 6  # per geometry a kernel and its im2col; rows_to_images
    # with and without a bias, shared
    assert kernels._kernel("im2col_hwc", (3, 3, 2, 2, 1, 1, 1, 1)).py_func.__qualname__.endswith(
        "_im2col_hwc_3_3_2_2_1_1_1_1")


_CACHE_PROBE = """
import numpy as np
from netforge.backend import blas, kernels
x = np.ones((2, 1, 8, 8), np.float32)
w, b = np.ones((3, 1, 3, 3), np.float32), np.zeros(3, np.float32)
y, cols = np.empty((2, 3, 36), np.float32), np.empty((2, 3, 48), np.float32)
best, arg = np.empty((2, 3, 3, 3), np.float32), np.empty((2, 3, 3, 3), np.int32)
pool = (2, 2, 2, 2, 0, 0)
kernels.conv_forward_shifted(blas.gemm_for(x.dtype), x, w, b, y, cols, (3, 3, 1, 1, 0, 0, 1, 1),
                             6, 6, pool=(pool, best, arg))
kernels.max_pool(y.reshape(2, 3, 6, 6), best, arg, pool)
fused = kernels._kernel("conv_shifted_max", (3, 3, 1, 1, 0, 0, 1, 1, *pool))
print(sum(fused.stats.cache_hits.values()),
      sum(kernels._kernel("max", pool).stats.cache_hits.values()))
"""


@fused_available
def test_kernels_load_from_numbas_cache_in_a_new_process(tmp_path: Path) -> None:
    """A kernel whose closure calls a module-level compiled function (every MAX pooling, so
    every convolution that pools) is found in numba's on-disk cache by the next process, not
    compiled again in each one (the hash of its closure included those functions' uuids)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True,
                           text=True, check=True, timeout=600).stdout.split()
            for _ in range(2)]
    assert runs == [["0", "0"], ["1", "1"]]  # compiled, then loaded
