"""BatchNorm, Scale, Bias, LRN and MVN: Caffe's layer tests (test_batch_norm_layer,
test_scale_layer, test_bias_layer, test_lrn_layer, test_mvn_layer), formulas, PyTorch as an
oracle where it has the same computation, and a small residual net built from YAML."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import netforge
from netforge.backend import NumpyBackend
from netforge.blob import Blob
from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from netforge.proto import pb
from tests.helpers import PHASE_TEST, PHASE_TRAIN, blob, make_layer, run_forward, tops

GRAD_CHECKED = {"BatchNorm", "Scale", "Bias", "LRN", "MVN"}
NO_BACKWARD: set[str] = set()

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (2, 3, 4, 5)


def gaussian(shape: tuple[int, ...], seed: int = 1701, std: float = 1.0) -> Blob:
    return blob(data=np.random.default_rng(seed).normal(0.0, std, size=shape))


def run(layer_type: str, params: str, bottoms: list[Blob], phase: int = PHASE_TRAIN,
        in_place: bool = False) -> tuple[object, list[Blob]]:
    layer = make_layer(layer_type, params, phase=phase)
    top = [bottoms[0]] if in_place else tops(1)
    run_forward(layer, bottoms, top)
    return layer, top


def backward(layer: object, top: list[Blob], bottoms: list[Blob], dy: np.ndarray,
             down: list[bool] | None = None) -> None:
    top[0].diff[...] = dy
    layer.backward(top, down or [True] * len(bottoms), bottoms)  # type: ignore[attr-defined]


def assert_grad(layer_type: str, params: str, bottoms: list[Blob], threshold: float = 1e-3,
                phase: int = PHASE_TRAIN, exhaustive: bool = True,
                check_bottom: int = -1) -> None:
    layer = make_layer(layer_type, params, phase=phase)
    checker = GradientChecker(1e-2, threshold)
    if exhaustive:
        result = checker.check_exhaustive(layer, bottoms, tops(1), check_bottom)
    else:
        result = checker.check(layer, bottoms, tops(1), check_bottom)
    assert result.checked > 0
    assert result.ok, result.failures[:5]


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """The netforge logger's WARNING messages while the block runs."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("netforge")
    handler = Collect(logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(old_level or logging.WARNING, logging.WARNING))
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# == BatchNorm ====================================================================================

