"""Loss layers (SoftmaxWithLoss, EuclideanLoss) and Accuracy."""

from __future__ import annotations

import re

import numpy as np
import pytest

from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from tests.helpers import blob, make_layer, run_forward, tops

GRAD_CHECKED: set[str] = {"SoftmaxWithLoss", "EuclideanLoss"}
NO_BACKWARD: set[str] = {"Accuracy"}


def labels(shape: tuple[int, ...], classes: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, size=shape).astype(np.float64)


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_loss_reference(x: np.ndarray, lab: np.ndarray, axis: int, ignore: int | None,
                           mode: str) -> float:
    """Straight-loop Caffe SoftmaxWithLoss forward."""
    prob = np_softmax(x, axis)
    outer, c = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    p3, l2 = prob.reshape(outer, c, inner), lab.reshape(outer, inner).astype(int)
    loss, valid = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            if ignore is not None and l2[i, j] == ignore:
                continue
            loss -= np.log(max(p3[i, l2[i, j], j], np.finfo(np.float32).tiny))
            valid += 1
    norm = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return loss / max(norm, 1)


def loss_forward(params: str, x: np.ndarray, lab: np.ndarray, n_top: int = 1) -> list:
    layer = make_layer("SoftmaxWithLoss", params)
    bottom, top = [blob(data=x), blob(data=lab)], tops(n_top)
    run_forward(layer, bottom, top)
    return top


# -- SoftmaxWithLoss -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_forward(mode: str, ignore: int | None) -> None:
    x, lab = blob((4, 5, 2, 3), low=-3, high=3).data, labels((4, 1, 2, 3), 5)
    params = f"loss_param {{ normalization: {mode} "
    params += f"ignore_label: {ignore} }}" if ignore is not None else "}"
    top = loss_forward(params, x, lab)
    assert top[0].shape == ()
    ref = softmax_loss_reference(x, lab, 1, ignore, mode)
    np.testing.assert_allclose(float(top[0].data), ref, rtol=1e-12)


def test_softmax_loss_default_is_valid_and_deprecated_normalize() -> None:
    x, lab = blob((4, 5, 2, 3)).data, labels((4, 2, 3), 5)
    ref = {m: softmax_loss_reference(x, lab, 1, 0, m) for m in ("VALID", "BATCH_SIZE")}
    got = {p: float(loss_forward(f"loss_param {{ ignore_label: 0 {p} }}", x, lab)[0].data)
           for p in ("", "normalize: true", "normalize: false",
                     "normalize: false normalization: VALID")}
    assert got[""] == pytest.approx(ref["VALID"], rel=1e-12)
    assert got["normalize: true"] == pytest.approx(ref["VALID"], rel=1e-12)
    assert got["normalize: false"] == pytest.approx(ref["BATCH_SIZE"], rel=1e-12)
    # normalization, when given, wins over the deprecated normalize
    assert got["normalize: false normalization: VALID"] == pytest.approx(ref["VALID"], rel=1e-12)


def test_softmax_loss_spatial_axis_and_prob_top() -> None:
    x, lab = blob((2, 3, 4, 2), low=-2, high=2).data, labels((2, 3, 2), 4)
    top = loss_forward("softmax_param { axis: 2 }", x, lab, n_top=2)
    np.testing.assert_allclose(float(top[0].data), softmax_loss_reference(x, lab, 2, None,
                                                                          "VALID"), rtol=1e-12)
    np.testing.assert_allclose(top[1].data, np_softmax(x, 2), rtol=1e-12)


def test_softmax_loss_all_ignored_is_zero() -> None:
    x, lab = blob((3, 4)).data, np.full((3,), 1.0)
    top = loss_forward("loss_param { ignore_label: 1 }", x, lab)
    assert float(top[0].data) == 0.0


def test_softmax_loss_clamps_at_flt_min() -> None:
    x, lab = np.array([[0.0, 1000.0]]), np.array([0.0])
    loss = float(loss_forward("", x, lab)[0].data)
    assert loss == pytest.approx(-np.log(np.finfo(np.float32).tiny))


GRAD_CASES = [
    ("", (2, 3, 2, 2), (2, 1, 2, 2)),
    ("loss_param { normalization: FULL }", (2, 3, 2, 2), (2, 2, 2)),
    ("loss_param { normalization: BATCH_SIZE }", (2, 3, 2, 2), (2, 2, 2)),
    ("loss_param { normalization: NONE }", (2, 3, 2, 2), (2, 2, 2)),
    ("loss_param { ignore_label: 1 }", (2, 3, 2, 2), (2, 2, 2)),
    ("loss_param { ignore_label: 0 normalize: false }", (2, 3, 2, 2), (2, 2, 2)),
    ("softmax_param { axis: 2 }", (2, 2, 3, 2), (2, 2, 2)),
]


