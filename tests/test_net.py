"""Net semantics (Caffe's net.cpp and insert_splits.cpp): filtering, Split insertion and naming,
in-place tops, outputs, loss weights, need-backward, param sharing and located build errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from netforge import Net
from netforge.backend import NumpyBackend
from netforge.config import load_net_param
from netforge.errors import ConfigError
from netforge.net import insert_splits
from netforge.proto import pb
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "caffe"


def net_param(text: str) -> pb.NetParameter:
    p = pb.NetParameter()
    text_format.Parse(text, p)
    return p


def build(text: str, phase: str = "TRAIN", **kw) -> Net:
    return Net(net_param(text), phase, verbose=False, **kw)


# -- LeNet ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["models/lenet_train_test.yaml",
                                   "models/lenet_train_test.prototxt"])
def test_lenet_test_net_splits_and_outputs(workspace: Path, model: str) -> None:
    net = Net(model, "TEST", verbose=False)
    try:
        assert net.layer_names == [
            "mnist", "label_mnist_1_split", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1",
            "ip2", "ip2_ip2_0_split", "accuracy", "loss"]
        split = net.layer_by_name["label_mnist_1_split"]
        assert net.top_names[split] == ["label_mnist_1_split_0", "label_mnist_1_split_1"]
        assert net.bottom_names[net.layer_by_name["accuracy"]] == [
            "ip2_ip2_0_split_0", "label_mnist_1_split_0"]
        assert net.bottom_names[net.layer_by_name["loss"]] == [
            "ip2_ip2_0_split_1", "label_mnist_1_split_1"]
        assert net.outputs == ["accuracy", "loss"]
        out = net.forward()
        assert list(out) == ["accuracy", "loss"]
        assert net.blobs["data"].shape == (100, 1, 28, 28)
        assert 0.0 <= float(out["accuracy"]) <= 1.0
        assert net.loss == pytest.approx(float(out["loss"]))
        # An untrained 10-class softmax starts near log(10).
        assert 1.5 < net.loss < 3.5
    finally:
        net.close()


def test_lenet_train_net_has_no_splits_and_in_place_relu(workspace: Path) -> None:
    net = Net("models/lenet_train_test.yaml", "TRAIN", verbose=False)
    try:
        assert "Split" not in [lp.type for lp in net.layer_params]
        assert net.outputs == ["loss"]
        relu = net.layer_by_name["relu1"]
        assert net.top_vecs[relu][0] is net.bottom_vecs[relu][0] is net.blobs["ip1"]
        assert [n for n in net.params] == ["conv1", "conv2", "ip1", "ip2"]
        assert [b.shape for b in net.params["conv1"]] == [(20, 1, 5, 5), (20,)]
        assert [b.shape for b in net.params["ip1"]] == [(500, 800), (500,)]
        assert [(p.layer, p.lr_mult) for p in net.learnable_params][:2] == [
            ("conv1", 1.0), ("conv1", 2.0)]
        # need-backward: the data layer never; the label input of the loss never.
        assert net.layer_need_backward == [False, True, True, True, True, True, True, True, True]
        loss = net.layer_by_name["loss"]
        assert net.bottom_need_backward[loss] == [True, False]
        assert net.bottom_need_backward[net.layer_by_name["conv1"]] == [False]
    finally:
        net.close()


def test_yaml_and_prototxt_are_the_same_net() -> None:
    a, _ = load_net_param(ROOT / "models" / "lenet_train_test.yaml")
    b, _ = load_net_param(ROOT / "models" / "lenet_train_test.prototxt")
    assert a == b


def test_upstream_caffe_lenet_loads_unchanged(workspace: Path) -> None:
    """Caffe's own example file: only its data paths point elsewhere."""
    param, _ = load_net_param(FIXTURES / "lenet_train_test.prototxt")
    ours, _ = load_net_param("models/lenet_train_test.prototxt")
    for layer in param.layer:
        if layer.type == "Data":
            layer.data_param.source = layer.data_param.source.replace("examples/", "data/")
    assert param == ours
    net = Net(param, "TEST", verbose=False)
    net.forward()
    net.close()


