"""Run-time guards and diagnostics for training: the NaN/Inf guard, Caffe's debug_info lines,
and the device report of ``netforge device-query``.

* :class:`NanGuard` is a ``Solver.on_iteration`` callback: after each iteration it checks the
  loss and every learnable parameter for non-finite values, keeps a host copy of the last good
  weights, and on the first bad value names it, writes those weights and raises
  :class:`NonFiniteError` (exit code 1).
* :func:`enable_debug_info` wraps a net's layers so that on display iterations each layer logs
  Caffe's ``[Forward]``/``[Backward]`` mean-absolute-value lines (Net::ForwardDebugInfo,
  BackwardDebugInfo) and the net logs the L1/L2 norms of all params after backward.
* :func:`attach_train_tools` installs the metrics stream, the guard and debug info on a solver
  (what ``netforge train`` calls right after creating it).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from netforge.errors import NetforgeError
from netforge.log import fmt

log = logging.getLogger("netforge")


class NonFiniteError(NetforgeError):
    """Training produced a NaN or an infinity (exit code 1)."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# the NaN guard


def _finite(xp: Any, a: Any) -> bool:
    """True when every element is finite: min and max propagate NaN and show ±inf, without the
    temporary boolean array of isfinite(a).all()."""
    if a.size == 0:
        return True
    return bool(xp.isfinite(a.min())) and bool(xp.isfinite(a.max()))


class NanGuard:
    """Stop training at the first non-finite loss or parameter, with a snapshot of the last
    good weights. Append to ``solver.on_iteration`` (or use :func:`install_nan_guard`).

    The weights are copied to host buffers after each good iteration (one copy of the params;
    only while the guard is installed). ``seconds`` accumulates the guard's own time.
    """

    def __init__(self, solver: Any):
        self.solver = solver
        self.backend = solver.backend
        self.params = list(solver.params)
        self.good: list[np.ndarray] = [np.empty(tuple(p.blob.shape), dtype=self.backend.dtype)
                                       for p in self.params]
        self.good_iter = -1
        self.seconds = 0.0
        self.checks = 0
        self._save_good()

    def _save_good(self) -> None:
        for buf, p in zip(self.good, self.params, strict=True):
            np.copyto(buf, self.backend.to_numpy(p.blob.data))
        self.good_iter = self.solver.iter

    def __call__(self, solver: Any) -> None:
        t0 = time.perf_counter()
        try:
            problem = self.check(solver)
        finally:
            self.seconds += time.perf_counter() - t0
            self.checks += 1
        if problem is not None:
            self.fail(solver, problem)

    def check(self, solver: Any) -> str | None:
        """None when the last iteration left a finite loss and finite params; else what broke.
        Saves the host copy of good params."""
        xp = self.backend.xp
        loss = solver.losses[-1] if solver.losses else 0.0
        if not np.isfinite(loss):
            return self._diagnose_loss(solver, float(loss))
        for p in self.params:
            if not _finite(xp, p.blob.data):
                return self._describe_param(p)
        self._save_good()
        return None

    def _param_label(self, p: Any) -> str:
        name = f" '{p.name}'" if p.name else ""
        return f"param blob {p.index}{name} of layer '{p.layer}'"

    def _describe_param(self, p: Any) -> str:
        xp = self.backend.xp
        it = self.solver.iter - 1
        grad = "finite" if _finite(xp, p.blob.diff) else "non-finite"
        bad = _count_bad(self.backend, p.blob.data)
        return (f"{self._param_label(p)} became non-finite ({bad}) in the update of iteration "
                f"{it} (its update value was {grad}; the loss was "
                f"{fmt(float(self.solver.losses[-1]))}; lr too high?)")

    def _diagnose_loss(self, solver: Any, loss: float) -> str:
        it = solver.iter - 1
        net = solver.net
        xp = self.backend.xp
        first = None
        for i, names in enumerate(net.top_names):
            for name, blob in zip(names, net.top_vecs[i], strict=True):
                if not _finite(xp, blob.data):
                    first = (f"the first non-finite top is blob '{name}' of layer "
                             f"'{net.layer_names[i]}' ({net.layer_params[i].type}; "
                             f"{_count_bad(self.backend, blob.data)})")
                    break
            if first:
                break
        return (f"the loss of iteration {it} is {fmt(loss)}; "
                + (first or "every top blob is finite (non-finite loss weights?)"))

    def fail(self, solver: Any, problem: str) -> None:
        where = ""
        if self.good_iter == solver.iter - 1:
            path = Path(f"{solver.snapshot_prefix()}_iter_{self.good_iter}.last_good.npz")
            from netforge.snapshot import write_weights

            weights: dict[str, list[np.ndarray]] = {}
            good = {id(p.blob): buf for p, buf in zip(self.params, self.good, strict=True)}
            for name, blobs in solver.net.params.items():
                weights[name] = [good[id(b)] if id(b) in good else solver.backend.to_numpy(b.data)
                                 for b in blobs]
            write_weights(path, weights)
            where = (f"; wrote the last good weights (iteration {self.good_iter}) to {path} "
                     f"(fine-tune from them with --weights)")
            log.error("NaN guard: wrote the last good weights (iteration %d) to %s",
                      self.good_iter, path)
        else:
            where = "; the last good state is the snapshot training resumed from"
        raise NonFiniteError(f"NaN guard: {problem}{where}")


