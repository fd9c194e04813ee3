"""Recurrent layers: RNN, LSTM and LSTMUnit (Caffe's test_rnn_layer and test_lstm_layer cases),
against an independent per-stream NumPy reference, the sequence-reset property, and PyTorch's
nn.LSTM / nn.RNN as an oracle for forward and backward."""

from __future__ import annotations

import re

import numpy as np
import pytest
from google.protobuf import text_format

from netforge import Net
from netforge.blob import Blob
from netforge.errors import ConfigError
from netforge.gradcheck import GradientChecker, GradResult
from netforge.layers import LayerError
from netforge.layers.base import Layer
from netforge.proto import pb
from tests.helpers import PHASE_TEST, blob, make_layer, run_forward, tops

GRAD_CHECKED: set[str] = {"RNN", "LSTM", "LSTMUnit"}
NO_BACKWARD: set[str] = set()

H = 7  # Caffe's tests use num_output 7
FILLERS = ('weight_filler { type: "gaussian" std: 0.2 } '
           'bias_filler { type: "gaussian" std: 0.1 }')


def rparams(num_output: int = H, expose: bool = False, fillers: str = FILLERS) -> str:
    expose_s = "expose_hidden: true" if expose else ""
    return f"recurrent_param {{ num_output: {num_output} {fillers} {expose_s} }}"


def recurrent(type_name: str, num_output: int = H, expose: bool = False, seed: int = 1701,
              fillers: str = FILLERS, dtype: str = "float64") -> Layer:
    return make_layer(type_name, rparams(num_output, expose, fillers), phase=PHASE_TEST,
                      seed=seed, dtype=dtype)


def cont_blob(values: list[list[float]] | np.ndarray) -> Blob:
    return blob(data=np.asarray(values, dtype=np.float64))


def assert_ok(result: GradResult) -> None:
    assert result.checked > 0
    assert result.ok, result.failures[:5]


def exhaustive(layer: Layer, bottom: list[Blob], n_tops: int, check_bottom: list[int],
               params: bool = True) -> GradResult:
    """CheckGradientExhaustive restricted to the given bottoms (params optional)."""
    checker = GradientChecker(1e-2, 1e-3)
    top = tops(n_tops)
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    result = GradResult()
    for i, t in enumerate(top):
        for k in range(t.count):
            checker.check_single(layer, bottom, top, check_bottom, i, k, result,
                                 check_params=params)
    return result


# -- independent references -----------------------------------------------------------------------

def sigmoid(a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-a))


