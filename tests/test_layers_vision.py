"""Convolution, Pooling and InnerProduct: Caffe's gradient checks, known values and shapes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from tests.helpers import PHASE_TEST, blob, make_layer, run_forward, tops

GRAD_CHECKED = {"Convolution", "Pooling", "InnerProduct"}
NO_BACKWARD: set[str] = set()

FILLERS = ('weight_filler { type: "gaussian" std: 0.5 } '
           'bias_filler { type: "gaussian" std: 0.5 }')


def distinct(shape: tuple[int, ...], seed: int = 3, spacing: float = 0.05) -> np.ndarray:
    """Values at least ``spacing`` apart (no ties), so max pooling's finite differences hold."""
    n = int(np.prod(shape))
    values = (np.random.default_rng(seed).permutation(n) - n / 2) * spacing
    return values.reshape(shape)


def grad_ok(layer_type: str, params: str, bottoms: list, n_tops: int = 1,
            threshold: float = 1e-3) -> None:
    layer = make_layer(layer_type, params)
    result = GradientChecker(1e-2, threshold).check(layer, bottoms, tops(n_tops))
    assert result.checked > 0
    assert result.ok, result.failures[:5]


def forward(layer_type: str, params: str, data: np.ndarray, n_tops: int = 1) -> list:
    top = tops(n_tops)
    run_forward(make_layer(layer_type, params), [blob(data=data)], top)
    return [t.data for t in top]


# -- Convolution ----------------------------------------------------------------------------------

def conv_params(extra: str) -> str:
    return f"convolution_param {{ {extra} {FILLERS} }}"


@pytest.mark.parametrize("extra", [
    "num_output: 3 kernel_size: 3",
    "num_output: 3 kernel_size: 3 pad: 1 stride: 2",
    "num_output: 4 kernel_size: 2 group: 2",
    "num_output: 2 kernel_size: 2 dilation: 2",
    "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 0 pad_w: 1",
    "num_output: 2 kernel_size: 3 bias_term: false",
    "num_output: 2 kernel_size: 1",
], ids=["simple", "pad_stride", "group", "dilation", "rect", "no_bias", "1x1"])
def test_convolution_gradient(extra: str) -> None:
    grad_ok("Convolution", conv_params(extra), [blob((2, 4, 6, 5))])


# Layers with at least 256 output pixels (and no fewer than their column entries) run one GEMM
# per image on Caffe's column layout; with the compiled kernels, layers of stride 1 in height
# with at least 64 run kh GEMMs per image on the row-shift columns.
PER_IMAGE = ["num_output: 3 kernel_size: 3 pad: 1", "num_output: 2 kernel_size: 3 pad: 1 "
             "bias_term: false", "num_output: 2 kernel_size: 3 pad: 2 dilation: 2"]


