"""The solver: Caffe's lr policies, update rules against hand-written references of Caffe's
formulas, iter_size, clipping, snapshots, bit-exact resume and seeding, and its checks."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from netforge import Solver
from netforge.backend import NumpyBackend
from netforge.data.datum import array_to_datum
from netforge.data.db import LmdbWriter
from netforge.errors import ConfigError
from netforge.proto import pb
from netforge.solver import learning_rate

F64 = NumpyBackend("float64")

# -- learning rate policies -----------------------------------------------------------------------

INV_TABLE = [(0, 0.01), (100, 0.00992565), (500, 0.00964069), (1000, 0.00931012),
             (5000, 0.00737788), (9900, 0.00596843), (10000, 0.00594604)]


def solver_param(text: str) -> pb.SolverParameter:
    sp = pb.SolverParameter()
    text_format.Parse(text, sp)
    return sp


@pytest.mark.parametrize(("it", "rate"), INV_TABLE)
def test_inv_policy_matches_caffe_lenet_log(it: int, rate: float) -> None:
    sp = solver_param('base_lr: 0.01 lr_policy: "inv" gamma: 0.0001 power: 0.75')
    assert f"{learning_rate(sp, it)[0]:.6g}" == f"{rate:.6g}"


def test_other_policies() -> None:
    def lr(text: str, it: int, step: int = 0) -> float:
        return learning_rate(solver_param("base_lr: 0.1 " + text), it, step)[0]

    assert lr('lr_policy: "fixed"', 1234) == pytest.approx(0.1)
    assert lr('lr_policy: "step" gamma: 0.5 stepsize: 10', 29) == pytest.approx(0.1 * 0.25)
    assert lr('lr_policy: "exp" gamma: 0.99', 7) == pytest.approx(0.1 * 0.99 ** 7)
    assert lr('lr_policy: "poly" power: 2 max_iter: 100', 25) == pytest.approx(0.1 * 0.75 ** 2)
    assert lr('lr_policy: "sigmoid" gamma: -0.1 stepsize: 50', 60) == pytest.approx(
        0.1 / (1 + math.exp(0.1 * 10)))


def test_multistep_advances_one_step_per_call_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    sp = solver_param('base_lr: 1 lr_policy: "multistep" gamma: 0.1 stepvalue: 3 stepvalue: 5')
    step, rates = 0, []
    with caplog.at_level(logging.INFO, logger="netforge"):
        for it in range(7):
            rate, step = learning_rate(sp, it, step)
            rates.append(rate)
    assert rates == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])
    assert [r.getMessage() for r in caplog.records] == [
        "MultiStep Status: Iteration 3, step = 1", "MultiStep Status: Iteration 5, step = 2"]


# -- the solver reference (Caffe's test_gradient_based_solver) ------------------------------------

N, D = 4, 6


def regression_data(n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)), rng.normal(size=(n, 1))


def least_squares(solver_text: str, net_extra: str = "") -> Solver:
    """InnerProduct(1 output) → EuclideanLoss on fixed Input data, in float64."""
    net = f"""
    layer {{ name: "input" type: "Input" top: "data" top: "targets"
            input_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} dim: 1 }} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            param {{ name: "weights" }} param {{ name: "bias" {net_extra} }}
            inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: 1 }}
                                  bias_filler {{ type: "gaussian" std: 1 }} }} }}
    layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "targets" top: "loss" }}
    """
    sp = solver_param(f"net_param {{ {net} }} lr_policy: 'fixed' random_seed: 1701 "
                      + solver_text)
    solver = Solver(sp, backend=F64, verbose=False)
    x, y = regression_data()
    solver.net.blobs["data"].data[...] = x
    solver.net.blobs["targets"].data[...] = y
    return solver


def reference_run(kind: str, sp: pb.SolverParameter, w: np.ndarray, b: np.ndarray,
                  iters: int, bias_decay: float = 1.0, bias_lr: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Caffe's update rules, written out for the two parameters of the regression."""
    x, y = regression_data()
    lr, m, wd, delta = sp.base_lr, sp.momentum, sp.weight_decay, sp.delta
    hist: dict[str, list[np.ndarray]] = {k: [np.zeros_like(v), np.zeros_like(v)]
                                         for k, v in (("w", w), ("b", b))}
    for t in range(iters):
        err = (x @ w.T + b - y) / N                       # d loss / d ip
        grads = {"w": err.T @ x, "b": err.sum(axis=0)}
        params = {"w": w, "b": b}
        for k in ("w", "b"):
            p = params[k]
            decay = wd * (bias_decay if k == "b" else 1.0)
            g = grads[k] + (decay * np.sign(p) if sp.regularization_type == "L1" else decay * p)
            rate = lr * (bias_lr if k == "b" else 1.0)
            h1, h2 = hist[k]
            if kind == "SGD":
                h1[...] = m * h1 + rate * g
                step = h1.copy()
            elif kind == "Nesterov":
                old = h1.copy()
                h1[...] = m * h1 + rate * g
                step = (1 + m) * h1 - m * old
            elif kind == "AdaGrad":
                h1 += g * g
                step = rate * g / (np.sqrt(h1) + delta)
            elif kind == "RMSProp":
                h1[...] = sp.rms_decay * h1 + (1 - sp.rms_decay) * g * g
                step = rate * g / (np.sqrt(h1) + delta)
            elif kind == "AdaDelta":
                h1[...] = m * h1 + (1 - m) * g * g
                u = g * np.sqrt((h2 + delta) / (h1 + delta))
                h2[...] = m * h2 + (1 - m) * u * u
                step = rate * u
            else:  # Adam
                h1[...] = m * h1 + (1 - m) * g
                h2[...] = sp.momentum2 * h2 + (1 - sp.momentum2) * g * g
                corr = math.sqrt(1 - sp.momentum2 ** (t + 1)) / (1 - m ** (t + 1))
                step = rate * corr * h1 / (np.sqrt(h2) + delta)
            p -= step
    return w, b


