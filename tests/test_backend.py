"""The NumPy backend's kernels: im2col layouts agree, and col2im is im2col's adjoint."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.backend import NumpyBackend

B = NumpyBackend("float64")
CASES = [  # n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw
    (2, 3, 7, 6, 3, 2, 2, 1, 1, 0, 1, 2),
    (4, 5, 8, 8, 5, 5, 1, 1, 0, 0, 1, 1),
    (3, 2, 9, 9, 3, 3, 2, 2, 2, 2, 1, 1),
    (1, 1, 5, 5, 1, 1, 1, 1, 0, 0, 1, 1),
]


@pytest.mark.parametrize("case", CASES)
def test_im2col_layouts_agree(case: tuple[int, ...]) -> None:
    n, c, h, w, *k = case
    x = np.random.default_rng(0).normal(size=(n, c, h, w))
    per_image = B.im2col(x, *k)                      # (N, K, P)
    folded = B.im2col_cnhw(x, *k)                    # (K, N·P)
    _, kk, p = per_image.shape
    np.testing.assert_array_equal(folded.reshape(kk, n, p).transpose(1, 0, 2), per_image)
    again = B.im2col_cnhw(x, *k, out=folded)
    assert again is folded


@pytest.mark.parametrize("case", CASES)
def test_col2im_is_the_adjoint(case: tuple[int, ...]) -> None:
    """<im2col(x), c> == <x, col2im(c)> for both layouts."""
    n, c, h, w, *k = case
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, c, h, w))
    cols = B.im2col(x, *k)
    cn = B.im2col_cnhw(x, *k)
    a = rng.normal(size=cols.shape)
    b = rng.normal(size=cn.shape)
    assert np.vdot(cols, a) == pytest.approx(np.vdot(x, B.col2im(a, x.shape, *k)))
    out = np.full(x.shape, 7.0)
    back = B.col2im_cnhw(b, x.shape, *k, out=out)
    assert np.vdot(cn, b) == pytest.approx(np.vdot(x, back))


def test_pad() -> None:
    x = np.ones((1, 1, 2, 2))
    p = B.pad(x, 1, 2, value=-1.0, extra_h=1)
    assert p.shape == (1, 1, 5, 6)
    assert p[0, 0, 1, 2] == 1 and p[0, 0, 0, 0] == -1 and p.sum() == 4 - (30 - 4)
    assert B.pad(x, 0, 0) is x


# -- compiled kernels (numba) against the NumPy paths ------------------------------------------

kernels_available = pytest.mark.skipif(not NumpyBackend().compiled,
                                       reason="numba not installed (netforge[fast])")
BIG = [  # large enough for the compiled path
    (8, 16, 20, 18, 5, 5, 1, 1, 0, 0, 1, 1),
    (6, 12, 17, 19, 3, 3, 2, 2, 2, 1, 1, 1),
    (4, 8, 24, 24, 3, 2, 1, 2, 1, 0, 2, 1),
]


@kernels_available
@pytest.mark.parametrize("case", BIG)
def test_compiled_im2col_col2im_match_numpy(case: tuple[int, ...]) -> None:
    n, c, h, w, *k = case
    fast, slow = NumpyBackend("float64"), NumpyBackend("float64", compiled=False)
    x = np.random.default_rng(2).normal(size=(n, c, h, w))
    cols = fast.im2col_cnhw(x, *k)
    assert fast.use_compiled(cols.size)
    np.testing.assert_array_equal(cols, slow.im2col_cnhw(x, *k))
    d = np.random.default_rng(3).normal(size=cols.shape)
    np.testing.assert_allclose(fast.col2im_cnhw(d, x.shape, *k, out=np.empty(x.shape)),
                               slow.col2im_cnhw(d, x.shape, *k), rtol=1e-12, atol=1e-12)


@kernels_available
@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("geometry", [
    "kernel_size: 2 stride: 2", "kernel_size: 3 stride: 2", "kernel_size: 3 stride: 2 pad: 1",
    "kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0"])
def test_compiled_pooling_matches_numpy(pool: str, geometry: str) -> None:
    from netforge.blob import Blob
    from tests.helpers import make_layer

    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 16, 21, 20)).round(1)  # rounding makes ties: first max must win
    outs = []
    for compiled in (True, False):
        layer = make_layer("Pooling", f"pooling_param {{ pool: {pool} {geometry} }}")
        layer.backend = NumpyBackend("float64", compiled=compiled)
        bottom, tops = Blob(layer.backend, x.shape), [Blob(layer.backend)]
        bottom.data[...] = x
        layer.setup([bottom], tops)
        layer.reshape([bottom], tops)
        layer.forward([bottom], tops)
        tops[0].diff[...] = rng.normal(size=tops[0].shape) if not outs else outs[0][2]
        layer.backward(tops, [True], [bottom])
        outs.append((tops[0].data.copy(), bottom.diff.copy(), tops[0].diff.copy()))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-12)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("params", ["num_output: 4 kernel_size: 3 pad: 1",
                                    "num_output: 6 kernel_size: 2 stride: 2 group: 2"])
def test_convolution_in_chunks_equals_whole_batch(monkeypatch: pytest.MonkeyPatch,
                                                  params: str) -> None:
    """Convolution processes big batches in chunks of images; the result must not depend on
    the chunking (budget of one image vs the whole batch at once)."""
    from netforge.layers.vision import _ConvolutionBase
    from tests.helpers import blob, make_layer, tops

    results = []
    for budget in (1 << 30, 1):
        monkeypatch.setattr(_ConvolutionBase, "COLUMN_BUDGET", budget)
        layer = make_layer("Convolution", f"convolution_param {{ {params} "
                                          "weight_filler { type: 'gaussian' } "
                                          "bias_filler { type: 'gaussian' } }")
        bottom, top = [blob((5, 4, 7, 6))], tops(1)
        layer.setup(bottom, top)
        layer.reshape(bottom, top)
        assert len(layer._chunks(bottom[0].data)) == (1 if budget > 1 else 5)
        layer.forward(bottom, top)
        top[0].diff[...] = np.random.default_rng(5).normal(size=top[0].shape)
        layer.backward(top, [True], bottom)
        results.append((top[0].data.copy(), bottom[0].diff.copy(),
                        [b.diff.copy() for b in layer.blobs]))
    (y1, dx1, dw1), (y2, dx2, dw2) = results
    np.testing.assert_allclose(y1, y2, rtol=1e-12)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-12, atol=1e-14)
    for a, b in zip(dw1, dw2, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@kernels_available
@pytest.mark.parametrize("geometry", ["kernel_size: 2 stride: 2",
                                      "kernel_size: 3 stride: 2 pad: 1"])
def test_test_phase_max_pooling_skips_argmax_but_still_backprops(geometry: str) -> None:
    """In TEST the compiled MAX pooling computes only the maxima; a backward (force_backward,
    gradcheck in TEST) recomputes the argmax. Both must equal the TRAIN-phase results."""
    from netforge.blob import Blob
    from tests.helpers import PHASE_TEST, PHASE_TRAIN, make_layer

    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 16, 21, 20))
    dy = None
    results = []
    for phase in (PHASE_TRAIN, PHASE_TEST):
        layer = make_layer("Pooling", f"pooling_param {{ pool: MAX {geometry} }}", phase=phase)
        bottom, top = Blob(layer.backend, x.shape), [Blob(layer.backend)]
        bottom.data[...] = x
        layer.setup([bottom], top)
        layer.reshape([bottom], top)
        layer.forward([bottom], top)
        if phase == PHASE_TEST:
            assert layer._argmax is None
        dy = rng.normal(size=top[0].shape) if dy is None else dy
        top[0].diff[...] = dy
        layer.backward(top, [True], [bottom])
        results.append((top[0].data.copy(), bottom.diff.copy()))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
