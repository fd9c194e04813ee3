"""Deconvolution, Im2col, SPP and the bilinear filler: Caffe's gradient checks, shapes and known
values (test_deconvolution_layer, test_im2col_layer, test_spp_layer, test_filler), bad
parameters, and PyTorch as a float64 oracle for forward and backward."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from netforge.errors import NetforgeError
from netforge.fillers import fill
from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from netforge.proto import pb
from tests.helpers import PHASE_TEST, blob, make_layer, run_forward, tops

GRAD_CHECKED = {"Deconvolution", "Im2col", "SPP"}
NO_BACKWARD: set[str] = set()

FILLERS = ('weight_filler { type: "gaussian" std: 0.5 } '
           'bias_filler { type: "gaussian" std: 0.5 }')


def gaussian(shape: tuple[int, ...], seed: int = 1701) -> np.ndarray:
    """Caffe's tests fill their bottoms from a unit gaussian."""
    return np.random.default_rng(seed).normal(size=shape)


def distinct(shape: tuple[int, ...], seed: int = 3, spacing: float = 0.05) -> np.ndarray:
    """Values at least ``spacing`` apart (no ties), so max pooling's finite differences hold."""
    n = int(np.prod(shape))
    values = (np.random.default_rng(seed).permutation(n) - n / 2) * spacing
    return values.reshape(shape)


def check(layer_type: str, params: str, bottoms: list, n_tops: int = 1, stepsize: float = 1e-2,
          threshold: float = 1e-3, exhaustive: bool = False, phase: int | None = None) -> None:
    layer = (make_layer(layer_type, params) if phase is None
             else make_layer(layer_type, params, phase=phase))
    checker = GradientChecker(stepsize, threshold)
    run = checker.check_exhaustive if exhaustive else checker.check
    result = run(layer, bottoms, tops(n_tops))
    assert result.checked > 0
    assert result.ok, result.failures[:5]


def deconv_params(extra: str, fillers: str = FILLERS) -> str:
    return f"convolution_param {{ {extra} {fillers} }}"


# -- Deconvolution --------------------------------------------------------------------------------

def test_deconvolution_setup_caffe() -> None:
    """TestSetup: 2×3×6×4, k3 s2, num_output 4 → 2×4×13×9 (stride·(in−1) + k − 2p); group 3
    with num_output 3 gives the same shape. Weights are (C_in, num_output/group, kh, kw)."""
    for extra, n_out, w_shape in [("num_output: 4", 4, (3, 4, 3, 3)),
                                  ("num_output: 3 group: 3", 3, (3, 1, 3, 3))]:
        layer = make_layer("Deconvolution", deconv_params(f"{extra} kernel_size: 3 stride: 2"))
        top = tops(2)
        run_forward(layer, [blob((2, 3, 6, 4), seed=1), blob((2, 3, 6, 4), seed=2)], top)
        assert [t.shape for t in top] == [(2, n_out, 13, 9)] * 2
        assert layer.blobs[0].shape == w_shape
        assert layer.blobs[1].shape == (n_out,)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_deconvolution_simple_caffe(dtype: str) -> None:
    """TestSimpleDeconvolution: ones through constant-1 3×3 filters, stride 2, bias 0.1 on 3
    channels: 3.1 everywhere, +3 where two footprints overlap on one axis, +9 on both."""
    layer = make_layer("Deconvolution", deconv_params(
        "num_output: 4 kernel_size: 3 stride: 2",
        'weight_filler { type: "constant" value: 1 } '
        'bias_filler { type: "constant" value: 0.1 }'), dtype=dtype)
    top = tops(2, dtype)
    ones = np.ones((2, 3, 6, 4))
    run_forward(layer, [blob(data=ones, dtype=dtype), blob(data=ones, dtype=dtype)], top)
    h_overlap = np.array([h % 2 == 0 and 0 < h < 12 for h in range(13)])
    w_overlap = np.array([w % 2 == 0 and 0 < w < 8 for w in range(9)])
    expected = 3.1 + np.where(h_overlap[:, None] & w_overlap[None, :], 9.0,
                              np.where(h_overlap[:, None] | w_overlap[None, :], 3.0, 0.0))
    for t in top:
        assert t.data.dtype == np.dtype(dtype)
        np.testing.assert_allclose(t.data, np.broadcast_to(expected, t.shape), atol=1e-4)


