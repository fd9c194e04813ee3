"""The rest of Caffe's neuron layers: PReLU, ELU, AbsVal, BNLL, Power, Exp, Log, Threshold, Clip,
Swish (Caffe's test_neuron_layer, test_power_layer and test_threshold_layer cases, in-place runs,
bad parameters, and PyTorch as a float64 oracle where it has the op)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from netforge import Net
from netforge.backend import NumpyBackend
from netforge.blob import Blob
from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from netforge.layers.base import Layer
from netforge.proto import pb
from tests.helpers import blob, make_layer, run_forward, tops

GRAD_CHECKED: set[str] = {"PReLU", "ELU", "AbsVal", "BNLL", "Power", "Exp", "Log", "Clip",
                          "Swish"}
NO_BACKWARD: set[str] = {"Threshold"}

SHAPE = (2, 3, 4, 5)  # Caffe's NeuronLayerTest bottom
KINK = GradientChecker(1e-2, 1e-3, 1701, 0.0, 0.01)  # Caffe's checker for ReLU-like kinks


def f32(v: float) -> float:
    """A value as a float field of the proto holds it (the layer sees this, not ``v``)."""
    return float(np.float32(v))


def gauss(shape: tuple[int, ...] = SHAPE, seed: int = 1701, std: float = 1.0) -> np.ndarray:
    """Caffe's neuron tests fill the bottom from a gaussian (mean 0, std 1)."""
    return np.random.default_rng(seed).normal(0.0, std, size=shape)


def forward(type_name: str, x: np.ndarray, params: str = "") -> np.ndarray:
    layer = make_layer(type_name, params)
    bottom, top = [blob(data=x)], tops(1)
    run_forward(layer, bottom, top)
    assert top[0].shape == x.shape
    return top[0].data.copy()


def forward_backward(type_name: str, x: np.ndarray, dy: np.ndarray, params: str = "",
                     in_place: bool = False) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """y, dx and the param diffs of one forward/backward, in place or not."""
    layer = make_layer(type_name, params)
    bottom = [blob(data=x)]
    top = bottom if in_place else tops(1)
    run_forward(layer, bottom, top)
    y = top[0].data.copy()
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return y, bottom[0].diff.copy(), [b.diff.copy() for b in layer.blobs]


def check_eltwise(type_name: str, params: str, x: np.ndarray,
                  checker: GradientChecker) -> None:
    layer = make_layer(type_name, params)
    result = checker.check_eltwise(layer, [blob(data=x)], tops(1))
    assert result.ok, result.failures[:3]
    assert result.checked > 0


def nudge_off(x: np.ndarray, points: list[float], margin: float = 0.02) -> np.ndarray:
    """Move values within ``margin`` of a kink away from it (finite differences straddling a
    kink disagree with any one-sided gradient; Caffe's Clip gradient test drops such values)."""
    x = x.copy()
    for p in points:
        near = np.abs(x - p) < margin
        x[near] = p + np.where(x[near] >= p, margin, -margin)
    return x


# == PReLU =========================================================================================
def test_prelu_default_slopes_are_quarter() -> None:
    """TestPReLUParam: without a filler every slope is 0.25; one per channel."""
    layer = make_layer("PReLU")
    run_forward(layer, [blob(data=gauss())], tops(1))
    assert len(layer.blobs) == 1
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(layer.blobs[0].data, 0.25)


def test_prelu_channel_shared_has_one_slope() -> None:
    layer = make_layer("PReLU", "prelu_param { channel_shared: true }")
    run_forward(layer, [blob(data=gauss())], tops(1))
    assert layer.blobs[0].shape == (1,)
    np.testing.assert_array_equal(layer.blobs[0].data, 0.25)


