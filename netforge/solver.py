"""Solver: Caffe's training loop, learning-rate policies and update rules.

One iteration (Solver::Step + SGDSolver::ApplyUpdate), in Caffe's order:
zero the param diffs → test if due → forward/backward ``iter_size`` times and average the
loss → smooth and display it → lr = policy(iter) → clip gradients → per param: divide by
iter_size, add weight decay, compute the update → data −= diff → iter += 1 → snapshot if due.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from netforge import caffe_io
from netforge.backend import get_backend
from netforge.backend.base import Backend
from netforge.config import SourceMap, apply_overrides, load_net_param, load_solver_param
from netforge.errors import ConfigError, did_you_mean
from netforge.log import fmt
from netforge.net import Net, ParamInfo
from netforge.proto import pb
from netforge.snapshot import read_state, read_weights, write_state

log = logging.getLogger("netforge")

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid", "cosine")
SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
_LEGACY_TYPES = {pb.SolverParameter.SGD: "SGD", pb.SolverParameter.NESTEROV: "Nesterov",
                 pb.SolverParameter.ADAGRAD: "AdaGrad", pb.SolverParameter.RMSPROP: "RMSProp",
                 pb.SolverParameter.ADADELTA: "AdaDelta", pb.SolverParameter.ADAM: "Adam"}


def learning_rate(sp: pb.SolverParameter, it: int, current_step: int = 0,
                  announce: bool = True) -> tuple[float, int]:
    """(rate, current_step) after ``it`` updates: SGDSolver::GetLearningRate, plus netforge's
    ``cosine`` policy and linear warm-up (``warmup_iter``). ``announce``: log multistep's
    advances, as Caffe does."""
    rate, current_step = _policy_rate(sp, it, current_step, announce)
    if it < sp.warmup_iter:
        start = sp.warmup_start_factor
        rate *= start + (1.0 - start) * it / sp.warmup_iter
    return rate, current_step


def _policy_rate(sp: pb.SolverParameter, it: int, current_step: int,
                 announce: bool) -> tuple[float, int]:
    policy = sp.lr_policy
    base = sp.base_lr
    if policy == "fixed":
        return base, current_step
    if policy == "step":
        step = it // sp.stepsize
        return base * sp.gamma ** step, step
    if policy == "exp":
        return base * sp.gamma ** it, current_step
    if policy == "inv":
        return base * (1.0 + sp.gamma * it) ** (-sp.power), current_step
    if policy == "multistep":
        if current_step < len(sp.stepvalue) and it >= sp.stepvalue[current_step]:
            current_step += 1
            if announce:
                log.info("MultiStep Status: Iteration %d, step = %d", it, current_step)
        return base * sp.gamma ** current_step, current_step
    if policy == "poly":
        return base * (1.0 - it / sp.max_iter) ** sp.power, current_step
    if policy == "sigmoid":
        return base * (1.0 / (1.0 + math.exp(-sp.gamma * (it - sp.stepsize)))), current_step
    if policy == "cosine":
        t = min(it, sp.max_iter) / sp.max_iter
        return sp.min_lr + (base - sp.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t)), current_step
    raise ConfigError(f"unknown learning rate policy '{policy}'")


def solver_type(sp: pb.SolverParameter, smap: SourceMap | None = None) -> str:
    if sp.HasField("solver_type"):
        if sp.HasField("type"):
            raise ConfigError("set either 'type' or the deprecated 'solver_type', not both",
                              smap.where(("solver_type",)) if smap else None)
        return _LEGACY_TYPES[sp.solver_type]
    if sp.type not in SOLVER_TYPES:
        raise ConfigError(f"unknown solver type '{sp.type}' (known: {', '.join(SOLVER_TYPES)})",
                          smap.where(("type",)) if smap else None,
                          did_you_mean(sp.type, SOLVER_TYPES))
    return sp.type


def validate(sp: pb.SolverParameter, smap: SourceMap | None = None) -> str:
    """Check a solver's settings; returns its type name."""
    def where(key: str) -> str | None:
        return smap.where((key,)) if smap else None

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(msg, where(key))

    kind = solver_type(sp, smap)
    sources = [k for k in ("net", "net_param", "train_net", "train_net_param") if sp.HasField(k)]
    need(len(sources) == 1, sources[1] if len(sources) > 1 else "net",
         "give exactly one train net: net, net_param, train_net or train_net_param"
         + (f" (found {', '.join(sources)})" if sources else ""))
    need(sp.HasField("lr_policy"), "lr_policy",
         f"lr_policy is required (one of {', '.join(LR_POLICIES)})")
    if sp.lr_policy not in LR_POLICIES:
        raise ConfigError(f"unknown lr_policy '{sp.lr_policy}' (known: {', '.join(LR_POLICIES)})",
                          where("lr_policy"), did_you_mean(sp.lr_policy, LR_POLICIES))
    need(sp.HasField("base_lr"), "base_lr", "base_lr is required")
    need(sp.max_iter >= 0, "max_iter", "max_iter must be ≥ 0")
    if sp.lr_policy == "step":
        need(sp.stepsize > 0, "stepsize", "lr_policy 'step' needs stepsize > 0")
        need(sp.gamma >= 0, "gamma", "lr_policy 'step' needs gamma ≥ 0")
    if sp.lr_policy == "multistep":
        steps = list(sp.stepvalue)
        need(bool(steps), "stepvalue", "lr_policy 'multistep' needs stepvalue entries")
        need(steps == sorted(steps), "stepvalue", "stepvalue entries must increase")
    if sp.lr_policy in ("poly", "cosine"):
        need(sp.max_iter > 0, "max_iter", f"lr_policy '{sp.lr_policy}' needs max_iter > 0")
    need(sp.warmup_iter >= 0, "warmup_iter", "warmup_iter must be ≥ 0")
    need(0 <= sp.warmup_start_factor <= 1, "warmup_start_factor",
         "warmup_start_factor must be in [0, 1]")
    if sp.HasField("early_stop"):
        es = sp.early_stop
        need(bool(es.output), "early_stop", "early_stop needs 'output' (a test net output, "
             "e.g. accuracy or loss)")
        need(es.patience >= 1, "early_stop", "early_stop.patience must be ≥ 1")
        need(es.min_delta >= 0, "early_stop", "early_stop.min_delta must be ≥ 0")
    need(sp.iter_size >= 1, "iter_size", "iter_size must be ≥ 1")
    need(sp.average_loss >= 1, "average_loss", "average_loss must be ≥ 1")
    need(sp.regularization_type in ("L1", "L2"), "regularization_type",
         f"unknown regularization_type '{sp.regularization_type}' (L1 or L2)")
    if kind in ("AdaGrad", "RMSProp"):
        need(sp.momentum == 0, "momentum", f"momentum cannot be used with {kind}")
    if kind == "RMSProp":
        need(0 <= sp.rms_decay < 1, "rms_decay", "rms_decay must be in [0, 1)")
    need(sp.display >= 0, "display", "display must be ≥ 0")
    need(sp.snapshot >= 0, "snapshot", "snapshot must be ≥ 0")
    return kind