@pytest.mark.parametrize(("params", "shape", "label_shape"), GRAD_CASES)
def test_softmax_loss_gradient(params: str, shape: tuple, label_shape: tuple) -> None:
    layer = make_layer("SoftmaxWithLoss", params)
    classes = shape[2] if "axis: 2" in params else shape[1]
    bottom = [blob(shape, low=-2, high=2), blob(data=labels(label_shape, classes))]
    result = GradientChecker(1e-2, 1e-3).check_exhaustive(layer, bottom, tops(1), 0)
    assert result.ok, result.failures[:3]
    assert result.checked == int(np.prod(shape))


def test_softmax_loss_backward_scales_by_loss_weight() -> None:
    x, lab = blob((4, 5)).data, np.array([0.0, 1.0, 2.0, 1.0])
    layer = make_layer("SoftmaxWithLoss", "loss_param { ignore_label: 2 }")
    bottom, top = [blob(data=x), blob(data=lab)], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 0.5
    layer.backward(top, [True, False], bottom)
    expected = np_softmax(x, 1) - np.eye(5)[lab.astype(int)]
    expected[2] = 0  # the ignored sample
    np.testing.assert_allclose(bottom[0].diff, expected * 0.5 / 3, rtol=1e-12)


def test_softmax_loss_refuses_label_gradient() -> None:
    layer = make_layer("SoftmaxWithLoss")
    bottom, top = [blob((2, 3)), blob(data=np.array([0.0, 1.0]))], tops(1)
    run_forward(layer, bottom, top)
    assert layer.is_loss and layer.auto_top_blobs and not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottom)


def test_softmax_loss_label_count_mismatch() -> None:
    layer = make_layer("SoftmaxWithLoss")
    bottom = [blob((2, 3, 4)), blob(data=np.zeros((2, 3)))]
    with pytest.raises(LayerError, match=r"label count 6 \(shape \(2, 3\)\).*8.*\(2, 3, 4\)"):
        run_forward(layer, bottom, tops(1))


@pytest.mark.parametrize("bad", [3.0, -1.0])
def test_softmax_loss_label_out_of_range(bad: float) -> None:
    layer = make_layer("SoftmaxWithLoss")
    with pytest.raises(LayerError, match="outside the 3 classes"):
        run_forward(layer, [blob((2, 3)), blob(data=np.array([0.0, bad]))], tops(1))


def test_softmax_loss_ignored_label_may_be_out_of_range() -> None:
    top = loss_forward("loss_param { ignore_label: -1 }", blob((2, 3)).data,
                       np.array([-1.0, 1.0]))
    assert np.isfinite(top[0].data)