def test_deconvolution_gradient_caffe() -> None:
    """TestGradient: two 3×6×4 gaussian bottoms, k2 s1, num_output 1, gaussian fillers,
    exhaustive check with (1e-2, 1e-3). (Caffe uses N=2; N=1 keeps the exhaustive check
    quick and changes nothing in the geometry.)"""
    params = deconv_params("num_output: 1 kernel_size: 2 stride: 1",
                           'weight_filler { type: "gaussian" } bias_filler { type: "gaussian" }')
    check("Deconvolution", params, [blob(data=gaussian((1, 3, 6, 4), 1)),
                                    blob(data=gaussian((1, 3, 6, 4), 2))],
          n_tops=2, exhaustive=True)


@pytest.mark.parametrize("extra", [
    "num_output: 3 kernel_size: 3",
    "num_output: 3 kernel_size: 3 pad: 1 stride: 2",
    "num_output: 4 kernel_size: 2 group: 2",
    "num_output: 2 kernel_size: 2 dilation: 2 stride: 2",
    "num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
    "num_output: 2 kernel_size: 3 bias_term: false",
    "num_output: 2 kernel_size: 1",
    "num_output: 2 kernel_size: 2 stride: 3",
], ids=["simple", "pad_stride", "group", "dilation", "rect", "no_bias", "1x1", "gappy"])
def test_deconvolution_gradient(extra: str) -> None:
    check("Deconvolution", deconv_params(extra), [blob((2, 4, 4, 3))])


def test_deconvolution_gradient_test_phase() -> None:
    check("Deconvolution", deconv_params("num_output: 2 kernel_size: 3 stride: 2 pad: 1"),
          [blob((2, 3, 3, 4))], phase=PHASE_TEST)


def naive_deconv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: tuple[int, int],
                 pad: tuple[int, int], dil: tuple[int, int], group: int) -> np.ndarray:
    """Scatter each input pixel's W-weighted kernel footprint into the output."""
    n, c, h, wd = x.shape
    _, og, kh, kw = w.shape
    cg = c // group
    oh = stride[0] * (h - 1) + dil[0] * (kh - 1) + 1 - 2 * pad[0]
    ow = stride[1] * (wd - 1) + dil[1] * (kw - 1) + 1 - 2 * pad[1]
    full = np.zeros((n, og * group, oh + 2 * pad[0], ow + 2 * pad[1]))
    for ci in range(c):
        g = ci // cg
        for yy in range(h):
            for xx in range(wd):
                for p in range(kh):
                    for q in range(kw):
                        full[:, g * og:(g + 1) * og, yy * stride[0] + p * dil[0],
                             xx * stride[1] + q * dil[1]] += x[:, ci, yy, xx, None] * w[ci, :, p, q]
    y = full[:, :, pad[0]:pad[0] + oh, pad[1]:pad[1] + ow]
    return y + (0 if b is None else b.reshape(1, -1, 1, 1))