@pytest.mark.parametrize("layout", ["images", "shifted"])
@pytest.mark.parametrize("extra", PER_IMAGE, ids=["bias", "no_bias", "dilation"])
@pytest.mark.parametrize("phase", [None, PHASE_TEST], ids=["train", "test"])
def test_convolution_per_image_paths(extra: str, phase: int | None, layout: str) -> None:
    """Forward against naive loops, gradients by finite differences, and forward/backward
    against the row layout's, on a layer large enough for the per-image GEMMs (on Caffe's
    columns, or on the row-shift ones: compiled, or the NumPy steps without numba)."""
    kwargs = {} if phase is None else {"phase": phase}

    def conv(chosen: str) -> Any:
        lay = make_layer("Convolution", conv_params(extra), **kwargs)
        lay._layout = lambda pixels, dtype: chosen  # type: ignore[method-assign]
        return lay

    layer = make_layer("Convolution", conv_params(extra), **kwargs)
    x = blob((2, 2, 16, 16))
    top = tops(1)
    run_forward(layer, [x], top)
    assert layer._per_image(top[0].shape[2] * top[0].shape[3])
    assert layer._layout(256, x.data.dtype) == (
        "shifted" if layer.backend.fuses_conv(x.data.dtype) else "images")
    layer = conv(layout)
    run_forward(layer, [x], top)
    w = layer.blobs[0].data
    b = layer.blobs[1].data if len(layer.blobs) > 1 else np.zeros(w.shape[0])
    dil = (2, 2) if "dilation" in extra else (1, 1)
    pad = (2, 2) if "pad: 2" in extra else (1, 1)
    np.testing.assert_allclose(top[0].data, naive_conv(x.data, w, b, (1, 1), pad, dil, 1),
                               rtol=1e-12, atol=1e-12)

    # (run_forward sets a layer up again, with new weights: fresh layers for the comparison)
    dy = np.random.default_rng(7).normal(size=top[0].shape)
    grads = []
    for lay in (conv(layout), conv("rows")):
        xb, t = blob((2, 2, 16, 16)), tops(1)
        run_forward(lay, [xb], t)
        t[0].diff[...] = dy
        for p in lay.blobs:
            p.diff[...] = 0
        lay.backward(t, [True], [xb])
        grads.append([xb.diff.copy(), *(p.diff.copy() for p in lay.blobs)])
    for got, want in zip(*grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)

    checked = conv(layout)
    result = GradientChecker(1e-2, 1e-3).check(checked, [blob((1, 2, 16, 16))], tops(1))
    assert result.checked > 0 and result.ok, result.failures[:5]


@pytest.mark.parametrize(("extra", "stride", "pad", "dil"), [
    ("num_output: 3 kernel_size: 3", (1, 1), (0, 0), (1, 1)),
    ("num_output: 3 kernel_size: 3 pad: 1 stride: 2", (2, 2), (1, 1), (1, 1)),
    ("num_output: 2 kernel_size: 2 dilation: 2 pad: 2 stride: 1 stride: 2", (1, 2), (2, 2),
     (2, 2)),
    ("num_output: 2 kernel_h: 3 kernel_w: 2 pad_h: 0 pad_w: 1", (1, 1), (0, 1), (1, 1)),
], ids=["simple", "pad_stride", "dilation", "rect"])
@pytest.mark.parametrize("phase", [None, PHASE_TEST], ids=["train", "test"])
def test_convolution_channels_last_rows(extra: str, stride: tuple[int, int],
                                        pad: tuple[int, int], dil: tuple[int, int],
                                        phase: int | None) -> None:
    """Row-layout columns in (i, j, c) order (layers with enough input channels): forward
    against naive loops, forward and gradients against Caffe's (c, i, j) order, and finite
    differences."""
    kwargs = {} if phase is None else {"phase": phase}
    shape = (2, 18, 7, 6)
    layer = make_layer("Convolution", conv_params(extra), **kwargs)
    x, top = blob(shape), tops(1)
    run_forward(layer, [x], top)
    assert layer.channels_last and not layer._per_image(top[0].shape[2] * top[0].shape[3])
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, naive_conv(x.data, w, b, stride, pad, dil, 1),
                               rtol=1e-12, atol=1e-12)

    dy = np.random.default_rng(8).normal(size=top[0].shape)
    results = []
    for channels_last in (True, False):
        lay = make_layer("Convolution", conv_params(extra), **kwargs)
        xb, t = blob(shape), tops(1)
        run_forward(lay, [xb], t)
        lay.channels_last = channels_last
        lay.forward([xb], t)
        t[0].diff[...] = dy
        for p in lay.blobs:
            p.diff[...] = 0
        lay.backward(t, [True], [xb])
        results.append([t[0].data.copy(), xb.diff.copy(), *(p.diff.copy() for p in lay.blobs)])
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    checked = make_layer("Convolution", conv_params(extra), **kwargs)
    result = GradientChecker(1e-2, 1e-3).check(checked, [blob((1, 18, 5, 4))], tops(1))
    assert result.checked > 0 and result.ok, result.failures[:5]


