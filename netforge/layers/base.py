"""The layer contract (Caffe's): setup, reshape, forward, backward; plus the type registry.

A layer is one class registered under its Caffe type name. It declares how many bottoms and
tops it takes; the net checks those declarations centrally so every layer reports count errors
the same way. Layers compute only through ``self.xp`` (the backend's array module) and the
backend's kernels, and never open files or read the CLI.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from netforge.backend.base import Backend
from netforge.blob import Blob
from netforge.errors import NetforgeError
from netforge.proto import pb

T = TypeVar("T")

PHASE_TRAIN = pb.TRAIN
PHASE_TEST = pb.TEST


class LayerError(NetforgeError):
    """A layer refused its bottoms or parameters; the net adds the layer's name and location."""

    exit_code = 2


@dataclass
class LayerContext:
    """What a layer may know of the world: the backend, the phase, the RNG, and a way to find
    data sources named in its parameters (relative paths resolve like the net file's)."""

    backend: Backend
    phase: int = PHASE_TEST
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng())
    resolve_path: Callable[[str], str] = field(default=lambda p: p)


REGISTRY: dict[str, type[Layer]] = {}


def register(cls: type[Layer]) -> type[Layer]:
    """Class decorator: make ``cls`` buildable under its ``type`` name."""
    if cls.type in REGISTRY:
        raise RuntimeError(f"layer type {cls.type!r} registered twice")
    REGISTRY[cls.type] = cls
    return cls


