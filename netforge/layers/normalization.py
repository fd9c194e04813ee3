"""Normalization layers: BatchNorm, Scale, Bias, LRN and MVN, with Caffe's semantics.

BatchNorm only normalizes (Caffe pairs it with a Scale layer with bias_term for the learned
affine part). Its three blobs are running statistics, not learnable parameters: Caffe forces
their lr_mult to 0 by writing ``param`` entries into the layer's own LayerParameter, and so
does this module, before the net reads those entries.

Layers that may run in place (BatchNorm, Scale, LRN, MVN) keep what their backward needs
from the forward pass, so a later in-place layer overwriting the shared blob does no harm.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.fillers import fill
from netforge.layers.base import PHASE_TEST, Layer, LayerError, canonical_axis, register, shape_str
from netforge.proto import pb

log = logging.getLogger("netforge")

NR = pb.LRNParameter


def _same_or_copy(bottom: Blob, top: Blob) -> Any:
    """The bottom's data as backward will need it: a copy when the layer runs in place."""
    return bottom.data.copy() if top is bottom else bottom.data


# -- BatchNorm ------------------------------------------------------------------------------------

@register
class BatchNorm(Layer):
    """y = (x − mean) / sqrt(var + eps) per channel (axis 1), over N and every trailing axis.

    Params (batch_norm_param): use_global_stats (unset: false in TRAIN, true in TEST),
    moving_average_fraction (.999), eps (1e-5).
    Blobs (Caffe's, all with lr_mult forced to 0): running mean sum (C), running variance sum
    (C) and their weight (1). With batch statistics each forward updates them:
    w ← f·w + 1, mean_sum ← f·mean_sum + mean, var_sum ← f·var_sum + m/(m−1)·var, where
    m = count / C. With global statistics mean = mean_sum / w and var = var_sum / w (both 0
    while w is 0).
    Backward: global stats dx = dy / std; batch stats
    dx = (dy − mean(dy) − y·mean(dy·y)) / std, the means taken per channel.
    """

    type = "BatchNorm"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.batch_norm_param
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == PHASE_TEST)
        self.fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        if self.eps < 0:
            raise LayerError(f"batch_norm_param.eps must not be negative, got {p.eps:g}")
        x = bottom[0]
        if x.num_axes < 1:
            raise LayerError("BatchNorm needs a bottom with at least one axis (N, C, ...)")
        self.channels = 1 if x.num_axes == 1 else x.shape[1]
        self.blobs = [self.make_blob((self.channels,)), self.make_blob((self.channels,)),
                      self.make_blob((1,))]
        self._mask_statistics()

    def _mask_statistics(self) -> None:
        """Caffe's way of keeping the statistics out of optimization: one ParamSpec per blob
        with lr_mult 0, appended to this layer's own LayerParameter."""
        specs = self.param.param
        for i in range(len(self.blobs)):
            if i >= len(specs):
                specs.add(lr_mult=0.0, decay_mult=0.0)
                continue
            spec = specs[i]
            if spec.lr_mult != 0:
                log.warning("Layer %s: BatchNorm statistics are not learnable parameters; "
                            "param %d has lr_mult %g, forcing it to 0", self.name, i,
                            spec.lr_mult)
                spec.lr_mult = 0.0
            if not spec.HasField("decay_mult"):
                spec.decay_mult = 0.0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0]
        channels = 1 if x.num_axes == 1 else (x.shape[1] if x.num_axes > 1 else -1)
        if channels != self.channels:
            raise LayerError(f"bottom {shape_str(x.shape)} has {channels} channels but the "
                             f"layer was set up for {self.channels}")
        top[0].reshape_like(x)

    def _view(self, a: Any) -> Any:
        """(N, C, S): every trailing axis folded into S."""
        return a.reshape(a.shape[0], self.channels, -1)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp, x = self.xp, self._view(bottom[0].data)
        if self.use_global_stats:
            w = float(self.blobs[2].data[0])
            factor = 0.0 if w == 0 else 1.0 / w
            mean = self.blobs[0].data * factor
            var = self.blobs[1].data * factor
            xc = x - mean[None, :, None]
        else:
            mean = x.mean(axis=(0, 2))
            xc = x - mean[None, :, None]
            var = (xc * xc).mean(axis=(0, 2))
            m = x.size // self.channels
            correction = m / (m - 1) if m > 1 else 1.0
            f = self.fraction
            self.blobs[2].data *= f
            self.blobs[2].data += 1
            self.blobs[0].data[...] = mean + f * self.blobs[0].data
            self.blobs[1].data[...] = correction * var + f * self.blobs[1].data
        self._std = xp.sqrt(var + self.eps).astype(x.dtype, copy=False)
        self._y = xc / self._std[None, :, None]
        top[0].data[...] = self._y.reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy = self._view(top[0].diff)
        std = self._std[None, :, None]
        if self.use_global_stats:
            dx = dy / std
        else:
            y = self._y
            dx = (dy - dy.mean(axis=(0, 2), keepdims=True)
                  - y * (dy * y).mean(axis=(0, 2), keepdims=True)) / std
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)


