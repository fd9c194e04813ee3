"""Input layers without a data source: Input (blobs fed from outside) and DummyData."""

from __future__ import annotations

from collections.abc import Sequence

from netforge.blob import Blob
from netforge.errors import NetforgeError
from netforge.fillers import FILLER_TYPES, fill
from netforge.layers.base import Layer, LayerError, register
from netforge.proto import pb


def per_top(n_given: int, n_top: int, what: str) -> None:
    if n_given not in (1, n_top):
        raise LayerError(f"give {what} once, or once per top blob: got {n_given} for "
                         f"{n_top} tops")


def dims(shape: pb.BlobShape, what: str) -> tuple[int, ...]:
    out = tuple(int(d) for d in shape.dim)
    if any(d < 0 for d in out):
        raise LayerError(f"{what} has a negative dimension: {list(out)}")
    return out


@register
class Input(Layer):
    """Tops shaped by input_param.shape (one for all, or one per top) and filled from outside."""

    type = "Input"
    exact_bottoms = 0
    min_tops = 1
    has_backward = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        shapes = self.param.input_param.shape
        if not shapes:
            return  # shaped from outside (e.g. the net's input_shape)
        per_top(len(shapes), len(top), "input_param.shape")
        for i, t in enumerate(top):
            t.reshape(dims(shapes[0 if len(shapes) == 1 else i], "input_param.shape"))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Nothing to do: the tops keep whatever shape they were given."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Nothing to do: the data is put into the tops from outside."""


@register
class DummyData(Layer):
    """Tops filled by data_filler: constant fillers once at setup, the others every forward."""

    type = "DummyData"
    exact_bottoms = 0
    min_tops = 1
    has_backward = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        dp = self.param.dummy_data_param
        n = len(top)
        fillers = list(dp.data_filler)
        if len(fillers) not in (0, 1, n):
            raise LayerError(f"DummyData takes 0, 1 or {n} (one per top) data_filler(s), "
                             f"got {len(fillers)}")
        if not fillers:
            fillers = [pb.FillerParameter(type="constant", value=0)]
        for f in fillers:
            if f.type not in FILLER_TYPES:
                raise LayerError(f"unknown data_filler type '{f.type}' (expected one of "
                                 f"{', '.join(FILLER_TYPES)})")
        self.fillers = [fillers[0 if len(fillers) == 1 else i] for i in range(n)]
        legacy = {"num": dp.num, "channels": dp.channels, "height": dp.height,
                  "width": dp.width}
        if any(legacy.values()):
            if dp.shape:
                raise LayerError("DummyData takes either shape or num/channels/height/width, "
                                 "not both")
            for key, values in legacy.items():
                per_top(len(values), n, f"dummy_data_param.{key}")
            shapes = [tuple(int(v[0 if len(v) == 1 else i]) for v in legacy.values())
                      for i in range(n)]
        else:
            per_top(len(dp.shape), n, "dummy_data_param.shape")
            shapes = [dims(dp.shape[0 if len(dp.shape) == 1 else i], "dummy_data_param.shape")
                      for i in range(n)]
        for t, shape in zip(top, shapes, strict=True):
            t.reshape(shape)
        self.refill = [f.type != "constant" for f in self.fillers]
        for t, f, refill in zip(top, self.fillers, self.refill, strict=True):
            if not refill:
                self._fill(t, f)

    def _fill(self, blob: Blob, filler: pb.FillerParameter) -> None:
        try:
            values = fill(filler, blob.shape, self.ctx.rng, self.backend.dtype)
        except NetforgeError as e:
            raise LayerError(f"data_filler: {e}") from None
        blob.data[...] = self.backend.asarray(values)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Nothing to do: the shapes are fixed at setup."""

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t, f, refill in zip(top, self.fillers, self.refill, strict=True):
            if refill:
                self._fill(t, f)
