"""Utility layers: Softmax, Flatten, Split, Concat, Eltwise."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from tests.helpers import blob, make_layer, run_forward, tops

GRAD_CHECKED: set[str] = {"Softmax", "Flatten", "Split", "Concat", "Eltwise"}
NO_BACKWARD: set[str] = set()


def forward(type_name: str, bottom: list, params: str = "", n_top: int = 1) -> list:
    layer = make_layer(type_name, params)
    top = tops(n_top)
    run_forward(layer, bottom, top)
    return top


def gradcheck(type_name: str, bottom: list, params: str = "", n_top: int = 1,
              exhaustive: bool = False) -> None:
    layer = make_layer(type_name, params)
    checker = GradientChecker(1e-2, 1e-3)
    run = checker.check_exhaustive if exhaustive else checker.check
    top = tops(n_top)
    result = run(layer, bottom, top)
    assert result.ok, result.failures[:3]
    per_pass = sum(b.count for b in bottom)
    assert result.checked == per_pass * (sum(t.count for t in top) if exhaustive else 1)


# -- Softmax ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 2, -1, 0])
def test_softmax_forward(axis: int) -> None:
    x = blob((2, 3, 4), low=-5, high=5).data
    y = forward("Softmax", [blob(data=x)], f"softmax_param {{ axis: {axis} }}")[0].data
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    np.testing.assert_allclose(y, e / e.sum(axis=axis, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(y.sum(axis=axis), 1.0)


def test_softmax_large_inputs_are_stable() -> None:
    y = forward("Softmax", [blob(data=np.array([[1000.0, 1000.0, -1000.0]]))])[0].data
    np.testing.assert_allclose(y, [[0.5, 0.5, 0.0]])


@pytest.mark.parametrize("axis", [1, 2])
def test_softmax_gradient(axis: int) -> None:
    gradcheck("Softmax", [blob((2, 3, 2, 2))], f"softmax_param {{ axis: {axis} }}",
              exhaustive=True)


def test_softmax_bad_axis() -> None:
    with pytest.raises(LayerError, match=r"softmax_param\.axis"):
        forward("Softmax", [blob((2, 3))], "softmax_param { axis: 2 }")


# -- Flatten ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "expected"), [
    ("", (2, 60)),
    ("flatten_param { axis: 2 }", (2, 3, 20)),
    ("flatten_param { axis: 1 end_axis: 2 }", (2, 12, 5)),
    ("flatten_param { axis: -2 }", (2, 3, 20)),
    ("flatten_param { axis: 0 end_axis: -2 }", (24, 5)),
    ("flatten_param { axis: 2 end_axis: 2 }", (2, 3, 4, 5)),
])
def test_flatten_shapes(params: str, expected: tuple) -> None:
    x = blob((2, 3, 4, 5)).data
    top = forward("Flatten", [blob(data=x)], params)[0]
    assert top.shape == expected
    np.testing.assert_array_equal(top.data, x.reshape(expected))


def test_flatten_top_is_a_copy() -> None:
    bottom = [blob((2, 3, 4))]
    top = forward("Flatten", bottom)
    top[0].data[...] = 7
    assert not np.any(bottom[0].data == 7)


def test_flatten_gradient() -> None:
    gradcheck("Flatten", [blob((2, 3, 2, 2))], "flatten_param { axis: 1 end_axis: 2 }")


def test_flatten_end_before_axis() -> None:
    with pytest.raises(LayerError, match="end_axis"):
        forward("Flatten", [blob((2, 3, 4))], "flatten_param { axis: 2 end_axis: 1 }")


def test_flatten_refuses_in_place() -> None:
    b = blob((2, 3))
    with pytest.raises(LayerError, match="in-place"):
        run_forward(make_layer("Flatten"), [b], [b])


# -- Split -----------------------------------------------------------------------------------------
def test_split_forward_backward() -> None:
    x = blob((2, 3, 4)).data
    layer = make_layer("Split")
    bottom, top = [blob(data=x)], tops(3)
    run_forward(layer, bottom, top)
    for t in top:
        np.testing.assert_array_equal(t.data, x)
    for k, t in enumerate(top):
        t.diff[...] = k + 1.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, np.full(x.shape, 6.0))


def test_split_gradient() -> None:
    gradcheck("Split", [blob((2, 3, 2))], n_top=2)


# -- Concat ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "axis"), [
    ("", 1), ("concat_param { axis: 0 }", 0), ("concat_param { axis: -1 }", 2),
    ("concat_param { concat_dim: 0 }", 0),
])
def test_concat_forward(params: str, axis: int) -> None:
    shapes = {0: [(2, 3, 4), (1, 3, 4), (3, 3, 4)], 1: [(2, 3, 4), (2, 1, 4), (2, 2, 4)],
              2: [(2, 3, 4), (2, 3, 1), (2, 3, 2)]}[axis]
    xs = [blob(s, seed=i).data for i, s in enumerate(shapes)]
    top = forward("Concat", [blob(data=x) for x in xs], params)[0]
    np.testing.assert_array_equal(top.data, np.concatenate(xs, axis=axis))


@pytest.mark.parametrize(("axis", "shapes"), [
    (0, [(2, 3, 2), (1, 3, 2)]),
    (1, [(2, 3, 2), (2, 1, 2), (2, 2, 2)]),
])
def test_concat_gradient(axis: int, shapes: list) -> None:
    gradcheck("Concat", [blob(s, seed=i) for i, s in enumerate(shapes)],
              f"concat_param {{ axis: {axis} }}")


def test_concat_backward_respects_propagate_down() -> None:
    layer = make_layer("Concat")
    bottom, top = [blob((2, 1)), blob((2, 2))], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff[...] = np.arange(6.0).reshape(2, 3)
    layer.backward(top, [False, True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0)
    np.testing.assert_array_equal(bottom[1].diff, [[1, 2], [4, 5]])


def test_concat_shape_mismatch() -> None:
    with pytest.raises(LayerError, match=r"\(2, 3, 4\) vs \(2, 3, 5\)"):
        forward("Concat", [blob((2, 3, 4)), blob((2, 3, 5))])
    with pytest.raises(LayerError, match=r"\(2, 3\) vs \(2, 3, 1\)"):
        forward("Concat", [blob((2, 3)), blob((2, 3, 1))])


def test_concat_axis_and_concat_dim_conflict() -> None:
    with pytest.raises(LayerError, match="not both"):
        forward("Concat", [blob((2, 3)), blob((2, 3))], "concat_param { axis: 1 concat_dim: 1 }")


# -- Eltwise ---------------------------------------------------------------------------------------
SHAPE = (2, 3, 2)


def three(low: float = -1.0, high: float = 1.0) -> list:
    return [blob(SHAPE, seed=s, low=low, high=high) for s in (1, 2, 3)]


def test_eltwise_forward() -> None:
    xs = [b.data for b in three()]
    prod = forward("Eltwise", three(), "eltwise_param { operation: PROD }")[0].data
    np.testing.assert_allclose(prod, xs[0] * xs[1] * xs[2])
    plain = forward("Eltwise", three())[0].data  # SUM is the default
    np.testing.assert_allclose(plain, xs[0] + xs[1] + xs[2])
    weighted = forward("Eltwise", three(),
                       "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }")[0].data
    np.testing.assert_allclose(weighted, xs[0] - 0.5 * xs[1] + 2 * xs[2])
    mx = forward("Eltwise", three(), "eltwise_param { operation: MAX }")[0].data
    np.testing.assert_array_equal(mx, np.maximum(np.maximum(xs[0], xs[1]), xs[2]))


@pytest.mark.parametrize("params", [
    "eltwise_param { operation: SUM coeff: 1 coeff: -0.5 coeff: 2 }",
    "eltwise_param { operation: SUM }",
    "eltwise_param { operation: PROD }",
    "eltwise_param { operation: PROD stable_prod_grad: false }",
])
def test_eltwise_gradient(params: str) -> None:
    gradcheck("Eltwise", three(low=0.1, high=1.0) if "PROD" in params else three(), params)


def test_eltwise_max_gradient() -> None:
    # Separate the bottoms by more than the step so no finite difference crosses a max.
    rng = np.random.default_rng(5)
    offsets = np.stack([rng.permutation([0.0, 0.3, 0.6]) for _ in range(12)], axis=1)
    bottom = [blob(data=(rng.uniform(-1, 1, 12) * 0.01 + off).reshape(SHAPE))
              for off in offsets]
    gradcheck("Eltwise", bottom, "eltwise_param { operation: MAX }")


def test_eltwise_max_routes_ties_like_caffe() -> None:
    # Caffe's mask: bottom 1 wins a tie with bottom 0; later bottoms must be strictly greater.
    a, b, c = np.array([1.0, 1.0, 2.0, 0.0]), np.array([1.0, 0.0, 2.0, 0.0]), \
        np.array([0.0, 1.0, 2.0, 0.0])
    layer = make_layer("Eltwise", "eltwise_param { operation: MAX }")
    bottom, top = [blob(data=a), blob(data=b), blob(data=c)], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True] * 3, bottom)
    np.testing.assert_array_equal(bottom[0].diff, [0, 1, 0, 0])
    np.testing.assert_array_equal(bottom[1].diff, [1, 0, 1, 1])
    np.testing.assert_array_equal(bottom[2].diff, [0, 0, 0, 0])


@pytest.mark.parametrize(("params", "message"), [
    ("eltwise_param { coeff: 1 coeff: 2 }", "one coeff per bottom"),
    ("eltwise_param { operation: PROD coeff: 1 coeff: 2 coeff: 3 }", "only for SUM"),
])
def test_eltwise_bad_coeff(params: str, message: str) -> None:
    with pytest.raises(LayerError, match=message):
        forward("Eltwise", three(), params)


def test_eltwise_shape_mismatch() -> None:
    with pytest.raises(LayerError, match=r"\(2, 3\) vs \(3, 2\)"):
        forward("Eltwise", [blob((2, 3)), blob((3, 2))])