# -- Scale and Bias -------------------------------------------------------------------------------

def _operand_dims(x: Blob, operand: Blob, axis_param: int, what: str) -> tuple[int, int, int]:
    """(outer, dim, inner) for broadcasting ``operand`` over ``x`` from ``axis_param``; a
    scalar operand (no axes) applies everywhere, whatever the axis."""
    axis = 0 if operand.num_axes == 0 else canonical_axis(x, axis_param, f"{what}.axis")
    if axis + operand.num_axes > x.num_axes:
        raise LayerError(f"the {what.split('_')[0]} operand {shape_str(operand.shape)} extends "
                         f"past bottom {shape_str(x.shape)} when applied from axis {axis}")
    for i, s in enumerate(operand.shape):
        if x.shape[axis + i] != s:
            raise LayerError(f"the {what.split('_')[0]} operand {shape_str(operand.shape)} does "
                             f"not match bottom {shape_str(x.shape)} at axis {axis + i} "
                             f"(applied from axis {axis})")
    return x.count_range(0, axis), operand.count, x.count_range(axis + operand.num_axes)


def _param_shape(x: Blob, axis_param: int, num_axes: int, what: str) -> tuple[int, ...]:
    """The learned operand's shape: bottom.shape[axis : axis + num_axes] (to the end for −1)."""
    axis = canonical_axis(x, axis_param, f"{what}.axis")
    if num_axes < -1:
        raise LayerError(f"{what}.num_axes must be non-negative, or -1 to extend to the end "
                         f"of the bottom, got {num_axes}")
    if num_axes >= 0 and axis + num_axes > x.num_axes:
        raise LayerError(f"{what}.num_axes {num_axes} from axis {axis} extends past bottom "
                         f"{shape_str(x.shape)}")
    return x.shape[axis:] if num_axes == -1 else x.shape[axis:axis + num_axes]


def _filled(layer: Layer, filler: pb.FillerParameter, shape: tuple[int, ...]) -> Blob:
    blob = layer.make_blob(shape)
    blob.data[...] = layer.backend.asarray(fill(filler, shape, layer.ctx.rng,
                                                layer.backend.dtype))
    return blob