def ref_lstm(x: np.ndarray, cont: np.ndarray, blobs: list[np.ndarray],
             x_static: np.ndarray | None = None, h0: np.ndarray | None = None,
             c0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Caffe's LSTM, one stream and one step at a time, gates split explicitly."""
    steps, streams = cont.shape
    w_xc, b_c = blobs[0], blobs[1]
    w_hc = blobs[-1]
    hidden = w_hc.shape[1]
    xs = x.reshape(steps, streams, -1)
    h = np.zeros((streams, hidden)) if h0 is None else h0.reshape(streams, hidden).copy()
    c = np.zeros((streams, hidden)) if c0 is None else c0.reshape(streams, hidden).copy()
    out = np.zeros((steps, streams, hidden))
    for t in range(steps):
        for n in range(streams):
            a = w_xc @ xs[t, n] + b_c + w_hc @ (cont[t, n] * h[n])
            if x_static is not None:
                a = a + blobs[2] @ x_static[n].ravel()
            i, f, o, g = (a[k * hidden:(k + 1) * hidden] for k in range(4))
            i, f, o, g = sigmoid(i), sigmoid(f), sigmoid(o), np.tanh(g)
            c[n] = cont[t, n] * f * c[n] + i * g
            h[n] = o * np.tanh(c[n])
        out[t] = h
    return out, h, c


def ref_rnn(x: np.ndarray, cont: np.ndarray, blobs: list[np.ndarray],
            x_static: np.ndarray | None = None,
            h0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's RNN, one stream and one step at a time."""
    steps, streams = cont.shape
    w_xh, b_h = blobs[0], blobs[1]
    w_hh, w_ho, b_o = blobs[-3:]
    hidden = w_hh.shape[0]
    xs = x.reshape(steps, streams, -1)
    h = np.zeros((streams, hidden)) if h0 is None else h0.reshape(streams, hidden).copy()
    out = np.zeros((steps, streams, hidden))
    for t in range(steps):
        for n in range(streams):
            a = w_xh @ xs[t, n] + b_h + w_hh @ (cont[t, n] * h[n])
            if x_static is not None:
                a = a + blobs[2] @ x_static[n].ravel()
            h[n] = np.tanh(a)
            out[t, n] = np.tanh(w_ho @ h[n] + b_o)
    return out, h


def datas(layer: Layer) -> list[np.ndarray]:
    return [b.data.copy() for b in layer.blobs]


# -- setup, shapes and parameter layout -----------------------------------------------------------

@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_setup_top_shape_caffe(type_name: str) -> None:
    """TestSetUp: the top is the bottom's shape cut to 3 axes with num_output last."""
    layer = recurrent(type_name)
    top = tops(1)
    run_forward(layer, [blob((1, 3, 3, 2)), cont_blob([[0, 0, 0]])], top)
    assert top[0].shape == (1, 3, H)


@pytest.mark.parametrize(("type_name", "static", "shapes"), [
    ("LSTM", False, [(4 * H, 6), (4 * H,), (4 * H, H)]),
    ("LSTM", True, [(4 * H, 6), (4 * H,), (4 * H, 24), (4 * H, H)]),
    ("RNN", False, [(H, 6), (H,), (H, H), (H, H), (H,)]),
    ("RNN", True, [(H, 6), (H,), (H, 24), (H, H), (H, H), (H,)]),
])
def test_param_blobs_in_caffes_order(type_name: str, static: bool,
                                     shapes: list[tuple[int, ...]]) -> None:
    """LSTM: W_xc, b_c, (W_xc_static), W_hc. RNN: W_xh, b_h, (W_xh_static), W_hh, W_ho, b_o.
    The input weights flatten x from axis 2 and x_static from axis 1 (Caffe's InnerProducts)."""
    fillers = 'weight_filler { type: "constant" value: 0.25 } bias_filler { type: "constant" ' \
              'value: -0.5 }'
    layer = recurrent(type_name, fillers=fillers)
    bottom = [blob((2, 2, 3, 2)), cont_blob([[0, 0], [1, 1]])]
    if static:
        bottom.append(blob((2, 2, 3, 4)))
    run_forward(layer, bottom, tops(1))
    assert [b.shape for b in layer.blobs] == shapes
    for b in layer.blobs:
        assert np.all(b.data == (-0.5 if b.data.ndim == 1 else 0.25))


def test_weights_are_drawn_in_unrolled_layer_order() -> None:
    """Fillers run in the order of Caffe's unrolled layers: W_xc, b_c, W_xc_static, W_hc."""
    layer = recurrent("LSTM", num_output=2, seed=11)
    run_forward(layer, [blob((1, 2, 3)), cont_blob([[0, 0]]), blob((2, 5))], tops(1))
    rng = np.random.default_rng(11)
    expected = [rng.normal(0, 0.2, (8, 3)), rng.normal(0, 0.1, (8,)),
                rng.normal(0, 0.2, (8, 5)), rng.normal(0, 0.2, (8, 2))]
    for b, e in zip(layer.blobs, expected, strict=True):
        np.testing.assert_allclose(b.data, e)


def test_no_fillers_mean_zero_weights() -> None:
    layer = recurrent("LSTM", num_output=3, fillers="")
    top = tops(1)
    run_forward(layer, [blob((2, 2, 4)), cont_blob([[0, 0], [1, 1]])], top)
    assert all(not b.data.any() for b in layer.blobs)
    # All gate inputs 0: i = f = o = ½, g = 0, so c stays 0 and h = 0.
    assert not top[0].data.any()


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_float32_by_default(type_name: str) -> None:
    layer = recurrent(type_name, dtype="float32")
    x, cont = blob((3, 2, 4), dtype="float32"), blob(data=np.ones((3, 2)), dtype="float32")
    top = tops(1, dtype="float32")
    run_forward(layer, [x, cont], top)
    assert top[0].data.dtype == np.float32 and all(b.data.dtype == np.float32
                                                   for b in layer.blobs)
    top[0].diff[...] = 1
    layer.backward(top, [True, False], [x, cont])
    assert x.diff.dtype == np.float32 and np.isfinite(x.diff).all()


# -- forward values -------------------------------------------------------------------------------

CONT_PATTERN = [[0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]]


@pytest.mark.parametrize("static", [False, True])
def test_lstm_matches_reference_with_resets(static: bool) -> None:
    layer = recurrent("LSTM", num_output=5)
    x, cont = blob((4, 3, 2, 2), seed=1, low=-2, high=2), cont_blob(CONT_PATTERN)
    bottom = [x, cont] + ([blob((3, 2, 3), seed=2)] if static else [])
    top = tops(1)
    run_forward(layer, bottom, top)
    expected, _, _ = ref_lstm(x.data, cont.data, datas(layer),
                              bottom[2].data if static else None)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("static", [False, True])
def test_rnn_matches_reference_with_resets(static: bool) -> None:
    layer = recurrent("RNN", num_output=5)
    x, cont = blob((4, 3, 2, 2), seed=1, low=-2, high=2), cont_blob(CONT_PATTERN)
    bottom = [x, cont] + ([blob((3, 2, 3), seed=2)] if static else [])
    top = tops(1)
    run_forward(layer, bottom, top)
    expected, _ = ref_rnn(x.data, cont.data, datas(layer), bottom[2].data if static else None)
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)


def test_lstm_non_binary_cont_scales_state() -> None:
    """cont is a multiplier (Caffe's Scale and LSTMUnit): h_{t−1} and f·c_{t−1} are scaled."""
    layer = recurrent("LSTM", num_output=4)
    x, cont = blob((3, 2, 3), seed=4), cont_blob([[0.0, 0.0], [0.5, 1.0], [0.25, 2.0]])
    top = tops(1)
    run_forward(layer, [x, cont], top)
    expected, _, _ = ref_lstm(x.data, cont.data, datas(layer))
    np.testing.assert_allclose(top[0].data, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_forward_one_step_at_a_time_caffe(type_name: str) -> None:
    """TestForward: a 3-step sequence in one batch equals 3 forwards of one step each (the
    final state is carried to the next forward); with cont 0 at every step only t = 0 agrees."""
    steps, num = 3, 3
    x = blob((steps, num, 3, 2), data=None, seed=9)
    x.data[...] = np.random.default_rng(1).normal(0, 1, x.shape)
    full = recurrent(type_name)
    cont = cont_blob([[float(t > 0)] * num for t in range(steps)])
    top = tops(1)
    run_forward(full, [x, cont], top)
    expected = top[0].data.copy()

    for cont_value, same_after_first in ((None, True), (0.0, False)):
        layer = recurrent(type_name)
        xt, ct, tt = blob((1, num, 3, 2)), cont_blob([[0.0] * num]), tops(1)
        layer.setup([xt, ct], tt)
        for t in range(steps):
            xt.data[...] = x.data[t]
            ct.data[...] = float(t > 0) if cont_value is None else cont_value
            layer.reshape([xt, ct], tt)
            layer.forward([xt, ct], tt)
            if t == 0 or same_after_first:
                np.testing.assert_allclose(tt[0].data[0], expected[t], rtol=1e-10, atol=1e-12)
            else:
                assert np.all(tt[0].data[0] != expected[t])


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
@pytest.mark.parametrize("static", [False, True])
def test_sequence_reset_equals_a_fresh_start(type_name: str, static: bool) -> None:
    """cont = 0 at step k gives, from k on, the output of a fresh layer run on x[k:]."""
    steps, num, k = 6, 3, 3
    x = blob((steps, num, 4), seed=5)
    xs = blob((num, 2), seed=6)
    cont = np.ones((steps, num))
    cont[0] = 0
    cont[k] = 0
    layer = recurrent(type_name, num_output=5)
    top = tops(1)
    run_forward(layer, [x, cont_blob(cont)] + ([xs] if static else []), top)

    fresh = recurrent(type_name, num_output=5, seed=99)
    tail_top = tops(1)
    tail = [blob(data=x.data[k:]), cont_blob(cont[k:])] + ([xs] if static else [])
    fresh.setup(tail, tail_top)
    for mine, theirs in zip(fresh.blobs, layer.blobs, strict=True):
        mine.data[...] = theirs.data
    fresh.reshape(tail, tail_top)
    fresh.forward(tail, tail_top)
    np.testing.assert_allclose(top[0].data[k:], tail_top[0].data, rtol=1e-12, atol=1e-14)
    # ... and without the reset the tail differs.
    cont[k] = 1
    bottom = [x, cont_blob(cont)] + ([xs] if static else [])
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    assert np.all(top[0].data[k:] != tail_top[0].data)


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_reset_is_per_stream(type_name: str) -> None:
    """A reset in stream 1 leaves stream 0's outputs unchanged."""
    x = blob((4, 2, 3), seed=8)
    base = np.ones((4, 2))
    base[0] = 0
    reset = base.copy()
    reset[2, 1] = 0
    outs = []
    for cont in (base, reset):
        top = tops(1)
        run_forward(recurrent(type_name, num_output=4), [x, cont_blob(cont)], top)
        outs.append(top[0].data.copy())
    np.testing.assert_array_equal(outs[0][:, 0], outs[1][:, 0])
    np.testing.assert_array_equal(outs[0][:2, 1], outs[1][:2, 1])
    assert np.all(outs[0][2:, 1] != outs[1][2:, 1])


def test_carried_state_resets_when_batch_size_changes() -> None:
    layer = recurrent("LSTM", num_output=3)
    x, cont, top = blob((2, 2, 3)), cont_blob(np.ones((2, 2))), tops(1)
    run_forward(layer, [x, cont], top)
    first = top[0].data.copy()
    layer.forward([x, cont], top)  # continues from the carried state: different
    assert np.all(top[0].data != first)
    layer.reset_state()
    layer.forward([x, cont], top)
    np.testing.assert_array_equal(top[0].data, first)
    x3, cont3 = blob((2, 3, 3)), cont_blob(np.ones((2, 3)))
    x3.data[:, :2] = x.data
    layer.reshape([x3, cont3], top)
    layer.forward([x3, cont3], top)
    np.testing.assert_allclose(top[0].data[:, :2], first, rtol=1e-12)


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_expose_hidden_chains_batches(type_name: str) -> None:
    """With expose_hidden, the final states of one half fed as the initial states of the
    other give the full sequence's output; h_T is the last hidden state."""
    n_states = 2 if type_name == "LSTM" else 1
    steps, num = 4, 2
    x = blob((steps, num, 3), seed=3)
    cont = np.ones((steps, num))
    cont[0] = 0
    full = recurrent(type_name, num_output=4)
    top = tops(1)
    run_forward(full, [x, cont_blob(cont)], top)

    half = recurrent(type_name, num_output=4, expose=True)
    states = [blob(data=np.full((1, num, 4), 7.0)) for _ in range(n_states)]
    outs = []
    for lo in (0, 2):
        bottom = [blob(data=x.data[lo:lo + 2]), cont_blob(cont[lo:lo + 2]), *states]
        ht = tops(1 + n_states)
        if lo == 0:
            half.setup(bottom, ht)
            for mine, theirs in zip(half.blobs, full.blobs, strict=True):
                mine.data[...] = theirs.data
        half.reshape(bottom, ht)
        half.forward(bottom, ht)
        assert [t.shape for t in ht] == [(2, num, 4)] + [(1, num, 4)] * n_states
        outs.append(ht[0].data.copy())
        states = [blob(data=t.data.copy()) for t in ht[1:]]
        if type_name == "LSTM":
            np.testing.assert_array_equal(ht[1].data[0], ht[0].data[-1])
    np.testing.assert_allclose(np.concatenate(outs), top[0].data, rtol=1e-12, atol=1e-14)


def test_lstm_expose_hidden_matches_reference() -> None:
    layer = recurrent("LSTM", num_output=3, expose=True)
    x, cont = blob((3, 2, 2), seed=1), cont_blob([[1, 0], [1, 1], [0, 1]])
    h0, c0 = blob((1, 2, 3), seed=2), blob((1, 2, 3), seed=3)
    top = tops(3)
    run_forward(layer, [x, cont, h0, c0], top)
    out, h, c = ref_lstm(x.data, cont.data, datas(layer), h0=h0.data, c0=c0.data)
    np.testing.assert_allclose(top[0].data, out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[1].data[0], h, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[2].data[0], c, rtol=1e-12, atol=1e-14)


def test_rnn_expose_hidden_matches_reference() -> None:
    layer = recurrent("RNN", num_output=3, expose=True)
    x, cont = blob((3, 2, 2), seed=1), cont_blob([[1, 0], [1, 1], [0, 1]])
    h0 = blob((1, 2, 3), seed=2)
    top = tops(2)
    run_forward(layer, [x, cont, blob((2, 5), seed=4), h0], top)
    out, h = ref_rnn(x.data, cont.data, datas(layer), blob((2, 5), seed=4).data, h0=h0.data)
    np.testing.assert_allclose(top[0].data, out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(top[1].data[0], h, rtol=1e-12, atol=1e-14)


def test_lstm_unit_forward_formula() -> None:
    c_prev, x = blob((1, 3, 4), seed=1), blob((1, 3, 16), seed=2, low=-3, high=3)
    cont = cont_blob([[1.0, 0.0, 0.5]])
    layer = make_layer("LSTMUnit")
    top = tops(2)
    run_forward(layer, [c_prev, x, cont], top)
    a = x.data[0]
    i, f, o, g = sigmoid(a[:, :4]), sigmoid(a[:, 4:8]), sigmoid(a[:, 8:12]), np.tanh(a[:, 12:])
    c = cont.data[0][:, None] * f * c_prev.data[0] + i * g
    np.testing.assert_allclose(top[0].data[0], c, rtol=1e-12)
    np.testing.assert_allclose(top[1].data[0], o * np.tanh(c), rtol=1e-12)
    assert top[0].shape == top[1].shape == (1, 3, 4)


def test_lstm_unit_setup_caffe() -> None:
    """TestLSTMUnitSetUp: both tops are shaped like c_prev."""
    top = tops(2)
    run_forward(make_layer("LSTMUnit"), [blob((1, 3, H)), blob((1, 3, 4 * H)),
                                         cont_blob([[0, 0, 0]])], top)
    assert top[0].shape == top[1].shape == (1, 3, H)


# -- gradients: Caffe's cases ----------------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_gradient_caffe(type_name: str) -> None:
    """TestGradient / TestGradientNonZeroCont (1 step, 3 streams, cont all 0: with one step,
    Caffe's cont = (i > 2) is all 0 too): exhaustive, w.r.t. x and the params."""
    layer = recurrent(type_name)
    bottom = [blob((1, 3, 3, 2)), cont_blob([[0, 0, 0]])]
    assert_ok(exhaustive(layer, bottom, 1, [0]))


def caffe_buffer2(static: bool) -> list[Blob]:
    """Caffe's BufferSize2 bottoms: 2 steps × 2 streams, x (and x_static) uniform in [0, 1],
    cont = (i > 2) = [[0, 0], [0, 1]]: a reset in stream 0 at t = 1."""
    bottom = [blob((2, 2, 3, 2), seed=21, low=0, high=1), cont_blob([[0, 0], [0, 1]])]
    if static:
        bottom.append(blob((2, 2, 3, 4), seed=22, low=0, high=1))
    return bottom


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_gradient_non_zero_cont_buffer_size_2_caffe(type_name: str) -> None:
    assert_ok(exhaustive(recurrent(type_name), caffe_buffer2(False), 1, [0]))


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_gradient_non_zero_cont_buffer_size_2_with_static_input_caffe(type_name: str) -> None:
    """Exhaustive w.r.t. x and x_static as Caffe; the params (W_xc_static alone has 672
    elements) with the ½Σtop² objective, which keeps the test fast."""
    layer = recurrent(type_name)
    bottom = caffe_buffer2(True)
    assert_ok(exhaustive(layer, bottom, 1, [0, 2], params=False))
    assert_ok(GradientChecker(1e-2, 1e-3).check_single(layer, bottom, tops(1), [0, 2]))


@pytest.mark.parametrize("cont", [[0, 0, 0], [1, 0, 1]], ids=["zero_cont", "non_zero_cont"])
def test_lstm_unit_gradient_caffe(cont: list[int]) -> None:
    """TestLSTMUnitGradient / TestLSTMUnitGradientNonZeroCont: exhaustive w.r.t. c_prev and x."""
    layer = make_layer("LSTMUnit")
    bottom = [blob((1, 3, H), seed=1), blob((1, 3, 4 * H), seed=2), cont_blob([cont])]
    assert_ok(exhaustive(layer, bottom, 2, [0]))
    assert_ok(exhaustive(layer, bottom, 2, [1]))


# -- gradients: longer sequences, resets in the middle, exposed states -----------------------------

@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
@pytest.mark.parametrize("static", [False, True])
def test_gradient_with_resets_in_the_middle(type_name: str, static: bool) -> None:
    layer = recurrent(type_name, num_output=4)
    bottom = [blob((4, 3, 2), seed=31, low=-2, high=2), cont_blob(CONT_PATTERN)]
    if static:
        bottom.append(blob((3, 3), seed=32))
    checks = [0, 2] if static else [0]
    assert_ok(GradientChecker(1e-2, 1e-3).check(layer, bottom, tops(1), checks))


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_gradient_expose_hidden(type_name: str) -> None:
    """Gradients reach h_0 (and c_0), and flow back from the final-state tops."""
    n_states = 2 if type_name == "LSTM" else 1
    layer = recurrent(type_name, num_output=4, expose=True)
    bottom = [blob((3, 2, 3), seed=41), cont_blob([[1, 0], [1, 1], [0, 1]]),
              blob((2, 2), seed=42)]
    bottom += [blob((1, 2, 4), seed=43 + k) for k in range(n_states)]
    checks = [0, 2, *range(3, 3 + n_states)]
    assert_ok(GradientChecker(1e-2, 1e-3).check(layer, bottom, tops(1 + n_states), checks))


def test_lstm_gradient_non_binary_cont() -> None:
    """cont as a real multiplier: the true derivative (equal to Caffe's for 0/1 cont)."""
    layer = recurrent("LSTM", num_output=3)
    bottom = [blob((3, 2, 2), seed=51), cont_blob([[0, 0], [0.5, 1.5], [0.25, 1.0]])]
    assert_ok(GradientChecker(1e-2, 1e-3).check(layer, bottom, tops(1), [0]))


def test_lstm_unit_gradient_non_binary_cont() -> None:
    layer = make_layer("LSTMUnit")
    bottom = [blob((1, 3, 4), seed=1), blob((1, 3, 16), seed=2), cont_blob([[0.5, 2.0, 0]])]
    assert_ok(GradientChecker(1e-2, 1e-3).check(layer, bottom, tops(2), [0, 1]))


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_no_gradient_to_cont(type_name: str) -> None:
    """Caffe ignores a request to propagate to cont: its diff is never written."""
    layer = recurrent(type_name, num_output=3)
    x, cont = blob((2, 2, 3)), cont_blob([[0, 0], [1, 1]])
    cont.diff[...] = 42.0
    top = tops(1)
    run_forward(layer, [x, cont], top)
    top[0].diff[...] = 1.0
    layer.backward(top, [True, True], [x, cont])
    assert np.all(cont.diff == 42.0)
    assert x.diff.any()
    assert not layer.allow_force_backward(1) and layer.allow_force_backward(0)


def test_lstm_unit_refuses_gradient_to_cont() -> None:
    layer = make_layer("LSTMUnit")
    bottom = [blob((1, 2, 3)), blob((1, 2, 12)), cont_blob([[1, 1]])]
    top = tops(2)
    run_forward(layer, bottom, top)
    with pytest.raises(LayerError, match="sequence continuation"):
        layer.backward(top, [True, True, True], bottom)
    assert not layer.allow_force_backward(2) and layer.allow_force_backward(1)


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_param_gradients_accumulate_and_bottoms_only_where_asked(type_name: str) -> None:
    layer = recurrent(type_name, num_output=3)
    x, cont, xs = blob((2, 2, 3)), cont_blob([[0, 0], [1, 1]]), blob((2, 4))
    top = tops(1)
    run_forward(layer, [x, cont, xs], top)
    top[0].diff[...] = 1.0
    layer.backward(top, [False, False, False], [x, cont, xs])
    once = [b.diff.copy() for b in layer.blobs]
    assert all(d.any() for d in once)
    assert not x.diff.any() and not xs.diff.any()
    layer.backward(top, [True, False, True], [x, cont, xs])
    for b, d in zip(layer.blobs, once, strict=True):
        np.testing.assert_allclose(b.diff, 2 * d)
    assert x.diff.any() and xs.diff.any()


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
@pytest.mark.parametrize(("shapes", "message"), [
    ([(3,), (3, 1)], "at least 2 axes"),
    ([(3, 2, 4), (3, 2, 1)], r"cont.*= \(3, 2\), got"),
    ([(3, 2, 4), (2, 2)], r"cont.*= \(3, 2\), got"),
    ([(3, 2, 4), (3, 3)], r"cont.*= \(3, 2\), got"),
    ([(3, 2, 4), (3, 2), (3, 5)], "x_static.*2 streams"),
])
def test_bad_shapes(type_name: str, shapes: list[tuple[int, ...]], message: str) -> None:
    layer = recurrent(type_name, num_output=5)
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob(s) for s in shapes], tops(1))


@pytest.mark.parametrize(("type_name", "states", "message"), [
    ("RNN", [(1, 2, 6)], "bottom 2 \\(h_0\\) must have shape \\(1, 2, 5\\)"),
    ("RNN", [(2, 2, 5)], "h_0.*got \\(2, 2, 5\\)"),
    ("LSTM", [(1, 2, 6), (1, 2, 5)], "bottom 2 \\(h_0\\) must have shape \\(1, 2, 5\\)"),
    ("LSTM", [(1, 2, 5), (1, 3, 5)], "bottom 3 \\(c_0\\) must have shape \\(1, 2, 5\\)"),
])
@pytest.mark.parametrize("static", [False, True])
def test_bad_exposed_state_shapes(type_name: str, states: list[tuple[int, ...]], message: str,
                                  static: bool) -> None:
    layer = recurrent(type_name, num_output=5, expose=True)
    shapes = [(3, 2, 4), (3, 2)] + ([(2, 3)] if static else []) + states
    if static:  # the states follow x_static
        message = message.replace("bottom 3", "bottom 4").replace("bottom 2", "bottom 3")
    with pytest.raises(LayerError, match=message):
        run_forward(layer, [blob(s) for s in shapes], tops(1 + len(states)))


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_num_output_must_be_positive(type_name: str) -> None:
    layer = make_layer(type_name, "recurrent_param { }")
    with pytest.raises(LayerError, match="num_output must be positive"):
        run_forward(layer, [blob((2, 1, 3)), cont_blob([[0], [1]])], tops(1))


@pytest.mark.parametrize("type_name", ["RNN", "LSTM"])
def test_reshape_refuses_new_timesteps_or_input_size(type_name: str) -> None:
    layer = recurrent(type_name, num_output=3)
    top = tops(1)
    run_forward(layer, [blob((2, 2, 3)), cont_blob(np.zeros((2, 2)))], top)
    with pytest.raises(LayerError, match="3 timesteps but the layer was set up for 2"):
        layer.reshape([blob((3, 2, 3)), cont_blob(np.zeros((3, 2)))], top)
    with pytest.raises(LayerError, match="4 inputs per step, but the weights expect 3"):
        layer.reshape([blob((2, 2, 4)), cont_blob(np.zeros((2, 2)))], top)
    layer.reshape([blob((2, 5, 3)), cont_blob(np.zeros((2, 5)))], top)  # more streams: fine
    assert top[0].shape == (2, 5, 3)


@pytest.mark.parametrize(("type_name", "expose", "n_bottom", "n_top", "message"), [
    ("LSTM", False, 1, 1, "takes 2 or 3 bottom blobs \\(x, cont and optional x_static\\)"),
    ("LSTM", False, 4, 1, "takes 2 or 3 bottom"),
    ("LSTM", False, 2, 3, "exactly 1 top"),
    ("LSTM", True, 3, 3, "takes 4 or 5 bottom blobs \\(x, cont, optional x_static, h_0, c_0\\)"),
    ("LSTM", True, 4, 1, "exactly 3 top blob\\(s\\) \\(the output, then h_T, c_T\\)"),
    ("RNN", True, 2, 2, "takes 3 or 4 bottom"),
    ("RNN", True, 3, 1, "exactly 2 top"),
    ("RNN", False, 3, 2, "exactly 1 top"),
])
def test_bottom_and_top_counts(type_name: str, expose: bool, n_bottom: int, n_top: int,
                               message: str) -> None:
    layer = recurrent(type_name, expose=expose)
    problem = layer.check_counts(n_bottom, n_top)
    assert problem is not None and re.search(message, problem), problem


def test_counts_accept_the_valid_combinations() -> None:
    assert recurrent("LSTM").check_counts(2, 1) is None
    assert recurrent("LSTM").check_counts(3, 1) is None
    assert recurrent("LSTM", expose=True).check_counts(4, 3) is None
    assert recurrent("LSTM", expose=True).check_counts(5, 3) is None
    assert recurrent("RNN", expose=True).check_counts(3, 2) is None
    assert make_layer("LSTMUnit").check_counts(3, 2) is None
    assert make_layer("LSTMUnit").check_counts(2, 2) is not None


@pytest.mark.parametrize(("shapes", "message"), [
    ([(3, 4), (1, 3, 16), (1, 3)], "c_prev.*3 axes"),
    ([(1, 3, 4), (1, 3, 12), (1, 3)], "4 × 4 = 16 gate inputs"),
    ([(1, 3, 4), (1, 3, 16), (1, 3, 1)], "cont.*2 axes"),
    ([(2, 3, 4), (2, 3, 16), (2, 3)], "1 timestep"),
    ([(1, 3, 4), (1, 2, 16), (1, 3)], "x.*3 streams"),
    ([(1, 3, 4), (1, 3, 16), (1, 2)], "cont.*3 streams"),
])
def test_lstm_unit_bad_shapes(shapes: list[tuple[int, ...]], message: str) -> None:
    with pytest.raises(LayerError, match=message):
        run_forward(make_layer("LSTMUnit"), [blob(s) for s in shapes], tops(2))


# -- in a net -------------------------------------------------------------------------------------

NET = """
name: "seq" force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 dim: 2 dim: 4 } } }
layer { name: "cont" type: "Input" top: "cont" input_param { shape { dim: 3 dim: 2 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
        recurrent_param { num_output: 5 weight_filler { type: "uniform" min: -0.3 max: 0.3 }
                          bias_filler { type: "constant" value: 0.1 } } }
"""


def test_lstm_in_a_net() -> None:
    p = pb.NetParameter()
    text_format.Parse(NET, p)
    net = Net(p, "TRAIN", verbose=False, seed=3)
    try:
        assert [b.shape for b in net.params["lstm"]] == [(20, 4), (20,), (20, 5)]
        i = net.layer_names.index("lstm")
        assert net.bottom_need_backward[i] == [True, False]  # force_backward spares cont
        x = np.random.default_rng(0).normal(size=(3, 2, 4))
        cont = np.array([[0, 0], [1, 1], [1, 0]], dtype=float)
        out = net.forward(x=x, cont=cont)
        expected, _, _ = ref_lstm(x, cont, [b.data for b in net.params["lstm"]])
        np.testing.assert_allclose(out["h"], expected, rtol=1e-5, atol=1e-6)
        net.blobs["h"].diff[...] = 1.0
        net.backward()
        assert net.blobs["x"].diff.any() and not net.blobs["cont"].diff.any()
    finally:
        net.close()


def test_count_errors_are_located_in_a_net() -> None:
    p = pb.NetParameter()
    text_format.Parse(NET.replace('top: "h"', 'top: "h" top: "extra"'), p)
    with pytest.raises(ConfigError, match=r"lstm.*exactly 1 top"):
        Net(p, "TRAIN", verbose=False)


# -- PyTorch oracle -------------------------------------------------------------------------------

def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10)


