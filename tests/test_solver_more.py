"""netforge's solver extensions (warm-up, cosine, early stop) and Caffe's reference checks for
every solver type: iter_size 2 equals one double batch, and snapshot/resume equals an
uninterrupted run, history included."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from netforge import Solver
from netforge.errors import ConfigError
from netforge.solver import learning_rate
from tests.test_solver import F64, SOLVER_SETTINGS, lmdb_regression, solver_param


def test_cosine_policy() -> None:
    sp = solver_param('base_lr: 0.1 lr_policy: "cosine" max_iter: 100 min_lr: 0.001')
    assert learning_rate(sp, 0)[0] == pytest.approx(0.1)
    assert learning_rate(sp, 50)[0] == pytest.approx(0.001 + 0.099 * 0.5)
    assert learning_rate(sp, 100)[0] == pytest.approx(0.001)
    assert learning_rate(sp, 25)[0] == pytest.approx(0.001 + 0.099 * (1 + math.cos(math.pi / 4))
                                                    / 2)


def test_linear_warmup_multiplies_any_policy() -> None:
    sp = solver_param('base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75 '
                      "warmup_iter: 10 warmup_start_factor: 0.2")
    inv = solver_param('base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75')
    for it in (0, 5, 9, 10, 100):
        factor = 0.2 + 0.8 * it / 10 if it < 10 else 1.0
        assert learning_rate(sp, it)[0] == pytest.approx(learning_rate(inv, it)[0] * factor)


# -- every solver type: iter_size and resume --------------------------------------------------


@pytest.mark.parametrize("kind", list(SOLVER_SETTINGS))
def test_iter_size_equals_double_batch_for_every_type(tmp_path: Path, kind: str) -> None:
    big, small = lmdb_regression(tmp_path, 4, 1, kind), lmdb_regression(tmp_path, 2, 2, kind)
    try:
        for s in (big, small):
            s.step(3)
        for a, b in zip(big.net.params["ip"], small.net.params["ip"], strict=True):
            np.testing.assert_allclose(a.data, b.data, rtol=1e-10, atol=1e-13)
    finally:
        big.close()
        small.close()


@pytest.mark.parametrize("kind", list(SOLVER_SETTINGS))
def test_resume_equals_uninterrupted_for_every_type(tmp_path: Path, kind: str) -> None:
    def make() -> Solver:
        s = lmdb_regression(tmp_path, 2, 1, kind)
        s.param.snapshot_prefix = str(tmp_path / "snap" / kind)
        return s

    straight = make()
    straight.step(6)
    first = make()
    first.step(3)
    _, state = first.snapshot()
    first.close()
    resumed = make()
    resumed.restore(state)
    assert resumed.iter == 3
    resumed.step(3)
    for a, b in zip(straight.net.params["ip"], resumed.net.params["ip"], strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    assert len(straight.history) == (2 if kind in ("AdaDelta", "Adam") else 1) * 2
    for a, b in zip(straight.history, resumed.history, strict=True):
        np.testing.assert_array_equal(a, b)
    straight.close()
    resumed.close()


# -- early stop --------------------------------------------------------------------------------


def early_stop_solver(tmp_path: Path, early: str, max_iter: int = 60) -> Solver:
    db = lmdb_regression(tmp_path, 2, 1).param.net_param
    sp = solver_param(f"lr_policy: 'fixed' base_lr: 0.0 max_iter: {max_iter} test_iter: 4 "
                      f"test_interval: 5 random_seed: 1 {early}")
    sp.net_param.CopyFrom(db)
    sp.snapshot_prefix = str(tmp_path / "early")
    return Solver(sp, backend=F64, verbose=False)


def test_early_stop_when_nothing_improves(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                          ) -> None:
    # base_lr 0, and each test covers the whole database (4 batches of 2): the test loss never
    # changes, so after `patience` tests without gain training stops.
    with caplog.at_level(logging.INFO, logger="netforge"):
        s = early_stop_solver(tmp_path, "early_stop { output: 'loss' patience: 3 }")
        s.solve()
    assert s.early_stop is not None and s.early_stop.minimize
    assert s.iter == 15  # tests at 0 (best), 5, 10, 15 → third test without gain
    assert "Early stopping at iteration 15: loss has not improved by more than 0 for 3 tests " \
           "(best" in caplog.text
    assert "Optimization stopped early." in caplog.text
    s.close()


def test_early_stop_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"early_stop.output 'los' is not an output of test "
                                          r"net #0 \(outputs: loss\) \(did you mean 'loss'\?\)"):
        early_stop_solver(tmp_path, "early_stop { output: 'los' }")
    with pytest.raises(ConfigError, match="early_stop needs 'output'"):
        early_stop_solver(tmp_path, "early_stop { patience: 2 }")
    with pytest.raises(ConfigError, match=r"early_stop\.test_net is 3"):
        early_stop_solver(tmp_path, "early_stop { output: 'loss' test_net: 3 }")


def test_early_stop_state_survives_resume(tmp_path: Path) -> None:
    s = early_stop_solver(tmp_path, "early_stop { output: 'loss' patience: 4 }", max_iter=10)
    s.param.snapshot_prefix = str(tmp_path / "es")
    s.solve()
    assert s.early_stop is not None and s.early_stop.bad_tests == 2
    s.close()
    t = early_stop_solver(tmp_path, "early_stop { output: 'loss' patience: 4 }", max_iter=60)
    t.restore(tmp_path / "es_iter_10.solverstate.npz")
    # The snapshot is taken before solve()'s final test (Caffe's order), so it holds 1 bad test;
    # the resumed run tests again at 10, then 15 and 20, where the 4th bad test stops it.
    assert t.early_stop is not None and t.early_stop.bad_tests == 1
    t.solve()
    assert t.iter == 20
    t.close()
