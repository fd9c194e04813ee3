"""The CLI end to end: train, test, resume, fine-tune and convert-mnist on small data, and
one located line with exit code 2 (never a traceback) for each class of bad input."""

from __future__ import annotations

import gzip
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from netforge.cli import _install_signals, main
from netforge.data.db import LmdbReader
from tests.conftest import ROOT, synthetic_digits

QUICK = ["--set", "max_iter=6", "--set", "test_iter=[2]", "--set", "test_interval=3",
         "--set", "display=2", "--set", "snapshot=3", "--set", "random_seed=1"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


# -- the main job ---------------------------------------------------------------------------------


def test_train_then_test(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(capsys, "train", "--solver", "solvers/lenet_solver.yaml", *QUICK)
    assert code == 0, err
    assert "Override: max_iter = 6 (was 10000)" in err
    assert "Iteration 6, Testing net (#0)" in err
    assert "Optimization Done." in err
    snaps = sorted(p.name for p in Path("snapshots").iterdir())
    assert [s for s in snaps if s.endswith(".npz")] == [
        "lenet_iter_3.npz", "lenet_iter_3.solverstate.npz",
        "lenet_iter_6.npz", "lenet_iter_6.solverstate.npz"]
    logs = [s for s in snaps if s.endswith(".log")]
    assert len(logs) == 1 and logs[0].startswith("lenet_")
    text = (Path("snapshots") / logs[0]).read_text()
    assert text.startswith("Log file created at: ")
    assert "Optimization Done." in text

    code, err = run(capsys, "test", "--model", "models/lenet_train_test.prototxt",
                    "--weights", "snapshots/lenet_iter_6.npz", "--iterations", "3")
    assert code == 0, err
    for needle in ("Running for 3 iterations.", "Batch 0, accuracy = ", "Batch 2, loss = ",
                   "] accuracy = ", "] loss = ", " (* 1 = ", " loss)"):
        assert needle in err


def test_time_prints_caffes_per_layer_table(workspace: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`netforge time`: Caffe's per-layer average forward/backward table and totals, every
    timed pass run layer by layer after as many untimed ones of the same kind (a pooling that
    training makes inside its convolution is timed on its own, and its kernels are compiled or
    loaded before the timing starts)."""
    from netforge import timing

    passes: list[int] = []
    original = timing._timed_passes

    def counted(net: object, iterations: int, *rest: object) -> None:
        passes.append(iterations)
        original(net, iterations, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(timing, "_timed_passes", counted)
    code, err = run(capsys, "time", "--model", "models/lenet_train_test.prototxt",
                    "--iterations", "3")
    assert code == 0, err
    assert passes == [1, 3]
    for needle in ("*** Benchmark begins ***", "Testing for 3 iterations.", "Initial loss: ",
                   "Iteration: 3 forward-backward time: ", "Average time per layer: ",
                   "Average Forward pass: ", "Average Backward pass: ",
                   "Average Forward-Backward: ", "Total Time: ", "*** Benchmark ends ***"):
        assert needle in err
    for layer in ("mnist", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss"):
        assert f"{layer}\tforward: " in err and f"{layer}\tbackward: " in err


def test_resume_and_fine_tune(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "train", "--solver", "solvers/lenet_solver.prototxt", *QUICK)[0] == 0
    code, err = run(capsys, "train", "--solver", "solvers/lenet_solver.prototxt", *QUICK,
                    "--set", "max_iter=8", "--snapshot", "snapshots/lenet_iter_6.solverstate.npz")
    assert code == 0, err
    assert "resuming at iteration 6" in err
    assert "Iteration 8, Testing net (#0)" not in err or "Iteration 7" not in err
    assert Path("snapshots/lenet_iter_8.npz").exists()
    code, err = run(capsys, "train", "--solver", "solvers/lenet_solver.prototxt", *QUICK,
                    "--weights", "snapshots/lenet_iter_8.npz")
    assert code == 0, err
    assert "Loaded weights for 4 layer(s): conv1, conv2, ip1, ip2" in err


def test_convert_mnist_idx_to_lmdb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = synthetic_digits(12)
    img = tmp_path / "imgs-idx3-ubyte.gz"
    lab = tmp_path / "labs-idx1-ubyte"
    img.write_bytes(gzip.compress(struct.pack(">IIII", 2051, 12, 28, 28) + images.tobytes()))
    lab.write_bytes(struct.pack(">II", 2049, 12) + labels.astype(np.uint8).tobytes())
    code, err = run(capsys, "convert-mnist", str(img), str(lab), str(tmp_path / "db"))
    assert code == 0, err
    with LmdbReader(tmp_path / "db") as reader:
        keys = [k for k, _ in reader]
    assert keys[:2] == [b"00000000", b"00000001"] and len(keys) == 12
    code, err = run(capsys, "convert-mnist", str(img), str(lab), str(tmp_path / "db"))
    assert code == 2 and "--overwrite" in last_line(err)


# -- bad input: one located line, exit code 2 -----------------------------------------------------


def edit(path: str, old: str, new: str) -> None:
    p = Path(path)
    text = p.read_text()
    assert old in text, old
    p.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("solvers/lenet_solver.yaml", "max_iter: 10000", "max_itr: 10000",
     "solvers/lenet_solver.yaml:12:1: unknown field 'max_itr' in SolverParameter "
     "(at SolverParameter) (did you mean 'max_iter'?)"),
    ("solvers/lenet_solver.yaml", "solver_mode: CPU", "solver_mode: GPU",
     "solvers/lenet_solver.yaml:15:1: solver_mode GPU needs the GPU backend"),
    ("models/lenet_train_test.yaml", "type: ReLU", "type: Relu",
     "models/lenet_train_test.yaml:60:5: layer 'relu1': unknown layer type 'Relu' "
     "(did you mean 'ReLU'?)"),
    ("models/lenet_train_test.yaml", "{pool: MAX, kernel_size: 2, stride: 2}",
     "{pool: MX, kernel_size: 2, stride: 2}",
     "models/lenet_train_test.yaml:33:27: unknown value 'MX' for "
     "layer[3].pooling_param.pool (allowed: MAX, AVE, STOCHASTIC) (did you mean 'MAX'?)"),
    ("models/lenet_train_test.yaml", "bottom: pool1", "bottom: pool_1",
     "models/lenet_train_test.yaml:36:13: layer 'conv2' (Convolution): unknown bottom blob "
     "'pool_1' (bottom 0); no earlier layer in this phase produces it (did you mean 'pool1'?)"),
    ("models/lenet_train_test.yaml", "top: pool2", "top: conv1",
     "models/lenet_train_test.yaml:48:10: layer 'pool2': top blob 'conv1' is already produced "
     "by layer 'conv1'"),
    ("models/lenet_train_test.yaml", "kernel_size: 5\n      stride: 1",
     "kernel_size: 50\n      stride: 1",
     "models/lenet_train_test.yaml:18:5: layer 'conv1' (Convolution): kernel 50x50 with pad 0 "
     "does not fit a 28x28 input (bottoms: data (64, 1, 28, 28))"),
    ("models/lenet_train_test.prototxt", 'type: "Accuracy"', 'type: "Acuracy"',
     "models/lenet_train_test.prototxt:"),
])
def test_bad_config_is_one_located_line(workspace: Path, capsys: pytest.CaptureFixture[str],
                                        file: str, old: str, new: str, expected: str) -> None:
    edit(file, old, new)
    solver = "solvers/lenet_solver.prototxt" if file.endswith("prototxt") else \
        "solvers/lenet_solver.yaml"
    code, err = run(capsys, "train", "--solver", solver, *QUICK)
    assert code == 2, err
    assert "Traceback" not in err
    assert last_line(err).startswith("netforge: error: " + expected), last_line(err)


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "--solver", "solvers/nope.yaml"], "solvers/nope.yaml: solver file not found"),
    (["train", "--solver", "solvers/lenet_solver.yaml", "--snapshot", "a", "--weights", "b"],
     "give either --snapshot (resume) or --weights (fine-tune), not both"),
    (["train", "--solver", "solvers/lenet_solver.yaml", "--set", "base_lr=fast"],
     "--set base_lr=fast: base_lr must be a number, got 'fast'"),
    (["train", "--solver", "solvers/lenet_solver.yaml", "--snapshot", "missing.npz"],
     "missing.npz"),
    (["test", "--model", "models/lenet_train_test.yaml", "--weights", "w.npz"], "w.npz"),
    (["test", "--model", "models/lenet_train_test.yaml", "--weights", "w.npz", "--gpu"],
     "solver_mode GPU needs the GPU backend"),
    (["convert-mnist"], "give IMAGES LABELS OUT_DB, or exactly one of"),
])
def test_bad_arguments(workspace: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                       expected: str) -> None:
    code, err = run(capsys, *args)
    assert code == 2, err
    assert "Traceback" not in err
    assert expected in last_line(err), last_line(err)


def test_missing_data_source_is_located(workspace: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    edit("models/lenet_train_test.yaml", "data/mnist/mnist_test_lmdb", "data/mnist/nothing")
    code, err = run(capsys, "train", "--solver", "solvers/lenet_solver.yaml", *QUICK)
    assert code == 2
    assert "layer 'mnist' (Data)" in last_line(err) and "data/mnist/nothing" in last_line(err)


def test_console_entry_point_exit_code(workspace: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "netforge", "train", "--solver", "nope.yaml"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "netforge: error: nope.yaml: solver file not found"


# -- signals --------------------------------------------------------------------------------------


class FakeSolver:
    def __init__(self) -> None:
        self._stop = False
        self.snapshots = 0

    def request_stop(self) -> None:
        self._stop = True

    def request_snapshot(self) -> None:
        self.snapshots += 1


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="needs POSIX signals")
def test_signals_set_flags_and_are_restored() -> None:
    solver = FakeSolver()
    before = signal.getsignal(signal.SIGINT)
    restore = _install_signals(solver, "stop", "snapshot")
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert solver.snapshots == 1 and not solver._stop
        os.kill(os.getpid(), signal.SIGINT)
        assert solver._stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before


def test_bad_netforge_threads_is_one_line_and_exit_2(
        workspace: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from netforge.backend import threads

    monkeypatch.setattr(threads, "_shared", {})  # pools are made once per process
    monkeypatch.setenv("NETFORGE_THREADS", "two")
    code, err = run(capsys, "train", "--solver", "solvers/lenet_solver.yaml", *QUICK)
    assert code == 2
    assert last_line(err) == ("netforge: error: environment: NETFORGE_THREADS must be a positive "
                              "whole number of worker threads, got 'two'")
    monkeypatch.setenv("NETFORGE_THREADS", "1")
    code, err = run(capsys, "train", "--solver", "solvers/lenet_solver.yaml", *QUICK)
    assert code == 0, err