SOLVER_SETTINGS = {
    "SGD": "base_lr: 0.01 momentum: 0.9 weight_decay: 0.5",
    "Nesterov": "base_lr: 0.01 momentum: 0.9 weight_decay: 0.5",
    "AdaGrad": "base_lr: 0.01 weight_decay: 0.5 delta: 1e-6",
    "RMSProp": "base_lr: 0.01 weight_decay: 0.5 rms_decay: 0.95 delta: 1e-6",
    "AdaDelta": "base_lr: 1 momentum: 0.95 weight_decay: 0.5 delta: 1e-6",
    "Adam": "base_lr: 0.01 momentum: 0.9 momentum2: 0.999 weight_decay: 0.5 delta: 1e-8",
}


@pytest.mark.parametrize("kind", list(SOLVER_SETTINGS))
@pytest.mark.parametrize("iters", [1, 4, 10])
def test_update_rules_match_reference(kind: str, iters: int) -> None:
    text = f'type: "{kind}" ' + SOLVER_SETTINGS[kind]
    solver = least_squares(text)
    w0, b0 = (p.data.copy() for p in solver.net.params["ip"])
    solver.step(iters)
    w, b = reference_run(kind, solver.param, w0, b0, iters)
    np.testing.assert_allclose(solver.net.params["ip"][0].data, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solver.net.params["ip"][1].data, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", list(SOLVER_SETTINGS))
def test_diff_holds_the_update_value_after_a_step(kind: str) -> None:
    """Caffe's solvers leave each parameter's update value in its diff (SGD copies the
    history there) and Net::Update subtracts it from the data."""
    solver = least_squares(f'type: "{kind}" ' + SOLVER_SETTINGS[kind])
    solver.step(2)
    before = [p.data.copy() for p in solver.net.params["ip"]]
    solver.step(1)
    for p, old in zip(solver.net.params["ip"], before, strict=True):
        np.testing.assert_allclose(p.diff, old - p.data, rtol=1e-9, atol=1e-15)
        assert np.any(p.diff != 0)
    if kind == "SGD":
        for i, p in enumerate(solver.net.params["ip"]):
            np.testing.assert_array_equal(p.diff, solver.history[i])


EARLY_NET = """
layer { name: "input" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 3 dim: 10 dim: 10 } shape { dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" }
                            bias_filler { type: "gaussian" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip_a" type: "InnerProduct" bottom: "pool" top: "a"
        param { name: "shared" } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 64 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "a" }
layer { name: "ip_b" type: "InnerProduct" bottom: "a" top: "b"
        param { name: "shared" } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 64 weight_filler { type: "xavier" } } }
layer { name: "ip_out" type: "InnerProduct" bottom: "b" top: "out"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "label" top: "loss" }
"""


def early_solver(extra: str = "", workers: int = 2) -> Solver:
    """EARLY_NET (a weight shared by two InnerProduct layers: its gradient is final only
    after the first) on fixed inputs, SGD with momentum and decay, float32."""
    sp = solver_param(f"net_param {{ {EARLY_NET} }} base_lr: 0.1 momentum: 0.9 "
                      f"weight_decay: 0.01 lr_policy: 'step' stepsize: 2 gamma: 0.5 "
                      f"random_seed: 3 {extra}")
    backend = NumpyBackend("float32", workers=workers)
    backend.parallel_min = backend.compiled_min = 0  # split and compile even this small net
    solver = Solver(sp, backend=backend, verbose=False)
    rng = np.random.default_rng(4)
    solver.net.blobs["data"].data[...] = rng.normal(size=(8, 3, 10, 10))
    solver.net.blobs["label"].data[...] = rng.integers(0, 5, size=8)
    return solver


def test_a_solvers_arrays_start_on_cache_lines() -> None:
    """Every array a training step works on (blobs, params, history, layer buffers, pooling's
    argmax) starts on a 64-byte boundary, where NumPy's own large arrays start 16 bytes past
    one (numpy_backend.ALIGNMENT)."""
    solver = early_solver()
    solver.step(2)
    arrays = {f"blob {n}.{k}": getattr(b, k) for n, b in solver.net.blobs.items()
              for k in ("data", "diff")}
    arrays |= {f"history {i}": h for i, h in enumerate(solver.history)}
    for name, layer in zip(solver.net.layer_names, solver.net.layers, strict=True):
        arrays |= {f"{name} param {i}.{k}": getattr(b, k) for i, b in enumerate(layer.blobs)
                   for k in ("data", "diff")}
        arrays |= {f"{name} buffer {key}": a for key, a in vars(layer).get("_bufs", {}).items()}
        if getattr(layer, "_argmax", None) is not None:
            arrays[f"{name} argmax"] = layer._argmax
    assert any("buffer" in k for k in arrays) and any("argmax" in k for k in arrays)
    off = {k: a.ctypes.data % 64 for k, a in arrays.items() if a.size}
    assert off == dict.fromkeys(off, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_sgd_updates_a_param_as_soon_as_its_gradient_is_final(
        monkeypatch: pytest.MonkeyPatch, workers: int) -> None:
    """step() hands SGD's update of each param to the backend once backward has passed the
    first layer that uses it (a shared weight: the first of its two layers), so it runs beside
    the next layer's backward, or to an InnerProduct layer that alone uses a weight matrix, to
    update a block of rows at a time: the same bits as updating every param after backward."""
    from netforge.layers.inner_product import InnerProduct

    monkeypatch.setattr(InnerProduct, "UPDATE_MIN", 0)  # ip_out's 5 x 64 weights as well
    runs = []
    for early in (False, True):
        monkeypatch.setattr(Solver, "EARLY_UPDATE", early)
        solver = early_solver(workers=workers)
        later: list[Any] = []
        real = solver.backend.later

        def counted(task: Any, real: Any = real, later: list[Any] = later) -> None:
            later.append(task)
            real(task)

        monkeypatch.setattr(solver.backend, "later", counted)
        solver.step(5)
        # ip_out's weights (a matrix only ip_out uses) are updated by ip_out itself, a block of
        # rows at a time inside its backward (Layer.param_updates); the rest beside backward
        fused = solver.net.params["ip_out"][0].data
        handed = [task.__defaults__[0][0] for task in later]
        assert len(later) == (5 * (len(solver.params) - 1) if early else 0)
        assert not any(a is fused for a in handed)
        assert all(not layer.param_updates for layer in solver.net.layers)  # withdrawn
        runs.append([a.tobytes() for p, h in zip(solver.params, solver.history, strict=True)
                     for a in (p.blob.data, p.blob.diff, h)])
    assert runs[0] == runs[1]
    solver = early_solver(workers=workers)
    names = [f"{p.layer}[{p.index}]" for p in solver.params]
    assert names == ["conv[0]", "conv[1]", "ip_a[0]", "ip_a[1]", "ip_b[1]", "ip_out[0]",
                     "ip_out[1]"]
    layer = solver.net.layer_by_name
    assert solver.net.param_ready_at() == [layer["conv"]] * 2 + [layer["ip_a"]] * 2 + [
        layer["ip_b"], layer["ip_out"], layer["ip_out"]]


def test_updates_in_backward_keep_caffes_log_order(caplog: pytest.LogCaptureFixture) -> None:
    """With the updates made during backward, a multistep advance is still logged after the
    iteration's loss line and before its learning rate line, as Caffe logs them."""
    solver = early_solver("display: 1")
    solver.param.lr_policy, solver.param.gamma = "multistep", 0.5
    solver.param.stepvalue.extend([2])
    assert solver._update_when_ready() is not None
    solver._early = None
    with caplog.at_level(logging.INFO, logger="netforge"):
        solver.step(3)
    lines = [r.getMessage() for r in caplog.records]
    loss = next(i for i, m in enumerate(lines) if m.startswith("Iteration 2 (") and "loss" in m)
    status = lines.index("MultiStep Status: Iteration 2, step = 1")
    rate = next(i for i, m in enumerate(lines) if m.startswith("Iteration 2, lr = "))
    assert loss < status < rate
    assert lines[rate] == "Iteration 2, lr = 0.05"


@pytest.mark.parametrize("extra", ["iter_size: 2", "clip_gradients: 10",
                                   "regularization_type: 'L1'", "type: 'Nesterov'"])
def test_sgd_updates_after_backward_where_it_must(extra: str) -> None:
    """No updates during backward with iter_size > 1 (a gradient sums several passes),
    gradient clipping (it needs all of them), L1 decay or another solver type, or a net whose
    backward was wrapped (debug_info logs the gradients after it)."""
    solver = early_solver()
    assert solver._update_when_ready() is not None
    solver._early = None
    assert early_solver(extra)._update_when_ready() is None
    from netforge.guards import enable_debug_info

    enable_debug_info(solver)
    assert solver._update_when_ready() is None


def test_sgd_l1_and_multipliers() -> None:
    solver = least_squares('base_lr: 0.01 momentum: 0.5 weight_decay: 0.3 '
                           'regularization_type: "L1"', "lr_mult: 2 decay_mult: 0")
    w0, b0 = (p.data.copy() for p in solver.net.params["ip"])
    solver.step(3)
    w, b = reference_run("SGD", solver.param, w0, b0, 3, bias_decay=0.0, bias_lr=2.0)
    np.testing.assert_allclose(solver.net.params["ip"][0].data, w, rtol=1e-9)
    np.testing.assert_allclose(solver.net.params["ip"][1].data, b, rtol=1e-9)


def test_legacy_solver_type_enum() -> None:
    solver = least_squares("base_lr: 0.01 solver_type: NESTEROV momentum: 0.9")
    assert solver.type == "Nesterov"


# -- iter_size, clipping --------------------------------------------------------------------------


def float_db(path: Path, x: np.ndarray, y: np.ndarray) -> str:
    with LmdbWriter(path) as w:
        for i in range(len(x)):
            d = array_to_datum(x[i].reshape(D, 1, 1).astype(np.float32))
            d.label = 0
            w.put(b"%08d" % i, d.SerializeToString())
    return str(path)


def lmdb_regression(tmp_path: Path, batch: int, iter_size: int, solver: str = "SGD") -> Solver:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, D))
    path = tmp_path / f"db{batch}"
    db = str(path) if path.exists() else float_db(path, x, np.zeros(8))
    momentum = 0.0 if solver in ("AdaGrad", "RMSProp") else 0.9
    net = f"""
    layer {{ name: "data" type: "Data" top: "data" top: "label"
            data_param {{ source: "{db}" batch_size: {batch} }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
            inner_product_param {{ num_output: 2 weight_filler {{ type: "gaussian" }} }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
    """
    sp = solver_param(f"net_param {{ {net} }} lr_policy: 'fixed' base_lr: 0.1 "
                      f"momentum: {momentum} "
                      f"weight_decay: 0.01 random_seed: 5 iter_size: {iter_size} type: '{solver}'")
    return Solver(sp, backend=F64, verbose=False)