def channel_stats(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    per_channel = np.moveaxis(y, 1, 0).reshape(y.shape[1], -1)
    return per_channel.mean(axis=1), (per_channel ** 2).mean(axis=1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_batchnorm_forward_caffe(dtype: str) -> None:
    """Caffe's TestForward: 5×2×3×4 gaussian, default params (TRAIN): each channel of the
    output has mean 0 and mean square 1 within 1e-3."""
    x = np.random.default_rng(3).normal(size=(5, 2, 3, 4))
    layer = make_layer("BatchNorm", dtype=dtype)
    top = tops(1, dtype)
    run_forward(layer, [blob(data=x, dtype=dtype)], top)
    assert top[0].data.dtype == np.dtype(dtype)
    mean, sq = channel_stats(top[0].data)
    np.testing.assert_allclose(mean, 0, atol=1e-3)
    np.testing.assert_allclose(sq, 1, atol=1e-3)


def test_batchnorm_forward_in_place_caffe() -> None:
    """Caffe's TestForwardInplace."""
    x = gaussian((5, 2, 3, 4), seed=4)
    layer = make_layer("BatchNorm")
    run_forward(layer, [x], [x])
    mean, sq = channel_stats(x.data)
    np.testing.assert_allclose(mean, 0, atol=1e-3)
    np.testing.assert_allclose(sq, 1, atol=1e-3)


@pytest.mark.parametrize("shape", [(6, 3), (7,), (2, 3, 4, 5, 2), (3, 2, 5)])
def test_batchnorm_formula_any_trailing_dims(shape: tuple[int, ...]) -> None:
    x = gaussian(shape, seed=5, std=3.0)
    x.data += 2.0
    layer, top = run("BatchNorm", "", [x])
    data = x.data.reshape(shape[0], 1 if len(shape) == 1 else shape[1], -1)
    mean = data.mean(axis=(0, 2), keepdims=True)
    var = data.var(axis=(0, 2), keepdims=True)
    eps = float(np.float32(1e-5))
    expected = ((data - mean) / np.sqrt(var + eps)).reshape(shape)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-12)
    channels = 1 if len(shape) == 1 else shape[1]
    assert [b.shape for b in layer.blobs] == [(channels,), (channels,), (1,)]


def test_batchnorm_running_statistics_and_global_use() -> None:
    """Each TRAIN forward: w ← f·w + 1, mean ← f·mean + μ, var ← f·var + m/(m−1)·σ²;
    a TEST layer then normalizes with mean/w and var/w."""
    f = 0.9
    params = f"batch_norm_param {{ moving_average_fraction: {f} }}"
    layer = make_layer("BatchNorm", params)
    x1, x2 = gaussian((4, 3, 2, 2), seed=1), gaussian((4, 3, 2, 2), seed=2, std=2.0)
    top = tops(1)
    layer.setup([x1], top)
    m = 4 * 2 * 2
    expected_mean, expected_var, expected_w = np.zeros(3), np.zeros(3), 0.0
    for x in (x1, x2):
        layer.reshape([x], top)
        layer.forward([x], top)
        mu = x.data.mean(axis=(0, 2, 3))
        var = x.data.var(axis=(0, 2, 3))
        expected_w = f * expected_w + 1
        expected_mean = f * expected_mean + mu
        expected_var = f * expected_var + m / (m - 1) * var
    f32 = float(np.float32(f))  # the proto field is a float
    assert layer.blobs[2].data[0] == pytest.approx(f32 + 1, rel=1e-12)
    np.testing.assert_allclose(layer.blobs[0].data, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(layer.blobs[1].data, expected_var, rtol=1e-6)

    test_layer = make_layer("BatchNorm", phase=PHASE_TEST)
    x3 = gaussian((2, 3, 2, 2), seed=3)
    top3 = tops(1)
    test_layer.setup([x3], top3)
    for mine, theirs in zip(test_layer.blobs, layer.blobs, strict=True):
        mine.data[...] = theirs.data
    before = [b.data.copy() for b in test_layer.blobs]
    test_layer.reshape([x3], top3)
    test_layer.forward([x3], top3)
    w = layer.blobs[2].data[0]
    mean = (layer.blobs[0].data / w)[None, :, None, None]
    var = (layer.blobs[1].data / w)[None, :, None, None]
    eps = float(np.float32(1e-5))
    np.testing.assert_allclose(top3[0].data, (x3.data - mean) / np.sqrt(var + eps), rtol=1e-12)
    for b, old in zip(test_layer.blobs, before, strict=True):
        np.testing.assert_array_equal(b.data, old)  # global stats are never updated


def test_batchnorm_global_stats_before_any_update_divide_by_sqrt_eps() -> None:
    """blob[2] == 0: Caffe's scale factor is 0, so mean = var = 0 and y = x / sqrt(eps)."""
    x = gaussian((2, 3, 2, 2))
    _, top = run("BatchNorm", "batch_norm_param { eps: 0.01 }", [x], phase=PHASE_TEST)
    np.testing.assert_allclose(top[0].data, x.data / np.sqrt(float(np.float32(0.01))),
                               rtol=1e-12)


@pytest.mark.parametrize(("phase", "params", "global_stats"), [
    (PHASE_TRAIN, "", False),
    (PHASE_TEST, "", True),
    (PHASE_TRAIN, "batch_norm_param { use_global_stats: true }", True),
    (PHASE_TEST, "batch_norm_param { use_global_stats: false }", False),
])
def test_batchnorm_use_global_stats_follows_phase_unless_set(phase: int, params: str,
                                                             global_stats: bool) -> None:
    layer, _ = run("BatchNorm", params, [gaussian((3, 2, 2))], phase=phase)
    assert layer.use_global_stats is global_stats  # type: ignore[attr-defined]
    # Batch statistics update the running sums, global ones leave them alone.
    assert layer.blobs[2].data[0] == (0.0 if global_stats else 1.0)  # type: ignore[attr-defined]


def test_batchnorm_forces_lr_mult_zero_the_caffe_way() -> None:
    layer = make_layer("BatchNorm")
    with warnings_logged() as warnings:
        run_forward(layer, [gaussian((2, 3))], tops(1))
    assert not warnings
    assert [(s.lr_mult, s.decay_mult) for s in layer.param.param] == [(0.0, 0.0)] * 3


def test_batchnorm_nonzero_lr_mult_warns_and_is_forced_to_zero() -> None:
    layer = make_layer("BatchNorm", "param { lr_mult: 1 } param { lr_mult: 0 decay_mult: 1 }")
    with warnings_logged() as warnings:
        run_forward(layer, [gaussian((2, 3))], tops(1))
    assert len(warnings) == 1
    assert "batchnorm" in warnings[0] and "param 0 has lr_mult 1" in warnings[0]
    assert [(s.lr_mult, s.decay_mult) for s in layer.param.param] == [
        (0.0, 0.0), (0.0, 1.0), (0.0, 0.0)]


def test_batchnorm_statistics_are_not_learned_in_a_net() -> None:
    text = """
    layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
    layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" param { lr_mult: 2 } }
    layer { name: "ip" type: "InnerProduct" bottom: "y" top: "z"
            inner_product_param { num_output: 1 } }
    """
    p = pb.NetParameter()
    text_format.Parse(text, p)
    with warnings_logged() as warnings:
        net = netforge.Net(p, "TRAIN", verbose=False)
    assert any("forcing it to 0" in w for w in warnings)
    bn = [q for q in net.learnable_params if q.layer == "bn"]
    assert [(q.lr_mult, q.decay_mult) for q in bn] == [(0.0, 0.0)] * 3
    bn_layer = net.layers[net.layer_by_name["bn"]]
    assert bn_layer.param_propagate_down == [False] * 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("shape", [(4, 2, 2, 3), (4, 3), (6,)])
def test_batchnorm_gradient_caffe(shape: tuple[int, ...]) -> None:
    """Caffe's TestGradient: exhaustive (the ½Σy² objective is nearly constant under
    normalization), (1e-2, 1e-4), batch statistics; a smaller blob than Caffe's 5×2×3×4."""
    assert_grad("BatchNorm", "", [gaussian(shape)], threshold=1e-4)


def test_batchnorm_gradient_global_stats() -> None:
    layer = make_layer("BatchNorm", phase=PHASE_TEST)
    x = gaussian((2, 3, 2, 2))
    top = tops(1)
    layer.setup([x], top)
    layer.blobs[0].data[...] = [0.5, -1.0, 2.0]
    layer.blobs[1].data[...] = [2.0, 0.5, 3.0]
    layer.blobs[2].data[...] = 2.0
    checker = GradientChecker(1e-2, 1e-3)
    result = checker.check_single(layer, [x], top, check_params=False)
    assert result.checked == x.count and result.ok, result.failures[:5]
    # The running statistics get no gradient.
    assert all(not b.diff.any() for b in layer.blobs)


def test_batchnorm_in_place_backward_matches() -> None:
    x = gaussian((3, 2, 2, 2), seed=8)
    dy = np.random.default_rng(9).normal(size=x.shape)
    layer, top = run("BatchNorm", "", [x])
    backward(layer, top, [x], dy)
    expected = x.diff.copy()
    x2 = blob(data=x.data)
    layer2, top2 = run("BatchNorm", "", [x2], in_place=True)
    top2[0].data[...] = 123.0  # a later in-place layer overwrites the shared blob
    backward(layer2, top2, [x2], dy)
    np.testing.assert_allclose(x2.diff, expected, rtol=1e-12)


def test_batchnorm_propagate_down_false_leaves_bottom_diff() -> None:
    x = gaussian((3, 2))
    layer, top = run("BatchNorm", "", [x])
    x.diff[...] = 7.0
    backward(layer, top, [x], np.ones(x.shape), [False])
    assert (x.diff == 7.0).all()


def test_batchnorm_torch_batch_stats() -> None:
    torch = pytest.importorskip("torch")
    x = gaussian((4, 3, 2, 5), seed=11, std=2.0)
    dy = np.random.default_rng(12).normal(size=x.shape)
    layer, top = run("BatchNorm", "", [x])
    backward(layer, top, [x], dy)
    eps = float(np.float32(1e-5))
    xt = torch.tensor(x.data, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    yt = torch.nn.functional.batch_norm(xt, rm, rv, training=True, momentum=1.0, eps=eps)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-12)
    # With momentum 1, torch's running stats are the batch mean and the unbiased variance:
    # Caffe's normalized sums after one step, m/(m−1) included.
    w = layer.blobs[2].data[0]  # type: ignore[attr-defined]
    np.testing.assert_allclose(layer.blobs[0].data / w, rm.numpy(), rtol=1e-6)  # type: ignore[attr-defined]
    np.testing.assert_allclose(layer.blobs[1].data / w, rv.numpy(), rtol=1e-6)  # type: ignore[attr-defined]


def test_batchnorm_torch_global_stats() -> None:
    torch = pytest.importorskip("torch")
    x = gaussian((2, 3, 4), seed=13)
    dy = np.random.default_rng(14).normal(size=x.shape)
    layer = make_layer("BatchNorm", "batch_norm_param { eps: 0.001 }", phase=PHASE_TEST)
    top = tops(1)
    layer.setup([x], top)
    mean_sum, var_sum, w = np.array([1.0, -2.0, 0.5]), np.array([3.0, 0.2, 1.5]), 1.5
    layer.blobs[0].data[...] = mean_sum
    layer.blobs[1].data[...] = var_sum
    layer.blobs[2].data[...] = w
    layer.reshape([x], top)
    layer.forward([x], top)
    backward(layer, top, [x], dy)
    xt = torch.tensor(x.data, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt, torch.tensor(mean_sum / w),
                                        torch.tensor(var_sum / w), training=False,
                                        eps=float(np.float32(0.001)))
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-12)


def test_batchnorm_bad_params_and_shapes() -> None:
    with pytest.raises(LayerError, match="eps must not be negative"):
        run("BatchNorm", "batch_norm_param { eps: -1 }", [gaussian((2, 3))])
    layer, top = run("BatchNorm", "", [gaussian((2, 3, 4))])
    with pytest.raises(LayerError, match="has 4 channels but the layer was set up for 3"):
        layer.reshape([gaussian((2, 4, 4))], top)
    with pytest.raises(LayerError, match="at least one axis"):
        run("BatchNorm", "", [blob(data=np.array(1.0))])


# == Scale and Bias ===============================================================================

def uniform(shape: tuple[int, ...], seed: int) -> Blob:
    """Caffe's scale/bias tests fill every blob with U(1, 10)."""
    return blob(shape, seed=seed, low=1.0, high=10.0)


def expand(operand: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """operand reshaped to broadcast over ``shape`` from ``axis``."""
    if operand.ndim == 0:
        return operand
    return operand.reshape((1,) * axis + operand.shape
                           + (1,) * (len(shape) - axis - operand.ndim))


# (case id, params, operand shape (None: learned), axis the operand starts at)
BROADCAST_CASES = [
    ("eltwise", "axis: 0", SHAPE, 0),
    ("begin", "axis: 0", (2, 3), 0),
    ("middle", "axis: 1", (3, 4), 1),
    ("end", "axis: 2", (4, 5), 2),
    ("scalar", "", (), 0),
    ("scalar_axis2", "axis: 2", (), 0),
    ("param_eltwise", "axis: 0 num_axes: -1", None, 0),
    ("param_middle", "axis: 1 num_axes: 2", None, 1),
    ("param_default", "", None, 1),
    ("param_scalar", "num_axes: 0", None, 0),
    ("param_negative_axis", "axis: -2 num_axes: 2", None, 2),
]
CASE_IDS = [c[0] for c in BROADCAST_CASES]


def operand_shape(params: str, axis: int, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if shape is not None:
        return shape
    if "num_axes: -1" in params:
        return SHAPE[axis:]
    if "num_axes: 0" in params:
        return ()
    n = 2 if "num_axes: 2" in params else 1
    return SHAPE[axis:axis + n]


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize(("case", "params", "shape", "axis"), BROADCAST_CASES, ids=CASE_IDS)
def test_scale_bias_forward_caffe_cases(kind: str, case: str, params: str,
                                        shape: tuple[int, ...] | None, axis: int) -> None:
    field = "scale_param" if kind == "Scale" else "bias_param"
    if shape is None:
        params += ' filler { type: "gaussian" }'
    x = uniform(SHAPE, 1)
    bottoms = [x] if shape is None else [x, uniform(shape, 2)]
    layer, top = run(kind, f"{field} {{ {params} }}", bottoms)
    operand = layer.blobs[0].data if shape is None else bottoms[1].data  # type: ignore[attr-defined]
    assert operand.shape == operand_shape(params, axis, shape)
    b = expand(operand, SHAPE, axis)
    expected = x.data * b if kind == "Scale" else x.data + b
    assert top[0].shape == SHAPE
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize(("case", "params", "shape", "axis"), BROADCAST_CASES, ids=CASE_IDS)
def test_scale_bias_gradient_caffe_cases(kind: str, case: str, params: str,
                                         shape: tuple[int, ...] | None, axis: int) -> None:
    """Caffe's TestGradient* cases: exhaustive, (1e-2, 1e-3), on a 2×3×4×5 bottom (smaller
    here where the exhaustive check would be slow)."""
    field = "scale_param" if kind == "Scale" else "bias_param"
    if shape is None:
        params += ' filler { type: "gaussian" }'
    x = uniform(SHAPE, 1)
    bottoms = [x] if shape is None else [x, uniform(shape, 2)]
    assert_grad(kind, f"{field} {{ {params} }}", bottoms, exhaustive=False)


@pytest.mark.parametrize("case", ["middle", "param_middle"])
def test_scale_gradient_exhaustive(case: str) -> None:
    params = {"middle": "axis: 1",
              "param_middle": 'axis: 1 num_axes: 2 filler { type: "gaussian" }'}
    x = uniform((2, 3, 2, 2), 1)
    bottoms = [x, uniform((3, 2), 2)] if case == "middle" else [x]
    assert_grad("Scale", f"scale_param {{ {params[case]} }}", bottoms)


@pytest.mark.parametrize("two_bottoms", [False, True])
def test_scale_with_bias_term(two_bottoms: bool) -> None:
    """Caffe's TestForwardBroadcastMiddleWithParamAndBias / TestGradientScaleAndBias: the
    bias blob follows the scale blob and spans the same axes."""
    x = uniform(SHAPE, 1)
    params = ('scale_param { axis: 1 num_axes: 2 filler { type: "gaussian" } bias_term: true '
              'bias_filler { type: "gaussian" } }')
    if two_bottoms:
        params = 'scale_param { axis: 1 bias_term: true bias_filler { type: "gaussian" } }'
    bottoms = [x, uniform((3, 4), 2)] if two_bottoms else [x]
    layer, top = run("Scale", params, bottoms)
    blobs = layer.blobs  # type: ignore[attr-defined]
    assert [b.shape for b in blobs] == ([(3, 4)] if two_bottoms else [(3, 4), (3, 4)])
    s = bottoms[1].data if two_bottoms else blobs[0].data
    expected = x.data * s[None, :, :, None] + blobs[-1].data[None, :, :, None]
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12)
    assert_grad("Scale", params, [uniform((2, 3, 4, 2), 1)] + (
        [uniform((3, 4), 2)] if two_bottoms else []), exhaustive=False)


def test_scale_and_bias_default_fillers_are_identity() -> None:
    x = uniform(SHAPE, 1)
    layer, top = run("Scale", "scale_param { bias_term: true }", [x])
    assert [b.shape for b in layer.blobs] == [(3,), (3,)]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(layer.blobs[0].data, 1.0)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(layer.blobs[1].data, 0.0)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(top[0].data, x.data)
    layer, top = run("Bias", "", [x])
    np.testing.assert_array_equal(layer.blobs[0].data, 0.0)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(top[0].data, x.data)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
@pytest.mark.parametrize("operand", [SHAPE, (3, 4)], ids=["eltwise", "middle"])
def test_scale_bias_in_place_matches_out_of_place(kind: str, operand: tuple[int, ...]) -> None:
    """Caffe's TestForwardEltwiseInPlace / TestBackward*InPlace."""
    field = "scale_param" if kind == "Scale" else "bias_param"
    params = f"{field} {{ axis: {0 if operand == SHAPE else 1} }}"
    dy = np.random.default_rng(5).normal(size=SHAPE)
    x, s = uniform(SHAPE, 1), uniform(operand, 2)
    layer, top = run(kind, params, [x, s])
    expected_y = top[0].data.copy()
    backward(layer, top, [x, s], dy)
    expected_dx, expected_ds = x.diff.copy(), s.diff.copy()
    x2, s2 = uniform(SHAPE, 1), uniform(operand, 2)
    layer2, top2 = run(kind, params, [x2, s2], in_place=True)
    np.testing.assert_allclose(x2.data, expected_y, rtol=1e-12)
    backward(layer2, top2, [x2, s2], dy)
    np.testing.assert_allclose(x2.diff, expected_dx, rtol=1e-12)
    np.testing.assert_allclose(s2.diff, expected_ds, rtol=1e-12)


def test_scale_bias_param_gradients_accumulate_and_bottom1_is_written() -> None:
    x = uniform((2, 3, 2), 1)
    dy = np.ones(x.shape)
    layer, top = run("Scale", "scale_param { bias_term: true }", [x])
    backward(layer, top, [x], dy)
    backward(layer, top, [x], dy)
    blobs = layer.blobs  # type: ignore[attr-defined]
    np.testing.assert_allclose(blobs[0].diff, 2 * x.data.sum(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(blobs[1].diff, np.full(3, 2 * 4.0), rtol=1e-12)
    s = uniform((3,), 2)
    layer, top = run("Scale", "", [x, s])
    s.diff[...] = 99.0
    backward(layer, top, [x, s], dy)
    np.testing.assert_allclose(s.diff, x.data.sum(axis=(0, 2)), rtol=1e-12)
    s.diff[...] = 99.0
    backward(layer, top, [x, s], dy, [True, False])
    assert (s.diff == 99.0).all()


@pytest.mark.parametrize(("params", "operand", "axis"), [
    ("axis: 1", (3, 4), 1),
    ("axis: 0", (2,), 0),
    ("axis: -1", (5,), 3),
    ("", (), 0),
])
def test_scale_bias_torch(params: str, operand: tuple[int, ...], axis: int) -> None:
    torch = pytest.importorskip("torch")
    dy = np.random.default_rng(6).normal(size=SHAPE)
    for kind, field in (("Scale", "scale_param"), ("Bias", "bias_param")):
        x, s = uniform(SHAPE, 1), uniform(operand, 2)
        layer, top = run(kind, f"{field} {{ {params} }}", [x, s])
        backward(layer, top, [x, s], dy)
        xt = torch.tensor(x.data, requires_grad=True)
        st = torch.tensor(s.data, requires_grad=True)
        sv = st.reshape(expand(s.data, SHAPE, axis).shape)
        yt = xt * sv if kind == "Scale" else xt + sv
        yt.backward(torch.tensor(dy))
        np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6)
        np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6)
        np.testing.assert_allclose(s.diff, st.grad.numpy(), rtol=1e-6)


def test_scale_with_bias_torch() -> None:
    torch = pytest.importorskip("torch")
    x = uniform(SHAPE, 1)
    dy = np.random.default_rng(7).normal(size=SHAPE)
    params = ('scale_param { filler { type: "gaussian" } bias_term: true '
              'bias_filler { type: "gaussian" } }')
    layer, top = run("Scale", params, [x])
    backward(layer, top, [x], dy)
    s, b = layer.blobs  # type: ignore[attr-defined]
    xt = torch.tensor(x.data, requires_grad=True)
    st = torch.tensor(s.data, requires_grad=True)
    bt = torch.tensor(b.data, requires_grad=True)
    yt = xt * st.view(1, 3, 1, 1) + bt.view(1, 3, 1, 1)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6)
    for mine, theirs in ((x.diff, xt.grad), (s.diff, st.grad), (b.diff, bt.grad)):
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["Scale", "Bias"])
def test_scale_bias_bad_params(kind: str) -> None:
    field = "scale_param" if kind == "Scale" else "bias_param"
    x = uniform(SHAPE, 1)
    with pytest.raises(LayerError, match="num_axes must be non-negative, or -1"):
        run(kind, f"{field} {{ num_axes: -2 }}", [x])
    with pytest.raises(LayerError, match=f"{field}.axis 4 is out of range"):
        run(kind, f"{field} {{ axis: 4 }}", [x])
    with pytest.raises(LayerError, match="num_axes 3 from axis 2 extends past bottom"):
        run(kind, f"{field} {{ axis: 2 num_axes: 3 }}", [x])
    with pytest.raises(LayerError, match=r"does not match bottom \(2, 3, 4, 5\) at axis 2"):
        run(kind, f"{field} {{ axis: 1 }}", [x, uniform((3, 5), 2)])
    with pytest.raises(LayerError, match="extends past bottom"):
        run(kind, f"{field} {{ axis: 3 }}", [x, uniform((5, 2), 2)])
    layer, top = run(kind, "", [x])
    with pytest.raises(LayerError, match="does not match bottom"):
        layer.reshape([uniform((2, 4, 4, 5), 3)], top)


