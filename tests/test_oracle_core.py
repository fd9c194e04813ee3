"""PyTorch as an oracle for the core layers: forward, bottom gradients and parameter gradients of
Convolution, Pooling, InnerProduct, ReLU, Sigmoid, TanH, Dropout, Softmax, SoftmaxWithLoss,
EuclideanLoss, Accuracy (forward), Flatten, Concat, Split and Eltwise against an equivalent
torch computation in float64.

Each layer runs forward, gets a random upstream gradient in its top diffs (a loss layer gets its
loss weight) and runs backward; torch autograd of Σ top·upstream gives the reference gradients.
Convolution and Pooling also run on both NumPy code paths: the compiled (numba) kernels, which
take over above ``NumpyBackend.compiled_min`` elements, and the pure-NumPy loops.

torch is optional: every test asks for the ``torch`` fixture, which skips without it (the module
itself imports without torch, so the layer-coverage test can read its declarations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from netforge.backend import NumpyBackend
from netforge.blob import Blob
from netforge.layers import REGISTRY, LayerContext
from netforge.layers.base import PHASE_TEST, PHASE_TRAIN, Layer
from netforge.proto import pb

# Oracle comparisons, not finite-difference checks: nothing to declare for the coverage test.
GRAD_CHECKED: set[str] = set()
NO_BACKWARD: set[str] = set()

RTOL, ATOL = 1e-6, 1e-9

COMPILED = NumpyBackend("float64")
PLAIN = NumpyBackend("float64", compiled=False)
BACKENDS = [pytest.param(COMPILED, id="compiled"), pytest.param(PLAIN, id="numpy")]
FILLERS = ('weight_filler { type: "gaussian" std: 0.5 } '
           'bias_filler { type: "gaussian" std: 0.5 }')


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


# -- driving a layer ----------------------------------------------------------------------------

@dataclass
class Run:
    layer: Layer
    tops: list[np.ndarray]          # forward outputs
    upstream: list[np.ndarray]      # what was put in the top diffs
    bottom_diffs: list[np.ndarray]
    param_diffs: list[np.ndarray]


def build(type_name: str, params: str = "", backend: NumpyBackend = COMPILED,
          phase: int = PHASE_TRAIN, seed: int = 1701) -> Layer:
    p = pb.LayerParameter()
    text_format.Parse(params, p)
    p.type, p.name = type_name, type_name.lower()
    ctx = LayerContext(backend=backend, phase=phase, rng=np.random.default_rng(seed))
    return REGISTRY[type_name](p, ctx)


def drive(type_name: str, params: str, bottoms: Sequence[np.ndarray], *, n_tops: int = 1,
          backend: NumpyBackend = COMPILED, phase: int = PHASE_TRAIN, seed: int = 0,
          upstream: Sequence[Any] | None = None, propagate: Sequence[bool] | None = None,
          backward: bool = True) -> Run:
    """Set up, forward and (with a random upstream gradient unless one is given) backward."""
    layer = build(type_name, params, backend, phase)
    bots = []
    for a in bottoms:
        b = Blob(backend, tuple(np.shape(a)))
        b.data[...] = a
        bots.append(b)
    top = [Blob(backend) for _ in range(n_tops)]
    layer.setup(bots, top)
    layer.reshape(bots, top)
    layer.forward(bots, top)
    outs = [t.data.copy() for t in top]
    rng = np.random.default_rng(seed + 100)
    ups = [rng.normal(size=t.shape) for t in top] if upstream is None else \
        [np.broadcast_to(np.asarray(u, dtype=np.float64), t.shape).copy()
         for u, t in zip(upstream, top, strict=True)]
    if backward:
        for t, u in zip(top, ups, strict=True):
            t.diff[...] = u
        layer.backward(top, list(propagate or [True] * len(bots)), bots)
    return Run(layer, outs, ups, [b.diff.copy() for b in bots],
               [p.diff.copy() for p in layer.blobs])


def tensor(torch: Any, a: Any, grad: bool = False) -> Any:
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64,
                        requires_grad=grad)


def close(got: np.ndarray, want: Any, what: str) -> None:
    if hasattr(want, "detach"):
        want = want.detach().numpy()
    want = np.asarray(want, dtype=np.float64)
    assert np.shape(got) == want.shape, f"{what}: shape {np.shape(got)} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)


def oracle(torch: Any, run: Run, fn: Callable[..., Any], bottoms: Sequence[np.ndarray],
           grad_bottoms: Sequence[int] | None = None, check_params: bool = True) -> None:
    """fn(*bottom tensors, *param tensors) -> one tensor or a list, one per top. Compares the
    forward outputs, then autograd of Σ out·upstream with the bottom and param diffs."""
    grad_idx = set(range(len(bottoms)) if grad_bottoms is None else grad_bottoms)
    xs = [tensor(torch, a, grad=i in grad_idx) for i, a in enumerate(bottoms)]
    ps = [tensor(torch, b.data, grad=True) for b in run.layer.blobs]
    outs = fn(*xs, *ps)
    outs = list(outs) if isinstance(outs, list | tuple) else [outs]
    assert len(outs) == len(run.tops)
    for i, (got, want) in enumerate(zip(run.tops, outs, strict=True)):
        close(got, want, f"top {i}")
    objective = sum((o * tensor(torch, u)).sum() for o, u in zip(outs, run.upstream, strict=True))
    objective.backward()
    for i in sorted(grad_idx):
        close(run.bottom_diffs[i], xs[i].grad, f"bottom {i} diff")
    if check_params:
        for i, p in enumerate(ps):
            close(run.param_diffs[i], p.grad, f"param {i} diff")


def distinct(shape: tuple[int, ...], seed: int = 3) -> np.ndarray:
    """Shuffled values 1/64 apart, no two equal: max-type layers have one winner per window."""
    n = int(np.prod(shape))
    return ((np.random.default_rng(seed).permutation(n) - n / 2) / 64.0).reshape(shape)


def uniform(shape: tuple[int, ...], seed: int = 1, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-scale, scale, size=shape)


kernels_available = pytest.mark.skipif(not COMPILED.compiled,
                                       reason="numba not installed (netforge[fast])")


# -- Convolution ----------------------------------------------------------------------------------

def _conv_geometry(params: str) -> dict[str, Any]:
    """torch's stride/padding/dilation/groups from a convolution_param snippet."""
    p = pb.LayerParameter()
    text_format.Parse(params, p)
    c = p.convolution_param

    def hw(name: str, prefix: str, default: int) -> tuple[int, int]:
        if c.HasField(f"{prefix}_h"):
            return getattr(c, f"{prefix}_h"), getattr(c, f"{prefix}_w")
        values = list(getattr(c, name)) or [default]
        return values[0], values[-1]

    dilation = list(c.dilation) or [1]
    return {"stride": hw("stride", "stride", 1), "padding": hw("pad", "pad", 0),
            "dilation": (dilation[0], dilation[-1]), "groups": c.group}