def test_prelu_filler_is_used_and_seeded() -> None:
    params = "prelu_param { filler { type: 'uniform' min: 0.1 max: 0.2 } }"
    slopes = []
    for _ in range(2):
        layer = make_layer("PReLU", params, seed=3)
        run_forward(layer, [blob(data=gauss())], tops(1))
        slopes.append(layer.blobs[0].data.copy())
    assert np.all((slopes[0] >= f32(0.1)) & (slopes[0] < f32(0.2)))
    assert len(np.unique(slopes[0])) == 3
    np.testing.assert_array_equal(slopes[0], slopes[1])


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_forward(shared: bool) -> None:
    """TestPReLUForward / TestPReLUForwardChannelShared: y = max(x,0) + a_c·min(x,0) with c the
    index along axis 1 (Caffe's (i / hw) % channels)."""
    params = f"prelu_param {{ channel_shared: {str(shared).lower()} "
    params += "filler { type: 'gaussian' } }"
    layer = make_layer("PReLU", params)
    x = gauss()
    bottom, top = [blob(data=x)], tops(1)
    run_forward(layer, bottom, top)
    a = layer.blobs[0].data
    hw = SHAPE[2] * SHAPE[3]
    flat_x, flat_y = x.reshape(-1), top[0].data.reshape(-1)
    for i in range(flat_x.size):
        c = 0 if shared else (i // hw) % SHAPE[1]
        assert flat_y[i] == max(flat_x[i], 0.0) + a[c] * min(flat_x[i], 0.0)


def test_prelu_two_axis_bottom() -> None:
    x = gauss((4, 3))
    layer = make_layer("PReLU", "prelu_param { filler { type: 'constant' value: -0.5 } }")
    bottom, top = [blob(data=x)], tops(1)
    run_forward(layer, bottom, top)
    np.testing.assert_array_equal(top[0].data, np.where(x > 0, x, -0.5 * x))


def test_prelu_consistent_with_leaky_relu() -> None:
    """TestPReLUConsistencyReLU: default PReLU equals ReLU with negative_slope 0.25, forward
    and backward, bit for bit."""
    x, dy = gauss(), gauss(seed=7)
    y1, dx1, _ = forward_backward("PReLU", x, dy)
    y2, dx2, _ = forward_backward("ReLU", x, dy, "relu_param { negative_slope: 0.25 }")
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)


def test_prelu_backward_formula_and_accumulation() -> None:
    x, dy = gauss(), gauss(seed=7)
    layer = make_layer("PReLU", "prelu_param { filler { type: 'gaussian' } }")
    bottom, top = [blob(data=x)], tops(1)
    run_forward(layer, bottom, top)
    a = layer.blobs[0].data.reshape(1, 3, 1, 1)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, np.where(x > 0, dy, a * dy), rtol=1e-12)
    expected = (dy * x * (x <= 0)).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(layer.blobs[0].diff, expected, rtol=1e-12)
    # Param gradients accumulate; propagate_down false leaves the bottom diff alone.
    bottom[0].diff[...] = 123.0
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(layer.blobs[0].diff, 2 * expected, rtol=1e-12)
    np.testing.assert_array_equal(bottom[0].diff, 123.0)


@pytest.mark.parametrize("shared", [False, True])
def test_prelu_gradient(shared: bool) -> None:
    """TestPReLUGradient(ChannelShared): CheckGradientExhaustive with (1e-2, 1e-3, kink 0.01),
    the bottom and the slopes."""
    filler = "" if shared else "filler { type: 'gaussian' }"
    layer = make_layer("PReLU", f"prelu_param {{ channel_shared: {str(shared).lower()} "
                                f"{filler} }}")
    result = KINK.check_exhaustive(layer, [blob(data=gauss())], tops(1))
    assert result.ok, result.failures[:3]
    assert result.checked > 0


