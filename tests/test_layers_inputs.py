"""Input and DummyData layers (Caffe's test_dummy_data_layer cases)."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.layers import LayerError
from tests.helpers import make_layer, run_forward, tops

GRAD_CHECKED: set[str] = set()
NO_BACKWARD: set[str] = {"Input", "DummyData"}


def setup(type_name: str, params: str, n_top: int) -> tuple:
    layer = make_layer(type_name, params)
    top = tops(n_top)
    run_forward(layer, [], top)
    return layer, top


# -- Input -----------------------------------------------------------------------------------------
def test_input_one_shape_for_all_tops() -> None:
    _, top = setup("Input", "input_param { shape { dim: 2 dim: 3 dim: 4 } }", 2)
    assert [t.shape for t in top] == [(2, 3, 4), (2, 3, 4)]


def test_input_one_shape_per_top() -> None:
    _, top = setup("Input", "input_param { shape { dim: 10 dim: 1 dim: 28 dim: 28 } "
                            "shape { dim: 10 } }", 2)
    assert [t.shape for t in top] == [(10, 1, 28, 28), (10,)]


def test_input_forward_leaves_data_alone() -> None:
    layer, top = setup("Input", "input_param { shape { dim: 2 dim: 3 } }", 1)
    top[0].data[...] = 5.0
    layer.reshape([], top)
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, 5.0)


def test_input_shape_count_mismatch() -> None:
    with pytest.raises(LayerError, match="once per top"):
        setup("Input", "input_param { shape { dim: 1 } shape { dim: 2 } }", 3)


# -- DummyData -------------------------------------------------------------------------------------
def test_dummy_data_default_is_zero_with_legacy_dims() -> None:
    params = "dummy_data_param { num: 5 channels: 3 height: 2 width: 4 num: 5 channels: 1 " \
             "height: 1 width: 1 }"
    _, top = setup("DummyData", params, 2)
    assert [t.shape for t in top] == [(5, 3, 2, 4), (5, 1, 1, 1)]
    for t in top:
        np.testing.assert_array_equal(t.data, 0.0)


def test_dummy_data_legacy_dims_once_for_all() -> None:
    params = "dummy_data_param { num: 2 channels: 3 height: 4 width: 5 }"
    _, top = setup("DummyData", params, 3)
    assert [t.shape for t in top] == [(2, 3, 4, 5)] * 3


def test_dummy_data_constant_filled_once() -> None:
    params = ("dummy_data_param { shape { dim: 2 dim: 3 } "
              "data_filler { type: 'constant' value: 7 } }")
    layer, top = setup("DummyData", params, 2)
    for t in top:
        np.testing.assert_array_equal(t.data, 7.0)
    top[0].data[...] = 1.0  # a constant filler is not reapplied on forward
    layer.forward([], top)
    np.testing.assert_array_equal(top[0].data, 1.0)


def test_dummy_data_gaussian_refilled_each_forward() -> None:
    params = ("dummy_data_param { shape { dim: 200 dim: 10 } "
              "data_filler { type: 'gaussian' mean: 3 std: 2 } }")
    layer, top = setup("DummyData", params, 1)
    first = top[0].data.copy()
    assert abs(first.mean() - 3) < 0.1 and abs(first.std() - 2) < 0.1
    layer.forward([], top)
    assert not np.array_equal(first, top[0].data)


def test_dummy_data_one_filler_per_top() -> None:
    params = ("dummy_data_param { shape { dim: 3 dim: 2 } shape { dim: 4 } "
              "data_filler { type: 'constant' value: 1 } "
              "data_filler { type: 'uniform' min: 5 max: 6 } }")
    layer, top = setup("DummyData", params, 2)
    np.testing.assert_array_equal(top[0].data, 1.0)
    assert top[1].shape == (4,)
    assert np.all((top[1].data >= 5) & (top[1].data < 6))
    before = top[1].data.copy()
    layer.forward([], top)
    assert not np.array_equal(before, top[1].data)
    np.testing.assert_array_equal(top[0].data, 1.0)


def test_dummy_data_follows_seed() -> None:
    params = "dummy_data_param { shape { dim: 5 } data_filler { type: 'gaussian' } }"
    a = make_layer("DummyData", params, seed=3)
    b = make_layer("DummyData", params, seed=3)
    ta, tb = tops(1), tops(1)
    run_forward(a, [], ta)
    run_forward(b, [], tb)
    np.testing.assert_array_equal(ta[0].data, tb[0].data)


@pytest.mark.parametrize(("params", "message"), [
    ("dummy_data_param { shape { dim: 1 } data_filler {} data_filler {} }", "data_filler"),
    ("dummy_data_param { shape { dim: 1 } shape { dim: 2 } }", "once per top"),
    ("dummy_data_param { shape { dim: 1 } num: 1 channels: 1 height: 1 width: 1 }", "not both"),
    ("dummy_data_param { num: 1 channels: 1 }", "height"),
    ("dummy_data_param { shape { dim: 1 } data_filler { type: 'nope' } }", "unknown"),
])
def test_dummy_data_bad_params(params: str, message: str) -> None:
    with pytest.raises(LayerError, match=message):
        setup("DummyData", params, 3)


# -- no backward -----------------------------------------------------------------------------------
@pytest.mark.parametrize("type_name", sorted(NO_BACKWARD))
def test_has_no_backward(type_name: str) -> None:
    params = {"Input": "input_param { shape { dim: 2 } }",
              "DummyData": "dummy_data_param { shape { dim: 2 } }"}[type_name]
    layer, top = setup(type_name, params, 1)
    assert not layer.has_backward
    layer.backward(top, [], [])  # nothing to propagate to: a no-op
    assert (layer.exact_bottoms, layer.min_tops) == (0, 1)
