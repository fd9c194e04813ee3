"""Batch parallelism for the CPU backend: a layer splits its batch into parts and runs them on
every core at once, each part's GEMMs on single-threaded BLAS.

Why not let OpenBLAS thread each GEMM? It does that well enough, but everything between the
GEMMs (im2col, col2im, pooling, the layout changes) then runs on one core, and OpenBLAS's
threads keep spinning for a while after each GEMM, taking a core from whatever runs next.
Giving each core a whole part of the batch keeps both busy through the entire layer. Measured
on 2 cores: LeNet's 10,000 iterations in 2 min 18 s against 3 min 10 s with one worker, a
cifar10_quick step 88 against 112 ms.

The parts are assigned to workers statically (part k runs on worker k mod W, worker 0 being the
calling thread), so a layer can keep one scratch buffer per worker, and reductions over parts
(weight gradients) are summed in part order: a run is repeatable for a given worker count.

With numba, the row-shift convolutions, pooling and ReLU go further: every worker runs the
same call with one work array and takes items (images, blocks) left in the others' parts once
its own are done (kernels.work_counter, Backend.shares_work), so a worker that starts late or
runs on a slower core does less instead of the others waiting for it; sums over images are
still made per fixed part and added in part order. Such a job (``balanced``) also takes the
tasks handed to ``later`` (the solver's updates of params whose gradients are final): worker 1
runs them first, and the others take more of the job's items meanwhile.

OpenBLAS's per-thread thread count (``openblas_set_num_threads_local``, OpenBLAS ≥ 0.3.27) is
what makes this safe; where it cannot be found (another BLAS), one worker is used and the
layers run as before. ``NETFORGE_THREADS`` sets the worker count (default: the cores this
process may use; 1 turns batch parallelism off).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from netforge.backend import blas, kernels
from netforge.errors import ConfigError

T = TypeVar("T")


def _default_workers() -> int:
    env = os.environ.get("NETFORGE_THREADS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ConfigError(f"NETFORGE_THREADS must be a positive whole number of worker "
                              f"threads, got '{env}'", where="environment")
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_inside = threading.local()  # .slot: the worker this thread is running a part for
_pools: weakref.WeakSet[BatchPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's threads: let each pool start its own."""
    for pool in list(_pools):
        pool._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# How long a thread busy-waits (without the GIL) for the next job or for the other workers,
# in turns of the wait loop, before it sleeps: ~0.6 ms on this project's machine (~0.3 ns a
# turn), which covers the Python work between two layers, and an idle process stops using the
# cores soon after. Longer waits made the benchmark's step faster (2^25 turns, ~10 ms: LeNet
# -0.3 to -0.5 ms in most in-process A/B runs, one run +0.6) but a real training run slower:
# the Data layer's prefetch thread then finds no idle core (10,000 LeNet iterations, median
# 93 iter/s with 2^21 turns, 86 with ~2.5 ms, 84 with ~10 ms).
SPIN_TURNS = 1 << 21
# A caller that has gone to sleep waiting for its helpers is woken by them; it also looks this
# often (s), for the rare report a helper made just before it saw the caller asleep, and for a
# helper thread that has died.
POLL_S = 1e-3


class _Job:
    __slots__ = ("count", "errors", "fn", "number", "results", "side", "width")

    def __init__(self, number: int, fn: Callable[[int, int], Any], count: int, width: int,
                 side: list[Callable[[], None]]):
        self.number, self.fn, self.count, self.width = number, fn, count, width
        self.results: list[Any] = [None] * count
        self.errors: list[BaseException] = []
        self.side = side  # tasks worker 1 runs before its parts (BatchPool.later)