def test_prelu_in_place_keeps_bottom() -> None:
    """TestPReLUInPlace: in place gives the same top, bottom diff and slope diff."""
    x, dy = gauss(), gauss(seed=7)
    params = "prelu_param { filler { type: 'gaussian' } }"
    y1, dx1, p1 = forward_backward("PReLU", x, dy, params)
    y2, dx2, p2 = forward_backward("PReLU", x, dy, params, in_place=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_array_equal(p1[0], p2[0])


def test_prelu_needs_two_axes() -> None:
    layer = make_layer("PReLU")
    with pytest.raises(LayerError, match="at least 2 axes"):
        run_forward(layer, [blob(data=gauss((6,)))], tops(1))


def test_prelu_channel_count_change_is_refused() -> None:
    layer = make_layer("PReLU")
    run_forward(layer, [blob(data=gauss())], tops(1))
    with pytest.raises(LayerError, match="3 slopes but the bottom has 4 channels"):
        layer.reshape([blob(data=gauss((2, 4, 1, 1)))], tops(1))
    shared = make_layer("PReLU", "prelu_param { channel_shared: true }")
    run_forward(shared, [blob(data=gauss())], tops(1))
    shared.reshape([blob(data=gauss((2, 4, 1, 1)))], tops(1))  # one slope fits any C


# == ELU ===========================================================================================
def test_elu_forward() -> None:
    """TestELU (alpha 0.5)."""
    x = gauss()
    y = forward("ELU", x, "elu_param { alpha: 0.5 }")
    pos = x > 0
    np.testing.assert_array_equal(y[pos], x[pos])
    np.testing.assert_allclose(y[~pos], 0.5 * (np.exp(x[~pos]) - 1), rtol=1e-12)


def test_elu_default_alpha_is_one() -> None:
    x = np.array([-2.0, -0.5, 0.0, 1.5])
    np.testing.assert_allclose(forward("ELU", x), [math.expm1(-2), math.expm1(-0.5), 0, 1.5],
                               rtol=1e-14)


def test_elu_as_relu() -> None:
    """TestELUasReLU: alpha 0 is ReLU."""
    x = gauss()
    np.testing.assert_array_equal(forward("ELU", x, "elu_param { alpha: 0 }"), np.maximum(x, 0))


@pytest.mark.parametrize("alpha", [1.0, 0.0, 0.5, -0.3])
def test_elu_gradient(alpha: float) -> None:
    """TestELUGradient / TestELUasReLUGradient: (1e-2, 1e-3, kink 0.01)."""
    check_eltwise("ELU", f"elu_param {{ alpha: {alpha} }}", gauss(), KINK)


def test_elu_backward_formula() -> None:
    x, dy = gauss(), gauss(seed=7)
    y, dx, _ = forward_backward("ELU", x, dy, "elu_param { alpha: 0.5 }")
    np.testing.assert_allclose(dx, np.where(x > 0, dy, dy * (y + 0.5)), rtol=1e-12)


# == AbsVal, BNLL ==================================================================================
def test_absval_forward() -> None:
    """TestAbsVal."""
    x = gauss()
    np.testing.assert_array_equal(forward("AbsVal", x), np.abs(x))


def test_absval_gradient() -> None:
    """TestAbsGradient: (1e-2, 1e-3, kink 0.01)."""
    check_eltwise("AbsVal", "", gauss(), KINK)


def test_absval_backward_is_sign() -> None:
    x = np.array([-2.0, 0.0, 3.0])
    _, dx, _ = forward_backward("AbsVal", x, np.array([5.0, 5.0, 5.0]))
    np.testing.assert_array_equal(dx, [-5.0, 0.0, 5.0])


def test_bnll_forward() -> None:
    """TestBNLL: y ≥ 0 and y ≥ x; and y is softplus."""
    x = gauss()
    y = forward("BNLL", x)
    assert np.all(y >= 0) and np.all(y >= x)
    np.testing.assert_allclose(y, np.log1p(np.exp(x)), rtol=1e-12)


def test_bnll_extremes_do_not_overflow() -> None:
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0])
    dy = np.ones_like(x)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, dx, _ = forward_backward("BNLL", x, dy)
    np.testing.assert_allclose(y, [0.0, math.exp(-50), math.log(2), 50.0, 1000.0], rtol=1e-12)
    np.testing.assert_allclose(dx, [0.0, math.exp(-50), 0.5, 1.0, 1.0], rtol=1e-12)


def test_bnll_gradient() -> None:
    """TestBNLLGradient: (1e-2, 1e-3)."""
    check_eltwise("BNLL", "", gauss(), GradientChecker(1e-2, 1e-3))


def test_bnll_backward_is_sigmoid() -> None:
    x, dy = gauss(), gauss(seed=7)
    _, dx, _ = forward_backward("BNLL", x, dy)
    np.testing.assert_allclose(dx, dy / (1 + np.exp(-x)), rtol=1e-12)


# == Power (test_power_layer.cpp) ==================================================================
def power_params(power: float, scale: float, shift: float) -> str:
    return f"power_param {{ power: {power} scale: {scale} shift: {shift} }}"


@pytest.mark.parametrize(("power", "scale", "shift"), [
    (0.37, 0.83, -2.4), (0.0, 0.83, -2.4), (1.0, 0.83, -2.4), (2.0, 0.34, -2.4),
    (0.37, 0.83, 0.0), (-1.5, 2.0, 0.5), (3.0, -0.7, 0.2),
])
def test_power_forward(power: float, scale: float, shift: float) -> None:
    """TestPower/PowerZero/PowerOne/PowerTwo: y = (shift + scale·x)^power; NaN exactly where the
    formula is NaN (a negative base with a non-integer power), never for power 0, 1, 2."""
    x = gauss()
    with np.errstate(invalid="ignore", divide="ignore"):
        y = forward("Power", x, power_params(power, scale, shift))
        expected = np.power(f32(shift) + f32(scale) * x, f32(power))
    if power in (0.0, 1.0, 2.0):
        assert not np.isnan(y).any()
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    if power == 0.37 and shift == -2.4:
        assert np.isnan(y).any()  # the case really exercises Caffe's NaN rule
    ok = ~np.isnan(expected)
    np.testing.assert_allclose(y[ok], expected[ok], rtol=1e-12)


