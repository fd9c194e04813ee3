"""Layer implementations, one small class per Caffe type, registered by type name.

Every module in this package is a family of layers; importing it registers its types, so a
new family file needs no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

from netforge.layers.base import REGISTRY, Layer, LayerContext, LayerError, register

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "Layer", "LayerContext", "LayerError", "register"]
