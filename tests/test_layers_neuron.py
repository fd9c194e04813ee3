"""Neuron layers: ReLU, Sigmoid, TanH, Dropout (Caffe's test_neuron_layer cases)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from tests.helpers import PHASE_TEST, PHASE_TRAIN, blob, make_layer, run_forward, tops

GRAD_CHECKED: set[str] = {"ReLU", "Sigmoid", "TanH", "Dropout"}
NO_BACKWARD: set[str] = set()

SHAPE = (2, 3, 4, 5)


def forward(type_name: str, x: np.ndarray, params: str = "", phase: int = PHASE_TRAIN,
            seed: int = 1701) -> np.ndarray:
    layer = make_layer(type_name, params, phase=phase, seed=seed)
    bottom, top = [blob(data=x)], tops(1)
    run_forward(layer, bottom, top)
    assert top[0].shape == x.shape
    return top[0].data.copy()


def forward_backward(type_name: str, x: np.ndarray, dy: np.ndarray, params: str = "",
                     in_place: bool = False, phase: int = PHASE_TRAIN) -> tuple[np.ndarray, ...]:
    layer = make_layer(type_name, params, phase=phase)
    bottom = [blob(data=x)]
    top = bottom if in_place else tops(1)
    run_forward(layer, bottom, top)
    y = top[0].data.copy()
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy()


# -- forward values --------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.3])
def test_relu_forward(slope: float) -> None:
    x = blob(SHAPE).data
    y = forward("ReLU", x, f"relu_param {{ negative_slope: {slope} }}")
    np.testing.assert_allclose(y, np.maximum(x, 0) + slope * np.minimum(x, 0))


def test_sigmoid_forward() -> None:
    x = blob(SHAPE, low=-5, high=5).data
    np.testing.assert_allclose(forward("Sigmoid", x), 1 / (1 + np.exp(-x)), rtol=1e-12)


def test_sigmoid_extremes_do_not_overflow() -> None:
    y = forward("Sigmoid", np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(y, [0.0, 0.5, 1.0])


def test_tanh_forward() -> None:
    x = blob(SHAPE, low=-3, high=3).data
    np.testing.assert_allclose(forward("TanH", x), np.tanh(x), rtol=1e-12)


# -- gradients -------------------------------------------------------------------------------------
@pytest.mark.parametrize("slope", [0.0, 0.01])
def test_relu_gradient(slope: float) -> None:
    layer = make_layer("ReLU", f"relu_param {{ negative_slope: {slope} }}")
    checker = GradientChecker(1e-2, 1e-3, 1701, 0.0, 0.01)
    result = checker.check_eltwise(layer, [blob(SHAPE)], tops(1))
    assert result.ok, result.failures[:3]
    assert result.checked > 0


@pytest.mark.parametrize("type_name", ["Sigmoid", "TanH"])
def test_smooth_neuron_gradient(type_name: str) -> None:
    layer = make_layer(type_name)
    result = GradientChecker(1e-2, 1e-3).check_eltwise(layer, [blob(SHAPE, low=-2, high=2)],
                                                       tops(1))
    assert result.ok, result.failures[:3]
    assert result.checked == math.prod(SHAPE)


def test_dropout_gradient() -> None:
    layer = make_layer("Dropout", phase=PHASE_TRAIN)
    result = GradientChecker(1e-2, 1e-3).check(layer, [blob((2, 3, 2, 2))], tops(1))
    assert result.ok, result.failures[:3]


def test_dropout_gradient_test_phase() -> None:
    layer = make_layer("Dropout", phase=PHASE_TEST)
    result = GradientChecker(1e-2, 1e-3).check(layer, [blob((2, 3, 2, 2))], tops(1))
    assert result.ok, result.failures[:3]


@pytest.mark.parametrize("type_name", ["ReLU", "Sigmoid", "TanH"])
def test_backward_formulas(type_name: str) -> None:
    x = blob(SHAPE, low=-2, high=2).data
    dy = blob(SHAPE, seed=5).data
    y, dx = forward_backward(type_name, x, dy)
    expected = {"ReLU": dy * (x > 0), "Sigmoid": dy * y * (1 - y), "TanH": dy * (1 - y * y)}
    np.testing.assert_allclose(dx, expected[type_name], rtol=1e-12)


# -- in place --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("type_name", "params"), [
    ("ReLU", ""), ("ReLU", "relu_param { negative_slope: 0.01 }"), ("Sigmoid", ""),
    ("TanH", ""), ("Dropout", "dropout_param { dropout_ratio: 0.3 }"),
])
def test_in_place_matches_out_of_place(type_name: str, params: str) -> None:
    x = blob(SHAPE).data
    dy = blob(SHAPE, seed=7).data
    y1, dx1 = forward_backward(type_name, x, dy, params)
    y2, dx2 = forward_backward(type_name, x, dy, params, in_place=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)


# -- Dropout known facts (Caffe test_neuron_layer: TestDropoutHalf / TestDropoutThreeQuarters) -----
@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_dropout_train_facts(ratio: float) -> None:
    x = blob((4, 5, 10, 10), low=0.5, high=1.5).data  # no zeros in x, so y == 0 means dropped
    params = f"dropout_param {{ dropout_ratio: {ratio} }}" if ratio != 0.5 else ""
    y = forward("Dropout", x, params, phase=PHASE_TRAIN)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / (1 - ratio), rtol=1e-12)
    n = x.size
    std_error = math.sqrt(ratio * (1 - ratio) / n)
    empirical_ratio = 1 - kept.sum() / n
    assert abs(empirical_ratio - ratio) <= 1.96 * std_error


def test_dropout_test_phase_is_identity() -> None:
    x = blob(SHAPE).data
    dy = blob(SHAPE, seed=3).data
    y, dx = forward_backward("Dropout", x, dy, phase=PHASE_TEST)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, dy)


def test_dropout_backward_uses_forward_mask() -> None:
    x = blob(SHAPE, low=0.5, high=1.5).data
    dy = np.ones(SHAPE)
    y, dx = forward_backward("Dropout", x, dy)
    np.testing.assert_allclose(dx, (y != 0) * 2.0)


def test_dropout_mask_follows_seed() -> None:
    x = blob(SHAPE).data
    a, b = forward("Dropout", x, seed=1), forward("Dropout", x, seed=1)
    c = forward("Dropout", x, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_dropout_bad_ratio(ratio: float) -> None:
    layer = make_layer("Dropout", f"dropout_param {{ dropout_ratio: {ratio} }}")
    with pytest.raises(LayerError, match="dropout_ratio"):
        run_forward(layer, [blob(SHAPE)], tops(1))


def test_float32_neurons_keep_dtype() -> None:
    for type_name in sorted(GRAD_CHECKED):
        layer = make_layer(type_name, dtype="float32")
        bottom, top = [blob(SHAPE, dtype="float32")], tops(1, dtype="float32")
        run_forward(layer, bottom, top)
        assert top[0].data.dtype == np.float32
