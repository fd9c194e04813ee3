"""Utility layers: Softmax, Flatten, Split, Concat, Eltwise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.layers.base import Layer, LayerError, canonical_axis, register, shape_str
from netforge.layers.loss import softmax
from netforge.proto import pb

OP = pb.EltwiseParameter


@register
class Softmax(Layer):
    """Softmax along softmax_param.axis; dx = (dy − Σ_axis dy·y) · y."""

    type = "Softmax"
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.axis = canonical_axis(bottom[0], self.param.softmax_param.axis, "softmax_param.axis")
        top[0].reshape_like(bottom[0])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = softmax(self.xp, bottom[0].data, self.axis)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            y, dy = top[0].data, top[0].diff
            bottom[0].diff[...] = (dy - (dy * y).sum(axis=self.axis, keepdims=True)) * y


@register
class Flatten(Layer):
    """Collapses axes axis..end_axis into one; the top is a copy, not a view."""

    type = "Flatten"
    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if top[0] is bottom[0]:
            raise LayerError("Flatten does not allow in-place computation")
        fp = self.param.flatten_param
        start = canonical_axis(bottom[0], fp.axis, "flatten_param.axis")
        end = canonical_axis(bottom[0], fp.end_axis, "flatten_param.end_axis")
        if end < start:
            raise LayerError(f"flatten_param.end_axis ({fp.end_axis}) comes before axis "
                             f"({fp.axis}) for a bottom of shape {shape_str(bottom[0].shape)}")
        shape = bottom[0].shape
        top[0].reshape((*shape[:start], bottom[0].count_range(start, end + 1), *shape[end + 1:]))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data.reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


@register
class Split(Layer):
    """Copies its bottom to every top; backward sums the top diffs."""

    type = "Split"
    exact_bottoms = 1
    min_tops = 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t in top:
            if t is bottom[0]:
                raise LayerError("Split does not allow in-place computation")
            t.reshape_like(bottom[0])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t in top:
            t.data[...] = bottom[0].data

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        bottom[0].diff[...] = top[0].diff
        for t in top[1:]:
            bottom[0].diff += t.diff


@register
class Concat(Layer):
    """Joins its bottoms along concat_param.axis (or the deprecated concat_dim)."""

    type = "Concat"
    min_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        cp = self.param.concat_param
        if cp.HasField("axis") and cp.HasField("concat_dim"):
            raise LayerError("give either concat_param.axis or the deprecated concat_dim, not both")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        cp = self.param.concat_param
        if cp.HasField("concat_dim"):
            self.axis = int(cp.concat_dim)
            if self.axis >= bottom[0].num_axes:
                raise LayerError(f"concat_dim {self.axis} out of range for a bottom of shape "
                                 f"{shape_str(bottom[0].shape)}")
        else:
            self.axis = canonical_axis(bottom[0], cp.axis, "concat_param.axis")
        first = bottom[0].shape
        for b in bottom[1:]:
            if len(b.shape) != len(first) or any(
                    s != f for i, (s, f) in enumerate(zip(b.shape, first, strict=True))
                    if i != self.axis):
                raise LayerError(
                    f"all Concat inputs must have the same shape except on axis {self.axis}: "
                    f"{shape_str(first)} vs {shape_str(b.shape)}")
        shape = list(first)
        shape[self.axis] = sum(b.shape[self.axis] for b in bottom)
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = self.xp.concatenate([b.data for b in bottom], axis=self.axis)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        offset = 0
        for b, down in zip(bottom, propagate_down, strict=True):
            n = b.shape[self.axis]
            if down:
                index = (slice(None),) * self.axis + (slice(offset, offset + n),)
                b.diff[...] = top[0].diff[index]
            offset += n


@register
class Eltwise(Layer):
    """Elementwise PROD, SUM (with one coeff per bottom) or MAX of ≥ 2 same-shaped bottoms."""

    type = "Eltwise"
    min_bottoms = 2
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        ep = self.param.eltwise_param
        self.op = ep.operation
        self.stable = bool(ep.stable_prod_grad)
        if ep.coeff and len(ep.coeff) != len(bottom):
            raise LayerError(f"Eltwise takes one coeff per bottom blob: got {len(ep.coeff)} "
                             f"coeff(s) for {len(bottom)} bottoms")
        if ep.coeff and self.op == OP.PROD:
            raise LayerError("Eltwise takes coefficients only for SUM")
        self.coeff = [float(c) for c in ep.coeff] or [1.0] * len(bottom)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for b in bottom[1:]:
            if b.shape != bottom[0].shape:
                raise LayerError(f"all Eltwise inputs must have the same shape: "
                                 f"{shape_str(bottom[0].shape)} vs {shape_str(b.shape)}")
        top[0].reshape_like(bottom[0])

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        if self.op == OP.PROD:
            out = bottom[0].data * bottom[1].data
            for b in bottom[2:]:
                out = out * b.data
        elif self.op == OP.SUM:
            out = sum((c * b.data for c, b in zip(self.coeff, bottom, strict=True)),
                      start=xp.zeros(bottom[0].shape, dtype=bottom[0].data.dtype))
        else:
            # Caffe's mask: bottom 1 wins a tie with bottom 0, later bottoms must be strictly
            # greater; argmax (first max wins) over the order 1, 0, 2, 3, ... gives just that.
            order = [1, 0, *range(2, len(bottom))]
            stacked = xp.stack([bottom[i].data for i in order])
            pick = stacked.argmax(axis=0)
            self.max_idx: Any = xp.asarray(order)[pick]
            out = stacked.max(axis=0)
        top[0].data[...] = out

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        dy = top[0].diff
        for i, b in enumerate(bottom):
            if not propagate_down[i]:
                continue
            if self.op == OP.PROD:
                if self.stable:
                    grad = dy
                    for j, other in enumerate(bottom):
                        if j != i:
                            grad = grad * other.data
                    b.diff[...] = grad
                else:
                    b.diff[...] = dy * top[0].data / b.data
            elif self.op == OP.SUM:
                b.diff[...] = dy * self.coeff[i] if self.coeff[i] != 1.0 else dy
            else:
                b.diff[...] = dy * (self.max_idx == i)