class BatchPool:
    """Runs ``fn(worker, k)`` for parts k = 0..count-1 on ``workers`` threads (worker 0 is the
    caller), each with single-threaded BLAS.

    The caller publishes a job and bumps ``_flags[0]`` (the job number); each helper thread
    runs its parts of it and stores the job number in its own ``_flags[8·w]`` (a cache line
    apart). With numba both sides busy-wait on those counters for ~0.6 ms with the GIL released
    (kernels.report_and_wait) before they sleep, so a layer's parts start and finish within
    microseconds of each other, where an OS wake-up costs 20-100 µs per layer on a VM. A
    helper stores its counter from inside that wait, after it has let go of the GIL, so the
    caller never waits for the GIL when it sees the job done. In a ``deferred`` job the job
    number is stored by the caller's first compiled kernel instead (take_post), once the caller
    has let go of the GIL, so the helpers do not wait for it either.
    """

    def __init__(self, workers: int | None = None):
        self._set_blas = blas.thread_setter()
        wanted = _default_workers() if workers is None else max(1, workers)
        self.workers = wanted if self._set_blas is not None else 1
        self._reset()
        _pools.add(self)

    def _reset(self) -> None:
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()
        self._busy = threading.Lock()  # held by the thread whose job the helpers run
        self._wake = threading.Condition()
        self._sleepers = 0  # helpers asleep on _wake, waiting for a job
        self._caller_asleep = False  # the caller asleep on _wake, waiting for its helpers
        self._flags = np.zeros(8 * max(self.workers, 1), dtype=np.int64)
        self._job: _Job | None = None
        self._waiting = threading.local()  # .tasks: this thread's tasks for later()

    def _start(self) -> None:
        with self._start_lock:
            if not self._threads:
                for slot in range(1, self.workers):
                    t = threading.Thread(target=self._serve, args=(slot,), daemon=True,
                                         name=f"netforge-batch-{slot}")
                    t.start()
                    self._threads.append(t)

    def _spin(self, report: int, done: int, index: int, value: int) -> bool:
        """Store ``done`` in flags[report] (report ≥ 0), then busy-wait while flags[index] is
        ``value``; True once it changed. A caller asleep on _wake (and every waiter, without
        numba) is woken only from Python: then the report is made here, and without numba
        the wait is one look."""
        if report >= 0 and (self._caller_asleep or not kernels.AVAILABLE):
            self._signal_done(report, done)
            report = -1
        if kernels.AVAILABLE:
            return kernels.report_and_wait(self._flags, report, done, index, value, SPIN_TURNS)
        return bool(self._flags[index] != value)

    def _signal_done(self, report: int, done: int) -> None:
        self._flags[report] = done
        with self._wake:
            self._wake.notify_all()

    def _serve(self, slot: int) -> None:
        """A helper thread: run this worker's parts of each job, report it done, wait."""
        assert self._set_blas is not None
        self._set_blas(1)
        _inside.slot = slot
        flags, seen = self._flags, 0
        while True:
            if not self._spin(8 * slot, seen, 0, seen):
                with self._wake:
                    self._sleepers += 1
                    while flags[0] == seen:
                        self._wake.wait()
                    self._sleepers -= 1
            job = self._job
            assert job is not None
            seen = job.number
            if slot == 1:
                for task in job.side:
                    try:
                        task()
                    except BaseException as e:
                        job.errors.append(e)
            for k in range(slot, job.count, job.width):
                try:
                    job.results[k] = job.fn(slot, k)
                except BaseException as e:
                    job.errors.append(e)
                    break

    def _blas_threads(self, n: int) -> int:
        """Set the calling thread's BLAS thread count; returns the previous one."""
        assert self._set_blas is not None
        return self._set_blas(n)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Single-threaded BLAS in the calling thread while a net runs. The products are split
        by batch over the workers; a GEMM threaded by BLAS would leave an OpenBLAS thread
        spinning on a core that a worker needs for the next layer."""
        if self.workers <= 1:
            yield
            return
        previous = self._blas_threads(1)
        try:
            yield
        finally:
            self._blas_threads(previous)

    def later(self, task: Callable[[], None]) -> None:
        """Run ``task`` (a call that lets go of the GIL, such as a compiled kernel) on worker
        1 at the start of the next ``balanced`` job, before its parts, or on the caller at
        finish_later(), whichever comes first. For work that may wait but should not hold up
        the caller: a job whose workers share out its items absorbs it (the caller takes more
        of them), where after the job it would run on one core with the other idle. Each
        thread's tasks wait for that thread's jobs (a job ends before run() returns, so they
        are done by then)."""
        self._tasks().append(task)

    def _tasks(self) -> list[Callable[[], None]]:
        tasks = getattr(self._waiting, "tasks", None)
        if tasks is None:
            tasks = self._waiting.tasks = []
        return tasks

    def finish_later(self) -> None:
        """Run, here and now, this thread's tasks that no job has taken (see later)."""
        tasks, self._waiting.tasks = self._tasks(), []
        for task in tasks:
            task()

    def run(self, fn: Callable[[int, int], T], count: int, wide: bool = False,
            deferred: bool = False, balanced: bool = False) -> list[T]:
        """[fn(k % W, k) for k in range(count)], the workers running concurrently; worker w
        handles its parts in increasing order. The first exception raised is re-raised once
        every worker has stopped. A single ``wide`` part (a big batch of one) gets every
        core's BLAS. ``deferred``: the caller's first part starts the other workers itself,
        with ``take_post`` (see there), at the latest when it returns. ``balanced``: the
        parts share out the job's items between the workers (a worker that starts later does
        fewer), so the tasks waiting for a job (later) go to it."""
        w = min(self.workers, count)
        slot = getattr(_inside, "slot", None)
        if slot is not None:
            # A part asking for parts of its own: run them here, as the same worker (a worker
            # waiting on the pool it belongs to would wait forever).
            return [fn(slot, k) for k in range(count)]
        if self.workers <= 1 or (w <= 1 and not wide):
            return [fn(0, k) for k in range(count)]
        if w <= 1:
            previous = self._blas_threads(self.workers)
            try:
                return [fn(0, k) for k in range(count)]
            finally:
                self._blas_threads(previous)
        if not self._busy.acquire(blocking=False):
            # Another thread's job holds the helpers (two nets run from two threads): this one
            # runs its parts by itself rather than queue behind it.
            return [fn(0, k) for k in range(count)]
        try:
            return self._run_job(fn, count, w, deferred and DEFER, balanced)
        finally:
            self._busy.release()

    def take_post(self) -> tuple[np.ndarray, int]:
        """(flags, n) for a compiled kernel run by the caller of a deferred job: the kernel
        stores n in flags[0] once it runs without the GIL, which starts the helpers then, so
        that they find the GIL free (a helper that waits for the GIL sleeps, and waking it
        costs tens of microseconds here). n is 0 (store nothing) for any other call."""
        number = getattr(_inside, "post", 0)
        if number:
            _inside.post = 0
        return self._flags, number

    def post_pending(self) -> None:
        """Start the helpers on the job, unless a kernel has done it already."""
        number = getattr(_inside, "post", 0)
        if number:
            _inside.post = 0
            self._flags[0] = number
        if self._sleepers:
            with self._wake:
                self._wake.notify_all()

    def _run_job(self, fn: Callable[[int, int], T], count: int, w: int,
                 deferred: bool = False, balanced: bool = False) -> list[T]:
        if not self._threads:
            self._start()
        previous_job = self._job.number if self._job is not None else 0
        side: list[Callable[[], None]] = []
        if balanced and self._tasks():
            side, self._waiting.tasks = self._waiting.tasks, []
        job = self._job = _Job(previous_job + 1, fn, count, w, side)
        _inside.post = job.number
        if not (deferred and kernels.AVAILABLE) or self._sleepers:
            self.post_pending()
        previous = self._blas_threads(1)
        _inside.slot = 0
        try:
            for k in range(0, count, w):
                job.results[k] = fn(0, k)
                self.post_pending()
        except BaseException as e:
            job.errors.insert(0, e)
        finally:
            self.post_pending()  # also wakes a helper that went to sleep before a kernel's post
            _inside.slot = None
            self._blas_threads(previous)
            for helper in range(1, self.workers):  # every helper reports every job
                index = 8 * helper
                if not self._spin(-1, 0, index, previous_job):
                    with self._wake:
                        self._caller_asleep = True
                        try:
                            while self._flags[index] == previous_job:
                                if not self._threads[helper - 1].is_alive():
                                    raise RuntimeError(f"netforge's batch worker {helper} has "
                                                       "stopped; its parts never ran")
                                self._wake.wait(POLL_S)
                        finally:
                            self._caller_asleep = False
        if job.errors:
            raise job.errors[0]
        return job.results


# Whether layers share out work (Backend.shares_work: each worker takes images left in the others'
# parts once its own are done) instead of each making a fixed part (kept for in-process A/B
# comparisons and tests).
SHARE = True
# Whether run(..., deferred=True) defers at all (False: every job is posted before the caller's
# parts, as before deferred jobs existed; kept for in-process A/B comparisons and tests).
DEFER = True
_shared: dict[int | None, BatchPool] = {}


def shared_pool(workers: int | None = None) -> BatchPool:
    """One pool per worker count for the whole process (threads are started on first use)."""
    pool = _shared.get(workers)
    if pool is None:
        pool = _shared[workers] = BatchPool(workers)
    return pool
