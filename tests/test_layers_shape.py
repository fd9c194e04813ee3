"""Shape and utility layers: Reshape, Slice, Silence, ArgMax, Reduction, Tile, Crop,
BatchReindex, Filter, Parameter, Embed (cases from Caffe's test_*_layer.cpp where they exist)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from google.protobuf import text_format

from netforge import Net
from netforge.backend import NumpyBackend
from netforge.blob import Blob
from netforge.gradcheck import GradientChecker, GradResult
from netforge.layers import LayerError
from netforge.layers.base import Layer
from netforge.proto import pb
from tests.helpers import blob, make_layer, run_forward, tops

GRAD_CHECKED: set[str] = {"Reshape", "Slice", "Silence", "Reduction", "Tile", "Crop",
                          "BatchReindex", "Filter", "Parameter", "Embed"}
NO_BACKWARD: set[str] = {"ArgMax"}


def forward(type_name: str, bottom: list, params: str = "", n_top: int = 1) -> list:
    layer = make_layer(type_name, params)
    top = tops(n_top)
    run_forward(layer, bottom, top)
    return top


def setup(type_name: str, bottom: list, params: str = "", n_top: int = 1) -> list:
    layer = make_layer(type_name, params)
    top = tops(n_top)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    return top


def gradcheck(type_name: str, bottom: list, params: str = "", n_top: int = 1,
              exhaustive: bool = False, check_bottom: int | Sequence[int] = -1,
              stepsize: float = 1e-2, threshold: float = 1e-3,
              layer: Layer | None = None) -> None:
    layer = layer or make_layer(type_name, params)
    checker = GradientChecker(stepsize, threshold)
    run = checker.check_exhaustive if exhaustive else checker.check
    result = run(layer, bottom, tops(n_top), check_bottom)
    assert result.ok, result.failures[:3]
    assert result.checked > 0


def seeded(shape: tuple, seed: int = 1701) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def away_from_zero(shape: tuple, seed: int = 1701) -> np.ndarray:
    """Values with |x| in [0.1, 1): no finite difference step crosses 0 (for |x|)."""
    rng = np.random.default_rng(seed)
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(0.1, 1.0, size=shape)


def torch_check(layer: Layer, bottom: list, top: list, fn, grad_bottoms: Sequence[int] = (0,),
                params: bool = False, seed: int = 7) -> None:
    """Compare forward and backward (a random top diff) with ``fn(*torch bottoms, *params)``."""
    torch = pytest.importorskip("torch")
    run_forward(layer, bottom, top)
    rng = np.random.default_rng(seed)
    for t in top:
        t.diff[...] = rng.normal(size=t.shape)
    for p in layer.blobs:
        p.diff[...] = 0
    layer.backward(top, [i in grad_bottoms for i in range(len(bottom))], bottom)
    xs = [torch.tensor(b.data, dtype=torch.float64, requires_grad=i in grad_bottoms)
          for i, b in enumerate(bottom)]
    ps = [torch.tensor(p.data, dtype=torch.float64, requires_grad=True) for p in layer.blobs]
    outs = fn(*xs, *ps) if params else fn(*xs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    assert len(outs) == len(top)
    for out, t in zip(outs, top, strict=True):
        assert tuple(out.shape) == t.shape
        np.testing.assert_allclose(t.data, out.detach().numpy(), rtol=1e-6, atol=1e-12)
    torch.autograd.backward(outs, [torch.tensor(t.diff) for t in top])
    for i in grad_bottoms:
        np.testing.assert_allclose(bottom[i].diff, xs[i].grad.numpy(), rtol=1e-6, atol=1e-12)
    for p, tp in zip(layer.blobs, ps, strict=True):
        np.testing.assert_allclose(p.diff, tp.grad.numpy(), rtol=1e-6, atol=1e-12)


# -- Reshape ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "expected"), [
    # Caffe's test_reshape_layer.cpp on a (2, 3, 6, 5) bottom
    ("shape { dim: 0 dim: -1 dim: 1 dim: 1 }", (2, 90, 1, 1)),          # TestFlattenOutputSizes
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", (2, 3, 6, 5)),            # TestCopyDimensions
    ("shape { dim: 0 dim: 3 dim: 10 dim: -1 }", (2, 3, 10, 3)),         # TestInferenceOfUnspecified
    ("axis: 1 shape { dim: 3 dim: 10 dim: -1 }", (2, 3, 10, 3)),        # ...WithStartAxis
    ("axis: 0 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (1, 1, 1, 2, 3, 6, 5)),
    ("axis: 2 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (2, 3, 1, 1, 1, 6, 5)),
    ("axis: -1 num_axes: 0 shape { dim: 1 dim: 1 dim: 1 }", (2, 3, 6, 5, 1, 1, 1)),
    ("axis: 1 num_axes: 2 shape { dim: -1 }", (2, 18, 5)),              # TestFlattenMiddle
    ("shape { dim: 6 dim: 2 dim: 3 dim: 5 }", (6, 2, 3, 5)),            # TestForward
    ("axis: -2 shape { dim: -1 }", (2, 3, 6, 5)),
    ("axis: 1 num_axes: 1 shape { dim: 0 dim: 1 }", (2, 3, 1, 6, 5)),
    ("shape { dim: -1 }", (180,)),
])
def test_reshape_shapes_and_values(params: str, expected: tuple) -> None:
    x = seeded((2, 3, 6, 5))
    top = forward("Reshape", [blob(data=x)], f"reshape_param {{ {params} }}")[0]
    assert top.shape == expected
    np.testing.assert_array_equal(top.data, x.reshape(expected))


def test_reshape_flatten_values() -> None:
    # TestFlattenValues: top(n, c, 0, 0) == bottom(n, c / 30, (c / 5) % 6, c % 5)
    x = seeded((2, 3, 6, 5))
    top = forward("Reshape", [blob(data=x)],
                  "reshape_param { shape { dim: 0 dim: -1 dim: 1 dim: 1 } }")[0]
    for c in range(90):
        for n in range(2):
            assert top.data[n, c, 0, 0] == x[n, c // 30, (c // 5) % 6, c % 5]


def test_reshape_top_shares_data_and_diff() -> None:
    bottom = [blob((2, 3, 4))]
    top = forward("Reshape", bottom, "reshape_param { shape { dim: 0 dim: -1 } }")
    bottom[0].data[1, 2, 3] = 42.0
    assert top[0].data[1, 11] == 42.0
    top[0].diff[0, 5] = 7.0
    assert bottom[0].diff[0, 1, 1] == 7.0


def test_reshape_forward_after_bottom_reshape() -> None:
    # TestForwardAfterReshape
    layer = make_layer("Reshape", "reshape_param { shape { dim: 6 dim: 2 dim: 3 dim: 5 } }")
    bottom, top = [blob(data=seeded((2, 3, 6, 5)))], tops(1)
    run_forward(layer, bottom, top)
    bottom[0].reshape((180,))
    layer.reshape(bottom, top)
    bottom[0].data[...] = seeded((180,), seed=3)
    layer.forward(bottom, top)
    np.testing.assert_array_equal(top[0].data.reshape(-1), bottom[0].data)
    assert top[0].shape == (6, 2, 3, 5)


def test_reshape_backward_copies_if_arrays_were_replaced() -> None:
    layer = make_layer("Reshape", "reshape_param { shape { dim: -1 } }")
    bottom, top = [blob((2, 3))], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff = np.arange(6.0)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, np.arange(6.0).reshape(2, 3))


def test_reshape_gradient() -> None:
    # Caffe: CheckGradientEltwise with (1e-2, 1e-2)
    layer = make_layer("Reshape", "reshape_param { shape { dim: 6 dim: 2 dim: 3 dim: 5 } }")
    result = GradientChecker(1e-2, 1e-2).check_eltwise(layer, [blob(data=seeded((2, 3, 6, 5)))],
                                                       tops(1))
    assert result.ok and result.checked == 180
    gradcheck("Reshape", [blob((2, 3, 2))], "reshape_param { axis: 1 shape { dim: -1 } }")


@pytest.mark.parametrize(("params", "match"), [
    ("shape { dim: -1 dim: -1 }", "more than one -1"),
    ("shape { dim: 7 dim: -1 }", r"not divisible by the product of the other dims \(7\)"),
    ("shape { dim: 5 dim: 5 }", r"has 25 elements but the bottom \(2, 3, 4\) has 24"),
    ("shape { dim: 0 dim: 0 dim: 0 dim: 0 }", "no axis 3 to copy"),
    ("axis: 4 shape { dim: 1 }", r"reshape_param\.axis 4 is out of range"),
    ("axis: -5 shape { dim: 1 }", r"reshape_param\.axis -5 is out of range"),
    ("axis: 1 num_axes: 3 shape { dim: -1 }", "axis \\+ num_axes"),
    ("shape { dim: -2 dim: 12 }", "dim -2 is invalid"),
    ("num_axes: -2 shape { dim: -1 }", "num_axes must be >= 0"),
])
def test_reshape_bad_params(params: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("Reshape", [blob((2, 3, 4))], f"reshape_param {{ {params} }}")


def test_reshape_refuses_in_place() -> None:
    b = blob((2, 3))
    with pytest.raises(LayerError, match="in-place"):
        run_forward(make_layer("Reshape", "reshape_param { shape { dim: -1 } }"), [b], [b])


def test_reshape_torch_oracle() -> None:
    layer = make_layer("Reshape", "reshape_param { axis: 1 shape { dim: 0 dim: -1 dim: 2 } }")
    torch_check(layer, [blob((2, 3, 4, 2))], tops(1), lambda x: x.reshape(2, 3, 4, 2))
    layer = make_layer("Reshape", "reshape_param { shape { dim: 4 dim: -1 } }")
    torch_check(layer, [blob((2, 3, 4))], tops(1), lambda x: x.reshape(4, 6))


# -- Slice -----------------------------------------------------------------------------------------
SLICE_SHAPE = (6, 12, 2, 3)  # Caffe's test_slice_layer.cpp bottom


@pytest.mark.parametrize(("params", "n_top", "shapes"), [
    ("slice_param { axis: 0 }", 3, [(2, 12, 2, 3)] * 3),                        # TestSetupNum
    ("slice_param { slice_point: 3 }", 2, [(6, 3, 2, 3), (6, 9, 2, 3)]),         # SetupChannels
    ("", 1, [SLICE_SHAPE]),                                                     # TrivialSlice
    ("slice_param { slice_dim: 0 }", 2, [(3, 12, 2, 3)] * 2),                   # AcrossNum
    ("slice_param { slice_point: 2 slice_point: 8 }", 3,                       # AcrossChannels
     [(6, 2, 2, 3), (6, 6, 2, 3), (6, 4, 2, 3)]),
    ("slice_param { axis: -1 slice_point: 1 }", 2, [(6, 12, 2, 1), (6, 12, 2, 2)]),
    ("slice_param { axis: 2 }", 2, [(6, 12, 1, 3)] * 2),
])
def test_slice_forward(params: str, n_top: int, shapes: list) -> None:
    x = seeded(SLICE_SHAPE)
    top = forward("Slice", [blob(data=x)], params, n_top)
    assert [t.shape for t in top] == shapes
    axis = next(i for i in range(4) if shapes[0][i] != SLICE_SHAPE[i]) if n_top > 1 else 1
    np.testing.assert_array_equal(np.concatenate([t.data for t in top], axis=axis), x)


def test_slice_point_at_the_end_gives_an_empty_top() -> None:
    # Caffe accepts a last slice_point equal to the axis size: the last top is empty.
    top = forward("Slice", [blob((2, 4))], "slice_param { slice_point: 4 }", 2)
    assert [t.shape for t in top] == [(2, 4), (2, 0)]


@pytest.mark.parametrize(("params", "n_top"), [
    ("slice_param { axis: 0 }", 2),
    ("slice_param { slice_point: 1 slice_point: 3 }", 3),
    ("slice_param { axis: -1 slice_point: 1 }", 2),
])
def test_slice_gradient(params: str, n_top: int) -> None:
    gradcheck("Slice", [blob((2, 4, 2))], params, n_top, exhaustive=True)


def test_slice_backward_fills_every_region() -> None:
    layer = make_layer("Slice", "slice_param { slice_point: 1 }")
    bottom, top = [blob((2, 3))], tops(2)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    top[1].diff[...] = 2.0
    bottom[0].diff[...] = 9.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(bottom[0].diff, [[1, 2, 2], [1, 2, 2]])


@pytest.mark.parametrize(("params", "n_top", "match"), [
    ("slice_param { slice_point: 2 }", 3, r"3 tops takes 2 slice_point\(s\), got 1"),
    ("slice_param { slice_point: 3 slice_point: 2 }", 3, "strictly increasing"),
    ("slice_param { slice_point: 0 }", 2, "positive and strictly increasing"),
    ("slice_param { slice_point: 5 }", 2, "slice_point 5 is beyond axis 1 of size 4"),
    ("", 3, r"number of tops \(3\) must evenly divide axis 1 of size 4"),
    ("slice_param { axis: 1 slice_dim: 1 }", 2, "not both"),
    ("slice_param { axis: 3 }", 2, r"slice_param\.axis 3 is out of range"),
    ("slice_param { slice_dim: 3 }", 2, "slice_dim 3 is out of range"),
    ("slice_param { axis: 0 slice_point: 1 slice_point: 2 }", 3,
     "cannot slice axis 0 of size 2 into 3 tops"),
])
def test_slice_bad_params(params: str, n_top: int, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("Slice", [blob((2, 4, 3))], params, n_top)


def test_slice_torch_oracle() -> None:
    layer = make_layer("Slice", "slice_param { axis: 2 slice_point: 1 slice_point: 4 }")
    torch_check(layer, [blob((2, 3, 6))], tops(3), lambda x: x.split([1, 3, 2], dim=2))
    layer = make_layer("Slice", "slice_param { axis: 0 }")
    torch_check(layer, [blob((4, 3))], tops(2),
                lambda x: (x.narrow(0, 0, 2), x.narrow(0, 2, 2)))


# -- Silence ---------------------------------------------------------------------------------------
def test_silence_has_no_tops_and_zeroes_diffs() -> None:
    layer = make_layer("Silence")
    assert layer.check_counts(2, 0) is None
    assert "exactly 0 top" in (layer.check_counts(1, 1) or "")
    assert "at least 1 bottom" in (layer.check_counts(0, 0) or "")
    bottom = [blob((2, 3)), blob((4,), seed=2)]
    before = [b.data.copy() for b in bottom]
    run_forward(layer, bottom, [])
    for b, x in zip(bottom, before, strict=True):
        np.testing.assert_array_equal(b.data, x)
        b.diff[...] = 5.0
    layer.backward([], [True, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0.0)
    np.testing.assert_array_equal(bottom[1].diff, 5.0)


def test_silence_gradient() -> None:
    gradcheck("Silence", [blob((2, 3)), blob((3,), seed=2)], n_top=0)


# -- ArgMax ----------------------------------------------------------------------------------------
ARGMAX_SHAPE = (10, 10, 20, 20)  # Caffe's test_argmax_layer.cpp bottom (gaussian)


@pytest.fixture(scope="module")
def argmax_x() -> np.ndarray:
    return seeded(ARGMAX_SHAPE)


@pytest.mark.parametrize(("params", "shape"), [
    ("", (10, 1, 1, 1)),                                          # TestSetup
    ("argmax_param { out_max_val: true }", (10, 2, 1, 1)),         # TestSetupMaxVal
    ("argmax_param { top_k: 5 }", (10, 1, 5, 1)),
    ("argmax_param { axis: 0 }", (1, 10, 20, 20)),                 # TestSetupAxis
    ("argmax_param { axis: -2 }", (10, 10, 1, 20)),                # ...NegativeIndexing
    ("argmax_param { axis: 2 out_max_val: true }", (10, 10, 1, 20)),
])
def test_argmax_shapes(argmax_x: np.ndarray, params: str, shape: tuple) -> None:
    assert setup("ArgMax", [blob(data=argmax_x)], params)[0].shape == shape


def test_argmax_without_axis_on_small_bottoms_has_three_axes() -> None:
    assert setup("ArgMax", [blob((4, 6))], "argmax_param { top_k: 2 }")[0].shape == (4, 1, 2)
    assert setup("ArgMax", [blob((4, 6))],
                 "argmax_param { out_max_val: true top_k: 3 }")[0].shape == (4, 2, 3)


@pytest.mark.parametrize("out_max_val", [False, True])
@pytest.mark.parametrize("top_k", [1, 5])
def test_argmax_flat(argmax_x: np.ndarray, out_max_val: bool, top_k: int) -> None:
    # TestCPU, TestCPUMaxVal, TestCPUTopK, TestCPUMaxValTopK
    params = f"argmax_param {{ top_k: {top_k} out_max_val: {str(out_max_val).lower()} }}"
    top = forward("ArgMax", [blob(data=argmax_x)], params)[0].data
    flat = argmax_x.reshape(10, -1)
    for i in range(10):
        for j in range(top_k):
            index = int(top[i, 0, j, 0])
            value = flat[i, index]
            assert (flat[i] > value).sum() == j
            if out_max_val:
                assert top[i, 1, j, 0] == value


@pytest.mark.parametrize(("axis", "top_k", "out_max_val"), [
    (0, 1, False), (2, 5, False), (-1, 5, True), (1, 3, True)])
def test_argmax_axis(argmax_x: np.ndarray, axis: int, top_k: int, out_max_val: bool) -> None:
    # TestCPUAxis, TestCPUAxisTopK, TestCPUAxisMaxValTopK
    params = (f"argmax_param {{ axis: {axis} top_k: {top_k} "
              f"out_max_val: {str(out_max_val).lower()} }}")
    top = forward("ArgMax", [blob(data=argmax_x)], params)[0].data
    order = np.argsort(-argmax_x, axis=axis, kind="stable")
    expected_index = np.take(order, np.arange(top_k), axis=axis)
    expected = (np.take_along_axis(argmax_x, expected_index, axis=axis) if out_max_val
                else expected_index)
    np.testing.assert_array_equal(top, expected)


def test_argmax_known_values_and_ties() -> None:
    # Caffe sorts (value, index) pairs with std::greater: a tie goes to the larger index.
    x = np.array([[1.0, 3.0, 2.0, 0.0], [5.0, 4.0, 5.0, 5.0]])
    top = forward("ArgMax", [blob(data=x)])[0]
    assert top.shape == (2, 1, 1)
    np.testing.assert_array_equal(top.data.reshape(-1), [1, 3])
    top = forward("ArgMax", [blob(data=x)], "argmax_param { out_max_val: true top_k: 3 }")[0]
    np.testing.assert_array_equal(top.data, [[[1, 2, 0], [3, 2, 1]], [[3, 2, 0], [5, 5, 5]]])
    top = forward("ArgMax", [blob(data=x)], "argmax_param { axis: 0 }")[0]
    np.testing.assert_array_equal(top.data, [[1, 1, 1, 1]])
    top = forward("ArgMax", [blob(data=x)], "argmax_param { axis: 1 top_k: 2 out_max_val: true }")
    np.testing.assert_array_equal(top[0].data, [[3, 2], [5, 5]])


def test_argmax_float32() -> None:
    layer = make_layer("ArgMax", "argmax_param { top_k: 2 }", dtype="float32")
    top = tops(1, dtype="float32")
    run_forward(layer, [blob(data=np.array([[0.5, 2.0, 1.0]]), dtype="float32")], top)
    assert top[0].data.dtype == np.float32
    np.testing.assert_array_equal(top[0].data, [[[1, 2]]])


def test_argmax_has_no_backward() -> None:
    layer = make_layer("ArgMax")
    assert not layer.has_backward
    with pytest.raises(LayerError, match="no backward"):
        layer.backward(tops(1), [True], [blob((2, 3))])


@pytest.mark.parametrize(("params", "match"), [
    ("argmax_param { top_k: 0 }", "top_k must be at least 1"),
    ("argmax_param { top_k: 13 }", r"top_k \(13\) exceeds the number of values per item \(12\)"),
    ("argmax_param { axis: 1 top_k: 4 }", r"top_k \(4\) exceeds the size of axis 1 \(3\)"),
    ("argmax_param { axis: 3 }", r"argmax_param\.axis 3 is out of range"),
    ("argmax_param { axis: -4 }", r"argmax_param\.axis -4 is out of range"),
])
def test_argmax_bad_params(params: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("ArgMax", [blob((2, 3, 4))], params)


def test_argmax_torch_topk_oracle() -> None:
    torch = pytest.importorskip("torch")
    x = seeded((3, 4, 5))
    top = forward("ArgMax", [blob(data=x)], "argmax_param { axis: 1 top_k: 3 }")[0].data
    values, index = torch.topk(torch.tensor(x), 3, dim=1)
    np.testing.assert_array_equal(top, index.numpy())
    top = forward("ArgMax", [blob(data=x)],
                  "argmax_param { axis: 1 top_k: 3 out_max_val: true }")[0].data
    np.testing.assert_allclose(top, values.numpy(), rtol=1e-6)
    top = forward("ArgMax", [blob(data=x)], "argmax_param { top_k: 4 out_max_val: true }")[0]
    values, index = torch.topk(torch.tensor(x).reshape(3, -1), 4, dim=1)
    np.testing.assert_array_equal(top.data[:, 0], index.numpy())
    np.testing.assert_allclose(top.data[:, 1], values.numpy(), rtol=1e-6)


# -- Reduction -------------------------------------------------------------------------------------
RED_SHAPE = (2, 3, 4, 5)  # Caffe's test_reduction_layer.cpp bottom (uniform [0, 1])
OPS = {"SUM": lambda x: x.sum(axis=1), "ASUM": lambda x: np.abs(x).sum(axis=1),
       "SUMSQ": lambda x: (x * x).sum(axis=1), "MEAN": lambda x: x.mean(axis=1)}


@pytest.mark.parametrize(("axis", "shape"), [(0, ()), (1, (2,)), (2, (2, 3)), (-1, (2, 3, 4))])
def test_reduction_shapes(axis: int, shape: tuple) -> None:
    # TestSetUp, TestSetUpWithAxis1, TestSetUpWithAxis2
    top = setup("Reduction", [blob(RED_SHAPE)], f"reduction_param {{ axis: {axis} }}")[0]
    assert top.shape == shape


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("coeff", [1.0, 2.3])
@pytest.mark.parametrize("axis", [0, 1])
def test_reduction_forward(op: str, coeff: float, axis: int) -> None:
    x = blob(RED_SHAPE, low=0.0, high=1.0).data
    top = forward("Reduction", [blob(data=x)],
                  f"reduction_param {{ operation: {op} coeff: {coeff} axis: {axis} }}")[0]
    num = int(np.prod(RED_SHAPE[:axis]))
    expected = OPS[op](x.reshape(num, -1)) * np.float32(coeff)
    np.testing.assert_allclose(top.data.reshape(-1), expected, rtol=1e-12)


def test_reduction_known_values() -> None:
    x = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    expected = {"SUM": [2, -5], "ASUM": [6, 15], "SUMSQ": [14, 77], "MEAN": [2 / 3, -5 / 3]}
    for op, values in expected.items():
        top = forward("Reduction", [blob(data=x)],
                      f"reduction_param {{ operation: {op} axis: 1 }}")[0]
        np.testing.assert_allclose(top.data, values)
    top = forward("Reduction", [blob(data=x)], "reduction_param { coeff: 0.5 }")[0]
    assert top.shape == () and float(top.data) == -1.5


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize(("coeff", "axis"), [(1.0, 0), (2.3, 0), (2.3, 1), (-0.5, 3)])
def test_reduction_gradient(op: str, coeff: float, axis: int) -> None:
    # Caffe: CheckGradientExhaustive with (1e-2, 2e-3)
    x = away_from_zero((2, 3, 2, 2))
    gradcheck("Reduction", [blob(data=x)],
              f"reduction_param {{ operation: {op} coeff: {coeff} axis: {axis} }}",
              exhaustive=True, threshold=2e-3)


def test_reduction_bad_axis() -> None:
    with pytest.raises(LayerError, match=r"reduction_param\.axis 3 is out of range"):
        forward("Reduction", [blob((2, 3, 4))], "reduction_param { axis: 3 }")


@pytest.mark.parametrize("op", list(OPS))
def test_reduction_torch_oracle(op: str) -> None:
    coeff = float(np.float32(2.3))
    fns = {"SUM": lambda x: x.sum(dim=(2, 3)), "ASUM": lambda x: x.abs().sum(dim=(2, 3)),
           "SUMSQ": lambda x: (x * x).sum(dim=(2, 3)), "MEAN": lambda x: x.mean(dim=(2, 3))}
    layer = make_layer("Reduction", f"reduction_param {{ operation: {op} axis: 2 coeff: 2.3 }}")
    torch_check(layer, [blob(data=away_from_zero((2, 3, 4, 5)))], tops(1),
                lambda x: fns[op](x) * coeff)


# -- Tile ------------------------------------------------------------------------------------------
TILE_SHAPE = (2, 3, 4, 5)  # Caffe's test_tile_layer.cpp bottom


@pytest.mark.parametrize("tiles", [1, 3])
@pytest.mark.parametrize("axis", [0, 1, 2, 3])
def test_tile_setup(tiles: int, axis: int) -> None:
    # TestTrivialSetup, TestSetup
    top = setup("Tile", [blob(TILE_SHAPE)], f"tile_param {{ axis: {axis} tiles: {tiles} }}")[0]
    expected = list(TILE_SHAPE)
    expected[axis] *= tiles
    assert top.shape == tuple(expected)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_tile_forward(axis: int) -> None:
    # TestForwardNum, TestForwardChannels: top(n, c, ...) == bottom(n % N, c % C, ...)
    x = seeded(TILE_SHAPE)
    top = forward("Tile", [blob(data=x)], f"tile_param {{ axis: {axis} tiles: 3 }}")[0].data
    reps = [1, 1, 1, 1]
    reps[axis] = 3
    np.testing.assert_array_equal(top, np.tile(x, reps))
    a = axis % 4
    for i in range(top.shape[a]):
        np.testing.assert_array_equal(np.take(top, i, axis=a),
                                      np.take(x, i % TILE_SHAPE[a], axis=a))


def test_tile_default_axis_is_1() -> None:
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    top = forward("Tile", [blob(data=x)], "tile_param { tiles: 2 }")[0].data
    np.testing.assert_array_equal(top, [[1, 2, 1, 2], [3, 4, 3, 4]])


@pytest.mark.parametrize(("axis", "tiles"), [(1, 1), (0, 3), (1, 3), (3, 2)])
def test_tile_gradient(axis: int, tiles: int) -> None:
    # Caffe: CheckGradientExhaustive with (1e-2, 1e-2)
    gradcheck("Tile", [blob((2, 3, 2, 2))], f"tile_param {{ axis: {axis} tiles: {tiles} }}",
              exhaustive=True, threshold=1e-2)
    gradcheck("Tile", [blob((2, 3, 2, 2))], f"tile_param {{ axis: {axis} tiles: {tiles} }}")


@pytest.mark.parametrize(("params", "match"), [
    ("tile_param { axis: 1 }", r"tile_param\.tiles .* must be given"),
    ("tile_param { tiles: 0 }", "tiles must be positive, got 0"),
    ("tile_param { tiles: -2 }", "tiles must be positive, got -2"),
    ("tile_param { axis: 3 tiles: 2 }", r"tile_param\.axis 3 is out of range"),
])
def test_tile_bad_params(params: str, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("Tile", [blob((2, 3, 4))], params)


def test_tile_torch_oracle() -> None:
    layer = make_layer("Tile", "tile_param { axis: 1 tiles: 3 }")
    torch_check(layer, [blob((2, 3, 4))], tops(1), lambda x: x.repeat(1, 3, 1))
    layer = make_layer("Tile", "tile_param { axis: -1 tiles: 2 }")
    torch_check(layer, [blob((2, 3, 4))], tops(1), lambda x: x.tile((1, 1, 2)))


# -- Crop ------------------------------------------------------------------------------------------
def crop_bottoms() -> list[Blob]:
    # Caffe's test_crop_layer.cpp: bottom 0 (2, 5, 6, 5) filled with i, bottom 1 (2, 4, 5, 3)
    return [blob(data=np.arange(300.0).reshape(2, 5, 6, 5)), blob((2, 4, 5, 3))]


@pytest.mark.parametrize(("params", "shape"), [
    ("crop_param { axis: 0 }", (2, 4, 5, 3)),     # TestSetupShapeAll
    ("", (2, 5, 5, 3)),                           # TestSetupShapeDefault
    ("crop_param { axis: -1 }", (2, 5, 6, 3)),    # TestSetupShapeNegativeIndexing
])
def test_crop_shapes(params: str, shape: tuple) -> None:
    assert setup("Crop", crop_bottoms(), params)[0].shape == shape


@pytest.mark.parametrize(("params", "offsets"), [
    ("crop_param { axis: 0 }", (0, 0, 0, 0)),                                      # ForwardNum
    ("crop_param { axis: 0 offset: 0 offset: 1 offset: 1 offset: 2 }", (0, 1, 1, 2)),
    ("", (0, 0, 0, 0)),
    ("crop_param { offset: 1 }", (0, 0, 1, 1)),      # one offset for every cropped axis
    ("crop_param { axis: 1 offset: 1 }", (0, 1, 1, 1)),
    ("crop_param { axis: 2 offset: 1 offset: 2 }", (0, 0, 1, 2)),
])
def test_crop_forward_backward(params: str, offsets: tuple) -> None:
    # TestForwardNum(Offsets), TestGradientNum(Offset): top(i) == bottom(i + offset); the diff
    # of the cropped region is the top diff and zero elsewhere.
    layer = make_layer("Crop", params)
    bottom, top = crop_bottoms(), tops(1)
    run_forward(layer, bottom, top)
    x = bottom[0].data
    index = tuple(slice(o, o + s) for o, s in zip(offsets, top[0].shape, strict=True))
    np.testing.assert_array_equal(top[0].data, x[index])
    top[0].diff[...] = top[0].data
    bottom[0].diff[...] = 7.0
    layer.backward(top, [True, True], bottom)
    expected = np.zeros_like(x)
    expected[index] = x[index]
    np.testing.assert_array_equal(bottom[0].diff, expected)
    np.testing.assert_array_equal(bottom[1].diff, 0.0)


def test_crop_5d_and_all_axes() -> None:
    x = seeded((2, 3, 4, 5, 6))
    ref = blob((2, 3, 2, 3, 2))
    top = forward("Crop", [blob(data=x), ref], "crop_param { axis: 2 offset: 1 offset: 2 "
                  "offset: 3 }")[0]
    np.testing.assert_array_equal(top.data, x[:, :, 1:3, 2:5, 3:5])
    top = forward("Crop", [blob(data=x), blob((1, 2, 2, 3, 2))],
                  "crop_param { axis: 0 offset: 1 }")[0]
    np.testing.assert_array_equal(top.data, x[1:2, 1:3, 1:3, 1:4, 1:3])


@pytest.mark.parametrize("params", ["crop_param { axis: 0 offset: 0 offset: 1 offset: 1 "
                                    "offset: 0 }", "crop_param { offset: 1 }", ""])
def test_crop_gradient(params: str) -> None:
    # Caffe: CheckGradientExhaustive with (1e-2, 1e-3) on bottom 0
    bottom = [blob((2, 3, 4, 3)), blob((2, 2, 3, 2), seed=2)]
    gradcheck("Crop", bottom, params, exhaustive=True, check_bottom=0)


def test_crop_reference_gets_no_gradient() -> None:
    layer = make_layer("Crop")
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)
    gradcheck("Crop", [blob((2, 3, 4, 3)), blob((2, 2, 3, 2), seed=2)], check_bottom=1)


@pytest.mark.parametrize(("params", "ref", "match"), [
    ("crop_param { offset: 1 offset: 1 offset: 1 }", (2, 4, 5, 3),
     r"one value or one per cropped axis \(2: axes 2\.\.3\), got 3"),
    ("crop_param { offset: 2 }", (2, 4, 5, 3), "the crop of axis 2 is out of bounds: size 5 "
     "at offset 2"),
    ("crop_param { axis: 0 }", (3, 4, 5, 3), "the crop of axis 0 is out of bounds"),
    ("crop_param { axis: 4 }", (2, 4, 5, 3), r"crop_param\.axis 4 is out of range"),
    ("crop_param { axis: 1 }", (2, 4, 5), "fewer axes"),
])
def test_crop_bad_params(params: str, ref: tuple, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("Crop", [blob((2, 5, 6, 5)), blob(ref)], params)


def test_crop_torch_oracle() -> None:
    layer = make_layer("Crop", "crop_param { axis: 1 offset: 1 offset: 0 offset: 2 }")
    torch_check(layer, [blob((2, 4, 5, 6)), blob((2, 2, 3, 3))], tops(1),
                lambda x, ref: x.narrow(1, 1, 2).narrow(2, 0, 3).narrow(3, 2, 3))


# -- BatchReindex ----------------------------------------------------------------------------------
PERM = [4.0, 0.0, 4.0, 0.0, 1.0, 2.0]  # Caffe's test_batch_reindex_layer.cpp


def test_batch_reindex_forward() -> None:
    x = np.arange(120.0).reshape(5, 4, 3, 2)
    top = forward("BatchReindex", [blob(data=x), blob(data=np.array(PERM))])[0]
    assert top.shape == (6, 4, 3, 2)
    for n, p in enumerate(PERM):
        np.testing.assert_array_equal(top.data[n], x[int(p)])


def test_batch_reindex_backward_accumulates() -> None:
    layer = make_layer("BatchReindex")
    bottom, top = [blob((5, 2)), blob(data=np.array(PERM))], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff[...] = np.arange(1.0, 7.0)[:, None]
    bottom[0].diff[...] = 9.0
    bottom[1].diff[...] = 9.0
    layer.backward(top, [True, True], bottom)
    # rows: 4 <- 1 + 3, 0 <- 2 + 4, 1 <- 5, 2 <- 6, 3 <- nothing
    np.testing.assert_array_equal(bottom[0].diff[:, 0], [6, 5, 6, 0, 4])
    np.testing.assert_array_equal(bottom[1].diff, 0.0)
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


def test_batch_reindex_gradient() -> None:
    # Caffe: CheckGradientExhaustive with (1e-4, 1e-2) on bottom 0
    bottom = [blob(data=seeded((5, 2, 3))), blob(data=np.array(PERM))]
    gradcheck("BatchReindex", bottom, exhaustive=True, check_bottom=0, stepsize=1e-4,
              threshold=1e-2)
    gradcheck("BatchReindex", bottom, check_bottom=0)


@pytest.mark.parametrize(("index", "match"), [
    (np.array([0.0, 5.0]), r"index 5 is out of range \[0, 5\)"),
    (np.array([-1.0, 2.0]), r"index -1 is out of range \[0, 5\)"),
    (np.array([[0.0, 1.0]]), r"1-D blob of indices as bottom 1, got shape \(1, 2\)"),
    (np.array([0.5]), "whole numbers"),
])
def test_batch_reindex_bad_indices(index: np.ndarray, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("BatchReindex", [blob((5, 2)), blob(data=index)])


def test_batch_reindex_torch_oracle() -> None:
    torch = pytest.importorskip("torch")
    index = torch.tensor([4, 0, 4, 0, 1, 2])
    torch_check(make_layer("BatchReindex"), [blob((5, 3, 2)), blob(data=np.array(PERM))],
                tops(1), lambda x, i: x.index_select(0, index))


# -- Filter ----------------------------------------------------------------------------------------
def filter_bottoms(selector: Sequence[float] = (0, 1, 1, 0)) -> list[Blob]:
    # Caffe's test_filter_layer.cpp: data, labels, then the selector (N, 1, 1, 1)
    return [blob(data=seeded((4, 3, 2, 2))), blob(data=seeded((4, 1, 1, 1), seed=2)),
            blob(data=np.array(selector, dtype=float).reshape(4, 1, 1, 1))]


def test_filter_reshape() -> None:
    # TestReshape: the first reshape keeps all items, later ones the selected items
    layer = make_layer("Filter")
    bottom, top = filter_bottoms(), tops(2)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    assert [t.shape for t in top] == [(4, 3, 2, 2), (4, 1, 1, 1)]
    layer.reshape(bottom, top)
    assert [t.shape for t in top] == [(2, 3, 2, 2), (2, 1, 1, 1)]


def test_filter_forward_backward() -> None:
    # TestForward: selector 0 1 1 0 keeps items 1 and 2
    layer = make_layer("Filter")
    bottom, top = filter_bottoms(), tops(2)
    run_forward(layer, bottom, top)
    for b, t in zip(bottom, top, strict=False):
        assert t.shape[0] == 2
        np.testing.assert_array_equal(t.data, b.data[[1, 2]])
    for t in top:
        t.diff[...] = t.data
    bottom[0].diff[...] = 9.0
    bottom[2].diff[...] = 9.0
    layer.backward(top, [True, False, True], bottom)
    expected = bottom[0].data.copy()
    expected[[0, 3]] = 0
    np.testing.assert_array_equal(bottom[0].diff, expected)
    np.testing.assert_array_equal(bottom[1].diff, 0.0)  # propagate_down false: untouched
    np.testing.assert_array_equal(bottom[2].diff, 0.0)  # the selector gets no gradient
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(2)


def test_filter_all_zero_selector_gives_empty_tops() -> None:
    # Caffe raises nothing here: the tops just have 0 items.
    layer = make_layer("Filter")
    bottom, top = filter_bottoms((0, 0, 0, 0)), tops(2)
    run_forward(layer, bottom, top)
    assert [t.shape for t in top] == [(0, 3, 2, 2), (0, 1, 1, 1)]
    bottom[0].diff[...] = 9.0
    layer.backward(top, [True, False, False], bottom)
    np.testing.assert_array_equal(bottom[0].diff, 0.0)


def test_filter_gradient() -> None:
    # Caffe: CheckGradientExhaustive with (1e-2, 1e-3) on bottom 0, done by hand: the first
    # reshape (at setup) keeps all N items, so the top counts are known after the second.
    layer = make_layer("Filter")
    bottom, top = filter_bottoms(), tops(2)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    layer.reshape(bottom, top)
    checker, result = GradientChecker(1e-2, 1e-3), GradResult()
    for i, t in enumerate(top):
        for k in range(t.count):
            checker.check_single(layer, bottom, top, 0, i, k, result)
    assert result.ok, result.failures[:3]
    assert result.checked == 48 * (24 + 2)
    gradcheck("Filter", filter_bottoms((1, 0, 1, 1)), n_top=2, check_bottom=[0, 1])


@pytest.mark.parametrize(("bottoms", "n_top", "match"), [
    ([(4, 3), (4, 1)], 2, r"one top per filtered bottom .*: 1 expected, got 2"),
    ([(4, 3), (4, 2)], 1, r"selector \(last bottom\) must have shape \(N, 1, \.\.\.\)"),
    ([(4, 3), (3, 5), (4, 1)], 2, r"bottom 1 \(3, 5\) must have the selector's first dim"),
])
def test_filter_bad_bottoms(bottoms: list, n_top: int, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("Filter", [blob(s) for s in bottoms], n_top=n_top)


def test_filter_torch_oracle() -> None:
    torch = pytest.importorskip("torch")
    mask = torch.tensor([True, False, True, True])
    torch_check(make_layer("Filter"), filter_bottoms((2, 0, -1, 0.5)), tops(2),
                lambda x, y, s: (x[mask], y[mask]), grad_bottoms=(0, 1))


# -- Parameter -------------------------------------------------------------------------------------
def test_parameter_forward_backward() -> None:
    layer = make_layer("Parameter", "parameter_param { shape { dim: 2 dim: 3 } }")
    top = tops(1)
    run_forward(layer, [], top)
    assert len(layer.blobs) == 1 and layer.blobs[0].shape == (2, 3)
    assert top[0].shape == (2, 3)
    np.testing.assert_array_equal(top[0].data, 0.0)  # Caffe: no filler, zeros
    layer.blobs[0].data[...] = seeded((2, 3))
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, layer.blobs[0].data)
    top[0].data[...] = 0  # the top is a copy: writing it leaves the param alone
    assert np.any(layer.blobs[0].data != 0)
    top[0].diff[...] = 1.5
    layer.backward(top, [], [])
    layer.backward(top, [], [])
    np.testing.assert_array_equal(layer.blobs[0].diff, 3.0)  # accumulated


def test_parameter_gradient() -> None:
    layer = make_layer("Parameter", "parameter_param { shape { dim: 2 dim: 2 dim: 3 } }")
    layer.setup([], tops(1))
    layer.blobs[0].data[...] = seeded((2, 2, 3))
    checker = GradientChecker(1e-2, 1e-3)
    result = checker.check_single(layer, [], tops(1))
    assert result.ok and result.checked == 12


def test_parameter_bad_shape() -> None:
    with pytest.raises(LayerError, match="negative dim"):
        forward("Parameter", [], "parameter_param { shape { dim: 2 dim: -1 } }")


# -- Embed -----------------------------------------------------------------------------------------
EMBED = ("embed_param {{ num_output: 10 input_dim: 5 bias_term: {bias} "
         "weight_filler {{ type: 'uniform' min: -10 max: 10 }} "
         "bias_filler {{ type: 'uniform' min: -10 max: 10 }} }}")


def test_embed_setup() -> None:
    # TestSetUp: a (4, 1, 1, 1) bottom gives a (4, 1, 1, 1, 10) top
    layer = make_layer("Embed", "embed_param { num_output: 10 input_dim: 5 }")
    top = tops(1)
    layer.setup([blob((4, 1, 1, 1))], top)
    layer.reshape([blob((4, 1, 1, 1))], top)
    assert top[0].shape == (4, 1, 1, 1, 10)
    assert [b.shape for b in layer.blobs] == [(5, 10), (10,)]
    np.testing.assert_array_equal(layer.blobs[0].data, 0.0)  # no filler: constant 0


@pytest.mark.parametrize("bias", [False, True])
def test_embed_forward(bias: bool) -> None:
    # TestForward, TestForwardWithBias
    layer = make_layer("Embed", EMBED.format(bias=str(bias).lower()))
    index = np.random.default_rng(3).integers(0, 5, size=(4, 1, 1, 1)).astype(float)
    top = tops(1)
    run_forward(layer, [blob(data=index)], top)
    assert len(layer.blobs) == (2 if bias else 1)
    w = layer.blobs[0].data
    assert w.shape == (5, 10) and np.all(np.abs(w) <= 10) and np.ptp(w) > 1
    for i in range(4):
        expected = w[int(index.flat[i])] + (layer.blobs[1].data if bias else 0.0)
        np.testing.assert_array_equal(top[0].data[i, 0, 0, 0], expected)


@pytest.mark.parametrize("bias", [False, True])
def test_embed_gradient(bias: bool) -> None:
    # Caffe: CheckGradientExhaustive with (1e-2, 1e-3), params only, indices 4 2 2 3
    bottom = [blob(data=np.array([4.0, 2.0, 2.0, 3.0]).reshape(4, 1, 1, 1))]
    gradcheck("Embed", bottom, EMBED.format(bias=str(bias).lower()), exhaustive=True,
              check_bottom=[])


def test_embed_backward_accumulates_and_leaves_indices_alone() -> None:
    layer = make_layer("Embed", "embed_param { num_output: 2 input_dim: 3 }")
    bottom, top = [blob(data=np.array([2.0, 0.0, 2.0]))], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff[...] = [[1, 2], [3, 4], [5, 6]]
    layer.blobs[0].diff[...] = 1.0
    layer.blobs[1].diff[...] = 1.0
    bottom[0].diff[...] = 9.0
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(layer.blobs[0].diff, [[4, 5], [1, 1], [7, 9]])
    np.testing.assert_array_equal(layer.blobs[1].diff, [10, 13])
    np.testing.assert_array_equal(bottom[0].diff, 0.0)
    assert not layer.allow_force_backward(0)


@pytest.mark.parametrize(("params", "index", "match"), [
    ("embed_param { input_dim: 5 }", [0.0], "num_output must be positive"),
    ("embed_param { num_output: 3 }", [0.0], "input_dim must be positive"),
    ("embed_param { num_output: 3 input_dim: 5 }", [1.0, 5.0],
     r"Embed index 5 is out of range \[0, 5\)"),
    ("embed_param { num_output: 3 input_dim: 5 }", [-1.0], r"index -1 is out of range"),
    ("embed_param { num_output: 3 input_dim: 5 }", [1.5], "whole numbers"),
])
def test_embed_bad_params(params: str, index: list, match: str) -> None:
    with pytest.raises(LayerError, match=match):
        forward("Embed", [blob(data=np.array(index))], params)


def test_embed_torch_oracle() -> None:
    torch = pytest.importorskip("torch")
    index = np.array([[4.0, 2.0, 2.0], [0.0, 3.0, 4.0]])
    idx = torch.tensor(index, dtype=torch.long)
    layer = make_layer("Embed", EMBED.format(bias="true"))
    torch_check(layer, [blob(data=index)], tops(1),
                lambda x, w, b: torch.nn.functional.embedding(idx, w) + b,
                grad_bottoms=(), params=True)
    layer = make_layer("Embed", EMBED.format(bias="false"))
    torch_check(layer, [blob(data=index)], tops(1),
                lambda x, w: torch.nn.functional.embedding(idx, w), grad_bottoms=(),
                params=True)


# -- In a net ------------------------------------------------------------------------------------
NET = """
name: "shapes"
layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 6 } } }
layer { name: "r" type: "Reshape" bottom: "p" top: "r"
        reshape_param { shape { dim: 0 dim: 2 dim: -1 } } }