def snapshot_prefix(sp: pb.SolverParameter, solver_path: str | os.PathLike[str] | None) -> str:
    """Caffe's rule: an unset snapshot_prefix is the solver file's path without its extension;
    a prefix naming a folder (ending in '/') gets the solver file's stem inside it."""
    prefix = sp.snapshot_prefix
    stem = Path(solver_path).with_suffix("") if solver_path is not None else Path("netforge")
    if not prefix:
        return str(stem)
    if prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        return str(Path(prefix) / stem.name)
    return prefix


class Solver:
    """Trains a net from a solver file, like pycaffe's ``caffe.get_solver``::

        solver = Solver("solvers/lenet_solver.yaml")
        solver.step(100)          # 100 iterations
        solver.solve()            # to max_iter, with tests, display and snapshots
        solver.net, solver.test_nets[0]
    """

    def __init__(self, solver: str | os.PathLike[str] | pb.SolverParameter, *,
                 backend: Backend | None = None, level: int = 0,
                 stages: tuple[str, ...] = (), weights: list[str] | None = None,
                 overrides: tuple[str, ...] | list[str] = (), source: SourceMap | None = None,
                 path: str | os.PathLike[str] | None = None, verbose: bool = True):
        if isinstance(solver, pb.SolverParameter):
            self.param, self.source = solver, source
            self.path: Path | None = Path(path) if path is not None else None
        else:
            self.param, self.source = load_solver_param(solver)
            self.path = Path(solver)
        sp = self.param
        for key, old, new in apply_overrides(sp, list(overrides)):
            log.info("Override: %s = %s (was %s)", key, new, old)
        self.type = validate(sp, self.source)
        log.info("Initializing solver from parameters: %s",
                 text_format.MessageToString(sp, as_one_line=True))
        self.backend = backend or self._backend()
        seed = sp.random_seed if sp.random_seed >= 0 else None
        self.rng = np.random.default_rng(seed)
        self.verbose = verbose

        self.net = self._make_net(pb.TRAIN, sp.train_state if sp.HasField("train_state") else None,
                                  level, stages)
        self.test_nets: list[Net] = []
        self._init_test_nets()
        self.params: list[ParamInfo] = self.net.learnable_params
        n_hist = 2 if self.type in ("AdaDelta", "Adam") else 1
        self.history = [self.backend.zeros(p.blob.shape) for _ in range(n_hist)
                        for p in self.params]
        self.iter = 0
        self.current_step = 0
        self.losses: deque[float] = deque(maxlen=sp.average_loss)
        self.smoothed_loss = 0.0
        self._stop = False
        self._snapshot_now = False
        self.on_iteration: list[Any] = []
        self.last_test: list[dict[str, float]] = []
        self._scratch: list[Any] = []
        self._early: tuple[float, set[int]] | None = None  # step(): updates made in backward
        self._offered: list[Any] = []  # layers given param_updates for this step's backward
        # params only one layer uses, which it updates in its backward (Layer.takes_param_update)
        self._only_user: dict[int, tuple[Any, int]] | None = None
        self._ready_at: dict[int, list[int]] | None = None
        self.early_stop = EarlyStop.from_param(sp, self.test_nets, self.source)
        for w in weights if weights is not None else list(sp.weights):
            for path in w.split(","):
                self.load_weights(path)
        log.info("Solver scaffolding done.")

    def _backend(self) -> Backend:
        """solver_mode GPU → the GPU backend (or a located error); unset → CPU (Caffe's
        default is GPU, which would make every file without the line fail on a laptop)."""
        sp = self.param
        gpu = sp.HasField("solver_mode") and sp.solver_mode == pb.SolverParameter.GPU
        try:
            return get_backend("GPU" if gpu else "CPU", device_id=sp.device_id)
        except ConfigError as e:
            if e.where is not None:  # already located (the environment)
                raise
            where = self.source.where(("solver_mode",)) if self.source else None
            raise ConfigError(e.message, where, e.hint) from None

    # -- nets -------------------------------------------------------------------------------------
    def _net_file(self, name: str) -> str:
        if os.path.exists(name) or self.path is None:
            return name
        alt = self.path.parent / name
        return str(alt) if alt.exists() else name

    def _net_source(self, which: str) -> tuple[pb.NetParameter, SourceMap | None, str | None]:
        sp = self.param
        file_key = {"net": "net", "train_net": "train_net"}.get(which)
        if file_key is not None:
            path = self._net_file(getattr(sp, file_key))
            if not os.path.exists(path):
                raise ConfigError(f"net file '{getattr(sp, file_key)}' not found",
                                  self.source.where((file_key,)) if self.source else None)
            param, smap = load_net_param(path)
            return param, smap, path
        return getattr(sp, which), self.source, None

    def _make_net(self, phase: int, state: pb.NetState | None, level: int = 0,
                  stages: tuple[str, ...] = (), which: str | None = None,
                  index: int = 0) -> Net:
        sp = self.param
        if which is None:
            which = next(k for k in ("net", "net_param", "train_net", "train_net_param")
                         if sp.HasField(k))
        if which == "test_net":
            path = self._net_file(sp.test_net[index])
            param, smap = load_net_param(path)
            origin: str | None = path
        elif which == "test_net_param":
            param, smap, origin = sp.test_net_param[index], self.source, None
        else:
            param, smap, origin = self._net_source(which)
        if origin:
            log.info("Creating %s net from net file: %s",
                     "training" if phase == pb.TRAIN else f"test (#{index})", origin)
        return Net(param, phase, level=level, stages=stages, state=state, backend=self.backend,
                   rng=self.rng, source=smap,
                   base_dir=Path(origin).parent if origin else None, verbose=self.verbose)

    def _init_test_nets(self) -> None:
        sp = self.param
        specs: list[tuple[str, int]] = [("test_net_param", i)
                                        for i in range(len(sp.test_net_param))]
        specs += [("test_net", i) for i in range(len(sp.test_net))]
        generic = next((k for k in ("net", "net_param") if sp.HasField(k)), None)
        if generic is not None:
            specs += [(generic, i) for i in range(len(sp.test_iter) - len(specs))]
        where = self.source.where(("test_iter",)) if self.source else None
        if len(sp.test_iter) != len(specs):
            raise ConfigError(f"test_iter must be given once per test net ({len(specs)} test "
                              f"nets, {len(sp.test_iter)} test_iter values)", where)
        if sp.test_state and len(sp.test_state) != len(specs):
            raise ConfigError(f"test_state must be unset or given once per test net "
                              f"({len(specs)} test nets)", where)
        if specs and sp.test_interval <= 0:
            raise ConfigError("test_interval must be > 0 when there are test nets",
                              self.source.where(("test_interval",)) if self.source else None)
        for k, (which, i) in enumerate(specs):
            state = sp.test_state[k] if sp.test_state else None
            net = self._make_net(pb.TEST, state, which=which, index=i if which.startswith("test")
                                 else k)
            net.share_trained_layers_with(self.net)
            self.test_nets.append(net)

    def load_weights(self, path: str) -> None:
        """Fine-tune: copy weights by layer name into the train net (test nets share them)."""
        log.info("Finetuning from %s", path)
        source = caffe_io.read_any_weights(path, [self.net, *self.test_nets])
        loaded, ignored = self.net.load_weights(source, path)
        for net in self.test_nets:
            net.load_weights({k: v for k, v in source.items() if k not in self.net.layer_by_name},
                             path)
        log.info("Loaded weights for %d layer(s): %s", len(loaded), ", ".join(loaded) or "none")
        if ignored:
            log.info("Skipped %d layer(s) not in the net: %s", len(ignored), ", ".join(ignored))
        untouched = [n for n in self.net.params if n not in loaded]
        if untouched:
            log.info("Initialized from fillers (not in the weights): %s", ", ".join(untouched))

    # -- the loop ---------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop = True

    def request_snapshot(self) -> None:
        self._snapshot_now = True

    def step(self, iters: int) -> None:
        sp = self.param
        start_iter = self.iter
        stop_iter = self.iter + iters
        self.losses.clear()
        last_time = time.perf_counter()
        last_iter = self.iter
        while self.iter < stop_iter and not self._stop:
            self.net.clear_param_diffs()
            if sp.test_interval and self.iter % sp.test_interval == 0 and \
                    (self.iter > 0 or sp.test_initialization):
                self.test_all()
                if self._stop:
                    break
            display = sp.display > 0 and self.iter % sp.display == 0
            loss = 0.0
            ready = self._update_when_ready()
            try:
                for _ in range(sp.iter_size):
                    loss += self.net.forward_backward(*(() if ready is None else (ready,)))
            except BaseException:
                self._early = None
                raise
            finally:
                if ready is not None:  # nothing left waiting for a later job
                    self._withdraw_updates()
                    self.backend.finish_later()
            loss /= sp.iter_size
            self._smooth(loss)
            if display:
                now = time.perf_counter()
                lapse = now - last_time
                per_s = (self.iter - last_iter) / lapse if lapse > 0 else 0.0
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter,
                         fmt(per_s), fmt(lapse), sp.display, fmt(self.smoothed_loss))
                last_time, last_iter = now, self.iter
                self._log_outputs(self.net, "Train", {n: self.net.blobs[n].data
                                                      for n in self.net.outputs})
            self.apply_update(display)
            self.iter += 1
            for callback in self.on_iteration:
                callback(self)
            if (sp.snapshot and self.iter % sp.snapshot == 0) or self._snapshot_now:
                self._snapshot_now = False
                self.snapshot()
        del start_iter

    def _smooth(self, loss: float) -> None:
        self.losses.append(loss)
        self.smoothed_loss = sum(self.losses) / len(self.losses)

    def solve(self, resume_file: str | os.PathLike[str] | None = None) -> None:
        sp = self.param
        log.info("Solving %s", self.net.name)
        log.info("Learning Rate Policy: %s", sp.lr_policy)
        if resume_file is not None:
            self.restore(resume_file)
        self.step(sp.max_iter - self.iter)
        if sp.snapshot_after_train and (not sp.snapshot or self.iter % sp.snapshot != 0):
            self.snapshot()
        if self._stop:
            log.info("Optimization stopped early.")
            return
        if sp.display and self.iter % sp.display == 0:
            self.net.forward()
            self._smooth(self.net.loss)
            log.info("Iteration %d, loss = %s", self.iter, fmt(self.smoothed_loss))
        if sp.test_interval and self.iter % sp.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    def _log_outputs(self, net: Net, kind: str, values: dict[str, Any]) -> None:
        k = 0
        for name in net.outputs:
            w = net.output_weight(name)
            for v in np.asarray(self.backend.to_numpy(values[name]), dtype=np.float64).ravel():
                suffix = f" (* {fmt(w)} = {fmt(w * v)} loss)" if w else ""
                log.info("    %s net output #%d: %s = %s%s", kind, k, name, fmt(float(v)), suffix)
                k += 1

    # -- testing ----------------------------------------------------------------------------------
    def test_all(self) -> list[dict[str, float]]:
        self.last_test = [self.test(i) for i in range(len(self.test_nets))]
        if self.early_stop is not None and self.early_stop.update(self.iter, self.last_test):
            self.request_stop()
        return self.last_test

    def test(self, i: int) -> dict[str, float]:
        """Run test net ``i`` for its test_iter batches; returns the mean of each output."""
        log.info("Iteration %d, Testing net (#%d)", self.iter, i)
        net = self.test_nets[i]
        n = self.param.test_iter[i]
        sums: dict[str, Any] = {}
        loss = 0.0
        done = 0
        for _ in range(n):
            if self._stop:
                log.info("Test interrupted.")
                break
            out = net.forward()
            loss += net.loss
            for name, value in out.items():
                host = np.asarray(self.backend.to_numpy(value), dtype=np.float64)
                sums[name] = sums[name] + host if name in sums else host.copy()
            done += 1
        if not done:
            return {}
        if self.param.test_compute_loss:
            log.info("Test loss: %s", fmt(loss / done))
        means = {name: s / done for name, s in sums.items()}
        self._log_outputs(net, "Test", means)
        return {name: float(np.mean(v)) for name, v in means.items()}

    # -- updates ----------------------------------------------------------------------------------
    # SGD's update of a param needs only its own gradient, which is final once backward has
    # passed the first layer that uses the param: step() has the backend make each update then
    # (Backend.later), beside the next layer's backward on a worker that takes fewer of that
    # layer's images, where after backward it ran on one core while the others waited (LeNet:
    # ip1's weights, ~0.4 of a ~0.6 ms update). The same operations in the same order on the
    # same values: the same bits. Not with iter_size > 1 (a param's gradient is summed over
    # several passes), gradient clipping (it needs every gradient first), L1 decay or another
    # solver type, or a net whose backward is wrapped (debug_info logs the gradients after it).
    EARLY_UPDATE = True

    def _update_when_ready(self) -> Any:
        """backward's ``ready`` callback that hands each param's SGD update to the backend
        once its gradient is final, or None where step() cannot update early."""
        sp = self.param
        if (not self.EARLY_UPDATE or self.type != "SGD" or sp.iter_size != 1
                or sp.clip_gradients >= 0 or sp.regularization_type != "L2"
                or "backward" in vars(self.net) or "forward_backward" in vars(self.net)):
            return None
        if self._ready_at is None:
            self._ready_at, self._only_user = {}, {}
            for k, users in enumerate(self.net.param_users()):
                self._ready_at.setdefault(users[0], []).append(k)
                layer, blob = self.net.layers[users[0]], self.params[k].blob
                if (len(users) == 1 and blob in layer.blobs
                        and layer.takes_param_update(layer.blobs.index(blob))):
                    self._only_user[k] = (layer, layer.blobs.index(blob))
        self._prepare_scratch()
        # apply_update takes the step (and logs a multistep advance) in Caffe's place in the log
        rate, _ = learning_rate(sp, self.iter, self.current_step, announce=False)
        done: set[int] = set()
        self._early = (rate, done)
        made = self._offer_updates(rate)

        def ready(layer: int) -> None:
            for k in self._ready_at.get(layer, ()):  # type: ignore[union-attr]
                p = self.params[k]
                if made.get(k):  # the layer updated the param's rows in its backward
                    if sum(made[k]) != p.blob.shape[0]:
                        raise RuntimeError(f"layer '{p.layer}' updated {sum(made[k])} of the "
                                           f"{p.blob.shape[0]} rows of param {p.index}")
                    done.add(k)
                    continue
                args = (p.blob.data, p.blob.diff, self.history[k], sp.weight_decay * p.decay_mult,
                        rate * p.lr_mult, sp.momentum, self._scratch[k])
                self.backend.later(lambda args=args: self.backend.sgd_update(*args))
                done.add(k)
        return ready

    def _offer_updates(self, rate: float) -> dict[int, list[int]]:
        """Hand each layer the SGD update of the params that only it uses and that it takes
        (Layer.param_updates), to make a block of rows at a time inside its backward;
        returns, per param, the row counts of the blocks made (filled in as backward goes)."""
        sp, made = self.param, {}
        offers: dict[Any, dict[int, Any]] = {}
        for k, (layer, j) in self._only_user.items():  # type: ignore[union-attr]
            p = self.params[k]
            rows_made = made[k] = []
            args = (sp.weight_decay * p.decay_mult, rate * p.lr_mult, sp.momentum)

            def update(rows: slice, k: int = k, p: Any = p, args: Any = args,
                       rows_made: list[int] = rows_made) -> None:
                self.backend.sgd_update(p.blob.data[rows], p.blob.diff[rows],
                                        self.history[k][rows], *args, self._scratch[k][rows])
                rows_made.append(rows.stop - rows.start)  # (atomic: workers call it at once)

            offers.setdefault(layer, {})[j] = update
        for layer, updates in offers.items():
            layer.param_updates = updates
        self._offered = list(offers)
        return made

    def _withdraw_updates(self) -> None:
        for layer in self._offered:
            layer.param_updates = {}
        self._offered = []

    def _prepare_scratch(self) -> None:
        if len(self._scratch) != len(self.params):
            self._scratch = [self.backend.empty(p.blob.shape) for p in self.params]

    def apply_update(self, display: bool = False) -> None:
        sp = self.param
        done: set[int] = set()
        rate, self.current_step = learning_rate(sp, self.iter, self.current_step)
        if self._early is not None:  # step() made some of the updates in backward
            (early_rate, done), self._early = self._early, None
            assert early_rate == rate
            self.backend.finish_later()
        if display:
            log.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        self._clip_gradients()
        xp = self.backend.xp
        n = len(self.params)
        self._prepare_scratch()
        for i, p in enumerate(self.params):
            if i in done:
                continue
            g, tmp = p.blob.diff, self._scratch[i]
            if sp.iter_size > 1:
                g *= 1.0 / sp.iter_size
            decay = sp.weight_decay * p.decay_mult
            lr = rate * p.lr_mult
            l2 = sp.regularization_type == "L2"
            if decay and not (l2 and self.type == "SGD"):
                if l2:
                    xp.multiply(p.blob.data, decay, out=tmp)
                else:
                    xp.sign(p.blob.data, out=tmp)
                    tmp *= decay
                g += tmp
            if self.type == "SGD":  # the common case, in one backend call: h = m·h + lr·g
                self.backend.sgd_update(p.blob.data, g, self.history[i], decay if l2 else 0.0,
                                        lr, sp.momentum, tmp)
                continue
            self._update_value(i, n, g, lr)
            p.blob.data -= g

    def _update_value(self, i: int, n: int, g: Any, lr: float) -> None:
        """Turn the regularized gradient ``g`` (in place) into the step to subtract."""
        sp, xp, h = self.param, self.backend.xp, self.history
        kind = self.type
        if kind == "SGD":
            h[i] *= sp.momentum
            h[i] += lr * g
            g[...] = h[i]
        elif kind == "Nesterov":
            old = h[i].copy()
            h[i] *= sp.momentum
            h[i] += lr * g
            g[...] = (1 + sp.momentum) * h[i] - sp.momentum * old
        elif kind == "AdaGrad":
            h[i] += g * g
            g[...] = lr * g / (xp.sqrt(h[i]) + sp.delta)
        elif kind == "RMSProp":
            h[i] *= sp.rms_decay
            h[i] += (1 - sp.rms_decay) * g * g
            g[...] = lr * g / (xp.sqrt(h[i]) + sp.delta)
        elif kind == "AdaDelta":
            m = sp.momentum
            h1, h2 = h[i], h[n + i]
            h1 *= m
            h1 += (1 - m) * g * g
            u = g * xp.sqrt((h2 + sp.delta) / (h1 + sp.delta))
            h2 *= m
            h2 += (1 - m) * u * u
            g[...] = lr * u
        elif kind == "Adam":
            b1, b2 = sp.momentum, sp.momentum2
            t = self.iter + 1
            m, v = h[i], h[n + i]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            correction = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            g[...] = lr * correction * m / (xp.sqrt(v) + sp.delta)

    def _clip_gradients(self) -> None:
        clip = self.param.clip_gradients
        if clip < 0:
            return
        sumsq = sum(float((p.blob.diff.astype(np.float64) ** 2).sum()) for p in self.params)
        norm = math.sqrt(sumsq)
        if norm > clip:
            scale = clip / norm
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale "
                     "factor %s", fmt(norm), fmt(clip), fmt(scale))
            for p in self.params:
                p.blob.diff *= scale

    # -- snapshots --------------------------------------------------------------------------------
    def snapshot_prefix(self) -> str:
        return snapshot_prefix(self.param, self.path)

    def caffe_snapshots(self) -> bool:
        """True when the solver file sets ``snapshot_format: BINARYPROTO``: snapshots are then
        Caffe's .caffemodel + .solverstate. Unset (or HDF5) keeps netforge's .npz files —
        Caffe's default is BINARYPROTO; netforge's default differs."""
        sp = self.param
        return sp.HasField("snapshot_format") and \
            sp.snapshot_format == pb.SolverParameter.BINARYPROTO

    def snapshot_paths(self, it: int | None = None) -> tuple[str, str]:
        base = f"{self.snapshot_prefix()}_iter_{self.iter if it is None else it}"
        if self.caffe_snapshots():
            return base + caffe_io.CAFFEMODEL, base + caffe_io.SOLVERSTATE
        return base + ".npz", base + ".solverstate.npz"

    def snapshot(self) -> tuple[str, str]:
        weights_path, state_path = self.snapshot_paths()
        if self.caffe_snapshots():
            log.info("Snapshotting to binary proto file %s", weights_path)
            caffe_io.save_net(self.net, weights_path)
            log.info("Snapshotting solver state to binary proto file %s", state_path)
            meta = self._state_meta(weights_path)
            del meta["learned_net"], meta["iter"], meta["current_step"]
            caffe_io.write_solverstate(state_path, self.iter, weights_path,
                                       [self.backend.to_numpy(h) for h in self.history],
                                       self.current_step, extra={"format": "netforge-extra-1",
                                                                 **meta})
            return weights_path, state_path
        log.info("Snapshotting to weights file %s", weights_path)
        self.net.save(weights_path)
        log.info("Snapshotting solver state to %s", state_path)
        write_state(state_path, self._state_meta(weights_path),
                    [self.backend.to_numpy(h) for h in self.history])
        return weights_path, state_path

    def _state_meta(self, weights_path: str) -> dict[str, Any]:
        return {
            "iter": self.iter,
            "current_step": self.current_step,
            "learned_net": os.path.basename(weights_path),
            "type": self.type,
            "rng": self.rng.bit_generator.state,
            "params": [[p.layer, p.index, list(p.blob.shape)] for p in self.params],
            "early_stop": self.early_stop.state() if self.early_stop is not None else None,
            "data": {"train": _data_states(self.net),
                     **{f"test{i}": _data_states(n) for i, n in enumerate(self.test_nets)}},
        }

    def restore(self, state_path: str | os.PathLike[str]) -> None:
        """Resume: iteration, lr step, history, RNG and data cursors, and the weights.
        Takes netforge's .solverstate.npz or Caffe's binary .solverstate."""
        log.info("Resuming from %s", state_path)
        if caffe_io.is_caffe_solverstate(state_path) or \
                str(state_path).endswith(caffe_io.CAFFEMODEL):
            self._restore_caffe(state_path)
            return
        meta, history = read_state(state_path)
        if meta.get("type") != self.type:
            raise ConfigError(f"the solver state is for a {meta.get('type')} solver but this "
                              f"solver is {self.type}", str(state_path))
        if len(history) != len(self.history):
            raise ConfigError(f"the solver state holds {len(history)} history blobs but this "
                              f"net needs {len(self.history)}", str(state_path))
        for k, (mine, theirs) in enumerate(zip(self.history, history, strict=True)):
            if tuple(mine.shape) != tuple(theirs.shape):
                raise ConfigError(f"history blob {k} has shape {tuple(theirs.shape)} but the net "
                                  f"needs {tuple(mine.shape)}", str(state_path))
            mine[...] = self.backend.asarray(theirs)
        learned = Path(meta["learned_net"])
        if not learned.is_absolute() and not learned.exists():
            learned = Path(state_path).parent / learned
        self.net.load_weights(read_weights(learned), str(learned))
        self.iter = int(meta["iter"])
        self.current_step = int(meta.get("current_step", 0))
        self._restore_extras(meta)
        log.info("%s: restored history; resuming at iteration %d", self.type, self.iter)

    def _restore_extras(self, meta: dict[str, Any]) -> None:
        """netforge's additions to a resume: early stopping, the RNG, data cursors."""
        if self.early_stop is not None and meta.get("early_stop"):
            self.early_stop.set_state(meta["early_stop"])
        if "rng" in meta:
            self.rng.bit_generator.state = meta["rng"]
        data = meta.get("data", {})
        _set_data_states(self.net, data.get("train", {}))
        for i, n in enumerate(self.test_nets):
            _set_data_states(n, data.get(f"test{i}", {}))

    def _restore_caffe(self, state_path: str | os.PathLike[str]) -> None:
        """Resume from Caffe's SolverState: history in learnable-param order, the
        learned_net weights, iter and current_step (and netforge's extras when present)."""
        where = str(state_path)
        state = caffe_io.read_solverstate(state_path)
        n_params, have, need = len(self.params), len(state.history), len(self.history)
        if have != need:
            per = need // n_params if n_params else 1
            if have == 0:
                guess = "it holds no history at all (is it a weights file?)"
            elif have == n_params:
                guess = ("that count fits a solver with one history blob per param (SGD, "
                         "Nesterov, AdaGrad or RMSProp)")
            elif have == 2 * n_params:
                guess = "that count fits a solver with two per param (AdaDelta or Adam)"
            else:
                guess = ("that count fits neither 1 nor 2 per param, so it was written for "
                         "another net")
            raise ConfigError(
                f"this .solverstate holds {have} history blobs but {_article(self.type)} "
                f"{self.type} solver needs {need} ({per} per learnable param, {n_params} "
                f"learnable params in this net); {guess}. Resume with the solver type and net "
                "that wrote it (Caffe stops here with 'Check failed: state.history_size() == "
                "history_.size()')", where)
        extra = state.extra or {}
        if extra.get("type") not in (None, self.type):
            raise ConfigError(f"the solver state is for a {extra['type']} solver but this "
                              f"solver is {self.type}", where)
        for k, (mine, theirs) in enumerate(zip(self.history, state.history, strict=True)):
            target = tuple(mine.shape)
            if state.legacy[k] and theirs.shape != target and \
                    caffe_io.legacy_shape(target) == theirs.shape:
                theirs = theirs.reshape(target)
            if tuple(theirs.shape) != target:
                raise ConfigError(f"history blob {k} has shape {tuple(theirs.shape)} but the "
                                  f"net needs {target}", where)
            mine[...] = self.backend.asarray(theirs)
        if state.learned_net:
            learned = Path(state.learned_net)
            if not learned.exists():
                for alt in (Path(state_path).parent / learned,
                            Path(state_path).parent / learned.name):
                    if alt.exists():
                        learned = alt
                        break
            self.net.load_weights(caffe_io.read_any_weights(learned, [self.net]), str(learned))
        self.iter = state.iter
        self.current_step = state.current_step
        self._restore_extras(extra)
        log.info("%s: restoring history; resuming at iteration %d", self.type, self.iter)

    def close(self) -> None:
        self.net.close()
        for n in self.test_nets:
            n.close()