def ifog_to_torch(w: np.ndarray) -> np.ndarray:
    """Caffe's gate blocks i, f, o, g to torch's i, f, g, o (rows)."""
    i, f, o, g = np.split(w, 4, axis=0)
    return np.concatenate([i, f, g, o], axis=0)


def torch_to_ifog(w: np.ndarray) -> np.ndarray:
    i, f, g, o = np.split(w, 4, axis=0)
    return np.concatenate([i, f, o, g], axis=0)


def run_with_random_diffs(layer: Layer, bottom: list[Blob], n_tops: int,
                          propagate: list[bool]) -> list[Blob]:
    top = tops(n_tops)
    run_forward(layer, bottom, top)
    rng = np.random.default_rng(77)
    for t in top:
        t.diff[...] = rng.uniform(-1, 1, t.shape)
    layer.backward(top, propagate, bottom)
    return top


@pytest.mark.parametrize(("expose", "static"), [(False, False), (True, False), (False, True),
                                                (True, True)])
def test_lstm_matches_torch(expose: bool, static: bool) -> None:
    torch = pytest.importorskip("torch")
    steps, num, n_in, n_static, hidden = 5, 3, 4, 3, 6
    layer = recurrent("LSTM", num_output=hidden, expose=expose)
    x = blob((steps, num, n_in), seed=1, low=-2, high=2)
    bottom = [x, cont_blob(np.ones((steps, num)))]
    if static:
        bottom.append(blob((num, n_static), seed=4))
    if expose:
        bottom += [blob((1, num, hidden), seed=2), blob((1, num, hidden), seed=3)]
    top = run_with_random_diffs(layer, bottom, 3 if expose else 1,
                                [True, False] + [True] * (len(bottom) - 2))
    w_xc, b_c = layer.blobs[0].data, layer.blobs[1].data
    w_hc = layer.blobs[-1].data

    t = torch.from_numpy
    m = torch.nn.LSTM(n_in + (n_static if static else 0), hidden).double()
    w_in = np.concatenate([w_xc, layer.blobs[2].data], axis=1) if static else w_xc
    with torch.no_grad():
        m.weight_ih_l0.copy_(t(ifog_to_torch(w_in)))
        m.weight_hh_l0.copy_(t(ifog_to_torch(w_hc)))
        m.bias_ih_l0.copy_(t(ifog_to_torch(b_c)))
        m.bias_hh_l0.zero_()
    xt = t(x.data.copy()).requires_grad_()
    inp = xt
    if static:
        st = t(bottom[2].data.copy()).requires_grad_()
        inp = torch.cat([xt, st.unsqueeze(0).expand(steps, -1, -1)], dim=2)
    if expose:
        h0 = t(bottom[-2].data.copy()).requires_grad_()
        c0 = t(bottom[-1].data.copy()).requires_grad_()
        out, (hn, cn) = m(inp, (h0, c0))
    else:
        out, (hn, cn) = m(inp)
    loss = (out * t(top[0].diff)).sum()
    if expose:
        loss = loss + (hn * t(top[1].diff)).sum() + (cn * t(top[2].diff)).sum()
    loss.backward()

    close(top[0].data, out.detach().numpy())
    if expose:
        close(top[1].data, hn.detach().numpy())
        close(top[2].data, cn.detach().numpy())
        close(bottom[-2].diff, h0.grad.numpy())
        close(bottom[-1].diff, c0.grad.numpy())
    dw_in = torch_to_ifog(m.weight_ih_l0.grad.numpy())
    close(layer.blobs[0].diff, dw_in[:, :n_in])
    if static:
        close(layer.blobs[2].diff, dw_in[:, n_in:])
        close(bottom[2].diff, st.grad.numpy())
    close(layer.blobs[1].diff, torch_to_ifog(m.bias_ih_l0.grad.numpy()))
    close(layer.blobs[-1].diff, torch_to_ifog(m.weight_hh_l0.grad.numpy()))
    close(x.diff, xt.grad.numpy())