layer { name: "s" type: "Slice" bottom: "r" top: "a" top: "b" slice_param { axis: 1 } }
layer { name: "t" type: "Tile" bottom: "a" top: "t" tile_param { axis: 1 tiles: 2 } }
layer { name: "silence" type: "Silence" bottom: "b" }
layer { name: "loss" type: "Reduction" bottom: "t" top: "loss"
        reduction_param { operation: SUMSQ coeff: 0.5 } loss_weight: 1 }
"""


def test_layers_in_a_net() -> None:
    p = pb.NetParameter()
    text_format.Parse(NET, p)
    net = Net(p, "TRAIN", backend=NumpyBackend("float64"), verbose=False)
    assert net.outputs == ["loss"]
    assert net.blobs["r"].shape == (2, 2, 3)
    assert [b.shape for b in net.params["p"]] == [(2, 6)]
    x = seeded((2, 6))
    net.params["p"][0].data[...] = x
    net.forward()
    a = x.reshape(2, 2, 3)[:, :1]
    assert net.loss == pytest.approx(float((a * a).sum()))  # two tiles × ½Σa²
    net.clear_param_diffs()
    net.backward()
    expected = np.zeros((2, 2, 3))
    expected[:, :1] = 2 * a
    np.testing.assert_allclose(net.params["p"][0].diff, expected.reshape(2, 6))


# -- float32 (the default) ---------------------------------------------------------------------
@pytest.mark.parametrize(("type_name", "params", "bottoms", "n_top"), [
    ("Reshape", "reshape_param { shape { dim: -1 } }", [(2, 3)], 1),
    ("Slice", "slice_param { slice_point: 1 }", [(2, 3)], 2),
    ("ArgMax", "argmax_param { top_k: 2 out_max_val: true }", [(2, 3)], 1),
    ("Reduction", "reduction_param { operation: SUMSQ axis: 1 coeff: 2.3 }", [(2, 3)], 1),
    ("Tile", "tile_param { tiles: 2 }", [(2, 3)], 1),
    ("Crop", "crop_param { axis: 1 offset: 1 }", [(2, 3), (2, 2)], 1),
    ("BatchReindex", "", [(3, 2), "index"], 1),
    ("Filter", "", [(3, 2), "selector"], 1),
    ("Embed", EMBED.format(bias="true"), ["index"], 1),
])
def test_float32_matches_float64(type_name: str, params: str, bottoms: list, n_top: int) -> None:
    results = []
    for dtype in ("float32", "float64"):
        bottom = [blob(data=np.array([2.0, 0.0, 1.0]), dtype=dtype) if s == "index" else
                  blob(data=np.array([[1.0], [0.0], [1.0]]), dtype=dtype) if s == "selector"
                  else blob(s, dtype=dtype, seed=i) for i, s in enumerate(bottoms)]
        layer = make_layer(type_name, params, dtype=dtype)
        top = tops(n_top, dtype=dtype)
        run_forward(layer, bottom, top)
        for t in top:
            t.diff[...] = 1.0
        if layer.has_backward:
            layer.backward(top, [True] + [False] * (len(bottom) - 1), bottom)
        results.append([t.data for t in top] + [b.diff for b in bottom[:1]] +
                       [p.diff for p in layer.blobs])
        assert all(a.dtype == np.dtype(dtype) for a in results[-1])
    for a32, a64 in zip(*results, strict=True):
        np.testing.assert_allclose(a32, a64, rtol=1e-5, atol=1e-6)