def test_upstream_deploy_lenet_with_input_layer() -> None:
    net = Net(FIXTURES / "lenet.prototxt", "TEST", verbose=False)
    assert net.inputs == ["data"]
    assert net.outputs == ["prob"]
    x = np.random.default_rng(0).random((64, 1, 28, 28))
    prob = net.forward(data=x)["prob"]
    assert prob.shape == (64, 10)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)


# -- filtering ------------------------------------------------------------------------------------

STAGED = """
name: "staged"
layer { name: "in" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss"
        include { phase: TRAIN } include { phase: TEST stage: "with-softmax" } }
layer { name: "acc" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "acc"
        exclude { phase: TRAIN } }
layer { name: "deep" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "deep"
        include { min_level: 2 } }
layer { name: "shallow" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "shallow"
        include { max_level: 0 not_stage: "quiet" } }
"""


def names(net: Net) -> list[str]:
    return [n for n in net.layer_names if not n.endswith("_split")]


def test_include_exclude_rules_as_caffe_test_solver() -> None:
    assert names(build(STAGED, "TRAIN")) == ["in", "loss", "shallow"]
    assert names(build(STAGED, "TEST", stages=["with-softmax"])) == [
        "in", "loss", "acc", "shallow"]
    assert names(build(STAGED, "TEST")) == ["in", "acc", "shallow"]
    assert names(build(STAGED, "TEST", level=2)) == ["in", "acc", "deep"]
    assert names(build(STAGED, "TEST", stages=["quiet"])) == ["in", "acc"]


def test_include_and_exclude_together_is_an_error() -> None:
    text = STAGED.replace('exclude { phase: TRAIN }', 'exclude { phase: TRAIN } include {}')
    with pytest.raises(ConfigError, match="both include and exclude"):
        build(text)


# -- splits and loss weights ----------------------------------------------------------------------