def test_iter_size_two_equals_one_double_batch(tmp_path: Path) -> None:
    big, small = lmdb_regression(tmp_path, 4, 1), lmdb_regression(tmp_path, 2, 2)
    try:
        for s in (big, small):
            s.step(3)
        for a, b in zip(big.net.params["ip"], small.net.params["ip"], strict=True):
            np.testing.assert_allclose(a.data, b.data, rtol=1e-12, atol=1e-14)
    finally:
        big.close()
        small.close()


def test_clip_gradients_scales_the_global_norm(caplog: pytest.LogCaptureFixture) -> None:
    solver = least_squares("base_lr: 1 clip_gradients: 0.001")
    solver.net.clear_param_diffs()
    solver.net.forward_backward()
    norm = math.sqrt(sum(float((p.blob.diff ** 2).sum()) for p in solver.params))
    assert norm > 0.001
    with caplog.at_level(logging.INFO, logger="netforge"):
        solver._clip_gradients()
    clipped = math.sqrt(sum(float((p.blob.diff ** 2).sum()) for p in solver.params))
    assert clipped == pytest.approx(0.001)
    assert "Gradient clipping: scaling down gradients (L2 norm" in caplog.text


# -- LeNet: seeding, snapshots, resume ------------------------------------------------------------

LENET_QUICK = ["max_iter=12", "test_iter=[2]", "test_interval=4", "display=2", "snapshot=0",
               "random_seed=1701", "snapshot_prefix=snaps/lenet"]


