"""Caffe's binary files: .caffemodel weights (``shape`` and legacy 4-d blobs, double_data, V1
and V0 ``layers``) and .solverstate files, built here with the protobuf API and Caffe's field
numbers; conversion to and from .npz; `netforge test/train --weights x.caffemodel`; training
with ``snapshot_format: BINARYPROTO`` and a bit-exact resume from the .solverstate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netforge import Solver
from netforge.caffe_io import convert_weights, read_caffemodel, read_solverstate
from netforge.cli import main
from netforge.errors import ConfigError
from netforge.net import Net
from netforge.proto import pb
from tests.conftest import ROOT

DEPLOY = ROOT / "models" / "lenet_deploy.yaml"
QUICK = ["max_iter=12", "test_iter=[2]", "test_interval=4", "display=2", "snapshot=0",
         "random_seed=1701", "snapshot_prefix=snaps/lenet"]


def lenet_shapes() -> dict[str, list[tuple[int, ...]]]:
    return {"conv1": [(20, 1, 5, 5), (20,)], "conv2": [(50, 20, 5, 5), (50,)],
            "ip1": [(500, 800), (500,)], "ip2": [(10, 500), (10,)]}


def random_weights(seed: int = 0) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {name: [rng.standard_normal(s).astype(np.float32) for s in shapes]
            for name, shapes in lenet_shapes().items()}


def blob(arr: np.ndarray, style: str = "shape") -> pb.BlobProto:
    b = pb.BlobProto()
    if style == "legacy":
        b.num, b.channels, b.height, b.width = (1,) * (4 - arr.ndim) + arr.shape
    else:
        b.shape.dim.extend(arr.shape)
    if style == "double":
        b.double_data.extend(arr.astype(np.float64).ravel().tolist())
    else:
        b.data.extend(arr.ravel().tolist())
    return b


def net_weights(net: Net) -> dict[str, list[np.ndarray]]:
    return {k: [np.array(a) for a in v] for k, v in net.weights().items()}


def assert_same(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert len(a[k]) == len(b[k])
        for x, y in zip(a[k], b[k], strict=True):
            np.testing.assert_array_equal(x, y)


# -- reading caffemodels ------------------------------------------------------------------------


def test_caffemodel_with_shape_legacy_and_double_blobs(tmp_path: Path) -> None:
    w = random_weights()
    param = pb.NetParameter(name="LeNet")
    param.layer.add(name="data", type="Input", top=["data"])  # no blobs: not a weights entry
    styles = {"conv1": "shape", "conv2": "legacy", "ip1": "double", "ip2": "shape"}
    for name, style in styles.items():
        lp = param.layer.add(name=name, type="Convolution" if "conv" in name else "InnerProduct")
        lp.blobs.extend(blob(a, style) for a in w[name])
    param.layer.add(name="not_in_net", type="InnerProduct").blobs.append(blob(w["ip2"][1]))
    path = tmp_path / "lenet.caffemodel"
    path.write_bytes(param.SerializeToString())

    raw = read_caffemodel(path)
    assert raw["conv2"][1].shape == (1, 1, 1, 50)  # as stored; fitted to the net on load
    assert raw["ip1"][0].dtype == np.float64
    net = Net(DEPLOY, "TEST", verbose=False)
    loaded, ignored = net.copy_from(path)
    assert loaded == ["conv1", "conv2", "ip1", "ip2"] and ignored == ["not_in_net"]
    assert_same(net_weights(net), w)


def test_v1_and_v0_layers_match_by_name(tmp_path: Path) -> None:
    w = random_weights(1)
    param = pb.NetParameter(name="LeNet")
    for name in ("conv1", "conv2", "ip1"):
        v1 = param.layers.add(name=name, bottom=["x"], top=[name])
        v1.type = pb.V1LayerParameter.CONVOLUTION if "conv" in name else \
            pb.V1LayerParameter.INNER_PRODUCT
        v1.blobs.extend(blob(a, "legacy") for a in w[name])
    v0 = param.layers.add().layer  # V0: the name and blobs sit in the nested 'layer'
    v0.name, v0.type = "ip2", "innerproduct"
    v0.blobs.extend(blob(a, "legacy") for a in w["ip2"])
    path = tmp_path / "old.caffemodel"
    path.write_bytes(param.SerializeToString())

    net = Net(DEPLOY, "TEST", verbose=False)
    loaded, _ = net.copy_from(path)
    assert loaded == ["conv1", "conv2", "ip1", "ip2"]
    assert_same(net_weights(net), w)


def test_bad_caffemodels_are_config_errors(tmp_path: Path) -> None:
    net = Net(DEPLOY, "TEST", verbose=False)
    param = pb.NetParameter()
    b = param.layer.add(name="ip2").blobs.add()
    b.shape.dim.extend([10, 500])
    b.data.extend([0.0] * 7)
    path = tmp_path / "short.caffemodel"
    path.write_bytes(param.SerializeToString())
    with pytest.raises(ConfigError, match=r"needs 5000 values but its data holds 7"):
        net.copy_from(path)

    w = random_weights()
    param = pb.NetParameter()
    param.layer.add(name="ip2").blobs.extend([blob(w["ip2"][0].T.copy()), blob(w["ip2"][1])])
    path.write_bytes(param.SerializeToString())
    with pytest.raises(ConfigError, match=r"Cannot copy param 0 weights from layer 'ip2'|"
                                          r"cannot copy param 0 weights from layer 'ip2'"):
        net.copy_from(path)

    path.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(ConfigError, match="cannot read the caffemodel"):
        net.copy_from(path)


# -- writing and converting ---------------------------------------------------------------------


def test_save_writes_caffes_layout(tmp_path: Path) -> None:
    net = Net(DEPLOY, "TEST", verbose=False, seed=3)
    path = tmp_path / "out.caffemodel"
    net.save(path)
    param = pb.NetParameter()
    param.ParseFromString(path.read_bytes())
    assert param.name == "LeNet"
    by_name = {lp.name: lp for lp in param.layer}
    assert [lp.name for lp in param.layer] == net.layer_names  # every layer, in order
    conv1 = by_name["conv1"]
    assert conv1.type == "Convolution" and list(conv1.bottom) == ["data"]
    assert list(conv1.top) == ["conv1"]
    assert list(conv1.blobs[0].shape.dim) == [20, 1, 5, 5]
    np.testing.assert_array_equal(np.array(conv1.blobs[0].data, np.float32).reshape(20, 1, 5, 5),
                                  net.weights()["conv1"][0])
    assert not by_name["data"].blobs


def test_npz_caffemodel_npz_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    net = Net(DEPLOY, "TEST", verbose=False, seed=5)
    net.save(tmp_path / "a.npz")
    code = main(["convert-weights", str(tmp_path / "a.npz"), str(tmp_path / "b.caffemodel"),
                 "--model", str(DEPLOY)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "conv1: 20x1x5x5, 20" in captured.out and "ip2: 10x500, 10" in captured.out
    param = pb.NetParameter()
    param.ParseFromString((tmp_path / "b.caffemodel").read_bytes())
    assert {lp.name: lp.type for lp in param.layer}["ip1"] == "InnerProduct"

    assert main(["convert-weights", str(tmp_path / "b.caffemodel"), str(tmp_path / "c.npz")]) == 0
    other = Net(DEPLOY, "TEST", verbose=False, seed=6)
    other.copy_from(tmp_path / "c.npz")
    assert_same(net_weights(other), net_weights(net))

    # without --model: names and blobs only
    converted = convert_weights(tmp_path / "a.npz", tmp_path / "d.caffemodel")
    assert [n for n, _ in converted] == ["conv1", "conv2", "ip1", "ip2"]
    param = pb.NetParameter()
    param.ParseFromString((tmp_path / "d.caffemodel").read_bytes())
    assert [(lp.name, lp.type, len(lp.blobs)) for lp in param.layer] == [
        ("conv1", "", 2), ("conv2", "", 2), ("ip1", "", 2), ("ip2", "", 2)]

    code = main(["convert-weights", str(tmp_path / "missing.npz"), str(tmp_path / "e.caffemodel")])
    assert code == 2
    assert "weights file not found" in capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_test_and_train_take_caffemodel_weights(
        workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    net = Net("models/lenet_train_test.yaml", "TEST", verbose=False, seed=9)
    net.save("w.caffemodel")
    net.save("w.npz")
    net.close()
    outputs = []
    for weights in ("w.caffemodel", "w.npz"):
        code = main(["test", "--model", "models/lenet_train_test.yaml", "--weights", weights,
                     "--iterations", "2"])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "Loaded weights for 4 layer(s)" in err
        outputs.append([line.split("] ", 1)[1] for line in err.splitlines()
                        if "accuracy = " in line or "loss = " in line])
    assert outputs[0] == outputs[1]

    code = main(["train", "--solver", "solvers/lenet_solver.yaml", "--weights", "w.caffemodel",
                 "--set", "max_iter=1", "--set", "test_iter=[1]", "--set", "test_interval=1",
                 "--set", "snapshot_prefix=snaps/ft"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Finetuning from w.caffemodel" in err


# -- solver states ------------------------------------------------------------------------------


def lenet(*extra: str, solver: str = "solvers/lenet_solver.yaml") -> Solver:
    return Solver(solver, overrides=[*QUICK, *extra], verbose=False)


def test_binaryproto_snapshots_resume_bit_exact(workspace: Path) -> None:
    straight = lenet()
    straight.solve()
    expected = net_weights(straight.net)
    expected_hist = [h.copy() for h in straight.history]
    straight.close()

    first = lenet("max_iter=6", "snapshot_format=BINARYPROTO")
    first.solve()  # snapshot_after_train: snaps/lenet_iter_6.caffemodel + .solverstate
    first.close()
    assert sorted(p.name for p in Path("snaps").glob("lenet_iter_6*")) == [
        "lenet_iter_6.caffemodel", "lenet_iter_6.solverstate"]

    state = pb.SolverState()
    state.ParseFromString(Path("snaps/lenet_iter_6.solverstate").read_bytes())
    assert state.iter == 6 and state.learned_net == "snaps/lenet_iter_6.caffemodel"
    assert len(state.history) == 8
    assert list(state.history[0].shape.dim) == [20, 1, 5, 5]
    model = pb.NetParameter()
    model.ParseFromString(Path("snaps/lenet_iter_6.caffemodel").read_bytes())
    assert "mnist" in [lp.name for lp in model.layer]  # the data layer too, as Caffe writes

    resumed = lenet()
    resumed.solve("snaps/lenet_iter_6.solverstate")
    assert resumed.iter == 12
    assert_same(net_weights(resumed.net), expected)
    for a, b in zip(resumed.history, expected_hist, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.last_test == straight.last_test
    resumed.close()


def test_restore_from_a_plain_caffe_solverstate(workspace: Path) -> None:
    w = random_weights(2)
    model = pb.NetParameter()
    for name, arrays in w.items():
        model.layer.add(name=name).blobs.extend(blob(a) for a in arrays)
    Path("caffe").mkdir()
    Path("caffe/lenet_iter_40.caffemodel").write_bytes(model.SerializeToString())
    hist = [np.full(s, k, np.float32) for k, s in
            enumerate(s for shapes in lenet_shapes().values() for s in shapes)]
    state = pb.SolverState(iter=40, learned_net="elsewhere/lenet_iter_40.caffemodel",
                           current_step=2)
    state.history.extend(blob(h, "legacy" if h.ndim == 1 else "shape") for h in hist)
    Path("caffe/lenet_iter_40.solverstate").write_bytes(state.SerializeToString())
    assert read_solverstate("caffe/lenet_iter_40.solverstate").extra is None

    s = lenet("max_iter=100")
    s.restore("caffe/lenet_iter_40.solverstate")  # learned_net found beside the state file
    assert (s.iter, s.current_step) == (40, 2)
    assert_same(net_weights(s.net), w)
    for mine, h in zip(s.history, hist, strict=True):
        np.testing.assert_array_equal(mine, h)
    s.close()


def test_history_count_mismatch_is_explained(workspace: Path) -> None:
    state = pb.SolverState(iter=6)
    state.history.extend(blob(np.zeros(s, np.float32))
                         for shapes in lenet_shapes().values() for s in shapes)
    Path("sgd.solverstate").write_bytes(state.SerializeToString())
    s = lenet(solver="solvers/lenet_solver_adam.yaml")
    with pytest.raises(ConfigError) as e:
        s.restore("sgd.solverstate")
    msg = str(e.value)
    assert msg.startswith("sgd.solverstate: this .solverstate holds 8 history blobs but an "
                          "Adam solver needs 16")
    assert "SGD, Nesterov, AdaGrad or RMSProp" in msg

    Path("w.caffemodel").write_bytes(pb.NetParameter().SerializeToString())
    with pytest.raises(ConfigError, match="weights file"):
        s.restore("w.caffemodel")
    s.close()