class Layer(ABC):
    """Base class. Subclasses set ``type`` and the count declarations, and implement
    ``setup`` (read params, create ``self.blobs``), ``reshape``, ``forward`` and ``backward``.

    Param gradients are *accumulated* into ``blob.diff`` (the solver zeroes them each
    iteration), which makes shared params and iter_size work; bottom gradients are written.
    """

    type: ClassVar[str] = ""
    exact_bottoms: ClassVar[int | None] = None
    min_bottoms: ClassVar[int | None] = None
    max_bottoms: ClassVar[int | None] = None
    exact_tops: ClassVar[int | None] = None
    min_tops: ClassVar[int | None] = None
    max_tops: ClassVar[int | None] = None
    equal_bottom_top: ClassVar[bool] = False
    # Loss layers: loss_weight defaults to 1 on top 0, tops are created when omitted, and
    # force_backward never reaches the labels (bottom 1).
    is_loss: ClassVar[bool] = False
    auto_top_blobs: ClassVar[bool] = False
    # Layers without a backward (data, accuracy): the net never asks them for gradients.
    has_backward: ClassVar[bool] = True
    # Layers whose reshape reads more than the bottoms' shapes (Filter counts its selector's
    # values; a Python layer may do anything): Net.forward reshapes them before every forward,
    # as Caffe does every layer. Others are reshaped when a bottom or top changed shape.
    reshape_each_forward: ClassVar[bool] = False

    def __init__(self, param: pb.LayerParameter, ctx: LayerContext):
        self.param = param
        self.name = param.name
        self.ctx = ctx
        self.backend = ctx.backend
        self.xp: Any = ctx.backend.xp
        self.phase = param.phase if param.HasField("phase") else ctx.phase
        self.blobs: list[Blob] = []
        # Set by the solver for one backward pass: blob index -> update(rows), the solver's
        # update of those rows of a param that only this layer uses and that the layer takes
        # (takes_param_update), which the layer calls for each block of rows once their
        # gradient is final, while the block is in cache. A layer that does not call it (a
        # batch it cannot split by rows) leaves the update to the solver.
        self.param_updates: dict[int, Callable[[slice], None]] = {}

    # -- the life cycle ---------------------------------------------------------------------------
    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:  # noqa: B027
        """One-time setup: read ``self.param``, create learnable ``self.blobs``."""

    @abstractmethod
    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Shape the tops (and any scratch) for the bottoms' current shapes."""

    @abstractmethod
    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Compute the tops' data from the bottoms'."""

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if any(propagate_down):
            raise LayerError(f"{self.type} layers have no backward")

    def takes_param_update(self, index: int) -> bool:
        """Whether this layer makes the solver's update of its blob ``index`` inside its
        backward, given in param_updates (InnerProduct's large weight matrices)."""
        return False

    def allow_force_backward(self, bottom_index: int) -> bool:
        return not (self.is_loss and bottom_index == 1)

    # -- helpers ----------------------------------------------------------------------------------
    def buffer(self, key: str, shape: tuple[int, ...]) -> Any:
        """A contiguous scratch array of ``shape`` kept between iterations under ``key`` (no
        allocation in the hot loop). Keys name a role and, for batch-parallel layers, the
        worker. One block per key, grown to the largest shape asked for, so parts of different
        sizes or a changing batch size do not pile up buffers."""
        bufs = self.__dict__.setdefault("_bufs", {})
        views = self.__dict__.setdefault("_buf_views", {})
        view = views.get(key)
        if view is not None and view.shape == shape:  # the same object as last time
            return view
        size = 1
        for d in shape:
            size *= d
        flat = bufs.get(key)
        if flat is None or flat.size < size:
            flat = bufs[key] = self.backend.empty((size,))
        view = views[key] = flat[:size].reshape(shape)
        return view

    def kept_call(self, key: str, arrays: tuple[Any, ...], values: tuple[Any, ...],
                  make: Callable[[], T]) -> T:
        """``make()``, kept under ``key`` and returned again while ``arrays`` are the same
        objects and ``values`` equal those it was made for: a backend call made once with its
        argument work (checks, views, layouts) done, not at every iteration."""
        calls = self.__dict__.setdefault("_calls", {})
        kept = calls.get(key)
        if (kept is not None and kept[1] == values and len(kept[0]) == len(arrays)
                and all(a is b for a, b in zip(kept[0], arrays, strict=True))):
            return kept[2]  # type: ignore[no-any-return]
        made = make()
        calls[key] = (arrays, values, made)
        return made

    def make_blob(self, shape: Sequence[int], name: str = "") -> Blob:
        return Blob(self.backend, tuple(int(s) for s in shape), name or self.name)

    def weight_and_bias(self, p: Any, w_shape: Sequence[int], n_bias: int,
                        bias_term: bool) -> list[Blob]:
        """The learnable blobs of a layer whose parameter message has weight_filler and
        bias_filler (Convolution, InnerProduct): filled in that order from the net's RNG."""
        from netforge.fillers import fill

        rng, dtype = self.ctx.rng, self.backend.dtype
        shapes = [("weight_filler", tuple(w_shape))]
        if bias_term:
            shapes.append(("bias_filler", (n_bias,)))
        blobs = []
        for field_name, shape in shapes:
            blob = self.make_blob(shape)
            filler = getattr(p, field_name) if p.HasField(field_name) else None
            blob.data[...] = self.backend.asarray(fill(filler, shape, rng, dtype))
            blobs.append(blob)
        return blobs

    def check_counts(self, n_bottom: int, n_top: int) -> str | None:
        """None when the counts fit the declarations, else the complaint."""
        def rule(n: int, exact: int | None, lo: int | None, hi: int | None,
                 what: str) -> str | None:
            if exact is not None and n != exact:
                return f"takes exactly {exact} {what} blob(s), got {n}"
            if lo is not None and n < lo:
                return f"takes at least {lo} {what} blob(s), got {n}"
            if hi is not None and n > hi:
                return f"takes at most {hi} {what} blob(s), got {n}"
            return None

        msg = rule(n_bottom, self.exact_bottoms, self.min_bottoms, self.max_bottoms, "bottom")
        msg = msg or rule(n_top, self.exact_tops, self.min_tops, self.max_tops, "top")
        if msg is None and self.equal_bottom_top and n_bottom != n_top:
            msg = f"needs as many tops as bottoms, got {n_bottom} bottom(s) and {n_top} top(s)"
        return msg

    def min_top_count(self) -> int:
        """How many tops to create when the config names fewer (AutoTopBlobs)."""
        return self.exact_tops or self.min_tops or 0


def fail(message: str) -> LayerError:
    return LayerError(message)


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def canonical_axis(blob: Blob, axis: int, what: str) -> int:
    """Caffe's CanonicalAxisIndex: -n <= axis < n, negative counting from the end; a located
    LayerError naming the parameter (``what``) otherwise."""
    n = blob.num_axes
    if not -n <= axis < n:
        raise LayerError(f"{what} {axis} is out of range for a bottom of shape "
                         f"{shape_str(blob.shape)} ({n} axes)")
    return axis + n if axis < 0 else axis