@pytest.mark.parametrize(("extra", "stride", "pad", "dil", "group"), [
    ("num_output: 4 kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    ("num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    ("num_output: 2 kernel_size: 2 dilation: 2 pad: 1 stride: 1 stride: 2", (1, 2), (1, 1),
     (2, 2), 1),
    ("num_output: 4 kernel_h: 2 kernel_w: 3 dilation: 2 dilation: 1 group: 4", (1, 1), (0, 0),
     (2, 1), 4),
])
def test_deconvolution_matches_naive_scatter(extra: str, stride: tuple[int, int],
                                             pad: tuple[int, int], dil: tuple[int, int],
                                             group: int) -> None:
    layer = make_layer("Deconvolution", deconv_params(extra))
    x = blob((2, 4, 4, 5))
    top = tops(1)
    run_forward(layer, [x], top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(top[0].data, naive_deconv(x.data, w, b, stride, pad, dil, group),
                               rtol=1e-12, atol=1e-12)


def test_deconvolution_is_the_adjoint_of_convolution() -> None:
    """With the same weights, <deconv(x), y> = <x, conv(y)> (no bias): Deconvolution's forward
    is Convolution's backward-data, and its backward-data is Convolution's forward."""
    geometry = "kernel_h: 3 kernel_w: 2 stride: 2 stride: 1 pad: 1 dilation: 1 dilation: 2 group: 2"
    deconv = make_layer("Deconvolution", deconv_params(f"num_output: 4 {geometry} "
                                                       "bias_term: false"))
    x, y = blob((2, 6, 4, 5), seed=1), tops(1)
    run_forward(deconv, [x], y)
    conv = make_layer("Convolution", deconv_params(f"num_output: 6 {geometry} bias_term: false"))
    z = blob(y[0].shape, seed=2)
    cz = tops(1)
    run_forward(conv, [z], cz)
    assert conv.blobs[0].shape == deconv.blobs[0].shape == (6, 2, 3, 2)
    conv.blobs[0].data[...] = deconv.blobs[0].data
    conv.forward([z], cz)
    assert cz[0].shape == x.shape
    np.testing.assert_allclose(np.vdot(y[0].data, z.data), np.vdot(x.data, cz[0].data),
                               rtol=1e-12)
    # and the backward passes are each other's forward
    y[0].diff[...] = z.data
    deconv.backward(y, [True], [x])
    np.testing.assert_allclose(x.diff, cz[0].data, rtol=1e-12, atol=1e-12)
    cz[0].diff[...] = x.data
    conv.backward(cz, [True], [z])
    np.testing.assert_allclose(z.diff, y[0].data, rtol=1e-12, atol=1e-12)


def test_deconvolution_gradients_accumulate_and_respect_propagate_down() -> None:
    layer = make_layer("Deconvolution", deconv_params("num_output: 2 kernel_size: 2 stride: 2"))
    x, top = blob((1, 3, 2, 2)), tops(1)
    run_forward(layer, [x], top)
    top[0].diff[...] = 1.0
    x.diff[...] = 7.0
    layer.backward(top, [False], [x])
    assert (x.diff == 7.0).all()
    first = [b.diff.copy() for b in layer.blobs]
    layer.backward(top, [False], [x])
    for b, d in zip(layer.blobs, first, strict=True):
        np.testing.assert_allclose(b.diff, 2 * d)
    np.testing.assert_allclose(first[1], [16.0, 16.0])  # db = Σ dy over a 4×4 output


DECONV_TORCH_CASES = [
    # (C_in, num_output, params, stride, pad, dilation, groups)
    (4, 6, "num_output: 6 kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    (4, 6, "num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    (6, 3, "num_output: 3 kernel_size: 3 dilation: 2 pad: 2 group: 3", (1, 1), (2, 2), (2, 2), 3),
    (4, 4, "num_output: 4 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 0 "
           "dilation: 2 dilation: 1 group: 4", (2, 3), (1, 0), (2, 1), 4),
    (3, 2, "num_output: 2 kernel_size: 4 stride: 2 pad: 1 bias_term: false", (2, 2), (1, 1),
     (1, 1), 1),
    (2, 3, "num_output: 3 kernel_size: 1", (1, 1), (0, 0), (1, 1), 1),
]


@pytest.mark.parametrize("case", DECONV_TORCH_CASES,
                         ids=["plain", "group_stride_pad", "depthwise_dilated", "rect_all",
                              "no_bias_upsample", "1x1"])
def test_deconvolution_matches_torch(case: tuple) -> None:
    torch = pytest.importorskip("torch")
    c_in, _, params, stride, pad, dil, groups = case
    layer = make_layer("Deconvolution", deconv_params(params))
    x, top = blob((2, c_in, 5, 4)), tops(1)
    run_forward(layer, [x], top)
    w = layer.blobs[0].data
    bias = layer.blobs[1].data if len(layer.blobs) > 1 else None
    xt = torch.tensor(x.data, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if bias is None else torch.tensor(bias, requires_grad=True)
    yt = torch.nn.functional.conv_transpose2d(xt, wt, bt, stride=stride, padding=pad,
                                              groups=groups, dilation=dil)
    assert tuple(yt.shape) == top[0].shape
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6, atol=1e-10)
    dy = np.random.default_rng(5).normal(size=top[0].shape)
    (yt * torch.tensor(dy)).sum().backward()
    top[0].diff[...] = dy
    layer.backward(top, [True], [x])
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(layer.blobs[0].diff, wt.grad.numpy(), rtol=1e-6, atol=1e-10)
    if bt is not None:
        np.testing.assert_allclose(layer.blobs[1].diff, bt.grad.numpy(), rtol=1e-6, atol=1e-10)


def test_deconvolution_bilinear_upsampling() -> None:
    """The FCN upsampling recipe: factor f=2 → kernel 2f − f%2 = 4, stride f, pad ⌈(f−1)/2⌉,
    group = channels, bilinear weights. A linear ramp comes out as the interpolated ramp
    (away from the border), and a constant image stays constant inside."""
    c = 3
    layer = make_layer("Deconvolution", deconv_params(
        f"num_output: {c} group: {c} kernel_size: 4 stride: 2 pad: 1 bias_term: false",
        'weight_filler { type: "bilinear" }'))
    yy, xx = np.mgrid[0:5, 0:6].astype(float)
    ramp = np.broadcast_to(2.0 * yy + 3.0 * xx, (1, c, 5, 6)).copy()
    top = tops(1)
    run_forward(layer, [blob(data=ramp)], top)
    assert top[0].shape == (1, c, 10, 12)
    # output pixel u sits at input coordinate (u − 0.5) / 2
    oy, ox = np.mgrid[0:10, 0:12].astype(float)
    expected = 2.0 * (oy - 0.5) / 2 + 3.0 * (ox - 0.5) / 2
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(top[0].data[inner], np.broadcast_to(expected, top[0].shape)[inner],
                               rtol=1e-12, atol=1e-12)
    layer.forward([blob(data=np.ones((1, c, 5, 6)))], top)
    np.testing.assert_allclose(top[0].data[inner], 1.0, rtol=1e-12)


@pytest.mark.parametrize(("params", "shape", "message"), [
    ("num_output: 4 kernel_size: 3 group: 2", (1, 3, 5, 5), "group 2 must divide"),
    ("num_output: 3 kernel_size: 3 group: 2", (1, 4, 5, 5), "group 2 must divide"),
    ("num_output: 4", (1, 3, 3, 3), "kernel_size"),
    ("num_output: 4 kernel_size: 3 kernel_h: 3 kernel_w: 3", (1, 3, 5, 5), "not both"),
    ("num_output: 4 kernel_w: 3", (1, 3, 5, 5), "together"),
    ("num_output: 4 kernel_size: 3 axis: 2", (1, 3, 5, 5), "axis"),
    ("num_output: 4 kernel_size: 3 stride: 0", (1, 3, 5, 5), "positive"),
    ("num_output: 4 kernel_size: 3 dilation: 1 dilation: 2 dilation: 3", (1, 3, 5, 5),
     "dilation takes 1 or 2"),
    ("num_output: 4 kernel_size: 1 pad: 1", (1, 3, 1, 1), "leaves no output for a 1x1 input"),
    ("num_output: 4 kernel_size: 1", (3, 5), "4-D"),
    ("kernel_size: 3", (1, 3, 5, 5), "num_output"),
])
def test_deconvolution_bad_config(params: str, shape: tuple[int, ...], message: str) -> None:
    layer = make_layer("Deconvolution", f"convolution_param {{ {params} }}")
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob(shape)], tops(1))


def test_deconvolution_bottoms_must_match_the_setup() -> None:
    layer = make_layer("Deconvolution", "convolution_param { num_output: 2 kernel_size: 2 }")
    with pytest.raises(LayerError, match="same shape"):
        run_forward(layer, [blob((1, 2, 4, 4)), blob((1, 2, 4, 5))], tops(2))
    layer = make_layer("Deconvolution", "convolution_param { num_output: 2 kernel_size: 2 }")
    run_forward(layer, [blob((1, 2, 4, 4))], tops(1))
    with pytest.raises(LayerError, match="3 channels but the layer was set up for 2"):
        layer.reshape([blob((1, 3, 4, 4))], tops(1))


def test_deconvolution_bilinear_filler_needs_square_kernels() -> None:
    layer = make_layer("Deconvolution", deconv_params(
        "num_output: 2 kernel_h: 4 kernel_w: 3", 'weight_filler { type: "bilinear" }'))
    with pytest.raises(NetforgeError, match="square"):
        run_forward(layer, [blob((1, 2, 3, 3))], tops(1))


# -- Im2col ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "shape", "expected"), [
    ("kernel_size: 3 stride: 2", (2, 3, 6, 5), (2, 27, 2, 2)),
    ("kernel_size: 3 stride: 2 dilation: 3", (2, 3, 10, 11), (2, 27, 2, 3)),
    ("kernel_h: 5 kernel_w: 3 stride: 2", (2, 3, 6, 5), (2, 45, 1, 2)),
    ("kernel_size: 2 pad: 1", (1, 2, 3, 3), (1, 8, 4, 4)),
])
def test_im2col_setup_caffe(params: str, shape: tuple[int, ...],
                            expected: tuple[int, ...]) -> None:
    """TestSetup (2×3×10×11, k3 s2 dilation 3 → 2×27×2×3) and the older 6×5 / rect shapes."""
    layer = make_layer("Im2col", f"convolution_param {{ {params} }}")
    top = tops(1)
    run_forward(layer, [blob(shape)], top)
    assert top[0].shape == expected


