"""CLI behaviour around runs: --set on test and on net entries, the resolved configuration
saved beside the log, and SIGINT → snapshot → resume equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from netforge import Solver
from netforge.cli import _install_signals, main
from netforge.config import load_net_param, load_solver_param

QUICK = ["--set", "max_iter=4", "--set", "test_iter=[2]", "--set", "test_interval=2",
         "--set", "display=2", "--set", "snapshot=0", "--set", "random_seed=3"]


def test_resolved_configuration_is_saved(workspace: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--solver", "solvers/lenet_solver.yaml", *QUICK, "--log", "run/a.log",
                 "--set", "base_lr=0.02"])
    assert code == 0, capsys.readouterr().err
    solver, _ = load_solver_param("run/a.solver.yaml")
    assert solver.base_lr == pytest.approx(0.02) and solver.max_iter == 4
    net, _ = load_net_param("run/a.net.yaml")
    ours, _ = load_net_param("models/lenet_train_test.yaml")
    assert net == ours
    assert "Resolved configuration: run/a.solver.yaml, run/a.net.yaml" in capsys.readouterr().err


def test_set_on_test_picks_layers_by_name(workspace: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--solver", "solvers/lenet_solver.yaml", *QUICK]) == 0
    capsys.readouterr()
    code = main(["test", "--model", "models/lenet_train_test.yaml", "--weights",
                 "snapshots/lenet_iter_4.npz", "--iterations", "2",
                 "--set", "layer[mnist].data_param.batch_size=7"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Override: layer[mnist].data_param.batch_size = 7 (was 100)" in err
    code = main(["test", "--model", "models/lenet_train_test.yaml", "--weights",
                 "snapshots/lenet_iter_4.npz", "--set", "layer[mnst].data_param.batch_size=7"])
    assert code == 2
    assert capsys.readouterr().err.strip().endswith(
        "no layer entry named 'mnst' (did you mean 'mnist'?)")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")
def test_sigint_snapshot_then_resume_equals_uninterrupted(workspace: Path) -> None:
    overrides = ["max_iter=10", "test_iter=[2]", "test_interval=5", "display=0", "snapshot=0",
                 "random_seed=11", "snapshot_prefix=snaps/run"]
    straight = Solver("solvers/lenet_solver.yaml", overrides=overrides, verbose=False)
    straight.solve()
    expected = straight.net.weights()
    straight.close()

    interrupted = Solver("solvers/lenet_solver.yaml", overrides=overrides, verbose=False)
    restore = _install_signals(interrupted, "stop", "snapshot")

    def ctrl_c_at_6(s: Solver) -> None:
        if s.iter == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the real signal, through the real handler

    interrupted.on_iteration.append(ctrl_c_at_6)
    try:
        interrupted.solve()
    finally:
        restore()
        interrupted.close()
    assert interrupted.iter == 6
    assert Path("snaps/run_iter_6.solverstate.npz").exists()  # snapshot_after_train on stop

    resumed = Solver("solvers/lenet_solver.yaml", overrides=overrides, verbose=False)
    resumed.solve("snaps/run_iter_6.solverstate.npz")
    assert resumed.iter == 10
    for name, arrays in expected.items():
        for a, b in zip(arrays, resumed.net.weights()[name], strict=True):
            np.testing.assert_array_equal(a, b)
    resumed.close()
