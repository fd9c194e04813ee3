"""Caffe's other loss layers: SigmoidCrossEntropyLoss, HingeLoss, MultinomialLogisticLoss,
InfogainLoss and ContrastiveLoss (after Caffe's test_*_loss_layer.cpp, plus PyTorch oracles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from netforge.blob import Blob
from netforge.gradcheck import GradientChecker
from netforge.layers import LayerError
from netforge.layers.base import Layer
from netforge.proto import pb
from tests.helpers import blob, make_layer, run_forward, tops

GRAD_CHECKED: set[str] = {"SigmoidCrossEntropyLoss", "HingeLoss", "MultinomialLogisticLoss",
                          "InfogainLoss", "ContrastiveLoss"}
NO_BACKWARD: set[str] = set()

LOG_THRESHOLD = 1e-20


def rng(seed: int = 1701) -> np.random.Generator:
    return np.random.default_rng(seed)


def gaussian(shape: tuple[int, ...], std: float = 1.0, seed: int = 1701) -> np.ndarray:
    return rng(seed).normal(0.0, std, size=shape)


def int_labels(shape: tuple[int, ...], classes: int, seed: int = 3) -> np.ndarray:
    return rng(seed).integers(0, classes, size=shape).astype(np.float64)


def forward(type_name: str, params: str, *arrays: np.ndarray, n_top: int = 1,
            ) -> tuple[Layer, list[Blob], list[Blob]]:
    layer = make_layer(type_name, params)
    bottom, top = [blob(data=a) for a in arrays], tops(n_top)
    run_forward(layer, bottom, top)
    return layer, bottom, top


def loss_of(type_name: str, params: str, *arrays: np.ndarray) -> float:
    return float(forward(type_name, params, *arrays)[2][0].data)


def backward_with_weight(layer: Layer, bottom: list[Blob], top: list[Blob], weight: float,
                         propagate: list[bool]) -> None:
    top[0].diff[...] = weight
    layer.backward(top, propagate, bottom)


def assert_grad(layer: Layer, bottom: list[Blob], n_top: int = 1, stepsize: float = 1e-2,
                threshold: float = 1e-3, check_bottom: int | list[int] = 0, kink: float = 0.0,
                kink_range: float = -1.0) -> None:
    checker = GradientChecker(stepsize, threshold, kink=kink, kink_range=kink_range)
    result = checker.check_exhaustive(layer, bottom, tops(n_top), check_bottom)
    assert result.ok, result.failures[:3]
    assert result.checked > 0


def torch_tensor(torch, a: np.ndarray, grad: bool = False):  # type: ignore[no-untyped-def]
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64,
                        requires_grad=grad)


# =================================================================================================
# SigmoidCrossEntropyLoss
# =================================================================================================
SCE = "SigmoidCrossEntropyLoss"
CAFFE_IGNORED = [0, 1, 7, 11, 34]  # TestForwardIgnoreSome / TestGradientIgnoreSome


def sce_inputs(seed: int = 1701, ignore: list[int] | None = None) -> tuple[np.ndarray, ...]:
    """Caffe's fixture: 10×5×1×1 scores ~ N(0, 1), targets ~ U(0, 1); ignored ones set to -1."""
    x = gaussian((10, 5, 1, 1), seed=seed)
    t = rng(seed + 1).uniform(0.0, 1.0, size=(10, 5, 1, 1))
    for i in ignore or []:
        t.reshape(-1)[i] = -1.0
    return x, t