@pytest.mark.parametrize(("params", "kh", "kw"), [
    ("kernel_size: 3 stride: 2", 3, 3),
    ("kernel_h: 5 kernel_w: 3 stride: 2", 5, 3),
])
def test_im2col_forward_top_left_block_caffe(params: str, kh: int, kw: int) -> None:
    """TestForward / TestRect: top[0, c, 0, 0] = bottom[0, c / (kh·kw), (c / kw) % kh, c % kw]."""
    x = blob(data=gaussian((2, 3, 6, 5)))
    top = tops(1)
    run_forward(make_layer("Im2col", f"convolution_param {{ {params} }}"), [x], top)
    for c in range(3 * kh * kw):
        assert top[0].data[0, c, 0, 0] == x.data[0, c // (kh * kw), (c // kw) % kh, c % kw]


def test_im2col_known_values_with_pad_and_dilation() -> None:
    x = np.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    top = tops(1)
    run_forward(make_layer("Im2col", "convolution_param { kernel_size: 2 pad: 1 stride: 3 "
                                     "dilation: 2 }"), [blob(data=x)], top)
    # windows start at (-1, -1), (-1, 2), (2, -1), (2, 2) and read rows/cols r, r + 2
    assert top[0].shape == (1, 4, 2, 2)
    np.testing.assert_array_equal(top[0].data[0], [
        [[0, 0], [0, 11]],     # (i, j) = (0, 0): x[r, c]
        [[0, 0], [10, 0]],     # (0, 1): x[r, c + 2]
        [[0, 7], [0, 0]],      # (1, 0): x[r + 2, c]
        [[6, 0], [0, 0]],      # (1, 1): x[r + 2, c + 2]
    ])


@pytest.mark.parametrize(("params", "shape"), [
    ("kernel_size: 3 stride: 2", (1, 3, 6, 5)),
    ("kernel_size: 3 stride: 2 dilation: 3", (1, 3, 10, 9)),
    ("kernel_h: 5 kernel_w: 3 stride: 2", (1, 3, 6, 5)),
], ids=["square", "dilated", "rect"])
def test_im2col_gradient_caffe(params: str, shape: tuple[int, ...]) -> None:
    """TestGradient, TestDilatedGradient, TestRectGradient: exhaustive, (1e-2, 1e-2), on
    Caffe's C×H×W with N=1 rather than 2 (the exhaustive check is quadratic in the size)."""
    check("Im2col", f"convolution_param {{ {params} }}", [blob(data=gaussian(shape))],
          threshold=1e-2, exhaustive=True)


@pytest.mark.parametrize("params", [
    "kernel_size: 3 pad: 1 stride: 1",
    "kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 2 stride_h: 1 stride_w: 2 dilation: 2",
    "kernel_size: 1",
])
def test_im2col_gradient(params: str) -> None:
    check("Im2col", f"convolution_param {{ {params} }}", [blob((2, 2, 5, 6))], threshold=1e-2)


@pytest.mark.parametrize(("params", "k", "s", "p", "d"), [
    ("kernel_size: 3 stride: 2", (3, 3), (2, 2), (0, 0), (1, 1)),
    ("kernel_size: 3 stride: 2 dilation: 3", (3, 3), (2, 2), (0, 0), (3, 3)),
    ("kernel_h: 2 kernel_w: 3 pad_h: 1 pad_w: 2 stride_h: 1 stride_w: 2 dilation: 2 "
     "dilation: 1", (2, 3), (1, 2), (1, 2), (2, 1)),
    ("kernel_size: 1", (1, 1), (1, 1), (0, 0), (1, 1)),
], ids=["square", "dilated", "rect_pad", "1x1"])
def test_im2col_matches_torch_unfold(params: str, k: tuple, s: tuple, p: tuple,
                                     d: tuple) -> None:
    torch = pytest.importorskip("torch")
    layer = make_layer("Im2col", f"convolution_param {{ {params} }}")
    x, top = blob((2, 3, 10, 9)), tops(1)
    run_forward(layer, [x], top)
    xt = torch.tensor(x.data, requires_grad=True)
    yt = torch.nn.functional.unfold(xt, kernel_size=k, dilation=d, padding=p, stride=s)
    np.testing.assert_allclose(top[0].data.reshape(yt.shape), yt.detach().numpy(), rtol=1e-6)
    assert top[0].shape[:2] == tuple(yt.shape[:2])
    dy = np.random.default_rng(4).normal(size=top[0].shape)
    (yt * torch.tensor(dy.reshape(yt.shape))).sum().backward()
    top[0].diff[...] = dy
    layer.backward(top, [True], [x])
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize(("params", "shape", "message"), [
    ("stride: 2", (1, 1, 4, 4), "kernel_size"),
    ("kernel_size: 5", (1, 1, 4, 4), "kernel 5x5 with pad 0 does not fit a 4x4"),
    ("kernel_size: 2 dilation: 4", (1, 1, 4, 4), "dilation 4"),
    ("kernel_size: 0", (1, 1, 4, 4), "positive"),
    ("kernel_size: 2 axis: 0", (1, 1, 4, 4), "axis"),
    ("kernel_size: 2", (4, 4), "4-D"),
])
def test_im2col_bad_config(params: str, shape: tuple[int, ...], message: str) -> None:
    layer = make_layer("Im2col", f"convolution_param {{ {params} }}")
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob(shape)], tops(1))