CONV_CASES = [  # bottom shape, convolution_param fields
    ((2, 3, 7, 6), "num_output: 4 kernel_size: 3"),
    ((2, 3, 8, 7), "num_output: 4 kernel_size: 3 stride: 2 pad: 1"),
    ((2, 3, 9, 8), "num_output: 3 kernel_size: 3 stride: 2 stride: 3 pad: 2 pad: 0"),
    ((2, 2, 7, 8), "num_output: 3 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 "
                   "pad_h: 0 pad_w: 1"),
    ((2, 3, 9, 9), "num_output: 2 kernel_size: 3 dilation: 2 pad: 1"),
    ((2, 2, 9, 10), "num_output: 2 kernel_h: 2 kernel_w: 3 dilation: 3 dilation: 2"),
    ((2, 4, 6, 6), "num_output: 6 kernel_size: 3 group: 2"),
    ((2, 4, 6, 5), "num_output: 4 kernel_size: 3 pad: 1 group: 4"),
    ((2, 4, 6, 5), "num_output: 8 kernel_size: 2 stride: 2 group: 4"),
    ((2, 3, 6, 6), "num_output: 3 kernel_size: 3 bias_term: false"),
    ((3, 4, 5, 5), "num_output: 2 kernel_size: 1"),
    # Large enough for the compiled im2col/col2im (columns far above compiled_min elements).
    ((8, 16, 20, 20), "num_output: 8 kernel_size: 3 pad: 1"),
    ((8, 16, 20, 20), "num_output: 8 kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2 "
                      "group: 4"),
    # Wide inputs: row-layout columns in (i, j, c) order (channels_last).
    ((4, 32, 12, 12), "num_output: 8 kernel_size: 5 pad: 2"),
    ((3, 20, 9, 10), "num_output: 4 kernel_size: 3 stride: 2 pad: 1 dilation: 2"),
]
CONV_IDS = ["simple", "stride_pad", "stride_pad_hw", "rect", "dilation", "dilation_hw",
            "group", "depthwise", "depthwise_x2", "no_bias", "1x1", "large", "large_group",
            "wide", "wide_dilation"]