# == LRN ==========================================================================================

def reference_lrn(x: np.ndarray, size: int, alpha: float, beta: float, k: float,
                  within: bool) -> np.ndarray:
    """Caffe's ReferenceLRNForward (test_lrn_layer.cpp), with k for ACROSS_CHANNELS."""
    n, c, h, w = x.shape
    y = np.zeros_like(x)
    half = (size - 1) // 2
    for i in range(n):
        for ch in range(c):
            for hh in range(h):
                for ww in range(w):
                    if within:
                        scale = 1.0
                        for nh in range(max(hh - half, 0), min(hh - half + size, h)):
                            for nw in range(max(ww - half, 0), min(ww - half + size, w)):
                                scale += x[i, ch, nh, nw] ** 2 * alpha / (size * size)
                    else:
                        scale = k
                        for cc in range(max(ch - half, 0), min(ch - half + size, c)):
                            scale += x[i, cc, hh, ww] ** 2 * alpha / size
                    y[i, ch, hh, ww] = x[i, ch, hh, ww] / scale ** beta
    return y


LRN_SHAPE = (2, 7, 3, 3)  # Caffe's test blob
LRN_CASES = [
    ("across", "", 5, 1.0, 0.75, 1.0, False),
    ("across_large_region", "local_size: 15", 15, 1.0, 0.75, 1.0, False),
    ("across_k", "local_size: 3 alpha: 2 beta: 0.5 k: 2", 3, 2.0, 0.5, 2.0, False),
    ("within", "local_size: 3 norm_region: WITHIN_CHANNEL", 3, 1.0, 0.75, 1.0, True),
    ("within_k_ignored", "local_size: 5 alpha: 0.5 k: 7 norm_region: WITHIN_CHANNEL", 5, 0.5,
     0.75, 1.0, True),
]


