"""Legacy Caffe configs and the config tools: V0/V1 nets and old solvers upgraded (on load and
by `upgrade-config`), lossless prototxt <-> YAML conversion, and `check`'s per-layer tables."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
from google.protobuf import text_format

from netforge.cli import main
from netforge.config import load_net_param, load_solver_param
from netforge.config_tools import check_config, detect_kind, format_summary
from netforge.errors import ConfigError
from netforge.net import Net
from netforge.proto import pb
from netforge.upgrade import upgrade_net, upgrade_solver, upgrade_v1_layer
from tests.conftest import ROOT

# Caffe's examples/mnist/lenet_train_test.prototxt as it was in the V1 days: enum types,
# blobs_lr/weight_decay, the transformation fields inside data_param, old data paths.
V1_LENET = """
name: "LeNet"
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param {
    source: "examples/mnist/mnist_train_lmdb"
    backend: LMDB
    batch_size: 64
    scale: 0.00390625
  }
  include: { phase: TRAIN }
}
layers {
  name: "mnist"
  type: DATA
  top: "data"
  top: "label"
  data_param {
    source: "examples/mnist/mnist_test_lmdb"
    backend: LMDB
    batch_size: 100
    scale: 0.00390625
  }
  include: { phase: TEST }
}
%(conv1)s
layers {
  name: "pool1"
  type: POOLING
  bottom: "conv1"
  top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layers {
  name: "conv2"
  type: CONVOLUTION
  bottom: "pool1"
  top: "conv2"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  convolution_param {
    num_output: 50
    kernel_size: 5
    stride: 1
    weight_filler { type: "xavier" }
    bias_filler { type: "constant" }
  }
}
layers {
  name: "pool2"
  type: POOLING
  bottom: "conv2"
  top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
}
layers {
  name: "ip1"
  type: INNER_PRODUCT
  bottom: "pool2"
  top: "ip1"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  inner_product_param {
    num_output: 500
    weight_filler { type: "xavier" }
    bias_filler { type: "constant" }
  }
}
layers {
  name: "relu1"
  type: RELU
  bottom: "ip1"
  top: "ip1"
}
layers {
  name: "ip2"
  type: INNER_PRODUCT
  bottom: "ip1"
  top: "ip2"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  inner_product_param {
    num_output: 10
    weight_filler { type: "xavier" }
    bias_filler { type: "constant" }
  }
}
layers {
  name: "accuracy"
  type: ACCURACY
  bottom: "ip2"
  bottom: "label"
  top: "accuracy"
  include: { phase: TEST }
}
layers {
  name: "loss"
  type: SOFTMAX_LOSS
  bottom: "ip2"
  bottom: "label"
  top: "loss"
}
"""
CONV1 = """layers {
  name: "conv1"
  type: CONVOLUTION
  bottom: "data"
  top: "conv1"
  blobs_lr: 1
  blobs_lr: 2
  weight_decay: 1
  weight_decay: 0
  convolution_param {
    num_output: 20
    kernel_size: 5
    stride: 1
    weight_filler { type: "xavier" }
    bias_filler { type: "constant" }
  }
}"""


def v1_lenet(conv1: str = CONV1) -> str:
    return V1_LENET % {"conv1": conv1}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def modern_lenet() -> pb.NetParameter:
    return load_net_param(ROOT / "models" / "lenet_train_test.prototxt")[0]


def assert_is_modern_lenet(net: pb.NetParameter) -> None:
    """``net`` is models/lenet_train_test.prototxt but for the V1 file's data paths and
    decay multipliers, which are checked here and then normalised."""
    assert len(net.layers) == 0
    assert [lp.data_param.source for lp in net.layer[:2]] == [
        "examples/mnist/mnist_train_lmdb", "examples/mnist/mnist_test_lmdb"]
    for lp in net.layer[:2]:
        assert lp.transform_param.scale == pytest.approx(1 / 256)
        assert not lp.data_param.HasField("scale")
        lp.data_param.source = lp.data_param.source.replace("examples/", "data/")
    for lp in net.layer:
        if lp.param:
            assert [(p.lr_mult, p.decay_mult) for p in lp.param] == [(1, 1), (2, 0)]
            assert all(p.HasField("decay_mult") for p in lp.param)
            for p in lp.param:
                p.ClearField("decay_mult")
    assert net == modern_lenet()


# -- V1 ---------------------------------------------------------------------------------------


def test_v1_lenet_upgrades_on_load(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "lenet_v1.prototxt"
    path.write_text(v1_lenet())
    with caplog.at_level(logging.WARNING, logger="netforge"):
        net, smap = load_net_param(path)
    assert "upgraded V1 'layers' to 'layer'" in caplog.text
    assert str(path) in caplog.text
    # source positions follow the layers to their new key paths
    line = v1_lenet().splitlines().index("  type: CONVOLUTION") + 1
    assert smap.where(("layer", 2, "type")) == f"{path}:{line}:3"
    assert_is_modern_lenet(net)


def test_v1_lenet_upgrade_config_writes_modern_prototxt_and_yaml(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "lenet_v1.prototxt"
    src.write_text(v1_lenet())
    for out in ("lenet.prototxt", "lenet.yaml"):
        code, _, err = run(capsys, "upgrade-config", str(src), str(tmp_path / out))
        assert code == 0, err
        assert "upgraded V1 'layers' to 'layer'" in err
        text = (tmp_path / out).read_text()
        assert text.startswith("# Upgraded by `netforge upgrade-config` from lenet_v1.prototxt")
        assert "layers" not in text and "blobs_lr" not in text
        net, _ = load_net_param(tmp_path / out)
        assert_is_modern_lenet(net)


def test_v1_param_names_share_modes_loss_weights_and_rules() -> None:
    v1 = pb.V1LayerParameter()
    text_format.Parse("""
        name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
        param: "w" param: "b" blob_share_mode: PERMISSIVE blobs_lr: 0.5 weight_decay: 2
        loss_weight: 0.25 include { phase: TEST stage: "s" } exclude { min_level: 2 }
        inner_product_param { num_output: 3 } transform_param { mirror: true }
        loss_param { ignore_label: 4 }""", v1)
    lp = upgrade_v1_layer(v1)
    expected = pb.LayerParameter()
    text_format.Parse("""
        name: "ip" type: "InnerProduct" bottom: "x" top: "y"
        param { name: "w" share_mode: PERMISSIVE lr_mult: 0.5 decay_mult: 2 }
        param { name: "b" }
        loss_weight: 0.25 include { phase: TEST stage: "s" } exclude { min_level: 2 }
        inner_product_param { num_output: 3 } transform_param { mirror: true }
        loss_param { ignore_label: 4 }""", expected)
    assert lp == expected


def test_every_v1_type_maps_to_a_current_layer_or_a_known_gap() -> None:
    from netforge.layers import REGISTRY
    from netforge.upgrade import V1_TYPES

    assert set(V1_TYPES) == set(pb.V1LayerParameter.LayerType.values())
    missing = {t for t in V1_TYPES.values() if t and t not in REGISTRY}
    # data sources netforge does not read (HDF5, images, windows, memory)
    assert missing <= {"HDF5Data", "HDF5Output", "ImageData", "WindowData", "MemoryData"}


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int | float) -> bytes:
    """One protobuf field by Caffe's field number: varint, float (fixed32) or bytes."""
    if isinstance(payload, bytes):
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload
    if isinstance(payload, float):
        return _varint(number << 3 | 5) + struct.pack("<f", payload)
    return _varint(number << 3) + _varint(payload)


def test_binary_v1_net_from_caffe_field_numbers(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # A V1 .caffemodel written by hand: NetParameter.layers = 2; V1LayerParameter bottom = 2,
    # top = 3, name = 4, type = 5 (INNER_PRODUCT = 14), blobs = 6, blobs_lr = 7,
    # weight_decay = 8, inner_product_param = 17 (num_output = 1); BlobProto data = 5
    # (packed floats), shape = 7 (BlobShape dim = 1, packed int64).
    weights = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    blob = _field(7, _field(1, _varint(3) + _varint(2))) + _field(5, weights)
    bias = _field(7, _field(1, _varint(3))) + _field(5, struct.pack("<3f", 0.5, 0, -0.5))
    layer = (_field(4, b"ip") + _field(5, 14) + _field(2, b"x") + _field(3, b"y")
             + _field(6, blob) + _field(6, bias) + _field(7, 1.0) + _field(7, 2.0)
             + _field(8, 1.0) + _field(8, 0.0) + _field(17, _field(1, 3)))
    data = (_field(1, b"tiny") + _field(3, b"x") + _field(4, 1) + _field(4, 2)
            + _field(4, 1) + _field(4, 1) + _field(2, layer))
    path = tmp_path / "tiny_v1.caffemodel"
    path.write_bytes(data)
    net, _ = load_net_param(path)
    (lp,) = net.layer
    assert (lp.name, lp.type, list(lp.bottom), list(lp.top)) == ("ip", "InnerProduct",
                                                                ["x"], ["y"])
    assert [(p.lr_mult, p.decay_mult) for p in lp.param] == [(1, 1), (2, 0)]
    assert list(lp.blobs[0].data) == [1, 2, 3, 4, 5, 6]
    assert list(net.input) == ["x"] and list(net.input_dim) == [1, 2, 1, 1]
    built = Net(net, "TEST", verbose=False)
    assert built.blobs["y"].shape == (1, 3)
    built.close()

    code, _, err = run(capsys, "upgrade-config", str(path), str(tmp_path / "tiny.prototxt"))
    assert code == 0, err
    text = (tmp_path / "tiny.prototxt").read_text()
    assert 'type: "Input"' in text and "input_dim" not in text
    up, _ = load_net_param(tmp_path / "tiny.prototxt")
    assert [lp.type for lp in up.layer] == ["Input", "InnerProduct"]
    assert list(up.layer[0].input_param.shape[0].dim) == [1, 2, 1, 1]


def test_v1_data_layers_transformation_fields_move() -> None:
    net = pb.NetParameter()
    text_format.Parse("""
        layers { name: "d" type: DATA top: "data" top: "label"
                 data_param { source: "db" batch_size: 2 mean_file: "m.binaryproto"
                              crop_size: 3 mirror: true } }
        layers { name: "i" type: IMAGE_DATA top: "a" top: "b"
                 image_data_param { source: "list.txt" scale: 0.5 } }""", net)
    upgrade_net(net)
    d, i = net.layer
    assert d.transform_param == pb.TransformationParameter(mean_file="m.binaryproto",
                                                           crop_size=3, mirror=True)
    assert d.data_param == pb.DataParameter(source="db", batch_size=2)
    assert i.transform_param.scale == 0.5 and not i.image_data_param.HasField("scale")


def test_full_upgrade_moves_current_data_param_fields_and_inputs() -> None:
    net = pb.NetParameter()
    text_format.Parse("""
        input: "a" input_dim: 2 input_dim: 3 input_dim: 4 input_dim: 5
        layer { name: "d" type: "Data" top: "x" transform_param { scale: 2 }
                data_param { source: "db" scale: 3 mirror: true } }
        layer { name: "r" type: "ReLU" bottom: "a" top: "r" }""", net)
    notes = upgrade_net(net, full=True)
    assert any("data_param.mirror moved" in n for n in notes)
    assert [lp.name for lp in net.layer] == ["input", "d", "r"]
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 3, 4, 5]
    assert not net.input and not net.input_dim
    tp = net.layer[1].transform_param
    assert (tp.scale, tp.mirror) == (2, True)  # transform_param's own scale wins
    assert not net.layer[1].data_param.HasField("scale")


def test_mixed_layer_and_layers_is_refused(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mixed.prototxt"
    path.write_text('layer { name: "a" type: "ReLU" }\nlayers { name: "b" type: RELU }\n')
    code, _, err = run(capsys, "check", str(path))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"netforge: error: {path}:2:1: this net mixes 'layer' entries with legacy V1 'layers' "
        "entries; use one form (netforge upgrade-config converts 'layers')")


# -- V0 ---------------------------------------------------------------------------------------

V0_NET = """
name: "v0"
input: "data"
input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
layers { layer { name: "pad1" type: "padding" pad: 1 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 1 group: 1
                 blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
                 weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" } }
         bottom: "pad1" top: "conv1" }
layers { layer { name: "relu1" type: "relu" } bottom: "conv1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 }
         bottom: "conv1" top: "pool1" }
layers { layer { name: "norm1" type: "lrn" local_size: 3 alpha: 0.0001 beta: 0.75 }
         bottom: "pool1" top: "norm1" }
layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.25 }
         bottom: "norm1" top: "norm1" }
layers { layer { name: "ip" type: "innerproduct" num_output: 5 biasterm: false }
         bottom: "norm1" top: "ip" }
layers { layer { name: "prob" type: "softmax" } bottom: "ip" top: "prob" }
"""


def test_v0_net_upgrades_and_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "v0.prototxt"
    path.write_text(V0_NET)
    with caplog.at_level(logging.WARNING, logger="netforge"):
        net, _ = load_net_param(path)
    assert "upgraded V0" in caplog.text and "upgraded V1 'layers' to 'layer'" in caplog.text
    expected = pb.NetParameter()
    text_format.Parse("""
        name: "v0" input: "data" input_dim: 2 input_dim: 3 input_dim: 8 input_dim: 8
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
                param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
                convolution_param { num_output: 4 pad: 1 kernel_size: 3 stride: 1 group: 1
                                    weight_filler { type: "gaussian" std: 0.01 }
                                    bias_filler { type: "constant" } } }
        layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
        layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
                pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
        layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
                lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
        layer { name: "drop" type: "Dropout" bottom: "norm1" top: "norm1"
                dropout_param { dropout_ratio: 0.25 } }
        layer { name: "ip" type: "InnerProduct" bottom: "norm1" top: "ip"
                inner_product_param { num_output: 5 bias_term: false } }
        layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }""", expected)
    assert net == expected
    built = Net(path, "TEST", verbose=False)
    assert built.blobs["conv1"].shape == (2, 4, 8, 8)  # the padding layer's pad kept the size
    assert built.blobs["prob"].shape == (2, 5)
    built.close()

    code, out, err = run(capsys, "check", str(path))
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:-4] if line}
    assert rows["input"][:5] == ["input", "Input", "-", "->", "data"]
    assert rows["conv1"][:7] == ["conv1", "Convolution", "data", "->", "conv1", "2x4x8x8",
                                 f"{4 * 3 * 9 + 4}"]


