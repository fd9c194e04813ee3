"""Image files and encoded Datums, as Caffe's OpenCV helpers handle them (util/io.cpp), with
Pillow as an optional dependency (``pip install 'netforge[images]'``), and the tools
convert_imageset and compute_image_mean.

Pixels are (C, H, W) uint8 in OpenCV's channel order: colour images are BGR, grey images have
one channel. Decoding follows OpenCV's flags: ``color=True`` (IMREAD_COLOR) gives 3 channels,
``color=False`` (IMREAD_GRAYSCALE) gives 1, ``color=None`` (IMREAD_ANYCOLOR, Caffe's "native")
gives 1 channel for a grey file and 3 for anything else (alpha is dropped). Grey from colour uses
OpenCV's fixed-point weights ``(4899 R + 9617 G + 1868 B + 8192) >> 14``. Resizing is bilinear
with OpenCV's INTER_LINEAR geometry (half-pixel centres, edge pixels repeated), computed in
floating point, so a value may differ by one from OpenCV's fixed-point result.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from netforge.data.db import DEFAULT_MAP_SIZE, LmdbReader, LmdbWriter
from netforge.errors import ConfigError
from netforge.proto import pb

Log = Callable[[str], None]
PathLike = str | os.PathLike[str]

PILLOW_HINT = "(install Pillow: pip install 'netforge[images]')"
ENCODE_TYPES = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP"}
JPEG_QUALITY = 95  # OpenCV's imencode default
_GREY_MODES = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}

log = logging.getLogger("netforge")


def pillow(what: str) -> ModuleType:
    """PIL.Image, or a ConfigError saying that ``what`` needs the images extra."""
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(f"{what} needs Pillow, which is not installed",
                          hint=PILLOW_HINT) from None
    return Image


def have_pillow() -> bool:
    try:
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


# -- decoding -------------------------------------------------------------------------------------
def _to_array(img: object, color: bool | None) -> np.ndarray:
    """A PIL image -> (C, H, W) uint8 in OpenCV's layout for the read flag ``color``."""
    mode: str = img.mode  # type: ignore[attr-defined]
    grey = mode in _GREY_MODES
    if grey:
        arr = np.asarray(img)
        if arr.dtype != np.uint8:  # 16-bit or float grey: OpenCV keeps the high byte
            arr = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8) \
                if mode != "1" else arr.astype(np.uint8) * 255
        if color:
            return np.repeat(arr[None], 3, axis=0)
        return np.ascontiguousarray(arr[None])
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)  # type: ignore[attr-defined]
    if color is False:
        r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
        return ((4899 * r + 9617 * g + 1868 * b + 8192) >> 14).astype(np.uint8)[None]
    return np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))


def decode_image(data: bytes, color: bool | None = None, what: str = "an encoded image"
                 ) -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) -> (C, H, W) uint8 (see the module doc for ``color``);
    ConfigError when Pillow is missing or the bytes are not an image."""
    image = pillow(f"decoding {what}")
    try:
        with image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_array(img, color)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's UnidentifiedImageError is OSError
        reason = "not an image file Pillow can read" if "identify" in str(e) else str(e)
        raise ConfigError(f"cannot decode {what}: {reason}") from None


def read_image(path: PathLike, color: bool | None = True, height: int = 0,
               width: int = 0) -> np.ndarray | None:
    """Caffe's ReadImageToCVMat: the image file as (C, H, W) uint8, resized to height×width when
    both are positive; None (with Caffe's error line) when it cannot be read."""
    image = pillow("reading image files")
    try:
        with image.open(os.fspath(path)) as img:
            img.load()
            arr = _to_array(img, color)
    except (OSError, ValueError, SyntaxError):
        log.error("Could not open or find file %s", os.fspath(path))
        return None
    if height > 0 and width > 0:
        arr = resize(arr, height, width)
    return arr


def resize(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) uint8 -> (C, height, width), bilinear with OpenCV's INTER_LINEAR geometry."""
    _, h, w = arr.shape
    if (h, w) == (height, width):
        return arr.copy()

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        lo = np.floor(pos)
        frac = pos - lo
        lo = lo.astype(np.int64)
        frac = np.where(lo < 0, 0.0, frac)
        lo = np.clip(lo, 0, n_in - 1)
        hi = np.clip(lo + 1, 0, n_in - 1)
        frac = np.where(lo >= n_in - 1, 0.0, frac)
        return lo, hi, frac

    y0, y1, fy = axis(h, height)
    x0, x1, fx = axis(w, width)
    src = arr.astype(np.float64)
    rows = src[:, y0] * (1 - fy)[None, :, None] + src[:, y1] * fy[None, :, None]
    out = rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def encode_image(arr: np.ndarray, encode_type: str) -> bytes:
    """(C, H, W) uint8 BGR or grey -> the bytes of a ``encode_type`` file (png, jpg, bmp)."""
    image = pillow("encoding images")
    fmt = ENCODE_TYPES.get(encode_type.lower())
    if fmt is None:
        raise ConfigError(f"unsupported encode type '{encode_type}' "
                          f"(use one of {', '.join(sorted(ENCODE_TYPES))})")
    if arr.shape[0] == 1:
        img = image.fromarray(np.ascontiguousarray(arr[0]), mode="L")
    else:
        img = image.fromarray(np.ascontiguousarray(arr[::-1].transpose(1, 2, 0)), mode="RGB")
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, format=fmt, quality=JPEG_QUALITY)
    else:
        img.save(buf, format=fmt)
    return buf.getvalue()