def test_convolution_gradient_test_phase_recomputes_columns() -> None:
    layer = make_layer("Convolution", conv_params("num_output: 2 kernel_size: 3 pad: 1"),
                       phase=PHASE_TEST)
    result = GradientChecker(1e-2, 1e-3).check(layer, [blob((2, 3, 4, 5))], tops(1))
    assert result.checked > 0 and result.ok, result.failures[:5]


def test_convolution_gradient_two_bottoms() -> None:
    grad_ok("Convolution", conv_params("num_output: 2 kernel_size: 3 stride: 2"),
            [blob((2, 3, 6, 5), seed=1), blob((2, 3, 6, 5), seed=2)], n_tops=2)


def naive_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: tuple[int, int],
               pad: tuple[int, int], dil: tuple[int, int], group: int) -> np.ndarray:
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    og = o // group
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    oh = (h + 2 * pad[0] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + 2 * pad[1] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, o, oh, ow))
    for i in range(n):
        for oc in range(o):
            g = oc // og
            for yy in range(oh):
                for xx in range(ow):
                    acc = b[oc]
                    for ci in range(cg):
                        for p in range(kh):
                            for q in range(kw):
                                acc += w[oc, ci, p, q] * xp[i, g * cg + ci,
                                                            yy * stride[0] + p * dil[0],
                                                            xx * stride[1] + q * dil[1]]
                    y[i, oc, yy, xx] = acc
    return y


@pytest.mark.parametrize(("extra", "stride", "pad", "dil", "group"), [
    ("num_output: 4 kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    ("num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    ("num_output: 2 kernel_size: 2 dilation: 2 pad: 2 stride: 1 stride: 2", (1, 2), (2, 2),
     (2, 2), 1),
    ("num_output: 4 kernel_h: 2 kernel_w: 3 dilation: 2 dilation: 1 group: 4", (1, 1), (0, 0),
     (2, 1), 4),
])
def test_convolution_matches_naive_loops(extra: str, stride: tuple[int, int],
                                         pad: tuple[int, int], dil: tuple[int, int],
                                         group: int) -> None:
    layer = make_layer("Convolution", conv_params(extra))
    x = blob((2, 4, 7, 6))
    top = tops(1)
    run_forward(layer, [x], top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, naive_conv(x.data, w, b, stride, pad, dil, group),
                               rtol=1e-12, atol=1e-12)


def test_convolution_shapes_caffe() -> None:
    """§9 case 5: 2×3×6×4, k3 s2 → 2×4×2×1; num_output 3 with group 3 gives the same shape."""
    cases = [("num_output: 4", (4, 3, 3, 3)), ("num_output: 3 group: 3", (3, 1, 3, 3))]
    for extra, w_shape in cases:
        layer = make_layer("Convolution", conv_params(f"{extra} kernel_size: 3 stride: 2"))
        top = tops(2)
        run_forward(layer, [blob((2, 3, 6, 4), seed=1), blob((2, 3, 6, 4), seed=2)], top)
        assert [t.shape for t in top] == [(2, w_shape[0], 2, 1)] * 2
        assert layer.blobs[0].shape == w_shape
        assert layer.blobs[1].shape == (w_shape[0],)


def test_convolution_no_filler_means_zero_and_same_weights_for_all_bottoms() -> None:
    layer = make_layer("Convolution", "convolution_param { num_output: 2 kernel_size: 3 }")
    top = tops(1)
    run_forward(layer, [blob((1, 2, 4, 4))], top)
    assert not layer.blobs[0].data.any() and not layer.blobs[1].data.any()
    assert not top[0].data.any()
    layer = make_layer("Convolution", conv_params("num_output: 2 kernel_size: 3"))
    x = blob((1, 2, 4, 4))
    top = tops(2)
    run_forward(layer, [x, blob(data=x.data)], top)
    np.testing.assert_array_equal(top[0].data, top[1].data)


@pytest.mark.parametrize(("params", "shape", "message"), [
    ("num_output: 4 kernel_size: 3 group: 2", (1, 3, 5, 5), "group 2 must divide"),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), "group 2 must divide"),
    ("num_output: 4 kernel_size: 5", (1, 3, 3, 3), "kernel 5x5 with pad 0 does not fit a 3x3"),
    ("num_output: 4", (1, 3, 3, 3), "kernel_size"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5), "not both"),
    ("num_output: 4 kernel_h: 3", (1, 3, 5, 5), "together"),
    ("num_output: 4 kernel_size: 3 axis: 2", (1, 3, 5, 5), "axis"),
    ("num_output: 4 kernel_size: 1", (3, 5), "4-D"),
    ("kernel_size: 3", (1, 3, 5, 5), "num_output"),
])
def test_convolution_bad_config(params: str, shape: tuple[int, ...], message: str) -> None:
    layer = make_layer("Convolution", f"convolution_param {{ {params} }}")
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob(shape)], tops(1))


