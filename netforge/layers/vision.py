"""Vision layers: Convolution and Pooling on (N, C, H, W) blobs, with Caffe's geometry.

Convolution is im2col followed by one batched matrix product (groups are a batch axis); its
backward is the two transposed products and col2im. Pooling works on strided slices of a
padded input, one slice per kernel offset, so the Python loop runs over kh·kw and never over
images or channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


@register
class Convolution(Layer):
    """y[n, o] = Σ_c W[o, c] ⋆ x[n, g·C/G + c] + b[o] for o in group g (cross-correlation).

    Params: num_output, bias_term, kernel/stride/pad/dilation (one value or h, w), group.
    Blobs: W (num_output, C/group, kh, kw) and b (num_output). Every bottom i gives top i
    through the same weights. Output size: floor((in + 2p − (d(k−1) + 1)) / s) + 1.
    Backward: dW += Σ dy·colᵀ, db += Σ dy, dx = col2im(Wᵀ·dy).
    """

    type = "Convolution"
    min_bottoms = 1
    equal_bottom_top = True

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.convolution_param
        _check_4d(bottom, "Convolution")
        axis = p.axis + 4 if p.axis < 0 else p.axis
        if axis != 1:
            raise LayerError(f"Convolution supports only axis 1 (channels) for 4-D input, "
                             f"got axis {p.axis}")
        self.kernel = _hw(p, "kernel_size", "kernel", None)
        self.stride = _hw(p, "stride", "stride", 1)
        self.pad = _hw(p, "pad", "pad", 0)
        dilation = list(p.dilation) or [1]
        if len(dilation) > 2:
            raise LayerError(f"dilation takes 1 or 2 values for 2-D input, got {len(dilation)}")
        self.dilation = (int(dilation[0]), int(dilation[-1]))
        if min(*self.kernel, *self.stride, *self.dilation) < 1:
            raise LayerError("kernel, stride and dilation must be positive")
        self.num_output, self.group, self.bias_term = p.num_output, p.group, p.bias_term
        self.channels = bottom[0].shape[1]
        if self.num_output < 1:
            raise LayerError("num_output must be positive")
        if self.group < 1 or self.channels % self.group or self.num_output % self.group:
            raise LayerError(f"group {self.group} must divide both the input channels "
                             f"({self.channels}) and num_output ({self.num_output})")
        w_shape = (self.num_output, self.channels // self.group, *self.kernel)
        self.blobs = self.weight_and_bias(p, w_shape, self.num_output, self.bias_term)
        self._cols: list[Any] = []

    def _out_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
        oh = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
        ow = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
        if oh < 1 or ow < 1:
            dil = "" if self.dilation == (1, 1) else f" dilation {_pair_str(self.dilation)}"
            raise LayerError(f"kernel {kh}x{kw}{dil} with pad {_pair_str(self.pad)} does not fit "
                             f"a {h}x{w} input")
        return oh, ow

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _check_4d(bottom, "Convolution")
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

    def _im2col(self, x: Any) -> Any:
        """(N, C, H, W) -> (N, C·kh·kw, oh·ow); a free reshape for 1x1 stride-1 unpadded kernels."""
        if self.kernel == (1, 1) and self.stride == (1, 1) and self.pad == (0, 0):
            return x.reshape(x.shape[0], x.shape[1], -1)
        return self.backend.im2col(x, *self.kernel, *self.stride, *self.pad, *self.dilation)

    def _col2im(self, col: Any, shape: tuple[int, ...]) -> Any:
        if self.kernel == (1, 1) and self.stride == (1, 1) and self.pad == (0, 0):
            return col.reshape(shape)
        return self.backend.col2im(col, shape, *self.kernel, *self.stride, *self.pad,
                                   *self.dilation)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        g = self.group
        w = self.blobs[0].data.reshape(g, self.num_output // g, -1)  # (G, O/G, K/G)
        # Backward reuses the columns in TRAIN; TEST nets recompute them rather than hold them.
        self._cols = []
        for b, t in zip(bottom, top, strict=True):
            n = b.shape[0]
            col = self._im2col(b.data)  # (N, K, P)
            if self.phase == PHASE_TRAIN:
                self._cols.append(col)
            y = self.xp.matmul(w, col.reshape(n, g, -1, col.shape[-1]))  # (N, G, O/G, P)
            t.data[...] = y.reshape(t.shape)
            if self.bias_term:
                t.data += self.blobs[1].data.reshape(1, -1, 1, 1)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        g = self.group
        weight = self.blobs[0]
        w = weight.data.reshape(g, self.num_output // g, -1)  # (G, O/G, K/G)
        for i, (t, b) in enumerate(zip(top, bottom, strict=True)):
            n = t.shape[0]
            dy = t.diff.reshape(n, g, self.num_output // g, -1)  # (N, G, O/G, P)
            col = self._cols[i] if self._cols else self._im2col(b.data)
            col = col.reshape(n, g, -1, col.shape[-1])  # (N, G, K/G, P)
            if self.bias_term:
                self.blobs[1].diff += t.diff.sum(axis=(0, 2, 3))
            weight.diff += self.xp.matmul(dy, col.swapaxes(-1, -2)).sum(axis=0).reshape(
                weight.shape)
            if propagate_down[i]:
                dcol = self.xp.matmul(w.swapaxes(-1, -2), dy)  # (N, G, K/G, P)
                b.diff[...] = self._col2im(dcol.reshape(n, -1, dcol.shape[-1]), b.shape)


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

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        if self.method == PP.AVE:
            top[0].data[...] = self._average(x)
            return
        best, self._argmax = self._max(x)  # _argmax: window offset i·kw + j, -1 if empty
        top[0].data[...] = best
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
        if self.method == PP.AVE:
            dy = dy / self._pool_size(h, w)
        (ph, pw), (eh, ew) = self.pad, self.extra
        gpad = xp.zeros((n, c, h + 2 * ph + eh, w + 2 * pw + ew), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                g = dy if self.method == PP.AVE else dy * (self._argmax == i * kw + j)
                _strided(gpad, i, j, *self.stride, oh, ow)[...] += g
        bottom[0].diff[...] = gpad[:, :, ph:ph + h, pw:pw + w]
