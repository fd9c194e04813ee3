"""The NumPy (CPU) backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

from netforge.backend import blas, kernels, threads
from netforge.backend.base import Backend, T, conv_out_size, even_slices
from netforge.backend.threads import shared_pool

# The windows view (N, C, kh, kw, oh, ow) in each column layout's axis order.
_WINDOW_AXES = {"rows": (0, 4, 5, 1, 2, 3), "hwc": (0, 4, 5, 2, 3, 1),
                "images": (0, 1, 2, 3, 4, 5)}


def _contiguous(*arrays: np.ndarray | None) -> bool:
    """Every array given (None skipped) C-contiguous, all of one dtype."""
    given = [a for a in arrays if a is not None]
    return all(a.flags.c_contiguous and a.dtype == given[0].dtype for a in given)


# Where every array the backend makes starts: a multiple of a cache line. NumPy's own arrays
# start 16 bytes into one (glibc's malloc puts a 16-byte header before the data of every block
# it maps, which is every block from 128 KiB up: LeNet's activations, columns and gradients), so
# every other 32-byte AVX load or store of the kernels and of OpenBLAS's edges spans two lines.
# Where malloc's blocks land depends on what the process did before; the first solver of a
# process had every large array 16 bytes off. LeNet's train step, in one process, solvers
# built old, new, new, old (16 rounds of 15 steps): 8.45 -> 7.82 ms, 16 of 16 rounds (conv2's
# forward -0.16 ms, its backward -0.39).
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...] | int, dtype: Any, zeroed: bool = False,
                  alignment: int | None = None) -> np.ndarray:
    """A C-contiguous array whose first element starts on an ``alignment``-byte boundary
    (ALIGNMENT by default), zero-filled with ``zeroed`` (lazily, as np.zeros is: the pages of
    a large array are the kernel's zero pages until written)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dtype = np.dtype(dtype)
    align = ALIGNMENT if alignment is None else alignment
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    raw = (np.zeros if zeroed else np.empty)(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class NumpyBackend(Backend):
    """NumPy arrays; with numba installed (netforge[fast]) the column and pooling loops run
    as compiled kernels (``compiled=False`` forces the pure-NumPy paths). Layers split their
    batch over ``workers`` threads (every core by default; see backend/threads.py)."""

    name = "numpy"
    xp = np

    def __init__(self, dtype: str = "float32", compiled: bool | None = None,
                 workers: int | None = None):
        super().__init__(dtype)
        self.compiled = kernels.AVAILABLE if compiled is None else compiled and kernels.AVAILABLE
        self._pool = shared_pool(workers)
        self.workers = self._pool.workers

    # A batch that cannot be split (one image) but has at least this much work gets every
    # core through BLAS's own threads; below it, waking them costs more than it saves
    # (LeNet's ip1 at batch 1: 0.3 ms with two BLAS threads, 0.04 ms with one).
    wide_min = 1 << 22

    def parallel(self, fn: Callable[[int, int], T], count: int, cost: int = 0,
                 deferred: bool = False, balanced: bool = False) -> list[T]:
        return self._pool.run(fn, count, wide=cost >= self.wide_min, deferred=deferred,
                              balanced=balanced)

    def later(self, task: Callable[[], None]) -> None:
        if self._pool.workers > 1:
            self._pool.later(task)
        else:
            task()

    def finish_later(self) -> None:
        self._pool.finish_later()

    def running(self) -> AbstractContextManager[None]:
        return self._pool.running()

    # -- arrays: each starts on a cache line (see aligned_empty) ----------------------------------
    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> np.ndarray:
        return aligned_empty(shape, dtype or self.dtype, zeroed=True)

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> np.ndarray:
        return aligned_empty(shape, dtype or self.dtype)

    # Below this many elements a kernel launch costs more than NumPy's loops.
    compiled_min = 32768

    def use_compiled(self, size: int) -> bool:
        return self.compiled and size >= self.compiled_min

    def sliding_windows(self, x: np.ndarray, kh: int, kw: int, sh: int, sw: int,
                        oh: int, ow: int, dh: int = 1, dw: int = 1) -> np.ndarray:
        """A read-only (N, C, kh, kw, oh, ow) view of the windows of an (N, C, H, W) array."""
        n, c = x.shape[:2]
        s = x.strides
        return as_strided(
            x, (n, c, kh, kw, oh, ow),
            (s[0], s[1], dh * s[2], dw * s[3], sh * s[2], sw * s[3]),
            writeable=False,
        )

    # -- columns, in two layouts: Caffe's per image (N, C·kh·kw, oh·ow), used by the Im2col
    # layer and by convolutions with many pixels per image, and rows (N·oh·ow, C·kh·kw), one
    # per output pixel of every image, so that a whole convolution is one GEMM against the
    # (C·kh·kw, num_output) weights. Entries are ordered (c, i, j) like Caffe's in both.
    def im2col(self, x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
               dh: int, dw: int, out: np.ndarray | None = None) -> np.ndarray:
        """(N, C, H, W) -> columns (N, C·kh·kw, oh·ow), written into ``out`` when it is given
        (and has the right shape), to reuse one buffer."""
        return self._im2col(x, (kh, kw, sh, sw, ph, pw, dh, dw), out, "images")

    def col2im(self, col: np.ndarray, shape: tuple[int, ...], kh: int, kw: int, sh: int,
               sw: int, ph: int, pw: int, dh: int, dw: int,
               out: np.ndarray | None = None) -> np.ndarray:
        """The adjoint of im2col: sums each column entry back into the pixel it came from
        (``out`` is overwritten when given)."""
        return self._col2im(col, shape, (kh, kw, sh, sw, ph, pw, dh, dw), out, "images")

    def im2col_rows(self, x: np.ndarray, kh: int, kw: int, sh: int, sw: int, ph: int,
                    pw: int, dh: int, dw: int, out: np.ndarray | None = None,
                    channels_last: bool = False) -> np.ndarray:
        """(N, C, H, W) -> rows (N·oh·ow, C·kh·kw), entries (c, i, j) or with
        ``channels_last`` (i, j, c); into ``out`` when it is given."""
        layout = "hwc" if channels_last else "rows"
        return self._im2col(x, (kh, kw, sh, sw, ph, pw, dh, dw), out, layout)

    def col2im_rows(self, col: np.ndarray, shape: tuple[int, ...], kh: int, kw: int, sh: int,
                    sw: int, ph: int, pw: int, dh: int, dw: int,
                    out: np.ndarray | None = None, channels_last: bool = False) -> np.ndarray:
        """The adjoint of im2col_rows: rows summed back into an (N, C, H, W) array (``out``
        is overwritten when given)."""
        layout = "hwc" if channels_last else "rows"
        return self._col2im(col, shape, (kh, kw, sh, sw, ph, pw, dh, dw), out, layout)

    def _im2col(self, x: np.ndarray, geometry: tuple[int, ...], out: np.ndarray | None,
                layout: str) -> np.ndarray:
        kh, kw, sh, sw, ph, pw, dh, dw = geometry
        n, c, h, w = x.shape
        oh = conv_out_size(h, kh, sh, ph, dh)
        ow = conv_out_size(w, kw, sw, pw, dw)
        k = c * kh * kw
        shape = (n, k, oh * ow) if layout == "images" else (n * oh * ow, k)
        if out is None or out.shape != shape or out.dtype != x.dtype:
            out = np.empty(shape, dtype=x.dtype)
        if self.use_compiled(out.size):
            kernels.columns(x, out, geometry, oh, ow, layout, adjoint=False)
            return out
        win = self.sliding_windows(self.pad(x, ph, pw), kh, kw, sh, sw, oh, ow, dh, dw)
        win = win.transpose(_WINDOW_AXES[layout])
        np.copyto(out.reshape(win.shape), win)
        return out

    def _col2im(self, col: np.ndarray, shape: tuple[int, ...], geometry: tuple[int, ...],
                out: np.ndarray | None, layout: str) -> np.ndarray:
        kh, kw, sh, sw, ph, pw, dh, dw = geometry
        n, c, h, w = shape
        oh = conv_out_size(h, kh, sh, ph, dh)
        ow = conv_out_size(w, kw, sw, pw, dw)
        if out is None or out.shape != tuple(shape) or out.dtype != col.dtype \
                or not out.flags.c_contiguous:
            out = np.empty(tuple(shape), dtype=col.dtype)
        if self.use_compiled(col.size):
            kernels.columns(out, col, geometry, oh, ow, layout, adjoint=True)
            return out
        if layout == "rows":
            windows = col.reshape(n, oh, ow, c, kh, kw).transpose(0, 3, 4, 5, 1, 2)
        elif layout == "hwc":
            windows = col.reshape(n, oh, ow, kh, kw, c).transpose(0, 5, 3, 4, 1, 2)
        else:
            windows = col.reshape(n, c, kh, kw, oh, ow)
        padded = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=col.dtype) if ph or pw else out
        if padded is out:
            padded[...] = 0
        for i in range(kh):  # each window offset's entries added into their pixels
            hi = i * dh
            for j in range(kw):
                wj = j * dw
                padded[:, :, hi:hi + sh * (oh - 1) + 1:sh,
                       wj:wj + sw * (ow - 1) + 1:sw] += windows[:, :, i, j]
        if ph or pw:
            out[...] = padded[:, :, ph:ph + h, pw:pw + w]
        return out

    # Pooling kernels (only when ``compiled``); geometry = (kh, kw, sh, sw, ph, pw). Each
    # runs over parts of the batch on every worker; the work is counted on the larger of the
    # arrays (a backward pass writes every element of the bottom gradient, four times the top
    # for 2x2 windows).
    def _per_part(self, kernel: Callable[..., None], batched: tuple[np.ndarray, ...],
                  *args: Any) -> None:
        """kernel(*parts of the arrays along their first axis, *args) on every worker (ReLU
        passes flattened arrays: parts of the elements); the caller's kernel starts the
        other workers (a deferred job)."""
        self.map_parts(batched[0].shape[0], max(a.size for a in batched),
                       lambda part: kernel(*(a[part] for a in batched), *args,
                                           post=self._pool.take_post()), deferred=True)

    def _shared(self, kernel: Callable[..., None], arrays: tuple[np.ndarray, ...], items: int,
                *args: Any) -> None:
        """kernel(*arrays, *args) on every worker at once, sharing out its ``items`` (images;
        ReLU's blocks) through a work_counter (see Backend.shares_work: each item's outputs are
        the same whoever makes them); in fixed parts of the arrays without shared work, and on
        the caller alone when the work is too small to split."""
        cost = max(a.size for a in arrays)
        if not threads.SHARE or len(self.batch_parts(items, cost)) <= 1:
            self._per_part(kernel, arrays, *args)
            return
        work = kernels.work_counter(even_slices(items, self.workers))
        self.parallel(lambda _, k: kernel(*arrays, *args, post=self._pool.take_post(),
                                          claim=work), self.workers, cost, deferred=True,
                      balanced=True)

    def max_pool(self, x: np.ndarray, best: np.ndarray, arg: np.ndarray,
                 geometry: tuple[int, ...]) -> None:
        self._shared(kernels.max_pool, (x, best, arg), x.shape[0], geometry)

    def max_pool_values(self, x: np.ndarray, best: np.ndarray,
                        geometry: tuple[int, ...]) -> None:
        self._shared(kernels.max_pool_values, (x, best), x.shape[0], geometry)

    def max_pool_backward(self, dy: np.ndarray, arg: np.ndarray, dx: np.ndarray,
                          geometry: tuple[int, ...]) -> None:
        self._shared(kernels.max_pool_backward, (dy, arg, dx), dx.shape[0], geometry)

    def ave_pool(self, x: np.ndarray, out: np.ndarray, size: np.ndarray,
                 geometry: tuple[int, ...]) -> None:
        self._shared(kernels.ave_pool, (x, out), x.shape[0], size, geometry)

    def ave_pool_backward(self, dy: np.ndarray, dx: np.ndarray, size: np.ndarray,
                          geometry: tuple[int, ...]) -> None:
        self._shared(kernels.ave_pool_backward, (dy, dx), dx.shape[0], size,
                     geometry)

    def rows_to_images(self, rows: np.ndarray, bias: np.ndarray | None,
                       out: np.ndarray) -> None:
        if self.use_compiled(out.size) and _contiguous(rows, out, bias):
            kernels.rows_to_images(rows, bias, out)
        else:
            super().rows_to_images(rows, bias, out)

    def images_to_rows(self, images: np.ndarray, out: np.ndarray) -> None:
        if self.use_compiled(out.size) and _contiguous(images, out):
            kernels.images_to_rows(images, out)
        else:
            super().images_to_rows(images, out)

    # A convolution's forward as one compiled call per part: im2col, OpenBLAS's GEMM and the
    # layout change for a block of images at a time (one image in Caffe's per-image layout), so
    # the GEMM reads columns still in the core's cache and the part never takes the GIL back.
    # Blocks of about this many bytes of columns (half of Zen 4's 1 MB L2).
    block_bytes = 1 << 19

    def _fused_gemm(self, *arrays: np.ndarray | None) -> Any:
        """CBLAS's GEMM for the arrays' dtype when the fused kernels can run on them. When
        they cannot, a deferred job's helpers are started here."""
        gemm = self._gemm_for(*arrays)
        if gemm is None:
            self._pool.post_pending()
        return gemm

    def _gemm_for(self, *arrays: np.ndarray | None) -> Any:
        """_fused_gemm without starting any helpers."""
        first = arrays[0]
        assert first is not None
        if self.use_compiled(first.size) and _contiguous(*arrays) and all(
                a is None or a.dtype == first.dtype for a in arrays):
            return blas.gemm_for(first.dtype)
        return None

    # Below this many multiply-adds NumPy's matmul (~8 µs for 0.3 M) beats the compiled call's
    # overhead (~10 µs more, mostly numba's dispatch).
    gemm_min = 1 << 20

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray,
               accumulate: bool = False) -> None:
        """OpenBLAS's GEMM from a compiled call (which starts a deferred job's other workers
        once it has let go of the GIL), accumulating in place; NumPy's matmul for products
        under ``gemm_min`` and arrays it cannot take (another dtype, strided rows and
        columns)."""
        if (self.compiled and a.shape[0] * a.shape[1] * b.shape[1] >= self.gemm_min
                and a.dtype == b.dtype == out.dtype):
            gemm = blas.gemm_for(a.dtype)
            if gemm is not None and kernels.gemm(gemm, a, b, out, accumulate,
                                                 self._pool.take_post()):
                return
        self._pool.post_pending()
        super().matmul(a, b, out, accumulate)

    def fuses_conv(self, dtype: Any) -> bool:
        return self.compiled and blas.gemm_for(dtype) is not None

    def shares_work(self, array: np.ndarray) -> bool:
        return (threads.SHARE and self.workers > 1 and self.use_compiled(array.size)
                and self.fuses_conv(array.dtype))

    def work_counter(self, parts: list[slice]) -> np.ndarray:
        if not self.compiled:  # the NumPy steps make every item in each call
            self._refuse_claim("work_counter")
        return kernels.work_counter(parts)

    def conv_block(self, n: int, image_bytes: int) -> int:
        if not self.fuses_conv(self.dtype):
            return n
        return min(n, max(1, self.block_bytes // max(image_bytes, 1)))

    @staticmethod
    def _out_hw(x: np.ndarray, geometry: tuple[int, ...]) -> tuple[int, int]:
        kh, kw, sh, sw, ph, pw, dh, dw = geometry
        return (conv_out_size(x.shape[2], kh, sh, ph, dh),
                conv_out_size(x.shape[3], kw, sw, pw, dw))

    def conv_forward_images(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                            y: np.ndarray, cols: np.ndarray, geometry: tuple[int, ...]) -> None:
        gemm = self._fused_gemm(y, x, w, bias, cols)
        if gemm is None:
            super().conv_forward_images(x, w, bias, y, cols, geometry)
        else:
            kernels.conv_forward_images(gemm, x, w, bias, y, cols, geometry,
                                        *self._out_hw(x, geometry), self._pool.take_post())

    def conv_forward_rows(self, x: np.ndarray, wt: np.ndarray, bias: np.ndarray | None,
                          y: np.ndarray, cols: np.ndarray, rows: np.ndarray,
                          geometry: tuple[int, ...], channels_last: bool) -> None:
        gemm = self._fused_gemm(y, x, wt, bias, cols, rows)
        if gemm is None:
            super().conv_forward_rows(x, wt, bias, y, cols, rows, geometry, channels_last)
            return
        n, p = x.shape[0], y.shape[2]
        block = self.conv_block(n, cols.shape[1] * p * cols.itemsize)
        if min(cols.shape[0], rows.shape[0]) < block * p:
            raise ValueError(f"conv_forward_rows: buffers for {block} images needed")
        kernels.conv_forward_rows(gemm, x, wt, bias, y, cols, rows, block, geometry,
                                  *self._out_hw(x, geometry), channels_last,
                                  self._pool.take_post())

    def conv_backward_images(self, x: np.ndarray, dy: np.ndarray, w: np.ndarray,
                             dw: np.ndarray, dx: np.ndarray | None, cols: np.ndarray,
                             geometry: tuple[int, ...], recompute: bool) -> None:
        gemm = self._fused_gemm(dy, x, w, dw, dx, cols)
        if gemm is None:
            super().conv_backward_images(x, dy, w, dw, dx, cols, geometry, recompute)
        elif not recompute and cols.shape[0] != dy.shape[0]:
            raise ValueError("conv_backward_images: kept columns for every image needed")
        else:
            kernels.conv_backward_images(gemm, x, dy, w, dw, dx, cols, recompute, geometry,
                                         *self._out_hw(x, geometry), self._pool.take_post())

    def conv_backward_rows(self, x: np.ndarray, dy: np.ndarray, w: np.ndarray, dw: np.ndarray,
                           dx: np.ndarray | None, cols: np.ndarray, rows: np.ndarray,
                           geometry: tuple[int, ...], channels_last: bool,
                           recompute: bool) -> None:
        gemm = self._fused_gemm(dy, x, w, dw, dx, cols, rows)
        if gemm is None:
            super().conv_backward_rows(x, dy, w, dw, dx, cols, rows, geometry, channels_last,
                                       recompute)
            return
        n, p = dy.shape[0], dy.shape[2]
        block = self.conv_block(n, cols.shape[1] * p * cols.itemsize)
        if min(cols.shape[0], rows.shape[0]) < block * p or (
                not recompute and cols.shape[0] != n * p):
            raise ValueError(f"conv_backward_rows: buffers for {block} images needed")
        kernels.conv_backward_rows(gemm, x, dy, w, dw, dx, cols, rows, recompute, block,
                                   geometry, *self._out_hw(x, geometry), channels_last,
                                   self._pool.take_post())

    def fuses_pooling(self, array: np.ndarray) -> bool:
        return self.use_compiled(array.size) and self.fuses_conv(array.dtype)

    def conv_forward_shifted(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                             y: np.ndarray, cols: np.ndarray, geometry: tuple[int, ...],
                             claim: Any = None, pool: Any = None) -> None:
        self.conv_forward_shifted_call(x, w, bias, y, cols, geometry, pool)(claim)

    def conv_forward_shifted_call(self, x: np.ndarray, w: np.ndarray, bias: np.ndarray | None,
                                  y: np.ndarray, cols: np.ndarray, geometry: tuple[int, ...],
                                  pool: Any = None) -> Callable[[Any], None]:
        gemm = self._gemm_for(y, x, w, bias, cols)
        if gemm is None:  # the NumPy steps

            def steps(claim: Any) -> None:
                self._pool.post_pending()
                Backend.conv_forward_shifted(self, x, w, bias, y, cols, geometry, claim, pool)

            return steps
        call = kernels.conv_forward_shifted_call(gemm, x, w, bias, y, cols, geometry,
                                                 *self._out_hw(x, geometry), pool)
        take_post = self._pool.take_post
        return lambda claim: call(take_post(), claim)

    def conv_backward_shifted(self, x: np.ndarray, dy: np.ndarray, w: np.ndarray,
                              dw: np.ndarray, db: np.ndarray | None, dx: np.ndarray | None,
                              cols: np.ndarray, geometry: tuple[int, ...], recompute: bool,
                              chunks: Sequence[slice] | None = None, claim: Any = None,
                              scratch: Any = None, pool: Any = None) -> None:
        self.conv_backward_shifted_call(x, dy, w, dw, db, dx, cols, geometry, recompute,
                                        None if claim is None else chunks, scratch, pool)(claim)

    def conv_backward_shifted_call(self, x: np.ndarray, dy: np.ndarray, w: np.ndarray,
                                   dw: np.ndarray, db: np.ndarray | None,
                                   dx: np.ndarray | None, cols: np.ndarray,
                                   geometry: tuple[int, ...], recompute: bool,
                                   chunks: Sequence[slice] | None = None, scratch: Any = None,
                                   pool: Any = None) -> Callable[[Any], None]:
        gemm = self._gemm_for(dy, x, w, dw, db, dx, cols)
        if gemm is None:  # the NumPy steps

            def steps(claim: Any) -> None:
                self._pool.post_pending()
                Backend.conv_backward_shifted(self, x, dy, w, dw, db, dx, cols, geometry,
                                              recompute, chunks, claim, scratch, pool)

            return steps
        if not recompute and cols.shape[0] != dy.shape[0]:
            raise ValueError("conv_backward_shifted: kept columns for every image needed")
        bounds = None
        if chunks:
            bounds = np.array([c.start for c in chunks] + [chunks[-1].stop], np.int64)
        call = kernels.conv_backward_shifted_call(gemm, x, dy, w, dw, db, dx, cols, recompute,
                                                  geometry, *self._out_hw(x, geometry), bounds,
                                                  scratch, pool)
        take_post = self._pool.take_post

        def run(claim: Any) -> None:
            if (claim is None) != (bounds is None):
                raise ValueError("conv_backward_shifted: shared work needs its chunks, and "
                                 "chunks a claim")
            call(take_post(), claim)

        return run

    # ReLU as one compiled pass per part of the flattened array, on every worker (NumPy's
    # expressions make temporaries and run on one core): cifar10_quick's three ReLUs (26 MB
    # of activations and gradients a step) took ~5.7 ms less a step in an in-process A/B.
    # Below compiled_min the kernel runs on the caller alone, called directly (LeNet's relu1,
    # 32,000 elements in place: 3.3 against NumPy's 12.6 µs forward, 4.4 against 8.6
    # backward); a one-part job around it would cost more than NumPy's passes.
    def relu(self, x: np.ndarray, y: np.ndarray, slope: float) -> None:
        if not (self.compiled and _contiguous(x, y)):
            super().relu(x, y, slope)
        elif self.use_compiled(x.size):
            self._shared(kernels.relu, (x.reshape(-1), y.reshape(-1)),
                         kernels.relu_blocks(x.size), slope)
        else:
            kernels.relu(x.reshape(-1), y.reshape(-1), slope)

    def relu_backward(self, x: np.ndarray, dy: np.ndarray, dx: np.ndarray,
                      slope: float) -> None:
        if not (self.compiled and _contiguous(x, dy, dx)):
            super().relu_backward(x, dy, dx, slope)
        elif self.use_compiled(x.size):
            self._shared(kernels.relu_backward, (x.reshape(-1), dy.reshape(-1), dx.reshape(-1)),
                         kernels.relu_blocks(x.size), slope)
        else:
            kernels.relu_backward(x.reshape(-1), dy.reshape(-1), dx.reshape(-1), slope)

    def softmax_loss(self, x: np.ndarray, labels: np.ndarray, ignore: int | None,
                     prob: np.ndarray, floor: float) -> tuple[float, int, float | None]:
        """SoftmaxWithLoss's forward in one compiled pass (``compiled`` only): prob = the
        softmax of x (outer, K, inner) along axis 1; returns (Σ −log max(p_label, floor) over
        the labels that count, their number, None), or (0, 0, v) for a label v (as stored)
        outside [0, K) that is not ``ignore``."""
        return kernels.softmax_loss(np.ascontiguousarray(x), labels.reshape(-1), ignore, prob,
                                    floor)

    def softmax_loss_backward(self, prob: np.ndarray, labels: np.ndarray, ignore: int | None,
                              scale: float, diff: np.ndarray) -> None:
        """diff = (prob − onehot(label))·scale, 0 where the label is ignored."""
        kernels.softmax_loss_backward(prob, labels.reshape(-1), ignore, scale, diff)

    def sgd_update(self, data: np.ndarray, diff: np.ndarray, history: np.ndarray,
                   decay: float, lr: float, momentum: float, tmp: np.ndarray) -> None:
        """One pass over the blob instead of six (the same float32 operations in the same
        order, so the same bits): LeNet's update 0.36 -> 0.14 ms. Small blobs too: NumPy's
        six calls on a bias cost more than the compiled call (in a step, out of cache: conv2's
        weights 48 -> 26 µs, conv1's 38 -> 27 µs). Splitting big blobs over the workers was
        measured and not kept: LeNet's update took the same time in a step (471 vs 485 µs)."""
        if self.compiled and data.dtype == np.float32 and _contiguous(
                data, diff, history):
            kernels.sgd_update(data.reshape(-1), diff.reshape(-1), history.reshape(-1),
                               decay, lr, momentum)
            return
        super().sgd_update(data, diff, history, decay, lr, momentum, tmp)

    def scatter_add(self, target: np.ndarray, flat_index: Any, values: Any) -> None:
        """target.flat[flat_index] += values, summing repeated indices."""
        target += np.bincount(flat_index.ravel(), weights=values.ravel(),
                              minlength=target.size).reshape(target.shape).astype(target.dtype)