def sce_reference(x: np.ndarray, t: np.ndarray, ignore: int | None, mode: str) -> float:
    """Caffe's SigmoidCrossEntropyLossReference (naive log of the sigmoid), any normalizer."""
    loss, valid = 0.0, 0
    for xi, ti in zip(x.reshape(-1), t.reshape(-1), strict=True):
        if ignore is not None and int(ti) == ignore:
            continue
        p = 1 / (1 + np.exp(-xi))
        loss -= ti * np.log(p + (ti == 0)) + (1 - ti) * np.log(1 - p + (ti == 1))
        valid += 1
    norm = {"FULL": x.size, "VALID": valid, "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    return loss / max(norm, 1)


@pytest.mark.parametrize(("ignore", "ignored"), [
    (None, []),                     # TestSigmoidCrossEntropyLoss
    (-1, []),                       # TestForwardWithIgnoreLabelsNoMatch
    (-1, list(range(50))),          # TestForwardWithIgnoreAll
    (-1, CAFFE_IGNORED),            # TestForwardIgnoreSome
])
def test_sce_forward_as_caffe(ignore: int | None, ignored: list[int]) -> None:
    params = f"loss_param {{ ignore_label: {ignore} }}" if ignore is not None else ""
    for trial in range(5):
        x, t = sce_inputs(100 + trial, ignored)
        _, _, top = forward(SCE, params, x, t)
        assert top[0].shape == ()
        # No normalization given: BATCH_SIZE (10), ignored targets or not.
        ref = sce_reference(x, t, ignore, "BATCH_SIZE")
        assert float(top[0].data) == pytest.approx(ref, rel=1e-10, abs=1e-12)
    if len(ignored) == 50:
        assert float(top[0].data) == 0.0


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_sce_normalization_modes(mode: str) -> None:
    x, t = sce_inputs(ignore=CAFFE_IGNORED)
    loss = loss_of(SCE, f"loss_param {{ ignore_label: -1 normalization: {mode} }}", x, t)
    assert loss == pytest.approx(sce_reference(x, t, -1, mode), rel=1e-10)


def test_sce_default_normalizer_is_batch_size_and_normalize_flag() -> None:
    x, t = sce_inputs(ignore=CAFFE_IGNORED)
    base = "ignore_label: -1"
    got = {p: loss_of(SCE, f"loss_param {{ {base} {p} }}", x, t)
           for p in ("", "normalize: true", "normalize: false",
                     "normalize: true normalization: FULL")}
    assert got[""] == pytest.approx(sce_reference(x, t, -1, "BATCH_SIZE"), rel=1e-10)
    assert got["normalize: true"] == pytest.approx(sce_reference(x, t, -1, "VALID"), rel=1e-10)
    assert got["normalize: false"] == pytest.approx(got[""], rel=1e-12)
    # normalization, when given, wins over normalize
    assert got["normalize: true normalization: FULL"] == pytest.approx(
        sce_reference(x, t, -1, "FULL"), rel=1e-10)
    # a (2, 3, 4) input: BATCH_SIZE divides by the first axis only
    x3, t3 = gaussian((2, 3, 4)), rng(5).uniform(size=(2, 3, 4))
    assert loss_of(SCE, "", x3, t3) == pytest.approx(sce_reference(x3, t3, None, "BATCH_SIZE"),
                                                     rel=1e-10)


def test_sce_is_stable_for_large_scores() -> None:
    x = np.array([[-1000.0, 1000.0, 0.0, 1000.0, -1000.0]])
    t = np.array([[0.0, 1.0, 0.5, 0.0, 1.0]])
    layer, bottom, top = forward(SCE, "loss_param { normalization: NONE }", x, t)
    assert float(top[0].data) == pytest.approx(np.log(2) + 1000 + 1000, rel=1e-12)
    backward_with_weight(layer, bottom, top, 1.0, [True, False])
    np.testing.assert_allclose(bottom[0].diff, [[0.0, 0.0, 0.0, 1.0, -1.0]], atol=1e-12)


def test_sce_ignore_label_compares_the_truncated_target() -> None:
    # Caffe casts the target to int before comparing with ignore_label: 0.5 → 0 is ignored.
    x, t = np.array([[0.3, -0.2, 1.0]]), np.array([[0.5, 1.0, 0.0]])
    loss = loss_of(SCE, "loss_param { ignore_label: 0 normalization: NONE }", x, t)
    p = 1 / (1 + np.exp(0.2))
    assert loss == pytest.approx(-np.log(p), rel=1e-12)


@pytest.mark.parametrize(("ignore", "ignored"), [
    (None, []), (-1, []), (-1, list(range(50))), (-1, CAFFE_IGNORED)])
def test_sce_gradient_as_caffe(ignore: int | None, ignored: list[int]) -> None:
    params = f"loss_param {{ ignore_label: {ignore} }}" if ignore is not None else ""
    x, t = sce_inputs(ignore=ignored)
    assert_grad(make_layer(SCE, params), [blob(data=x), blob(data=t)], threshold=1e-2)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_sce_gradient_strict(mode: str) -> None:
    x, t = sce_inputs(ignore=CAFFE_IGNORED)
    layer = make_layer(SCE, f"loss_param {{ ignore_label: -1 normalization: {mode} }}")
    assert_grad(layer, [blob(data=x), blob(data=t)], threshold=1e-3)


def test_sce_backward_scales_by_loss_weight() -> None:
    x, t = sce_inputs(ignore=CAFFE_IGNORED)
    layer, bottom, top = forward(SCE, "loss_param { ignore_label: -1 }", x, t)
    backward_with_weight(layer, bottom, top, 3.7, [True, False])
    expected = (1 / (1 + np.exp(-x)) - t) * 3.7 / 10
    expected.reshape(-1)[CAFFE_IGNORED] = 0
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-12)
    assert layer.is_loss and not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottom)


def test_sce_bad_inputs() -> None:
    with pytest.raises(LayerError, match=r"same count.*\(4, 3\) \(12\).*\(4, 2\) \(8\)"):
        forward(SCE, "", gaussian((4, 3)), np.zeros((4, 2)))
    with pytest.raises(LayerError, match=r"same first axis: \(4, 3\) vs \(3, 4\)"):
        forward(SCE, "", gaussian((4, 3)), np.zeros((3, 4)))


@pytest.mark.parametrize("mode", ["VALID", "BATCH_SIZE", "FULL", "NONE"])
def test_sce_matches_torch(mode: str) -> None:
    torch = pytest.importorskip("torch")
    x, t = sce_inputs(7, ignore=CAFFE_IGNORED)
    x = x * 4  # reach the saturated ends too
    layer, bottom, top = forward(SCE, f"loss_param {{ ignore_label: -1 normalization: {mode} }}",
                                 x, t)
    backward_with_weight(layer, bottom, top, 1.0, [True, False])
    valid = t != -1
    norm = {"FULL": x.size, "VALID": valid.sum(), "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    tx = torch_tensor(torch, x, grad=True)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        tx, torch_tensor(torch, np.where(valid, t, 0)), weight=torch_tensor(torch, valid),
        reduction="sum") / float(norm)
    loss.backward()
    np.testing.assert_allclose(float(top[0].data), loss.item(), rtol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, tx.grad.numpy(), rtol=1e-6, atol=1e-15)


