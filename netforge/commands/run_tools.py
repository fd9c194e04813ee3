"""Run tooling: parse-log, plot, draw, device-query. (The train options --nan-guard,
--debug-info and --metrics are netforge.cli's; they call netforge.guards.attach_train_tools.)"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from netforge import log as nflog
from netforge.cli import cli

log = logging.getLogger("netforge")


# ---------------------------------------------------------------------------------------------
# parse-log


@cli.command("parse-log")
@click.argument("log_file", metavar="LOG", type=click.Path(dir_okay=False))
@click.argument("out_dir", required=False, type=click.Path(file_okay=False))
@click.option("--delimiter", default=",", show_default=True,
              help="Column delimiter of the CSV files.")
def parse_log_cmd(log_file: str, out_dir: str | None, delimiter: str) -> None:
    """Write LOG.train and LOG.test CSV tables (Caffe's tools/extra/parse_log.py).

    Columns: NumIters,Seconds,LearningRate,<outputs in order of appearance>; Seconds count from
    the log's "Solving" line. OUT_DIR defaults to the log's folder. Reads netforge's and
    Caffe's logs.
    """
    from netforge.metrics import parse_log, save_csv_files

    nflog.configure(level=logging.WARNING)
    train, test = parse_log(log_file)
    paths = save_csv_files(log_file, out_dir if out_dir is not None else Path(log_file).parent,
                           train, test, delimiter)
    for path, rows in zip(paths, (train, test), strict=True):
        click.echo(f"{path}: {len(rows)} rows")


# ---------------------------------------------------------------------------------------------
# plot


@cli.command("plot")
@click.argument("source", metavar="LOG|JSONL", type=click.Path(dir_okay=False))
@click.argument("out", metavar="OUT.png", type=click.Path(dir_okay=False))
@click.option("--what", default="loss,accuracy,lr", show_default=True,
              help="Panels, comma-separated: loss (train loss, test losses), accuracy (the "
                   "other test outputs), lr.")
@click.option("--title", default=None, help="Figure title (default: the file name).")
def plot_cmd(source: str, out: str, what: str, title: str | None) -> None:
    """Plot train loss, test outputs and the learning rate against iterations.

    Reads a training log or the .jsonl metrics stream written beside it. Needs matplotlib:
    pip install netforge[plot].
    """
    from netforge.metrics import load_metrics, parse_what, plot_metrics

    nflog.configure(level=logging.WARNING)
    panels = parse_what(what)
    metrics = load_metrics(source)
    path = plot_metrics(metrics, out, panels, title or Path(source).name)
    click.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# draw


@cli.command("draw")
@click.argument("model", metavar="NET", type=click.Path(dir_okay=False))
@click.argument("out", metavar="OUT.{dot,svg,png}", type=click.Path(dir_okay=False))
@click.option("--rankdir", type=click.Choice(["LR", "TB", "BT", "RL"], case_sensitive=False),
              default="LR", show_default=True, help="Graph direction.")
@click.option("--phase", type=click.Choice(["TRAIN", "TEST", "ALL"], case_sensitive=False),
              default="ALL", show_default=True,
              help="Draw only the layers of this phase (ALL: every layer, like draw_net.py).")
def draw_cmd(model: str, out: str, rankdir: str, phase: str) -> None:
    """Draw a net (Caffe's draw_net.py): layers as boxes, blobs as octagons.

    .dot is written directly; .svg, .png and .pdf need Graphviz's `dot` on PATH.
    """
    from netforge.draw import draw_net_file

    nflog.configure(level=logging.WARNING)
    path = draw_net_file(model, out, rankdir, None if phase.upper() == "ALL" else phase)
    click.echo(f"wrote {path}")


# ---------------------------------------------------------------------------------------------
# device-query


@cli.command("device-query")
def device_query_cmd() -> None:
    """Report the CPU, NumPy and BLAS, the compiled kernels and the GPU (Caffe's
    `caffe device_query`)."""
    from netforge.guards import device_report

    rows = device_report()
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        click.echo(f"{label + ':' if label else '':<{width + 1}} {value}")
