"""Loss layers (SoftmaxWithLoss, EuclideanLoss) and Accuracy.

A loss layer's top 0 is a 0-axis scalar. The net puts the loss weight in ``top[0].diff``, so
backward scales by it, exactly like Caffe; the labels (bottom 1) never receive a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.layers.base import Layer, LayerError, register, shape_str
from netforge.proto import pb

FLT_MIN = 1.1754943508222875e-38  # Caffe clamps p_label at FLT_MIN, in float and double alike
NORM = pb.LossParameter


def softmax(xp: Any, x: Any, axis: int) -> Any:
    """Softmax along ``axis``, with the max subtracted first."""
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def split_axis(blob: Blob, axis: int) -> tuple[int, int, int]:
    """(outer, channels, inner) counts of ``blob`` around ``axis``."""
    return blob.count_range(0, axis), blob.shape[axis], blob.count_range(axis + 1)


def check_labels(labels: Blob, outer: int, inner: int, data: Blob, axis: int) -> None:
    if labels.count != outer * inner:
        raise LayerError(
            f"number of labels must match number of predictions: label count {labels.count} "
            f"(shape {shape_str(labels.shape)}) != {outer * inner} predictions (outer × inner "
            f"of shape {shape_str(data.shape)} around axis {axis})"
        )


def class_labels(xp: Any, labels: Blob, outer: int, channels: int, inner: int,
                 ignore: int | None) -> tuple[Any, Any]:
    """Integer labels as (outer, inner) and the mask of the ones that count; out-of-range
    labels (other than ``ignore``) are a LayerError."""
    lab = labels.data.reshape(outer, inner).astype(xp.int64)
    valid = lab != ignore if ignore is not None else xp.ones(lab.shape, dtype=bool)
    bad = valid & ((lab < 0) | (lab >= channels))
    if bool(bad.any()):
        value = int(lab[bad][0])
        raise LayerError(f"label value {value} is outside the {channels} classes [0, {channels})")
    return xp.where(valid, lab, 0), valid


class LossLayer(Layer):
    is_loss = True
    auto_top_blobs = True
    exact_bottoms = 2


@register
class SoftmaxWithLoss(LossLayer):
    """−Σ log(max(p_label, FLT_MIN)) / normalizer, with an optional second top: the softmax."""

    type = "SoftmaxWithLoss"
    min_tops = 1
    max_tops = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        lp = self.param.loss_param
        self.ignore: int | None = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        self.normalization = lp.normalization
        if not lp.HasField("normalization") and lp.HasField("normalize"):
            self.normalization = NORM.VALID if lp.normalize else NORM.BATCH_SIZE

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        try:
            self.axis = bottom[0].canonical_axis(self.param.softmax_param.axis)
        except IndexError as e:
            raise LayerError(f"softmax_param.axis: {e}") from None
        self.outer, self.channels, self.inner = split_axis(bottom[0], self.axis)
        check_labels(bottom[1], self.outer, self.inner, bottom[0], self.axis)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape_like(bottom[0])

    def normalizer(self, valid_count: Any) -> Any:
        """Caffe's get_normalizer, never below 1."""
        if self.normalization == NORM.VALID:
            return self.xp.maximum(valid_count, 1)
        if self.normalization == NORM.FULL:
            return float(max(self.outer * self.inner, 1))
        if self.normalization == NORM.BATCH_SIZE:
            return float(max(self.outer, 1))
        return 1.0

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        shape3 = (self.outer, self.channels, self.inner)
        self.prob = softmax(xp, bottom[0].data.reshape(shape3), 1)
        self.label, self.valid = class_labels(xp, bottom[1], self.outer, self.channels,
                                              self.inner, self.ignore)
        p = xp.take_along_axis(self.prob, self.label[:, None, :], axis=1)[:, 0, :]
        loss = -(xp.log(xp.maximum(p, FLT_MIN)) * self.valid).sum()
        top[0].data[...] = loss / self.normalizer(self.valid.sum())
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(bottom[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[1]:
            raise LayerError("SoftmaxWithLoss cannot backpropagate to label inputs")
        if not propagate_down[0]:
            return
        xp = self.xp
        onehot = xp.arange(self.channels)[None, :, None] == self.label[:, None, :]
        diff = (self.prob - onehot) * self.valid[:, None, :]
        scale = top[0].diff.reshape(-1)[0] / self.normalizer(self.valid.sum())
        bottom[0].diff[...] = (diff * scale).reshape(bottom[0].shape)


@register
class EuclideanLoss(LossLayer):
    """Σ(a − b)² / N / 2 with N = bottom[0].shape[0]; both bottoms get gradients."""

    type = "EuclideanLoss"
    exact_tops = 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return True  # both inputs are predictions here (Caffe allows it too)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        a, b = bottom[0], bottom[1]
        if a.count != b.count or a.shape[:1] != b.shape[:1]:
            raise LayerError(
                f"EuclideanLoss inputs must have the same count and first axis: "
                f"{shape_str(a.shape)} ({a.count}) vs {shape_str(b.shape)} ({b.count})"
            )
        top[0].reshape(())

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.diff = bottom[0].data - bottom[1].data.reshape(bottom[0].shape)
        num = max(bottom[0].shape[0], 1) if bottom[0].num_axes else 1
        top[0].data[...] = (self.diff * self.diff).sum() / num / 2

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        num = max(bottom[0].shape[0], 1) if bottom[0].num_axes else 1
        alpha = top[0].diff.reshape(-1)[0] / num
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                bottom[i].diff[...] = (sign * alpha * self.diff).reshape(bottom[i].shape)


@register
class Accuracy(Layer):
    """The fraction of (non-ignored) samples whose true class is in the top_k scores; ties
    count against. A second top gives the per-class accuracy."""

    type = "Accuracy"
    exact_bottoms = 2
    min_tops = 1
    max_tops = 2
    has_backward = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        ap = self.param.accuracy_param
        self.top_k = int(ap.top_k)
        self.ignore: int | None = int(ap.ignore_label) if ap.HasField("ignore_label") else None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        try:
            self.axis = bottom[0].canonical_axis(self.param.accuracy_param.axis)
        except IndexError as e:
            raise LayerError(f"accuracy_param.axis: {e}") from None
        self.outer, self.channels, self.inner = split_axis(bottom[0], self.axis)
        if self.top_k > self.channels:
            raise LayerError(f"top_k ({self.top_k}) must be at most the number of classes "
                             f"({self.channels})")
        check_labels(bottom[1], self.outer, self.inner, bottom[0], self.axis)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape((self.channels,))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        scores = bottom[0].data.reshape(self.outer, self.channels, self.inner)
        label, valid = class_labels(xp, bottom[1], self.outer, self.channels, self.inner,
                                    self.ignore)
        true = xp.take_along_axis(scores, label[:, None, :], axis=1)
        better = (scores >= true).sum(axis=1) - 1  # other classes scoring >= the true one
        correct = (better < self.top_k) & valid
        count = valid.sum()
        top[0].data[...] = correct.sum() / xp.maximum(count, 1)
        if len(top) > 1:
            seen = xp.bincount(label[valid], minlength=self.channels)
            hits = xp.bincount(label[correct], minlength=self.channels)
            top[1].data[...] = hits / xp.maximum(seen, 1)