def _torch_conv(torch: Any, params: str) -> Callable[..., Any]:
    geometry = _conv_geometry(params)
    conv2d = torch.nn.functional.conv2d

    def fn(*args: Any) -> Any:
        return conv2d(args[0], args[1], args[2] if len(args) > 2 else None, **geometry)
    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("shape", "extra"), CONV_CASES, ids=CONV_IDS)
def test_convolution(torch: Any, backend: NumpyBackend, shape: tuple[int, ...],
                     extra: str) -> None:
    params = f"convolution_param {{ {extra} {FILLERS} }}"
    x = uniform(shape)
    run = drive("Convolution", params, [x], backend=backend)
    oracle(torch, run, _torch_conv(torch, params), [x])


@pytest.mark.parametrize("backend", BACKENDS)
def test_convolution_two_bottoms_share_weights(torch: Any, backend: NumpyBackend) -> None:
    params = f"convolution_param {{ num_output: 3 kernel_size: 3 stride: 2 pad: 1 {FILLERS} }}"
    x0, x1 = uniform((2, 3, 7, 6), 1), uniform((2, 3, 7, 6), 2)
    run = drive("Convolution", params, [x0, x1], n_tops=2, backend=backend)
    conv = _torch_conv(torch, params)
    # The weights get the sum of both tops' gradients.
    oracle(torch, run, lambda a, b, w, bias: [conv(a, w, bias), conv(b, w, bias)], [x0, x1])


@kernels_available
def test_large_convolution_uses_the_compiled_kernels() -> None:
    layer = build("Convolution", "convolution_param { num_output: 8 kernel_size: 3 pad: 1 }")
    x = Blob(COMPILED, (8, 16, 20, 20))
    top = [Blob(COMPILED)]
    layer.setup([x], top)
    layer.reshape([x], top)
    assert COMPILED.use_compiled(layer._cols(x.data, "probe").size)
    assert not PLAIN.use_compiled(layer._cols(x.data, "probe").size)


# -- Pooling --------------------------------------------------------------------------------------