@pytest.mark.parametrize(("case", "params", "size", "alpha", "beta", "k", "within"), LRN_CASES,
                         ids=[c[0] for c in LRN_CASES])
def test_lrn_forward_caffe_reference(case: str, params: str, size: int, alpha: float,
                                     beta: float, k: float, within: bool) -> None:
    x = gaussian(LRN_SHAPE, seed=21)
    _, top = run("LRN", f"lrn_param {{ {params} }}", [x])
    assert top[0].shape == LRN_SHAPE
    np.testing.assert_allclose(top[0].data, reference_lrn(x.data, size, alpha, beta, k, within),
                               rtol=1e-6, atol=1e-12)


def test_lrn_within_channel_divisor_counts_padding() -> None:
    """WITHIN_CHANNEL is AVE pooling with pad (n−1)/2: the corner of a constant plane sums
    4 of 9 values but still divides by 9."""
    x = blob(data=np.full((1, 1, 3, 3), 2.0))
    _, top = run("LRN", "lrn_param { local_size: 3 alpha: 1 beta: 1 "
                        "norm_region: WITHIN_CHANNEL }", [x])
    assert top[0].data[0, 0, 0, 0] == pytest.approx(2.0 / (1 + 4 * 4 / 9))
    assert top[0].data[0, 0, 1, 1] == pytest.approx(2.0 / (1 + 4.0))


