"""Caffe's DataTransformer, vectorised over a batch, and the mean-file reader.

Per output element, with p the source pixel at (c, h + h_off, w + w_off):
``(p − mean) * scale``, where mean is the mean file's value at the same source position, or
``mean_value[c]`` (one value serves every channel), or 0. The crop offset is random in TRAIN
(``h_off`` uniform in [0, H − crop]) and centred in TEST; mirroring (when ``mirror`` is set) is a
coin flip per image in both phases.

``force_color`` / ``force_gray`` only concern encoded Datums (Caffe's DecodeDatumToCVMat): they
are decoded to 3 channels (BGR) or 1; without either, as stored (DecodeDatumToCVMatNative).
``decode_color`` gives the choice.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from netforge.errors import ConfigError
from netforge.proto import pb

PHASE_TRAIN = pb.TRAIN


def needs_rng(param: pb.TransformationParameter, phase: int) -> bool:
    """Caffe creates the transformer's RNG only for mirroring or a TRAIN crop."""
    return bool(param.mirror or (param.crop_size and phase == PHASE_TRAIN))


def decode_color(param: pb.TransformationParameter,
                 force_encoded_color: bool = False) -> bool | None:
    """How encoded images are decoded: True (3 channels, BGR) for ``force_color`` or
    data_param.force_encoded_color, False (1 channel) for ``force_gray``, None (as stored)
    otherwise; ConfigError when both ways are forced."""
    if param.force_color and param.force_gray:
        raise ConfigError("transform_param: cannot set both force_color and force_gray")
    if param.force_gray:
        if force_encoded_color:
            raise ConfigError("data_param.force_encoded_color and transform_param.force_gray "
                              "contradict each other")
        return False
    if param.force_color or force_encoded_color:
        return True
    return None


class DataTransformer:
    """Applies a TransformationParameter to (N, C, H, W) batches of uint8 or float pixels."""

    def __init__(self, param: pb.TransformationParameter, phase: int,
                 rng: np.random.Generator | None = None, mean: np.ndarray | None = None):
        if param.mean_file and param.mean_value:
            raise ConfigError("transform_param: specify either mean_file or mean_value, not both")
        if param.mean_file and mean is None:
            raise ValueError("transform_param.mean_file is set: pass the mean array "
                             "(load_mean_file) to DataTransformer")
        self.param = param
        self.phase = phase
        self.color = decode_color(param)  # for encoded inputs; checks force_color/force_gray
        self.scale = np.float32(param.scale)
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32)
        if needs_rng(param, phase) and rng is None:
            rng = np.random.default_rng()
        self.rng = rng

    # -- shapes -----------------------------------------------------------------------------------
    def output_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        """The (C, h, w) of one transformed image; ConfigError when the input cannot take the
        transform (crop larger than the image, a mean of another size, wrong mean_value count)."""
        if self.crop and (self.crop > height or self.crop > width):
            raise ConfigError(f"transform_param.crop_size {self.crop} is larger than the "
                              f"{height}×{width} images")
        if self.mean is not None and self.mean.shape != (channels, height, width):
            raise ConfigError(f"mean_file has shape {tuple(self.mean.shape)} but the images are "
                              f"{channels}×{height}×{width}")
        n_values = self.mean_values.size
        if n_values not in (0, 1, channels):
            raise ConfigError(f"transform_param has {n_values} mean_value(s); give one, or one "
                              f"per channel ({channels})")
        if self.crop:
            return channels, self.crop, self.crop
        return channels, height, width

    # -- the transform ----------------------------------------------------------------------------
    def transform_batch(self, x: np.ndarray) -> np.ndarray:
        """(N, C, H, W) uint8 or float pixels -> a new float32 (N, C, h, w) array."""
        if x.ndim != 4:
            raise ValueError(f"transform_batch takes (N, C, H, W), got shape {x.shape}")
        _, c, h, w = x.shape
        self.output_shape(c, h, w)
        if self.mean is not None:
            x = np.subtract(x, self.mean, dtype=np.float32)  # at source positions, then crop
        x = self._crop_and_mirror(x)
        if not self.mean_values.size:
            return np.multiply(x, self.scale, dtype=np.float32)
        out = np.subtract(x, self._channel_means(c), dtype=np.float32)
        if self.scale != 1:
            out *= self.scale
        return out

    def _channel_means(self, channels: int) -> np.ndarray:
        values = self.mean_values
        if values.size == 1:
            values = np.repeat(values, channels)
        return values.reshape(1, channels, 1, 1)

    def _crop_and_mirror(self, x: np.ndarray) -> np.ndarray:
        n, _, h, w = x.shape
        ch, cw = (self.crop, self.crop) if self.crop else (h, w)
        flip = self._draw_mirror(n)
        if self.crop and self.phase == PHASE_TRAIN:
            assert self.rng is not None
            h_off = self.rng.integers(0, h - ch + 1, size=n)
            w_off = self.rng.integers(0, w - cw + 1, size=n)
        else:
            h0, w0 = (h - ch) // 2, (w - cw) // 2
            x = x[:, :, h0:h0 + ch, w0:w0 + cw]
            if flip is None or not flip.any():
                return x
            h_off = w_off = np.zeros(n, dtype=np.int64)
        return _gather(x, h_off, w_off, ch, cw, flip)

    def _draw_mirror(self, n: int) -> np.ndarray | None:
        if not self.mirror:
            return None
        assert self.rng is not None
        return self.rng.integers(0, 2, size=n).astype(bool)

    # -- RNG state (for deterministic resume) -----------------------------------------------------
    def get_rng_state(self) -> dict[str, Any] | None:
        return None if self.rng is None else self.rng.bit_generator.state

    def set_rng_state(self, state: dict[str, Any] | None) -> None:
        if self.rng is not None and state is not None:
            self.rng.bit_generator.state = state


