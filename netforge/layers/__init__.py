"""Layer implementations, one small class per Caffe type, registered by type name."""

from __future__ import annotations

# Importing a family module registers its layer types.
from netforge.layers import (  # noqa: F401
    data_layer,
    inner_product,
    inputs,
    loss,
    neuron,
    utility,
    vision,
)
from netforge.layers.base import REGISTRY, Layer, LayerContext, LayerError, register

__all__ = ["REGISTRY", "Layer", "LayerContext", "LayerError", "register"]