def decode_datum(datum: pb.Datum, color: bool | None = None, key: bytes | str = ""
                 ) -> np.ndarray:
    """The (C, H, W) uint8 pixels of an encoded Datum (Caffe's DecodeDatumToCVMat with
    ``color`` True/False, DecodeDatumToCVMatNative with None)."""
    name = key.decode(errors="replace") if isinstance(key, bytes) else key
    what = f"the encoded image at key {name!r}" if name else "an encoded Datum"
    return decode_image(datum.data, color, what)


# -- image lists ----------------------------------------------------------------------------------
def read_image_list(path: PathLike) -> list[tuple[str, int]]:
    """Caffe's image list: one "relative/path label" per line, split at the last space."""
    try:
        text = Path(os.fspath(path)).read_text()
    except FileNotFoundError:
        raise ConfigError(f"image list not found: {os.fspath(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read image list {os.fspath(path)}: {e}") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        name, sep, label = line.rpartition(" ")
        try:
            value = int(label)
        except ValueError:
            value = None
        if not sep or not name or value is None:
            raise ConfigError(f"expected 'path label', got {line!r}",
                              where=f"{os.fspath(path)}:{n}")
        items.append((name, value))
    return items


# -- convert_imageset -----------------------------------------------------------------------------
def _ext(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name else ""


def _same_type(name: str, encode_type: str) -> bool:
    ext, enc = _ext(name), encode_type.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def image_to_datum(path: PathLike, label: int, *, height: int = 0, width: int = 0,
                   color: bool = True, encode_type: str = ""
                   ) -> tuple[pb.Datum, tuple[int, ...]] | None:
    """Caffe's ReadImageToDatum: (the Datum, the (C, H, W) of its image), or None when the file
    cannot be read. With ``encode_type`` the Datum holds encoded bytes: the file's own when it
    needs no resize, is of that type and has the requested channel count; else re-encoded."""
    arr = read_image(path, color, height, width)
    if arr is None:
        return None
    if not encode_type:
        c, h, w = arr.shape
        return pb.Datum(channels=c, height=h, width=w, data=arr.tobytes(), label=label), arr.shape
    name = os.fspath(path)
    native = None
    if not (height > 0 and width > 0) and _same_type(name, encode_type):
        native = read_image(name, None)
    if native is not None and (native.shape[0] == 3) == color:
        data = Path(name).read_bytes()
    else:
        data = encode_image(arr, encode_type)
    return pb.Datum(data=data, label=label, encoded=True), arr.shape


def convert_imageset(root: PathLike, list_file: PathLike, out_db: PathLike, *,
                     resize_height: int = 0, resize_width: int = 0, gray: bool = False,
                     shuffle: bool = False, encoded: bool = False, encode_type: str = "",
                     check_size: bool = False, seed: int = 0, overwrite: bool = False,
                     map_size: int = DEFAULT_MAP_SIZE, log_fn: Log | None = None) -> int:
    """Caffe's convert_imageset: the images of ``list_file`` (paths relative to ``root``) into
    an LMDB under keys ``"%08d_%s" % (line index, path)``; returns the number written.

    Unreadable images are skipped with an error line, as Caffe does (their index is not
    reused). ``shuffle`` permutes the lines with ``numpy.random.default_rng(seed)``."""
    say = log_fn or log.info
    pillow("convert-imageset")
    if (resize_height > 0) != (resize_width > 0) and (resize_height or resize_width):
        log.warning("only one of resize height/width is set: images are not resized "
                    "(Caffe resizes only when both are positive)")
    if encode_type and not encoded:
        say("encode_type specified, assuming encoded=true.")
        encoded = True
    if encode_type and encode_type.lower() not in ENCODE_TYPES:
        raise ConfigError(f"unsupported encode type '{encode_type}' "
                          f"(use one of {', '.join(sorted(ENCODE_TYPES))})")
    lines = read_image_list(list_file)
    if shuffle:
        say("Shuffling data")
        order = np.random.default_rng(seed).permutation(len(lines))
        lines = [lines[i] for i in order]
    say(f"A total of {len(lines)} images.")
    out = Path(os.fspath(out_db))
    _check_target(out, overwrite)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    root_str = os.fspath(root)
    count = 0
    first_shape: tuple[int, ...] | None = None
    with LmdbWriter(partial, map_size=map_size) as writer:
        for line_id, (name, label) in enumerate(lines):
            enc = encode_type
            if encoded and not enc:
                enc = _ext(name)
                if enc not in ENCODE_TYPES:
                    raise ConfigError(f"cannot guess the encoding of '{name}' from its name; "
                                      "pass --encode-type png|jpg")
            result = image_to_datum(root_str + name, label, height=resize_height,
                                    width=resize_width, color=not gray, encode_type=enc)
            if result is None:
                continue
            datum, shape = result
            if check_size:
                if first_shape is None:
                    first_shape = shape
                elif shape != first_shape:
                    raise ConfigError(f"image {name} has size {_shape_str(shape)}, the first "
                                      f"image {_shape_str(first_shape)} (--check-size)")
            writer.put(b"%08d_" % line_id + name.encode(), datum.SerializeToString())
            count += 1
            if count % 1000 == 0:
                say(f"Processed {count} files.")
    if count % 1000 != 0:
        say(f"Processed {count} files.")
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(partial, out)
    return count


def _shape_str(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or overwrite:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise ConfigError(f"{out} already exists; remove it or pass --overwrite to replace it")


# -- compute_image_mean ---------------------------------------------------------------------------
def datum_pixels(datum: pb.Datum, key: bytes | str = "") -> np.ndarray:
    """(C, H, W) pixels of any Datum: decoded natively when encoded, uint8 ``data`` or float32
    ``float_data`` otherwise."""
    from netforge.data.datum import datum_to_array

    if datum.encoded:
        return decode_datum(datum, None, key)
    return datum_to_array(datum)[0]


def compute_image_mean(db: PathLike, out: PathLike | None = None,
                       log_fn: Log | None = None) -> np.ndarray:
    """Caffe's compute_image_mean: the per-pixel mean (C, H, W) float32 over every Datum of
    ``db`` (encoded ones decoded natively), written to ``out`` as a BlobProto with the legacy
    num=1/channels/height/width fields when given; logs the per-channel means."""
    say = log_fn or log.info
    total: np.ndarray | None = None
    count = 0
    with LmdbReader(db) as reader:
        if len(reader) == 0:
            raise ConfigError(f"{reader.path} holds no records")
        say("Starting iteration")
        datum = pb.Datum()
        for key, value in reader:
            try:
                datum.ParseFromString(value)
            except Exception:
                raise ConfigError(f"record at key {key.decode(errors='replace')!r} is not a "
                                  "Datum") from None
            pixels = datum_pixels(datum, key)
            if total is None:
                total = np.zeros(pixels.shape, dtype=np.float64)
            elif pixels.shape != total.shape:
                raise ConfigError(f"record at key {key.decode(errors='replace')!r} has shape "
                                  f"{_shape_str(pixels.shape)}, the first one "
                                  f"{_shape_str(total.shape)}")
            total += pixels
            count += 1
            if count % 10000 == 0:
                say(f"Processed {count} files.")
    assert total is not None
    if count % 10000 != 0:
        say(f"Processed {count} files.")
    mean = (total / count).astype(np.float32)
    if out is not None:
        say(f"Write to {os.fspath(out)}")
        write_mean_file(mean, out)
    say(f"Number of channels: {mean.shape[0]}")
    for c, value in enumerate(channel_means(mean)):
        say(f"mean_value channel [{c}]: {value:.6g}")
    return mean


def channel_means(mean: np.ndarray) -> list[float]:
    return [float(v) for v in mean.reshape(mean.shape[0], -1).mean(axis=1, dtype=np.float64)]


def write_mean_file(mean: np.ndarray, path: PathLike) -> None:
    """A (C, H, W) mean as compute_image_mean writes it: BlobProto num=1, channels, height,
    width and float ``data``; written atomically."""
    from netforge.snapshot import atomic_write_bytes

    c, h, w = mean.shape
    blob = pb.BlobProto(num=1, channels=c, height=h, width=w)
    blob.data.extend(np.asarray(mean, dtype=np.float32).ravel().tolist())
    atomic_write_bytes(path, blob.SerializeToString())