@pytest.mark.parametrize(("expose", "static"), [(False, False), (True, False), (False, True),
                                                (True, True)])
def test_rnn_matches_torch(expose: bool, static: bool) -> None:
    torch = pytest.importorskip("torch")
    steps, num, n_in, n_static, hidden = 5, 3, 4, 3, 6
    layer = recurrent("RNN", num_output=hidden, expose=expose)
    x = blob((steps, num, n_in), seed=1, low=-2, high=2)
    bottom = [x, cont_blob(np.ones((steps, num)))]
    if static:
        bottom.append(blob((num, n_static), seed=4))
    if expose:
        bottom.append(blob((1, num, hidden), seed=2))
    top = run_with_random_diffs(layer, bottom, 2 if expose else 1,
                                [True, False] + [True] * (len(bottom) - 2))
    k = 3 if static else 2
    w_xh, b_h = layer.blobs[0].data, layer.blobs[1].data
    w_hh, w_ho, b_o = (b.data for b in layer.blobs[k:])

    t = torch.from_numpy
    m = torch.nn.RNN(n_in + (n_static if static else 0), hidden, nonlinearity="tanh").double()
    w_in = np.concatenate([w_xh, layer.blobs[2].data], axis=1) if static else w_xh
    with torch.no_grad():
        m.weight_ih_l0.copy_(t(w_in))
        m.weight_hh_l0.copy_(t(w_hh))
        m.bias_ih_l0.copy_(t(b_h))
        m.bias_hh_l0.zero_()
    w_ho_t = t(w_ho.copy()).requires_grad_()
    b_o_t = t(b_o.copy()).requires_grad_()
    xt = t(x.data.copy()).requires_grad_()
    inp = xt
    if static:
        st = t(bottom[2].data.copy()).requires_grad_()
        inp = torch.cat([xt, st.unsqueeze(0).expand(steps, -1, -1)], dim=2)
    if expose:
        h0 = t(bottom[-1].data.copy()).requires_grad_()
        hs, hn = m(inp, h0)
    else:
        hs, hn = m(inp)
    o = torch.tanh(hs @ w_ho_t.T + b_o_t)
    loss = (o * t(top[0].diff)).sum()
    if expose:
        loss = loss + (hn * t(top[1].diff)).sum()
    loss.backward()

    close(top[0].data, o.detach().numpy())
    if expose:
        close(top[1].data, hn.detach().numpy())
        close(bottom[-1].diff, h0.grad.numpy())
    dw_in = m.weight_ih_l0.grad.numpy()
    close(layer.blobs[0].diff, dw_in[:, :n_in])
    if static:
        close(layer.blobs[2].diff, dw_in[:, n_in:])
        close(bottom[2].diff, st.grad.numpy())
    close(layer.blobs[1].diff, m.bias_ih_l0.grad.numpy())
    close(layer.blobs[k].diff, m.weight_hh_l0.grad.numpy())
    close(layer.blobs[k + 1].diff, w_ho_t.grad.numpy())
    close(layer.blobs[k + 2].diff, b_o_t.grad.numpy())
    close(x.diff, xt.grad.numpy())


