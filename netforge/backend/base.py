"""The interface every array backend provides."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def conv_out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Caffe's convolution output size: floor((size + 2p - (d(k-1)+1)) / s) + 1."""
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


def even_slices(n: int, count: int) -> list[slice]:
    """[0, n) cut into at most ``count`` (at least one) consecutive slices of equal size, the
    last possibly shorter."""
    size = max(1, -(-n // max(1, count)))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class Backend(ABC):
    """An array module (``xp``) plus the few kernels that need a device-specific fast path.

    ``xp`` is numpy or cupy. ``dtype`` is the float type of every blob (float32 by default;
    float64 for gradient checks). Random numbers are drawn on the host from a numpy
    ``Generator`` that the net owns, so that runs with one seed are repeatable.
    """

    name = "abstract"
    xp: Any
    # True when the backend has compiled pooling kernels (max_pool, ave_pool, ...).
    compiled = False

    def use_compiled(self, size: int) -> bool:
        """Whether an operation over ``size`` elements should use the compiled kernels."""
        return False

    def __init__(self, dtype: str = "float32"):
        self.dtype = np.dtype(dtype)

    # -- batch parallelism ------------------------------------------------------------------------
    # How many parts of a batch run at once (1: everything in the caller, the device's own
    # parallelism doing the rest).
    workers = 1
    # Below this much work (multiply-adds, or elements touched) a layer does not split its
    # batch: waking a worker costs tens of microseconds, about what this much work takes.
    parallel_min = 1 << 19

    def batch_parts(self, n: int, cost: int, budget: int | None = None) -> list[slice]:
        """Slices of a batch of ``n`` items costing ``cost`` in all: one per worker when the
        work is worth splitting, and as many more (a multiple of the workers) as keep each
        part's cost within ``budget``."""
        count = 1 if budget is None else -(-cost // budget)
        if self.workers > 1 and cost >= self.parallel_min:
            count = -(-max(count, self.workers) // self.workers) * self.workers
        return even_slices(n, count)

    def map_parts(self, n: int, cost: int, fn: Callable[[slice], None],
                  deferred: bool = False) -> None:
        """fn(part) for the batch_parts of a batch of ``n`` items costing ``cost``, in
        parallel: for work whose parts write disjoint slices and need no scratch per worker.
        ``deferred`` as in ``parallel``."""
        parts = self.batch_parts(n, cost)
        self.parallel(lambda _, k: fn(parts[k]), len(parts), cost, deferred=deferred)

    def running(self) -> AbstractContextManager[None]:
        """Entered while a net runs forward or backward (the CPU backend pins BLAS to one
        thread per worker there)."""
        return nullcontext()

    def parallel(self, fn: Callable[[int, int], T], count: int, cost: int = 0,
                 deferred: bool = False, balanced: bool = False) -> list[T]:
        """[fn(worker, k) for k in range(count)]: part k runs on worker k mod ``workers``
        (worker 0 being the caller), the workers concurrently. ``cost`` is the work of all the
        parts, in batch_parts' units (a single big part may use the device's own threads).
        ``deferred``: each part begins with a compiled call (conv_*, pooling, ReLU, matmul),
        which may start the other workers itself (NumpyBackend: once it has let go of the
        GIL). ``balanced``: the parts share out their items (shares_work), so a worker that
        starts late does fewer of them: such a job takes the tasks waiting in ``later``."""
        return [fn(0, k) for k in range(count)]

    def later(self, task: Callable[[], None]) -> None:
        """Run ``task`` now or, on a backend with workers, beside the next balanced parallel
        job (on a worker other than the caller) or at finish_later(): for work that must be
        done before finish_later() returns but need not hold up the caller until then."""
        task()

    def finish_later(self) -> None:  # noqa: B027 - nothing waits by default
        """Run every task given to ``later`` that has not run yet."""

    # -- arrays -------------------------------------------------------------------------------
    def zeros(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.xp.zeros(shape, dtype=dtype or self.dtype)

    def empty(self, shape: tuple[int, ...], dtype: Any = None) -> Any:
        return self.xp.empty(shape, dtype=dtype or self.dtype)

    def asarray(self, a: Any, dtype: Any = None) -> Any:
        return self.xp.asarray(a, dtype=dtype or self.dtype)

    def to_numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def synchronize(self) -> None:  # noqa: B027 - a no-op by default, not abstract
        """Wait for queued device work (a no-op on the CPU); used for timing."""

    def pad(self, x: Any, ph: int, pw: int, value: float = 0.0, extra_h: int = 0,
            extra_w: int = 0) -> Any:
        """(N, C, H, W) ``x`` padded by ph/pw on every side (and extra rows/columns at the
        bottom/right) with ``value``; ``x`` itself when there is nothing to add."""
        if not (ph or pw or extra_h or extra_w):
            return x
        n, c, h, w = x.shape
        out = self.xp.full((n, c, h + 2 * ph + extra_h, w + 2 * pw + extra_w), value,
                           dtype=x.dtype)
        out[:, :, ph:ph + h, pw:pw + w] = x
        return out

    def matmul(self, a: Any, b: Any, out: Any, accumulate: bool = False) -> None:
        """out = a · b for 2-D arrays (out += a · b with ``accumulate``)."""
        if accumulate:
            out += self.xp.matmul(a, b)
        else:
            self.xp.matmul(a, b, out=out)

    # -- the two layout changes around a row-layout GEMM (Convolution) ----------------------
    def rows_to_images(self, rows: Any, bias: Any, out: Any) -> None:
        """out (N, C, P) = rows (N·P, C), each image's block transposed, plus ``bias`` (C,)
        per channel unless it is None."""
        n, c, p = out.shape
        images = rows.reshape(n, p, c).transpose(0, 2, 1)
        if bias is None:
            out[...] = images
        else:
            self.xp.add(images, bias.reshape(1, -1, 1), out=out)

    def images_to_rows(self, images: Any, out: Any) -> None:
        """out (N·P, C) = images (N, C, P), each image transposed: rows_to_images undone."""
        n, c, p = images.shape
        out.reshape(n, p, c)[...] = images.transpose(0, 2, 1)

    # -- work shared by concurrent calls -----------------------------------------------------------
    # The calls that take a ``claim`` (a work_counter) run on every worker at once with the same
    # one: each works through a part of the images of its own and then takes images left in the
    # others' parts, so a worker that started later or runs slower does fewer instead of the
    # others waiting for it at the end of the layer. Results depend on no worker's share: an
    # image's values are made the same way whoever makes them, and sums over images are kept
    # per part (fixed by the caller) and added in part order.
    def shares_work(self, array: Any) -> bool:
        """Whether the calls that take a ``claim`` accept one for arrays like ``array`` (the
        largest they are given), on more than one worker."""
        return False

    def work_counter(self, parts: list[slice]) -> Any:
        """The ``claim`` for one piece of shared work cut into ``parts`` (consecutive slices of
        the items): each call owns one part and takes items from others' when its own has
        none left. Only a backend whose shares_work is true makes one; this one refuses."""
        self._refuse_claim("work_counter")

    # A row-shift convolution followed by MAX pooling can pool each image while its output is
    # in cache, and take each image's top gradient from the pooling's as it needs it (``pool``
    # of conv_forward_shifted and conv_backward_shifted), instead of two more passes over the
    # batch: a backend that can says so here.
    def fuses_pooling(self, array: Any) -> bool:
        """Whether conv_forward_shifted and conv_backward_shifted take ``pool`` for outputs like
        ``array``."""
        return False

    def _refuse_pool(self, call: str) -> None:
        raise ValueError(f"{call}: the {self.name} backend does not pool inside a convolution "
                         "(ask Backend.fuses_pooling first)")

    def _refuse_claim(self, call: str) -> None:
        """Shared work asked of a backend without it: the caller skipped shares_work (this
        backend's calls each make every item, so two of them would make them all twice)."""
        raise ValueError(f"{call}: the {self.name} backend does not share work between "
                         "calls here (ask Backend.shares_work first)")

    # -- a convolution's forward: columns, GEMM and layout change in one call --------------------
    def fuses_conv(self, dtype: Any) -> bool:
        """Whether conv_forward_* make the columns a block of images at a time."""
        return False

    def conv_block(self, n: int, image_bytes: int) -> int:
        """How many of ``n`` images' columns (``image_bytes`` each) a convolution forward
        needs at once when it keeps none for backward: the column (and row) buffers it is
        given hold this many. All of them here; a backend that fuses the steps per block of
        images needs fewer."""
        return n

    def conv_forward_images(self, x: Any, w: Any, bias: Any, y: Any, cols: Any,
                            geometry: tuple[int, ...]) -> None:
        """y (N, O, P) = w (O, K) · im2col(x)ₙ (+ ``bias`` per channel unless None) for every
        image n of x (N, C, H, W); geometry = (kh, kw, sh, sw, ph, pw, dh, dw). ``cols``
        (N, K, P) is left holding every image's columns; a smaller one is scratch."""
        full = cols if cols.shape[0] == x.shape[0] else None
        col = self.im2col(x, *geometry, out=full)
        self.xp.matmul(w, col, out=y)
        if bias is not None:
            y += bias.reshape(1, -1, 1)

    def conv_forward_rows(self, x: Any, wt: Any, bias: Any, y: Any, cols: Any, rows: Any,
                          geometry: tuple[int, ...], channels_last: bool) -> None:
        """y (N, O, P) = (im2col_rows(x) · wt (K, O)) per image transposed (+ ``bias``).
        ``cols`` (N·P, K) is left holding the rows of columns and ``rows`` (N·P, O) the
        products; smaller ones (``conv_block`` images) are scratch."""
        n, p = x.shape[0], y.shape[2]
        full = cols if cols.shape[0] == n * p else None
        col = self.im2col_rows(x, *geometry, out=full, channels_last=channels_last)
        out = rows if rows.shape[0] == n * p else None
        self.rows_to_images(self.xp.matmul(col, wt, out=out), bias, y)

    def conv_backward_images(self, x: Any, dy: Any, w: Any, dw: Any, dx: Any, cols: Any,
                             geometry: tuple[int, ...], recompute: bool) -> None:
        """For dy (N, O, P): dw (O, K) = Σₙ dyₙ · colsₙᵀ and, unless dx is None, dx (N, C, H,
        W) = col2im(wᵀ · dyₙ) per image. ``cols`` holds Caffe's columns of x (N, K, P) kept
        from forward (used up when dx is made), or with ``recompute`` is a buffer to make them
        in again, which may hold a single image's."""
        n = dy.shape[0]
        col = cols
        if recompute:
            col = self.im2col(x, *geometry, out=cols if cols.shape[0] == n else None)
        # per image (colₙ · dyₙᵀ), summed, transposed: the large operand untransposed reads
        # faster (cifar10_quick's conv1: 4.9 vs 5.8 ms)
        dw[...] = self.xp.matmul(col, dy.transpose(0, 2, 1)).sum(axis=0).T
        if dx is not None:
            self.col2im(self.xp.matmul(w.T, dy, out=col), dx.shape, *geometry, out=dx)

    def conv_backward_rows(self, x: Any, dy: Any, w: Any, dw: Any, dx: Any, cols: Any,
                           rows: Any, geometry: tuple[int, ...], channels_last: bool,
                           recompute: bool) -> None:
        """For dy (N, O, P) as rows R (N·P, O): dw (O, K) = Rᵀ · cols and, unless dx is None,
        dx (N, C, H, W) = col2im_rows(R · w (O, K)). ``cols`` holds the im2col rows of x
        (N·P, K) kept from forward (used up when dx is made), or with ``recompute`` is a
        buffer to make them in again, which like ``rows`` may be smaller (conv_block
        images)."""
        n, p = dy.shape[0], dy.shape[2]
        col = cols
        if recompute:
            full = cols if cols.shape[0] == n * p else None
            col = self.im2col_rows(x, *geometry, out=full, channels_last=channels_last)
        r = rows if rows.shape[0] == n * p else self.empty((n * p, dy.shape[1]), dy.dtype)
        self.images_to_rows(dy, r)
        self.xp.matmul(r.T, col, out=dw)
        if dx is not None:
            self.col2im_rows(self.xp.matmul(r, w, out=col), dx.shape, *geometry, out=dx,
                             channels_last=channels_last)

    # -- a convolution in the row-shift layout: stride 1 in height, no groups ---------------------
    # Columns that hold each padded input row once per kernel column j (C·kw rows of
    # (H + 2·ph)·ow entries per image) instead of once per kernel entry (i, j): kernel row i is
    # the window of those columns shifted by i·dh·ow, and the convolution is kh GEMMs over
    # windows of one buffer (a memory-efficient convolution: Cho & Brand, ICML 2017). kh times
    # less im2col and col2im. Weights as wk (kh, O, C·kw) = W transposed (i, o, c, j).
    def shifted_columns(self, x: Any, geometry: tuple[int, ...], out: Any = None) -> Any:
        """(N, C, H, W) -> (N, C·kw, (H + 2·ph)·ow): entry (c·kw + j, y·ow + x) is pixel
        (y, x·sw + j·dw) of the zero-padded image."""
        _, kw, _, sw, ph, pw, _, dw = geometry
        n, c, h, w = x.shape
        ow = conv_out_size(w, kw, sw, pw, dw)
        rows = h + 2 * ph
        if out is None:
            out = self.empty((n, c * kw, rows * ow), x.dtype)
        padded, view = self.pad(x, ph, pw), out.reshape(n, c, kw, rows, ow)
        for j in range(kw):
            view[:, :, j] = padded[:, :, :, j * dw:j * dw + (ow - 1) * sw + 1:sw]
        return out

    def shifted_columns_adjoint(self, cols: Any, shape: tuple[int, ...],
                                geometry: tuple[int, ...], out: Any = None) -> Any:
        """The adjoint of ``shifted_columns``: each entry summed back into its pixel (in j
        order), the padding dropped."""
        _, kw, _, sw, ph, pw, _, dw = geometry
        n, c, h, w = shape
        ow = conv_out_size(w, kw, sw, pw, dw)
        padded = self.zeros((n, c, h + 2 * ph, w + 2 * pw), cols.dtype)
        view = cols.reshape(n, c, kw, h + 2 * ph, ow)
        for j in range(kw):
            padded[:, :, :, j * dw:j * dw + (ow - 1) * sw + 1:sw] += view[:, :, j]
        if out is None:
            out = self.empty(shape, cols.dtype)
        out[...] = padded[:, :, ph:ph + h, pw:pw + w]
        return out

    def conv_forward_shifted(self, x: Any, w: Any, bias: Any, y: Any, cols: Any,
                             geometry: tuple[int, ...], claim: Any = None,
                             pool: Any = None) -> None:
        """y (N, O, P) = Σᵢ W's kernel row i (O, C·kw) · window i of the row-shift columns of
        x[n] (entries i·dh·ow to i·dh·ow + P) (+ ``bias``), for W (O, C, kh, kw) and a stride
        of 1 in height. ``cols`` (N, C·kw, rows·ow) is left holding every image's columns; a
        smaller one is scratch. With ``claim``, only the images this call takes from it. With
        ``pool`` = ((kh, kw, sh, sw, ph, pw), best, argmax or None) (fuses_pooling), each
        image's output is also MAX-pooled into ``best``, as the Pooling layer would."""
        if claim is not None:
            self._refuse_claim("conv_forward_shifted")
        if pool is not None:
            self._refuse_pool("conv_forward_shifted")
        n, p = x.shape[0], y.shape[2]
        kh, step = geometry[0], self._shift_step(x, geometry)
        wk = self._by_kernel_row(w)
        col = self.shifted_columns(x, geometry, out=cols if cols.shape[0] == n else None)
        self.xp.matmul(wk[0], col[:, :, :p], out=y)
        for i in range(1, kh):
            y += self.xp.matmul(wk[i], col[:, :, i * step:i * step + p])
        if bias is not None:
            y += bias.reshape(1, -1, 1)

    def conv_forward_shifted_call(self, x: Any, w: Any, bias: Any, y: Any, cols: Any,
                                  geometry: tuple[int, ...], pool: Any = None
                                  ) -> Callable[[Any], None]:
        """conv_forward_shifted on these arrays as a call that takes ``claim``, for a layer that
        makes it once and calls it at each iteration while its arrays stay the same: a backend
        does its checks and argument work here, once (the call runs on one thread at a
        time)."""
        def call(claim: Any) -> None:
            self.conv_forward_shifted(x, w, bias, y, cols, geometry, claim, pool)

        return call

    def conv_backward_shifted_call(self, x: Any, dy: Any, w: Any, dw: Any, db: Any, dx: Any,
                                   cols: Any, geometry: tuple[int, ...], recompute: bool,
                                   chunks: Sequence[slice] | None = None, scratch: Any = None,
                                   pool: Any = None) -> Callable[[Any], None]:
        """conv_backward_shifted as a call that takes ``claim`` (see
        conv_forward_shifted_call)."""
        def call(claim: Any) -> None:
            self.conv_backward_shifted(x, dy, w, dw, db, dx, cols, geometry, recompute, chunks,
                                       claim, scratch, pool)

        return call

    def conv_backward_shifted(self, x: Any, dy: Any, w: Any, dw: Any, db: Any, dx: Any,
                              cols: Any, geometry: tuple[int, ...], recompute: bool,
                              chunks: Sequence[slice] | None = None, claim: Any = None,
                              scratch: Any = None, pool: Any = None) -> None:
        """For dy (N, O, P) and W (O, C, kh, kw): dw (O, C, kh, kw) with kernel row i (as O,
        C·kw) = Σₙ dyₙ · (window i of colsₙ)ᵀ, db (unless None) = Σ dy per channel and,
        unless dx is None, dx = the adjoint of the columns of Σᵢ (W's row i)ᵀ · dyₙ placed at
        window i. ``cols`` holds the row-shift columns of x kept from forward (used up when
        dx is made), or with ``recompute`` is a buffer to make them in again, which may hold
        one image's. Shared work (``claim``): dw (len(chunks), O, C, kh, kw) and db
        (len(chunks), O) hold each chunk's sums, made by the call that took the chunk; dx is
        made for the images taken; ``scratch`` holds one image's columns. With ``pool`` =
        ((kh, kw, sh, sw, ph, pw), top gradient, argmax) (fuses_pooling), dy is first made,
        image by image, as the MAX pooling's bottom gradient for that top gradient and
        argmax."""
        if claim is not None:
            self._refuse_claim("conv_backward_shifted")
        if pool is not None:
            self._refuse_pool("conv_backward_shifted")
        n, p = dy.shape[0], dy.shape[2]
        kh, step = geometry[0], self._shift_step(x, geometry)
        wk = self._by_kernel_row(w)
        col = cols
        if recompute:
            col = self.shifted_columns(x, geometry, out=cols if cols.shape[0] == n else None)
        o, c = dw.shape[:2]
        for i in range(kh):
            window = col[:, :, i * step:i * step + p]
            dw[:, :, i] = self.xp.matmul(dy, window.transpose(0, 2, 1)).sum(axis=0).reshape(
                o, c, -1)
        if db is not None:
            dy.sum(axis=2).sum(axis=0, out=db)
        if dx is not None:
            col[...] = 0
            for i in range(kh):
                col[:, :, i * step:i * step + p] += self.xp.matmul(wk[i].T, dy)
            self.shifted_columns_adjoint(col, dx.shape, geometry, out=dx)

    @staticmethod
    def _shift_step(x: Any, geometry: tuple[int, ...]) -> int:
        """How far apart kernel rows' windows start in row-shift columns: dh·ow entries."""
        _, kw, _, sw, _, pw, dh, dw = geometry
        return dh * conv_out_size(x.shape[3], kw, sw, pw, dw)

    @staticmethod
    def _by_kernel_row(w: Any) -> Any:
        """W (O, C, kh, kw) as (kh, O, C·kw): kernel row i in the row-shift columns' order."""
        o, c, kh, kw = w.shape
        return w.transpose(2, 0, 1, 3).reshape(kh, o, c * kw)

    # -- ReLU, written into a given array (in place when it is the input) -----------------------
    def relu(self, x: Any, y: Any, slope: float) -> None:
        """y = x where x > 0, else slope·x (Caffe's max(x, 0) + slope·min(x, 0))."""
        xp = self.xp
        if slope:
            y[...] = xp.where(x > 0, x, x * slope)
        else:
            xp.maximum(x, 0, out=y)

    def relu_backward(self, x: Any, dy: Any, dx: Any, slope: float) -> None:
        """dx = dy where x > 0, else slope·dy. ``x`` may be ReLU's output (the same signs for
        slope ≥ 0) and ``dx`` may be ``dy``."""
        xp = self.xp
        if slope:
            dx[...] = xp.where(x > 0, dy, dy * slope)
        else:
            xp.multiply(dy, x > 0, out=dx)

    def sgd_update(self, data: Any, diff: Any, history: Any, decay: float, lr: float,
                   momentum: float, tmp: Any) -> None:
        """Caffe's SGD step with L2 weight decay, in place, for one parameter blob:
        diff += decay·data; history = momentum·history + lr·diff; diff = history (Caffe leaves
        the update value in the diff); data -= history. ``tmp`` is a scratch array of the same
        shape."""
        xp = self.xp
        if decay:
            xp.multiply(data, decay, out=tmp)
            diff += tmp
        history *= momentum
        xp.multiply(diff, lr, out=tmp)
        history += tmp
        diff[...] = history
        data -= history

    # -- kernels: every backend implements these -----------------------------------------------
    @abstractmethod
    def im2col_rows(self, x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                    dh: int, dw: int, out: Any = None, channels_last: bool = False) -> Any:
        """(N, C, H, W) -> rows (N·oh·ow, C·kh·kw): one row per output pixel of every image,
        its entries ordered (c, i, j) like Caffe's columns, or (i, j, c) with
        ``channels_last``."""

    @abstractmethod
    def col2im_rows(self, col: Any, shape: tuple[int, ...], kh: int, kw: int, sh: int,
                    sw: int, ph: int, pw: int, dh: int, dw: int, out: Any = None,
                    channels_last: bool = False) -> Any:
        """The adjoint of ``im2col_rows`` (with the same entry order)."""

    @abstractmethod
    def sliding_windows(self, x: Any, kh: int, kw: int, sh: int, sw: int, oh: int, ow: int,
                        dh: int = 1, dw: int = 1) -> Any:
        """A read-only (N, C, kh, kw, oh, ow) view of the windows of an (N, C, H, W) array."""

    @abstractmethod
    def scatter_add(self, target: Any, flat_index: Any, values: Any) -> None:
        """``target.flat[flat_index] += values``, summing repeated indices."""

    @abstractmethod
    def im2col(self, x: Any, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
               dh: int, dw: int, out: Any = None) -> Any:
        """(N, C, H, W) -> (N, C·kh·kw, oh·ow) columns, rows ordered (c, i, j) like Caffe."""

    @abstractmethod
    def col2im(self, col: Any, shape: tuple[int, ...], kh: int, kw: int, sh: int, sw: int,
               ph: int, pw: int, dh: int, dw: int, out: Any = None) -> Any:
        """The adjoint of ``im2col``."""
