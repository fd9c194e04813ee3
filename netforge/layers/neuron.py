"""Elementwise (neuron) layers: ReLU, Sigmoid, TanH, Dropout, PReLU, ELU, AbsVal, BNLL, Power,
Exp, Log, Threshold, Clip, Swish.

Every neuron layer takes one bottom and one top of the same shape and may run in place (top is
the same Blob as bottom): forward reads the bottom before writing the top, and backward reads
only what survives in place (ReLU the sign of the output, Sigmoid/TanH the top data, Dropout
its mask). Layers whose backward needs x itself keep a copy of it when run in place. As in
Caffe, a layer whose backward reads its top (Sigmoid, TanH, ELU, BNLL, Exp, Swish) needs that
blob unchanged until backward: no later layer may overwrite it in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.fillers import fill
from netforge.layers.base import PHASE_TRAIN, Layer, LayerError, register
from netforge.proto import pb


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
        self.backend.relu(bottom[0].data, top[0].data, self.slope)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            # In place, bottom data holds y, whose sign matches x's for slope >= 0 (as in Caffe).
            self.backend.relu_backward(bottom[0].data, top[0].diff, bottom[0].diff, self.slope)


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


# -- the rest of Caffe's neuron layers ---------------------------------------------------------
class InputKeepingNeuron(NeuronLayer):
    """A neuron layer whose backward reads the bottom's data. Run in place, the bottom holds y
    after forward, so forward first keeps a copy of x (Caffe's PReLU ``bottom_memory_``) and
    backward reads that instead. ``keeps_input`` may say no when backward needs no x."""

    kept: Any = None

    def keeps_input(self) -> bool:
        return True

    def remember_input(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> Any:
        """Call first in forward; returns x."""
        x = bottom[0].data
        self.kept = x.copy() if top[0] is bottom[0] and self.keeps_input() else None
        return x

    def input_data(self, bottom: Sequence[Blob]) -> Any:
        """x as forward saw it."""
        return self.kept if self.kept is not None else bottom[0].data


@register
class PReLU(InputKeepingNeuron):
    """y = max(0, x) + a_c · min(0, x), with a learnable slope a per channel (axis 1), or one
    slope for all channels when ``channel_shared``. Slopes start at constant 0.25 unless
    ``prelu_param.filler`` says otherwise."""

    type = "PReLU"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._check_axes(bottom[0])
        p = self.param.prelu_param
        self.channel_shared = bool(p.channel_shared)
        self.channels = bottom[0].shape[1]
        if p.HasField("filler"):
            filler = p.filler
        else:
            filler = pb.FillerParameter(type="constant", value=0.25)
        shape = (1,) if self.channel_shared else (self.channels,)
        slope = self.make_blob(shape)
        slope.data[...] = self.backend.asarray(fill(filler, shape, self.ctx.rng,
                                                    self.backend.dtype))
        self.blobs = [slope]

    def _check_axes(self, b: Blob) -> None:
        if b.num_axes < 2:
            raise LayerError(f"PReLU needs a bottom of at least 2 axes (N, C, ...), "
                             f"got shape {b.shape}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._check_axes(bottom[0])
        if not self.channel_shared and bottom[0].shape[1] != self.channels:
            raise LayerError(f"PReLU has {self.channels} slopes but the bottom has "
                             f"{bottom[0].shape[1]} channels (shape {bottom[0].shape})")
        super().reshape(bottom, top)

    def _slope(self, ndim: int) -> Any:
        a = self.blobs[0].data
        return a if self.channel_shared else a.reshape((1, -1) + (1,) * (ndim - 2))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = self.remember_input(bottom, top)
        top[0].data[...] = self.xp.maximum(x, 0) + self._slope(x.ndim) * self.xp.minimum(x, 0)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        x = self.input_data(bottom)
        dy = top[0].diff
        # The slope's gradient first: in place, writing the bottom diff overwrites dy.
        contrib = dy * x * (x <= 0)
        if self.channel_shared:
            self.blobs[0].diff += contrib.sum()
        else:
            axes = tuple(i for i in range(x.ndim) if i != 1)
            self.blobs[0].diff += contrib.sum(axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = self.xp.where(x > 0, dy, dy * self._slope(x.ndim))


@register
class ELU(InputKeepingNeuron):
    """y = x for x > 0, alpha · (exp(x) − 1) otherwise; dx = dy for x > 0, dy · (y + alpha)
    otherwise. For alpha ≥ 0 the sign of y is the sign of x, so in place needs no copy."""

    type = "ELU"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.alpha = float(self.param.elu_param.alpha)

    def keeps_input(self) -> bool:
        return self.alpha < 0

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = self.remember_input(bottom, top)
        top[0].data[...] = self.xp.maximum(x, 0) + self.alpha * self.xp.expm1(
            self.xp.minimum(x, 0))

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        y, dy = top[0].data, top[0].diff
        if self.kept is None and top[0] is bottom[0]:
            positive = y > 0
        else:
            positive = self.input_data(bottom) > 0
        bottom[0].diff[...] = self.xp.where(positive, dy, dy * (y + self.alpha))


@register
class AbsVal(InputKeepingNeuron):
    """y = |x|; dx = sign(x) · dy. (Caffe refuses AbsVal in place; here it keeps x instead.)"""

    type = "AbsVal"

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = self.xp.abs(self.remember_input(bottom, top))

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = self.xp.sign(self.input_data(bottom)) * top[0].diff


@register
class BNLL(NeuronLayer):
    """Binomial normal log likelihood: y = log(1 + exp(x)) (softplus), computed without
    overflow; dx = dy · sigmoid(x) = dy · (1 − exp(−y)), read from the top so it runs in
    place."""

    type = "BNLL"

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        top[0].data[...] = self.xp.maximum(x, 0) + self.xp.log1p(self.xp.exp(-self.xp.abs(x)))

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * -self.xp.expm1(-top[0].data)


def _c_pow(a: float, b: float) -> float:
    """C's pow(a, b): NaN for a negative base with a non-integer exponent, ±inf for a zero base
    with a negative exponent, instead of Python's exceptions."""
    try:
        return math.pow(a, b)
    except OverflowError:
        return math.inf if a > 0 or (float(b).is_integer() and b % 2 == 0) else -math.inf
    except ValueError:
        if a == 0:
            odd = float(b).is_integer() and b % 2 == 1
            return math.copysign(math.inf, a) if odd else math.inf
        return math.nan


@register
class Power(InputKeepingNeuron):
    """y = (shift + scale · x)^power; dx = dy · scale · power · (shift + scale · x)^(power−1).

    As in Caffe, scale · power == 0 gives the constant 1 (power 0) or shift^power and a zero
    gradient, and power 1 gives the affine map and the constant gradient scale. The general
    gradient is the formula itself, which is finite where Caffe's power·y/(shift + scale·x)
    is 0/0 (at shift + scale·x = 0 with power > 1)."""

    type = "Power"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.power_param
        self.power = float(p.power)
        self.scale = float(p.scale)
        self.shift = float(p.shift)
        self.diff_scale = self.power * self.scale

    def keeps_input(self) -> bool:
        return self.diff_scale != 0 and self.power != 1

    def _base(self, x: Any) -> Any:
        u = x * self.scale if self.scale != 1 else x
        return u + self.shift if self.shift != 0 else u

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.diff_scale == 0:
            self.kept = None
            top[0].data[...] = 1.0 if self.power == 0 else _c_pow(self.shift, self.power)
            return
        u = self._base(self.remember_input(bottom, top))
        top[0].data[...] = u if self.power == 1 else u ** self.power

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        dy = top[0].diff
        if self.diff_scale == 0:
            bottom[0].diff[...] = 0
        elif self.power == 1:
            bottom[0].diff[...] = dy * self.diff_scale
        else:
            u = self._base(self.input_data(bottom))
            grad = u if self.power == 2 else u ** (self.power - 1)
            bottom[0].diff[...] = dy * (self.diff_scale * grad)


@register
class Exp(NeuronLayer):
    """y = base^(shift + scale · x) (base −1 means e); dx = dy · y · scale · ln(base)."""

    type = "Exp"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.exp_param
        base, scale, shift = float(p.base), float(p.scale), float(p.shift)
        if base != -1 and not base > 0:
            raise LayerError(f"exp_param.base must be strictly positive (or -1 for e), "
                             f"got {base:g}")
        log_base = 1.0 if base == -1 else math.log(base)
        self.inner_scale = log_base * scale
        if shift == 0:
            self.outer_scale = 1.0
        else:
            self.outer_scale = math.exp(shift) if base == -1 else base ** shift

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        y = self.xp.exp(x * self.inner_scale if self.inner_scale != 1 else x)
        top[0].data[...] = y * self.outer_scale if self.outer_scale != 1 else y

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * top[0].data * self.inner_scale


@register
class Log(InputKeepingNeuron):
    """y = log_base(shift + scale · x) (base −1 means e); dx = dy · scale / (ln(base) ·
    (shift + scale · x))."""

    type = "Log"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.log_param
        base = float(p.base)
        if base != -1 and not base > 0:
            raise LayerError(f"log_param.base must be strictly positive (or -1 for e), "
                             f"got {base:g}")
        if base == 1:
            raise LayerError("log_param.base must not be 1 (log base 1 is undefined)")
        self.base_scale = 1.0 if base == -1 else 1.0 / math.log(base)
        self.scale = float(p.scale)
        self.shift = float(p.shift)
        self.backward_scale = self.scale * self.base_scale

    def _base(self, x: Any) -> Any:
        u = x * self.scale if self.scale != 1 else x
        return u + self.shift if self.shift != 0 else u

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        y = self.xp.log(self._base(self.remember_input(bottom, top)))
        top[0].data[...] = y * self.base_scale if self.base_scale != 1 else y

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            u = self._base(self.input_data(bottom))
            bottom[0].diff[...] = top[0].diff * self.backward_scale / u


@register
class Threshold(NeuronLayer):
    """y = 1 where x > threshold, else 0. Caffe gives it no backward."""

    type = "Threshold"
    has_backward = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.threshold = float(self.param.threshold_param.threshold)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data > self.threshold


@register
class Clip(InputKeepingNeuron):
    """y = max(min, min(x, max)); dx = dy where min ≤ x ≤ max, else 0. Both bounds are
    required."""

    type = "Clip"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.clip_param
        missing = [f for f in ("min", "max") if not p.HasField(f)]
        if missing:
            raise LayerError(f"Clip needs clip_param {{ min: ... max: ... }}; "
                             f"{' and '.join(missing)} not given")
        self.lo, self.hi = float(p.min), float(p.max)
        if self.lo > self.hi:
            raise LayerError(f"clip_param.min ({self.lo:g}) is greater than "
                             f"clip_param.max ({self.hi:g})")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = self.remember_input(bottom, top)
        top[0].data[...] = self.xp.maximum(self.xp.minimum(x, self.hi), self.lo)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            x = self.input_data(bottom)
            bottom[0].diff[...] = top[0].diff * ((x >= self.lo) & (x <= self.hi))


@register
class Swish(NeuronLayer):
    """y = x · sigmoid(beta · x); dx = dy · (beta · y + s · (1 − beta · y)) with s the sigmoid
    kept from forward (as Caffe does), so it runs in place."""

    type = "Swish"

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.beta = float(self.param.swish_param.beta)
        self.sig: Any = None

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data
        self.sig = 0.5 * self.xp.tanh((0.5 * self.beta) * x) + 0.5
        top[0].data[...] = x * self.sig

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            by = self.beta * top[0].data
            bottom[0].diff[...] = top[0].diff * (by + self.sig * (1 - by))