@pytest.mark.parametrize(("power", "shift", "value"), [
    (0.0, -2.4, 1.0), (2.0, -3.0, 9.0), (0.5, -2.0, math.nan), (3.0, 0.5, 0.125),
    (-1.0, 0.0, math.inf),
])
def test_power_scale_zero_is_constant(power: float, shift: float, value: float) -> None:
    """scale · power == 0: y is 1 (power 0) or shift^power as C's pow gives it; dx is 0."""
    x, dy = gauss(), gauss(seed=7)
    y, dx, _ = forward_backward("Power", x, dy, power_params(power, 0.0, shift))
    np.testing.assert_array_equal(y, np.full(SHAPE, value))
    np.testing.assert_array_equal(dx, 0.0)


def test_power_special_case_gradients() -> None:
    x, dy = gauss(), gauss(seed=7)
    _, dx, _ = forward_backward("Power", x, dy, power_params(0.0, 0.83, -2.4))
    np.testing.assert_array_equal(dx, 0.0)
    _, dx, _ = forward_backward("Power", x, dy, power_params(1.0, 0.83, -2.4))
    np.testing.assert_allclose(dx, f32(0.83) * dy, rtol=1e-15)
    _, dx, _ = forward_backward("Power", x, dy, power_params(2.0, 0.5, -2.4))
    np.testing.assert_allclose(dx, dy * 2 * 0.5 * (f32(-2.4) + 0.5 * x), rtol=1e-12)


def test_power_gradient_at_zero_base_is_the_formula() -> None:
    """Where shift + scale·x = 0 Caffe's power·y/(shift + scale·x) is 0/0; the formula
    scale·power·(shift + scale·x)^(power−1) gives 0 for power > 1."""
    x = np.array([-1.0, 0.0, 1.0])
    _, dx, _ = forward_backward("Power", x, np.ones(3), power_params(3.0, 2.0, 0.0))
    np.testing.assert_allclose(dx, [24.0, 0.0, 24.0])


@pytest.mark.parametrize(("power", "scale", "shift"), [
    (0.37, 0.83, -2.4), (0.37, 0.83, 0.0), (0.0, 0.83, -2.4), (1.0, 0.83, -2.4),
    (2.0, 0.83, -2.4), (2.0, 0.5, -2.4),
])
def test_power_gradient(power: float, scale: float, shift: float) -> None:
    """TestPower*Gradient: (1e-3, 1e-2, kink 0.01), after reflecting the bottom so that
    shift + scale·x ≥ 0 when the power is not 0, 1 or 2."""
    x = gauss()
    if power not in (0.0, 1.0, 2.0):
        min_value = -shift / scale
        x = np.where(x < min_value, 2 * min_value - x, x)
    check_eltwise("Power", power_params(power, scale, shift), x,
                  GradientChecker(1e-3, 1e-2, 1701, 0.0, 0.01))


# == Exp, Log ======================================================================================
EXP_LOG_CASES = [(-1.0, 1.0, 0.0), (-1.0, 1.0, 1.0), (2.0, 1.0, 0.0), (2.0, 1.0, 1.0),
                 (2.0, 3.0, 0.0), (2.0, 3.0, 1.0)]


def exp_params(base: float, scale: float, shift: float, kind: str = "exp") -> str:
    return f"{kind}_param {{ base: {base} scale: {scale} shift: {shift} }}"


@pytest.mark.parametrize(("base", "scale", "shift"), EXP_LOG_CASES)
def test_exp_forward(base: float, scale: float, shift: float) -> None:
    """TestExpLayer*: base −1 means e."""
    x = gauss()
    y = forward("Exp", x, exp_params(base, scale, shift))
    b = math.e if base == -1 else base
    np.testing.assert_allclose(y, np.power(b, shift + scale * x), rtol=1e-12)


def test_exp_defaults_are_natural_exp() -> None:
    x = gauss()
    np.testing.assert_allclose(forward("Exp", x), np.exp(x), rtol=1e-15)


@pytest.mark.parametrize(("base", "scale", "shift"), EXP_LOG_CASES)
def test_exp_gradient(base: float, scale: float, shift: float) -> None:
    """TestExpGradient*: (1e-2, 1e-3)."""
    check_eltwise("Exp", exp_params(base, scale, shift), gauss(), GradientChecker(1e-2, 1e-3))


def log_bottom() -> np.ndarray:
    """Caffe's LogBottomInit: exp of a gaussian, so every input is positive. Values below 0.1
    are raised to it: there the central difference with step 1e-2 is itself off by more than
    the 1% threshold (its relative error for log is h²/3x²)."""
    return np.maximum(np.exp(gauss()), 0.1)