@pytest.mark.parametrize(("case", "params", "size", "alpha", "beta", "k", "within"), LRN_CASES,
                         ids=[c[0] for c in LRN_CASES])
def test_lrn_gradient_caffe(case: str, params: str, size: int, alpha: float, beta: float,
                            k: float, within: bool) -> None:
    """Caffe's TestGradient{AcrossChannels,AcrossChannelsLargeRegion,WithinChannel}:
    (1e-2, 1e-2), on Caffe's 2×7×3×3 blob with the ½Σy² objective, and exhaustively (one
    objective per top element, as Caffe does) on a smaller blob."""
    params = f"lrn_param {{ {params} }}"
    assert_grad("LRN", params, [gaussian(LRN_SHAPE, seed=22)], threshold=1e-2,
                exhaustive=False)
    small = (1, 3, 3, 3) if within else (1, 7, 2, 2)
    assert_grad("LRN", params, [gaussian(small, seed=23)], threshold=1e-2)


@pytest.mark.parametrize("params", ["", "norm_region: WITHIN_CHANNEL"])
def test_lrn_gradient_tight(params: str) -> None:
    """float64 and a smooth function: the gradient also holds at Caffe's usual 1e-3."""
    assert_grad("LRN", f"lrn_param {{ local_size: 3 {params} }}", [gaussian((2, 4, 3, 3))],
                threshold=1e-3, exhaustive=False)