def test_im2col_not_in_place() -> None:
    layer = make_layer("Im2col", "convolution_param { kernel_size: 1 }")
    b = blob((1, 1, 2, 2))
    with pytest.raises(LayerError, match="in-place"):
        run_forward(layer, [b], [b])


# -- SPP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("height", "shape", "expected"), [
    (3, (2, 3, 9, 8), (2, 63)),
    (5, (4, 3, 1024, 765), (4, 1023)),
    (3, (10, 3, 7, 7), (10, 63)),
    (1, (2, 3, 9, 8), (2, 3, 1, 1)),
], ids=["setup", "equal_output_dims", "equal_output_dims2", "single_level"])
def test_spp_shapes_caffe(height: int, shape: tuple[int, ...], expected: tuple) -> None:
    """TestSetup / TestEqualOutputDims(2): C·(4^h − 1)/3 outputs per image, as (N, C·…)
    (Caffe's concat of flattened levels); one level is the Pooling top itself."""
    layer = make_layer("SPP", f"spp_param {{ pyramid_height: {height} }}", dtype="float32")
    bottom, top = [blob(shape, dtype="float32")], tops(1, "float32")
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    assert top[0].shape == expected


def test_spp_level_geometry_caffe() -> None:
    """GetPoolingParam: kernel ⌈H/2^i⌉, stride = kernel, pad (kernel·2^i − H + 1) / 2."""
    assert [spp_geometry(i, 9, 8) for i in range(3)] == [((9, 8), (0, 0)), ((5, 4), (1, 0)),
                                                        ((3, 2), (2, 0))]
    assert spp_geometry(4, 1024, 765) == ((64, 48), (0, 2))