def _count_bad(backend: Any, a: Any) -> str:
    host = np.asarray(backend.to_numpy(a))
    n_nan = int(np.isnan(host).sum())
    n_inf = int(np.isinf(host).sum())
    parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} inf" if n_inf else ""]
    return " and ".join(p for p in parts if p) + f" of {host.size} values"


def install_nan_guard(solver: Any) -> NanGuard:
    guard = NanGuard(solver)
    solver.on_iteration.append(guard)
    return guard


# ---------------------------------------------------------------------------------------------
# debug_info


def _mean_abs(backend: Any, a: Any) -> float:
    if a.size == 0:
        return 0.0
    return float(backend.xp.abs(a).sum(dtype=np.float64)) / a.size


class DebugInfo:
    """Caffe's Net debug_info for a solver's train net, on display iterations only.

    Wraps each layer's ``forward``/``backward`` and the net's ``backward`` with instance
    attributes (the classes are untouched); :meth:`remove` restores them.
    """

    def __init__(self, solver: Any, always: bool = False):
        self.solver = solver
        self.net = solver.net
        self.always = always
        self._restore: list[Callable[[], None]] = []
        net = self.net
        param_names: dict[int, str] = {}
        for p in getattr(net, "learnable_params", []):
            param_names[id(p.blob)] = p.name
        for i, layer in enumerate(net.layers):
            lp = net.layer_params[i]
            names = [lp.param[k].name if k < len(lp.param) and lp.param[k].name else str(k)
                     for k in range(len(layer.blobs))]
            self._wrap(layer, "forward", self._forward(i, layer, layer.forward, names))
            self._wrap(layer, "backward", self._backward(i, layer, layer.backward))
        self._wrap(net, "backward", self._net_backward(net.backward))

    def _wrap(self, obj: Any, attr: str, fn: Callable[..., Any]) -> None:
        had = attr in vars(obj)
        old = vars(obj).get(attr)
        setattr(obj, attr, fn)

        def restore() -> None:
            if had:
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._restore.append(restore)

    def active(self) -> bool:
        if self.always:
            return True
        sp = self.solver.param
        return bool(sp.display) and self.solver.iter % sp.display == 0

    def _forward(self, i: int, layer: Any, inner: Callable[..., Any],
                 names: list[str]) -> Callable[..., Any]:
        net, backend = self.net, self.net.backend
        layer_name = net.layer_names[i]
        top_names = net.top_names[i]

        def forward(bottom: Any, top: Any) -> Any:
            result = inner(bottom, top)
            if self.active():
                for name, blob in zip(top_names, top, strict=True):
                    log.info("    [Forward] Layer %s, top blob %s data: %s", layer_name, name,
                             fmt(_mean_abs(backend, blob.data)))
                for k, blob in enumerate(layer.blobs):
                    log.info("    [Forward] Layer %s, param blob %s data: %s", layer_name,
                             names[k], fmt(_mean_abs(backend, blob.data)))
            return result
        return forward

    def _backward(self, i: int, layer: Any, inner: Callable[..., Any]) -> Callable[..., Any]:
        net, backend = self.net, self.net.backend
        layer_name = net.layer_names[i]
        bottom_names = net.bottom_names[i]

        def backward(top: Any, propagate_down: Any, bottom: Any) -> Any:
            result = inner(top, propagate_down, bottom)
            if self.active():
                for name, need, blob in zip(bottom_names, propagate_down, bottom, strict=True):
                    if need:
                        log.info("    [Backward] Layer %s, bottom blob %s diff: %s", layer_name,
                                 name, fmt(_mean_abs(backend, blob.diff)))
                down = getattr(layer, "param_propagate_down", [True] * len(layer.blobs))
                for k, blob in enumerate(layer.blobs):
                    if k < len(down) and down[k]:
                        log.info("    [Backward] Layer %s, param blob %d diff: %s", layer_name,
                                 k, fmt(_mean_abs(backend, blob.diff)))
            return result
        return backward

    def _net_backward(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        net = self.net
        xp = net.backend.xp

        def backward(*args: Any) -> Any:
            result = inner(*args)
            if self.active():
                l1 = [0.0, 0.0]
                l2 = [0.0, 0.0]
                for p in net.learnable_params:
                    for j, a in enumerate((p.blob.data, p.blob.diff)):
                        l1[j] += float(xp.abs(a).sum(dtype=np.float64))
                        l2[j] += float((a.astype(np.float64) ** 2).sum())
                log.error("    [Backward] All net params (data, diff): L1 norm = (%s, %s); "
                          "L2 norm = (%s, %s)", fmt(l1[0]), fmt(l1[1]), fmt(l2[0] ** 0.5),
                          fmt(l2[1] ** 0.5))
            return result
        return backward

    def remove(self) -> None:
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()


def enable_debug_info(solver: Any, always: bool = False) -> DebugInfo:
    """Log Caffe's per-layer debug_info lines for ``solver``'s train net on display iterations
    (every forward/backward with ``always``)."""
    return DebugInfo(solver, always)


# ---------------------------------------------------------------------------------------------
# what `netforge train` installs


def attach_train_tools(solver: Any, log_file: str | os.PathLike[str] | None = None, *,
                       nan_guard: bool | None = None, debug_info: bool | None = None,
                       metrics: bool | None = None) -> dict[str, Any]:
    """Install the JSONL metrics stream (beside ``log_file``), the NaN guard and debug_info.

    An argument left as None takes its default: guard on, metrics on, debug_info as the
    solver's ``debug_info`` field. Returns what was installed, by name.
    """
    if nan_guard is None:
        nan_guard = True
    if debug_info is None:
        debug_info = bool(solver.param.debug_info)
    if metrics is None:
        metrics = True
    installed: dict[str, Any] = {}
    if metrics and log_file is not None:
        from netforge.metrics import attach_metrics

        installed["metrics"] = attach_metrics(solver, log_file)
        log.info("Metrics stream: %s", installed["metrics"].path)
    if nan_guard:
        installed["nan_guard"] = install_nan_guard(solver)
    if debug_info:
        installed["debug_info"] = enable_debug_info(solver)
    return installed


# ---------------------------------------------------------------------------------------------
# device-query


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _blas_info() -> list[str]:
    lines: list[str] = []
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            lines.append(f"{pool.get('internal_api', '?')} {pool.get('version', '?')} "
                         f"({pool.get('user_api', '?')}, {pool.get('num_threads', '?')} "
                         f"threads, {pool.get('architecture', '?')}): {pool.get('filepath', '')}")
        if lines:
            return lines
    except Exception:  # threadpoolctl missing or unable to inspect
        pass
    try:
        cfg = np.show_config(mode="dicts")
        deps = (cfg or {}).get("Build Dependencies", {})
        for key in ("blas", "lapack"):
            d = deps.get(key, {})
            if d:
                lines.append(f"{key}: {d.get('name', '?')} {d.get('version', '')}".strip())
    except Exception:  # older NumPy without mode="dicts"
        pass
    return lines or ["unknown"]


def device_report() -> list[tuple[str, str]]:
    """(label, value) pairs: CPU, cores, NumPy, BLAS, numba kernels, GPU."""
    from netforge.backend import kernels
    from netforge.backend.threads import shared_pool

    rows = [("CPU", _cpu_model()),
            ("Cores", f"{os.cpu_count() or '?'} logical"
                      + (f", {len(os.sched_getaffinity(0))} usable"
                         if hasattr(os, "sched_getaffinity") else "")),
            ("Python", platform.python_version()),
            ("NumPy", np.__version__)]
    for k, line in enumerate(_blas_info()):
        rows.append(("BLAS" if k == 0 else "", line))
    rows.append(("Compiled kernels", "numba (active)" if kernels.AVAILABLE else
                 "off (pip install netforge[fast]; NETFORGE_NUMBA=0 turns them off)"))
    workers = shared_pool().workers
    rows.append(("CPU workers", f"{workers} (layers split the batch; NETFORGE_THREADS sets it)"
                 if workers > 1 else "1 (NETFORGE_THREADS, and a BLAS with per-thread control, "
                                     "split the batch over cores)"))
    rows.extend(_gpu_rows())
    return rows


def _gpu_rows() -> list[tuple[str, str]]:
    try:
        import cupy  # type: ignore[import-not-found]
    except Exception:
        return [("GPU", "no GPU backend (CuPy is not installed)")]
    try:  # pragma: no cover - needs a GPU
        n = cupy.cuda.runtime.getDeviceCount()
        rows = [("CuPy", cupy.__version__)]
        for i in range(n):
            props = cupy.cuda.runtime.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            rows.append((f"GPU {i}", f"{name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
                                     f"compute capability {props['major']}.{props['minor']}, "
                                     f"{props['multiProcessorCount']} SMs"))
        return rows or [("GPU", "no GPU backend (CuPy sees no device)")]
    except Exception as e:  # pragma: no cover
        return [("GPU", f"no GPU backend (CuPy: {e})")]