def test_lrn_in_place_matches_out_of_place() -> None:
    dy = np.random.default_rng(23).normal(size=LRN_SHAPE)
    for params in ("", "norm_region: WITHIN_CHANNEL"):
        x = gaussian(LRN_SHAPE, seed=24)
        layer, top = run("LRN", f"lrn_param {{ {params} }}", [x])
        y = top[0].data.copy()
        backward(layer, top, [x], dy)
        x2 = gaussian(LRN_SHAPE, seed=24)
        layer2, top2 = run("LRN", f"lrn_param {{ {params} }}", [x2], in_place=True)
        np.testing.assert_allclose(x2.data, y, rtol=1e-12)
        backward(layer2, top2, [x2], dy)
        np.testing.assert_allclose(x2.diff, x.diff, rtol=1e-12)


@pytest.mark.parametrize(("size", "alpha", "beta", "k"), [(5, 1.0, 0.75, 1.0),
                                                          (3, 1e-4, 0.75, 2.0),
                                                          (7, 2.0, 0.5, 1.5)])
def test_lrn_across_channels_torch(size: int, alpha: float, beta: float, k: float) -> None:
    """torch's local_response_norm divides alpha by n too (avg_pool over the channel window),
    which is Caffe's ACROSS_CHANNELS for odd n."""
    torch = pytest.importorskip("torch")
    x = gaussian((2, 8, 3, 4), seed=25, std=2.0)
    dy = np.random.default_rng(26).normal(size=x.shape)
    layer, top = run("LRN", f"lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} "
                            f"k: {k} }}", [x])
    backward(layer, top, [x], dy)
    f32 = [float(np.float32(v)) for v in (alpha, beta, k)]  # proto floats
    xt = torch.tensor(x.data, requires_grad=True)
    yt = torch.nn.functional.local_response_norm(xt, size, alpha=f32[0], beta=f32[1], k=f32[2])
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("size", [3, 5])
def test_lrn_within_channel_torch(size: int) -> None:
    torch = pytest.importorskip("torch")
    x = gaussian((2, 3, 5, 4), seed=27, std=2.0)
    dy = np.random.default_rng(28).normal(size=x.shape)
    alpha, beta = 0.5, 0.75
    layer, top = run("LRN", f"lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} "
                            "norm_region: WITHIN_CHANNEL }", [x])
    backward(layer, top, [x], dy)
    xt = torch.tensor(x.data, requires_grad=True)
    mean = torch.nn.functional.avg_pool2d(xt * xt, size, stride=1, padding=(size - 1) // 2,
                                          count_include_pad=True)
    yt = xt * (1 + alpha * mean) ** -beta
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-12)


