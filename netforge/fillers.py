"""Weight fillers, with Caffe's definitions (filler.hpp). A missing filler means constant 0."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from netforge.errors import NetforgeError
from netforge.proto import pb

VN = pb.FillerParameter


def _fans(shape: Sequence[int]) -> tuple[float, float]:
    count = int(np.prod(shape)) if len(shape) else 1
    fan_in = count / shape[0] if len(shape) > 0 and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _scale_n(param: pb.FillerParameter, shape: Sequence[int]) -> float:
    fan_in, fan_out = _fans(shape)
    if param.variance_norm == VN.FAN_OUT:
        return fan_out
    if param.variance_norm == VN.AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


def fill(param: pb.FillerParameter | None, shape: Sequence[int], rng: np.random.Generator,
         dtype: np.dtype | str = np.float32) -> np.ndarray:
    """A host array of ``shape`` filled as ``param`` says (Caffe's filler semantics)."""
    shape = tuple(int(s) for s in shape)
    if param is None:
        param = pb.FillerParameter()
    kind = param.type
    if kind == "constant":
        out = np.full(shape, param.value, dtype=np.float64)
    elif kind == "uniform":
        out = rng.uniform(param.min, param.max, size=shape)
    elif kind == "gaussian":
        out = rng.normal(param.mean, param.std, size=shape)
        if param.sparse >= 0:
            if len(shape) < 2:
                raise NetforgeError("sparse gaussian filling needs a blob of at least 2 axes")
            p = param.sparse / shape[0]
            out *= rng.random(shape) < p
    elif kind == "positive_unitball":
        out = rng.uniform(0.0, 1.0, size=shape)
        if len(shape) and shape[0]:
            flat = out.reshape(shape[0], -1)
            flat /= flat.sum(axis=1, keepdims=True)
    elif kind == "xavier":
        n = _scale_n(param, shape)
        limit = math.sqrt(3.0 / n)
        out = rng.uniform(-limit, limit, size=shape)
    elif kind == "msra":
        n = _scale_n(param, shape)
        out = rng.normal(0.0, math.sqrt(2.0 / n), size=shape)
    elif kind == "bilinear":
        # Caffe's BilinearFiller: every (out, in) plane is the same separable kernel that
        # upsamples by f = ceil(k / 2) in a Deconvolution with stride f and pad ceil((f-1)/2)
        # (kernel 2f - f % 2), w[y, x] = (1 - |x/f - c|)(1 - |y/f - c|), c = (k - 1) / 2f.
        if len(shape) != 4:
            raise NetforgeError(f"the bilinear filler needs a 4-axis blob, got shape {shape}")
        if shape[2] != shape[3]:
            raise NetforgeError(f"the bilinear filler needs square kernels (height == width), "
                                f"got {shape[2]}x{shape[3]}")
        if param.sparse != -1:
            raise NetforgeError("the bilinear filler does not support sparse")
        k = shape[3]
        f = math.ceil(k / 2.0)
        c = (k - 1) / (2.0 * f)
        w1 = 1 - np.abs(np.arange(k) / f - c)
        out = np.broadcast_to(np.outer(w1, w1), shape).copy()
    else:
        raise NetforgeError(f"unknown filler type '{kind}'")
    return out.astype(dtype, copy=False)


FILLER_TYPES = (
    "constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear",
)
