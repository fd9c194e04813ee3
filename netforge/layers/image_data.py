"""ImageData: batches of image files named in a list file, as Caffe's ImageDataLayer reads them.

image_data_param.source is a text file of "relative/path label" lines (split at the last space);
each image is ``root_folder + path``, read in colour (3 channels, BGR) or grey (``is_color:
false``), resized to new_height×new_width when both are set, then transformed by
transform_param (the deprecated image_data_param scale/mean_file/crop_size/mirror are moved
there). With ``shuffle`` the order is permuted at setup and again at every wrap, from an RNG
seeded by the net's; ``rand_skip`` starts at a random line below it. At the end of the list
reading restarts from the first line. The top shape follows the first image of each batch, so a
batch of one may change size from batch to batch. Reading needs Pillow (``netforge[images]``).

Batches are read synchronously (no prefetch thread). ``get_state``/``set_state`` save and
restore the position, the order and the RNGs, so a resumed run reads what an uninterrupted one
would.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.blob import Blob
from netforge.data.images import pillow, read_image, read_image_list
from netforge.data.transformer import DataTransformer, load_mean_file, needs_rng
from netforge.errors import ConfigError
from netforge.layers.base import Layer, LayerError, register, shape_str
from netforge.layers.data_layer import _transform_param

log = logging.getLogger("netforge")


@register
class ImageData(Layer):
    """Caffe's ImageData layer: images listed in a text file, with their labels."""

    type = "ImageData"
    exact_bottoms = 0
    min_tops = 1
    max_tops = 2
    has_backward = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.image_data_param
        self.batch_size = int(p.batch_size)
        self.new_height, self.new_width = int(p.new_height), int(p.new_width)
        self.is_color = bool(p.is_color)
        self.root = p.root_folder
        self.shuffle = bool(p.shuffle)
        if self.batch_size <= 0:
            raise LayerError("image_data_param.batch_size must be a positive number")
        if (self.new_height > 0) != (self.new_width > 0):
            raise LayerError("image_data_param: new_height and new_width must be set together")
        if not p.source:
            raise LayerError("image_data_param.source is not set")
        try:
            pillow("the ImageData layer")
            source = self.ctx.resolve_path(p.source)
            log.info("Opening file %s", source)
            self.lines = read_image_list(source)
            self.transformer = self._make_transformer()
        except ConfigError as e:
            raise LayerError(str(e)) from None
        if not self.lines:
            raise LayerError(f"image list {source} is empty")
        n = len(self.lines)
        self.order = np.arange(n)
        self.order_rng: np.random.Generator | None = None
        if self.shuffle:
            log.info("Shuffling data")
            self.order_rng = np.random.default_rng(int(self.ctx.rng.integers(2**63)))
            self.order_rng.shuffle(self.order)
        log.info("A total of %d images.", n)
        self.pos = 0
        if p.rand_skip:
            skip = int(self.ctx.rng.integers(int(p.rand_skip)))
            log.info("Skipping first %d data points.", skip)
            if skip >= n:
                raise LayerError(f"not enough images ({n}) to skip {skip}")
            self.pos = skip
        first = self._load(int(self.order[self.pos]))
        try:
            self.out_shape = (self.batch_size, *self.transformer.output_shape(*first.shape))
        except ConfigError as e:
            raise LayerError(str(e)) from None
        log.info("output data size: %s", ",".join(str(s) for s in self.out_shape))
        self.reshape(bottom, top)

    def _make_transformer(self) -> DataTransformer:
        tp = _transform_param(self.param, "image_data_param")
        mean = load_mean_file(self.ctx.resolve_path(tp.mean_file)) if tp.mean_file else None
        rng = None
        if needs_rng(tp, self.phase):
            rng = np.random.default_rng(int(self.ctx.rng.integers(2**63)))
        return DataTransformer(tp, self.phase, rng, mean)

    def _load(self, index: int) -> np.ndarray:
        name = self.lines[index][0]
        path = self.ctx.resolve_path(self.root + name)
        arr = read_image(path, self.is_color, self.new_height, self.new_width)
        if arr is None:
            raise LayerError(f"could not load {path}")
        return arr

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(self.out_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        images: list[np.ndarray] = []
        labels = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            index = int(self.order[self.pos])
            arr = self._load(index)
            if images and arr.shape != images[0].shape:
                raise LayerError(f"image {self.lines[index][0]} is {shape_str(arr.shape)} but "
                                 f"the first of its batch is {shape_str(images[0].shape)}; set "
                                 "new_height and new_width to resize them all")
            images.append(arr)
            labels[i] = self.lines[index][1]
            self.pos += 1
            if self.pos >= len(self.lines):
                self.pos = 0
                if self.order_rng is not None:
                    self.order_rng.shuffle(self.order)
        try:
            data = self.transformer.transform_batch(np.stack(images))
        except ConfigError as e:
            raise LayerError(str(e)) from None
        self.out_shape = data.shape
        top[0].reshape(data.shape)
        top[0].data = self.backend.asarray(data)
        if len(top) > 1:
            top[1].data = self.backend.asarray(labels)

    # -- resume -----------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """{'cursor', 'order', 'order_rng', 'rng'}: plain Python values, safe to store."""
        return {
            "cursor": self.pos,
            "order": [int(i) for i in self.order],
            "order_rng": None if self.order_rng is None
            else copy.deepcopy(self.order_rng.bit_generator.state),
            "rng": copy.deepcopy(self.transformer.get_rng_state()),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        cursor, order = state.get("cursor"), state.get("order")
        n = len(self.lines)
        if not isinstance(cursor, int) or not 0 <= cursor < n:
            raise LayerError(f"bad image cursor in the saved state: {cursor!r}")
        if order is not None:
            if sorted(order) != list(range(n)):
                raise LayerError("the saved image order does not match the image list "
                                 f"({n} images)")
            self.order = np.asarray(order, dtype=np.int64)
        self.pos = cursor
        if self.order_rng is not None and state.get("order_rng") is not None:
            self.order_rng.bit_generator.state = copy.deepcopy(state["order_rng"])
        self.transformer.set_rng_state(copy.deepcopy(state.get("rng")))