SPLIT = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "a" type: "EuclideanLoss" bottom: "data" bottom: "label" top: "a" }
layer { name: "b" type: "EuclideanLoss" bottom: "data" bottom: "label" top: "b" }
"""


def test_split_naming_as_caffe_test_split_layer() -> None:
    net = build(SPLIT)
    assert net.layer_names == ["data", "data_data_0_split", "label_data_1_split", "a", "b"]
    assert net.top_names[1] == ["data_data_0_split_0", "data_data_0_split_1"]
    assert net.top_names[2] == ["label_data_1_split_0", "label_data_1_split_1"]
    assert net.bottom_names[3] == ["data_data_0_split_0", "label_data_1_split_0"]
    assert net.bottom_names[4] == ["data_data_0_split_1", "label_data_1_split_1"]


def test_split_of_a_top_with_loss_weight() -> None:
    text = """
    layer { name: "data" type: "DummyData" top: "data"
            dummy_data_param { shape { dim: 2 dim: 3 } data_filler { type: "gaussian" } } }
    layer { name: "innerproduct1" type: "InnerProduct" bottom: "data" top: "innerproduct1"
            loss_weight: 2.5 inner_product_param { num_output: 4
            weight_filler { type: "gaussian" } } }
    layer { name: "innerproduct2" type: "InnerProduct" bottom: "innerproduct1" top: "ip2"
            inner_product_param { num_output: 1 } }
    """
    param = net_param(text)
    layers = insert_splits(list(enumerate(param.layer)))
    split = layers[2][1]
    assert split.name == "innerproduct1_innerproduct1_0_split"
    assert list(split.loss_weight) == [2.5, 0.0]
    assert list(layers[1][1].loss_weight) == [0.0]
    net = build(text)
    net.forward()
    expected = 2.5 * float(net.blobs["innerproduct1"].data.sum())
    assert net.loss == pytest.approx(expected, rel=1e-5)


def test_loss_is_weighted_sum_and_loss_weight_defaults() -> None:
    text = """
    layer { name: "data" type: "DummyData" top: "x" top: "y" top: "z"
            dummy_data_param { shape { dim: 4 dim: 3 } data_filler { type: "gaussian" } } }
    layer { name: "l1" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "l1" }
    layer { name: "l2" type: "EuclideanLoss" bottom: "x" bottom: "z" top: "l2" loss_weight: 3 }
    layer { name: "l3" type: "EuclideanLoss" bottom: "y" bottom: "z" top: "l3" loss_weight: 0 }
    """
    net = build(text)
    out = net.forward()
    assert net.loss_weights[-3:] == [[1.0], [3.0], [0.0]]
    assert net.output_weight("l2") == 3.0
    assert net.loss == pytest.approx(float(out["l1"]) + 3 * float(out["l2"]), rel=1e-6)
    # l3 has weight 0: nothing under it needs backward.
    assert net.layer_need_backward[-1] is False


def test_forward_reshapes_a_layer_only_when_a_shape_changed(monkeypatch) -> None:
    text = """
    input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }
    input: "s" input_shape { dim: 2 dim: 1 }
    layer { name: "pool" type: "Pooling" bottom: "x" top: "p"
            pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
    layer { name: "keep" type: "Filter" bottom: "p" bottom: "s" top: "f" }
    """
    net = build(text, "TEST")
    calls: dict[str, int] = {}
    for layer in net.layers:
        original = layer.reshape

        def counted(bottom, top, original=original, name=layer.name) -> None:
            calls[name] = calls.get(name, 0) + 1
            original(bottom, top)

        monkeypatch.setattr(layer, "reshape", counted)
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    net.forward(x=x, s=np.array([[1.0], [1.0]]))
    net.forward(x=x, s=np.array([[0.0], [1.0]]))
    # Pooling's shapes did not change: one reshape. Filter's top follows the selector's
    # values, so it is reshaped before every forward, as Caffe reshapes every layer.
    assert (calls["pool"], calls["keep"]) == (1, 2)
    assert net.blobs["f"].shape == (1, 3, 2, 2)
    np.testing.assert_array_equal(net.blobs["f"].data[0], x[1, :, 1::2, 1::2])
    # a new input shape reaches the layers below it
    net.forward(x=np.zeros((2, 3, 6, 6), np.float32), s=np.array([[1.0], [1.0]]))
    assert (calls["pool"], calls["keep"]) == (2, 3)
    assert net.blobs["p"].shape == (2, 3, 3, 3) and net.blobs["f"].shape == (2, 3, 3, 3)
    # a top reshaped from outside is shaped again by its layer
    net.blobs["p"].reshape((1, 1, 1, 1))
    net.forward(x=np.zeros((2, 3, 6, 6), np.float32), s=np.array([[1.0], [1.0]]))
    assert calls["pool"] == 3 and net.blobs["p"].shape == (2, 3, 3, 3)


def test_loss_layer_without_top_gets_anonymous_top() -> None:
    text = """
    layer { name: "data" type: "DummyData" top: "x" top: "y"
            dummy_data_param { shape { dim: 4 dim: 3 } data_filler { type: "gaussian" } } }
    layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" }
    """
    net = build(text)
    net.forward()
    assert net.outputs == []
    x, y = net.blobs["x"].data, net.blobs["y"].data
    assert net.loss == pytest.approx(float(((x - y) ** 2).sum() / 8), rel=1e-5)


# -- need backward --------------------------------------------------------------------------------

FROZEN = """
force_backward: %s
layer { name: "input" type: "Input" top: "x" top: "y"
        input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "h"
        param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "h" bottom: "y" top: "loss" }
"""


def test_frozen_layers_need_no_backward_unless_forced() -> None:
    net = build(FROZEN % "false")
    # Nothing below the loss learns or needs a gradient, so nothing runs backward.
    assert net.layer_need_backward == [False, False, False]
    assert net.bottom_need_backward[2] == [False, False]
    forced = build(FROZEN % "true")
    assert forced.layer_need_backward == [False, True, True]
    assert forced.bottom_need_backward[1] == [True]
    # EuclideanLoss allows force_backward to both bottoms (other losses refuse labels).
    assert forced.bottom_need_backward[2] == [True, True]
    rng = np.random.default_rng(0)
    forced.forward(x=rng.normal(size=(2, 3)), y=rng.normal(size=(2, 4)))
    forced.backward()
    assert np.abs(forced.blobs["x"].diff).sum() > 0


def test_propagate_down_stops_a_bottom() -> None:
    text = (FROZEN % "false").replace('param { lr_mult: 0 } param { lr_mult: 0 }', "").replace(
        'top: "loss" }', 'top: "loss" propagate_down: false propagate_down: true }')
    net = build(text)
    assert net.bottom_need_backward[2] == [False, True]
    # Nothing reaches ip through its top any more, so it is skipped.
    assert net.layer_need_backward[1] is False


# -- param sharing --------------------------------------------------------------------------------

SHARED = """
layer { name: "data" type: "DummyData" top: "data"
        dummy_data_param { shape { dim: 4 dim: 5 } data_filler { type: "gaussian" } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" }
                              bias_filler { type: "gaussian" } } }
layer { name: "ip2" type: "InnerProduct" bottom: "data" top: "ip2"
        param { name: "w" } param { name: "b" }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" }
                              bias_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip1" bottom: "ip2" top: "loss" }
"""


def test_shared_weights_give_zero_loss_and_summed_diffs() -> None:
    net = Net(net_param(SHARED), "TRAIN", verbose=False, backend=NumpyBackend("float64"))
    assert net.params["ip1"][0] is net.params["ip2"][0]
    assert len(net.learnable_params) == 2
    net.forward()
    assert net.loss == 0.0
    # Backward through each layer in turn: the shared diff accumulates both contributions.
    net.clear_param_diffs()
    net.forward()
    net.blobs["ip1"].diff[...] = 1.0
    net.blobs["ip2"].diff[...] = 2.0
    ip1, ip2 = (net.layer_by_name[n] for n in ("ip1", "ip2"))
    net.layers[ip1].backward(net.top_vecs[ip1], [False], net.bottom_vecs[ip1])
    d1 = net.params["ip1"][0].diff.copy()
    net.layers[ip2].backward(net.top_vecs[ip2], [False], net.bottom_vecs[ip2])
    x = net.bottom_vecs[ip1][0].data
    np.testing.assert_allclose(d1, np.ones((4, 3)).T @ x)
    np.testing.assert_allclose(net.params["ip1"][0].diff, 3 * np.ones((4, 3)).T @ x)


def test_sharing_needs_matching_shapes() -> None:
    bad = SHARED.replace('top: "ip2"\n        param { name: "w" } param { name: "b" }\n'
                         '        inner_product_param { num_output: 3',
                         'top: "ip2"\n        param { name: "w" } param { name: "b" }\n'
                         '        inner_product_param { num_output: 2')
    assert bad != SHARED
    with pytest.raises(ConfigError, match=r"cannot share param 'w'.*shapes differ"):
        build(bad)


# -- weights --------------------------------------------------------------------------------------


def test_save_and_copy_from_by_layer_name(tmp_path: Path) -> None:
    a = build(SHARED)
    path = tmp_path / "w.npz"
    a.save(path)
    b = build(SHARED.replace("ip1", "ipX"), seed=5)
    loaded, ignored = b.copy_from(path)
    assert loaded == ["ip2"] and ignored == ["ip1"]
    np.testing.assert_array_equal(b.params["ip2"][0].data, a.params["ip2"][0].data)


def test_copy_from_shape_mismatch_is_located(tmp_path: Path) -> None:
    a = build(SHARED)
    path = tmp_path / "w.npz"
    a.save(path)
    b = build(SHARED.replace("num_output: 3", "num_output: 2"))
    with pytest.raises(ConfigError, match=r"w.npz: cannot copy param 0 weights from layer "):
        b.copy_from(path)


# -- build errors ---------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


BASE_YAML = """\
name: tiny
layer:
  - name: data
    type: DummyData
    top: [x, y]
    dummy_data_param:
      shape: [{dim: [2, 3]}, {dim: [2, 3]}]
  - name: loss
    type: EuclideanLoss
    bottom: [x, y]
    top: loss
"""


@pytest.mark.parametrize(("edit", "message"), [
    (("type: EuclideanLoss", "type: EuclidianLoss"),
     r"tiny.yaml:9:5: layer 'loss': unknown layer type 'EuclidianLoss' "
     r"\(did you mean 'EuclideanLoss'\?\)"),
    (("bottom: [x, y]", "bottom: [x, yy]"),
     r"tiny.yaml:10:17: layer 'loss' \(EuclideanLoss\): unknown bottom blob 'yy' \(bottom 1\).*"
     r"\(did you mean 'y'\?\)"),
    (("top: loss", "top: y"),
     r"tiny.yaml:11:10: layer 'loss': top blob 'y' is already produced by layer 'data'"),
    (("shape: [{dim: [2, 3]}, {dim: [2, 3]}]", "shape: [{dim: [2, 3]}, {dim: [2, 4]}]"),
     r"tiny.yaml:8:5: layer 'loss' \(EuclideanLoss\): .*\(bottoms: x \(2, 3\), y \(2, 4\)\)"),
    (("top: loss", "top: loss\n    loss_weight: [1, 2]"),
     r"tiny.yaml:12:19: layer 'loss': loss_weight must be unspecified or given once per top"),
])
def test_build_errors_are_located(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    path = write(tmp_path, "tiny.yaml", BASE_YAML.replace(*edit))
    with pytest.raises(ConfigError, match=message):
        Net(path, "TRAIN", verbose=False)


def test_good_base_yaml_builds(tmp_path: Path) -> None:
    net = Net(write(tmp_path, "tiny.yaml", BASE_YAML), "TRAIN", verbose=False)
    assert net.outputs == ["loss"]


def test_prototxt_build_error_is_located(tmp_path: Path) -> None:
    text = 'name: "t"\nlayer {\n  name: "ip"\n  type: "InnerProduct"\n  bottom: "dat"\n}\n'
    path = write(tmp_path, "t.prototxt", text)
    with pytest.raises(ConfigError, match=r"t.prototxt:5:3: layer 'ip' \(InnerProduct\): "
                                          r"unknown bottom blob 'dat'"):
        Net(path, "TRAIN", verbose=False)


def test_legacy_v1_layers_are_upgraded_and_build(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    text = ('input: "x" input_dim: 2 input_dim: 3 input_dim: 1 input_dim: 1\n'
            'layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y" blobs_lr: 1 '
            'blobs_lr: 2 weight_decay: 1 weight_decay: 0 inner_product_param { num_output: 4 } }\n'
            'layers { name: "r" type: RELU bottom: "y" top: "y" }\n')
    path = write(tmp_path, "v1.prototxt", text)
    with caplog.at_level(logging.WARNING, logger="netforge"):
        net = Net(path, "TRAIN", verbose=False)
    assert "upgraded V1 'layers' to 'layer'" in caplog.text
    assert net.layer_names == ["input", "ip", "r"]
    assert [lp.type for lp in net.layer_params] == ["Input", "InnerProduct", "ReLU"]
    assert net.blobs["y"].shape == (2, 4)
    assert [(p.lr_mult, p.decay_mult) for p in net.learnable_params] == [(1, 1), (2, 0)]
    # a V1 NetParameter given directly (e.g. a solver's inline net) is upgraded as well
    param = pb.NetParameter()
    text_format.Parse(text, param)
    assert Net(param, "TEST", verbose=False).layer_names == ["input", "ip", "r"]


def test_deploy_net_reads_trained_weights(workspace: Path, tmp_path: Path) -> None:
    test_net = Net("models/lenet_train_test.yaml", "TEST", verbose=False, seed=3)
    try:
        test_net.save(tmp_path / "w.npz")
        test_net.forward()
        x = test_net.blobs["data"].data[:64].copy()
        logits = test_net.blobs["ip2"].data[:64]
    finally:
        test_net.close()
    deploy = Net("models/lenet_deploy.yaml", "TEST", weights=tmp_path / "w.npz", verbose=False)
    prob = deploy.forward(data=x)["prob"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(prob, e / e.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)


# -- MAX pooling inside the convolution before it --------------------------------------------------

POOLED = """
force_backward: true
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 6 dim: 2 dim: 16 dim: 16 } shape { dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 5 weight_filler { type: "xavier" }
                            bias_filler { type: "gaussian" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 5 kernel_size: 3 pad: 2 weight_filler { type: "xavier" }
                            bias_filler { type: "gaussian" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: %s kernel_size: 3 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool2" top: "ip"
        inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def _two_workers(dtype: str = "float64") -> NumpyBackend:
    backend = NumpyBackend(dtype, workers=2)
    if backend.workers != 2 or not backend.fuses_conv(dtype):
        pytest.skip("needs numba, NumPy's OpenBLAS and per-thread BLAS control")
    backend.parallel_min = 0  # split even this small net
    backend.compiled_min = 0
    return backend


def _pooled_run(monkeypatch: pytest.MonkeyPatch, fuse: bool, phase: str = "TRAIN",
                method: str = "MAX", dtype: str = "float64", force: bool = True,
                ) -> tuple[Net, dict[str, int], list[bytes]]:
    """A pass of POOLED with the fusion on or off: the net, the Pooling layers' own
    forward/backward calls, and every blob's data and diff and every parameter gradient.
    Without ``force`` the first convolution makes no bottom gradient (as in LeNet)."""
    from netforge.layers.vision import Pooling

    monkeypatch.setattr(Net, "FUSE_POOLING", fuse)
    calls = {"forward": 0, "backward": 0}

    def counting(name: str) -> Any:
        original = getattr(Pooling, name)

        def counted(self: Pooling, *args: Any) -> None:
            calls[name] += 1
            original(self, *args)
        return counted

    for name in calls:
        monkeypatch.setattr(Pooling, name, counting(name))
    text = POOLED % method if force else (POOLED % method).replace("force_backward: true", "")
    net = Net(net_param(text), phase, backend=_two_workers(dtype), verbose=False, seed=5)
    rng = np.random.default_rng(3)
    net.forward(data=rng.normal(size=(6, 2, 16, 16)), label=rng.integers(0, 3, size=6))
    if phase == "TRAIN":
        net.backward()
    bits = [a.tobytes() for b in net.blobs.values() for a in (b.data, b.diff)]
    bits += [p.blob.diff.tobytes() for p in net.learnable_params]
    return net, calls, bits


@pytest.mark.parametrize(("dtype", "force"), [("float64", True), ("float32", True),
                                             ("float32", False)])
def test_convolution_pools_inside_its_own_pass(monkeypatch: pytest.MonkeyPatch, dtype: str,
                                                force: bool) -> None:
    """A Convolution whose top only a MAX Pooling reads makes the pooling's forward and
    backward inside its own (LeNet's two pairs; here the stacked 2x2 planes and a CEIL
    overhang): the Pooling layers' own passes do not run, and every blob's data and diff and
    every gradient have the bits of the two layers run one after the other."""
    net, calls, fused = _pooled_run(monkeypatch, True, dtype=dtype, force=force)
    assert net._pooling_after == {1: 2, 3: 4}
    assert calls == {"forward": 0, "backward": 0}
    assert net.bottom_need_backward[1] == [force]
    _, calls, apart = _pooled_run(monkeypatch, False, dtype=dtype, force=force)
    assert calls == {"forward": 2, "backward": 2}
    assert fused == apart
    # TEST: the values alone, no argmax kept
    net, calls, fused = _pooled_run(monkeypatch, True, "TEST", dtype=dtype)
    assert calls["forward"] == 0
    assert all(layer._argmax is None for layer in net.layers if layer.type == "Pooling")
    assert fused == _pooled_run(monkeypatch, False, "TEST", dtype=dtype)[2]


def test_pooling_the_convolution_cannot_take_runs_on_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """AVE pooling after a convolution is paired but runs its own passes (the convolution
    pools MAX only), with the same results; a part of a forward, or a convolution top that
    another layer reads too, or a pooling with a mask top, runs the layers apart."""
    net, calls, fused = _pooled_run(monkeypatch, True, method="AVE")
    assert net._pooling_after == {1: 2, 3: 4}
    assert calls == {"forward": 1, "backward": 1}  # pool1 inside conv1, pool2 on its own
    assert fused == _pooled_run(monkeypatch, False, method="AVE")[2]
    # forward in two halves, split between conv2 and pool2: the pooling runs its own
    net, calls, _ = _pooled_run(monkeypatch, True)
    before = net.blobs["pool2"].data.copy()
    net.blobs["pool2"].data[...] = 0
    net.forward(end=3)
    assert calls["forward"] == 0 and not net.blobs["pool2"].data.any()
    net.forward(start=4)
    assert calls["forward"] == 1 and net.blobs["pool2"].data.tobytes() == before.tobytes()
    # a layer whose passes were wrapped on the instance (debug_info does) sees them called
    seen: list[str] = []
    pool1 = net.layers[2]
    inner = pool1.forward

    def logged(bottom: Any, top: Any) -> None:
        seen.append("pool1")
        inner(bottom, top)

    pool1.forward = logged
    net.forward()
    net.backward()
    assert seen == ["pool1"] and calls == {"forward": 2, "backward": 1}  # pool2 still inside
    # no pairs: conv1's top read by two layers, pool2 with a mask top
    text = (POOLED % "MAX").replace(
        'top: "pool2"\n', 'top: "pool2" top: "mask"\n').replace(
        'layer { name: "loss"', 'layer { name: "quiet" type: "Silence" bottom: "conv1" }\n'
                                'layer { name: "loss"')
    net = Net(net_param(text), "TRAIN", backend=_two_workers(), verbose=False)
    assert net._pooling_after == {}


def test_convolutions_keep_their_calls_while_their_arrays_stay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A row-shift convolution makes each worker's backend call once and keeps it
    (Layer.kept_call) while its blobs and buffers are the same arrays: a second pass reuses
    them, and a new batch size or a weight array put in the blob's place makes them again,
    with the bits of a net built for those arrays."""
    monkeypatch.setattr(Net, "FUSE_POOLING", True)
    rng = np.random.default_rng(8)

    def run(net: Net, n: int) -> list[bytes]:  # the same batch of n for every net
        x = np.random.default_rng(n).normal(size=(n, 2, 16, 16))
        net.forward(data=x, label=np.arange(n) % 3)
        net.backward()
        return [a.tobytes() for b in net.blobs.values() for a in (b.data, b.diff)]

    net = Net(net_param(POOLED % "MAX"), "TRAIN", backend=_two_workers(), verbose=False, seed=5)
    conv1 = net.layers[1]
    first = run(net, 6)
    kept = dict(conv1._calls)
    assert {"forward0.0", "forward0.1", "backward0.0", "backward0.1"} <= set(kept)
    assert run(net, 6) == first
    assert all(conv1._calls[k] is v for k, v in kept.items())  # the same calls again
    assert run(net, 4) == run(Net(net_param(POOLED % "MAX"), "TRAIN", backend=_two_workers(),
                                  verbose=False, seed=5), 4)
    assert conv1._calls["forward0.0"][2] is not kept["forward0.0"][2]
    weights = rng.normal(size=conv1.blobs[0].shape)
    fresh = Net(net_param(POOLED % "MAX"), "TRAIN", backend=_two_workers(), verbose=False,
                seed=5)
    fresh.layers[1].blobs[0].data[...] = weights
    conv1.blobs[0].data = weights.copy()  # a new array in the blob's place
    assert run(net, 4) == run(fresh, 4)


@pytest.mark.parametrize("fuse", [False, True])
def test_columns_kept_or_made_again_give_the_same_bits(monkeypatch: pytest.MonkeyPatch,
                                                       fuse: bool) -> None:
    """A TRAIN forward on the shared row-shift path keeps its columns for backward only where
    an output has more than Convolution.KEEP_INPUTS_MIN inputs (C·kh·kw; POOLED's: 50 and 36);
    columns made again in backward give the same bits."""
    from netforge.layers.vision import Convolution

    if not _two_workers().shares_work(np.zeros(1 << 16)):
        pytest.skip("needs numba's shared row-shift path")
    runs = {}
    for minimum in (0, 64):
        monkeypatch.setattr(Convolution, "KEEP_INPUTS_MIN", minimum)
        net, _, bits = _pooled_run(monkeypatch, fuse)
        net.forward()
        kept = [bool(net.layers[net.layer_by_name[n]]._kept) for n in ("conv1", "conv2")]
        assert kept == [minimum < 36] * 2
        runs[minimum] = bits
    assert runs[0] == runs[64]


def test_kept_calls_and_buffers() -> None:
    """Layer.kept_call makes its call again when an array is another object (even an equal
    one) or a value differs; Layer.buffer gives the same view for the same key and shape."""
    from tests.helpers import make_layer

    layer = make_layer("ReLU", "")
    a, b = np.zeros(3), np.ones(2)
    made: list[int] = []

    def make() -> int:
        made.append(1)
        return len(made)

    assert layer.kept_call("k", (a, b), (1,), make) == 1
    assert layer.kept_call("k", (a, b), (1,), make) == 1
    assert layer.kept_call("k", (a.copy(), b), (1,), make) == 2
    assert layer.kept_call("k", (a, b), (2,), make) == 3
    assert layer.kept_call("other", (a, b), (2,), make) == 4
    view = layer.buffer("x", (2, 3))
    assert layer.buffer("x", (2, 3)) is view
    assert layer.buffer("x", (3, 2)) is not view
    bigger = layer.buffer("x", (4, 4))
    assert bigger.shape == (4, 4) and layer.buffer("x", (4, 4)) is bigger


def test_backward_says_when_each_layer_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    """backward(ready) calls ready(i) for every layer, last to first, once layer i's backward
    (if it has one) has run, also where a pooling runs inside its convolution."""
    from netforge.layers.vision import Convolution

    for fuse in (False, True):
        net, _, _ = _pooled_run(monkeypatch, fuse)
        seen: list[int] = []
        order: list[str] = []
        real = Convolution.backward_pooled if fuse else Convolution.backward

        def traced(self: Convolution, *args: Any, real: Any = real, order: list[str] = order,
                   seen: list[int] = seen) -> Any:
            order.append(f"{self.name}@{len(seen)}")
            return real(self, *args)

        monkeypatch.setattr(Convolution, "backward_pooled" if fuse else "backward", traced)
        net.forward()
        net.backward(seen.append)
        assert seen == list(reversed(range(len(net.layers))))
        # conv2 (index 3) runs after ready(4) and before ready(3); conv1 likewise
        assert order == [f"conv2@{len(net.layers) - 4}", f"conv1@{len(net.layers) - 2}"]