@pytest.mark.parametrize(("base", "scale", "shift"), EXP_LOG_CASES)
def test_log_forward(base: float, scale: float, shift: float) -> None:
    """TestLogLayer*."""
    x = log_bottom()
    y = forward("Log", x, exp_params(base, scale, shift, "log"))
    expected = np.log(shift + scale * x) / (1.0 if base == -1 else math.log(base))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("base", "scale", "shift"), EXP_LOG_CASES)
def test_log_gradient(base: float, scale: float, shift: float) -> None:
    """TestLogGradient*: (1e-2, 1e-2)."""
    check_eltwise("Log", exp_params(base, scale, shift, "log"), log_bottom(),
                  GradientChecker(1e-2, 1e-2))


def test_exp_log_known_values() -> None:
    np.testing.assert_allclose(forward("Exp", np.array([0.0, 1.0, 2.0]),
                                       exp_params(2, 3, 1)), [2.0, 16.0, 128.0])
    np.testing.assert_allclose(forward("Log", np.array([1.0, 4.5, 32.5]),
                                       exp_params(2, 2, -1, "log")), [0.0, 3.0, 6.0])
    np.testing.assert_allclose(forward("Log", np.array([1.0, math.e])), [0.0, 1.0])


@pytest.mark.parametrize(("type_name", "base"), [("Exp", 0), ("Exp", -2), ("Log", 0),
                                                 ("Log", -0.5)])
def test_exp_log_bad_base(type_name: str, base: float) -> None:
    layer = make_layer(type_name, f"{type_name.lower()}_param {{ base: {base} }}")
    with pytest.raises(LayerError, match="base must be strictly positive"):
        run_forward(layer, [blob(SHAPE)], tops(1))


def test_log_base_one_is_refused() -> None:
    layer = make_layer("Log", "log_param { base: 1 }")
    with pytest.raises(LayerError, match="must not be 1"):
        run_forward(layer, [blob(SHAPE)], tops(1))


def test_exp_base_one_is_constant() -> None:
    """base 1 is allowed (Caffe checks only base > 0): y = 1, dx = 0."""
    y, dx, _ = forward_backward("Exp", gauss(), gauss(seed=7), "exp_param { base: 1 }")
    np.testing.assert_array_equal(y, 1.0)
    np.testing.assert_array_equal(dx, 0.0)


# == Threshold (test_threshold_layer.cpp) ==========================================================
@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_threshold_forward(threshold: float) -> None:
    """TestForward / TestForward2: y ∈ {0, 1} and y = 1 exactly where x > threshold."""
    x = gauss()
    params = f"threshold_param {{ threshold: {threshold} }}" if threshold else ""
    y = forward("Threshold", x, params)
    assert set(np.unique(y)) == {0.0, 1.0}
    np.testing.assert_array_equal(y == 1, x > threshold)


def test_threshold_at_the_threshold_is_zero() -> None:
    x = np.array([-1.0, 0.25, 0.2500001, 3.0])
    y = forward("Threshold", x, "threshold_param { threshold: 0.25 }")
    np.testing.assert_array_equal(y, [0.0, 0.0, 1.0, 1.0])


def test_threshold_has_no_backward() -> None:
    layer = make_layer("Threshold")
    assert layer.has_backward is False
    bottom, top = [blob(SHAPE)], tops(1)
    run_forward(layer, bottom, top)
    layer.backward(top, [False], bottom)  # nothing asked, nothing done
    with pytest.raises(LayerError, match="no backward"):
        layer.backward(top, [True], bottom)


def test_threshold_in_a_net_needs_no_backward() -> None:
    text = """
    force_backward: true
    layer { name: "input" type: "Input" top: "x" top: "y"
            input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
    layer { name: "th" type: "Threshold" bottom: "x" top: "t" }
    layer { name: "loss" type: "EuclideanLoss" bottom: "t" bottom: "y" top: "loss" }
    """
    p = pb.NetParameter()
    text_format.Parse(text, p)
    net = Net(p, "TRAIN", verbose=False, backend=NumpyBackend("float64"))
    assert net.layer_need_backward[1] is False
    net.forward(x=np.array([[-1.0, 0.0, 2.0]] * 2), y=np.zeros((2, 3)))
    np.testing.assert_array_equal(net.blobs["t"].data, [[0.0, 0.0, 1.0]] * 2)
    net.backward()


