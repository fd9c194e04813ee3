"""Shared test helpers: build one layer from a prototxt snippet, make blobs, run gradient checks.

Each layer test module declares ``GRAD_CHECKED`` (the types whose gradients it checks with
``GradientChecker``) and ``NO_BACKWARD`` (types that have no backward, tested as such);
tests/test_layer_coverage.py fails when a registered type is in neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf import text_format

from netforge.backend import NumpyBackend
from netforge.blob import Blob
from netforge.layers import REGISTRY, LayerContext
from netforge.layers.base import PHASE_TEST, PHASE_TRAIN, Layer
from netforge.proto import pb

__all__ = ["PHASE_TEST", "PHASE_TRAIN", "blob", "make_layer", "run_forward"]

F64 = NumpyBackend("float64")
F32 = NumpyBackend("float32")


def make_layer(type_name: str, params: str = "", phase: int = PHASE_TRAIN,
               dtype: str = "float64", seed: int = 1701, name: str = "") -> Layer:
    """A layer of ``type_name`` configured by a LayerParameter text snippet."""
    p = pb.LayerParameter()
    text_format.Parse(params, p)
    p.type = type_name
    p.name = name or type_name.lower()
    backend = F64 if dtype == "float64" else F32
    ctx = LayerContext(backend=backend, phase=phase, rng=np.random.default_rng(seed))
    return REGISTRY[type_name](p, ctx)


def blob(shape: Sequence[int] | None = None, data: np.ndarray | None = None,
         dtype: str = "float64", seed: int = 1701, low: float = -1.0, high: float = 1.0) -> Blob:
    """A blob of uniform random data in [low, high) (Caffe's tests use gaussian or uniform)."""
    backend = F64 if dtype == "float64" else F32
    if data is not None:
        b = Blob(backend, tuple(np.shape(data)))
        b.data[...] = data
        return b
    assert shape is not None
    b = Blob(backend, tuple(shape))
    b.data[...] = np.random.default_rng(seed).uniform(low, high, size=tuple(shape))
    return b


def tops(n: int, dtype: str = "float64") -> list[Blob]:
    backend = F64 if dtype == "float64" else F32
    return [Blob(backend) for _ in range(n)]


def run_forward(layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
