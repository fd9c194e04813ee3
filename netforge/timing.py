"""Per-layer timing of a net (Caffe's `caffe time`): forward in order, backward in reverse."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from netforge.net import Net


@dataclass
class Timing:
    """Average milliseconds per iteration, per layer and in total."""

    iterations: int
    layer_names: list[str]
    forward_ms: list[float]
    backward_ms: list[float]
    iteration_ms: list[float] = field(default_factory=list)
    initial_loss: float = 0.0

    @property
    def forward_total(self) -> float:
        return sum(self.forward_ms)

    @property
    def backward_total(self) -> float:
        return sum(self.backward_ms)


def time_net(net: Net, iterations: int = 50, warmup: int = 1) -> Timing:
    """Time ``iterations`` forward-backward passes, layer by layer, after ``warmup`` untimed
    ones of the whole net and as many of the layers one at a time: the timed passes run each
    layer on its own (a pooling that a training step makes inside its convolution too), so
    their kernels are compiled or loaded from numba's cache, and their buffers made, before
    any pass is timed."""
    initial = 0.0
    for _ in range(warmup):
        net.forward()
        initial = net.loss
        net.backward()
    n = len(net.layers)
    fwd, bwd = [0.0] * n, [0.0] * n
    per_iter: list[float] = []
    with net.backend.running():
        _timed_passes(net, warmup, [0.0] * n, [0.0] * n, [])
        _timed_passes(net, iterations, fwd, bwd, per_iter)
    scale = 1e3 / max(iterations, 1)
    return Timing(iterations, list(net.layer_names), [t * scale for t in fwd],
                  [t * scale for t in bwd], per_iter, initial)


def _timed_passes(net: Net, iterations: int, fwd: list[float], bwd: list[float],
                  per_iter: list[float]) -> None:
    sync, n = net.backend.synchronize, len(net.layers)
    for _ in range(iterations):
        start = time.perf_counter()
        for i, layer in enumerate(net.layers):
            t0 = time.perf_counter()
            layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
            layer.forward(net.bottom_vecs[i], net.top_vecs[i])
            sync()
            fwd[i] += time.perf_counter() - t0
        net.backward_prepare()
        for i in reversed(range(n)):
            if not net.layer_need_backward[i]:
                continue
            t0 = time.perf_counter()
            net.layers[i].backward(net.top_vecs[i], net.bottom_need_backward[i],
                                   net.bottom_vecs[i])
            sync()
            bwd[i] += time.perf_counter() - t0
        per_iter.append((time.perf_counter() - start) * 1e3)
