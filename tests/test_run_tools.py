"""Run tooling: parse-log, the JSONL metrics stream, plot, draw, the NaN guard, debug_info and
device-query, on short real LeNet runs in the ``workspace`` fixture."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from netforge.cli import main
from netforge.data.mnist import write_image_db
from netforge.draw import net_to_dot
from netforge.metrics import parse_log
from netforge.proto import pb
from netforge.snapshot import read_weights
from tests.conftest import ROOT, synthetic_digits

QUICK = ["--set", "max_iter=6", "--set", "test_iter=[2]", "--set", "test_interval=3",
         "--set", "display=2", "--set", "random_seed=1", "--set", "snapshot=0",
         "--set", "snapshot_after_train=false"]


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real 6-iteration LeNet run (display every 2, test every 3) for the module, in a
    folder laid out like the ``workspace`` fixture's."""
    root = tmp_path_factory.mktemp("trained")
    for sub in ("models", "solvers"):
        shutil.copytree(ROOT / sub, root / sub)
    for name, n, seed in (("mnist_train_lmdb", 128, 1), ("mnist_test_lmdb", 100, 2)):
        images, labels = synthetic_digits(n, seed)
        write_image_db(images, labels, root / "data" / "mnist" / name)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["train", "--solver", "solvers/lenet_solver.yaml", *QUICK,
                     "--no-progress", "--log", "logs/lenet.log"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return root / "logs"


@pytest.fixture
def trained(trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The module's training log and metrics stream, copied into a fresh working folder."""
    shutil.copytree(trained_run, tmp_path / "logs")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "logs" / "lenet.log"


def read_csv(path: Path, delimiter: str = ",") -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


# -- parse-log ------------------------------------------------------------------------------------


def test_parse_log_tables(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "parse-log", str(trained), "tables")
    assert code == 0, err
    # the final "Iteration 6, loss = ..." pass has no output lines: no row (as parse_log.py)
    assert "tables/lenet.log.train: 3 rows" in out
    train = read_csv(Path("tables/lenet.log.train"))
    test = read_csv(Path("tables/lenet.log.test"))
    assert train[0] == ["NumIters", "Seconds", "LearningRate", "loss"]
    assert [int(r[0]) for r in train[1:]] == [0, 2, 4]
    assert test[0] == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert [int(r[0]) for r in test[1:]] == [0, 3, 6]
    seconds = [float(r[1]) for r in train[1:]]
    assert seconds == sorted(seconds) and 0 <= seconds[0] < 60
    # parse_log.py: each row carries the lr logged before it; row 0 copies row 1's.
    lrs = [float(r[2]) for r in train[1:]]
    assert lrs[0] == lrs[1] == pytest.approx(0.01)
    assert 0.0099 < lrs[2] < 0.01
    assert all(0 <= float(r[3]) <= 1 for r in test[1:])

    code, _, err = run(capsys, "parse-log", str(trained), "--delimiter", ";")
    assert code == 0, err
    assert read_csv(trained.parent / "lenet.log.train", ";")[0][3] == "loss"


def test_parse_log_reads_a_caffe_log(tmp_path: Path) -> None:
    """A log as Caffe writes it (from the reference's key lines), including the lr after the
    outputs, a MultiStep line and a blank line that crashes parse_log.py."""
    log = tmp_path / "caffe.INFO"
    log.write_text(
        "Log file created at: 2024/12/31 23:59:00\n"
        "I1231 23:59:58.000000  655 solver.cpp:289] Solving LeNet\n"
        "I1231 23:59:58.000000  655 solver.cpp:290] Learning Rate Policy: inv\n"
        "I1231 23:59:58.100000  655 solver.cpp:347] Iteration 0, Testing net (#0)\n"
        "I1231 23:59:58.500000  655 solver.cpp:414]     Test net output #0: accuracy = 0.1031\n"
        "I1231 23:59:58.500000  655 solver.cpp:414]     Test net output #1: loss = 2.30259 "
        "(* 1 = 2.30259 loss)\n"
        "I1231 23:59:58.600000  655 solver.cpp:239] Iteration 0 (0 iter/s, 0.05s/100 iters), "
        "loss = 2.30259\n"
        "I1231 23:59:58.600000  655 solver.cpp:258]     Train net output #0: loss = 2.30259 "
        "(* 1 = 2.30259 loss)\n"
        "I1231 23:59:58.600000  655 sgd_solver.cpp:112] Iteration 0, lr = 0.01\n"
        "\n"
        "I0101 00:00:01.000000  655 sgd_solver.cpp:46] MultiStep Status: Iteration 100, "
        "step = 1\n"
        "I0101 00:00:01.000000  655 solver.cpp:239] Iteration 100 (215.3 iter/s, 0.464s/100 "
        "iters), loss = 0.2604\n"
        "I0101 00:00:01.000000  655 solver.cpp:258]     Train net output #0: loss = 0.2604 "
        "(* 1 = 0.2604 loss)\n"
        "I0101 00:00:01.000000  655 sgd_solver.cpp:112] Iteration 100, lr = 0.00992565\n")
    train, test = parse_log(log)
    assert [r["NumIters"] for r in train] == [0, 100]
    assert train[1]["Seconds"] == pytest.approx(3.0)  # across the new year
    assert train[1]["LearningRate"] == pytest.approx(0.01)  # the lr before this row
    assert train[0]["LearningRate"] == train[1]["LearningRate"]
    assert list(test[0]) == ["NumIters", "Seconds", "LearningRate", "accuracy", "loss"]
    assert test[0]["accuracy"] == pytest.approx(0.1031)
    assert test[0]["Seconds"] == pytest.approx(0.5)


def test_parse_log_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "parse-log", str(tmp_path / "nope.log"))
    assert code == 2
    assert "nope.log: log file not found" in err


# -- the JSONL stream -----------------------------------------------------------------------------


def test_jsonl_metrics_stream(trained: Path) -> None:
    lines = [json.loads(s) for s in trained.with_suffix(".jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "start" and lines[0]["format"] == "netforge-metrics-1"
    assert lines[0]["net"] == "LeNet"
    train = [o for o in lines if o["type"] == "train"]
    test = [o for o in lines if o["type"] == "test"]
    assert [o["iteration"] for o in train] == [0, 2, 4, 6]
    assert [o["iteration"] for o in test] == [0, 3, 6]
    first = train[0]
    assert set(first) == {"type", "iteration", "seconds", "lr", "loss", "outputs"}
    assert first["lr"] == pytest.approx(0.01)
    assert first["loss"] == pytest.approx(first["outputs"]["loss"], rel=1e-5)
    assert train[-1]["lr"] is None  # the final forward-only pass has no lr line
    assert [o["seconds"] for o in train] == sorted(o["seconds"] for o in train)
    t = test[0]
    assert t["net"] == 0 and set(t["outputs"]) == {"accuracy", "loss"}
    assert t["loss_outputs"] == ["loss"]
    assert 0 <= t["outputs"]["accuracy"] <= 1


# -- plot -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["log", "jsonl"])
def test_plot_png(trained: Path, capsys: pytest.CaptureFixture[str], source: str) -> None:
    pytest.importorskip("matplotlib")
    src = trained if source == "log" else trained.with_suffix(".jsonl")
    code, _, err = run(capsys, "plot", str(src), "curves.png")
    assert code == 0, err
    data = Path("curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 800 and height > 600 and len(data) > 10_000
    code, _, err = run(capsys, "plot", str(src), "lr.png", "--what", "lr")
    assert code == 0, err
    assert Path("lr.png").stat().st_size < len(data)


def test_plot_errors(trained: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run(capsys, "plot", str(trained), "x.png", "--what", "loss,speed")
    assert code == 2 and "--what takes" in err
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code, _, err = run(capsys, "plot", str(trained), "x.png")
    assert code == 2
    assert "pip install netforge[plot]" in err
    assert not Path("x.png").exists()


# -- draw -----------------------------------------------------------------------------------------


def test_draw_dot(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "draw", "models/lenet_train_test.prototxt", "lenet.dot",
                       "--phase", "TRAIN", "--rankdir", "TB")
    assert code == 0, err
    dot = Path("lenet.dot").read_text()
    assert dot.startswith('digraph "LeNet" {') and "rankdir=TB;" in dot
    assert re.search(r'"layer_\d+_conv1" \[label="conv1\\n\(Convolution\)\\nnum_output: 20\\n'
                     r'kernel size: 5\\nstride: 1\\npad: 0", shape=box', dot)
    assert '(Pooling MAX)' in dot and 'fillcolor="#FF5050"' in dot
    assert '"blob_data" [label="data", shape=octagon' in dot
    assert re.search(r'"layer_\d+_mnist" -> "blob_data" \[label="Batch 64"\];', dot)
    assert re.search(r'"blob_conv1" -> "layer_\d+_pool1";', dot)
    # relu1 works in place on ip1: a green box between ip1 and ip2, no cycle, no second blob
    relu = re.search(r'"(layer_\d+_relu1)" \[label="relu1\\n\(ReLU\)".*fillcolor="#90EE90"', dot)
    assert relu
    assert f'"blob_ip1" -> "{relu.group(1)}";' in dot
    assert re.search(rf'"{relu.group(1)}" -> "layer_\d+_ip2" \[label="ip1"\];', dot)
    assert dot.count('[label="ip1", shape=octagon') == 1
    assert "accuracy" not in dot  # a TEST-only layer
    code, _, err = run(capsys, "draw", "models/lenet_train_test.yaml", "all.dot")
    assert code == 0, err
    assert "Batch 100" in Path("all.dot").read_text()  # phase ALL: the TEST data layer too


def test_draw_from_protobuf_api() -> None:
    """A net built with the protobuf API (Caffe's field names), with a two-top in-place use."""
    net = pb.NetParameter()
    text_format.Parse("""
        name: "tiny"
        input: "x"
        layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
                inner_product_param { num_output: 3 } }
        layer { name: "drop" type: "Dropout" bottom: "y" top: "y"
                dropout_param { dropout_ratio: 0.25 } }
        layer { name: "out" type: "Softmax" bottom: "y" top: "p" }
    """, net)
    dot = net_to_dot(net, "BT")
    assert '"blob_x" [label="x", shape=octagon' in dot
    assert '"layer_0_ip" -> "blob_y" [label="3"];' in dot
    assert '"layer_1_drop" [label="drop\\n(Dropout)\\nratio: 0.25"' in dot
    assert '"layer_1_drop" -> "layer_2_out" [label="y"];' in dot


def test_draw_svg_needs_graphviz(workspace: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(workspace))  # no `dot` here
    code, _, err = run(capsys, "draw", "models/lenet_train_test.yaml", "lenet.png")
    assert code == 2
    assert "install Graphviz" in err and "write a .dot file" in err
    code, _, err = run(capsys, "draw", "models/lenet_train_test.yaml", "lenet.jpg")
    assert code == 2 and "cannot write '.jpg' files" in err


# -- NaN guard ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_guard_stops_with_last_good_weights(workspace: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--solver", "solvers/lenet_solver.yaml", *QUICK,
                       "--set", "base_lr=1e6", "--set", "max_iter=50", "--set", "test_interval=100",
                       "--log", "logs/diverge.log")
    assert code == 1, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("netforge: error: NaN guard: "), line
    m = re.search(r"wrote the last good weights \(iteration (\d+)\) to (\S+\.last_good\.npz)",
                  line)
    assert m, line
    good_iter, path = int(m.group(1)), m.group(2)
    assert re.search(rf"iteration {good_iter}\b", line)  # names the iteration that broke
    assert re.search(r"(param blob \d+ of layer '\w+'|top is blob '\w+' of layer '\w+')", line)
    assert Path(path).name == f"lenet_iter_{good_iter}.last_good.npz"
    weights = read_weights(path)
    assert set(weights) == {"conv1", "conv2", "ip1", "ip2"}
    assert all(np.isfinite(a).all() for blobs in weights.values() for a in blobs)
    assert "Optimization Done." not in err
    # the snapshot is loadable: fine-tune from it
    code, _, err = run(capsys, "test", "--model", "models/lenet_train_test.yaml",
                       "--weights", path, "--iterations", "1")
    assert code == 0, err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_guard_names_a_bad_param(workspace: Path) -> None:
    from netforge.guards import NonFiniteError, install_nan_guard
    from netforge.solver import Solver

    solver = Solver("solvers/lenet_solver.yaml", overrides=["max_iter=5", "test_interval=0",
                                                            "test_iter=[]", "display=0"],
                    verbose=False)
    try:
        guard = install_nan_guard(solver)
        solver.step(2)
        assert guard.good_iter == 2
        bias = solver.net.params["ip2"][1].data
        bias[3] = np.inf  # as if the update of iteration 1 had produced it
        with pytest.raises(NonFiniteError) as e:
            guard(solver)
        msg = str(e.value)
        assert msg.startswith("NaN guard: param blob 1 of layer 'ip2' became non-finite "
                              "(1 inf of 10 values) in the update of iteration 1"), msg
        assert "wrote the last good weights (iteration 2)" not in msg  # stale copy: iter 2 is
        bias[3] = 0.0                                                  # the current state
        guard._save_good()
        bias[3] = np.nan  # now the next forward has a NaN loss
        with pytest.raises(NonFiniteError) as e:
            solver.step(1)
    finally:
        solver.close()
    msg = str(e.value)
    assert "the loss of iteration 2 is nan; the first non-finite top is blob 'ip2' of layer " \
           "'ip2' (InnerProduct; 64 NaN of 640 values)" in msg, msg
    assert "wrote the last good weights (iteration 2) to snapshots/lenet_iter_2.last_good.npz" \
        in msg
    saved = read_weights("snapshots/lenet_iter_2.last_good.npz")
    assert saved["ip2"][1][3] == 0 and np.isfinite(saved["ip2"][1]).all()  # the good copy


def test_no_nan_guard(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--solver", "solvers/lenet_solver.yaml", *QUICK,
                       "--no-nan-guard", "--no-metrics", "--set", "max_iter=2",
                       "--log", "logs/plain.log")
    assert code == 0, err
    assert not Path("logs/plain.jsonl").exists()


# -- debug_info -----------------------------------------------------------------------------------


def test_debug_info_lines(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "train", "--solver", "solvers/lenet_solver.yaml", *QUICK,
                       "--set", "max_iter=3", "--debug-info", "--log", "logs/debug.log")
    assert code == 0, err
    fwd = re.findall(r"\] {5}\[Forward\] Layer (\S+), top blob (\S+) data: (\S+)", err)
    assert ("conv1", "conv1") in [(a, b) for a, b, _ in fwd]
    assert ("relu1", "ip1") in [(a, b) for a, b, _ in fwd]
    assert re.search(r"\[Forward\] Layer conv1, param blob 0 data: [0-9.e-]+", err)
    assert re.search(r"\[Backward\] Layer conv2, bottom blob pool1 diff: [0-9.e-]+", err)
    assert re.search(r"\[Backward\] Layer ip1, param blob 1 diff: [0-9.e-]+", err)
    assert "bottom blob data diff" not in err  # the data layer needs no backward
    assert re.search(r"E\d{4} .*\[Backward\] All net params \(data, diff\): L1 norm = "
                     r"\(\S+, \S+\); L2 norm = \(\S+, \S+\)", err)
    # on display iterations only (0 and 2 of 0..2): once per layer top each
    assert sum(1 for a, b, _ in fwd if (a, b) == ("conv1", "conv1")) == 2
    # not in the test nets
    assert not re.search(r"\[Forward\] Layer accuracy", err)


# -- device-query ---------------------------------------------------------------------------------


def test_device_query(capsys: pytest.CaptureFixture[str]) -> None:
    from netforge.backend import kernels

    code, out, err = run(capsys, "device-query")
    assert code == 0, err
    labels = [line.split(":", 1)[0] for line in out.splitlines() if line[:1] != " "]
    for label in ("CPU", "Cores", "NumPy", "BLAS", "Compiled kernels", "CPU workers", "GPU"):
        assert label in labels or any(lbl.startswith(label) for lbl in labels), out
    assert f"NumPy:            {np.__version__}" in out
    assert ("numba (active)" in out) == kernels.AVAILABLE
    from netforge.backend.threads import shared_pool
    assert "CPU workers:" in out and f" {shared_pool().workers} " in out
    try:
        import cupy  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        assert "no GPU backend" in out