def spp_geometry(level: int, h: int, w: int) -> tuple:
    from netforge.layers.vision import SPP
    return SPP.level_geometry(level, h, w)


@pytest.mark.parametrize(("pool", "expected"), [
    ("MAX", [15, 5, 7, 13, 15]),
    ("AVE", [7.5, 2.5, 4.5, 10.5, 12.5]),
])
def test_spp_known_values(pool: str, expected: list[float]) -> None:
    x = np.arange(16.0).reshape(1, 1, 4, 4)
    x = np.concatenate([x, -x], axis=1)  # a second channel: levels are flattened per channel
    top = tops(1)
    run_forward(make_layer("SPP", f"spp_param {{ pyramid_height: 2 pool: {pool} }}"),
                [blob(data=x)], top)
    neg = {"MAX": [0, -0, -2, -8, -10], "AVE": [-v for v in expected]}[pool]
    assert top[0].shape == (1, 10)
    np.testing.assert_allclose(top[0].data[0], [expected[0], neg[0], *expected[1:], *neg[1:]])


def test_spp_single_level_is_global_pooling() -> None:
    x = blob(data=distinct((2, 3, 9, 8)))
    for pool in ("MAX", "AVE"):
        top, ref = tops(1), tops(1)
        run_forward(make_layer("SPP", f"spp_param {{ pyramid_height: 1 pool: {pool} }}"), [x],
                    top)
        run_forward(make_layer("Pooling", f"pooling_param {{ pool: {pool} global_pooling: true }}"),
                    [x], ref)
        np.testing.assert_array_equal(top[0].data, ref[0].data)


def test_spp_gradient_caffe() -> None:
    """TestGradient: pyramid 3 on a 9×8 gaussian bottom, exhaustive with (1e-4, 1e-2).
    Caffe's bottom is 2×3×9×8; 1×2×9×8 has the same levels at a ninth of the cost."""
    check("SPP", "spp_param { pyramid_height: 3 }", [blob(data=gaussian((1, 2, 9, 8)))],
          stepsize=1e-4, threshold=1e-2, exhaustive=True)


@pytest.mark.parametrize(("params", "shape"), [
    ("pyramid_height: 3 pool: AVE", (2, 3, 9, 8)),
    ("pyramid_height: 2 pool: MAX", (2, 2, 7, 5)),
    ("pyramid_height: 1 pool: AVE", (2, 2, 3, 4)),
    ("pyramid_height: 4 pool: MAX", (1, 2, 16, 15)),
])
def test_spp_gradient(params: str, shape: tuple[int, ...]) -> None:
    check("SPP", f"spp_param {{ {params} }}", [blob(data=distinct(shape))], threshold=1e-2)


