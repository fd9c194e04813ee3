"""``netforge convert-weights``: weights between netforge's .npz and Caffe's .caffemodel."""

from __future__ import annotations

import logging

import click

from netforge import log as nflog
from netforge.cli import cli

log = logging.getLogger("netforge")


@cli.command("convert-weights")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--model", default=None, type=click.Path(dir_okay=False),
              help="Net file (.prototxt or .yaml) whose TRAIN phase gives the caffemodel's "
                   "layer types, bottoms and tops (without it: layer names and blobs only).")
def convert_weights_cmd(src: str, dst: str, model: str | None) -> None:
    """Convert weights between .npz and .caffemodel, either direction.

    \b
    netforge convert-weights lenet_iter_10000.caffemodel lenet.npz
    netforge convert-weights lenet.npz lenet.caffemodel --model models/lenet_train_test.yaml
    OUT's name decides the format: .npz, else a caffemodel (binary NetParameter).
    """
    from netforge.caffe_io import convert_weights

    nflog.configure()
    converted = convert_weights(src, dst, model)
    for name, shapes in converted:
        click.echo(f"{name}: {', '.join('x'.join(map(str, s)) or 'scalar' for s in shapes)}")
    log.info("Converted %d layer(s) from %s to %s", len(converted), src, dst)
