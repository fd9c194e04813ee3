"""Python layers loaded by import path (python_param), and `netforge gradcheck` on real nets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from netforge import Net
from netforge.cli import main
from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from tests.helpers import blob, make_layer, tops

GRAD_CHECKED = {"Python"}
NO_BACKWARD: set[str] = set()

MODULE = '''
from netforge.layers.python_layer import PythonLayer


class ScaledSquare(PythonLayer):
    """y = a * x**2 with a learnable a (one blob) and a factor from param_str."""

    def setup(self, bottom, top):
        self.factor = float(self.param_str or 1)
        if len(bottom) != 1:
            raise ValueError("ScaledSquare takes one bottom")
        a = self.add_blob(1)
        a.data[...] = 1.5

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.factor * self.blobs[0].data * bottom[0].data ** 2

    def backward(self, top, propagate_down, bottom):
        x, dy = bottom[0].data, top[0].diff
        self.blobs[0].diff += self.factor * (dy * x ** 2).sum()
        if propagate_down[0]:
            bottom[0].diff[...] = self.factor * self.blobs[0].data * 2 * x * dy


class Broken:
    def setup(self, bottom, top):
        raise RuntimeError("no good")

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass


class NoForward(PythonLayer):
    def reshape(self, bottom, top):
        pass


class Plain:
    pass


class FailsToStart(PythonLayer):
    def __init__(self):
        raise OSError("cannot open the lookup table")

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        pass
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_layers_mod.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.chdir(tmp_path)
    return "my_layers_mod"


def test_python_layer_gradient(user_module: str) -> None:
    layer = make_layer("Python", f'python_param {{ module: "{user_module}" '
                                 'layer: "ScaledSquare" param_str: "2" }')
    bottom, top = [blob((2, 3, 4))], tops(1)
    result = GradientChecker(1e-2, 1e-3).check(layer, bottom, top)
    assert result.ok, result.failures
    assert result.checked == 1 + 24
    layer.forward(bottom, top)
    np.testing.assert_allclose(top[0].data, 2 * 1.5 * bottom[0].data ** 2)


def test_python_layer_in_a_net_learns(user_module: str) -> None:
    net_text = f"""
    layer:
      - {{name: data, type: DummyData, top: [x, y],
         dummy_data_param: {{shape: [{{dim: [4, 3]}}, {{dim: [4, 3]}}],
                             data_filler: [{{type: gaussian}}, {{type: constant, value: 1}}]}}}}
      - {{name: sq, type: Python, bottom: x, top: sq,
         python_param: {{module: {user_module}, layer: ScaledSquare}}}}
      - {{name: loss, type: EuclideanLoss, bottom: [sq, y], top: loss}}
    """
    Path("net.yaml").write_text(net_text)
    net = Net("net.yaml", "TRAIN", verbose=False)
    assert [p.layer for p in net.learnable_params] == ["sq"]
    net.forward()
    net.backward()
    assert net.params["sq"][0].diff[0] != 0


@pytest.mark.parametrize(("param", "message"), [
    ('python_param { layer: "X" }', "python_param needs 'module' and 'layer'"),
    ('python_param { module: "no_such_mod_xyz" layer: "X" }',
     "python_param.module 'no_such_mod_xyz' cannot be imported"),
    ('python_param { module: "my_layers_mod" layer: "Nope" }',
     "module 'my_layers_mod' has no class 'Nope'"),
    ('python_param { module: "my_layers_mod" layer: "NoForward" }',
     "class 'NoForward' in module 'my_layers_mod' must define forward$"),
    ('python_param { module: "my_layers_mod" layer: "Plain" }',
     "class 'Plain' in module 'my_layers_mod' must define reshape and forward"),
    ('python_param { module: "my_layers_mod" layer: "FailsToStart" }',
     r"creating FailsToStart\(\) failed: OSError: cannot open the lookup table"),
])
def test_python_layer_errors(user_module: str, param: str, message: str) -> None:
    with pytest.raises(LayerError, match=message):
        make_layer("Python", param)  # the net reports it as a located ConfigError


def test_user_exceptions_are_reported_with_the_class(user_module: str) -> None:
    layer = make_layer("Python", 'python_param { module: "my_layers_mod" layer: "Broken" }')
    with pytest.raises(LayerError, match=r"Broken.setup raised RuntimeError: no good"):
        layer.setup([blob((2,))], tops(1))


# -- netforge gradcheck ------------------------------------------------------------------------


def test_gradcheck_cli_on_lenet(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["gradcheck", "--model", "models/lenet_train_test.yaml", "--points", "20"])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "type", "checked", "kinks", "max", "abs", "err", "max",
                                "rel", "err", "result"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "skipped (no backward)" in rows["mnist"]
    for name in ("conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"):
        assert rows[name].endswith(" ok"), rows[name]


def test_gradcheck_cli_finds_a_wrong_backward(workspace: Path, user_module: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    Path("wrong.py").write_text(textwrap.dedent(MODULE).replace(
        "bottom[0].diff[...] = self.factor * self.blobs[0].data * 2 * x * dy",
        "bottom[0].diff[...] = self.factor * self.blobs[0].data * x * dy"))
    Path("net.yaml").write_text(
        "force_backward: true\n"
        "layer:\n"
        "  - {name: data, type: DummyData, top: x, dummy_data_param: {shape: {dim: [2, 3]},"
        " data_filler: {type: gaussian}}}\n"
        "  - {name: sq, type: Python, bottom: x, top: sq, python_param: {module: wrong,"
        " layer: ScaledSquare}}\n"
        "  - {name: loss, type: EuclideanLoss, bottom: [sq, x], top: loss}\n")
    code = main(["gradcheck", "--model", "net.yaml", "--layer", "sq"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAIL" in out and "sq: bottom 0 element" in out
    code = main(["gradcheck", "--model", "net.yaml", "--layer", "sqq"])
    assert code == 2
    assert "no layer named sqq in this net (did you mean 'sq'?)" in capsys.readouterr().err