# == Clip ==========================================================================================
def test_clip_forward() -> None:
    """TestClip (min −1, max 2)."""
    x = gauss(std=2.0)
    y = forward("Clip", x, "clip_param { min: -1 max: 2 }")
    np.testing.assert_array_equal(y, np.minimum(np.maximum(x, -1), 2))
    assert (y == -1).any() and (y == 2).any()
    known = forward("Clip", np.array([-3.0, -1.0, 0.5, 2.0, 5.0]), "clip_param { min: -1 max: 2 }")
    np.testing.assert_array_equal(known, [-1.0, -1.0, 0.5, 2.0, 2.0])


def test_clip_backward_passes_inside_closed_range() -> None:
    x = np.array([-3.0, -1.0, 0.5, 2.0, 5.0])
    _, dx, _ = forward_backward("Clip", x, np.full(5, 3.0), "clip_param { min: -1 max: 2 }")
    np.testing.assert_array_equal(dx, [0.0, 3.0, 3.0, 3.0, 0.0])


def test_clip_min_equal_max_is_constant() -> None:
    y = forward("Clip", gauss(), "clip_param { min: 0.5 max: 0.5 }")
    np.testing.assert_array_equal(y, 0.5)


def test_clip_gradient() -> None:
    """TestClipGradient: (1e-2, 1e-3), with inputs near the two kinks moved off them."""
    x = nudge_off(gauss(std=2.0), [-1.0, 2.0])
    check_eltwise("Clip", "clip_param { min: -1 max: 2 }", x, GradientChecker(1e-2, 1e-3))


@pytest.mark.parametrize(("params", "message"), [
    ("", "min and max not given"),
    ("clip_param { }", "min and max not given"),
    ("clip_param { min: -1 }", "max not given"),
    ("clip_param { max: 1 }", "min not given"),
    ("clip_param { min: 2 max: 1 }", r"min \(2\) is greater than clip_param.max \(1\)"),
])
def test_clip_bad_params(params: str, message: str) -> None:
    layer = make_layer("Clip", params)
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob(SHAPE)], tops(1))


# == Swish =========================================================================================
@pytest.mark.parametrize("beta", [1.0, 1.5, 0.0, -0.7])
def test_swish_forward(beta: float) -> None:
    """TestSwish / TestSwishWithBeta (1.5) / TestSwishAsLinear (beta 0 gives x/2)."""
    x = gauss()
    params = f"swish_param {{ beta: {beta} }}" if beta != 1.0 else ""
    y = forward("Swish", x, params)
    np.testing.assert_allclose(y, x / (1 + np.exp(-f32(beta) * x)), rtol=1e-12)
    if beta == 0.0:
        np.testing.assert_array_equal(y, x / 2)


@pytest.mark.parametrize("beta", [1.0, 1.5, 0.0])
def test_swish_gradient(beta: float) -> None:
    """TestSwishGradient / WithBeta / AsLinear: (1e-2, 1e-3, kink 0.01)."""
    check_eltwise("Swish", f"swish_param {{ beta: {beta} }}", gauss(), KINK)


