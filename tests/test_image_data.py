"""Image data: convert-imageset, compute-image-mean, encoded Datums in the Data layer
(force_color / force_gray / force_encoded_color), the ImageData layer, and the missing-Pillow
error; on small PNG/JPEG images made here with Pillow."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from netforge.cli import main
from netforge.data import images as nfimages
from netforge.data.datum import datum_to_array
from netforge.data.db import LmdbReader, LmdbWriter
from netforge.data.transformer import DataTransformer, decode_color, load_mean_file
from netforge.errors import ConfigError
from netforge.layers import LayerError
from netforge.proto import pb
from tests.helpers import PHASE_TEST, PHASE_TRAIN, make_layer, tops

GRAD_CHECKED: set[str] = set()
NO_BACKWARD: set[str] = {"ImageData"}

PIL = pytest.importorskip("PIL.Image", reason="Pillow is not installed")


# -- helpers --------------------------------------------------------------------------------------
def bgr(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (3, H, W) BGR, OpenCV's layout."""
    return np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))


def make_images(root: Path, n: int = 5, h: int = 6, w: int = 7, seed: int = 0,
                fmt: str = "png") -> list[tuple[str, np.ndarray]]:
    """n random RGB images saved as root/sub/img<i>.<fmt>; returns (relative path, RGB)."""
    rng = np.random.default_rng(seed)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"sub/img{i}.{fmt}"
        PIL.fromarray(rgb, "RGB").save(root / name)
        out.append((name, rgb))
    return out


def write_list(path: Path, names: list[str], labels: list[int] | None = None) -> Path:
    labels = labels if labels is not None else list(range(len(names)))
    path.write_text("".join(f"{n} {lab}\n" for n, lab in zip(names, labels, strict=True)))
    return path


def read_db(path: Path) -> list[tuple[bytes, pb.Datum]]:
    with LmdbReader(path) as reader:
        return [(k, pb.Datum.FromString(v)) for k, v in reader]


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    mode = "L" if arr.ndim == 2 else "RGB"
    PIL.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def encoded_db(path: Path, pictures: list[np.ndarray]) -> Path:
    """Datums built with the protobuf API: encoded: true, data = PNG bytes, label i."""
    with LmdbWriter(path) as w:
        for i, arr in enumerate(pictures):
            w.put(b"%08d" % i, pb.Datum(data=png_bytes(arr), label=i, encoded=True)
                  .SerializeToString())
    return path


def data_layer(db: Path, batch: int, extra: str = "", phase: int = PHASE_TEST, dp: str = ""):
    layer = make_layer("Data", f'data_param {{ source: "{db}" batch_size: {batch} '
                               f'backend: LMDB {dp} }} {extra}', phase=phase, dtype="float32")
    top = tops(2, "float32")
    layer.setup([], top)
    return layer, top


def forward(layer, top) -> tuple[np.ndarray, np.ndarray]:
    layer.forward([], top)
    return np.array(top[0].data), np.array(top[1].data)


def grey_of(rgb: np.ndarray) -> np.ndarray:
    r, g, b = (rgb[..., k].astype(np.uint32) for k in range(3))
    return ((4899 * r + 9617 * g + 1868 * b + 8192) >> 14).astype(np.uint8)


# -- convert-imageset -----------------------------------------------------------------------------
def test_convert_imageset_keys_and_pixels(tmp_path: Path, caplog) -> None:
    pics = make_images(tmp_path / "img")
    names = [n for n, _ in pics]
    lst = write_list(tmp_path / "list.txt", [*names[:2], "sub/missing.png", *names[2:]],
                     [3, 1, 4, 1, 5, 9])
    with caplog.at_level(logging.INFO, logger="netforge"):
        n = nfimages.convert_imageset(str(tmp_path / "img") + "/", lst, tmp_path / "db")
    assert n == 5
    assert "Could not open or find file" in caplog.text and "Processed 5 files." in caplog.text
    records = read_db(tmp_path / "db")
    # the unreadable line keeps its index: keys are "%08d_%s" of the line
    assert [k for k, _ in records] == [b"00000000_sub/img0.png", b"00000001_sub/img1.png",
                                       b"00000003_sub/img2.png", b"00000004_sub/img3.png",
                                       b"00000005_sub/img4.png"]
    assert [d.label for _, d in records] == [3, 1, 1, 5, 9]
    for (_, datum), (_, rgb) in zip(records, pics, strict=True):
        assert (datum.channels, datum.height, datum.width, datum.encoded) == (3, 6, 7, False)
        assert datum.data == bgr(rgb).tobytes()  # C×H×W, BGR
    assert not (tmp_path / "db.partial").exists()