def test_lrn_bad_params_and_shapes() -> None:
    for size in (4, 0):
        with pytest.raises(LayerError, match=f"odd values for local_size, got {size}"):
            run("LRN", f"lrn_param {{ local_size: {size} }}", [gaussian(LRN_SHAPE)])
    with pytest.raises(LayerError, match=r"4-D \(N, C, H, W\) input, got shape \(2, 7, 3\)"):
        run("LRN", "", [gaussian((2, 7, 3))])


# == MVN ==========================================================================================

MVN_CASES = [
    ("default", "", True, False),
    ("mean_only", "normalize_variance: false", False, False),
    ("across_channels", "across_channels: true", True, True),
    ("mean_only_across", "normalize_variance: false across_channels: true", False, True),
]


@pytest.mark.parametrize(("case", "params", "variance", "across"), MVN_CASES,
                         ids=[c[0] for c in MVN_CASES])
def test_mvn_forward_caffe(case: str, params: str, variance: bool, across: bool) -> None:
    """Caffe's TestForward, TestForwardMeanOnly, TestForwardAcrossChannels: every (n, c)
    plane (every sample across channels) has mean 0 and, with variance, mean square 1."""
    x = gaussian(SHAPE, seed=31, std=2.0)
    x.data += 3.0
    _, top = run("MVN", f"mvn_param {{ {params} }}", [x])
    groups = top[0].data.reshape(SHAPE[0] if across else SHAPE[0] * SHAPE[1], -1)
    np.testing.assert_allclose(groups.mean(axis=1), 0, atol=1e-3)
    if variance:
        np.testing.assert_allclose((groups ** 2).mean(axis=1), 1, atol=1e-3)


@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("shape", [SHAPE, (3, 4), (2, 3, 2, 2, 3)])
def test_mvn_formula_eps_added_to_std(across: bool, shape: tuple[int, ...]) -> None:
    x = gaussian(shape, seed=32)
    eps = 0.25
    _, top = run("MVN", f"mvn_param {{ eps: {eps} across_channels: {str(across).lower()} }}",
                 [x])
    g = x.data.reshape(shape[0] if across else shape[0] * shape[1], -1)
    expected = (g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, keepdims=True) + eps)
    np.testing.assert_allclose(top[0].data, expected.reshape(shape), rtol=1e-12)


@pytest.mark.parametrize(("case", "params", "variance", "across"),
                         [*MVN_CASES, ("large_eps", "eps: 0.5", True, False)],
                         ids=[*(c[0] for c in MVN_CASES), "large_eps"])
def test_mvn_gradient_caffe(case: str, params: str, variance: bool, across: bool) -> None:
    """Caffe's TestGradient, TestGradientMeanOnly, TestGradientAcrossChannels: exhaustive,
    (1e-2, 1e-3); plus a large eps, where only the exact gradient passes."""
    assert_grad("MVN", f"mvn_param {{ {params} }}", [gaussian((2, 3, 2, 3), seed=33)])


def test_mvn_constant_input_has_finite_gradient() -> None:
    x = blob(data=np.full((2, 2, 3), 4.0))
    layer, top = run("MVN", "", [x])
    np.testing.assert_array_equal(top[0].data, 0.0)
    backward(layer, top, [x], np.random.default_rng(34).normal(size=x.shape))
    assert np.isfinite(x.diff).all()


def test_mvn_in_place_matches_out_of_place() -> None:
    dy = np.random.default_rng(35).normal(size=SHAPE)
    x = gaussian(SHAPE, seed=36)
    layer, top = run("MVN", "", [x])
    y = top[0].data.copy()
    backward(layer, top, [x], dy)
    x2 = gaussian(SHAPE, seed=36)
    layer2, top2 = run("MVN", "", [x2], in_place=True)
    np.testing.assert_allclose(x2.data, y, rtol=1e-12)
    top2[0].data[...] = -5.0  # clobbered by a later in-place layer
    backward(layer2, top2, [x2], dy)
    np.testing.assert_allclose(x2.diff, x.diff, rtol=1e-12)


@pytest.mark.parametrize(("params", "variance", "across"), [
    ("", True, False), ("eps: 0.1", True, False), ("across_channels: true", True, True),
    ("normalize_variance: false", False, False)])
