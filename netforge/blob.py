"""Blob: an N-d array of values (``data``) with its gradient (``diff``), as in Caffe."""

from __future__ import annotations

from typing import Any

from netforge.backend.base import Backend


class Blob:
    """Data and gradient of one named tensor. Layers read and write ``data`` and ``diff`` in
    place; ``reshape`` reallocates only when the element count changes."""

    __slots__ = ("backend", "data", "diff", "name")

    def __init__(self, backend: Backend, shape: tuple[int, ...] = (), name: str = ""):
        self.backend = backend
        self.name = name
        self.data: Any = backend.zeros(tuple(shape))
        self.diff: Any = backend.zeros(tuple(shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def count(self) -> int:
        return int(self.data.size)

    @property
    def num_axes(self) -> int:
        return self.data.ndim

    def reshape(self, *shape: Any) -> None:
        """``reshape((2, 3))`` or, as in pycaffe, ``reshape(2, 3)``."""
        if len(shape) == 1 and not isinstance(shape[0], int):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"negative dimension in blob shape {shape}")
        if shape == self.shape:
            return
        size = 1
        for s in shape:
            size *= s
        if size == self.data.size:
            self.data = self.data.reshape(shape)
            self.diff = self.diff.reshape(shape)
        else:
            self.data = self.backend.zeros(shape)
            self.diff = self.backend.zeros(shape)

    def reshape_like(self, other: Blob) -> None:
        self.reshape(other.shape)

    def count_range(self, start: int, end: int | None = None) -> int:
        out = 1
        for s in self.shape[start:end]:
            out *= s
        return out

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, shape={self.shape})"
