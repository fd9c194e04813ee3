"""InnerProduct (fully connected): y = x·Wᵀ + b over the axes from ``axis`` on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from netforge.backend.base import even_slices
from netforge.blob import Blob
from netforge.layers.base import Layer, LayerError, canonical_axis, register, shape_str


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
        self.axis = canonical_axis(bottom[0], p.axis, "inner_product_param.axis")
        self.k = bottom[0].count_range(self.axis)
        w_shape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.blobs = self.weight_and_bias(p, w_shape, self.num_output, self.bias_term)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        axis = canonical_axis(bottom[0], self.param.inner_product_param.axis,
                              "inner_product_param.axis")
        k = bottom[0].count_range(axis)
        if k != self.k:
            raise LayerError(f"bottom {shape_str(bottom[0].shape)} flattens to {k} inputs from "
                             f"axis {axis}, but the weights expect {self.k}")
        self.axis = axis
        top[0].reshape((*bottom[0].shape[:axis], self.num_output))

    # The batch is split into parts that run on every worker (backend.parallel).
    def _cost(self, m: int) -> int:
        return m * self.k * self.num_output

    def _parts(self, m: int) -> list[slice]:
        return self.backend.batch_parts(m, self._cost(m))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(-1, self.k)
        y = top[0].data.reshape(-1, self.num_output)
        w = self.blobs[0].data
        b = self.blobs[1].data if self.bias_term else None
        cost, xp = self._cost(x.shape[0]), self.xp
        # each part starts with backend.matmul, which starts the other workers (deferred)
        if self.transpose:
            parts = self._parts(x.shape[0])

            def run_images(slot: int, k: int) -> None:
                part = parts[k]
                self.backend.matmul(x[part], w, y[part])
                if b is not None:
                    y[part] += b

            self.backend.parallel(run_images, len(parts), cost, deferred=True)
            return
        # W · xᵀ a block of W's rows per part, each transposed into its columns of y with the
        # bias in one pass: OpenBLAS runs this orientation faster than x · Wᵀ (LeNet's ip1,
        # half the work: 0.34 vs 0.46 ms), and each worker reads only its rows of W, which a
        # training step brings from memory (LeNet's ip1 in a step 0.03 ms faster than by halves
        # of the batch, 17 of 20 in-process A/B rounds).
        rows = even_slices(self.num_output, len(self._parts(x.shape[0])))

        def run(slot: int, k: int) -> None:
            r = rows[k]
            yt = self.buffer(f"yt.{slot}", (r.stop - r.start, x.shape[0]))
            self.backend.matmul(w[r], x.T, yt)
            if b is not None:
                xp.add(yt.T, b[r], out=y[:, r])
            else:
                y[:, r] = yt.T

        self.backend.parallel(run, len(rows), cost, deferred=True)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(-1, self.k)
        dy = top[0].diff.reshape(-1, self.num_output)
        weight, xp, down = self.blobs[0], self.xp, propagate_down[0]
        dx = bottom[0].diff.reshape(-1, self.k) if down else None
        parts = self._parts(x.shape[0])
        # dW = aᵀ·b over the whole batch, split by rows of W: each worker adds its rows into
        # the diff itself (no per-part copies of dW summed afterwards on one core; LeNet's
        # ip1 backward in a training step 1.09 -> 0.90 ms), and each row's sum over the batch
        # is one product, so it does not depend on the number of workers.
        a, b = (x, dy) if self.transpose else (dy, x)
        rows = even_slices(weight.shape[0], len(parts))
        if not self.transpose and x.shape[0] > 1:
            self._backward_by_rows(x, dy, dx, rows, self.param_updates.get(0))
            return

        def run(slot: int, k: int) -> None:
            if k < len(rows):
                r = rows[k]
                if a.shape[0] == 1:  # NumPy's matmul does not hand a one-row product to
                    # BLAS (0.3 ms for LeNet's ip1 at batch 1, 10x the outer product)
                    g = self.buffer(f"dw.{slot}", (r.stop - r.start, weight.shape[1]))
                    xp.multiply(a[0, r][:, None], b[0], out=g)
                    weight.diff[r] += g
                else:  # added into the diff by the GEMM
                    self.backend.matmul(a[:, r].T, b, weight.diff[r], accumulate=True)
            if k == 0 and self.bias_term:
                self.blobs[1].diff += dy.sum(axis=0)
            if dx is not None:
                w = weight.data
                self.backend.matmul(dy[parts[k]], w.T if self.transpose else w, dx[parts[k]])

        self.backend.parallel(run, len(parts), self._cost(x.shape[0]), deferred=True)

    # Each worker takes a block of W's rows: its share of the bottom gradient, dy[:, rows] ·
    # W[rows] (the workers' partials summed in worker order afterwards: a run is repeatable
    # for a given worker count), its rows of the weight gradient and, when the solver handed
    # the update of W in (Layer.param_updates) and W is large, its rows' update, while they are
    # still in the core's cache: each worker reads only its half of W, and the update no
    # longer reads W, its gradient and its momentum back from memory beside the next layer's
    # backward. In-process A/B, LeNet's step in a slow spell of the VM: 7.37 -> 6.62 ms (16 of
    # 16 rounds: ip1's backward +0.13 ms, conv2's -0.84); in a calm one 5.83 -> 5.73 (15 of 16).
    # Blocks of 64 rows (a block of W, its gradient and momentum in the core's L2) measured
    # slower: +0.16 ms, the products and the update called four times as often.
    UPDATE_MIN = 1 << 16

    def takes_param_update(self, index: int) -> bool:
        # a small W: the solver's update beside the next layer's backward costs the step less
        return index == 0 and not self.transpose and self.blobs[0].count >= self.UPDATE_MIN

    def _backward_by_rows(self, x: Any, dy: Any, dx: Any, rows: list[slice],
                          update: Callable[[slice], None] | None) -> None:
        weight = self.blobs[0]
        w, g = weight.data, weight.diff
        if not self.takes_param_update(0):
            update = None
        partial = ([dx] if len(rows) == 1 or dx is None else
                   [self.buffer(f"dx.{k}", dx.shape) for k in range(len(rows))])

        def run(slot: int, k: int) -> None:
            r = rows[k]
            if r.stop == r.start:  # more workers than rows
                if dx is not None:
                    partial[k][...] = 0
            else:
                if dx is not None:
                    self.backend.matmul(dy[:, r], w[r], partial[k])
                self.backend.matmul(dy[:, r].T, x, g[r], accumulate=True)
                if update is not None:
                    update(r)
            if k == 0 and self.bias_term:
                self.blobs[1].diff += dy.sum(axis=0)

        self.backend.parallel(run, len(rows), self._cost(x.shape[0]), deferred=True)
        if dx is not None and len(partial) > 1:
            self.xp.add(partial[0], partial[1], out=dx)
            for more in partial[2:]:
                dx += more