def test_convolution_bottoms_must_match() -> None:
    layer = make_layer("Convolution", "convolution_param { num_output: 2 kernel_size: 1 }")
    with pytest.raises(LayerError, match="same shape"):
        run_forward(layer, [blob((1, 2, 4, 4)), blob((1, 2, 4, 5))], tops(2))


# -- Pooling --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "n_tops", "shape"), [
    ("pool: MAX kernel_size: 3 stride: 2", 1, (2, 3, 6, 5)),
    ("pool: MAX kernel_size: 3 stride: 2", 2, (2, 3, 6, 5)),
    ("pool: MAX kernel_size: 3 stride: 2 pad: 1", 1, (2, 3, 6, 5)),
    ("pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 1", 1,
     (2, 3, 6, 5)),
    ("pool: MAX kernel_size: 2 stride: 2", 2, (2, 3, 6, 4)),
    ("pool: MAX kernel_size: 2 stride: 2", 1, (2, 3, 6, 5)),
    ("pool: MAX global_pooling: true", 1, (2, 3, 6, 5)),
    ("pool: AVE kernel_size: 3 stride: 2", 1, (2, 3, 6, 5)),
    ("pool: AVE kernel_size: 3 stride: 2 pad: 1", 1, (2, 3, 6, 5)),
    ("pool: AVE kernel_size: 3 stride: 1 pad: 1", 1, (2, 3, 6, 5)),
    ("pool: AVE kernel_size: 2 stride: 2", 1, (2, 3, 6, 4)),
    ("pool: AVE kernel_size: 2 stride: 2", 1, (2, 3, 6, 5)),
    ("pool: AVE global_pooling: true", 1, (2, 3, 6, 5)),
    ("pool: AVE kernel_size: 3 stride: 2 round_mode: FLOOR", 1, (2, 3, 6, 5)),
], ids=["max_k3s2", "max_mask_top", "max_pad", "max_rect", "max_tiled", "max_k2s2_ceil",
        "max_global", "ave_k3s2", "ave_pad", "ave_k3s1p1", "ave_tiled", "ave_k2s2_ceil",
        "ave_global", "ave_floor"])
def test_pooling_gradient(params: str, n_tops: int, shape: tuple[int, ...]) -> None:
    layer = make_layer("Pooling", f"pooling_param {{ {params} }}")
    bottom = [blob(data=distinct(shape))]
    # With 2 tops the mask is in the objective too; it is piecewise constant (no gradient).
    result = GradientChecker(1e-2, 1e-2).check(layer, bottom, tops(n_tops))
    assert result.checked > 0
    assert result.ok, result.failures[:5]


def test_pooling_max_gradient_exhaustive_with_overlap() -> None:
    """Overlapping windows (k3 s1) that share a max must sum their gradients there."""
    layer = make_layer("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 }")
    result = GradientChecker(1e-2, 1e-2).check_exhaustive(
        layer, [blob(data=distinct((1, 2, 4, 4)))], tops(1))
    assert result.ok, result.failures[:5]


