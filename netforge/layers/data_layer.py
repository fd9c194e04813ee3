"""Data: batches of Datums read in key order from an LMDB, transformed, with optional labels.

As in Caffe, a background thread keeps up to ``data_param.prefetch`` batches ready; at the end
of the database reading restarts from the first record ("Restarting data prefetching from
start."). Each batch is decoded with one ``np.frombuffer`` over the joined records and
transformed in one vectorised call.

Encoded records (PNG/JPEG bytes, ``encoded: true``) are decoded with Pillow (the optional
``netforge[images]`` extra): as stored, or in colour (3 channels, BGR) with
transform_param.force_color or data_param.force_encoded_color, or grey with force_gray.

For deterministic resume, ``get_state`` gives the record index of the next batch the net will
consume (batches prefetched but not consumed do not count) and the transformer's RNG state;
``set_state`` restarts prefetching from there. The transformer's RNG is seeded once from the
net's RNG at setup, so prefetch timing never changes the results.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from netforge.blob import Blob
from netforge.data.datum import datum_shape
from netforge.data.db import LmdbReader, RecordCursor, ShuffledCursor
from netforge.data.images import decode_datum
from netforge.data.transformer import DataTransformer, decode_color, load_mean_file, needs_rng
from netforge.errors import ConfigError
from netforge.layers.base import Layer, LayerError, register, shape_str
from netforge.proto import pb

log = logging.getLogger("netforge")


@dataclass
class _Batch:
    data: np.ndarray  # float32 (N, C, h, w)
    labels: np.ndarray  # (N,)
    end: int  # record index just after this batch
    rng_state: dict[str, Any] | None  # the transformer RNG after this batch


class _BatchReader:
    """Reads and transforms one batch at a time from a wrapping cursor."""

    def __init__(self, reader: LmdbReader, transformer: DataTransformer, batch_size: int,
                 shape: tuple[int, int, int], color: bool | None = None,
                 shuffle_seed: int | None = None):
        self.reader = reader
        self.shuffle_seed = shuffle_seed
        self.color = color
        self.transformer = transformer
        self.batch_size = batch_size
        self.shape = shape
        self.size = shape[0] * shape[1] * shape[2]

    def open_cursor(self, start: int) -> RecordCursor | ShuffledCursor:
        if self.shuffle_seed is None:
            return self.reader.cursor(start)
        return self.reader.shuffled_cursor(self.shuffle_seed, start)

    def read(self, cursor: RecordCursor | ShuffledCursor) -> _Batch:
        datum = pb.Datum()
        chunks: list[bytes | np.ndarray] = []
        labels = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            key = cursor.key
            datum.ParseFromString(cursor.value)
            chunks.append(self._pixels(key, datum))
            labels[i] = datum.label
            if not cursor.next():
                log.info("Restarting data prefetching from start.")
        pixels = self._stack(chunks).reshape((self.batch_size, *self.shape))
        data = self.transformer.transform_batch(pixels)
        return _Batch(data, labels, cursor.index, self.transformer.get_rng_state())

    def _pixels(self, key: bytes, datum: pb.Datum) -> bytes | np.ndarray:
        if datum.encoded:
            pixels = decode_datum(datum, self.color, key)
            if pixels.shape != self.shape:
                hint = ""
                if pixels.shape[1:] == self.shape[1:]:
                    hint = ("; the encoded images mix colour and grey: set "
                            "transform_param.force_color or force_gray")
                raise LayerError(f"record {_key(key)} decodes to {shape_str(pixels.shape)} but "
                                 f"the first record to {shape_str(self.shape)}{hint}")
            return pixels
        if datum_shape(datum) != self.shape:
            raise LayerError(f"record {_key(key)} has shape {shape_str(datum_shape(datum))} but "
                             f"the first record has {shape_str(self.shape)}; all records of a "
                             "Data source must have one shape")
        if len(datum.data) == self.size:
            return datum.data
        if not datum.data and len(datum.float_data) == self.size:
            return np.asarray(datum.float_data, dtype=np.float32)
        raise LayerError(f"record {_key(key)} holds {len(datum.data) or len(datum.float_data)} "
                         f"values, expected {shape_str(self.shape)} = {self.size}")

    @staticmethod
    def _stack(chunks: list[bytes | np.ndarray]) -> np.ndarray:
        if all(isinstance(c, bytes) for c in chunks):
            return np.frombuffer(b"".join(chunks), dtype=np.uint8)  # type: ignore[arg-type]
        arrays = [np.frombuffer(c, dtype=np.uint8) if isinstance(c, bytes) else c.ravel()
                  for c in chunks]
        if all(a.dtype == np.uint8 for a in arrays):
            return np.concatenate(arrays)
        return np.concatenate(arrays).astype(np.float32)


class _Prefetcher:
    """A daemon thread filling a queue with batches from record ``start`` onwards. It holds no
    reference to the layer, so a dropped layer is collected and its thread stopped."""

    def __init__(self, batches: _BatchReader, start: int, depth: int):
        self.batches = batches
        self.start = start
        self.queue: queue.Queue[_Batch | BaseException] = queue.Queue(maxsize=max(1, depth))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="netforge-data-prefetch",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            cursor = self.batches.open_cursor(self.start)
        except BaseException as e:
            self._put(e)
            return
        try:
            while not self.stop_event.is_set():
                if not self._put(self.batches.read(cursor)):
                    break
        except BaseException as e:
            self._put(e)
        finally:
            cursor.close()

    def _put(self, item: _Batch | BaseException) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> _Batch:
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                if not self.thread.is_alive():
                    raise LayerError("the data prefetch thread stopped") from None
                continue
            if isinstance(item, BaseException):
                self.stop()
                raise item
            return item

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)
        while not self.queue.empty():
            self.queue.get_nowait()


def _key(key: bytes) -> str:
    return repr(key.decode(errors="replace"))


def _transform_param(param: pb.LayerParameter, section: str = "data_param"
                     ) -> pb.TransformationParameter:
    """transform_param, with the deprecated ``section`` (data_param, image_data_param)
    scale/mean_file/crop_size/mirror moved into it where transform_param does not set them
    (Caffe's upgrade does the same)."""
    tp = pb.TransformationParameter()
    tp.CopyFrom(param.transform_param)
    dp = getattr(param, section)
    for name in ("scale", "mean_file", "crop_size", "mirror"):
        if dp.HasField(name) and not tp.HasField(name):
            log.warning("Layer %s: %s.%s is deprecated; use transform_param.%s",
                        param.name, section, name, name)
            setattr(tp, name, getattr(dp, name))
    return tp


@register
class Data(Layer):
    """Caffe's Data layer over an LMDB source."""

    type = "Data"
    exact_bottoms = 0
    min_tops = 1
    max_tops = 2
    has_backward = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        dp = self.param.data_param
        self.batch_size = int(dp.batch_size)
        if self.batch_size <= 0:
            raise LayerError("data_param.batch_size must be set to a positive number")
        if not dp.source:
            raise LayerError("data_param.source is not set")
        try:
            self.reader = LmdbReader(self.ctx.resolve_path(dp.source), dp.backend)
            self.transformer = self._make_transformer()
            self.color = decode_color(self.transformer.param, dp.force_encoded_color)
            shape = self._first_shape()
            self.out_shape = (self.batch_size, *self.transformer.output_shape(*shape))
        except ConfigError as e:
            raise LayerError(str(e)) from None
        # netforge's data_param.shuffle: a new record order every epoch, seeded from the net.
        self.shuffle = bool(dp.shuffle)
        seed = int(self.ctx.rng.integers(2**63)) if self.shuffle else None
        self._batches = _BatchReader(self.reader, self.transformer, self.batch_size, shape,
                                     self.color, seed)
        self._depth = int(dp.prefetch)
        self._prefetcher: _Prefetcher | None = None
        self._finalizer: weakref.finalize | None = None
        self._cursor = 0
        self._rng_state = self.transformer.get_rng_state()
        log.info("output data size: %s", ",".join(str(s) for s in self.out_shape))
        self.reshape(bottom, top)

    def _make_transformer(self) -> DataTransformer:
        tp = _transform_param(self.param)
        mean = load_mean_file(self.ctx.resolve_path(tp.mean_file)) if tp.mean_file else None
        rng = None
        if needs_rng(tp, self.phase):
            rng = np.random.default_rng(int(self.ctx.rng.integers(2**63)))
        return DataTransformer(tp, self.phase, rng, mean)

    def _first_shape(self) -> tuple[int, int, int]:
        if len(self.reader) == 0:
            raise LayerError(f"data source {self.reader.path} is empty")
        cursor = self.reader.cursor(0)
        try:
            key = cursor.key
            datum = pb.Datum()
            datum.ParseFromString(cursor.value)
        finally:
            cursor.close()
        if datum.encoded:
            c, h, w = decode_datum(datum, self.color, key).shape
            return c, h, w
        return datum_shape(datum)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(self.out_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        batch = self._next_batch()
        top[0].data = self.backend.asarray(batch.data)
        if len(top) > 1:
            top[1].data = self.backend.asarray(batch.labels)
        self._cursor = batch.end
        self._rng_state = batch.rng_state

    def _next_batch(self) -> _Batch:
        if self._prefetcher is None:
            self.transformer.set_rng_state(copy.deepcopy(self._rng_state))
            self._prefetcher = _Prefetcher(self._batches, self._cursor, self._depth)
            self._finalizer = weakref.finalize(self, self._prefetcher.stop)
        try:
            return self._prefetcher.get()
        except BaseException:
            self.close()  # the next forward starts over from the last consumed batch
            raise

    # -- resume -----------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """{'cursor': record index of the next batch to consume, 'rng': transformer RNG state or
        None}; plain Python values, safe to store."""
        return {"cursor": self._cursor, "rng": copy.deepcopy(self._rng_state)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a ``get_state`` result: the next forward reads from its cursor."""
        cursor = state.get("cursor")
        if not isinstance(cursor, int) or cursor < 0:
            raise LayerError(f"bad data cursor in the saved state: {cursor!r}")
        self.close()
        # A shuffled cursor counts across epochs (the epoch picks the order).
        self._cursor = cursor if self.shuffle else cursor % len(self.reader)
        if state.get("rng") is not None and self._rng_state is not None:
            self._rng_state = copy.deepcopy(state["rng"])

    def close(self) -> None:
        """Stop the prefetch thread (the next forward starts a new one)."""
        if self._finalizer is not None:
            self._finalizer()
        self._prefetcher = None
        self._finalizer = None
