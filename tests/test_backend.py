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