POOL_CASES = [  # bottom shape, (kh, kw), (sh, sw), (ph, pw), pooling_param geometry fields
    ((2, 3, 7, 7), (2, 2), (2, 2), (0, 0), "kernel_size: 2 stride: 2"),  # CEIL overhang
    ((2, 3, 8, 8), (3, 3), (2, 2), (1, 1), "kernel_size: 3 stride: 2 pad: 1"),
    ((2, 3, 7, 7), (3, 3), (2, 2), (1, 1), "kernel_size: 3 stride: 2 pad: 1"),
    # CEIL would start a 4th window in the padding: Caffe and torch drop it.
    ((2, 2, 7, 7), (2, 2), (3, 3), (1, 1), "kernel_size: 2 stride: 3 pad: 1"),
    ((2, 2, 9, 8), (3, 2), (2, 1), (1, 1),
     "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 1"),
    ((2, 2, 6, 9), (4, 3), (3, 2), (2, 0),
     "kernel_h: 4 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 2 pad_w: 0"),
    # Large enough for the compiled pooling kernels.
    ((8, 16, 20, 20), (3, 3), (2, 2), (1, 1), "kernel_size: 3 stride: 2 pad: 1"),
    ((8, 16, 21, 20), (2, 3), (2, 2), (0, 1),
     "kernel_h: 2 kernel_w: 3 stride: 2 pad_h: 0 pad_w: 1"),
    # cifar10_quick's pooling: the CEIL overhang on the bottom and right (padded planes)
    ((4, 32, 16, 16), (3, 3), (2, 2), (0, 0), "kernel_size: 3 stride: 2"),
]
POOL_IDS = ["k2s2_overhang", "k3s2p1_even", "k3s2p1_odd", "dropped_window", "rect",
            "rect_pad_h", "large", "large_rect", "large_overhang"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize(("shape", "kernel", "stride", "pad", "geometry"), POOL_CASES,
                         ids=POOL_IDS)
def test_pooling(torch: Any, backend: NumpyBackend, pool: str, shape: tuple[int, ...],
                 kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int],
                 geometry: str) -> None:
    x = distinct(shape)  # tie-free: MAX backward has one winner per window
    run = drive("Pooling", f"pooling_param {{ pool: {pool} {geometry} }}", [x], backend=backend)
    f = torch.nn.functional
    if pool == "MAX":
        def fn(t: Any) -> Any:
            return f.max_pool2d(t, kernel, stride, pad, ceil_mode=True)
    else:
        def fn(t: Any) -> Any:  # Caffe's divisor: the window clipped at H + pad
            return f.avg_pool2d(t, kernel, stride, pad, ceil_mode=True, count_include_pad=True)
    oracle(torch, run, fn, [x])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (8, 16, 20, 20)], ids=["small", "large"])
def test_global_pooling(torch: Any, backend: NumpyBackend, pool: str,
                        shape: tuple[int, ...]) -> None:
    x = distinct(shape)
    run = drive("Pooling", f"pooling_param {{ pool: {pool} global_pooling: true }}", [x],
                backend=backend)
    if pool == "MAX":
        def fn(t: Any) -> Any:
            return t.amax(dim=(2, 3), keepdim=True)
    else:
        def fn(t: Any) -> Any:
            return t.mean(dim=(2, 3), keepdim=True)
    oracle(torch, run, fn, [x])


@kernels_available
def test_large_pooling_uses_the_compiled_kernels() -> None:
    layer = build("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }")
    x, top = Blob(COMPILED, (8, 16, 20, 20)), [Blob(COMPILED)]
    layer.setup([x], top)
    layer.reshape([x], top)
    assert layer._compiled(x.data)
    layer.backend = PLAIN
    assert not layer._compiled(x.data)


# -- InnerProduct ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("transpose", [False, True], ids=["W", "WT"])
@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 2, 5), 1), ((2, 3, 4, 5), 2),
                                             ((3, 7), 1), ((2, 3, 4, 5), -1)],
                         ids=["axis1", "axis2", "2d", "axis-1"])
def test_inner_product(torch: Any, shape: tuple[int, ...], axis: int, transpose: bool,
                       bias: bool) -> None:
    params = (f"inner_product_param {{ num_output: 6 axis: {axis} "
              f"transpose: {str(transpose).lower()} bias_term: {str(bias).lower()} {FILLERS} }}")
    x = uniform(shape)
    run = drive("InnerProduct", params, [x])
    ax = axis % len(shape)
    lead = shape[:ax]

    def fn(t: Any, w: Any, b: Any = None) -> Any:
        flat = t.reshape(int(np.prod(lead)), -1)
        y = flat @ w if transpose else torch.nn.functional.linear(flat, w)
        if b is not None:
            y = y + b
        return y.reshape(*lead, 6)
    oracle(torch, run, fn, [x])


