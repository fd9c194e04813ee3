"""Config loading: prototxt and YAML fill the same messages, and bad input gives one located
error with a did-you-mean where one exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from netforge.config import apply_overrides, load_net_param, load_solver_param, to_yaml
from netforge.errors import ConfigError
from netforge.proto import pb
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "caffe"


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(path: Path, solver: bool = False) -> str:
    with pytest.raises(ConfigError) as info:
        (load_solver_param if solver else load_net_param)(path)
    return str(info.value)


# -- the shipped and upstream files ---------------------------------------------------------------


def test_yaml_and_prototxt_solvers_match() -> None:
    a, _ = load_solver_param(ROOT / "solvers" / "lenet_solver.yaml")
    b, _ = load_solver_param(ROOT / "solvers" / "lenet_solver.prototxt")
    a.net = b.net = ""
    assert a == b


def test_upstream_caffe_solver_loads_unchanged() -> None:
    sp, _ = load_solver_param(FIXTURES / "lenet_solver.prototxt")
    ours, _ = load_solver_param(ROOT / "solvers" / "lenet_solver.prototxt")
    assert (sp.base_lr, sp.momentum, sp.weight_decay, sp.lr_policy, sp.gamma, sp.power) == (
        ours.base_lr, ours.momentum, ours.weight_decay, ours.lr_policy, ours.gamma, ours.power)
    assert (sp.max_iter, sp.test_iter, sp.test_interval, sp.display, sp.snapshot) == (
        10000, [100], 500, 100, 5000)
    assert sp.solver_mode == pb.SolverParameter.GPU


def test_yaml_roundtrip_of_a_net() -> None:
    param, _ = load_net_param(ROOT / "models" / "lenet_train_test.prototxt")
    text = to_yaml(param)
    again = pb.NetParameter()
    from netforge.config import parse_yaml

    parse_yaml(text, again, "roundtrip.yaml")
    assert again == param


def test_yaml_accepts_scalars_for_repeated_fields_and_enum_names(tmp_path: Path) -> None:
    p = write(tmp_path, "n.yaml", "layer:\n  - name: a\n    type: Pooling\n    bottom: x\n"
                                  "    pooling_param: {pool: AVE, kernel_size: 3}\n")
    param, smap = load_net_param(p)
    assert list(param.layer[0].bottom) == ["x"]
    assert param.layer[0].pooling_param.pool == pb.PoolingParameter.AVE
    assert smap.where(("layer", 0, "pooling_param", "pool")) == f"{p}:5:21"


# -- located errors: prototxt ---------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ('layer {\n  name: "a"\n  tpye: "ReLU"\n}\n',
     r":3:3: unknown field 'tpye' in LayerParameter (did you mean 'type'?)"),
    ('layer {\n  name: "a"\n  pooling_param { pool: MAXX }\n}\n',
     r":3:25: unknown value 'MAXX' for enum PoolingParameter.PoolMethod (allowed: MAX, AVE, "
     r"STOCHASTIC) (did you mean 'MAX'?)"),
    ('layer {\n  name: "a"\n  convolution_param { num_output: "many" }\n}\n',
     r":3:35:"),
    ('layer {\n  name: "a"\n', ':2:9: Expected "}"'),
])
def test_prototxt_errors_are_located(tmp_path: Path, text: str, expected: str) -> None:
    p = write(tmp_path, "n.prototxt", text)
    message = load_error(p)
    assert message.startswith(f"{p}{expected}"), message
    assert "\n" not in message


# -- located errors: YAML -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("layer:\n  - name: a\n    tpye: ReLU\n",
     ":3:5: unknown field 'tpye' in LayerParameter (at layer[0]) (did you mean 'type'?)"),
    ("layer:\n  - name: a\n    pooling_param: {pool: MAXX}\n",
     ":3:27: unknown value 'MAXX' for layer[0].pooling_param.pool "
     "(allowed: MAX, AVE, STOCHASTIC) (did you mean 'MAX'?)"),
    ("layer:\n  - name: a\n    convolution_param: {num_output: many}\n",
     ":3:37: layer[0].convolution_param.num_output must be an integer, got 'many'"),
    ("layer:\n  - name: a\n    convolution_param: {num_output: -3}\n",
     ":3:37: layer[0].convolution_param.num_output must be ≥ 0, got -3"),
    ("layer:\n  - name: a\n    convolution_param: 5\n",
     ":3:24: layer[0].convolution_param must be a mapping of ConvolutionParameter fields"),
    ("layer:\n  - name: a\n    name: b\n", ":3:5: field 'name' is given twice"),
    ("layer:\n  - name: a\n   type: [\n", ":3:"),
])
def test_yaml_errors_are_located(tmp_path: Path, text: str, expected: str) -> None:
    p = write(tmp_path, "n.yaml", text)
    message = load_error(p)
    assert message.startswith(f"{p}{expected}"), message
    assert "\n" not in message


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    assert load_error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: net file not found"
    (tmp_path / "d.prototxt").mkdir()
    assert "is a directory" in load_error(tmp_path / "d.prototxt")
    (tmp_path / "b.prototxt").write_bytes(b"\xff\xfe\x00")
    assert "not UTF-8" in load_error(tmp_path / "b.prototxt")


def test_solver_errors_are_located(tmp_path: Path) -> None:
    p = write(tmp_path, "s.yaml", "net: n.yaml\nbase_lr: 0.01\nmax_itr: 10\n")
    assert load_error(p, solver=True) == (
        f"{p}:3:1: unknown field 'max_itr' in SolverParameter (at SolverParameter) "
        "(did you mean 'max_iter'?)")


# -- overrides ------------------------------------------------------------------------------------


def test_overrides_are_typed_and_replace_values() -> None:
    sp, _ = load_solver_param(ROOT / "solvers" / "lenet_solver.yaml")
    changes = apply_overrides(sp, ["max_iter=200", "test_iter=[5]", "base_lr=1e-3",
                                   "train_state.stage=[a, b]"])
    assert changes == [("max_iter", "10000", "200"), ("test_iter", "[100]", "[5]"),
                       ("base_lr", "0.01", "0.001"), ("train_state.stage", "[]", "[a, b]")]
    assert sp.max_iter == 200 and list(sp.test_iter) == [5]
    assert list(sp.train_state.stage) == ["a", "b"]


@pytest.mark.parametrize(("item", "expected"), [
    ("max_itr=3", "--set max_itr=3: unknown field 'max_itr' in SolverParameter "
                  "(at SolverParameter) (did you mean 'max_iter'?)"),
    ("max_iter=abc", "--set max_iter=abc: max_iter must be an integer, got 'abc'"),
    ("max_iter", "--set max_iter: an override must look like key=value (e.g. max_iter=1000)"),
    ("solver_mode=GPX", "--set solver_mode=GPX: unknown value 'GPX' for solver_mode "
                        "(allowed: CPU, GPU) (did you mean 'GPU'?)"),
    ("test_iter.x=1", "--set test_iter.x=1: 'test_iter' is not a single message; only its own "
                      "value can be overridden"),
])
def test_bad_overrides(item: str, expected: str) -> None:
    sp = pb.SolverParameter()
    with pytest.raises(ConfigError) as info:
        apply_overrides(sp, [item])
    assert str(info.value) == expected