def _gather(x: np.ndarray, h_off: np.ndarray, w_off: np.ndarray, ch: int, cw: int,
            flip: np.ndarray | None) -> np.ndarray:
    """Per-image windows x[i, :, h_off[i]:+ch, w_off[i]:+cw], mirrored left-right where flip[i]."""
    n, c = x.shape[:2]
    rows = h_off[:, None] + np.arange(ch)
    cols = w_off[:, None] + np.arange(cw)
    if flip is not None:
        cols = np.where(flip[:, None], cols[:, ::-1], cols)
    return x[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]


def load_blob_proto(path: str | os.PathLike[str], what: str = "BlobProto file") -> np.ndarray:
    """The N-d array in a BlobProto file (.binaryproto): its ``shape`` or the legacy
    num/channels/height/width fields, from ``data`` (float32) or ``double_data`` (float64)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    blob = pb.BlobProto()
    try:
        blob.ParseFromString(raw)
    except Exception:
        raise ConfigError(f"{what} {path} is not a BlobProto (.binaryproto)") from None
    if blob.num or blob.channels or blob.height or blob.width:
        shape: tuple[int, ...] = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(int(d) for d in blob.shape.dim)
    double = not len(blob.data) and len(blob.double_data)
    values = blob.double_data if double else blob.data
    count = int(np.prod(shape)) if shape else 0
    if count == 0 or len(values) != count:
        raise ConfigError(f"{what} {path}: shape {shape} does not match its {len(values)} "
                          "values")
    return np.asarray(values, dtype=np.float64 if double else np.float32).reshape(shape)


def load_mean_file(path: str | os.PathLike[str]) -> np.ndarray:
    """The (C, H, W) float32 mean stored in a BlobProto .binaryproto (compute_image_mean's
    output: legacy num/channels/height/width fields, or ``shape``; ``data`` or ``double_data``)."""
    arr = load_blob_proto(path, "mean file").astype(np.float32, copy=False)
    shape = arr.shape
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ConfigError(f"mean file {os.fspath(path)}: expected one C×H×W image, got shape "
                          f"{shape}")
    return arr
