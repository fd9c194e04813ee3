"""Vision layers on (N, C, H, W) blobs, with Caffe's geometry: Convolution, Deconvolution,
Im2col, Pooling and SPP.

Convolution is im2col into the row layout (one row per output pixel) followed by one matrix
product per group; its backward is the two transposed products and col2im (with a fusing
backend, most layers without groups run per image on row-shift columns instead, kh products
over windows of columns kh times smaller: _ConvolutionBase._layout). The batch is split
into parts that run on every core at once (backend.parallel). Deconvolution is the same
machinery run the other way round (Caffe's BaseConvolutionLayer with reversed dimensions): its
forward is Convolution's backward-data and its backward-data is Convolution's forward. Im2col
exposes the column buffer itself. Pooling runs compiled kernels (one per window geometry) on
parts of the batch, or without numba works on strided slices of a padded input, one slice per
kernel offset, so the Python loop runs over kh·kw and never over images or channels; SPP runs
one Pooling per pyramid level, as Caffe builds it, and concatenates the flattened results.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from netforge.backend.base import Backend, even_slices
from netforge.blob import Blob
from netforge.layers.base import PHASE_TRAIN, Layer, LayerError, register
from netforge.proto import pb

FLT_MAX = 3.4028234663852886e38  # Caffe starts every max at -FLT_MAX, whatever the dtype


def _hw(msg: Any, name: str, prefix: str, default: int | None) -> tuple[int, int]:
    """A (h, w) pair from ``name`` (one value for both axes, or h, w) or from ``prefix_h`` and
    ``prefix_w``, which must come together and exclude ``name`` (Caffe's rule)."""
    has_h, has_w = msg.HasField(f"{prefix}_h"), msg.HasField(f"{prefix}_w")
    value = getattr(msg, name)
    if isinstance(value, int):  # Pooling's fields are scalars, Convolution's repeated
        values = [value] if msg.HasField(name) else []
    else:
        values = list(value)
    if has_h or has_w:
        if not (has_h and has_w):
            raise LayerError(f"{prefix}_h and {prefix}_w must be given together")
        if values:
            raise LayerError(f"give {name} or {prefix}_h and {prefix}_w, not both")
        return int(getattr(msg, f"{prefix}_h")), int(getattr(msg, f"{prefix}_w"))
    if not values:
        if default is None:
            raise LayerError(f"{name} (or {prefix}_h and {prefix}_w) is required")
        return default, default
    if len(values) > 2:
        raise LayerError(f"{name} takes 1 or 2 values for 2-D input, got {len(values)}")
    return int(values[0]), int(values[-1])


def _pair_str(p: tuple[int, int]) -> str:
    return str(p[0]) if p[0] == p[1] else f"{p[0]}x{p[1]}"


def _check_4d(bottom: Sequence[Blob], what: str) -> None:
    for b in bottom:
        if b.num_axes != 4:
            raise LayerError(f"{what} takes 4-D (N, C, H, W) input, got shape {b.shape}")


def _strided(x: Any, i: int, j: int, sh: int, sw: int, oh: int, ow: int) -> Any:
    """The (N, C, oh, ow) view of x at kernel offset (i, j): x[n, c, i + sh·y, j + sw·x]."""
    return x[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]


# -- convolution geometry, shared by Convolution, Deconvolution and Im2col -------------------------

@dataclass(frozen=True)
class _ConvGeometry:
    """kernel, stride, pad and dilation (each (h, w)) of a convolution_param, and the column
    transforms they define: im2col maps (N, C, H, W) to (N, C·kh·kw, oh·ow), col2im is its
    adjoint (the sum of every column entry back into its pixel)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def parse(cls, p: pb.ConvolutionParameter, what: str) -> _ConvGeometry:
        axis = p.axis + 4 if p.axis < 0 else p.axis
        if axis != 1:
            raise LayerError(f"{what} supports only axis 1 (channels) for 4-D input, "
                             f"got axis {p.axis}")
        kernel = _hw(p, "kernel_size", "kernel", None)
        stride = _hw(p, "stride", "stride", 1)
        pad = _hw(p, "pad", "pad", 0)
        dilation = list(p.dilation) or [1]
        if len(dilation) > 2:
            raise LayerError(f"dilation takes 1 or 2 values for 2-D input, got {len(dilation)}")
        dil = (int(dilation[0]), int(dilation[-1]))
        if min(*kernel, *stride, *dil) < 1:
            raise LayerError("kernel, stride and dilation must be positive")
        return cls(kernel, stride, pad, dil)

    @functools.cached_property
    def flat(self) -> tuple[int, ...]:
        """(kh, kw, sh, sw, ph, pw, dh, dw), as the backend's kernels take it."""
        return (*self.kernel, *self.stride, *self.pad, *self.dilation)

    @property
    def extent(self) -> tuple[int, int]:
        """The span of a dilated kernel: d(k − 1) + 1."""
        (kh, kw), (dh, dw) = self.kernel, self.dilation
        return dh * (kh - 1) + 1, dw * (kw - 1) + 1

    def conv_out(self, h: int, w: int) -> tuple[int, int]:
        """Convolution's output size floor((in + 2p − extent) / s) + 1, which must be ≥ 1."""
        (sh, sw), (ph, pw), (eh, ew) = self.stride, self.pad, self.extent
        oh, ow = (h + 2 * ph - eh) // sh + 1, (w + 2 * pw - ew) // sw + 1
        if oh < 1 or ow < 1:
            kh, kw = self.kernel
            dil = "" if self.dilation == (1, 1) else f" dilation {_pair_str(self.dilation)}"
            raise LayerError(f"kernel {kh}x{kw}{dil} with pad {_pair_str(self.pad)} does not fit "
                             f"a {h}x{w} input")
        return oh, ow

    def deconv_out(self, h: int, w: int) -> tuple[int, int]:
        """Deconvolution's output size s(in − 1) + extent − 2p, which must be ≥ 1."""
        (sh, sw), (ph, pw), (eh, ew) = self.stride, self.pad, self.extent
        oh, ow = sh * (h - 1) + eh - 2 * ph, sw * (w - 1) + ew - 2 * pw
        if oh < 1 or ow < 1:
            raise LayerError(f"pad {_pair_str(self.pad)} leaves no output for a {h}x{w} input "
                             f"(output size {oh}x{ow} = stride·(in − 1) + dilation·(kernel − 1) "
                             f"+ 1 − 2·pad)")
        return oh, ow

    def _is_1x1(self) -> bool:
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.pad == (0, 0)

    def im2col(self, backend: Backend, x: Any) -> Any:
        """(N, C, H, W) -> (N, C·kh·kw, oh·ow); a free reshape for 1x1 stride-1 unpadded kernels."""
        if self._is_1x1():
            return x.reshape(x.shape[0], x.shape[1], -1)
        return backend.im2col(x, *self.flat)

    def col2im(self, backend: Backend, col: Any, shape: tuple[int, ...]) -> Any:
        if self._is_1x1():
            return col.reshape(shape)
        return backend.col2im(col, shape, *self.flat)


class _ConvolutionBase(Layer):
    """Caffe's BaseConvolutionLayer: learnable grouped filters over im2col columns.

    In the "convolution view" an input with ``conv_in`` channels is correlated into an output
    with ``conv_out`` channels by W (conv_out, conv_in/G, kh, kw). Convolution's bottom is that
    input (conv_in = C, conv_out = num_output); Deconvolution (``reverse``) swaps the roles, so
    its bottom is the convolution-view output (conv_out = C, conv_in = num_output). The three
    products below are all either layer needs, on the row layout (one row per output pixel of
    every image: columns are (N·P, K) with K = conv_in·kh·kw, outputs (N·P, conv_out)):
      _apply(col)          = col · Wᵀ           (convolution forward, deconvolution backward-data)
      _apply_t(dy)         = col2im(dy · W)     (convolution backward-data, deconvolution forward)
      _weight_grad(col, y) = yᵀ · col           (dW, summed over every image and pixel)
    This orientation keeps the long N·P axis as the GEMMs' M or K, where OpenBLAS runs fastest
    (measured ~25% faster than the (K, N·P) layout on LeNet's conv2). A row's K entries are
    ordered (i, j, c) (``channels_last``; W is permuted to match, and dW back) or, with groups
    and in Deconvolution, Caffe's (c, i, j). Convolution without groups also has two
    per-image layouts (``_layout``): Caffe's columns, and the row-shift columns a fusing
    backend runs as kh GEMMs per image (stride 1 in height).
    """

    min_bottoms = 1
    equal_bottom_top = True
    reverse: ClassVar[bool] = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.convolution_param
        _check_4d(bottom, self.type)
        self.geom = _ConvGeometry.parse(p, self.type)
        self.num_output, self.group, self.bias_term = p.num_output, p.group, p.bias_term
        self.channels = bottom[0].shape[1]
        if self.num_output < 1:
            raise LayerError("num_output must be positive")
        if self.group < 1 or self.channels % self.group or self.num_output % self.group:
            raise LayerError(f"group {self.group} must divide both the input channels "
                             f"({self.channels}) and num_output ({self.num_output})")
        if self.reverse:
            self.conv_in, self.conv_out = self.num_output, self.channels
        else:
            self.conv_in, self.conv_out = self.channels, self.num_output
        w_shape = (self.conv_out, self.conv_in // self.group, *self.geom.kernel)
        self.blobs = self.weight_and_bias(p, w_shape, self.num_output, self.bias_term)
        # Row-layout columns with each row's entries in (i, j, c) order, which im2col and
        # col2im copy C values at a time, when C is wide enough against the kw values the
        # (c, i, j) order copies at a time (one core, ~4 MB of columns: 32 channels 5x5 pad 2
        # im2col 0.37 -> 0.19 ms, col2im 0.34 -> 0.16; 20 channels 3x3 0.28 -> 0.22 / 0.32 ->
        # 0.25; but LeNet's conv2, 20 channels 5x5, 0.33 -> 0.51 / 0.42 -> 0.47). Caffe's
        # (c, i, j) order otherwise, and where groups need each group's entries together, and
        # in Deconvolution. In-process A/B with all of cifar10_quick's row-layout layers in
        # (i, j, c) order: train step 84.7 -> 81.3 ms, inference (batch 100) -2.8 ms.
        kw = self.geom.kernel[1]
        self.channels_last = (self.group == 1 and not self.reverse
                              and self.conv_in >= min(32, 6 * kw))

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        return self.geom.deconv_out(h, w) if self.reverse else self.geom.conv_out(h, w)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _check_4d(bottom, self.type)
        shape = bottom[0].shape
        for i, b in enumerate(bottom[1:], 1):
            if b.shape != shape:
                raise LayerError(f"all bottoms must have the same shape: bottom 0 is {shape}, "
                                 f"bottom {i} is {b.shape}")
        if shape[1] != self.channels:
            raise LayerError(f"input has {shape[1]} channels but the layer was set up for "
                             f"{self.channels}")
        oh, ow = self._out_size(shape[2], shape[3])
        for t in top:
            t.reshape((shape[0], self.num_output, oh, ow))

    # Columns for a whole batch can be large (cifar10_quick's conv2 at batch 100: 80 MB). The
    # batch is split into one part per worker (backend.parallel runs them on every core), and
    # into more parts when one part's columns would pass this many elements: a part's columns
    # then stay in the cache between im2col and the GEMM that reads them. Measured on
    # cifar10_quick (batch 100): 103 ms a step with 4 MB parts, 117 ms with 40 MB parts; LeNet
    # (8 MB of conv2 columns) is the same either way. Backward recomputes the columns of a
    # layer that needed more than one part per worker, as Caffe's backward always does.
    # Outside TRAIN no columns are kept for a backward pass, and smaller parts, whose columns
    # stay in the core's cache from im2col to the GEMM, pay: LeNet's TEST forward (batch 100)
    # 6.6 vs 7.4 ms with 2 MB parts, cifar10_quick's the same (33 ms) either way; in TRAIN
    # 2 MB parts gave cifar10_quick 1% more and LeNet the same.
    # A backend that fuses im2col, GEMM and layout change per block of images (NumpyBackend
    # with numba: conv_forward_*/conv_backward_*) keeps its blocks in cache by itself: there the
    # budget only decides whether a TRAIN forward keeps its columns (parts within it, one per
    # worker); columns not kept are made one part per worker, in blocks, and made again in
    # backward the same way (in-process A/B against the budget's parts, both fused: LeNet's
    # TEST forward 6.15 -> 5.97 ms in 13 of 16 rounds, cifar10_quick's 31.5 -> 29.6 ms).
    COLUMN_BUDGET = 1 << 20  # elements (4 MB of float32)
    TEST_COLUMN_BUDGET = 1 << 19

    def _cost(self, x: Any) -> int:
        """The column elements of a whole (N, C, H, W) input."""
        n, _, h, w = x.shape
        oh, ow = self.geom.conv_out(h, w)
        return n * self.conv_in * self.geom.kernel[0] * self.geom.kernel[1] * oh * ow

    def _parts(self, x: Any) -> list[slice]:
        budget = self.COLUMN_BUDGET if self.phase == PHASE_TRAIN else self.TEST_COLUMN_BUDGET
        return self.backend.batch_parts(x.shape[0], self._cost(x), budget)

    def _cols(self, x: Any, key: str) -> Any:
        """im2col of a convolution-view input (N, conv_in, H, W) into the buffer ``key``: rows
        (N·oh·ow, conv_in·kh·kw)."""
        g = self.geom
        n, c, h, w = x.shape
        oh, ow = g.conv_out(h, w)
        k = c * g.kernel[0] * g.kernel[1]
        return self.backend.im2col_rows(x, *g.flat, out=self.buffer(key, (n * oh * ow, k)),
                                        channels_last=self.channels_last)

    def _to_rows(self, y: Any, key: str) -> Any:
        """An (N, C, h, w) array as rows (N·h·w, C)."""
        n, c = y.shape[:2]
        out = self.buffer(key, (y.size // c, c))
        self.backend.images_to_rows(y.reshape(n, c, -1), out)
        return out

    def _weights_t(self) -> Any:
        """Wᵀ per group, contiguous, its rows in the column entries' order: (G, K/G,
        conv_out/G) (a GEMM reads it faster than a transposed view). Made once per forward,
        before the workers start."""
        g, w = self.group, self.blobs[0].data
        wt = self.buffer("wt", (g, w[0].size, self.conv_out // g))
        if self.channels_last:  # (o, c, i, j) -> rows (i, j, c), columns o
            wt.reshape(*w.shape[2:], w.shape[1], -1)[...] = w.transpose(2, 3, 1, 0)
        else:
            wt[...] = w.reshape(g, self.conv_out // g, -1).transpose(0, 2, 1)
        return wt

    def _weights(self) -> Any:
        """W per group as (G, conv_out/G, K/G), its columns in the column entries' order."""
        g, w = self.group, self.blobs[0].data
        if not self.channels_last:
            return w.reshape(g, self.conv_out // g, -1)
        rows = self.buffer("w_rows", (1, self.conv_out, w[0].size))
        rows.reshape(w.shape[0], *w.shape[2:], w.shape[1])[...] = w.transpose(0, 2, 3, 1)
        return rows

    def _group_cols(self, a: Any, i: int) -> Any:
        """Group i's columns of a row-layout array (all of them without groups)."""
        if self.group == 1:
            return a
        width = a.shape[1] // self.group
        return a[:, i * width:(i + 1) * width]

    def _forward_part(self, x: Any, y: Any, key: str, slot: int, layout: str, wt: Any,
                      keep: bool) -> Any:
        """y = W ⋆ x + b for a part of the batch (no groups) in one backend call, which may
        make the columns a few images at a time; returns the buffer ``key`` holding all of
        the part's columns when ``keep``, else scratch. ``wt`` is _weights_t() for the row
        layout."""
        n, p = x.shape[0], y.shape[2] * y.shape[3]
        bias = self.blobs[1].data if self.bias_term else None
        geometry = self.geom.flat
        out = y.reshape(n, self.conv_out, p)
        if layout == "shifted":  # one image's columns at a time unless kept
            cols = self.buffer(key, (n if keep else 1, *self._shifted_shape(x)))
            self.backend.conv_forward_shifted(x, self.blobs[0].data, bias, out, cols, geometry)
            return cols
        k = self.conv_in * self.geom.kernel[0] * self.geom.kernel[1]
        images = n if keep else self.backend.conv_block(n, k * p * x.itemsize)
        if layout == "images":
            cols = self.buffer(key, (images, k, p))
            self.backend.conv_forward_images(x, self.blobs[0].data.reshape(self.conv_out, -1),
                                             bias, out, cols, geometry)
        else:
            cols = self.buffer(key, (images * p, k))
            rows = self.buffer(f"apply.{slot}", (images * p, self.conv_out))
            self.backend.conv_forward_rows(x, wt[0], bias, out, cols, rows, geometry,
                                           self.channels_last)
        return cols

    def _apply(self, col: Any, wt: Any, out: Any, slot: int = 0, bias: bool = False) -> None:
        """out (N, conv_out, oh, ow) = col · Wᵀ (+ b), for rows of a convolution-view input."""
        n = out.shape[0]
        y = self.buffer(f"apply.{slot}", (col.shape[0], self.conv_out))
        for i in range(self.group):
            self.xp.matmul(self._group_cols(col, i), wt[i], out=self._group_cols(y, i))
        b = self.blobs[1].data if bias and self.bias_term else None
        # the layout change and the bias in one pass
        self.backend.rows_to_images(y, b, out.reshape(n, self.conv_out, -1))

    def _apply_t(self, dy: Any, out: Any, slot: int = 0, dcol: Any = None,
                 w: Any = None) -> None:
        """out (N, conv_in, H, W) = col2im(dy · W) for rows dy (N·oh·ow, conv_out); ``dcol``,
        when given, is a free (N·oh·ow, K) buffer to hold dy · W; ``w`` is _weights() (made
        before the workers start)."""
        geom, g = self.geom, self.group
        w = self._weights() if w is None else w
        if dcol is None:
            dcol = self.buffer(f"apply_t.{slot}", (dy.shape[0], w.shape[2] * g))
        for i in range(g):
            self.xp.matmul(self._group_cols(dy, i), w[i], out=self._group_cols(dcol, i))
        self.backend.col2im_rows(dcol, out.shape, *geom.flat, out=out,
                                 channels_last=self.channels_last)

    def _backward_part(self, x: Any, dy: Any, dx: Any, cols: Any, key: str, slot: int,
                       part: int, w: Any, layout: str) -> tuple[Any, Any]:
        """dW and db for a part of the batch (no groups) and dx unless it is None, in one
        backend call; ``cols`` are the part's columns kept from forward, or None (made again,
        by a fusing backend a block of images at a time, in the buffer ``key``); ``w`` is
        _weights() for the row layout. Returns dW in the blob's order, and db (None without a
        bias)."""
        n, p = x.shape[0], dy.shape[2] * dy.shape[3]
        recompute = cols is None
        geometry = self.geom.flat
        dy = dy.reshape(n, self.conv_out, p)
        if layout == "shifted":
            if recompute:
                cols = self.buffer(key, (1, *self._shifted_shape(x)))
            dw = self.buffer(f"dw.{part}", self.blobs[0].shape)
            db = self.buffer(f"db.{part}", (self.conv_out,)) if self.bias_term else None
            self.backend.conv_backward_shifted(x, dy, self.blobs[0].data, dw, db, dx, cols,
                                               geometry, recompute)
            return dw, db
        k = self.conv_in * self.geom.kernel[0] * self.geom.kernel[1]
        block = self.backend.conv_block(n, k * p * x.itemsize)
        dw = self.buffer(f"dw.{part}", (self.conv_out, k))
        if layout == "images":  # Caffe's column order: W as it is
            if recompute:
                cols = self.buffer(key, (block, k, p))
            self.backend.conv_backward_images(x, dy, self.blobs[0].data.reshape(self.conv_out, k),
                                              dw, dx, cols, geometry, recompute)
            return dw, self._bias_grad(dy, part)
        if recompute:
            cols = self.buffer(key, (block * p, k))
        rows = self.buffer(f"dy.{slot}", (block * p, self.conv_out))
        w = self.blobs[0].data.reshape(self.conv_out, k) if w is None else w[0]
        self.backend.conv_backward_rows(x, dy, w, dw, dx, cols, rows, geometry,
                                        self.channels_last, recompute)
        return self._in_blob_order(dw), self._bias_grad(dy, part)

    def _in_blob_order(self, dw: Any) -> Any:
        """A weight gradient made in the column entries' order, as the blob's (a view)."""
        if self.channels_last:  # (o, i, j, c) -> the blob's (o, c, i, j)
            kh, kw = self.geom.kernel
            return dw.reshape(self.conv_out, kh, kw, -1).transpose(0, 3, 1, 2)
        return dw

    # Gradients of the weights and bias are made per part (in buffers keyed by the part) and
    # summed in part order by _accumulate.
    def _weight_grad(self, col: Any, dy: Any, part: int = 0) -> Any:
        """dyᵀ · col per group, for rows col (N·P, K) and dy (N·P, conv_out)."""
        g = self.group
        out = self.buffer(f"dw.{part}", (g, self.conv_out // g, col.shape[1] // g))
        for i in range(g):
            self.xp.matmul(self._group_cols(dy, i).T, self._group_cols(col, i), out=out[i])
        return self._in_blob_order(out)

    # -- the per-image products --------------------------------------------------------------------
    # With more output pixels per image than column entries (a first layer: LeNet's conv1 has
    # 576 pixels, 25 = 1·5·5 column entries and 20 filters), one wide GEMM per image on Caffe's
    # column layout (C·kh·kw, oh·ow) reads and writes the NCHW blobs directly: no layout
    # transposes, and each image's columns stay in cache. Measured on one core against the row
    # layout (half a LeNet batch): forward 0.38 vs 0.75 ms, weight gradient 0.21 vs 0.41 ms,
    # bottom gradient 0.26 vs 0.50 ms; cifar10_quick's conv1 (1024 pixels, 75 entries, 50
    # images) forward and backward 6.9 + 6.8 vs 5.3 + 9.6 ms (its forward alone is faster in
    # rows, but a forward in rows with a backward per image gained < 1% of a step, within the
    # noise). Layers with fewer pixels than entries (LeNet's conv2: 64 and 500; cifar10_quick's
    # conv2: 256 and 800) are faster in the row layout.
    def _per_image(self, pixels: int) -> bool:
        k = self.conv_in * self.geom.kernel[0] * self.geom.kernel[1]
        return self.group == 1 and pixels >= max(256, k)

    # -- the row-shift products (Backend.conv_forward_shifted) ---------------------------------
    # With a backend that fuses them (NumpyBackend with numba), a layer of stride 1 in height
    # without groups makes columns that hold each padded input row once per kernel column
    # (C·kw rows of (H + 2·ph)·ow entries per image, kh times fewer than Caffe's) and runs kh
    # GEMMs per image over windows of them shifted by a row. One core, 50 images, forward +
    # backward against the layout chosen before: LeNet's conv2 1.75 + 4.11 vs 2.42 + 4.48 ms
    # (rows), conv1 0.54 + 0.80 vs 0.53 + 0.77 (per image: the same); cifar10_quick's conv1
    # 3.51 + 6.92 vs 6.39 + 10.95 (per image), conv2 8.96 + 17.28 vs 11.16 + 20.38 (rows,
    # (i, j, c)), conv3 4.19 + 8.64 vs 4.92 + 9.24. Below 64 output pixels the per-image
    # GEMMs get too small: 64 channels 3x3 on 6x6, 2.20 + 3.91 vs 1.96 + 3.63 in rows; on 8x8
    # 2.97 + 5.86 vs 3.28 + 6.10.
    def _layout(self, pixels: int, dtype: Any) -> str:
        """"shifted", "images" (Caffe's per-image columns) or "rows" for a layer's products."""
        if (self.group == 1 and not self.reverse and self.geom.stride[0] == 1 and pixels >= 64
                and self.backend.fuses_conv(dtype)):
            return "shifted"
        return "images" if self._per_image(pixels) else "rows"

    def _shifted_shape(self, x: Any) -> tuple[int, int]:
        """One image's row-shift columns: (C·kw, (H + 2·ph)·ow)."""
        g = self.geom
        ow = g.conv_out(x.shape[2], x.shape[3])[1]
        return self.conv_in * g.kernel[1], (x.shape[2] + 2 * g.pad[0]) * ow

    def _add_bias(self, y: Any) -> None:
        if self.bias_term:
            y += self.blobs[1].data.reshape(1, -1, 1, 1)

    def _bias_grad(self, dy: Any, part: int = 0) -> Any:
        """Σ dy over images and pixels for a top gradient dy (N, num_output, h, w); None
        without a bias. (Summed in this layout, along the contiguous pixels: several times
        faster than over the rows.)"""
        if not self.bias_term:
            return None
        per_image = dy.reshape(dy.shape[0], dy.shape[1], -1).sum(axis=2)
        return per_image.sum(axis=0, out=self.buffer(f"db.{part}", (dy.shape[1],)))

    def _accumulate(self, grads: Sequence[tuple[Any, Any]]) -> None:
        """Add the parts' (dW, db) to the parameter diffs, in part order."""
        weight = self.blobs[0]
        for dw, db in grads:
            weight.diff += dw.reshape(weight.shape)
            if db is not None:
                self.blobs[1].diff += db


@register
class Convolution(_ConvolutionBase):
    """y[n, o] = Σ_c W[o, c] ⋆ x[n, g·C/G + c] + b[o] for o in group g (cross-correlation).

    Params: num_output, bias_term, kernel/stride/pad/dilation (one value or h, w), group.
    Blobs: W (num_output, C/group, kh, kw) and b (num_output). Every bottom i gives top i
    through the same weights. Output size: floor((in + 2p − (d(k−1) + 1)) / s) + 1.
    Backward: dW += Σ dy·colᵀ, db += Σ dy, dx = col2im(Wᵀ·dy).
    """

    type = "Convolution"

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._kept: dict[int, list[Any]] = {}  # bottom index -> its columns, for backward
        # tops share a shape
        layout = self._layout(top[0].shape[2] * top[0].shape[3], bottom[0].data.dtype)
        wt = self._weights_t() if layout == "rows" else None
        for i, (b, t) in enumerate(zip(bottom, top, strict=True)):
            x, y, parts = b.data, t.data, self._parts(b.data)
            # one part per worker in TRAIN: each part's columns have a buffer of their own,
            # kept for backward
            keep = len(parts) <= self.backend.workers and self.phase == PHASE_TRAIN
            if layout == "shifted" and self._shares(x, y):
                keep = keep and self._keeps_shared()
                cols = self._forward_shared(x, y, i, keep)
                if keep:
                    self._kept[i] = cols
                continue
            if not keep and self.group == 1 and self.backend.fuses_conv(x.dtype):
                # the backend makes the columns a block at a time, in cache: parts of the
                # column budget would only add calls
                parts = self.backend.batch_parts(x.shape[0], self._cost(x))

            def run(slot: int, k: int, x: Any = x, y: Any = y, parts: list[slice] = parts,
                    i: int = i, keep: bool = keep) -> Any:
                if self.group > 1:
                    col = self._cols(x[parts[k]], f"col{i}.{slot}")
                    self._apply(col, wt, y[parts[k]], slot, bias=True)
                    return col
                return self._forward_part(x[parts[k]], y[parts[k]], f"col{i}.{slot}", slot,
                                          layout, wt, keep)

            # without groups each part starts with a conv_* call, which starts the other
            # workers (deferred)
            cols = self.backend.parallel(run, len(parts), self._cost(x),
                                         deferred=self.group == 1)
            if keep:
                self._kept[i] = cols

    # -- shared work (Backend.shares_work) -------------------------------------------------------
    # Row-shift layers run on every worker at once with one work counter: each worker makes its
    # own part's images, then takes images left at the back of the other's part, instead of
    # only a fixed half of the batch: on this project's VM one core is at times 10-20% slower
    # than the other, and the other then waited for it at the end of every layer
    # (cifar10_quick's step 66 -> 60 ms in such a spell, in-process A/B). Backward makes the
    # weight and bias gradients per chunk of images (fixed here, whichever worker owns it) and
    # adds them in chunk order, and shares out the images' bottom gradients: the results do not
    # depend on who did what. A layer without a bottom gradient cuts its batch into more
    # chunks, as it has no other work to share out.
    CHUNKS_PER_WORKER = 4

    def _shares(self, x: Any, y: Any) -> bool:
        return (self.backend.shares_work(y)
                and len(self.backend.batch_parts(x.shape[0], self._cost(x))) > 1)

    # The shared row-shift path keeps a TRAIN forward's columns for backward unless each output
    # has at most KEEP_INPUTS_MIN inputs (C·kh·kw; LeNet's conv1: 25). Such columns are a few
    # copied rows of each image, cheaper to make again in backward than to write out (LeNet's
    # conv1: 860 KB) and read back. In-process A/B, LeNet in a slow spell of the VM: conv1 +
    # pool1 forward -0.10 ms, backward +0.01, the step -0.12 and -0.10 ms (16 of 16 rounds
    # each); conv2's columns (500 inputs) made again instead: +0.06 ms.
    KEEP_INPUTS_MIN = 32

    def _keeps_shared(self) -> bool:
        kh, kw = self.geom.kernel
        return self.conv_in // self.group * kh * kw > self.KEEP_INPUTS_MIN

    def _forward_shared(self, x: Any, y: Any, i: int, keep: bool, pool: Any = None) -> Any:
        """y = W ⋆ x + b, the images shared out (and MAX-pooled, with ``pool``: see
        forward_pooled); returns the kept columns (``keep``), or None."""
        n, shape, w = x.shape[0], self._shifted_shape(x), self.blobs[0].data
        claim = self.backend.work_counter(even_slices(n, self.backend.workers))
        cols = self.buffer(f"col{i}", (n, *shape)) if keep else None
        bias = self.blobs[1].data if self.bias_term else None
        out = y.reshape(n, self.conv_out, -1)

        geometry = self.geom.flat
        pool_arrays = () if pool is None else pool[1:]

        def run(slot: int, k: int) -> None:
            scratch = cols if cols is not None else self.buffer(f"col{i}.{slot}", (1, *shape))
            self.kept_call(
                f"forward{i}.{slot}", (x, w, bias, y, scratch, *pool_arrays),
                (geometry, None if pool is None else pool[0]),
                lambda: self.backend.conv_forward_shifted_call(x, w, bias, out, scratch,
                                                               geometry, pool))(claim)

        self.backend.parallel(run, self.backend.workers, self._cost(x), deferred=True,
                              balanced=True)
        return cols

    def _backward_shared(self, t: Blob, b: Blob, i: int, down: bool, cols: Any,
                         pool: Any = None) -> None:
        """dW, db and (``down``) dx, shared out; ``cols`` kept from forward, or None. With
        ``pool``, the top gradient is made from the MAX pooling's (see backward_pooled)."""
        x, n, shape = b.data, b.shape[0], self._shifted_shape(b.data)
        dy, dx = t.diff.reshape(n, self.conv_out, -1), b.diff if down else None
        workers = self.backend.workers
        chunks = even_slices(n, workers if down else workers * self.CHUNKS_PER_WORKER)
        claim, w = self.backend.work_counter(chunks), self.blobs[0].data
        dw = self.buffer("dw.chunks", (len(chunks), *self.blobs[0].shape))
        db = self.buffer("db.chunks", (len(chunks), self.conv_out)) if self.bias_term else None

        geometry = self.geom.flat
        pool_arrays = () if pool is None else pool[1:]

        def run(slot: int, k: int) -> None:
            made = cols if cols is not None else self.buffer(f"col{i}.{slot}", (1, *shape))
            scratch = self.buffer(f"dcol.{slot}", (1, *shape))
            # the chunks follow from the batch (x) and whether dx is made (dw's chunk count)
            self.kept_call(
                f"backward{i}.{slot}", (x, t.diff, w, dw, db, dx, made, scratch, *pool_arrays),
                (geometry, None if pool is None else pool[0], cols is None),
                lambda: self.backend.conv_backward_shifted_call(
                    x, dy, w, dw, db, dx, made, geometry, cols is None, chunks, scratch,
                    pool))(claim)

        self.backend.parallel(run, workers, self._cost(x), deferred=True, balanced=True)
        self._accumulate([(dw[c], None if db is None else db[c]) for c in range(len(chunks))])

    # -- MAX pooling inside the convolution (Net: a Pooling layer that alone reads the top) -----
    # Each image's output is pooled right after it is made, while it is in the core's cache,
    # and backward makes each image's top gradient from the pooling's where it needs it: the
    # pooling's two passes over the batch (and its two hand-overs between the workers; LeNet's
    # pool2 ran on one core) go. The values are the Pooling layer's, bit for bit, and the top
    # blob's data and diff are written as the two layers would write them.
    def _pools(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> bool:
        x, y = bottom[0].data, top[0].data
        return (len(bottom) == 1 and self._layout(y.shape[2] * y.shape[3], x.dtype) == "shifted"
                and self._shares(x, y) and self.backend.fuses_pooling(y))

    def forward_pooled(self, bottom: Sequence[Blob], top: Sequence[Blob], pool: Pooling,
                       pool_top: Sequence[Blob]) -> bool:
        """forward, and ``pool``'s forward from top into ``pool_top`` in the same pass; False,
        having done nothing, where the backend or the layers cannot (then run both)."""
        if not self._pools(bottom, top):
            return False
        spec = pool.pooled_elsewhere(top[0], pool_top)
        if spec is None:
            return False
        x = bottom[0].data
        keep = (len(self._parts(x)) <= self.backend.workers and self.phase == PHASE_TRAIN
                and self._keeps_shared())
        cols = self._forward_shared(x, top[0].data, 0, keep, spec)
        self._kept = {0: cols} if keep else {}
        return True

    def backward_pooled(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                        bottom: Sequence[Blob], pool: Pooling,
                        pool_top: Sequence[Blob]) -> bool:
        """``pool``'s backward (from ``pool_top``'s diff into top's), then backward, in one
        pass; False, having done nothing, where it cannot (then run both)."""
        if not self._pools(bottom, top):
            return False
        spec = pool.unpooled_elsewhere(top[0], pool_top)
        if spec is None:
            return False
        self._backward_shared(top[0], bottom[0], 0, propagate_down[0],
                              getattr(self, "_kept", {}).get(0), spec)
        return True

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        # Columns kept from forward (TRAIN, one part per worker) are reused; otherwise they are
        # recomputed per part, as Caffe's backward recomputes im2col.
        kept = getattr(self, "_kept", {})
        layout = self._layout(top[0].shape[2] * top[0].shape[3], bottom[0].data.dtype)
        w = self._weights() if layout == "rows" and any(propagate_down) else None
        for i, (t, b) in enumerate(zip(top, bottom, strict=True)):
            if layout == "shifted" and self._shares(b.data, t.diff):
                # the kept columns stay as they are (the bottom gradient has scratch of its own)
                self._backward_shared(t, b, i, propagate_down[i], kept.get(i))
                continue
            parts, cols, down = self._parts(b.data), kept.get(i), propagate_down[i]
            if cols is None and self.group == 1 and self.backend.fuses_conv(b.data.dtype):
                # columns made again a block at a time, in cache: one part per worker
                parts = self.backend.batch_parts(b.shape[0], self._cost(b.data))

            def run(slot: int, k: int, t: Blob = t, b: Blob = b, parts: list[slice] = parts,
                    cols: list[Any] | None = cols, down: bool = down,
                    i: int = i) -> tuple[Any, Any]:
                part = parts[k]
                if self.group == 1:
                    return self._backward_part(b.data[part], t.diff[part],
                                               b.diff[part] if down else None,
                                               None if cols is None else cols[k],
                                               f"col{i}.{slot}", slot, k, w, layout)
                bias = self._bias_grad(t.diff[part], k)
                # groups: the row layout, each group's columns a GEMM of its own. Once the
                # weight gradient is made the columns are used up: their buffer takes the
                # column gradient.
                col = cols[k] if cols is not None else self._cols(b.data[part], f"col{i}.{slot}")
                dy = self._to_rows(t.diff[part], f"dy.{slot}")
                grads = self._weight_grad(col, dy, k), bias
                if down:
                    self._apply_t(dy, b.diff[part], slot, dcol=col, w=w)
                return grads

            self._accumulate(self.backend.parallel(run, len(parts), self._cost(b.data),
                                                   deferred=self.group == 1))
            if down:
                kept.pop(i, None)  # overwritten: another backward recomputes them


@register
class Deconvolution(_ConvolutionBase):
    """The transpose of Convolution (Caffe's DeconvolutionLayer): y = col2im(Wᵀ·x) + b.

    Params: as Convolution (num_output, bias_term, kernel/stride/pad/dilation, group).
    Blobs: W (C, num_output/group, kh, kw), as Caffe, and b (num_output).
    Output size: s(in − 1) + d(k − 1) + 1 − 2p. Each input pixel scatters a W-weighted kernel
    footprint into the output; overlapping footprints add.
    Backward: col = im2col(dy); dW += Σ x·colᵀ, db += Σ dy, dx = W·col.
    """

    type = "Deconvolution"
    reverse = True

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for b, t in zip(bottom, top, strict=True):
            self._apply_t(self._to_rows(b.data, "x"), t.data)
            self._add_bias(t.data)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        for i, (t, b) in enumerate(zip(top, bottom, strict=True)):
            col = self._cols(t.diff, "col")  # (N·H·W, num_output·kh·kw)
            db = t.diff.sum(axis=(0, 2, 3)) if self.bias_term else None
            self._accumulate([(self._weight_grad(col, self._to_rows(b.data, "x")), db)])
            if propagate_down[i]:
                self._apply(col, self._weights_t(), b.diff)


@register
class Im2col(Layer):
    """The im2col column buffer as a blob: (N, C, H, W) -> (N, C·kh·kw, oh, ow), channel
    index c·kh·kw + i·kw + j holding x[n, c, y·sh − ph + i·dh, x·sw − pw + j·dw] (0 in the
    padding), as Caffe's Im2colLayer.

    Params: convolution_param kernel/stride/pad/dilation (num_output, group and the fillers
    are ignored). Output size as Convolution's. Backward: dx = col2im(dy).
    """

    type = "Im2col"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.geom = _ConvGeometry.parse(self.param.convolution_param, self.type)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _check_4d(bottom, self.type)
        if top[0] is bottom[0]:
            raise LayerError("Im2col does not allow in-place computation")
        n, c, h, w = bottom[0].shape
        oh, ow = self.geom.conv_out(h, w)
        kh, kw = self.geom.kernel
        top[0].reshape((n, c * kh * kw, oh, ow))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = self.geom.im2col(self.backend, bottom[0].data).reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            dy = top[0].diff
            bottom[0].diff[...] = self.geom.col2im(
                self.backend, dy.reshape(dy.shape[0], dy.shape[1], -1), bottom[0].shape)


PP = pb.PoolingParameter


@register
class Pooling(Layer):
    """MAX or AVE over kh x kw windows, stride s, padding p, one (n, c) plane at a time.

    Output size (Caffe): ceil((H + 2p − k) / s) + 1 (floor with round_mode FLOOR), minus one
    when pad > 0 and the last window would start in the padding beyond the image.
    MAX: the largest input in the window clipped to the image (ties go to the first in
    row-major order); an optional 2nd top holds its flat index h·W + w. Backward routes dy there.
    AVE: the window sum over the pool size clipped at H + p (padding counts, the CEIL overhang
    does not). Backward spreads dy / pool_size over the window.
    """

    type = "Pooling"
    exact_bottoms = 1
    min_tops = 1
    max_tops = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.pooling_param
        self.method = p.pool
        if self.method == PP.STOCHASTIC:
            raise LayerError("STOCHASTIC pooling is GPU-only in Caffe and not supported")
        if self.method == PP.AVE and len(top) > 1:
            raise LayerError("only MAX pooling has a second (mask) top")
        self.global_pooling = p.global_pooling
        if self.global_pooling:
            if p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w"):
                raise LayerError("global_pooling takes the whole input; give no kernel size")
            self.kernel = (0, 0)
        else:
            self.kernel = _hw(p, "kernel_size", "kernel", None)
        self.stride = _hw(p, "stride", "stride", 1)
        self.pad = _hw(p, "pad", "pad", 0)
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise LayerError("global_pooling allows only pad 0 and stride 1")
        if not self.global_pooling and min(self.kernel) < 1:
            raise LayerError("kernel size must be positive")
        if min(self.stride) < 1:
            raise LayerError("stride must be positive")
        if self.pad[0] >= self.kernel[0] > 0 or self.pad[1] >= self.kernel[1] > 0:
            raise LayerError(f"pad {_pair_str(self.pad)} must be smaller than the kernel "
                             f"{self.kernel[0]}x{self.kernel[1]}")
        self.ceil = p.round_mode == PP.CEIL

    def _out_size(self, size: int, k: int, s: int, p: int) -> int:
        span = size + 2 * p - k
        out = -(-span // s) + 1 if self.ceil else span // s + 1
        if p > 0 and (out - 1) * s >= size + p:
            out -= 1  # the last window would start in the padding: drop it
        return out

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _check_4d(bottom, "Pooling")
        n, c, h, w = bottom[0].shape
        if self.global_pooling:
            self.kernel = (h, w)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.pad
        self.out = (self._out_size(h, kh, sh, ph), self._out_size(w, kw, sw, pw))
        if min(self.out) < 1:
            raise LayerError(f"pooling kernel {kh}x{kw} with pad {_pair_str(self.pad)} does not "
                             f"fit a {h}x{w} input")
        # Rows/cols beyond H + 2p that the last (CEIL) window reaches: padded, never counted.
        self.extra = (max(0, (self.out[0] - 1) * sh + kh - (h + 2 * ph)),
                      max(0, (self.out[1] - 1) * sw + kw - (w + 2 * pw)))
        for t in top:
            t.reshape((n, c, *self.out))

    def _padded(self, x: Any, value: float) -> Any:
        """x padded by p on each side, plus the CEIL overhang at the bottom and right."""
        return self.backend.pad(x, *self.pad, value, *self.extra)

    def _single_window(self, x: Any) -> bool:
        """One window exactly covering the unpadded input (global pooling): a plain reduction."""
        return self.pad == (0, 0) and self.out == (1, 1) and self.kernel == x.shape[2:]

    def _pool_size(self, h: int, w: int) -> Any:
        """(oh, ow) window sizes, clipped at H + p / W + p (AVE's divisor)."""
        xp = self.xp
        (kh, kw), (sh, sw), (ph, pw), (oh, ow) = self.kernel, self.stride, self.pad, self.out
        hs = xp.arange(oh) * sh - ph
        ws = xp.arange(ow) * sw - pw
        size_h = xp.minimum(hs + kh, h + ph) - hs
        size_w = xp.minimum(ws + kw, w + pw) - ws
        # Only stride > kernel without padding can leave a window with nothing in it;
        # it averages to 0 here rather than Caffe's 0/0.
        return xp.maximum(size_h[:, None] * size_w[None, :], 1).astype(self.backend.dtype)

    def _compiled(self, x: Any) -> bool:
        """Use the backend's compiled kernels (numba) for windowed pooling."""
        return self.backend.use_compiled(x.size) and not self._single_window(x)

    def _geometry(self) -> tuple[int, ...]:
        return (*self.kernel, *self.stride, *self.pad)

    def pooled_elsewhere(self, bottom: Blob, top: Sequence[Blob]) -> Any:
        """For a convolution that makes this layer's forward inside its own (forward_pooled):
        (geometry, top data, argmax or None), this layer's state set as its forward would
        leave it; None where only this layer's forward can (not MAX, a mask top, no compiled
        kernels, one window)."""
        x = bottom.data
        if self.method != PP.MAX or len(top) != 1 or not self._compiled(x):
            return None
        if self.phase != PHASE_TRAIN:
            self._argmax = None
            return self._geometry(), top[0].data, None
        arg = getattr(self, "_argmax", None)
        if arg is None or arg.shape != top[0].shape:
            arg = self.backend.empty(top[0].shape, dtype=self.xp.int32)
        self._argmax = arg
        return self._geometry(), top[0].data, arg

    def unpooled_elsewhere(self, bottom: Blob, top: Sequence[Blob]) -> Any:
        """For a convolution that makes this layer's backward inside its own (backward_pooled):
        (geometry, top diff, argmax), or None where only this layer's backward can."""
        arg = getattr(self, "_argmax", None)
        if (self.method != PP.MAX or len(top) != 1 or not self._compiled(bottom.data)
                or arg is None or arg.shape != top[0].shape):
            return None
        return self._geometry(), top[0].diff, arg

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        if self.method == PP.AVE:
            if self._compiled(x):
                self.backend.ave_pool(x, top[0].data, self._pool_size(*x.shape[2:]),
                                      self._geometry())
            else:
                y = top[0].data

                def average(part: slice) -> None:
                    y[part] = self._average(x[part])

                self.backend.map_parts(x.shape[0], x.size, average)
            return
        if self._compiled(x) and self.phase != PHASE_TRAIN and len(top) == 1:
            # TEST needs no argmax: a branch-free max; backward (rare in TEST) recomputes it.
            self.backend.max_pool_values(x, top[0].data, self._geometry())
            self._argmax = None
        elif self._compiled(x):
            arg = getattr(self, "_argmax", None)
            if arg is None or arg.shape != top[0].shape:
                arg = self.backend.empty(top[0].shape, dtype=self.xp.int32)
            self.backend.max_pool(x, top[0].data, arg, self._geometry())
            self._argmax = arg
        else:  # _argmax: window offset i·kw + j, -1 if empty
            y = top[0].data
            arg = self.backend.empty(y.shape, dtype=self.xp.int32)

            def run(part: slice) -> None:
                y[part], arg[part] = self._max(x[part])

            self.backend.map_parts(x.shape[0], x.size, run)
            self._argmax = arg
        if len(top) > 1:  # the mask: flat index h·W + w of each max in its input plane
            kw, (sh, sw), (ph, pw), (oh, ow) = self.kernel[1], self.stride, self.pad, self.out
            arg, xp = self._argmax, self.xp
            hh = (xp.arange(oh) * sh - ph)[:, None] + arg // kw
            ww = (xp.arange(ow) * sw - pw)[None, :] + arg % kw
            top[1].data[...] = xp.where(arg >= 0, hh * x.shape[3] + ww, -1)

    def _average(self, x: Any) -> Any:
        if self._single_window(x):
            return x.mean(axis=(2, 3), keepdims=True)
        (kh, kw), (oh, ow) = self.kernel, self.out
        xpad = self._padded(x, 0.0)
        acc = self.xp.zeros((*x.shape[:2], oh, ow), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                acc += _strided(xpad, i, j, *self.stride, oh, ow)
        return acc / self._pool_size(*x.shape[2:])

    def _max(self, x: Any) -> tuple[Any, Any]:
        xp = self.xp
        n, c = x.shape[:2]
        if self._single_window(x):
            flat = x.reshape(n, c, 1, 1, -1)
            return flat.max(axis=-1), flat.argmax(axis=-1).astype(xp.int32)
        (kh, kw), (oh, ow) = self.kernel, self.out
        xpad = self._padded(x, -float("inf"))  # padding never wins
        best = xp.full((n, c, oh, ow), -FLT_MAX, dtype=x.dtype)
        arg = xp.full((n, c, oh, ow), -1, dtype=xp.int32)
        for i in range(kh):
            for j in range(kw):
                v = _strided(xpad, i, j, *self.stride, oh, ow)
                # strict >: the first of equal values wins. Arithmetic, not where(): numpy's
                # masked selects are an order of magnitude slower on random masks.
                arg += (v > best) * (i * kw + j - arg)
                best = xp.maximum(best, v)
        return best, arg

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        xp, x, dy = self.xp, bottom[0].data, top[0].diff
        n, c, h, w = x.shape
        (kh, kw), (oh, ow) = self.kernel, self.out
        if self._single_window(x):
            if self.method == PP.AVE:
                g = xp.broadcast_to(dy / (h * w), x.shape)
            else:
                g = (xp.arange(h * w) == self._argmax.reshape(n, c, 1)) * dy.reshape(n, c, 1)
            bottom[0].diff[...] = g.reshape(x.shape)
            return
        if self._compiled(x):
            if self.method == PP.AVE:
                self.backend.ave_pool_backward(dy, bottom[0].diff, self._pool_size(h, w),
                                               self._geometry())
            else:
                if self._argmax is None:  # forward skipped it (TEST phase)
                    best = self.backend.empty(dy.shape, dtype=x.dtype)
                    self._argmax = self.backend.empty(dy.shape, dtype=self.xp.int32)
                    self.backend.max_pool(x, best, self._argmax, self._geometry())
                self.backend.max_pool_backward(dy, self._argmax, bottom[0].diff,
                                               self._geometry())
            return
        size = self._pool_size(h, w) if self.method == PP.AVE else None
        (ph, pw), (eh, ew) = self.pad, self.extra
        dx = bottom[0].diff

        def run(part: slice) -> None:
            d = dy[part] / size if size is not None else dy[part]
            gpad = xp.zeros((d.shape[0], c, h + 2 * ph + eh, w + 2 * pw + ew), dtype=x.dtype)
            arg = None if size is not None else self._argmax[part]
            for i in range(kh):
                for j in range(kw):
                    g = d if arg is None else d * (arg == i * kw + j)
                    _strided(gpad, i, j, *self.stride, oh, ow)[...] += g
            dx[part] = gpad[:, :, ph:ph + h, pw:pw + w]

        self.backend.map_parts(x.shape[0], x.size, run)


SPPP = pb.SPPParameter


@register
class SPP(Layer):
    """Spatial pyramid pooling (Caffe's SPPLayer): level i pools the input into 2^i x 2^i bins
    with kernel k = ceil(H / 2^i), stride k and pad (k·2^i − H + 1) // 2 (likewise for W),
    each level an ordinary Pooling layer with that geometry (CEIL rounding); the levels are
    flattened per image and concatenated, coarsest first.

    Params: spp_param pyramid_height (≥ 1), pool MAX or AVE. Top: (N, C·Σ_i 4^i), or the single
    level's (N, C, 1, 1) when pyramid_height is 1 (as Caffe, which then skips flatten/concat).
    Caffe's Pooling refuses a level whose pad reaches its kernel (e.g. 4 bins over 5 pixels);
    so does this layer. Backward: the sum of the levels' Pooling backwards.
    """

    type = "SPP"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.spp_param
        if p.pool == SPPP.STOCHASTIC:
            raise LayerError("STOCHASTIC pooling is GPU-only in Caffe and not supported")
        if p.pyramid_height < 1:
            raise LayerError("spp_param.pyramid_height must be at least 1, got "
                             f"{p.pyramid_height}")
        self.pyramid_height = int(p.pyramid_height)
        self.method = PP.MAX if p.pool == SPPP.MAX else PP.AVE
        self._levels: list[tuple[Pooling, Blob]] = []
        self._built_for: tuple[int, int] | None = None

    @staticmethod
    def level_geometry(level: int, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """(kernel, pad) of pyramid level ``level`` over an h x w input (the stride is the
        kernel): Caffe's SPPLayer::GetPoolingParam."""
        bins = 2 ** level
        kh, kw = -(-h // bins), -(-w // bins)
        return (kh, kw), ((kh * bins - h + 1) // 2, (kw * bins - w + 1) // 2)

    def _build(self, bottom: Blob) -> None:
        h, w = bottom.shape[2:]
        if h < 1 or w < 1:
            raise LayerError(f"SPP needs a non-empty input, got {h}x{w}")
        self._levels = []
        for i in range(self.pyramid_height):
            (kh, kw), (ph, pw) = self.level_geometry(i, h, w)
            lp = pb.LayerParameter(name=f"{self.name}_level{i}", type="Pooling")
            pp = lp.pooling_param
            pp.pool = self.method
            pp.kernel_h, pp.kernel_w, pp.stride_h, pp.stride_w = kh, kw, kh, kw
            pp.pad_h, pp.pad_w = ph, pw
            pool, out = Pooling(lp, self.ctx), self.make_blob(())
            try:
                pool.setup([bottom], [out])
            except LayerError as e:
                bins = 2 ** i
                raise LayerError(f"pyramid level {i} cannot pool a {h}x{w} input into "
                                 f"{bins}x{bins} bins: {e}") from None
            self._levels.append((pool, out))
        self._built_for = (h, w)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _check_4d(bottom, "SPP")
        if top[0] is bottom[0]:
            raise LayerError("SPP does not allow in-place computation")
        if self._built_for != bottom[0].shape[2:]:
            self._build(bottom[0])
        for pool, out in self._levels:
            pool.reshape(bottom, [out])
        if self.pyramid_height == 1:
            top[0].reshape(self._levels[0][1].shape)
        else:
            top[0].reshape((bottom[0].shape[0], self._slices()[-1][2].stop))

    def _slices(self) -> list[tuple[Pooling, Blob, slice]]:
        """Each level's Pooling, its top, and its columns in the (N, total) top."""
        out, offset = [], 0
        for pool, level_top in self._levels:
            c, oh, ow = level_top.shape[1:]
            out.append((pool, level_top, slice(offset, offset + c * oh * ow)))
            offset += c * oh * ow
        return out

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        n, parts = bottom[0].shape[0], []
        for pool, level_top, cols in self._slices():
            pool.forward(bottom, [level_top])
            parts.append(level_top.data.reshape(n, cols.stop - cols.start))
        top[0].data[...] = self.xp.concatenate(parts, axis=1).reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        slices = self._slices()
        dy = top[0].diff.reshape(bottom[0].shape[0], slices[-1][2].stop)
        total = self.xp.zeros(bottom[0].shape, dtype=bottom[0].diff.dtype)
        for pool, level_top, cols in slices:
            level_top.diff[...] = dy[:, cols].reshape(level_top.shape)
            pool.backward([level_top], [True], bottom)  # writes bottom's diff
            total += bottom[0].diff
        bottom[0].diff[...] = total
