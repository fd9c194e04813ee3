"""Datum <-> array: Caffe's record for one image (C×H×W uint8 bytes, float_data, or the bytes of
an encoded PNG/JPEG file, decoded with Pillow: ``pip install 'netforge[images]'``) and label."""

from __future__ import annotations

import numpy as np

from netforge.errors import ConfigError
from netforge.proto import pb


def datum_shape(datum: pb.Datum) -> tuple[int, int, int]:
    return int(datum.channels), int(datum.height), int(datum.width)


def parse_datum(value: bytes, key: bytes | str = "") -> pb.Datum:
    datum = pb.Datum()
    try:
        datum.ParseFromString(value)
    except Exception:  # protobuf's DecodeError, whatever module it comes from
        where = f" at key {_key_str(key)}" if key else ""
        raise ConfigError(f"record{where} is not a Datum") from None
    return datum


def datum_to_array(datum: pb.Datum, color: bool | None = None,
                   key: bytes | str = "") -> tuple[np.ndarray, int]:
    """(pixels of shape (C, H, W), label): uint8 from ``data``, or float32 from ``float_data``
    when ``data`` is empty (Caffe's rule). An encoded Datum is decoded: in colour (3 channels,
    BGR) when ``color`` is True, grey (1 channel) when False, as stored when None; ``key`` names
    the record in errors."""
    if datum.encoded:
        from netforge.data.images import decode_datum

        return decode_datum(datum, color, key), int(datum.label)
    shape = datum_shape(datum)
    size = shape[0] * shape[1] * shape[2]
    if datum.data:
        if len(datum.data) != size:
            raise ConfigError(f"datum data has {len(datum.data)} bytes, expected "
                              f"{shape[0]}×{shape[1]}×{shape[2]} = {size}")
        arr: np.ndarray = np.frombuffer(datum.data, dtype=np.uint8)
    else:
        if len(datum.float_data) != size:
            raise ConfigError(f"datum float_data has {len(datum.float_data)} values, expected "
                              f"{shape[0]}×{shape[1]}×{shape[2]} = {size}")
        arr = np.asarray(datum.float_data, dtype=np.float32)
    return arr.reshape(shape), int(datum.label)


def array_to_datum(arr: np.ndarray, label: int = 0) -> pb.Datum:
    """A Datum holding ``arr`` ((C, H, W), or (H, W) for one channel): raw bytes when it is
    uint8, float_data otherwise."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"a Datum holds a (C, H, W) or (H, W) array, got shape {arr.shape}")
    c, h, w = arr.shape
    datum = pb.Datum(channels=c, height=h, width=w, label=int(label))
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    return datum


def _key_str(key: bytes | str) -> str:
    return repr(key.decode(errors="replace") if isinstance(key, bytes) else key)
