"""Layer implementations, one small class per Caffe type, registered by type name."""

from __future__ import annotations

import importlib

from netforge.layers.base import REGISTRY, Layer, LayerContext, LayerError, register

# Importing a family module registers its layer types.
_FAMILIES = ("inputs", "data_layer", "vision", "inner_product", "neuron", "loss", "utility")

for _name in _FAMILIES:
    try:
        importlib.import_module(f"netforge.layers.{_name}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while families are written
        if _e.name != f"netforge.layers.{_name}":
            raise

__all__ = ["REGISTRY", "Layer", "LayerContext", "LayerError", "register"]