def lenet(*extra: str) -> Solver:
    return Solver("solvers/lenet_solver.yaml", overrides=[*LENET_QUICK, *extra], verbose=False)


def weights(solver: Solver) -> dict[str, list[np.ndarray]]:
    return {k: [a.copy() for a in v] for k, v in solver.net.weights().items()}


def assert_same(a: dict[str, list[np.ndarray]], b: dict[str, list[np.ndarray]]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        for x, y in zip(a[k], b[k], strict=True):
            np.testing.assert_array_equal(x, y)


def test_same_seed_same_weights_other_seed_differs(workspace: Path) -> None:
    runs = []
    for seed in (1701, 1701, 7):
        s = lenet(f"random_seed={seed}", "max_iter=5")
        s.solve()
        runs.append(weights(s))
        s.close()
    assert_same(runs[0], runs[1])
    assert not np.array_equal(runs[0]["conv1"][0], runs[2]["conv1"][0])


def test_resume_is_bit_exact(workspace: Path) -> None:
    straight = lenet()
    straight.solve()
    expected, expected_hist = weights(straight), [h.copy() for h in straight.history]
    straight.close()

    first = lenet("max_iter=6")
    first.solve()  # snapshot_after_train writes snaps/lenet_iter_6.*
    first.close()
    assert Path("snaps/lenet_iter_6.npz").exists()
    assert Path("snaps/lenet_iter_6.solverstate.npz").exists()
    resumed = lenet()
    resumed.solve("snaps/lenet_iter_6.solverstate.npz")
    assert resumed.iter == 12
    assert_same(weights(resumed), expected)
    for a, b in zip(resumed.history, expected_hist, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.last_test == straight.last_test
    resumed.close()


def test_test_nets_share_the_train_weights(workspace: Path) -> None:
    s = lenet()
    try:
        for name in ("conv1", "conv2", "ip1", "ip2"):
            assert s.test_nets[0].params[name][0] is s.net.params[name][0]
        assert s.test_nets[0].outputs == ["accuracy", "loss"]
    finally:
        s.close()


def test_snapshot_files_and_no_temporaries(workspace: Path) -> None:
    s = lenet("max_iter=4", "snapshot=2")
    s.solve()
    s.close()
    files = sorted(p.name for p in Path("snaps").iterdir())
    assert files == ["lenet_iter_2.npz", "lenet_iter_2.solverstate.npz",
                     "lenet_iter_4.npz", "lenet_iter_4.solverstate.npz"]
    with np.load("snaps/lenet_iter_4.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["conv1/0", "conv1/1", "conv2/0", "conv2/1",
                                   "ip1/0", "ip1/1", "ip2/0", "ip2/1"]


def test_fine_tune_copies_by_layer_name(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = lenet("max_iter=2")
    s.solve()
    s.close()
    with caplog.at_level(logging.INFO, logger="netforge"):
        t = Solver("solvers/lenet_solver.yaml", overrides=LENET_QUICK,
                   weights=["snaps/lenet_iter_2.npz"])
    np.testing.assert_array_equal(t.net.params["ip2"][0].data, weights(s)["ip2"][0])
    t.close()
    assert "Finetuning from snaps/lenet_iter_2.npz" in caplog.text
    assert "Loaded weights for 4 layer(s): conv1, conv2, ip1, ip2" in caplog.text


def test_restore_refuses_a_state_of_another_solver_type(workspace: Path) -> None:
    s = lenet("max_iter=2")
    s.solve()
    s.close()
    other = lenet("type=Adam")
    with pytest.raises(ConfigError, match="the solver state is for a SGD solver but this "
                                          "solver is Adam"):
        other.restore("snaps/lenet_iter_2.solverstate.npz")
    with pytest.raises(ConfigError, match="not a netforge solver-state file"):
        other.restore("snaps/lenet_iter_2.npz")
    other.close()


def test_display_and_test_lines(workspace: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="netforge"):
        s = lenet("max_iter=4", "average_loss=2")
        s.solve()
        s.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[lines.index("Solving LeNet") + 1] == "Learning Rate Policy: inv"
    assert "Iteration 0, Testing net (#0)" in lines
    assert any(line.startswith("    Test net output #0: accuracy = ") for line in lines)
    assert any(line.startswith("    Test net output #1: loss = ") and line.endswith(" loss)")
               for line in lines)
    assert any(line.startswith("Iteration 2 (") and "iter/s, " in line and "s/2 iters), loss = "
               in line for line in lines)
    assert "Iteration 2, lr = 0.0099985" in lines
    assert any(line.startswith("Iteration 4, loss = ") for line in lines)
    assert "Iteration 4, Testing net (#0)" in lines
    assert lines[-1] == "Optimization Done."


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "message"), [
    ("type: 'AdaGrad' momentum: 0.9", "momentum cannot be used with AdaGrad"),
    ("type: 'Adamm'", r"unknown solver type 'Adamm' .* \(did you mean 'Adam'\?\)"),
    ("lr_policy: 'invv'", r"unknown lr_policy 'invv' .* \(did you mean 'inv'\?\)"),
    ("lr_policy: 'step'", "lr_policy 'step' needs stepsize > 0"),
    ("test_iter: 3", "test_interval must be > 0 when there are test nets"),
    ("test_iter: 3 test_net_param { } test_net_param { } test_interval: 5",
     r"test_iter must be given once per test net \(2 test nets, 1 test_iter values\)"),
    ("solver_mode: GPU", "solver_mode GPU needs the GPU backend"),
])
def test_solver_settings_are_checked(text: str, message: str) -> None:
    net = ('layer { name: "d" type: "DummyData" top: "x" top: "y" dummy_data_param { '
           'shape { dim: 2 dim: 3 } } } layer { name: "l" type: "EuclideanLoss" bottom: "x" '
           'bottom: "y" top: "l" }')
    base = "base_lr: 0.1 " + ("" if "lr_policy" in text else "lr_policy: 'fixed' ")
    sp = solver_param(f"net_param {{ {net} }} " + base + text)
    with pytest.raises(ConfigError, match=message):
        Solver(sp, verbose=False)


def test_solver_file_errors_are_located(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("net: missing.yaml\nbase_lr: 0.1\nlr_policy: fixed\n")
    with pytest.raises(ConfigError, match=r"s.yaml:1:1: net file 'missing.yaml' not found"):
        Solver(p, verbose=False)
    p.write_text("net: missing.yaml\nbase_lr: 0.1\nlr_policy: fixd\n")
    with pytest.raises(ConfigError, match=r"s.yaml:3:1: unknown lr_policy 'fixd'"):
        Solver(p, verbose=False)