SQUARE = np.array([[1, 2, 5, 2, 3], [9, 4, 1, 4, 8], [1, 2, 5, 2, 3]], dtype=float)
MAGIC6 = np.array([[35, 1, 6, 26, 19, 24], [3, 32, 7, 21, 23, 25], [31, 9, 2, 22, 27, 20],
                   [8, 28, 33, 17, 10, 15], [30, 5, 34, 12, 14, 16], [4, 36, 29, 13, 18, 11]],
                  dtype=float)


def test_pooling_max_square_known_values() -> None:
    """§9 case 1: MAX 2×2 s1, every channel the same; values and mask."""
    y, mask = forward("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 1 }",
                      np.broadcast_to(SQUARE, (2, 2, 3, 5)).copy(), n_tops=2)
    assert y.shape == mask.shape == (2, 2, 2, 4)
    np.testing.assert_array_equal(y, np.broadcast_to([[9, 5, 5, 8], [9, 5, 5, 8]], y.shape))
    np.testing.assert_array_equal(mask, np.broadcast_to([[5, 2, 2, 9], [5, 12, 12, 9]], y.shape))


def test_pooling_max_backward_routes_to_mask() -> None:
    layer = make_layer("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 1 }")
    bottom, top = [blob(data=SQUARE[None, None].copy())], tops(2)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True], bottom)
    expected = np.zeros(15)
    np.add.at(expected, top[1].data.astype(int).ravel(), 1.0)
    np.testing.assert_array_equal(bottom[0].diff.ravel(), expected)


@pytest.mark.parametrize(("kh", "kw", "expected"), [
    (3, 2, [[35, 32, 26, 27, 27], [32, 33, 33, 27, 27], [31, 34, 34, 27, 27],
            [36, 36, 34, 18, 18]]),
    (2, 3, [[35, 32, 26, 26], [32, 32, 27, 27], [33, 33, 33, 27], [34, 34, 34, 17],
            [36, 36, 34, 18]]),
])
def test_pooling_max_rectangular_magic6(kh: int, kw: int, expected: list) -> None:
    """§9 case 2."""
    (y,) = forward("Pooling", f"pooling_param {{ pool: MAX kernel_h: {kh} kernel_w: {kw} }}",
                   np.broadcast_to(MAGIC6, (2, 2, 6, 6)).copy())
    np.testing.assert_array_equal(y, np.broadcast_to(expected, y.shape))


def test_pooling_max_pad_known_values() -> None:
    """§9 case 3: k3 s2 pad2; padding never wins."""
    x = np.array([[1, 2, 4], [2, 3, 2], [4, 2, 1]], dtype=float)[None, None]
    (y,) = forward("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 }", x)
    np.testing.assert_array_equal(y[0, 0], [[1, 4, 4], [4, 4, 4], [4, 4, 1]])
    (y,) = forward("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 }", -x)
    np.testing.assert_array_equal(y[0, 0], [[-1, -1, -4], [-1, -1, -1], [-4, -1, -1]])


def test_pooling_ave_pad_known_values() -> None:
    """§9 case 4: AVE k3 s1 pad1 on a constant 2: padding counts in the divisor."""
    (y,) = forward("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 1 pad: 1 }",
                   np.full((1, 1, 3, 3), 2.0))
    np.testing.assert_allclose(y[0, 0], [[8 / 9, 4 / 3, 8 / 9], [4 / 3, 2, 4 / 3],
                                         [8 / 9, 4 / 3, 8 / 9]], rtol=1e-12)


def test_pooling_ave_ceil_overhang_not_counted() -> None:
    """k3 s2 on 4x4 (CEIL → 2x2): the last window overhangs the input by one row/column,
    which does not count, so averaging ones gives exactly 1 (not 2/3 or 4/9)."""
    (y,) = forward("Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 }",
                   np.ones((1, 1, 4, 4)))
    np.testing.assert_allclose(y[0, 0], np.ones((2, 2)))


@pytest.mark.parametrize(("round_mode", "sizes"), [("CEIL", [32, 16, 8, 4]),
                                                   ("FLOOR", [32, 15, 7, 3])])