def test_swish_extremes() -> None:
    x = np.array([-1000.0, 0.0, 1000.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, dx, _ = forward_backward("Swish", x, np.ones(3))
    np.testing.assert_array_equal(y, [-0.0, 0.0, 1000.0])
    np.testing.assert_allclose(dx, [0.0, 0.5, 1.0])


# == in place ======================================================================================
IN_PLACE = [
    ("PReLU", "prelu_param { filler { type: 'gaussian' } }", gauss),
    ("PReLU", "prelu_param { channel_shared: true }", gauss),
    ("ELU", "", gauss), ("ELU", "elu_param { alpha: 0 }", gauss),
    ("ELU", "elu_param { alpha: -0.4 }", gauss),
    ("AbsVal", "", gauss), ("BNLL", "", gauss),
    ("Power", power_params(0.37, 0.83, 0.0), lambda: np.abs(gauss())),
    ("Power", power_params(2.0, 0.5, -2.4), gauss),
    ("Power", power_params(1.0, 0.83, -2.4), gauss),
    ("Power", power_params(0.0, 0.83, -2.4), gauss),
    ("Power", power_params(3.0, 0.0, 2.0), gauss),
    ("Exp", exp_params(2, 3, 1), gauss), ("Log", exp_params(2, 3, 1, "log"), log_bottom),
    ("Clip", "clip_param { min: -1 max: 0.5 }", gauss),
    ("Swish", "", gauss), ("Swish", "swish_param { beta: 1.5 }", gauss),
]


@pytest.mark.parametrize(("type_name", "params", "make_x"), IN_PLACE,
                         ids=[f"{t}-{i}" for i, (t, _, _) in enumerate(IN_PLACE)])
def test_in_place_matches_out_of_place(type_name: str, params: str,
                                       make_x: Callable[[], np.ndarray]) -> None:
    """Every neuron layer runs with top == bottom and gives the same top, bottom diff and param
    diffs as out of place (Caffe refuses AbsVal in place; here it works)."""
    x, dy = make_x(), gauss(seed=7)
    y1, dx1, p1 = forward_backward(type_name, x, dy, params)
    y2, dx2, p2 = forward_backward(type_name, x, dy, params, in_place=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(dx1, dx2)
    for a, b in zip(p1, p2, strict=True):
        np.testing.assert_array_equal(a, b)


def test_threshold_in_place() -> None:
    x = gauss()
    bottom = [blob(data=x)]
    run_forward(make_layer("Threshold", "threshold_param { threshold: 0.3 }"), bottom, bottom)
    np.testing.assert_array_equal(bottom[0].data, (x > f32(0.3)).astype(np.float64))


# Layers whose backward reads only x (kept when in place) or nothing, then one that reads its
# top last: as in Caffe, a layer that reads its top in backward (Sigmoid, TanH, ELU, BNLL, Exp,
# Swish) needs no later layer to overwrite that blob in place.
CHAIN = [
    ("PReLU", "prelu_param { filler { type: 'gaussian' } }"), ("AbsVal", ""),
    ("Power", "power_param { power: 1.5 scale: 0.5 shift: 1 }"),
    ("Log", "log_param { base: 2 shift: 0.5 }"), ("Clip", "clip_param { min: 0.7 max: 1.3 }"),
    ("Swish", "swish_param { beta: 1.5 }"),
]


def chain_net(in_place: bool) -> Net:
    text = """force_backward: true
    layer { name: "input" type: "Input" top: "x0" top: "y"
            input_param { shape { dim: 2 dim: 3 dim: 2 dim: 2 } shape { dim: 2 dim: 3 dim: 2
                                                                           dim: 2 } } }
    """
    for i, (type_name, params) in enumerate(CHAIN):
        b, t = ("x0", "x0") if in_place else (f"x{i}", f"x{i + 1}")
        text += (f'layer {{ name: "l{i}" type: "{type_name}" bottom: "{b}" top: "{t}" '
                 f"{params} }}\n")
    last = "x0" if in_place else f"x{len(CHAIN)}"
    text += f'layer {{ name: "loss" type: "EuclideanLoss" bottom: "{last}" bottom: "y" }}\n'
    p = pb.NetParameter()
    text_format.Parse(text, p)
    return Net(p, "TRAIN", verbose=False, backend=NumpyBackend("float64"), seed=1701)


def test_in_place_chain_in_a_net() -> None:
    """A net that chains neuron layers in place on one blob gives the same loss, input gradient
    and slope gradient as the same net with a blob per layer."""
    x, y = gauss((2, 3, 2, 2)), gauss((2, 3, 2, 2), seed=9) + 1.0
    results = []
    for in_place in (False, True):
        net = chain_net(in_place)
        net.forward(x0=x, y=y)
        loss = net.loss
        net.clear_param_diffs()
        net.backward()
        prelu = net.params["l0"][0]
        dx = net.blobs["x0"].diff.copy()
        results.append((loss, dx, prelu.diff.copy()))
        assert np.abs(dx).sum() > 0 and np.abs(prelu.diff).sum() > 0
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])


# == PyTorch oracle (float64, forward and backward) ================================================
def run_layer(layer: Layer, x: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                     list[Blob]]:
    bottom, top = [blob(data=x)], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    return top[0].data.copy(), bottom[0].diff.copy(), layer.blobs


def torch_compare(torch: Any, type_name: str, params: str, x: np.ndarray,
                  fn: Callable[[Any], Any]) -> None:
    """Forward and bottom gradient of one layer against ``fn`` on a float64 tensor."""
    dy = gauss(x.shape, seed=11)
    y, dx, _ = run_layer(make_layer(type_name, params), x, dy)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yt = fn(xt)
    yt.backward(torch.tensor(dy, dtype=torch.float64))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
def test_torch_prelu(shared: bool) -> None:
    torch = pytest.importorskip("torch")
    x, dy = gauss(), gauss(seed=11)
    params = (f"prelu_param {{ channel_shared: {str(shared).lower()} "
              "filler { type: 'uniform' min: -0.5 max: 0.5 } }")
    y, dx, blobs = run_layer(make_layer("PReLU", params), x, dy)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(blobs[0].data.copy(), requires_grad=True)
    yt = torch.nn.functional.prelu(xt, wt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(blobs[0].diff, wt.grad.numpy(), rtol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_torch_elu(alpha: float) -> None:
    torch = pytest.importorskip("torch")
    torch_compare(torch, "ELU", f"elu_param {{ alpha: {alpha} }}", gauss(),
                  lambda t: torch.nn.functional.elu(t, alpha=alpha))


def test_torch_absval_and_bnll() -> None:
    torch = pytest.importorskip("torch")
    torch_compare(torch, "AbsVal", "", gauss(), torch.abs)
    x = gauss(std=5.0)
    torch_compare(torch, "BNLL", "", x, lambda t: torch.nn.functional.softplus(t, threshold=50))


@pytest.mark.parametrize(("power", "scale", "shift"), [
    (0.37, 0.83, -2.4), (0.37, 0.83, 0.0), (2.0, 0.5, -2.4), (1.0, 0.83, -2.4), (0.0, 0.83, -2.4),
    (-1.5, 2.0, 0.5), (3.0, -0.7, 0.2),
])
def test_torch_power(power: float, scale: float, shift: float) -> None:
    torch = pytest.importorskip("torch")
    x = gauss()
    if power not in (0.0, 1.0, 2.0, 3.0):
        min_value = -shift / scale  # keep shift + scale·x positive, as Caffe's test does
        x = np.where(x < min_value, 2 * min_value - x, x) + 1e-3
    params = power_params(power, scale, shift)
    p = pb.LayerParameter()
    text_format.Parse(params, p)  # the layer sees float32-rounded fields; so does torch here
    pw, sc, sh = p.power_param.power, p.power_param.scale, p.power_param.shift
    torch_compare(torch, "Power", params, x, lambda t: torch.pow(sh + sc * t, pw))


@pytest.mark.parametrize(("base", "scale", "shift"), [*EXP_LOG_CASES, (0.5, -1.5, 0.25)])
def test_torch_exp_log(base: float, scale: float, shift: float) -> None:
    torch = pytest.importorskip("torch")
    b = math.e if base == -1 else base
    torch_compare(torch, "Exp", exp_params(base, scale, shift), gauss(),
                  lambda t: torch.pow(torch.tensor(b, dtype=torch.float64), shift + scale * t))
    x = -0.3 * log_bottom() if scale < 0 else log_bottom()  # shift + scale·x > 0
    torch_compare(torch, "Log", exp_params(base, scale, shift, "log"), x,
                  lambda t: torch.log(shift + scale * t) / math.log(b))


def test_torch_clip() -> None:
    torch = pytest.importorskip("torch")
    x = nudge_off(gauss(std=2.0), [-1.0, 2.0, 1.0])
    torch_compare(torch, "Clip", "clip_param { min: -1 max: 2 }", x,
                  lambda t: torch.clamp(t, -1.0, 2.0))
    torch_compare(torch, "Clip", "clip_param { min: -1 max: 1 }", x,
                  torch.nn.functional.hardtanh)


@pytest.mark.parametrize("beta", [1.0, 1.5, 0.0, -0.7])
def test_torch_swish(beta: float) -> None:
    torch = pytest.importorskip("torch")
    if beta == 1.0:
        torch_compare(torch, "Swish", "", gauss(), torch.nn.functional.silu)
    p = pb.LayerParameter()
    text_format.Parse(f"swish_param {{ beta: {beta} }}", p)
    bt = p.swish_param.beta
    torch_compare(torch, "Swish", f"swish_param {{ beta: {beta} }}", gauss(),
                  lambda t: t * torch.sigmoid(bt * t))


def test_torch_threshold_forward() -> None:
    torch = pytest.importorskip("torch")
    x = gauss()
    y = forward("Threshold", x, "threshold_param { threshold: 0.2 }")
    expected = torch.heaviside(torch.tensor(x) - f32(0.2), torch.tensor(0.0, dtype=torch.float64))
    np.testing.assert_array_equal(y, expected.numpy())


# == dtype =========================================================================================
@pytest.mark.parametrize("type_name", sorted(GRAD_CHECKED | NO_BACKWARD))
def test_float32_keeps_dtype(type_name: str) -> None:
    params = {"Clip": "clip_param { min: -1 max: 1 }", "Log": "log_param { shift: 5 }"}
    layer = make_layer(type_name, params.get(type_name, ""), dtype="float32")
    bottom, top = [blob(SHAPE, dtype="float32")], tops(1, dtype="float32")
    run_forward(layer, bottom, top)
    assert top[0].data.dtype == np.float32
    assert all(b.data.dtype == np.float32 for b in layer.blobs)
    if layer.has_backward:
        top[0].diff[...] = 1.0
        layer.backward(top, [True], bottom)
        assert bottom[0].diff.dtype == np.float32
        assert np.isfinite(bottom[0].diff).all()
