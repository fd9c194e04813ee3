"""Elementwise (neuron) layers: ReLU, Sigmoid, TanH, Dropout.

Every neuron layer takes one bottom and one top of the same shape and may run in place (top is
the same Blob as bottom): forward reads the bottom before writing the top, and backward reads
only what survives in place (ReLU the sign of the output, Sigmoid/TanH the top data, Dropout
its mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.layers.base import PHASE_TRAIN, Layer, LayerError, register


class NeuronLayer(Layer):
    """One bottom, one top shaped like it (a no-op when in place)."""

    exact_bottoms = 1
    exact_tops = 1

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape_like(bottom[0])


@register
class ReLU(NeuronLayer):
    """y = max(0, x) + negative_slope · min(0, x)."""

    type = "ReLU"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.slope = float(self.param.relu_param.negative_slope)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        if self.slope:
            top[0].data[...] = self.xp.where(x > 0, x, x * self.slope)
        else:
            top[0].data[...] = self.xp.maximum(x, 0)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        # In place, bottom data holds y, whose sign matches x's for slope >= 0 (as in Caffe).
        positive = bottom[0].data > 0
        dy = top[0].diff
        if self.slope:
            bottom[0].diff[...] = self.xp.where(positive, dy, dy * self.slope)
        else:
            bottom[0].diff[...] = dy * positive


@register
class Sigmoid(NeuronLayer):
    """y = 1 / (1 + exp(−x)); dx = dy · y · (1 − y)."""

    type = "Sigmoid"

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        # 0.5·tanh(0.5x) + 0.5 is the sigmoid without overflow in exp for large |x|.
        top[0].data[...] = 0.5 * self.xp.tanh(0.5 * bottom[0].data) + 0.5

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * y * (1 - y)


@register
class TanH(NeuronLayer):
    """y = tanh(x); dx = dy · (1 − y²)."""

    type = "TanH"

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = self.xp.tanh(bottom[0].data)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            y = top[0].data
            bottom[0].diff[...] = top[0].diff * (1 - y * y)


@register
class Dropout(NeuronLayer):
    """TRAIN: y = x · mask / (1 − p) with mask ~ Bernoulli(1 − p); TEST: y = x."""

    type = "Dropout"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.ratio = float(self.param.dropout_param.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise LayerError(f"dropout_ratio must be in [0, 1), got {self.ratio}")
        self.scale = 1.0 / (1.0 - self.ratio)
        self.mask: Any = None

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        if self.phase != PHASE_TRAIN:
            if top[0] is not bottom[0]:
                top[0].data[...] = x
            return
        # Drawn on the host from the net's generator, so one seed gives one run on any device.
        keep = self.ctx.rng.random(bottom[0].shape) >= self.ratio
        self.mask = self.backend.asarray(keep) * self.scale
        top[0].data[...] = x * self.mask

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        if self.phase != PHASE_TRAIN:
            if top[0] is not bottom[0]:
                bottom[0].diff[...] = top[0].diff
            return
        bottom[0].diff[...] = top[0].diff * self.mask