def test_convert_imageset_gray_resize_shuffle(tmp_path: Path) -> None:
    pics = make_images(tmp_path / "img", n=6)
    lst = write_list(tmp_path / "list.txt", [n for n, _ in pics])
    root = str(tmp_path / "img") + "/"
    nfimages.convert_imageset(root, lst, tmp_path / "gray", gray=True)
    for (_, datum), (_, rgb) in zip(read_db(tmp_path / "gray"), pics, strict=True):
        assert (datum.channels, datum.height, datum.width) == (1, 6, 7)
        assert datum.data == grey_of(rgb).tobytes()
    nfimages.convert_imageset(root, lst, tmp_path / "small", resize_height=3, resize_width=4)
    assert {(d.channels, d.height, d.width) for _, d in read_db(tmp_path / "small")} == {(3, 3, 4)}
    keys = []
    for seed in (7, 7, 8):
        out = tmp_path / f"shuf{len(keys)}"
        nfimages.convert_imageset(root, lst, out, shuffle=True, seed=seed)
        keys.append([k for k, _ in read_db(out)])
    assert keys[0] == keys[1] and keys[0] != keys[2]
    paths = sorted(k.split(b"_", 1)[1] for k in keys[0])
    assert paths == sorted(n.encode() for n, _ in pics)
    with pytest.raises(ConfigError, match=r"already exists"):
        nfimages.convert_imageset(root, lst, tmp_path / "gray")


def test_resize_is_opencv_bilinear() -> None:
    arr = np.array([[[0, 80], [160, 240]]], dtype=np.uint8)
    # cv2.resize(arr, (4, 4)) with INTER_LINEAR
    expected = [[0, 20, 60, 80], [40, 60, 100, 120], [120, 140, 180, 200], [160, 180, 220, 240]]
    np.testing.assert_array_equal(nfimages.resize(arr, 4, 4)[0], expected)
    np.testing.assert_array_equal(nfimages.resize(np.full((3, 5, 5), 9, np.uint8), 2, 3), 9)


def test_convert_imageset_check_size(tmp_path: Path) -> None:
    a = make_images(tmp_path / "img", n=1, h=4, w=4)
    b = make_images(tmp_path / "img2", n=1, h=5, w=4)
    (tmp_path / "img" / "sub" / "big.png").write_bytes((tmp_path / "img2" / b[0][0]).read_bytes())
    lst = write_list(tmp_path / "l.txt", [a[0][0], "sub/big.png"])
    root = str(tmp_path / "img") + "/"
    assert nfimages.convert_imageset(root, lst, tmp_path / "ok") == 2
    with pytest.raises(ConfigError, match=r"sub/big.png has size 3×5×4.*--check-size"):
        nfimages.convert_imageset(root, lst, tmp_path / "db", check_size=True)
    assert not (tmp_path / "db").exists()


def test_convert_imageset_encoded_roundtrip(tmp_path: Path) -> None:
    pics = make_images(tmp_path / "img", n=3)
    lst = write_list(tmp_path / "list.txt", [n for n, _ in pics])
    root = str(tmp_path / "img") + "/"
    nfimages.convert_imageset(root, lst, tmp_path / "enc", encoded=True)
    for (_, datum), (name, rgb) in zip(read_db(tmp_path / "enc"), pics, strict=True):
        assert datum.encoded and datum.data == (tmp_path / "img" / name).read_bytes()
        pixels, _ = datum_to_array(datum)
        np.testing.assert_array_equal(pixels, bgr(rgb))
    nfimages.convert_imageset(root, lst, tmp_path / "jpg", encode_type="jpg")
    nfimages.convert_imageset(root, lst, tmp_path / "rs", encode_type="png", resize_height=3,
                              resize_width=3)
    for _, datum in read_db(tmp_path / "jpg"):
        assert datum.encoded and datum.data[:2] == b"\xff\xd8"
        assert datum_to_array(datum)[0].shape == (3, 6, 7)
    for _, datum in read_db(tmp_path / "rs"):
        assert datum.data[:4] == b"\x89PNG" and datum_to_array(datum)[0].shape == (3, 3, 3)