def test_spp_follows_input_size_changes() -> None:
    """Caffe rebuilds the levels when H or W change; the top size stays the same."""
    layer = make_layer("SPP", "spp_param { pyramid_height: 3 }")
    top = tops(1)
    run_forward(layer, [blob(data=distinct((2, 3, 9, 8)))], top)
    x = blob(data=distinct((1, 3, 12, 7), seed=5))
    layer.reshape([x], top)
    layer.forward([x], top)
    fresh = tops(1)
    run_forward(make_layer("SPP", "spp_param { pyramid_height: 3 }"), [x], fresh)
    assert top[0].shape == (1, 63)
    np.testing.assert_array_equal(top[0].data, fresh[0].data)


def torch_spp(torch: Any, x: Any, h: int, w: int, height: int, pool: str) -> Any:
    """SPP from torch's pooling with Caffe's per-level geometry. The padding is explicit (torch
    caps pad at half the kernel) and sized so that floor-mode pooling gives Caffe's CEIL count;
    AVE divides a sum pooling by Caffe's pool size (the window clipped at H + pad)."""
    nnf = torch.nn.functional
    parts = []
    for i in range(height):
        (kh, kw), (ph, pw) = spp_geometry(i, h, w)
        oh, ow = caffe_pool_out(h, kh, ph), caffe_pool_out(w, kw, pw)
        extra_h, extra_w = (oh - 1) * kh + kh - (h + 2 * ph), (ow - 1) * kw + kw - (w + 2 * pw)
        value = -math.inf if pool == "MAX" else 0.0
        xp = nnf.pad(x, (pw, pw + max(extra_w, 0), ph, ph + max(extra_h, 0)), value=value)
        xp = xp[:, :, :oh * kh, :ow * kw]  # windows Caffe drops (they start in the padding)
        if pool == "MAX":
            y = nnf.max_pool2d(xp, (kh, kw), (kh, kw))
        else:
            y = nnf.avg_pool2d(xp, (kh, kw), (kh, kw), divisor_override=1)
            hs, ws = np.arange(oh) * kh - ph, np.arange(ow) * kw - pw
            size = np.outer(np.minimum(hs + kh, h + ph) - hs, np.minimum(ws + kw, w + pw) - ws)
            y = y / torch.tensor(size, dtype=torch.float64)
        assert tuple(y.shape[2:]) == (oh, ow)
        parts.append(y.flatten(1))
    return torch.cat(parts, dim=1)


def caffe_pool_out(size: int, k: int, p: int) -> int:
    out = -(-(size + 2 * p - k) // k) + 1
    return out - 1 if p > 0 and (out - 1) * k >= size + p else out


def spp_vs_torch(torch: Any, shape: tuple[int, ...], height: int, pool: str,
                 reference: Callable[[Any], Any]) -> None:
    layer = make_layer("SPP", f"spp_param {{ pyramid_height: {height} pool: {pool} }}")
    x, top = blob(data=distinct(shape)), tops(1)
    run_forward(layer, [x], top)
    xt = torch.tensor(x.data, requires_grad=True)
    yt = reference(xt)
    np.testing.assert_allclose(top[0].data.reshape(yt.shape), yt.detach().numpy(), rtol=1e-6,
                               atol=1e-12)
    dy = np.random.default_rng(6).normal(size=top[0].shape)
    (yt * torch.tensor(dy.reshape(yt.shape))).sum().backward()
    top[0].diff[...] = dy
    layer.backward(top, [True], [x])
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize(("shape", "height"), [((2, 3, 9, 8), 3), ((2, 2, 7, 7), 3),
                                               ((1, 2, 13, 21), 3), ((1, 2, 16, 15), 4),
                                               ((2, 2, 5, 6), 1)])
def test_spp_matches_torch_pooling(pool: str, shape: tuple[int, ...], height: int) -> None:
    torch = pytest.importorskip("torch")
    h, w = shape[2:]
    spp_vs_torch(torch, shape, height, pool, lambda x: torch_spp(torch, x, h, w, height, pool))


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_matches_torch_native_ceil_pooling(pool: str) -> None:
    """On 7×7 every level's pad is at most half its kernel, so torch's own CEIL-mode pooling
    (count_include_pad) applies unchanged."""
    torch = pytest.importorskip("torch")
    nnf = torch.nn.functional

    def reference(x: Any) -> Any:
        parts = []
        for i in range(3):
            k, p = spp_geometry(i, 7, 7)
            if pool == "MAX":
                y = nnf.max_pool2d(x, k, k, p, ceil_mode=True)
            else:
                y = nnf.avg_pool2d(x, k, k, p, ceil_mode=True, count_include_pad=True)
            parts.append(y.flatten(1))
        return torch.cat(parts, dim=1)

    spp_vs_torch(torch, (2, 3, 7, 7), 3, pool, reference)


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
def test_spp_matches_torch_adaptive_pooling(pool: str) -> None:
    """When 2^(height−1) divides H and W there is no padding and each level is exactly
    adaptive pooling to 2^i × 2^i."""
    torch = pytest.importorskip("torch")
    nnf = torch.nn.functional
    adaptive = nnf.adaptive_max_pool2d if pool == "MAX" else nnf.adaptive_avg_pool2d

    def reference(x: Any) -> Any:
        return torch.cat([adaptive(x, 2 ** i).flatten(1) for i in range(3)], dim=1)

    spp_vs_torch(torch, (2, 3, 8, 12), 3, pool, reference)


@pytest.mark.parametrize(("params", "shape", "message"), [
    ("", (1, 1, 4, 4), "pyramid_height must be at least 1"),
    ("pyramid_height: 0", (1, 1, 4, 4), "pyramid_height must be at least 1"),
    ("pyramid_height: 2 pool: STOCHASTIC", (1, 1, 4, 4), "STOCHASTIC"),
    ("pyramid_height: 3", (1, 1, 5, 8),
     "pyramid level 2 cannot pool a 5x8 input into 4x4 bins: pad 2x0 must be smaller"),
    ("pyramid_height: 2", (1, 1, 1, 4), "pyramid level 1 cannot pool a 1x4 input into 2x2"),
    ("pyramid_height: 2", (4, 4), "4-D"),
])
def test_spp_bad_config(params: str, shape: tuple[int, ...], message: str) -> None:
    layer = make_layer("SPP", f"spp_param {{ {params} }}")
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob(shape)], tops(1))