# -- neurons --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("type_name", "params"), [
    ("ReLU", ""), ("ReLU", "relu_param { negative_slope: 0.1 }"), ("Sigmoid", ""), ("TanH", ""),
], ids=["relu", "leaky_relu", "sigmoid", "tanh"])
def test_neuron(torch: Any, type_name: str, params: str) -> None:
    x = uniform((3, 4, 5, 2), scale=4.0)
    run = drive(type_name, params, [x])
    f = torch.nn.functional
    fns: dict[str, Callable[[Any], Any]] = {
        "relu": f.relu, "leaky_relu": lambda t: f.leaky_relu(t, 0.1),
        "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    key = "leaky_relu" if "negative_slope" in params else type_name.lower()
    oracle(torch, run, fns[key], [x])


@pytest.mark.parametrize("ratio", [0.5, 0.3])
def test_dropout_train(torch: Any, ratio: float) -> None:
    x = uniform((4, 5, 6, 7))
    run = drive("Dropout", f"dropout_param {{ dropout_ratio: {ratio} }}", [x])
    p = float(np.float32(ratio))  # dropout_ratio is a proto float, as in Caffe
    mask = np.asarray(run.layer.mask)
    keep = mask != 0
    # The layer's mask holds keep / (1 − p): its own Bernoulli draw, already scaled.
    np.testing.assert_allclose(mask[keep], 1.0 / (1.0 - p), rtol=1e-15)
    assert abs(keep.mean() - (1.0 - p)) < 0.05
    keep_t = tensor(torch, keep)
    oracle(torch, run, lambda t: t * keep_t / (1.0 - p), [x])


def test_dropout_test_is_identity(torch: Any) -> None:
    x = uniform((4, 5, 6))
    run = drive("Dropout", "dropout_param { dropout_ratio: 0.4 }", [x], phase=PHASE_TEST)
    oracle(torch, run, lambda t: t.clone(), [x])
    np.testing.assert_array_equal(run.tops[0], x)
    np.testing.assert_array_equal(run.bottom_diffs[0], run.upstream[0])


# -- Softmax and the losses -----------------------------------------------------------------------

@pytest.mark.parametrize(("shape", "axis"), [((5, 7), 1), ((2, 4, 3, 5), 1),
                                             ((2, 4, 3, 5), -1)],
                         ids=["2d", "4d_axis1", "4d_axis-1"])
def test_softmax(torch: Any, shape: tuple[int, ...], axis: int) -> None:
    x = uniform(shape, scale=3.0)
    run = drive("Softmax", f"softmax_param {{ axis: {axis} }}", [x])
    oracle(torch, run, lambda t: torch.softmax(t, dim=axis), [x])


def _labels(shape: tuple[int, ...], classes: int, seed: int = 5,
            ignore: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, classes, size=shape)
    if ignore is not None:
        flat = lab.reshape(-1)
        flat[rng.permutation(flat.size)[:max(1, flat.size // 4)]] = ignore
    return lab.astype(np.float64)


SWL_CASES = [  # scores shape, loss_param, ignore, normalization (None = the default, VALID)
    ((8, 5), "", None, "VALID"),
    ((8, 5), "loss_param { ignore_label: -1 }", -1, "VALID"),
    ((8, 5), "loss_param { ignore_label: 2 normalization: VALID }", 2, "VALID"),
    ((8, 5), "loss_param { normalization: BATCH_SIZE }", None, "BATCH_SIZE"),
    ((8, 5), "loss_param { normalize: false }", None, "BATCH_SIZE"),
    ((8, 5), "loss_param { ignore_label: 1 normalization: FULL }", 1, "FULL"),
    ((8, 5), "loss_param { ignore_label: 0 normalization: NONE }", 0, "NONE"),
    ((2, 4, 3, 5), "", None, "VALID"),
    ((2, 4, 3, 5), "loss_param { ignore_label: 3 }", 3, "VALID"),
    ((2, 4, 3, 5), "loss_param { ignore_label: 3 normalization: BATCH_SIZE }", 3, "BATCH_SIZE"),
    ((2, 4, 3, 5), "loss_param { ignore_label: 255 normalization: FULL }", 255, "FULL"),
    ((2, 4, 3, 5), "loss_param { normalization: NONE }", None, "NONE"),
]
SWL_IDS = ["valid", "valid_ignore_neg", "valid_ignore_in_range", "batch", "normalize_false",
           "full_ignore", "none_ignore", "spatial_valid", "spatial_valid_ignore",
           "spatial_batch_ignore", "spatial_full_ignore", "spatial_none"]


@pytest.mark.parametrize(("shape", "params", "ignore", "norm"), SWL_CASES, ids=SWL_IDS)
def test_softmax_with_loss(torch: Any, shape: tuple[int, ...], params: str, ignore: int | None,
                           norm: str) -> None:
    n, c, spatial = shape[0], shape[1], shape[2:]
    scores = uniform(shape, scale=3.0)
    labels = _labels((n, *spatial), c, ignore=ignore)
    run = drive("SoftmaxWithLoss", params, [scores, labels], upstream=[1.0],
                propagate=[True, False])
    cross_entropy = torch.nn.functional.cross_entropy
    target = torch.tensor(labels.astype(np.int64))
    ignore_index = -100 if ignore is None else ignore
    count = int(np.prod((n, *spatial)))

    def fn(s: Any, _labels: Any) -> Any:
        if norm == "VALID":  # torch's mean skips ignored targets, as VALID does
            return cross_entropy(s, target, ignore_index=ignore_index, reduction="mean")
        total = cross_entropy(s, target, ignore_index=ignore_index, reduction="sum")
        return total / {"BATCH_SIZE": n, "FULL": count, "NONE": 1}[norm]
    oracle(torch, run, fn, [scores, labels], grad_bottoms=[0])


@pytest.mark.parametrize("weight", [2.0, 0.25])
def test_softmax_with_loss_scales_by_the_loss_weight(torch: Any, weight: float) -> None:
    scores, labels = uniform((6, 4, 2), scale=2.0), _labels((6, 2), 4)
    run = drive("SoftmaxWithLoss", "", [scores, labels], upstream=[weight],
                propagate=[True, False])
    target = torch.tensor(labels.astype(np.int64))
    oracle(torch, run, lambda s, _: torch.nn.functional.cross_entropy(s, target), [scores, labels],
           grad_bottoms=[0])


def test_softmax_with_loss_probability_top(torch: Any) -> None:
    scores, labels = uniform((2, 4, 3, 5), scale=3.0), _labels((2, 3, 5), 4)
    run = drive("SoftmaxWithLoss", "", [scores, labels], n_tops=2, backward=False)
    close(run.tops[1], torch.softmax(tensor(torch, scores), dim=1), "probabilities")


@pytest.mark.parametrize("shapes", [((6, 5), (6, 5)), ((4, 3, 2, 2), (4, 12))],
                         ids=["same_shape", "same_count"])
def test_euclidean_loss(torch: Any, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    a, b = uniform(shapes[0], 1), uniform(shapes[1], 2)
    run = drive("EuclideanLoss", "", [a, b], upstream=[1.0])
    n = shapes[0][0]
    oracle(torch, run, lambda s, t: ((s - t.reshape(s.shape)) ** 2).sum() / (2 * n), [a, b])


ACC_CASES = [  # scores shape, accuracy_param, ignore
    ((20, 6), "top_k: 1", None),
    ((20, 6), "top_k: 3", None),
    ((20, 6), "top_k: 1 ignore_label: 4", 4),
    ((20, 6), "top_k: 3 ignore_label: -1", -1),
    ((3, 5, 4, 2), "top_k: 2 ignore_label: 0", 0),
]


@pytest.mark.parametrize(("shape", "params", "ignore"), ACC_CASES,
                         ids=["top1", "top3", "top1_ignore", "top3_ignore_neg", "spatial_top2"])
def test_accuracy(torch: Any, shape: tuple[int, ...], params: str, ignore: int | None) -> None:
    n, c, spatial = shape[0], shape[1], shape[2:]
    scores = distinct(shape, seed=7)  # no ties: "ties count against" does not come into play
    labels = _labels((n, *spatial), c, seed=8, ignore=ignore)
    run = drive("Accuracy", f"accuracy_param {{ {params} }}", [scores, labels], backward=False)
    k = int(params.split()[1])
    idx = torch.topk(tensor(torch, scores), k, dim=1).indices        # (n, k, *spatial)
    target = torch.tensor(labels.astype(np.int64))
    hit = (idx == target.unsqueeze(1)).any(dim=1)
    valid = target != (-100 if ignore is None else ignore)
    want = hit[valid].double().mean()
    assert 0.0 < float(want) < 1.0  # a case that can tell right from wrong
    close(run.tops[0], want, "accuracy")


# -- Flatten, Concat, Split, Eltwise --------------------------------------------------------------

@pytest.mark.parametrize(("params", "start", "end"), [
    ("", 1, -1), ("flatten_param { axis: 1 end_axis: 2 }", 1, 2),
    ("flatten_param { axis: 0 }", 0, -1), ("flatten_param { axis: -2 }", 2, 3),
], ids=["default", "axis1_end2", "axis0", "axis-2"])
def test_flatten(torch: Any, params: str, start: int, end: int) -> None:
    x = uniform((2, 3, 4, 5))
    run = drive("Flatten", params, [x])
    oracle(torch, run, lambda t: torch.flatten(t, start, end), [x])


@pytest.mark.parametrize(("axis", "shapes"), [
    (0, [(2, 3, 4), (1, 3, 4), (3, 3, 4)]),
    (1, [(2, 3, 4, 2), (2, 1, 4, 2), (2, 5, 4, 2)]),
    (-1, [(2, 3), (2, 4)]),
], ids=["axis0", "axis1", "axis-1"])
def test_concat(torch: Any, axis: int, shapes: list[tuple[int, ...]]) -> None:
    xs = [uniform(s, i) for i, s in enumerate(shapes)]
    run = drive("Concat", f"concat_param {{ axis: {axis} }}", xs)
    oracle(torch, run, lambda *t: torch.cat(t, dim=axis), xs)


def test_concat_propagate_down_subset(torch: Any) -> None:
    xs = [uniform((2, 3, 4), 1), uniform((2, 2, 4), 2)]
    run = drive("Concat", "", xs, propagate=[False, True])
    oracle(torch, run, lambda a, b: torch.cat([a, b], dim=1), xs, grad_bottoms=[1])


@pytest.mark.parametrize("n_tops", [1, 2, 3])
def test_split_backward_sums(torch: Any, n_tops: int) -> None:
    x = uniform((3, 4, 5))
    run = drive("Split", "", [x], n_tops=n_tops)
    oracle(torch, run, lambda t: [t * 1.0 for _ in range(n_tops)], [x])


ELTWISE_CASES = [  # eltwise_param, number of bottoms, torch function of the bottoms
    ("operation: SUM", 2, lambda *t: t[0] + t[1]),
    ("operation: SUM coeff: 1 coeff: -0.5 coeff: 2", 3, lambda *t: t[0] - 0.5 * t[1] + 2 * t[2]),
    ("", 3, lambda *t: t[0] + t[1] + t[2]),  # SUM is the default
    ("operation: PROD", 3, lambda *t: t[0] * t[1] * t[2]),  # stable_prod_grad by default
    ("operation: PROD stable_prod_grad: true", 3, lambda *t: t[0] * t[1] * t[2]),
    ("operation: PROD stable_prod_grad: false", 3, lambda *t: t[0] * t[1] * t[2]),
    ("operation: PROD stable_prod_grad: false", 2, lambda *t: t[0] * t[1]),
    ("operation: MAX", 2, None),
    ("operation: MAX", 4, None),
]


@pytest.mark.parametrize(("params", "n", "fn"), ELTWISE_CASES,
                         ids=["sum", "sum_coeff", "sum_default", "prod", "prod_stable",
                              "prod_unstable", "prod_unstable_2", "max2", "max4"])
def test_eltwise(torch: Any, params: str, n: int, fn: Callable[..., Any] | None) -> None:
    if fn is None:  # tie-free bottoms: one winner per element
        pool = distinct((n, 3, 4, 5), seed=11)
        xs = [pool[i] for i in range(n)]

        def fn(*t: Any) -> Any:
            return torch.stack(t).max(dim=0).values
    else:
        xs = [uniform((3, 4, 5), i + 1, scale=2.0) for i in range(n)]
    run = drive("Eltwise", f"eltwise_param {{ {params} }}", xs)
    oracle(torch, run, fn, xs)