def test_mvn_torch(params: str, variance: bool, across: bool) -> None:
    torch = pytest.importorskip("torch")
    x = gaussian(SHAPE, seed=37, std=2.0)
    dy = np.random.default_rng(38).normal(size=SHAPE)
    layer, top = run("MVN", f"mvn_param {{ {params} }}", [x])
    backward(layer, top, [x], dy)
    eps = float(layer.param.mvn_param.eps)  # type: ignore[attr-defined]
    xt = torch.tensor(x.data, requires_grad=True)
    g = xt.reshape(SHAPE[0] if across else SHAPE[0] * SHAPE[1], -1)
    yt = g - g.mean(dim=1, keepdim=True)
    if variance:
        yt = yt / (g.std(dim=1, keepdim=True, unbiased=False) + eps)
    yt = yt.reshape(SHAPE)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(top[0].data, yt.detach().numpy(), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(x.diff, xt.grad.numpy(), rtol=1e-6, atol=1e-12)


def test_mvn_bad_params_and_shapes() -> None:
    with pytest.raises(LayerError, match="eps must not be negative"):
        run("MVN", "mvn_param { eps: -0.1 }", [gaussian(SHAPE)])
    with pytest.raises(LayerError, match="at least one axis"):
        run("MVN", "", [blob(data=np.array(1.0))])


# == in a net =====================================================================================

CHAIN = """
force_backward: true
layer { name: "in" type: "Input" top: "x" top: "t"
        input_param { shape { dim: 4 dim: 3 dim: 3 dim: 3 }
                      shape { dim: 4 dim: 2 dim: 3 dim: 3 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c"
        convolution_param { num_output: 2 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "scale" type: "Scale" bottom: "c" top: "c"
        scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 }
                      bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "lrn" type: "LRN" bottom: "c" top: "c" lrn_param { local_size: 3 } }
layer { name: "mvn" type: "MVN" bottom: "c" top: "m" }
layer { name: "bias" type: "Bias" bottom: "m" top: "m" bias_param { filler { value: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "m" top: "m" }
layer { name: "loss" type: "EuclideanLoss" bottom: "m" bottom: "t" top: "loss" }
"""


def test_in_place_chain_gradient_in_a_net() -> None:
    """conv → BatchNorm → Scale → LRN (all in place) → MVN → Bias → ReLU → loss, float64:
    the net's input and parameter gradients match finite differences, so the layers keep
    what their backward needs even when later in-place layers overwrite the shared blob."""
    p = pb.NetParameter()
    text_format.Parse(CHAIN, p)
    net = netforge.Net(p, "TRAIN", verbose=False, backend=NumpyBackend("float64"), seed=3)
    rng = np.random.default_rng(4)
    x, t = rng.normal(size=(4, 3, 3, 3)), rng.normal(size=(4, 2, 3, 3))

    def loss() -> float:
        net.forward(x=x, t=t)
        return net.loss

    loss()
    net.clear_param_diffs()
    net.backward()
    grad_x = net.blobs["x"].diff.copy()
    params = [q.blob for q in net.learnable_params if q.lr_mult != 0]
    grads = [b.diff.copy() for b in params]
    h = 1e-5
    for idx in [(0, 0, 0, 0), (1, 2, 1, 2), (3, 1, 2, 0), (2, 0, 1, 1)]:
        old = x[idx]
        x[idx] = old + h
        up = loss()
        x[idx] = old - h
        down = loss()
        x[idx] = old
        assert grad_x[idx] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)
    for b, g in zip(params, grads, strict=True):
        for k in range(min(b.count, 4)):
            flat = b.data.reshape(-1)
            old = float(flat[k])
            flat[k] = old + h
            up = loss()
            flat[k] = old - h
            down = loss()
            flat[k] = old
            assert g.reshape(-1)[k] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)


def test_resnet_block_cifar_trains_a_step() -> None:
    path = ROOT / "models" / "resnet_block_cifar.yaml"
    net = netforge.Net(path, "TRAIN", verbose=False, seed=1)
    try:
        types = [lp.type for lp in net.layer_params]
        assert types.count("BatchNorm") == 5 and types.count("Scale") == 5
        assert types.count("Eltwise") == 2
        assert net.blobs["data"].shape == (8, 3, 32, 32)
        assert net.blobs["pool"].shape == (8, 16, 1, 1)
        assert net.outputs == ["loss"]
        net.clear_param_diffs()
        loss = net.forward_backward()
        assert np.isfinite(loss) and loss > 0
        learned = [q for q in net.learnable_params if q.lr_mult != 0]
        stats = [q for q in net.learnable_params if q.lr_mult == 0]
        assert {q.layer for q in stats} == {n for n, t in zip(net.layer_names, types,
                                                              strict=True) if t == "BatchNorm"}
        assert len(stats) == 15 and len(learned) == 5 + 10 + 2
        for q in learned:
            assert np.isfinite(q.blob.diff).all(), q.blob.name
            assert np.abs(q.blob.diff).sum() > 0, f"{q.blob.name} got no gradient"
        for q in stats:
            assert not q.blob.diff.any()
        bn = net.layers[net.layer_by_name["bn1"]]
        assert bn.blobs[2].data[0] == 1.0  # one TRAIN forward updated the statistics
        test_net = netforge.Net(path, "TEST", verbose=False, seed=1)
        try:
            test_net.share_trained_layers_with(net)
            out = test_net.forward()
            assert np.isfinite(float(out["loss"])) and 0 <= float(out["accuracy"]) <= 1
            assert test_net.layers[test_net.layer_by_name["bn1"]].use_global_stats  # type: ignore[attr-defined]
        finally:
            test_net.close()
    finally:
        net.close()