@pytest.mark.parametrize("params, shape, label_shape", [
    ("", (64, 10), (64,)),
    ("loss_param { ignore_label: 2 normalization: FULL }", (6, 5, 3, 2), (6, 3, 2)),
    ("loss_param { ignore_label: 7 normalization: BATCH_SIZE } softmax_param { axis: 2 }",
     (3, 2, 8), (3, 2)),
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_loss_compiled_pass_matches_numpy(params: str, shape: tuple, label_shape: tuple,
                                                 dtype: str) -> None:
    """The one-pass kernels (a compiled backend) and the NumPy expressions give the same loss,
    softmax top and gradient; backward to the bit (both round each float64 product once)."""
    from netforge.backend import NumpyBackend, kernels
    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed")
    x = 4 * blob(shape, dtype=dtype).data
    axis = 2 if "axis: 2" in params else 1
    classes = shape[axis]
    lab = labels(label_shape, classes).astype(dtype)
    if "ignore_label: 7" in params:
        lab[0, 0] = 7  # an ignored label outside the classes
    results = []
    for compiled in (True, False):
        layer = make_layer("SoftmaxWithLoss", params, dtype=dtype)
        layer.backend = NumpyBackend(dtype, compiled=compiled)
        bottom = [blob(data=x, dtype=dtype), blob(data=lab, dtype=dtype)]
        top = tops(2, dtype=dtype)
        run_forward(layer, bottom, top)
        assert layer.fused is compiled
        top[0].diff[...] = 0.5  # a loss weight
        layer.backward(top, [True, False], bottom)
        results.append((float(top[0].data), top[1].data.copy(), bottom[0].diff.copy()))
    (loss, prob, grad), (np_loss, np_prob, np_grad) = results
    rtol = 1e-5 if dtype == "float32" else 1e-12
    assert loss == pytest.approx(np_loss, rel=rtol)
    np.testing.assert_allclose(prob, np_prob, rtol=rtol, atol=1e-7 if dtype == "float32" else 0)
    np.testing.assert_allclose(grad, np_grad, rtol=rtol, atol=1e-8 if dtype == "float32" else 0)
    assert np.count_nonzero(grad) < grad.size if "ignore" in params else True


@pytest.mark.parametrize("bad", [3.0, -1.0, 1e30, float("nan")])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_softmax_loss_bad_label_in_either_pass(bad: float, compiled: bool) -> None:
    from netforge.backend import NumpyBackend
    layer = make_layer("SoftmaxWithLoss", "loss_param { ignore_label: 255 }")
    layer.backend = NumpyBackend("float64", compiled=compiled)
    shown = re.escape({3.0: "3", -1.0: "-1", 1e30: "1e+30"}.get(bad, "nan"))
    with pytest.raises(LayerError, match=rf"label value {shown} is outside the 3 classes"):
        run_forward(layer, [blob((3, 3)), blob(data=np.array([0.0, 255.0, bad]))], tops(1))


# -- EuclideanLoss ---------------------------------------------------------------------------------
def test_euclidean_forward() -> None:
    a, b = blob((5, 2, 3)).data, blob((5, 2, 3), seed=2).data
    layer = make_layer("EuclideanLoss")
    top = tops(1)
    run_forward(layer, [blob(data=a), blob(data=b)], top)
    assert top[0].shape == ()
    assert float(top[0].data) == pytest.approx(((a - b) ** 2).sum() / 5 / 2, rel=1e-12)


def test_euclidean_gradient() -> None:
    layer = make_layer("EuclideanLoss")
    bottom = [blob((4, 3, 2)), blob((4, 3, 2), seed=11)]
    result = GradientChecker(1e-2, 1e-3).check(layer, bottom, tops(1))
    assert result.ok, result.failures[:3]
    assert layer.allow_force_backward(1)


def test_euclidean_signs_and_loss_weight() -> None:
    a, b = blob((2, 3)).data, blob((2, 3), seed=2).data
    layer = make_layer("EuclideanLoss")
    bottom, top = [blob(data=a), blob(data=b)], tops(1)
    run_forward(layer, bottom, top)
    top[0].diff[...] = 2.0
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(bottom[0].diff, 2.0 * (a - b) / 2)
    np.testing.assert_allclose(bottom[1].diff, -2.0 * (a - b) / 2)


def test_euclidean_count_mismatch() -> None:
    layer = make_layer("EuclideanLoss")
    with pytest.raises(LayerError, match=r"\(2, 3\).*\(2, 4\)"):
        run_forward(layer, [blob((2, 3)), blob((2, 4))], tops(1))


# -- Accuracy --------------------------------------------------------------------------------------
def accuracy(scores: np.ndarray, lab: np.ndarray, params: str = "", n_top: int = 1) -> list:
    layer = make_layer("Accuracy", params)
    top = tops(n_top)
    run_forward(layer, [blob(data=scores), blob(data=lab)], top)
    return top


def accuracy_reference(scores: np.ndarray, lab: np.ndarray, k: int) -> float:
    correct = 0
    for s, label in zip(scores, lab.astype(int), strict=True):
        correct += (s >= s[label]).sum() - 1 < k
    return correct / len(lab)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_accuracy_top_k(k: int) -> None:
    scores, lab = blob((50, 6)).data, labels((50,), 6)
    top = accuracy(scores, lab, f"accuracy_param {{ top_k: {k} }}")
    assert top[0].shape == ()
    assert float(top[0].data) == pytest.approx(accuracy_reference(scores, lab, k))


def test_accuracy_ties_count_against() -> None:
    scores = np.array([[0.5, 0.5, 0.1], [0.2, 0.7, 0.7], [0.3, 0.3, 0.3]])
    lab = np.array([0.0, 1.0, 2.0])
    assert float(accuracy(scores, lab)[0].data) == 0.0
    assert float(accuracy(scores, lab, "accuracy_param { top_k: 2 }")[0].data) == 2 / 3
    assert float(accuracy(scores, lab, "accuracy_param { top_k: 3 }")[0].data) == 1.0


def test_accuracy_ignore_label_and_per_class() -> None:
    scores = np.array([[0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.9, 0.1, 0.0],
                       [0.0, 0.1, 0.9], [0.1, 0.2, 0.7]])
    lab = np.array([0.0, 0.0, 0.0, 2.0, 1.0])
    top = accuracy(scores, lab, "accuracy_param { ignore_label: 2 }", n_top=2)
    assert float(top[0].data) == pytest.approx(2 / 4)  # sample 3 is ignored
    assert top[1].shape == (3,)
    np.testing.assert_allclose(top[1].data, [2 / 3, 0.0, 0.0])  # no class-2 samples count


def test_accuracy_spatial_axis() -> None:
    scores, lab = blob((2, 3, 4)).data, labels((2, 3), 4)
    top = accuracy(scores, lab, "accuracy_param { axis: 2 }")
    assert float(top[0].data) == pytest.approx(
        accuracy_reference(scores.reshape(6, 4), lab.reshape(6), 1))


def test_accuracy_top_k_above_classes() -> None:
    with pytest.raises(LayerError, match="top_k"):
        accuracy(blob((2, 3)).data, np.zeros(2), "accuracy_param { top_k: 4 }")


def test_accuracy_label_count_mismatch() -> None:
    with pytest.raises(LayerError, match="label count 3"):
        accuracy(blob((2, 3)).data, np.zeros(3))


def test_accuracy_has_no_backward() -> None:
    layer = make_layer("Accuracy")
    assert not layer.has_backward and not layer.is_loss
    bottom, top = [blob((2, 3)), blob(data=np.zeros(2))], tops(1)
    run_forward(layer, bottom, top)
    with pytest.raises(LayerError, match="no backward"):
        layer.backward(top, [True, False], bottom)