@register
class Bias(Layer):
    """y = x + b, with b broadcast over x from ``axis``: the learned blob (one bottom) or
    bottom 1 (two bottoms).

    Params (bias_param): axis (1), num_axes (1; −1 means to the end; the learned blob's shape
    is bottom.shape[axis : axis + num_axes]), filler (default constant 0).
    Backward: dx = dy; db (+= for the blob, = for bottom 1) = dy summed over the other axes.
    """

    type = "Bias"
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if len(bottom) == 1:
            p = self.param.bias_param
            shape = _param_shape(bottom[0], p.axis, p.num_axes, "bias_param")
            self.blobs = [_filled(self, p.filler, shape)]

    def _operand(self, bottom: Sequence[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.dims = _operand_dims(bottom[0], self._operand(bottom), self.param.bias_param.axis,
                                  "bias_param")
        top[0].reshape_like(bottom[0])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        outer, dim, inner = self.dims
        b = self._operand(bottom).data.reshape(1, dim, 1)
        top[0].data[...] = (bottom[0].data.reshape(outer, dim, inner) + b).reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        outer, dim, inner = self.dims
        grad = top[0].diff.reshape(outer, dim, inner).sum(axis=(0, 2))
        if len(bottom) == 1:
            self.blobs[0].diff += grad.reshape(self.blobs[0].shape)
        elif propagate_down[1]:
            bottom[1].diff[...] = grad.reshape(bottom[1].shape)
        if propagate_down[0] and top[0] is not bottom[0]:
            bottom[0].diff[...] = top[0].diff


@register
class Scale(Layer):
    """y = x · s (+ b), with s broadcast over x from ``axis``: the learned blob (one bottom)
    or bottom 1 (two bottoms).

    Params (scale_param): axis (1), num_axes (1; −1 means to the end), filler (default
    constant 1), bias_term (false), bias_filler (default constant 0). The bias is Caffe's
    internal Bias layer over the top (num_axes: scale_param's, or bottom 1's axis count with
    two bottoms). Blobs: [scale, bias] with one bottom, [bias] with two.
    Backward: dx = dy · s; ds (+= for the blob, = for bottom 1) = Σ dy·x over the other axes.
    """

    type = "Scale"
    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.scale_param
        self.blobs = []
        if len(bottom) == 1:
            shape = _param_shape(bottom[0], p.axis, p.num_axes, "scale_param")
            filler = p.filler if p.HasField("filler") else pb.FillerParameter(type="constant",
                                                                               value=1.0)
            self.blobs.append(_filled(self, filler, shape))
        self.bias_layer: Bias | None = None
        if p.bias_term:
            bp = pb.LayerParameter()
            bp.CopyFrom(self.param)
            bp.type = "Bias"
            bp.ClearField("param")
            bp.bias_param.axis = p.axis
            bp.bias_param.num_axes = bottom[1].num_axes if len(bottom) > 1 else p.num_axes
            bp.bias_param.filler.CopyFrom(p.bias_filler)
            self.bias_layer = Bias(bp, self.ctx)
            self.bias_layer.setup([bottom[0]], top)
            self.blobs.append(self.bias_layer.blobs[0])

    def _operand(self, bottom: Sequence[Blob]) -> Blob:
        return bottom[1] if len(bottom) > 1 else self.blobs[0]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.dims = _operand_dims(bottom[0], self._operand(bottom), self.param.scale_param.axis,
                                  "scale_param")
        top[0].reshape_like(bottom[0])
        if self.bias_layer is not None:
            # The blob list may have been rebound (shared or loaded params): follow it.
            self.bias_layer.blobs = [self.blobs[-1]]
            self.bias_layer.reshape([top[0]], top)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        outer, dim, inner = self.dims
        self._x = _same_or_copy(bottom[0], top[0])
        s = self._operand(bottom).data.reshape(1, dim, 1)
        top[0].data[...] = (self._x.reshape(outer, dim, inner) * s).reshape(top[0].shape)
        if self.bias_layer is not None:
            self.bias_layer.forward([top[0]], top)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        outer, dim, inner = self.dims
        if self.bias_layer is not None:
            self.bias_layer.backward(top, [False], [top[0]])
        dy = top[0].diff.reshape(outer, dim, inner)
        operand = self._operand(bottom)
        x = self._x if top[0] is bottom[0] else bottom[0].data
        if len(bottom) == 1 or propagate_down[1]:
            grad = (dy * x.reshape(outer, dim, inner)).sum(axis=(0, 2)).reshape(operand.shape)
            if len(bottom) == 1:
                operand.diff += grad
            else:
                operand.diff[...] = grad
        if propagate_down[0]:
            s = operand.data.reshape(1, dim, 1)
            bottom[0].diff[...] = (dy * s).reshape(bottom[0].shape)


# -- LRN ------------------------------------------------------------------------------------------

@register
class LRN(Layer):
    """Local response normalization of (N, C, H, W) input.

    ACROSS_CHANNELS: s = k + α/n · Σ x² over the n channels centred on c (zero beyond the
    edges), y = x · s^−β.
    WITHIN_CHANNEL (Caffe's Split/Power/AVE-Pooling/Power/Eltwise composite): s = 1 + α ·
    Σ x² / n² over the n×n window centred on (h, w), zero-padded by (n−1)/2, so the padding
    counts in the divisor; k is ignored.
    Backward: dx = dy · s^−β − 2αβ/D · x · W(dy · x · s^(−β−1)), where W is the same window
    sum and D is n (across) or n² (within).
    Params (lrn_param): local_size (5, odd), alpha (1), beta (0.75), norm_region, k (1).
    """

    type = "LRN"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 == 0:
            raise LayerError(f"LRN only supports odd values for local_size, got {self.size}")
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.region = p.norm_region
        if self.region not in (NR.ACROSS_CHANNELS, NR.WITHIN_CHANNEL):
            raise LayerError(f"unknown lrn_param.norm_region {self.region}")
        self.pre_pad = (self.size - 1) // 2

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].num_axes != 4:
            raise LayerError(f"LRN takes 4-D (N, C, H, W) input, got shape "
                             f"{shape_str(bottom[0].shape)}")
        top[0].reshape_like(bottom[0])

    def _window_sum(self, a: Any) -> Any:
        """Σ over the local window (channels, or the h×w square), zero outside the blob."""
        p, xp = self.pre_pad, self.xp
        if self.region == NR.ACROSS_CHANNELS:
            axes = [1]
        else:
            axes = [2, 3]
        for axis in axes:  # the square window is separable: rows, then columns
            n = a.shape[axis]
            widths = [(0, 0)] * a.ndim
            widths[axis] = (p, p)
            padded = xp.pad(a, widths)
            out = xp.zeros_like(a)
            index: list[Any] = [slice(None)] * a.ndim
            for j in range(self.size):
                index[axis] = slice(j, j + n)
                out += padded[tuple(index)]
            a = out
        return a

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        if self.region == NR.ACROSS_CHANNELS:
            self._div, shift = self.size, self.k
        else:
            self._div, shift = self.size * self.size, 1.0
        s = shift + (self.alpha / self._div) * self._window_sum(x * x)
        self._scale = s
        self._factor = s ** -self.beta  # s^−β
        self._x = _same_or_copy(bottom[0], top[0])
        top[0].data[...] = x * self._factor

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        x = self._x if top[0] is bottom[0] else bottom[0].data
        dy = top[0].diff
        ratio = self._window_sum(dy * x * self._factor / self._scale)
        coef = 2.0 * self.alpha * self.beta / self._div
        bottom[0].diff[...] = dy * self._factor - coef * x * ratio


# -- MVN ------------------------------------------------------------------------------------------

@register
class MVN(Layer):
    """Mean-variance normalization: y = (x − mean) / (std + eps) over each (n, c) plane, or
    over each sample with across_channels; only the mean is removed when
    normalize_variance is false. Caffe adds eps to the standard deviation, not the variance.

    Params (mvn_param): normalize_variance (true), across_channels (false), eps (1e-9).
    Backward (D values per group, σ the std): without variance dx = dy − mean(dy); with it
    dx = (dy − mean(dy)) / (σ + eps) − y · mean(dy·y) / σ, the exact gradient of the forward
    (Caffe divides the last term by σ + eps too, a relative difference of eps/σ).
    """

    type = "MVN"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.mvn_param
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = float(p.eps)
        if self.eps < 0:
            raise LayerError(f"mvn_param.eps must not be negative, got {p.eps:g}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0]
        if x.num_axes < 1:
            raise LayerError("MVN needs a bottom with at least one axis (N, C, ...)")
        groups = x.shape[0] if self.across_channels or x.num_axes == 1 else x.count_range(0, 2)
        self.groups = groups
        top[0].reshape_like(x)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(self.groups, -1)
        y = x - x.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            self._sigma = self.xp.sqrt((y * y).mean(axis=1, keepdims=True))
            y /= self._sigma + self.eps
            self._y = y
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        xp = self.xp
        dy = top[0].diff.reshape(self.groups, -1)
        dx = dy - dy.mean(axis=1, keepdims=True)
        if self.normalize_variance:
            y, sigma = self._y, self._sigma
            dx /= sigma + self.eps
            # σ = 0 only for a constant group, where y = 0 and the term vanishes.
            safe = xp.where(sigma > 0, sigma, 1)
            dx -= y * (dy * y).mean(axis=1, keepdims=True) / safe
        bottom[0].diff[...] = dx.reshape(bottom[0].shape)