def test_v0_unknown_type_is_located(tmp_path: Path) -> None:
    path = tmp_path / "v0.prototxt"
    path.write_text('input: "x"\nlayers {\n  layer { name: "q" type: "quantum" }\n'
                    '  bottom: "x" top: "y" }\n')
    with pytest.raises(ConfigError, match="unknown V0 layer type 'quantum'") as e:
        load_net_param(path)
    assert e.value.where == f"{path}:3:21"  # its type key


# -- solvers ----------------------------------------------------------------------------------


def test_solver_type_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "old_solver.prototxt"
    src.write_text('net: "lenet.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                   "solver_type: ADAM\ntest_net_param { layers { name: \"r\" type: RELU } }\n")
    code, _, err = run(capsys, "upgrade-config", str(src), str(tmp_path / "new.yaml"))
    assert code == 0, err
    assert 'solver_type (enum) became type: "Adam"' in err
    assert "the net file 'lenet.prototxt' is not upgraded here" in err
    sp, _ = load_solver_param(tmp_path / "new.yaml")
    assert sp.type == "Adam" and not sp.HasField("solver_type")
    assert sp.test_net_param[0].layer[0].type == "ReLU" and not sp.test_net_param[0].layers

    both = pb.SolverParameter(type="SGD", solver_type=pb.SolverParameter.NESTEROV)
    with pytest.raises(ConfigError, match="not both"):
        upgrade_solver(both)
    for kind, name in ((pb.SolverParameter.SGD, "SGD"), (pb.SolverParameter.ADAGRAD, "AdaGrad"),
                       (pb.SolverParameter.RMSPROP, "RMSProp")):
        sp = pb.SolverParameter(solver_type=kind)
        upgrade_solver(sp)
        assert sp.type == name


def test_upgrade_config_of_a_current_file_changes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "same.prototxt"
    code, _, err = run(capsys, "upgrade-config", str(ROOT / "models/lenet_train_test.yaml"),
                       str(out))
    assert code == 0, err
    assert "already in the current form" in err
    assert load_net_param(out)[0] == modern_lenet()


# -- convert-config ---------------------------------------------------------------------------

CONFIGS = sorted([*ROOT.glob("models/*.prototxt"), *ROOT.glob("models/*.yaml"),
                  *ROOT.glob("solvers/*"), *ROOT.glob("tests/fixtures/caffe/*.prototxt")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_convert_config_round_trip(path: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    kind = detect_kind(path)
    assert kind == ("solver" if "solver" in path.name else "net")
    load = load_solver_param if kind == "solver" else load_net_param
    original = load(path)[0]
    other = ".prototxt" if path.suffix == ".yaml" else ".yaml"
    there, back = tmp_path / f"there{other}", tmp_path / f"back{path.suffix}"
    assert run(capsys, "convert-config", str(path), str(there))[0] == 0
    assert run(capsys, "convert-config", str(there), str(back))[0] == 0
    assert load(there)[0] == original
    assert load(back)[0] == original


def test_convert_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "n.prototxt"
    src.write_text('name: "n"\nlayer { name: "a" type: "ReLU" zzz: 1 }\n')
    code, _, err = run(capsys, "convert-config", str(src), str(tmp_path / "n.yaml"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"netforge: error: {src}:2:32: unknown field 'zzz' in LayerParameter")
    code, _, err = run(capsys, "convert-config", str(src), str(src))
    assert code == 2 and "the output is the input file" in err
    solver = tmp_path / "s.yaml"
    solver.write_text("base_lr: 0.1\nlr_polcy: fixed\n")
    code, _, err = run(capsys, "convert-config", str(solver), str(tmp_path / "s.prototxt"))
    assert code == 2
    assert f"{solver}:2:1: unknown field 'lr_polcy' in SolverParameter" in err
    assert "(did you mean 'lr_policy'?)" in err
    code, _, err = run(capsys, "convert-config", "--kind", "net", str(solver),
                       str(tmp_path / "s.prototxt"))
    assert code == 2 and "unknown field 'base_lr' in NetParameter" in err


# -- check ------------------------------------------------------------------------------------

LENET_TRAIN = [  # name, type, bottoms -> tops, top shapes, params
    ("mnist", "Data", "- -> data, label", "64x1x28x28, 64", 0),
    ("conv1", "Convolution", "data -> conv1", "64x20x24x24", 520),
    ("pool1", "Pooling", "conv1 -> pool1", "64x20x12x12", 0),
    ("conv2", "Convolution", "pool1 -> conv2", "64x50x8x8", 25050),
    ("pool2", "Pooling", "conv2 -> pool2", "64x50x4x4", 0),
    ("ip1", "InnerProduct", "pool2 -> ip1", "64x500", 400500),
    ("relu1", "ReLU", "ip1 -> ip1", "64x500", 0),
    ("ip2", "InnerProduct", "ip1 -> ip2", "64x10", 5010),
    ("loss", "SoftmaxWithLoss", "ip2, label -> loss", "scalar", 0),
]


def test_check_lenet_solver_tables(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kind, changes, summaries = check_config("solvers/lenet_solver.prototxt")
    assert kind == "solver" and not changes
    train, test = summaries
    rows = [(r.name, r.type, f"{', '.join(r.bottoms) or '-'} -> {', '.join(r.tops)}",
             ", ".join("x".join(map(str, s)) or "scalar" for s in r.shapes), r.params)
            for r in train.rows]
    assert [r[0] for r in rows] == ["mnist", "conv1", "pool1", "conv2", "pool2", "ip1",
                                    "relu1", "ip2", "loss"]
    assert rows == LENET_TRAIN
    assert train.params == 431080
    counts = [64 * 784 + 64, 64 * 20 * 576, 64 * 20 * 144, 64 * 50 * 64, 64 * 50 * 16,
              64 * 500, 64 * 500, 64 * 10, 1]
    assert train.memory == 4 * sum(counts)
    assert train.outputs == ["loss"] and train.loss_outputs == ["loss"]
    assert [r.name for r in test.rows] == ["mnist", "label_mnist_1_split", "conv1", "pool1",
                                           "conv2", "pool2", "ip1", "relu1", "ip2",
                                           "ip2_ip2_0_split", "accuracy", "loss"]
    assert test.rows[0].shapes == [(100, 1, 28, 28), (100,)]
    assert test.params == 431080
    assert test.outputs == ["accuracy", "loss"]

    code, out, err = run(capsys, "check", "solvers/lenet_solver.yaml", "--set", "max_iter=7")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Override: max_iter = 7 (was 10000)"
    assert lines[1] == "train net of solvers/lenet_solver.yaml (TRAIN)"
    assert lines[2].split() == ["layer", "type", "bottoms", "->", "tops", "top", "shapes",
                                "params", "memory"]
    conv1 = next(line for line in lines if line.startswith("conv1 "))
    assert conv1.split() == ["conv1", "Convolution", "data", "->", "conv1", "64x20x24x24",
                             "520", "2.81", "MiB"]
    totals = [line for line in lines if line.startswith("Total: ")]
    assert totals[0] == (f"Total: 9 layers, 431,080 parameters, 4.93 MiB of top blobs "
                         f"({4 * sum(counts):,} bytes)")
    assert len(totals) == 2 and "test net #0 of solvers/lenet_solver.yaml (TEST)" in out
    assert "Outputs: accuracy, loss (loss)" in out
    assert lines[-1] == "solvers/lenet_solver.yaml: solver OK (2 nets built)"


def test_check_net_phases_and_overrides(workspace: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, _, summaries = check_config("models/lenet_train_test.yaml")
    assert [s.title for s in summaries] == ["models/lenet_train_test.yaml (TRAIN)",
                                            "models/lenet_train_test.yaml (TEST)"]
    _, changes, summaries = check_config("models/lenet_train_test.yaml", phase="test",
                                         overrides=["name=Other"])
    assert changes == [("name", "LeNet", "Other")] and len(summaries) == 1
    text = format_summary(summaries[0])
    assert text.startswith("models/lenet_train_test.yaml (TEST)\n")
    assert "Total: 12 layers, 431,080 parameters" in text
    row = next(line for line in text.splitlines() if line.startswith("accuracy "))
    assert row.split()[:6] == ["accuracy", "Accuracy", "ip2_ip2_0_split_0,",
                               "label_mnist_1_split_0", "->", "accuracy"]
    code, out, err = run(capsys, "check", "models/lenet_train_test.prototxt", "--phase",
                         "TRAIN")
    assert code == 0, err
    assert out.count("Total: ") == 1 and "(TRAIN)" in out and "(TEST)" not in out
    code, out, _ = run(capsys, "check", "solvers/lenet_solver.yaml", "--phase", "TEST")
    assert code == 0 and out.count("Total: ") == 1 and "test net #0" in out


def test_check_errors_exit_2(workspace: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    def last(*args: str) -> str:
        code, _, err = run(capsys, "check", *args)
        assert code == 2, err
        assert "Traceback" not in err
        return err.strip().splitlines()[-1]

    assert last("models/lenet_train_test.yaml", "--set", "nmae=x") == (
        "netforge: error: --set nmae=x: unknown field 'nmae' in NetParameter (at NetParameter) "
        "(did you mean 'name'?)")
    assert last("solvers/lenet_solver.yaml", "--set", "lr_policy=sometimes").startswith(
        "netforge: error: solvers/lenet_solver.yaml:")
    Path("data/mnist/mnist_test_lmdb").rename("data/mnist/elsewhere")
    assert last("solvers/lenet_solver.yaml") == (
        "netforge: error: models/lenet_train_test.yaml:12:5: layer 'mnist' (Data): data source "
        "not found: data/mnist/mnist_test_lmdb")
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer { name: "c" type: "Convolution" bottom: "nowhere" '
                   'top: "c" }\n')
    assert last(str(bad)).startswith(f"netforge: error: {bad}:2:")
    assert "nowhere" in last(str(bad))
    assert last(str(tmp_path / "missing.yaml")) == (
        f"netforge: error: {tmp_path / 'missing.yaml'}: config file not found")


def test_check_v1_net_builds_like_the_modern_one(workspace: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    Path("lenet_v1.prototxt").write_text(v1_lenet().replace("examples/", "data/"))
    code, out, err = run(capsys, "check", "lenet_v1.prototxt")
    assert code == 0, err
    assert "upgraded V1 'layers' to 'layer'" in err
    code, modern, _ = run(capsys, "check", "models/lenet_train_test.prototxt")
    assert out.replace("lenet_v1.prototxt", "X") == modern.replace(
        "models/lenet_train_test.prototxt", "X")