def test_pooling_cifar10_quick_shapes(round_mode: str, sizes: list[int]) -> None:
    """cifar10_quick: k3 s2 pooling takes 32 → 16 → 8 → 4 with CEIL (15/7/3 with FLOOR)."""
    x = np.zeros((1, 1, sizes[0], sizes[0]))
    for expected in sizes[1:]:
        (x,) = forward("Pooling", f"pooling_param {{ pool: MAX kernel_size: 3 stride: 2 "
                                  f"round_mode: {round_mode} }}", x)
        assert x.shape == (1, 1, expected, expected)


def test_pooling_global_and_tiled_match_general_path() -> None:
    x = distinct((2, 3, 6, 4))
    (gmax,) = forward("Pooling", "pooling_param { pool: MAX global_pooling: true }", x)
    (gave,) = forward("Pooling", "pooling_param { pool: AVE global_pooling: true }", x)
    np.testing.assert_array_equal(gmax[..., 0, 0], x.max(axis=(2, 3)))
    np.testing.assert_allclose(gave[..., 0, 0], x.mean(axis=(2, 3)), rtol=1e-12)
    y, mask = forward("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }", x, 2)
    ref = x.reshape(2, 3, 3, 2, 2, 2).max(axis=(3, 5))
    np.testing.assert_array_equal(y, ref)
    flat = x.reshape(2, 3, -1)
    np.testing.assert_array_equal(np.take_along_axis(flat, mask.reshape(2, 3, -1).astype(int),
                                                     axis=2).reshape(y.shape), y)


def test_pooling_max_ties_go_to_first() -> None:
    _, mask = forward("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 2 }",
                      np.ones((1, 1, 2, 2)), 2)
    assert mask.ravel().tolist() == [0.0]
    _, mask = forward("Pooling", "pooling_param { pool: MAX kernel_size: 2 stride: 1 pad: 1 }",
                      np.ones((1, 1, 2, 2)), 2)
    assert mask[0, 0].tolist() == [[0, 0, 1], [0, 0, 1], [2, 2, 3]]


@pytest.mark.parametrize(("params", "message"), [
    ("pool: STOCHASTIC kernel_size: 2", "STOCHASTIC pooling is GPU-only"),
    ("pool: MAX", "kernel_size"),
    ("pool: MAX kernel_size: 2 kernel_h: 2 kernel_w: 2", "not both"),
    ("pool: MAX global_pooling: true kernel_size: 2", "global_pooling"),
    ("pool: MAX global_pooling: true stride: 2", "global_pooling"),
    ("pool: MAX kernel_size: 2 pad: 2", "smaller than the kernel"),
    ("pool: MAX kernel_size: 3 stride: 1 round_mode: FLOOR", "does not fit a 2x2"),
])
def test_pooling_bad_config(params: str, message: str) -> None:
    layer = make_layer("Pooling", f"pooling_param {{ {params} }}")
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob((1, 1, 2, 2))], tops(1))


def test_pooling_ave_has_no_mask_top() -> None:
    layer = make_layer("Pooling", "pooling_param { pool: AVE kernel_size: 2 }")
    with pytest.raises(LayerError, match="mask"):
        run_forward(layer, [blob((1, 1, 4, 4))], tops(2))


# -- InnerProduct ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra", [
    "num_output: 4",
    "num_output: 4 transpose: true",
    "num_output: 3 axis: 2",
    "num_output: 3 axis: -1",
    "num_output: 4 bias_term: false",
])
def test_inner_product_gradient(extra: str) -> None:
    grad_ok("InnerProduct", f"inner_product_param {{ {extra} {FILLERS} }}",
            [blob((2, 3, 2, 2))])