class EarlyStop:
    """netforge's early_stop: stop when a test output has not improved by more than
    ``min_delta`` for ``patience`` tests in a row."""

    def __init__(self, output: str, test_net: int, minimize: bool, patience: int,
                 min_delta: float):
        self.output, self.test_net, self.minimize = output, test_net, minimize
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_iter = -1
        self.bad_tests = 0

    @classmethod
    def from_param(cls, sp: pb.SolverParameter, test_nets: list[Net],
                   source: SourceMap | None) -> EarlyStop | None:
        if not sp.HasField("early_stop"):
            return None
        es = sp.early_stop
        where = source.where(("early_stop",)) if source else None
        if not 0 <= es.test_net < len(test_nets):
            raise ConfigError(f"early_stop.test_net is {es.test_net} but there are "
                              f"{len(test_nets)} test nets", where)
        net = test_nets[es.test_net]
        if es.output not in net.outputs:
            raise ConfigError(f"early_stop.output '{es.output}' is not an output of test net "
                              f"#{es.test_net} (outputs: {', '.join(net.outputs)})", where,
                              did_you_mean(es.output, net.outputs))
        mode = es.mode
        minimize = net.output_weight(es.output) != 0 if mode == es.AUTO else mode == es.MIN
        return cls(es.output, es.test_net, minimize, es.patience, es.min_delta)

    def update(self, it: int, results: list[dict[str, float]]) -> bool:
        """Record one test; True when training should stop."""
        value = results[self.test_net].get(self.output) if self.test_net < len(results) else None
        if value is None:
            return False
        gain = (self.best - value if self.minimize else value - self.best) \
            if self.best is not None else math.inf
        if gain > self.min_delta:
            self.best, self.best_iter, self.bad_tests = value, it, 0
            return False
        self.bad_tests += 1
        if self.bad_tests < self.patience:
            return False
        log.info("Early stopping at iteration %d: %s has not improved by more than %s for %d "
                 "tests (best %s at iteration %d)", it, self.output, fmt(self.min_delta),
                 self.patience, fmt(self.best if self.best is not None else math.nan),
                 self.best_iter)
        return True

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "best_iter": self.best_iter, "bad_tests": self.bad_tests}

    def set_state(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_iter = int(state.get("best_iter", -1))
        self.bad_tests = int(state.get("bad_tests", 0))


def _article(word: str) -> str:
    return "an" if word[:1] in "AEIOU" else "a"


def _data_states(net: Net) -> dict[str, Any]:
    return {name: layer.get_state() for name, layer in zip(net.layer_names, net.layers, strict=True)
            if hasattr(layer, "get_state")}


def _set_data_states(net: Net, states: dict[str, Any]) -> None:
    for name, layer in zip(net.layer_names, net.layers, strict=True):
        if name in states and hasattr(layer, "set_state"):
            layer.set_state(states[name])