def test_cli_convert_and_mean(tmp_path: Path, capsys) -> None:
    pics = make_images(tmp_path / "img", n=4)
    lst = write_list(tmp_path / "list.txt", [n for n, _ in pics])
    code = main(["convert-imageset", str(tmp_path / "img") + "/", str(lst), str(tmp_path / "db"),
                 "--resize-height", "3", "--resize-width", "5", "--encoded"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Processed 4 files." in err
    code = main(["compute-image-mean", str(tmp_path / "db"), str(tmp_path / "mean.binaryproto")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "mean_value channel [2]:" in err
    assert load_mean_file(tmp_path / "mean.binaryproto").shape == (3, 3, 5)
    code = main(["convert-imageset", "x/", str(tmp_path / "none.txt"), str(tmp_path / "d2")])
    err = capsys.readouterr().err
    assert code == 2 and "image list not found" in err and "Traceback" not in err
    (tmp_path / "bad.txt").write_text("no-label-here\n")
    code = main(["convert-imageset", "x/", str(tmp_path / "bad.txt"), str(tmp_path / "d3")])
    assert code == 2 and "bad.txt:1: expected 'path label'" in capsys.readouterr().err


# -- compute-image-mean ---------------------------------------------------------------------------
def test_compute_image_mean_values(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(3)
    pictures = rng.integers(0, 256, (5, 2, 3, 4), dtype=np.uint8)
    with LmdbWriter(tmp_path / "raw") as w:  # Datums through the protobuf API
        for i, p in enumerate(pictures):
            w.put(b"%08d" % i, pb.Datum(channels=2, height=3, width=4, data=p.tobytes(),
                                        label=i).SerializeToString())
    with caplog.at_level(logging.INFO, logger="netforge"):
        mean = nfimages.compute_image_mean(tmp_path / "raw", tmp_path / "m.binaryproto")
    expected = pictures.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(mean, expected, rtol=1e-6)
    blob = pb.BlobProto.FromString((tmp_path / "m.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 2, 3, 4)
    np.testing.assert_allclose(np.array(blob.data).reshape(2, 3, 4), expected, rtol=1e-6)
    for c in range(2):
        assert f"mean_value channel [{c}]: {expected[c].mean():.6g}" in caplog.text
    # encoded records (grey PNGs, decoded as stored) give the same mean as their pixels
    grey = rng.integers(0, 256, (4, 3, 5), dtype=np.uint8)
    encoded_db(tmp_path / "enc", list(grey))
    mean = nfimages.compute_image_mean(tmp_path / "enc")
    np.testing.assert_allclose(mean, grey.mean(axis=0)[None], rtol=1e-6)
    with LmdbWriter(tmp_path / "f") as w:
        for key, values in (("a", [1.5, -2]), ("b", [0.5, 4])):
            w.put(key, pb.Datum(channels=1, height=1, width=2, float_data=values)
                  .SerializeToString())
    np.testing.assert_allclose(nfimages.compute_image_mean(tmp_path / "f"), [[[1.0, 1.0]]])


# -- encoded records in the Data layer ------------------------------------------------------------
def test_data_layer_encoded_equals_raw(tmp_path: Path) -> None:
    pics = make_images(tmp_path / "img", n=6)
    lst = write_list(tmp_path / "list.txt", [n for n, _ in pics])
    root = str(tmp_path / "img") + "/"
    nfimages.convert_imageset(root, lst, tmp_path / "raw")
    nfimages.convert_imageset(root, lst, tmp_path / "enc", encoded=True)
    extra = "transform_param { scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30 " \
            "crop_size: 4 }"
    outs = []
    for db in ("raw", "enc"):
        layer, top = data_layer(tmp_path / db, 4, extra)
        assert top[0].shape == (4, 3, 4, 4)
        outs.append([forward(layer, top) for _ in range(3)])  # wraps around
        layer.close()
    for (d1, l1), (d2, l2) in zip(*outs, strict=True):
        np.testing.assert_array_equal(d1, d2)
        np.testing.assert_array_equal(l1, l2)
    first = np.stack([bgr(rgb) for _, rgb in pics[:4]]).astype(np.float32)
    np.testing.assert_array_equal(outs[1][0][0], (first[:, :, 1:5, 1:5]
                                                  - np.float32([10, 20, 30])[:, None, None]) * 0.5)


def test_data_layer_force_color_and_gray(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    grey = [rng.integers(0, 256, (3, 4), dtype=np.uint8) for _ in range(2)]
    colour = [rng.integers(0, 256, (3, 4, 3), dtype=np.uint8) for _ in range(2)]
    gdb, cdb = encoded_db(tmp_path / "g", grey), encoded_db(tmp_path / "c", colour)
    layer, top = data_layer(gdb, 2)  # as stored: one channel
    np.testing.assert_array_equal(forward(layer, top)[0], np.stack(grey)[:, None])
    layer.close()
    for extra, dp in (("transform_param { force_color: true }", ""),
                      ("", "force_encoded_color: true")):
        layer, top = data_layer(gdb, 2, extra, dp=dp)
        data = forward(layer, top)[0]
        layer.close()
        assert data.shape == (2, 3, 3, 4)
        for c in range(3):
            np.testing.assert_array_equal(data[:, c], np.stack(grey))
    layer, top = data_layer(cdb, 2, "transform_param { force_gray: true }")
    data = forward(layer, top)[0]
    layer.close()
    assert data.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(data[:, 0], np.stack([grey_of(c) for c in colour]))
    layer, top = data_layer(cdb, 2)
    np.testing.assert_array_equal(forward(layer, top)[0], np.stack([bgr(c) for c in colour]))
    layer.close()
    with pytest.raises(LayerError, match=r"cannot set both force_color and force_gray"):
        data_layer(cdb, 2, "transform_param { force_color: true force_gray: true }")
    with pytest.raises(ConfigError, match=r"contradict"):
        decode_color(pb.TransformationParameter(force_gray=True), force_encoded_color=True)
    # mixed grey and colour records: a clear error naming the record and the fix
    mixed = tmp_path / "mixed"
    with LmdbWriter(mixed) as w:
        w.put("a", pb.Datum(data=png_bytes(colour[0]), encoded=True).SerializeToString())
        w.put("b", pb.Datum(data=png_bytes(grey[0]), encoded=True).SerializeToString())
    layer, top = data_layer(mixed, 2)
    with pytest.raises(LayerError, match=r"record 'b' decodes to \(1, 3, 4\).*force_color"):
        forward(layer, top)
    layer.close()
    layer, top = data_layer(mixed, 2, "transform_param { force_color: true }")
    assert forward(layer, top)[0].shape == (2, 3, 3, 4)
    layer.close()


def test_transformer_caffe_case7_on_decoded_images() -> None:
    # §9 case 7 through the decode path: pixels equal to label L; mean_value c per channel
    label = 7
    datum = pb.Datum(data=png_bytes(np.full((4, 5, 3), label, np.uint8)), label=label,
                     encoded=True)
    pixels, got_label = datum_to_array(datum, color=True)
    assert got_label == label
    x = np.stack([pixels, pixels])
    for text, expected in (("", [label] * 3), ("mean_value: 1", [label - 1] * 3),
                           ("mean_value: 0 mean_value: 1 mean_value: 2",
                            [label, label - 1, label - 2])):
        from google.protobuf import text_format
        tp = text_format.Parse(text, pb.TransformationParameter())
        out = DataTransformer(tp, PHASE_TEST).transform_batch(x)
        for c in range(3):
            assert np.all(out[:, c] == expected[c])
    mean_out = DataTransformer(pb.TransformationParameter(mean_file="m"), PHASE_TEST,
                               mean=pixels.astype(np.float32)).transform_batch(x)
    assert np.all(mean_out == 0)


def test_encoded_without_pillow(tmp_path: Path, monkeypatch) -> None:
    db = encoded_db(tmp_path / "enc", [np.zeros((2, 2), np.uint8)])
    monkeypatch.setitem(sys.modules, "PIL", None)  # import PIL now fails
    with pytest.raises(ConfigError, match=r"key '00000000'.*needs Pillow.*netforge\[images\]"):
        datum_to_array(read_db(db)[0][1], key=b"00000000")
    with pytest.raises(LayerError, match=r"key '00000000'.*netforge\[images\]"):
        data_layer(db, 1)
    with pytest.raises(ConfigError, match=r"convert-imageset needs Pillow"):
        nfimages.convert_imageset("x/", tmp_path / "l.txt", tmp_path / "db")
    with pytest.raises(LayerError, match=r"ImageData layer needs Pillow"):
        make_layer("ImageData", 'image_data_param { source: "x" }').setup([], tops(2))


def test_bad_encoded_bytes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'k'.*not an image file"):
        datum_to_array(pb.Datum(data=b"\x89PNG", encoded=True), key="k")


# -- the ImageData layer --------------------------------------------------------------------------
def image_layer(tmp_path: Path, params: str, phase: int = PHASE_TRAIN, seed: int = 1701,
                extra: str = ""):
    layer = make_layer("ImageData", f'image_data_param {{ root_folder: "{tmp_path}/img/" '
                                    f'source: "{tmp_path}/list.txt" {params} }} {extra}',
                       phase=phase, dtype="float32", seed=seed)
    top = tops(2, "float32")
    layer.setup([], top)
    return layer, top


def test_image_data_order_and_wrap(tmp_path: Path, caplog) -> None:
    pics = make_images(tmp_path / "img", n=5)
    write_list(tmp_path / "list.txt", [n for n, _ in pics], [10, 11, 12, 13, 14])
    with caplog.at_level(logging.INFO, logger="netforge"):
        layer, top = image_layer(tmp_path, "batch_size: 2", extra="transform_param { scale: 2 }")
    assert "A total of 5 images." in caplog.text and "output data size: 2,3,6,7" in caplog.text
    assert top[0].shape == (2, 3, 6, 7) and top[1].shape == (2,)
    labels, data = [], []
    for _ in range(4):
        d, lab = forward(layer, top)
        labels.append(lab.tolist())
        data.append(d)
    assert labels == [[10, 11], [12, 13], [14, 10], [11, 12]]  # wraps at the end
    np.testing.assert_array_equal(data[2][0], bgr(pics[4][1]) * 2.0)
    np.testing.assert_array_equal(data[2][1], bgr(pics[0][1]) * 2.0)


def test_image_data_shuffle_is_seeded_and_per_epoch(tmp_path: Path) -> None:
    pics = make_images(tmp_path / "img", n=6, h=2, w=2)
    write_list(tmp_path / "list.txt", [n for n, _ in pics])

    def epochs(seed: int) -> list[list[int]]:
        layer, top = image_layer(tmp_path, "batch_size: 3 shuffle: true", seed=seed)
        flat = [int(v) for _ in range(6) for v in forward(layer, top)[1]]
        return [flat[i:i + 6] for i in range(0, 18, 6)]

    a, b, c = epochs(1), epochs(1), epochs(2)
    assert a == b and a != c
    assert all(sorted(e) == list(range(6)) for e in a)
    assert len({tuple(e) for e in a}) > 1  # reshuffled at each wrap


def test_image_data_resize_gray_skip_and_resume(tmp_path: Path) -> None:
    pics = make_images(tmp_path / "img", n=4)
    write_list(tmp_path / "list.txt", [n for n, _ in pics])
    layer, top = image_layer(tmp_path, "batch_size: 2 new_height: 3 new_width: 4 is_color: false")
    d, _ = forward(layer, top)
    assert d.shape == (2, 1, 3, 4)
    np.testing.assert_array_equal(d[0, 0], nfimages.resize(grey_of(pics[0][1])[None], 3, 4)[0])
    layer, top = image_layer(tmp_path, "batch_size: 1 rand_skip: 4", seed=3)
    assert 0 <= layer.pos < 4
    # resume: state after two batches, then the same batches as an uninterrupted run
    extra = "transform_param { crop_size: 4 mirror: true }"
    ref, rtop = image_layer(tmp_path, "batch_size: 3 shuffle: true", extra=extra, seed=9)
    expected = [forward(ref, rtop) for _ in range(5)]
    run, top = image_layer(tmp_path, "batch_size: 3 shuffle: true", extra=extra, seed=9)
    forward(run, top), forward(run, top)
    state = run.get_state()
    other, otop = image_layer(tmp_path, "batch_size: 3 shuffle: true", extra=extra, seed=77)
    other.set_state(state)
    for (ed, el) in expected[2:]:
        d, lab = forward(other, otop)
        np.testing.assert_array_equal(d, ed)
        np.testing.assert_array_equal(lab, el)


def test_image_data_errors(tmp_path: Path) -> None:
    pics = make_images(tmp_path / "img", n=2)
    write_list(tmp_path / "list.txt", [pics[0][0], "sub/nope.png"])
    with pytest.raises(LayerError, match=r"new_height and new_width"):
        image_layer(tmp_path, "new_height: 3")
    layer, top = image_layer(tmp_path, "batch_size: 2")
    with pytest.raises(LayerError, match=r"could not load .*sub/nope.png"):
        forward(layer, top)
    with pytest.raises(LayerError, match=r"crop_size 9 is larger"):
        image_layer(tmp_path, "batch_size: 1 crop_size: 9")
    (tmp_path / "list.txt").write_text("")
    with pytest.raises(LayerError, match=r"is empty"):
        image_layer(tmp_path, "batch_size: 1")