def test_spp_not_in_place() -> None:
    layer = make_layer("SPP", "spp_param { pyramid_height: 1 }")
    b = blob((1, 1, 2, 2))
    with pytest.raises(LayerError, match="in-place"):
        run_forward(layer, [b], [b])


# -- the bilinear filler --------------------------------------------------------------------------

def bilinear(shape: tuple[int, ...], **kw: int) -> np.ndarray:
    return fill(pb.FillerParameter(type="bilinear", **kw), shape, np.random.default_rng(0),
                np.float64)


@pytest.mark.parametrize("n", [7, 6, 4, 3, 2, 1], ids=["odd7", "even6", "k4", "k3", "k2", "k1"])
def test_bilinear_filler_caffe_pattern(n: int) -> None:
    """test_filler BilinearFillerTest (TestFillOdd n=7, TestFillEven n=6): every plane is
    (1 − |x/f − c|)(1 − |y/f − c|) with f = ⌈n/2⌉, c = (n − 1)/(2f)."""
    w = bilinear((10, 2, n, n))
    f = math.ceil(n / 2)
    c = (n - 1) / (2.0 * f)
    for j in range(n * n):
        x, y = j % n, (j // n) % n
        np.testing.assert_allclose(w[:, :, y, x], (1 - abs(x / f - c)) * (1 - abs(y / f - c)),
                                   rtol=1e-15, atol=1e-15)


def test_bilinear_filler_known_kernels() -> None:
    np.testing.assert_allclose(bilinear((1, 1, 4, 4))[0, 0],
                               np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25]))
    np.testing.assert_allclose(bilinear((1, 1, 3, 3))[0, 0], np.outer([0.5, 1, 0.5],
                                                                      [0.5, 1, 0.5]))
    k5 = [1 / 3, 2 / 3, 1, 2 / 3, 1 / 3]
    np.testing.assert_allclose(bilinear((2, 1, 5, 5))[1, 0], np.outer(k5, k5))
    assert fill(pb.FillerParameter(type="bilinear"), (1, 1, 4, 4), np.random.default_rng(0),
                np.float32).dtype == np.float32


@pytest.mark.parametrize(("shape", "kw", "message"), [
    ((4, 4), {}, "4-axis"),
    ((1, 2, 4, 4, 1), {}, "4-axis"),
    ((1, 1, 4, 3), {}, "square kernels .*4x3"),
    ((1, 1, 4, 4), {"sparse": 3}, "sparse"),
])
def test_bilinear_filler_checks(shape: tuple[int, ...], kw: dict, message: str) -> None:
    with pytest.raises(NetforgeError, match=message):
        bilinear(shape, **kw)
