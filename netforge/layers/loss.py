"""Loss layers (SoftmaxWithLoss, EuclideanLoss, SigmoidCrossEntropyLoss, HingeLoss,
MultinomialLogisticLoss, InfogainLoss, ContrastiveLoss) and Accuracy.

A loss layer's top 0 is a 0-axis scalar. The net puts the loss weight in ``top[0].diff``, so
backward scales by it, exactly like Caffe; the labels (bottom 1) never receive a gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.data import load_blob_proto
from netforge.errors import ConfigError
from netforge.layers.base import Layer, LayerError, canonical_axis, register, shape_str
from netforge.proto import pb

FLT_MIN = 1.1754943508222875e-38  # Caffe clamps p_label at FLT_MIN, in float and double alike
LOG_THRESHOLD = 1e-20  # Caffe's kLOG_THRESHOLD: probabilities are clamped here before the log
NORM = pb.LossParameter


def softmax(xp: Any, x: Any, axis: int) -> Any:
    """Softmax along ``axis``, with the max subtracted first."""
    e = x - x.max(axis=axis, keepdims=True)
    xp.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


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
    """Integer labels as (outer, inner) and the mask of the ones that count (None when every
    label counts: no ignore_label); out-of-range labels (other than ``ignore``) are a
    LayerError."""
    lab = labels.data.reshape(outer, inner).astype(xp.int64)
    if ignore is None:  # two reductions instead of the masks (the common case, in every step)
        if int(lab.min()) >= 0 and int(lab.max()) < channels:
            return lab, None
        valid = xp.ones(lab.shape, dtype=bool)
    else:
        valid = lab != ignore
    bad = valid & ((lab < 0) | (lab >= channels))
    if bool(bad.any()):
        raise bad_label(float(labels.data.reshape(outer, inner)[bad][0]), channels)
    return xp.where(valid, lab, 0), valid


def bad_label(value: float, channels: int) -> LayerError:
    """The error for a label (as stored: a float, NaN included) outside the classes."""
    shown = str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else str(value)
    return LayerError(f"label value {shown} is outside the {channels} classes [0, {channels})")


def masked(values: Any, valid: Any) -> Any:
    """``values`` (outer, inner) with the entries that do not count zeroed (valid None: all
    count)."""
    return values if valid is None else values * valid


def valid_count(valid: Any, outer: int, inner: int) -> Any:
    return outer * inner if valid is None else valid.sum()


def normalization_mode(lp: pb.LossParameter, default: int) -> int:
    """loss_param.normalization; else the deprecated ``normalize`` (true: VALID, false:
    BATCH_SIZE); else ``default`` (VALID for SoftmaxWithLoss, BATCH_SIZE for
    SigmoidCrossEntropyLoss, as in Caffe)."""
    if lp.HasField("normalization"):
        return int(lp.normalization)
    if lp.HasField("normalize"):
        return int(NORM.VALID if lp.normalize else NORM.BATCH_SIZE)
    return default


class LossLayer(Layer):
    is_loss = True
    auto_top_blobs = True
    exact_bottoms = 2

    def reshape_per_sample(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Scores (N, ...) — one class per element after the first axis — and N labels."""
        self.num = check_first_axis(bottom[0], bottom[1])
        self.dim = bottom[0].count_range(1)
        check_labels(bottom[1], self.num, 1, bottom[0], 1)
        top[0].reshape(())
    # Set by reshape in layers that normalise with loss_param (read_loss_param).
    outer: int = 1
    inner: int = 1

    def read_loss_param(self, default: int = NORM.VALID) -> None:
        """``self.ignore`` (loss_param.ignore_label or None) and ``self.normalization``."""
        lp = self.param.loss_param
        self.ignore: int | None = int(lp.ignore_label) if lp.HasField("ignore_label") else None
        self.normalization = normalization_mode(lp, default)

    def normalizer(self, valid_count: Any) -> Any:
        """Caffe's get_normalizer, never below 1."""
        if self.normalization == NORM.VALID:
            return self.xp.maximum(valid_count, 1)
        if self.normalization == NORM.FULL:
            return float(max(self.outer * self.inner, 1))
        if self.normalization == NORM.BATCH_SIZE:
            return float(max(self.outer, 1))
        return 1.0


