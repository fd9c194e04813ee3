"""The ``Python`` layer: a user's layer class, loaded by import path with no rebuild.

    layer { name: "scale" type: "Python" bottom: "x" top: "y"
            python_param { module: "my_layers" layer: "Scale" param_str: "3" } }

``module`` is imported as Python imports anything (from ``sys.path``; the working directory
and the net file's folder are tried too), and ``layer`` names a class in it. The class follows
pycaffe's interface: ``setup(bottom, top)``, ``reshape(bottom, top)``, ``forward(bottom,
top)``, ``backward(top, propagate_down, bottom)``, with ``self.param_str``, ``self.phase``
(0 TRAIN, 1 TEST) and ``self.blobs`` (learnable blobs; ``self.add_blob(*shape)`` makes one).
Blobs have ``.data``, ``.diff``, ``.shape`` and ``.reshape(*shape)``. Subclassing
``netforge.layers.python_layer.PythonLayer`` gives those attributes defaults.
"""

from __future__ import annotations

import importlib
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.layers.base import Layer, LayerError, register


class PythonLayer(ABC):
    """Optional base class for user layers (pycaffe's ``caffe.Layer``): a subclass must define
    reshape and forward."""

    param_str: str = ""
    phase: int = 0
    blobs: list[Blob]
    xp: Any

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:  # noqa: B027
        """Read ``self.param_str``; check the bottoms."""

    @abstractmethod
    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Shape the tops for the bottoms."""

    @abstractmethod
    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Compute the tops' data."""

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],  # noqa: B027
                 bottom: Sequence[Blob]) -> None:
        """No gradient by default."""


def _import(module: str, extra_dirs: Sequence[str]) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise
    importlib.invalidate_caches()  # the module may have been written a moment ago
    added = [d for d in extra_dirs if d not in sys.path]
    sys.path[:0] = added
    try:
        return importlib.import_module(module)
    finally:
        for d in added:
            sys.path.remove(d)


@register
class Python(Layer):
    """Delegates to the user class named by python_param."""

    type = "Python"
    reshape_each_forward = True  # the user's reshape may read anything

    def __init__(self, param: Any, ctx: Any):
        super().__init__(param, ctx)
        pp = param.python_param
        if not pp.module or not pp.layer:
            raise LayerError("python_param needs 'module' and 'layer' (the class name)")
        here = os.path.dirname(ctx.resolve_path(pp.module.replace(".", "/") + ".py"))
        try:
            mod = _import(pp.module, [os.getcwd(), here or "."])
        except ModuleNotFoundError as e:
            raise LayerError(f"python_param.module '{pp.module}' cannot be imported ({e}); "
                             "put it on PYTHONPATH or next to the net file") from None
        except Exception as e:  # the user's module raised while importing
            raise LayerError(f"importing python_param.module '{pp.module}' failed: "
                             f"{type(e).__name__}: {e}") from None
        cls = getattr(mod, pp.layer, None)
        if cls is None or not isinstance(cls, type):
            raise LayerError(f"module '{pp.module}' has no class '{pp.layer}'")
        missing = [m for m in ("reshape", "forward") if not callable(getattr(cls, m, None))
                   or getattr(getattr(cls, m), "__isabstractmethod__", False)]
        if missing:
            raise LayerError(f"class '{pp.layer}' in module '{pp.module}' must define "
                             f"{' and '.join(missing)}")
        try:
            self.impl = cls()
        except Exception as e:
            raise LayerError(f"creating {pp.layer}() failed: {type(e).__name__}: {e}") from None
        self.impl.param_str = pp.param_str
        self.impl.phase = self.phase
        self.impl.blobs = self.blobs
        self.impl.xp = self.xp
        self.impl.add_blob = self._add_blob

    def _add_blob(self, *shape: int) -> Blob:
        blob = self.make_blob(shape)
        self.blobs.append(blob)
        return blob

    def _call(self, what: str, *args: Any) -> None:
        try:
            getattr(self.impl, what)(*args)
        except LayerError:
            raise
        except Exception as e:
            raise LayerError(f"{type(self.impl).__name__}.{what} raised "
                             f"{type(e).__name__}: {e}") from e

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._call("setup", bottom, top)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._call("reshape", bottom, top)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self._call("forward", bottom, top)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        self._call("backward", top, propagate_down, bottom)