# =================================================================================================
# HingeLoss
# =================================================================================================
def hinge_inputs(shape: tuple[int, ...] = (10, 5, 1, 1), seed: int = 1701,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's fixture: 10×5×1×1 scores ~ N(0, 10²), labels in [0, 5)."""
    x = gaussian(shape, std=10.0, seed=seed)
    classes = int(np.prod(shape[1:]))
    return x, int_labels((shape[0],), classes, seed + 1)


def hinge_reference(x: np.ndarray, lab: np.ndarray, norm: str) -> float:
    n = x.shape[0]
    flat = x.reshape(n, -1)
    loss = 0.0
    for i in range(n):
        for j in range(flat.shape[1]):
            t = 1.0 if j == int(lab[i]) else -1.0
            term = max(0.0, 1.0 - t * flat[i, j])
            loss += term if norm == "L1" else term * term
    return loss / n


@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("shape", [(10, 5, 1, 1), (4, 3), (3, 2, 2, 2)])
def test_hinge_forward(norm: str, shape: tuple[int, ...]) -> None:
    x, lab = hinge_inputs(shape)
    x = x / 5  # a mix of active and flat hinges
    loss = loss_of("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}", x, lab)
    assert loss == pytest.approx(hinge_reference(x, lab, norm), rel=1e-12)


def test_hinge_default_norm_is_l1_and_known_value() -> None:
    x = np.array([[2.0, 0.5, -3.0], [-0.5, 0.0, 0.25]])
    lab = np.array([0.0, 2.0])
    # sample 0: true 2 → 0; 0.5 → 1.5; −3 → 0.  sample 1: −0.5 → 0.5; 0 → 1; true 0.25 → 0.75
    assert loss_of("HingeLoss", "", x, lab) == pytest.approx((1.5 + 0.5 + 1 + 0.75) / 2)
    l2 = loss_of("HingeLoss", "hinge_loss_param { norm: L2 }", x, lab)
    assert l2 == pytest.approx((1.5**2 + 0.5**2 + 1 + 0.75**2) / 2)


def test_hinge_gradient_l1_as_caffe() -> None:
    x, lab = hinge_inputs()
    layer = make_layer("HingeLoss")
    assert_grad(layer, [blob(data=x), blob(data=lab)], threshold=2e-3, kink=1.0,
                kink_range=0.01)


def test_hinge_gradient_l2_as_caffe() -> None:
    x, lab = hinge_inputs()
    layer = make_layer("HingeLoss", "hinge_loss_param { norm: L2 }")
    assert_grad(layer, [blob(data=x), blob(data=lab)], threshold=1e-2)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_gradient_strict_on_active_hinges(norm: str) -> None:
    x, lab = hinge_inputs((4, 3, 2, 1), seed=11)
    x = x / 8  # many scores inside the margin; the kinks at |x| = 1 are skipped
    layer = make_layer("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}")
    assert_grad(layer, [blob(data=x), blob(data=lab)], threshold=1e-3, kink=1.0,
                kink_range=0.02)


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_backward_scales_by_loss_weight(norm: str) -> None:
    x = np.array([[2.0, 0.5, -3.0], [-0.5, 0.0, 0.25]])
    lab = np.array([0.0, 2.0])
    layer, bottom, top = forward("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}", x, lab)
    backward_with_weight(layer, bottom, top, 0.5, [True, False])
    if norm == "L1":
        expected = np.array([[0.0, 1.0, 0.0], [1.0, 1.0, -1.0]])
    else:
        expected = np.array([[0.0, 2 * 1.5, 0.0], [2 * 0.5, 2 * 1.0, -2 * 0.75]])
    np.testing.assert_allclose(bottom[0].diff, expected * 0.5 / 2)
    with pytest.raises(LayerError, match="cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottom)


def test_hinge_bad_inputs() -> None:
    with pytest.raises(LayerError, match="label count 6"):
        forward("HingeLoss", "", gaussian((3, 4)), np.zeros((3, 2)))
    with pytest.raises(LayerError, match="outside the 4 classes"):
        forward("HingeLoss", "", gaussian((3, 4)), np.array([0.0, 4.0, 1.0]))
    with pytest.raises(LayerError, match="same first axis"):
        forward("HingeLoss", "", gaussian((3, 4)), np.zeros((1, 3)))


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_matches_torch(norm: str) -> None:
    torch = pytest.importorskip("torch")
    x, lab = hinge_inputs((6, 4, 1, 1), seed=21)
    x = x / 6
    layer, bottom, top = forward("HingeLoss", f"hinge_loss_param {{ norm: {norm} }}", x, lab)
    backward_with_weight(layer, bottom, top, 1.0, [True, False])
    tx = torch_tensor(torch, x.reshape(6, 4), grad=True)
    sign = 2 * torch.nn.functional.one_hot(torch.tensor(lab.astype(np.int64)), 4) - 1
    term = torch.relu(1 - sign * tx)
    loss = (term if norm == "L1" else term * term).sum() / 6
    loss.backward()
    np.testing.assert_allclose(float(top[0].data), loss.item(), rtol=1e-6)
    np.testing.assert_allclose(bottom[0].diff.reshape(6, 4), tx.grad.numpy(), rtol=1e-6)


# =================================================================================================
# MultinomialLogisticLoss
# =================================================================================================
MLL = "MultinomialLogisticLoss"


def unitball(shape: tuple[int, ...], seed: int = 1701) -> np.ndarray:
    """Caffe's PositiveUnitballFiller: positive rows summing to 1."""
    p = rng(seed).uniform(0.0, 1.0, size=shape)
    flat = p.reshape(shape[0], -1)
    flat /= flat.sum(axis=1, keepdims=True)
    return p


def test_mll_forward_formula() -> None:
    p, lab = unitball((10, 5, 1, 1)), int_labels((10,), 5)
    expected = -np.mean([np.log(p.reshape(10, 5)[i, int(lab[i])]) for i in range(10)])
    assert loss_of(MLL, "", p, lab) == pytest.approx(expected, rel=1e-12)


def test_mll_clamps_at_1e20() -> None:
    p = np.array([[1e-25, 1.0], [0.5, 0.5], [0.0, 1.0]])
    lab = np.array([0.0, 1.0, 0.0])
    layer, bottom, top = forward(MLL, "", p, lab)
    expected = (-2 * np.log(1e-20) - np.log(0.5)) / 3
    assert float(top[0].data) == pytest.approx(expected, rel=1e-12)
    backward_with_weight(layer, bottom, top, 1.0, [True, False])
    np.testing.assert_allclose(bottom[0].diff, [[-1 / 1e-20 / 3, 0.0], [0.0, -1 / 0.5 / 3],
                                                [-1 / 1e-20 / 3, 0.0]])


def test_mll_gradient_as_caffe() -> None:
    p, lab = unitball((10, 5, 1, 1)), int_labels((10, 1, 1, 1), 5)
    assert_grad(make_layer(MLL), [blob(data=p), blob(data=lab)], threshold=2e-2, kink=0.0,
                kink_range=0.05)


def test_mll_gradient_strict() -> None:
    p = rng(4).uniform(0.2, 1.0, size=(6, 4))
    assert_grad(make_layer(MLL), [blob(data=p), blob(data=int_labels((6,), 4))], threshold=1e-3)


def test_mll_backward_scales_by_loss_weight() -> None:
    p, lab = unitball((4, 3)), np.array([2.0, 0.0, 1.0, 2.0])
    layer, bottom, top = forward(MLL, "", p, lab)
    backward_with_weight(layer, bottom, top, 2.5, [True, False])
    expected = np.zeros((4, 3))
    for i, k in enumerate(lab.astype(int)):
        expected[i, k] = -2.5 / 4 / p[i, k]
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-12)
    assert not layer.allow_force_backward(1)
    with pytest.raises(LayerError, match="cannot backpropagate to label inputs"):
        layer.backward(top, [True, True], bottom)


def test_mll_bad_inputs() -> None:
    with pytest.raises(LayerError, match="label count 8"):
        forward(MLL, "", unitball((4, 3)), np.zeros((4, 2)))
    with pytest.raises(LayerError, match="outside the 3 classes"):
        forward(MLL, "", unitball((2, 3)), np.array([-1.0, 0.0]))


def test_mll_matches_torch_nll_loss() -> None:
    torch = pytest.importorskip("torch")
    p, lab = unitball((8, 5), seed=9), int_labels((8,), 5, seed=10)
    layer, bottom, top = forward(MLL, "", p, lab)
    backward_with_weight(layer, bottom, top, 1.0, [True, False])
    tp = torch_tensor(torch, p, grad=True)
    loss = torch.nn.functional.nll_loss(torch.log(torch.clamp(tp, min=LOG_THRESHOLD)),
                                        torch.tensor(lab.astype(np.int64)), reduction="sum") / 8
    loss.backward()
    np.testing.assert_allclose(float(top[0].data), loss.item(), rtol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, tp.grad.numpy(), rtol=1e-6)


# =================================================================================================
# InfogainLoss
# =================================================================================================
IGL = "InfogainLoss"


def infogain_inputs(seed: int = 1701) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Caffe's fixture: data 4×2×5×2 ~ U(−0.5, 2), labels 4×2×1×2 in [0, 5), H 1×1×5×5 ~
    U(0.1, 2); the infogain axis is 2 (outer 8, 5 labels, inner 2)."""
    x = rng(seed).uniform(-0.5, 2.0, size=(4, 2, 5, 2))
    lab = int_labels((4, 2, 1, 2), 5, seed + 1)
    h = rng(seed + 2).uniform(0.1, 2.0, size=(1, 1, 5, 5))
    return x, lab, h


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def infogain_reference(x: np.ndarray, lab: np.ndarray, h: np.ndarray, axis: int,
                       ignore: int | None = None, mode: str = "VALID") -> float:
    """Straight loops over Caffe's InfogainLossLayer::Forward_cpu."""
    outer, k = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    prob = np_softmax(x, axis).reshape(outer, k, inner)
    hm, lab2 = h.reshape(k, k), lab.reshape(outer, inner).astype(int)
    loss, valid = 0.0, 0
    for i in range(outer):
        for j in range(inner):
            if ignore is not None and lab2[i, j] == ignore:
                continue
            for m in range(k):
                loss -= hm[lab2[i, j], m] * np.log(max(prob[i, m, j], LOG_THRESHOLD))
            valid += 1
    norm = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return loss / max(norm, 1)


def test_infogain_forward_as_caffe() -> None:
    x, lab, h = infogain_inputs()
    _, _, top = forward(IGL, "infogain_loss_param { axis: 2 }", x, lab, h, n_top=2)
    assert top[1].shape == x.shape
    np.testing.assert_allclose(top[1].data, np_softmax(x, 2), rtol=1e-12)
    assert float(top[0].data) == pytest.approx(infogain_reference(x, lab, h, 2), rel=1e-12)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
def test_infogain_ignore_label_and_normalization(mode: str) -> None:
    x, lab, h = infogain_inputs(5)
    params = f"infogain_loss_param {{ axis: 2 }} loss_param {{ ignore_label: 3 " \
             f"normalization: {mode} }}"
    loss = loss_of(IGL, params, x, lab, h)
    assert (lab == 3).any() and (lab != 3).any()
    assert loss == pytest.approx(infogain_reference(x, lab, h, 2, 3, mode), rel=1e-12)


def test_infogain_identity_is_softmax_with_loss() -> None:
    x, lab = gaussian((6, 4), std=2.0), int_labels((6,), 4)
    eye = np.eye(4)
    layer, bottom, top = forward(IGL, "", x, lab, eye)
    ref_layer, ref_bottom, ref_top = forward("SoftmaxWithLoss", "", x, lab)
    assert float(top[0].data) == pytest.approx(float(ref_top[0].data), rel=1e-12)
    backward_with_weight(layer, bottom, top, 1.3, [True, False, False])
    backward_with_weight(ref_layer, ref_bottom, ref_top, 1.3, [True, False])
    np.testing.assert_allclose(bottom[0].diff, ref_bottom[0].diff, rtol=1e-10, atol=1e-15)


def test_infogain_clamps_probabilities_at_1e20() -> None:
    # p_0 = 1 / (1 + e^50) ≈ 1.9e-22 is clamped to 1e-20 (not FLT_MIN as in SoftmaxWithLoss)
    x, lab, h = np.array([[0.0, 50.0]]), np.array([0.0]), np.array([[1.0, 0.5], [0.0, 1.0]])
    loss = loss_of(IGL, "", x, lab, h)
    p1 = 1 / (1 + np.exp(-50.0))
    assert loss == pytest.approx(-np.log(1e-20) - 0.5 * np.log(p1), rel=1e-12)


def test_infogain_gradient_as_caffe() -> None:
    x, lab, h = infogain_inputs()
    layer = make_layer(IGL, "infogain_loss_param { axis: 2 }")
    assert_grad(layer, [blob(data=x), blob(data=lab), blob(data=h)], stepsize=1e-4,
                threshold=2e-2)


@pytest.mark.parametrize("params", [
    "infogain_loss_param { axis: 2 }",
    "infogain_loss_param { axis: -2 } loss_param { ignore_label: 1 }",
    "infogain_loss_param { axis: 2 } loss_param { normalization: BATCH_SIZE }",
])
def test_infogain_gradient_strict(params: str) -> None:
    x, lab, h = infogain_inputs(17)
    layer = make_layer(IGL, params)
    assert_grad(layer, [blob(data=x), blob(data=lab), blob(data=h)], threshold=1e-3)


def test_infogain_backward_scales_by_loss_weight() -> None:
    x, lab, h = gaussian((3, 4)), np.array([1.0, 0.0, 3.0]), rng(2).uniform(0, 1, size=(4, 4))
    layer, bottom, top = forward(IGL, "", x, lab, h)
    backward_with_weight(layer, bottom, top, 0.25, [True, False, False])
    prob, li = np_softmax(x, 1), lab.astype(int)
    expected = prob * h.sum(axis=1)[li][:, None] - h[li]
    np.testing.assert_allclose(bottom[0].diff, expected * 0.25 / 3, rtol=1e-12)


def test_infogain_refuses_label_and_matrix_gradients() -> None:
    x, lab, h = infogain_inputs()
    layer, bottom, top = forward(IGL, "infogain_loss_param { axis: 2 }", x, lab, h)
    assert layer.allow_force_backward(0)
    assert not layer.allow_force_backward(1) and not layer.allow_force_backward(2)
    with pytest.raises(LayerError, match="cannot backpropagate to label inputs"):
        layer.backward(top, [True, True, False], bottom)
    with pytest.raises(LayerError, match="cannot backpropagate to the infogain matrix"):
        layer.backward(top, [True, False, True], bottom)


def write_blobproto(path: Path, h: np.ndarray, legacy: bool = True) -> None:
    bp = pb.BlobProto()
    if legacy:
        bp.num, bp.channels, bp.height, bp.width = 1, 1, *h.shape
    else:
        bp.shape.dim.extend(h.shape)
    bp.data.extend(h.reshape(-1).tolist())
    path.write_bytes(bp.SerializeToString())


def file_layer(params: str, tmp_path: Path) -> Layer:
    layer = make_layer(IGL, params)
    layer.ctx.resolve_path = lambda p: str(tmp_path / p)
    return layer


@pytest.mark.parametrize("legacy", [True, False])
def test_infogain_matrix_from_source_file(tmp_path: Path, legacy: bool) -> None:
    x, lab = gaussian((5, 3)), int_labels((5,), 3)
    h = rng(8).integers(0, 8, size=(3, 3)) / 4.0  # exact in float32, as the file stores it
    write_blobproto(tmp_path / "H.binaryproto", h, legacy)
    layer = file_layer('infogain_loss_param { source: "H.binaryproto" }', tmp_path)
    bottom, top = [blob(data=x), blob(data=lab)], tops(1)
    run_forward(layer, bottom, top)
    assert float(top[0].data) == pytest.approx(infogain_reference(x, lab, h, 1), rel=1e-12)
    assert_grad(file_layer('infogain_loss_param { source: "H.binaryproto" }', tmp_path),
                [blob(data=x), blob(data=lab)], threshold=1e-3)
    # the third bottom, when present, wins over the file
    _, _, top3 = forward(IGL, 'infogain_loss_param { source: "H.binaryproto" }', x, lab,
                         np.eye(3))
    assert float(top3[0].data) == pytest.approx(infogain_reference(x, lab, np.eye(3), 1))


def test_infogain_source_resolves_next_to_the_net_file(tmp_path: Path) -> None:
    from google.protobuf import text_format

    from netforge.net import Net

    h = np.array([[1.0, 0.5], [0.25, 2.0]])
    write_blobproto(tmp_path / "H.binaryproto", h)
    text = """
    layer { name: "in" type: "Input" top: "x" top: "y"
            input_param { shape { dim: 3 dim: 2 } shape { dim: 3 } } }
    layer { name: "loss" type: "InfogainLoss" bottom: "x" bottom: "y" top: "loss"
            infogain_loss_param { source: "H.binaryproto" } }
    """
    param = text_format.Parse(text, pb.NetParameter())
    net = Net(param, "TRAIN", base_dir=tmp_path, verbose=False)
    x, lab = gaussian((3, 2)), np.array([0.0, 1.0, 1.0])
    net.forward(x=x, y=lab)
    assert net.loss == pytest.approx(infogain_reference(x, lab, h, 1), rel=1e-6)


def test_infogain_bad_params(tmp_path: Path) -> None:
    x, lab = gaussian((4, 3)), int_labels((4,), 3)
    with pytest.raises(LayerError, match=r"infogain_loss_param\.source must name"):
        forward(IGL, "", x, lab)
    with pytest.raises(LayerError, match=r"source 'missing.binaryproto': cannot load.*not found"):
        run_forward(file_layer('infogain_loss_param { source: "missing.binaryproto" }',
                               tmp_path), [blob(data=x), blob(data=lab)], tops(1))
    write_blobproto(tmp_path / "H4.binaryproto", np.eye(4))
    with pytest.raises(LayerError, match=r"H \('H4.binaryproto'\) has 16 values.*3×3 = 9"):
        run_forward(file_layer('infogain_loss_param { source: "H4.binaryproto" }', tmp_path),
                    [blob(data=x), blob(data=lab)], tops(1))
    with pytest.raises(LayerError, match=r"H \(bottom 2\) has 4 values.*3×3"):
        forward(IGL, "", x, lab, np.eye(2))
    with pytest.raises(LayerError, match="normalize is deprecated"):
        forward(IGL, "loss_param { normalize: true }", x, lab, np.eye(3))
    with pytest.raises(LayerError, match=r"infogain_loss_param\.axis"):
        forward(IGL, "infogain_loss_param { axis: 2 }", x, lab, np.eye(3))
    with pytest.raises(LayerError, match="label count 8"):
        forward(IGL, "", x, np.zeros((4, 2)), np.eye(3))
    with pytest.raises(LayerError, match="outside the 3 classes"):
        forward(IGL, "", x, np.array([0.0, 1.0, 2.0, 3.0]), np.eye(3))


def test_infogain_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    x, lab, h = infogain_inputs(31)
    params = "infogain_loss_param { axis: 2 } loss_param { ignore_label: 4 }"
    layer, bottom, top = forward(IGL, params, x, lab, h)
    backward_with_weight(layer, bottom, top, 1.0, [True, False, False])
    tx = torch_tensor(torch, x, grad=True)
    log_p = torch.log(torch.clamp(torch.softmax(tx, dim=2), min=LOG_THRESHOLD))  # (4,2,5,2)
    li = lab.reshape(4, 2, 2).astype(np.int64)
    valid = li != 4
    h_rows = torch_tensor(torch, h.reshape(5, 5)[np.where(valid, li, 0)])  # (4, 2, 2, 5)
    weight = h_rows.permute(0, 1, 3, 2) * torch_tensor(torch, valid)[:, :, None, :]
    loss = -(weight * log_p).sum() / float(valid.sum())
    loss.backward()
    np.testing.assert_allclose(float(top[0].data), loss.item(), rtol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, tx.grad.numpy(), rtol=1e-6, atol=1e-15)


def test_infogain_identity_matches_torch_cross_entropy() -> None:
    torch = pytest.importorskip("torch")
    x, lab = gaussian((2, 4, 3), std=2.0), int_labels((2, 3), 4)
    layer, bottom, top = forward(IGL, "", x, lab, np.eye(4))
    backward_with_weight(layer, bottom, top, 1.0, [True, False, False])
    tx = torch_tensor(torch, x, grad=True)
    loss = torch.nn.functional.cross_entropy(tx, torch.tensor(lab.astype(np.int64)))
    loss.backward()
    np.testing.assert_allclose(float(top[0].data), loss.item(), rtol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, tx.grad.numpy(), rtol=1e-6, atol=1e-15)


# =================================================================================================
# ContrastiveLoss
# =================================================================================================
CL = "ContrastiveLoss"


def contrastive_inputs(n: int = 128, c: int = 10, seed: int = 1701,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Caffe's fixture: a, b 128×10×1×1 ~ N(0, 0.3²) (distances ≈ 1, both sides of the
    margin), sim in {0, 1}."""
    a = gaussian((n, c, 1, 1), std=0.3, seed=seed)
    b = gaussian((n, c, 1, 1), std=0.3, seed=seed + 1)
    sim = int_labels((n, 1, 1, 1), 2, seed + 2)
    return a, b, sim


def contrastive_reference(a: np.ndarray, b: np.ndarray, sim: np.ndarray, margin: float = 1.0,
                          legacy: bool = False) -> float:
    n = a.shape[0]
    loss = 0.0
    for i in range(n):
        d2 = float(((a[i] - b[i]) ** 2).sum())
        if int(sim.reshape(-1)[i]):
            loss += d2
        elif legacy:
            loss += max(margin - d2, 0.0)
        else:
            loss += max(margin - np.sqrt(d2), 0.0) ** 2
    return loss / n / 2


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_forward_as_caffe(legacy: bool) -> None:
    a, b, sim = contrastive_inputs()
    params = f"contrastive_loss_param {{ legacy_version: {str(legacy).lower()} }}"
    _, _, top = forward(CL, params, a, b, sim)
    assert top[0].shape == ()
    ref = contrastive_reference(a, b, sim, legacy=legacy)
    assert float(top[0].data) == pytest.approx(ref, rel=1e-12)


def test_contrastive_margin_and_similarity_truncation() -> None:
    a = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = np.array([[0.6, 0.8], [0.3, 0.4], [0.3, 0.4], [3.0, 0.0]])  # distances 1, .5, .5, 3
    sim = np.array([1.5, 0.7, -1.0, 0.0])  # int(): similar, dissimilar, similar, dissimilar
    loss = loss_of(CL, "contrastive_loss_param { margin: 2 }", a, b, sim)
    assert loss == pytest.approx((1.0 + (2 - 0.5) ** 2 + 0.25 + 0.0) / 4 / 2)
    legacy = loss_of(CL, "contrastive_loss_param { margin: 2 legacy_version: true }", a, b, sim)
    assert legacy == pytest.approx((1.0 + (2 - 0.25) + 0.25 + 0.0) / 4 / 2)


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_gradient_as_caffe(legacy: bool) -> None:
    a, b, sim = contrastive_inputs()
    params = f"contrastive_loss_param {{ legacy_version: {str(legacy).lower()} }}"
    for i in (0, 1):
        layer = make_layer(CL, params)
        assert_grad(layer, [blob(data=a), blob(data=b), blob(data=sim)], threshold=1e-2,
                    check_bottom=i)


def separated_pairs(legacy: bool, margin: float = 1.0) -> tuple[np.ndarray, ...]:
    """8 pairs whose (squared, for legacy) distances keep clear of the margin, so a 1e-2 step
    never crosses the kink; the 1e-4 in Caffe's dissimilar gradient stays below 1e-3."""
    a = gaussian((8, 3), std=0.3, seed=41)
    direction = gaussian((8, 3), seed=42)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    dist = np.array([0.2, 0.5, 0.7, 1.4, 1.8, 0.4, 0.6, 2.0]) * margin
    if legacy:
        dist = np.sqrt(dist)
    b = a + direction * dist[:, None]
    sim = np.array([1, 1, 0, 0, 0, 1, 0, 1], dtype=np.float64)
    return a, b, sim


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_gradient_strict(legacy: bool) -> None:
    a, b, sim = separated_pairs(legacy)
    params = f"contrastive_loss_param {{ legacy_version: {str(legacy).lower()} }}"
    assert_grad(make_layer(CL, params), [blob(data=a), blob(data=b), blob(data=sim)],
                threshold=1e-3, check_bottom=[0, 1])


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_backward_loss_weight_and_signs(legacy: bool) -> None:
    a, b, sim = separated_pairs(legacy)
    params = f"contrastive_loss_param {{ legacy_version: {str(legacy).lower()} }}"
    layer, bottom, top = forward(CL, params, a, b, sim)
    bottom[2].diff[...] = 7.0
    backward_with_weight(layer, bottom, top, 2.0, [True, True, True])
    diff = a - b
    d2 = (diff**2).sum(axis=1)
    d = np.sqrt(d2)
    if legacy:
        coef = np.where(sim != 0, 1.0, np.where(1 - d2 > 0, -1.0, 0.0))
    else:
        coef = np.where(sim != 0, 1.0, np.where(1 - d > 0, -(1 - d) / (d + 1e-4), 0.0))
    expected = coef[:, None] * diff * 2.0 / 8
    np.testing.assert_allclose(bottom[0].diff, expected, rtol=1e-12)
    np.testing.assert_allclose(bottom[1].diff, -expected, rtol=1e-12)
    np.testing.assert_array_equal(bottom[2].diff, 0.0)  # flat in the labels
    assert layer.allow_force_backward(0) and layer.allow_force_backward(1)
    assert not layer.allow_force_backward(2)


def test_contrastive_propagate_down_one_side_only() -> None:
    a, b, sim = separated_pairs(False)
    layer, bottom, top = forward(CL, "", a, b, sim)
    bottom[0].diff[...] = 5.0
    backward_with_weight(layer, bottom, top, 1.0, [False, True, False])
    np.testing.assert_array_equal(bottom[0].diff, 5.0)
    assert np.abs(bottom[1].diff).sum() > 0


def test_contrastive_bad_inputs() -> None:
    sim4 = np.zeros(4)
    with pytest.raises(LayerError, match=r"same first axis: \(4, 3\) vs \(5, 3\)"):
        forward(CL, "", gaussian((4, 3)), gaussian((5, 3)), sim4)
    with pytest.raises(LayerError, match=r"same channels: \(4, 3\) vs \(4, 2\)"):
        forward(CL, "", gaussian((4, 3)), gaussian((4, 2)), sim4)
    with pytest.raises(LayerError, match=r"\(N, C\) or \(N, C, 1, 1\), got \(4, 3, 2, 1\)"):
        forward(CL, "", gaussian((4, 3, 2, 1)), gaussian((4, 3, 2, 1)), sim4)
    with pytest.raises(LayerError, match=r"one similarity label per pair: 8 labels"):
        forward(CL, "", gaussian((4, 3)), gaussian((4, 3)), np.zeros((4, 2)))


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_matches_torch(legacy: bool) -> None:
    torch = pytest.importorskip("torch")
    a, b, sim = contrastive_inputs(32, 5, seed=77)
    margin = 1.5
    params = f"contrastive_loss_param {{ margin: {margin} legacy_version: " \
             f"{str(legacy).lower()} }}"
    layer, bottom, top = forward(CL, params, a, b, sim)
    backward_with_weight(layer, bottom, top, 1.0, [True, True, False])

    def torch_loss(eps: float):  # type: ignore[no-untyped-def]
        ta, tb = torch_tensor(torch, a, grad=True), torch_tensor(torch, b, grad=True)
        diff = (ta - tb).reshape(32, 5)
        d2 = (diff * diff).sum(dim=1)
        if legacy:
            apart = torch.relu(margin - d2)
        else:
            d = torch.sqrt(d2)
            # Caffe's backward divides by d + 1e-4: the same value, with that gradient.
            c = (d / (d + eps)).detach()
            d = d * c + (d * (1 - c)).detach()
            apart = torch.relu(margin - d) ** 2
        similar = torch.tensor(sim.reshape(-1) != 0)
        loss = torch.where(similar, d2, apart).sum() / 32 / 2
        loss.backward()
        return loss, ta.grad.numpy(), tb.grad.numpy()

    loss, ga, gb = torch_loss(1e-4)
    np.testing.assert_allclose(float(top[0].data), loss.item(), rtol=1e-6)
    np.testing.assert_allclose(bottom[0].diff, ga, rtol=1e-6, atol=1e-15)
    np.testing.assert_allclose(bottom[1].diff, gb, rtol=1e-6, atol=1e-15)
    # and the exact gradient is within Caffe's 1e-4 smoothing of it
    _, exact_a, _ = torch_loss(0.0)
    np.testing.assert_allclose(bottom[0].diff, exact_a, rtol=1e-3, atol=1e-9)


def test_contrastive_in_a_net_forced_backward_skips_labels() -> None:
    from google.protobuf import text_format

    from netforge.net import Net

    text = """
    force_backward: true
    layer { name: "in" type: "Input" top: "a" top: "b" top: "sim"
            input_param { shape { dim: 8 dim: 3 } shape { dim: 8 dim: 3 } shape { dim: 8 } } }
    layer { name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "sim"
            top: "loss" loss_weight: 2 }
    """
    net = Net(text_format.Parse(text, pb.NetParameter()), "TRAIN", verbose=False)
    assert net.bottom_need_backward[-1] == [True, True, False]
    a, b, sim = separated_pairs(False)
    net.forward(a=a, b=b, sim=sim)
    assert net.loss == pytest.approx(2 * contrastive_reference(a, b, sim), rel=1e-5)


def test_float32_forward_and_backward_run() -> None:
    """The layers in their default dtype: finite, float32 results close to float64."""
    cases = [
        (SCE, "", [gaussian((4, 3)), rng(1).uniform(size=(4, 3))]),
        ("HingeLoss", "hinge_loss_param { norm: L2 }", [gaussian((4, 3)), np.array([0, 1, 2, 0.])]),
        (MLL, "", [unitball((4, 3)), np.array([0, 1, 2, 0.])]),
        (IGL, "", [gaussian((4, 3)), np.array([0, 1, 2, 0.]), np.eye(3)]),
        (CL, "", [gaussian((4, 3)), gaussian((4, 3), seed=2), np.array([0, 1, 0, 1.])]),
    ]
    for type_name, params, arrays in cases:
        results = []
        for dtype in ("float32", "float64"):
            layer = make_layer(type_name, params, dtype=dtype)
            bottom = [blob(data=a, dtype=dtype) for a in arrays]
            top = tops(1, dtype)
            run_forward(layer, bottom, top)
            top[0].diff[...] = 1.0
            layer.backward(top, [True] + [False] * (len(bottom) - 1), bottom)
            assert top[0].data.dtype == np.dtype(dtype)
            assert bottom[0].diff.dtype == np.dtype(dtype)
            results.append((float(top[0].data), bottom[0].diff.astype(np.float64)))
        assert results[0][0] == pytest.approx(results[1][0], rel=1e-5), type_name
        np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