def check_first_axis(data: Blob, labels: Blob, what: str = "label") -> int:
    """Caffe's LossLayer::Reshape check: the inputs share their first axis. Returns it."""
    if not data.num_axes or not labels.num_axes or data.shape[0] != labels.shape[0]:
        raise LayerError(
            f"the data and {what} inputs must have the same first axis: "
            f"{shape_str(data.shape)} vs {shape_str(labels.shape)}"
        )
    return data.shape[0]


class _SoftmaxClassLoss(LossLayer):
    """A softmax over the classes along an axis, with one label per other position (shared by
    SoftmaxWithLoss and InfogainLoss); an optional second top is the softmax."""

    def reshape_classes(self, bottom: Sequence[Blob], top: Sequence[Blob], axis: int,
                        what: str) -> None:
        self.axis = canonical_axis(bottom[0], axis, what)
        self.outer, self.channels, self.inner = split_axis(bottom[0], self.axis)
        check_labels(bottom[1], self.outer, self.inner, bottom[0], self.axis)
        top[0].reshape(())
        if len(top) > 1:
            top[1].reshape_like(bottom[0])

    def softmax_and_labels(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Sets ``prob`` (outer, K, inner), ``label`` and ``valid`` (outer, inner)."""
        xp = self.xp
        shape3 = (self.outer, self.channels, self.inner)
        self.prob = softmax(xp, bottom[0].data.reshape(shape3), 1)
        self.label, self.valid = class_labels(xp, bottom[1], self.outer, self.channels,
                                              self.inner, self.ignore)
        if len(top) > 1:
            top[1].data[...] = self.prob.reshape(bottom[0].shape)

    def count(self) -> Any:
        """How many labels count (for the VALID normalizer)."""
        return valid_count(self.valid, self.outer, self.inner)


@register
class SoftmaxWithLoss(_SoftmaxClassLoss):
    """−Σ log(max(p_label, FLT_MIN)) / normalizer, with an optional second top: the softmax."""

    type = "SoftmaxWithLoss"
    min_tops = 1
    max_tops = 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.read_loss_param(NORM.VALID)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.reshape_classes(bottom, top, self.param.softmax_param.axis, "softmax_param.axis")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        self.fused = self.backend.compiled  # the same sums in one compiled pass each way
        if self.fused:
            shape3 = (self.outer, self.channels, self.inner)
            self.prob = self.buffer("prob", shape3)
            loss, self.counted, bad = self.backend.softmax_loss(
                bottom[0].data.reshape(shape3), bottom[1].data, self.ignore, self.prob, FLT_MIN)
            if bad is not None:
                raise bad_label(bad, self.channels)
            if len(top) > 1:
                top[1].data[...] = self.prob.reshape(bottom[0].shape)
            top[0].data[...] = loss / self.normalizer(self.counted)
            return
        self.softmax_and_labels(bottom, top)
        p = xp.take_along_axis(self.prob, self.label[:, None, :], axis=1)[:, 0, :]
        loss = -masked(xp.log(xp.maximum(p, FLT_MIN)), self.valid).sum()
        top[0].data[...] = loss / self.normalizer(self.count())

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[1]:
            raise LayerError("SoftmaxWithLoss cannot backpropagate to label inputs")
        if not propagate_down[0]:
            return
        xp = self.xp
        diff = bottom[0].diff.reshape(self.prob.shape)
        if self.fused:
            scale = scalar_diff(top[0]) / self.normalizer(self.counted)
            self.backend.softmax_loss_backward(self.prob, bottom[1].data, self.ignore,
                                               float(scale), diff)
            return
        scale = scalar_diff(top[0]) / self.normalizer(self.count())
        xp.multiply(self.prob, scale, out=diff)
        picked = xp.take_along_axis(diff, self.label[:, None, :], axis=1)
        xp.put_along_axis(diff, self.label[:, None, :], picked - scale, axis=1)
        if self.valid is not None:
            diff *= self.valid[:, None, :]


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
        self.axis = canonical_axis(bottom[0], self.param.accuracy_param.axis,
                                   "accuracy_param.axis")
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
        correct = masked(better < self.top_k, valid)
        count = valid_count(valid, self.outer, self.inner)
        top[0].data[...] = correct.sum() / xp.maximum(count, 1)
        if len(top) > 1:
            if valid is None:
                valid = xp.ones(label.shape, dtype=bool)
            seen = xp.bincount(label[valid], minlength=self.channels)
            hits = xp.bincount(label[correct], minlength=self.channels)
            top[1].data[...] = hits / xp.maximum(seen, 1)


# -- Caffe's other loss layers ---------------------------------------------------------------------
def scalar_diff(top: Blob) -> Any:
    """The loss weight the net put in a loss top's diff."""
    return top.diff.reshape(-1)[0]


@register
class SigmoidCrossEntropyLoss(LossLayer):
    """−Σ [t·log σ(x) + (1 − t)·log(1 − σ(x))] / normalizer over every non-ignored element, in
    the overflow-free form x·(t − [x ≥ 0]) − log(1 + exp(−|x|)). Targets equal (after C's
    truncation to int) to loss_param.ignore_label are skipped. The normalizer defaults to
    BATCH_SIZE (the first axis) when neither normalization nor normalize is set."""

    type = "SigmoidCrossEntropyLoss"
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.read_loss_param(NORM.BATCH_SIZE)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x, t = bottom[0], bottom[1]
        self.outer = check_first_axis(x, t, "target")
        self.inner = x.count_range(1)
        if x.count != t.count:
            raise LayerError(
                f"SigmoidCrossEntropyLoss inputs must have the same count: scores "
                f"{shape_str(x.shape)} ({x.count}) vs targets {shape_str(t.shape)} ({t.count})"
            )
        top[0].reshape(())

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data
        t = bottom[1].data.reshape(x.shape)
        if self.ignore is None:
            self.valid = xp.ones(x.shape, dtype=bool)
        else:
            self.valid = t.astype(xp.int64) != self.ignore
        per = x * (t - (x >= 0)) - xp.log1p(xp.exp(-xp.abs(x)))
        loss = -xp.where(self.valid, per, 0).sum()
        self.norm = self.normalizer(self.valid.sum())
        top[0].data[...] = loss / self.norm

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[1]:
            raise LayerError("SigmoidCrossEntropyLoss cannot backpropagate to label inputs")
        if not propagate_down[0]:
            return
        xp = self.xp
        x = bottom[0].data
        sig = 0.5 * xp.tanh(0.5 * x) + 0.5  # the sigmoid, with no overflow for large |x|
        diff = xp.where(self.valid, sig - bottom[1].data.reshape(x.shape), 0)
        bottom[0].diff[...] = diff * (scalar_diff(top[0]) / self.norm)


@register
class HingeLoss(LossLayer):
    """One-vs-all hinge: Σ_n Σ_k max(0, 1 − t_nk·x_nk) / N with t = +1 for the true class and
    −1 otherwise (hinge_loss_param.norm L1), or the sum of squares of those terms / N (L2).
    Scores are (N, ...), one class per element after the first axis; labels are N integers."""

    type = "HingeLoss"
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.norm = int(self.param.hinge_loss_param.norm)

    reshape = LossLayer.reshape_per_sample

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        label, _ = class_labels(xp, bottom[1], self.num, self.dim, 1, None)
        x = bottom[0].data.reshape(self.num, self.dim)
        self.sign = (1 - 2 * (xp.arange(self.dim)[None, :] == label)).astype(x.dtype)  # −t
        self.margin = xp.maximum(1 + self.sign * x, 0)  # max(0, 1 − t·x)
        if self.norm == pb.HingeLossParameter.L2:
            loss = (self.margin * self.margin).sum()
        else:
            loss = self.margin.sum()
        top[0].data[...] = loss / max(self.num, 1)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[1]:
            raise LayerError("HingeLoss cannot backpropagate to label inputs")
        if not propagate_down[0]:
            return
        xp = self.xp
        scale = scalar_diff(top[0]) / max(self.num, 1)
        if self.norm == pb.HingeLossParameter.L2:
            diff = 2 * self.sign * self.margin
        else:
            diff = self.sign * xp.sign(self.margin)  # 0 where the hinge is flat (Caffe's sign)
        bottom[0].diff[...] = (diff * scale).reshape(bottom[0].shape)


@register
class MultinomialLogisticLoss(LossLayer):
    """−Σ_n log(max(p_n,label_n, 1e-20)) / N for probabilities (N, ...) — one class per element
    after the first axis — and N integer labels."""

    type = "MultinomialLogisticLoss"
    exact_tops = 1

    reshape = LossLayer.reshape_per_sample

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        self.label, _ = class_labels(xp, bottom[1], self.num, self.dim, 1, None)
        p = bottom[0].data.reshape(self.num, self.dim)
        self.p_label = xp.maximum(xp.take_along_axis(p, self.label, axis=1), LOG_THRESHOLD)
        top[0].data[...] = -xp.log(self.p_label).sum() / max(self.num, 1)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[1]:
            raise LayerError("MultinomialLogisticLoss cannot backpropagate to label inputs")
        if not propagate_down[0]:
            return
        xp = self.xp
        scale = -scalar_diff(top[0]) / max(self.num, 1)
        onehot = xp.arange(self.dim)[None, :] == self.label
        diff = xp.where(onehot, scale / self.p_label, 0)
        bottom[0].diff[...] = diff.reshape(bottom[0].shape)


@register
class InfogainLoss(_SoftmaxClassLoss):
    """Softmax along infogain_loss_param.axis, then −Σ_k H[label, k]·log(max(p_k, 1e-20)) per
    non-ignored position, / the loss_param normalizer (VALID by default). H (K × K) is the third
    bottom or the BlobProto file infogain_loss_param.source; with H = I this is
    SoftmaxWithLoss (up to the clamp). An optional second top is the softmax."""

    type = "InfogainLoss"
    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 3
    min_tops = 1
    max_tops = 2

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0  # neither the labels nor H

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.param.loss_param.HasField("normalize"):
            raise LayerError('loss_param.normalize is deprecated and not accepted by '
                             'InfogainLoss: use loss_param.normalization')
        self.read_loss_param(NORM.VALID)
        self.h_file: Any = None
        if len(bottom) < 3:
            source = self.param.infogain_loss_param.source
            if not source:
                raise LayerError("infogain_loss_param.source must name the infogain matrix H "
                                 "(a BlobProto file) when H is not given as a third bottom")
            try:
                h = load_blob_proto(self.ctx.resolve_path(source), "infogain matrix file")
            except ConfigError as e:
                raise LayerError(f"infogain_loss_param.source '{source}': cannot load the "
                                 f"infogain matrix H ({e.message})") from None
            self.h_file = self.backend.asarray(h)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        check_first_axis(bottom[0], bottom[1])
        self.reshape_classes(bottom, top, self.param.infogain_loss_param.axis,
                             "infogain_loss_param.axis")
        k = self.channels
        h_count = bottom[2].count if len(bottom) > 2 else int(self.h_file.size)
        if h_count != k * k:
            where = "bottom 2" if len(bottom) > 2 else f"'{self.param.infogain_loss_param.source}'"
            raise LayerError(f"the infogain matrix H ({where}) has {h_count} values; it must "
                             f"be {k}×{k} = {k * k} for the {k} classes along axis {self.axis}")

    def matrix(self, bottom: Sequence[Blob]) -> Any:
        h = bottom[2].data if len(bottom) > 2 else self.h_file
        return h.reshape(self.channels, self.channels)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        self.softmax_and_labels(bottom, top)
        h_rows = self.matrix(bottom)[self.label].transpose(0, 2, 1)  # (outer, K, inner)
        log_p = xp.log(xp.maximum(self.prob, LOG_THRESHOLD))
        if self.valid is not None:
            h_rows = h_rows * self.valid[:, None, :]
        loss = -(h_rows * log_p).sum()
        top[0].data[...] = loss / self.normalizer(self.count())

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[1]:
            raise LayerError("InfogainLoss cannot backpropagate to label inputs")
        if len(propagate_down) > 2 and propagate_down[2]:
            raise LayerError("InfogainLoss cannot backpropagate to the infogain matrix input")
        if not propagate_down[0]:
            return
        h = self.matrix(bottom)
        row_sums = h.sum(axis=1)[self.label]  # (outer, inner)
        h_rows = h[self.label].transpose(0, 2, 1)
        diff = self.prob * row_sums[:, None, :] - h_rows
        if self.valid is not None:
            diff *= self.valid[:, None, :]
        scale = scalar_diff(top[0]) / self.normalizer(self.count())
        bottom[0].diff[...] = (diff * scale).reshape(bottom[0].shape)


@register
class ContrastiveLoss(LossLayer):
    """Σ_n [sim_n ? d_n² : max(margin − d_n, 0)²] / 2N with d_n = ‖a_n − b_n‖, for features a, b
    of shape (N, C) (or (N, C, 1, 1)) and N similarity labels (nonzero after truncation to int
    means similar). legacy_version uses max(margin − d_n², 0) for dissimilar pairs. Both feature
    inputs receive gradients; as in Caffe the dissimilar-pair gradient divides by d + 1e-4."""

    type = "ContrastiveLoss"
    exact_bottoms = 3
    exact_tops = 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        cp = self.param.contrastive_loss_param
        self.margin = float(cp.margin)
        self.legacy = bool(cp.legacy_version)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        a, b, sim = bottom
        self.num = check_first_axis(a, b, "second feature")
        for blob, what in ((a, "first"), (b, "second")):
            if any(s != 1 for s in blob.shape[2:]):
                raise LayerError(f"ContrastiveLoss {what} features must be (N, C) or "
                                 f"(N, C, 1, 1), got {shape_str(blob.shape)}")
        if a.count != b.count:
            raise LayerError(f"ContrastiveLoss features must have the same channels: "
                             f"{shape_str(a.shape)} vs {shape_str(b.shape)}")
        if sim.count != self.num:
            raise LayerError(f"ContrastiveLoss needs one similarity label per pair: "
                             f"{sim.count} labels (shape {shape_str(sim.shape)}) for "
                             f"{self.num} pairs")
        self.channels = a.count // max(self.num, 1)
        top[0].reshape(())

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        shape2 = (self.num, self.channels)
        self.diff = bottom[0].data.reshape(shape2) - bottom[1].data.reshape(shape2)
        self.dist_sq = (self.diff * self.diff).sum(axis=1)
        self.similar = bottom[2].data.reshape(-1).astype(xp.int64) != 0
        if self.legacy:
            apart = xp.maximum(self.margin - self.dist_sq, 0)
        else:
            apart = xp.maximum(self.margin - xp.sqrt(self.dist_sq), 0) ** 2
        loss = xp.where(self.similar, self.dist_sq, apart).sum()
        top[0].data[...] = loss / max(self.num, 1) / 2

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        xp = self.xp
        if propagate_down[2]:
            bottom[2].diff[...] = 0  # the loss is flat in the (integer) similarity labels
        if not (propagate_down[0] or propagate_down[1]):
            return
        alpha = scalar_diff(top[0]) / max(self.num, 1)
        if self.legacy:
            mdist = self.margin - self.dist_sq
            beta = xp.full(mdist.shape, -1.0, dtype=self.diff.dtype)
        else:
            dist = xp.sqrt(self.dist_sq)
            mdist = self.margin - dist
            beta = -mdist / (dist + 1e-4)
        coef = xp.where(self.similar, 1.0, xp.where(mdist > 0, beta, 0.0))
        grad = coef[:, None] * self.diff * alpha
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                bottom[i].diff[...] = (sign * grad).reshape(bottom[i].shape)
