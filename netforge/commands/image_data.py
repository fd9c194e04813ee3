"""Image tools: ``convert-imageset`` and ``compute-image-mean`` (Caffe's convert_imageset and
compute_image_mean). The work is done in netforge.data.images; these are thin shells."""

from __future__ import annotations

import logging

import click

from netforge import log as nflog
from netforge.cli import cli

log = logging.getLogger("netforge")


@cli.command("convert-imageset")
@click.argument("root", type=click.Path())
@click.argument("list_file", metavar="LIST", type=click.Path(dir_okay=False))
@click.argument("db", type=click.Path())
@click.option("--resize-height", default=0, show_default=True, type=click.IntRange(min=0),
              help="Resize every image to this height (with --resize-width).")
@click.option("--resize-width", default=0, show_default=True, type=click.IntRange(min=0),
              help="Resize every image to this width (with --resize-height).")
@click.option("--gray", is_flag=True, help="Store grey images (1 channel) instead of BGR.")
@click.option("--shuffle", is_flag=True, help="Shuffle the lines (seeded by --seed).")
@click.option("--encoded", is_flag=True,
              help="Store the encoded image files (PNG/JPEG bytes) instead of pixels.")
@click.option("--encode-type", default="", type=click.Choice(["", "png", "jpg", "jpeg", "bmp"]),
              help="Encoding of --encoded records [default: the file's own].")
@click.option("--check-size", is_flag=True, help="Fail when the images differ in size.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --shuffle.")
@click.option("--overwrite", is_flag=True, help="Replace an existing DB.")
def convert_imageset_cmd(root: str, list_file: str, db: str, resize_height: int,
                         resize_width: int, gray: bool, shuffle: bool, encoded: bool,
                         encode_type: str, check_size: bool, seed: int, overwrite: bool) -> None:
    """Convert images listed in LIST ("relative/path label" lines; each file is ROOT + path)
    into an LMDB of Datums under keys %08d_<path>, like Caffe's convert_imageset.

    \b
    netforge convert-imageset images/ train.txt train_lmdb --resize-height 32 --resize-width 32
    netforge convert-imageset images/ train.txt train_lmdb --encoded --encode-type png
    Needs Pillow: pip install 'netforge[images]'.
    """
    from netforge.data.images import convert_imageset

    nflog.configure()
    convert_imageset(root, list_file, db, resize_height=resize_height, resize_width=resize_width,
                     gray=gray, shuffle=shuffle, encoded=encoded, encode_type=encode_type,
                     check_size=check_size, seed=seed, overwrite=overwrite)


@cli.command("compute-image-mean")
@click.argument("db", type=click.Path())
@click.argument("out", required=False, type=click.Path(dir_okay=False))
def compute_image_mean_cmd(db: str, out: str | None) -> None:
    """The per-pixel mean of the Datums in DB (an LMDB), written to OUT as a BlobProto
    (.binaryproto, for transform_param.mean_file), like Caffe's compute_image_mean; logs the
    per-channel means (for transform_param.mean_value).

    \b
    netforge compute-image-mean train_lmdb mean.binaryproto
    """
    from netforge.data.images import compute_image_mean

    nflog.configure()
    compute_image_mean(db, out)