def test_inner_product_shapes_caffe() -> None:
    """§9 case 5: 2×3×4×5 → 2×10 with W (10, 60), or (60, 10) with transpose."""
    for transpose, w_shape in [("false", (10, 60)), ("true", (60, 10))]:
        layer = make_layer("InnerProduct", f"inner_product_param {{ num_output: 10 "
                                           f"transpose: {transpose} {FILLERS} }}")
        top = tops(1)
        run_forward(layer, [blob((2, 3, 4, 5))], top)
        assert top[0].shape == (2, 10)
        assert layer.blobs[0].shape == w_shape
        assert layer.blobs[1].shape == (10,)


def test_inner_product_values_and_axis() -> None:
    x = blob((2, 3, 4))
    layer = make_layer("InnerProduct", f"inner_product_param {{ num_output: 5 axis: -1 "
                                       f"{FILLERS} }}")
    top = tops(1)
    run_forward(layer, [x], top)
    assert top[0].shape == (2, 3, 5)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, x.data @ w.T + b, rtol=1e-12)
    # transpose stores Wᵀ: the same product with the same numbers laid out the other way
    layer_t = make_layer("InnerProduct", f"inner_product_param {{ num_output: 5 axis: 2 "
                                         f"transpose: true {FILLERS} }}")
    run_forward(layer_t, [x], top)
    layer_t.blobs[0].data[...] = w.T
    layer_t.blobs[1].data[...] = b
    layer_t.forward([x], top)
    np.testing.assert_allclose(top[0].data, x.data @ w.T + b, rtol=1e-12)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_inner_product_backward_by_rows_of_w(workers: int,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Backward splits W's rows over the workers (3 outputs on 4 workers: one has none): the
    bottom gradient is the sum of the workers' partials, and an update handed in through
    param_updates is called once per worker's rows after their gradient is final (not for a W
    under UPDATE_MIN, which it leaves to the solver)."""
    from netforge.backend import NumpyBackend
    from netforge.layers.inner_product import InnerProduct

    backend = NumpyBackend("float64", workers=workers)
    backend.parallel_min = 0
    x, layer = blob((6, 2, 5)), make_layer("InnerProduct", f"inner_product_param {{ "
                                                           f"num_output: 3 {FILLERS} }}")
    layer.backend = backend
    top = tops(1)
    run_forward(layer, [x], top)
    top[0].diff[...] = np.random.default_rng(5).normal(size=top[0].shape)
    w, dy, xs = layer.blobs[0].data.copy(), top[0].diff, x.data.reshape(6, -1)
    seen: list[tuple[slice, np.ndarray]] = []
    for minimum, calls in ((0, min(workers, 3)), (10**6, 0)):
        monkeypatch.setattr(InnerProduct, "UPDATE_MIN", minimum)
        for b in layer.blobs:
            b.diff[...] = 0
        seen.clear()
        layer.param_updates = {
            0: lambda rows: seen.append((rows, layer.blobs[0].diff[rows].copy()))}
        x.diff[...] = np.nan
        layer.backward(top, [True], [x])
        np.testing.assert_allclose(x.diff.reshape(6, -1), dy @ w, rtol=1e-12)
        np.testing.assert_allclose(layer.blobs[0].diff, dy.T @ xs, rtol=1e-12)
        np.testing.assert_allclose(layer.blobs[1].diff, dy.sum(axis=0), rtol=1e-12)
        assert len(seen) == calls
        assert sum(r.stop - r.start for r, _ in seen) == (3 if calls else 0)
        for rows, grad in seen:  # the rows' gradient was final when their update came
            np.testing.assert_allclose(grad, (dy.T @ xs)[rows], rtol=1e-12)


def test_inner_product_bad_config() -> None:
    with pytest.raises(LayerError, match="axis 4 is out of range"):
        run_forward(make_layer("InnerProduct", "inner_product_param { num_output: 2 axis: 4 }"),
                    [blob((2, 3, 4))], tops(1))
    layer = make_layer("InnerProduct", "inner_product_param { num_output: 2 }")
    run_forward(layer, [blob((2, 3, 4))], tops(1))
    with pytest.raises(LayerError, match="expect 12"):
        layer.reshape([blob((2, 3, 5))], tops(1))
