"""InnerProduct (fully connected): y = x·Wᵀ + b over the axes from ``axis`` on."""

from __future__ import annotations

from collections.abc import Sequence

from netforge.blob import Blob
from netforge.layers.base import Layer, LayerError, register, shape_str


@register
class InnerProduct(Layer):
    """y = x·Wᵀ + b, where x is the bottom flattened to (M, K) at ``axis``.

    Params: num_output, bias_term, weight_filler, bias_filler, axis (may be negative),
    transpose. Blobs: W (num_output, K), or (K, num_output) with transpose, and b (num_output).
    Shape: K = product of the bottom's dims from axis on; top = bottom.shape[:axis] + (num_output,).
    Backward: dW += dyᵀ·x (xᵀ·dy with transpose), db += Σ dy, dx = dy·W (dy·Wᵀ with transpose).
    """

    type = "InnerProduct"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.inner_product_param
        if p.num_output < 1:
            raise LayerError("num_output must be positive")
        self.num_output, self.bias_term, self.transpose = p.num_output, p.bias_term, p.transpose
        self.axis = self._axis(bottom[0], p.axis)
        self.k = bottom[0].count_range(self.axis)
        w_shape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.blobs = self.weight_and_bias(p, w_shape, self.num_output, self.bias_term)

    @staticmethod
    def _axis(b: Blob, axis: int) -> int:
        try:
            return b.canonical_axis(axis)
        except IndexError:
            raise LayerError(f"axis {axis} is out of range for a bottom of shape "
                             f"{shape_str(b.shape)}") from None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        axis = self._axis(bottom[0], self.param.inner_product_param.axis)
        k = bottom[0].count_range(axis)
        if k != self.k:
            raise LayerError(f"bottom {shape_str(bottom[0].shape)} flattens to {k} inputs from "
                             f"axis {axis}, but the weights expect {self.k}")
        self.axis = axis
        top[0].reshape((*bottom[0].shape[:axis], self.num_output))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(-1, self.k)
        w = self.blobs[0].data
        y = x @ w if self.transpose else x @ w.T
        if self.bias_term:
            y += self.blobs[1].data
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(-1, self.k)
        dy = top[0].diff.reshape(-1, self.num_output)
        weight = self.blobs[0]
        weight.diff += x.T @ dy if self.transpose else dy.T @ x
        if self.bias_term:
            self.blobs[1].diff += dy.sum(axis=0)
        if propagate_down[0]:
            w = weight.data
            bottom[0].diff[...] = (dy @ w.T if self.transpose else dy @ w).reshape(
                bottom[0].shape)
