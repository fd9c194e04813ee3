"""Caffe's finite-difference gradient check (test_gradient_check_util.hpp), for one layer.

The objective is ½Σ top² over every top (top_id < 0), or 2·top[top_id][index] for the
exhaustive mode. Backward's analytic gradient is compared with the central difference
(f(x+h) − f(x−h)) / 2h, and a point passes when |a − n| ≤ threshold · max(|a|, |n|, 1).
The RNG is reseeded before every forward so that stochastic layers (Dropout) are repeatable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from netforge.blob import Blob
from netforge.errors import ConfigError, did_you_mean
from netforge.layers.base import Layer


@dataclass
class GradResult:
    """Worst errors seen over every checked element of one layer."""

    checked: int = 0
    kinks: int = 0
    failures: list[str] = field(default_factory=list)
    max_abs: float = 0.0
    max_rel: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


class GradientChecker:
    def __init__(self, stepsize: float = 1e-2, threshold: float = 1e-3, seed: int = 1701,
                 kink: float = 0.0, kink_range: float = -1.0):
        self.stepsize = stepsize
        self.threshold = threshold
        self.seed = seed
        self.kink = kink
        self.kink_range = kink_range

    def _forward(self, layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        layer.ctx.rng = np.random.default_rng(self.seed)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)

    @staticmethod
    def _objective(top: Sequence[Blob], top_id: int, top_index: int) -> float:
        """The loss, and the top diffs that are its gradient."""
        if top_id < 0:
            loss = 0.0
            for t in top:
                t.diff[...] = t.data
                loss += 0.5 * float((t.data.astype(np.float64) ** 2).sum())
            return loss
        for t in top:
            t.diff[...] = 0
        t = top[top_id]
        t.diff.reshape(-1)[top_index] = 2.0
        return 2.0 * float(t.data.reshape(-1)[top_index])

    def check_single(self, layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob],
                     check_bottom: int | Sequence[int] = -1, top_id: int = -1,
                     top_index: int = -1, result: GradResult | None = None,
                     check_params: bool = True, elementwise: bool = False,
                     max_points: int | None = None, skip_kinks: bool = False) -> GradResult:
        """One objective: compare analytic and numeric gradients of the params and the chosen
        bottoms. ``max_points`` samples that many elements per blob (seeded); ``skip_kinks``
        skips points where the two one-sided slopes disagree (the function has a corner
        there, e.g. tied maxima in real data), counting them in ``result.kinks``."""
        result = result or GradResult()
        if isinstance(check_bottom, int):
            bottoms = list(range(len(bottom))) if check_bottom < 0 else [check_bottom]
        else:
            bottoms = list(check_bottom)
        targets: list[tuple[str, Blob]] = []
        if check_params:
            targets += [(f"param {i}", b) for i, b in enumerate(layer.blobs)]
        targets += [(f"bottom {i}", bottom[i]) for i in bottoms]
        for b in layer.blobs:
            b.diff[...] = 0
        # analytic
        self._forward(layer, bottom, top)
        base = self._objective(top, top_id, top_index)
        propagate = [i in bottoms for i in range(len(bottom))]
        layer.backward(top, propagate, bottom)
        analytic = [np.array(b.diff, dtype=np.float64, copy=True) for _, b in targets]
        # numeric
        for (what, blob), grad in zip(targets, analytic, strict=True):
            data = blob.data.reshape(-1)
            points: Sequence[int] = [top_index] if elementwise else range(data.size)
            if max_points is not None and len(points) > max_points:
                pick = np.random.default_rng(self.seed).choice(len(points), max_points,
                                                               replace=False)
                points = sorted(int(points[p]) for p in pick)
            for k in points:
                x = float(data[k])
                data[k] = x + self.stepsize
                self._forward(layer, bottom, top)
                pos = self._objective(top, top_id, top_index)
                data[k] = x - self.stepsize
                self._forward(layer, bottom, top)
                neg = self._objective(top, top_id, top_index)
                data[k] = x
                numeric = (pos - neg) / (2.0 * self.stepsize)
                if self.kink - self.kink_range <= abs(x) <= self.kink + self.kink_range:
                    continue
                if skip_kinks:
                    right, left = (pos - base) / self.stepsize, (base - neg) / self.stepsize
                    if abs(right - left) > 0.1 * max(abs(right), abs(left), 1.0):
                        result.kinks += 1
                        continue
                a = float(grad.reshape(-1)[k])
                scale = max(abs(a), abs(numeric), 1.0)
                err = abs(a - numeric)
                result.checked += 1
                result.max_abs = max(result.max_abs, err)
                result.max_rel = max(result.max_rel, err / scale)
                if err > self.threshold * scale:
                    result.failures.append(
                        f"{layer.name or layer.type}: {what} element {k} "
                        f"(top {top_id}:{top_index}): "
                        f"analytic {a:.6g} vs numeric {numeric:.6g}"
                    )
        return result

    def check(self, layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob],
              check_bottom: int | Sequence[int] = -1) -> GradResult:
        """CheckGradient: set up the layer, then one pass with the ½Σtop² objective."""
        layer.setup(bottom, top)
        return self.check_single(layer, bottom, top, check_bottom)

    def check_exhaustive(self, layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob],
                         check_bottom: int | Sequence[int] = -1) -> GradResult:
        """CheckGradientExhaustive: one pass per top element."""
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        result = GradResult()
        for i, t in enumerate(top):
            for k in range(t.count):
                self.check_single(layer, bottom, top, check_bottom, i, k, result)
        return result

    def check_eltwise(self, layer: Layer, bottom: Sequence[Blob],
                      top: Sequence[Blob]) -> GradResult:
        """CheckGradientEltwise: for elementwise layers, element k of top depends only on
        element k of the bottom, so each top element is checked against its own input."""
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        result = GradResult()
        for k in range(top[0].count):
            self.check_single(layer, bottom, top, -1, 0, k, result, check_params=False,
                              elementwise=True)
        return result


@dataclass
class LayerCheck:
    """The gradient check of one layer of a net (``result`` None: not checked, see note)."""

    name: str
    type: str
    result: GradResult | None
    note: str = ""


def check_net(net: Any, layers: Sequence[str] = (), stepsize: float = 1e-3,
              threshold: float = 1e-3, max_points: int | None = 100,
              seed: int = 1701) -> list[LayerCheck]:
    """Check every layer of ``net`` (best built with a float64 backend) on the inputs it
    really sees: the net runs forward layer by layer, and each layer that needs backward is
    checked on copies of its bottoms, for the bottoms that need a gradient and its params."""
    wanted = set(layers)
    unknown = wanted - set(net.layer_names)
    if unknown:
        raise ConfigError(f"no layer named {', '.join(sorted(unknown))} in this net",
                          hint=did_you_mean(sorted(unknown)[0], net.layer_names))
    out: list[LayerCheck] = []
    for i, layer in enumerate(net.layers):
        name, kind = net.layer_names[i], net.layer_params[i].type
        copies = []
        for b in net.bottom_vecs[i]:
            c = Blob(net.backend, b.shape, b.name)
            c.data[...] = b.data
            copies.append(c)
        layer.reshape(net.bottom_vecs[i], net.top_vecs[i])
        layer.forward(net.bottom_vecs[i], net.top_vecs[i])
        if wanted and name not in wanted:
            continue
        if not layer.has_backward:
            out.append(LayerCheck(name, kind, None, "no backward"))
            continue
        if not net.layer_need_backward[i]:
            out.append(LayerCheck(name, kind, None, "backward not needed"))
            continue
        tops = [Blob(net.backend) for _ in net.top_vecs[i]]
        check_bottom = [j for j, need in enumerate(net.bottom_need_backward[i]) if need]
        checker = GradientChecker(stepsize, threshold, seed)
        result = checker.check_single(layer, copies, tops, check_bottom,
                                      max_points=max_points, skip_kinks=True)
        out.append(LayerCheck(name, kind, result))
    return out