def test_lstm_unit_matches_torch_lstm_cell() -> None:
    """One LSTMUnit step with cont 1 is torch's LSTMCell on gate inputs (identity weights)."""
    torch = pytest.importorskip("torch")
    num, hidden = 3, 4
    layer = make_layer("LSTMUnit")
    bottom = [blob((1, num, hidden), seed=1), blob((1, num, 4 * hidden), seed=2, low=-2, high=2),
              cont_blob(np.ones((1, num)))]
    top = run_with_random_diffs(layer, bottom, 2, [True, True, False])

    t = torch.from_numpy
    cell = torch.nn.LSTMCell(4 * hidden, hidden).double()
    with torch.no_grad():
        cell.weight_ih.copy_(t(ifog_to_torch(np.eye(4 * hidden))))
        cell.weight_hh.zero_()
        cell.bias_ih.zero_()
        cell.bias_hh.zero_()
    a = t(bottom[1].data[0].copy()).requires_grad_()
    c_prev = t(bottom[0].data[0].copy()).requires_grad_()
    h, c = cell(a, (torch.zeros(num, hidden, dtype=torch.float64), c_prev))
    ((c * t(top[0].diff[0])).sum() + (h * t(top[1].diff[0])).sum()).backward()
    close(top[0].data[0], c.detach().numpy())
    close(top[1].data[0], h.detach().numpy())
    close(bottom[0].diff[0], c_prev.grad.numpy())
    close(bottom[1].diff[0], a.grad.numpy())
