"""``netforge upgrade-config``, ``convert-config`` and ``check``: thin shells over
netforge.config_tools."""

from __future__ import annotations

import logging

import click

from netforge import log as nflog
from netforge.cli import cli

log = logging.getLogger("netforge")

_KIND = click.option("--kind", type=click.Choice(["net", "solver"]), default=None,
                     help="What the file holds [default: detected from its fields].")


@cli.command("upgrade-config")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@_KIND
def upgrade_config_cmd(src: str, dst: str, kind: str | None) -> None:
    """Rewrite a legacy Caffe net or solver in the current form (upgrade_net_proto_text,
    upgrade_solver_proto_text).

    \b
    Nets: V0 and V1 `layers` -> `layer` (string types, blobs_lr/weight_decay -> param
    { lr_mult decay_mult }), data-layer scale/mean_file/crop_size/mirror -> transform_param,
    net-level input/input_dim -> an Input layer. Solvers: solver_type -> type, inline nets.
    OUT's suffix picks the format: .yaml/.yml, .caffemodel/.binaryproto (binary), else
    prototxt.
    """
    from netforge.config_tools import upgrade_config

    nflog.configure()
    kind, notes = upgrade_config(src, dst, kind)
    for note in notes:
        log.info("%s", note)
    if not any(not n.startswith("note:") for n in notes):
        log.info("%s: already in the current form", src)
    log.info("Wrote %s %s", kind, dst)


@cli.command("convert-config")
@click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("dst", metavar="OUT", type=click.Path(dir_okay=False))
@_KIND
def convert_config_cmd(src: str, dst: str, kind: str | None) -> None:
    """Convert a net or solver between prototxt and YAML (by OUT's suffix), losslessly."""
    from netforge.config_tools import convert_config

    nflog.configure()
    kind = convert_config(src, dst, kind)
    log.info("Wrote %s %s", kind, dst)


@cli.command("check")
@click.argument("path", metavar="NET|SOLVER", type=click.Path(dir_okay=False))
@click.option("--phase", type=click.Choice(["TRAIN", "TEST"], case_sensitive=False),
              default=None, help="Only this phase [default: a net's phases that differ; "
                                 "a solver's train and test nets].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a field of the net (NetParameter) or solver (SolverParameter) "
                   "before checking (repeatable).")
@click.option("--level", default=0, show_default=True, help="NetState level.")
@click.option("--stage", default="", help="Comma-separated NetState stages.")
@_KIND
def check_cmd(path: str, phase: str | None, overrides: tuple[str, ...], level: int,
              stage: str, kind: str | None) -> None:
    """Validate a net or solver and build its nets without training: one table per net
    (layer, type, bottoms -> tops, top shapes, parameters, top memory) and totals.
    Data layers need their data sources. Exit 2 on a config error."""
    from netforge.config_tools import check_config, format_summary

    nflog.configure(level=logging.WARNING)
    stages = tuple(s for s in stage.split(",") if s)
    kind, changes, summaries = check_config(path, phase=phase, overrides=overrides, kind=kind,
                                            level=level, stages=stages)
    for key, old, new in changes:
        click.echo(f"Override: {key} = {new} (was {old})")
    for k, summary in enumerate(summaries):
        if k:
            click.echo("")
        click.echo(format_summary(summary))
    click.echo(f"\n{path}: {kind} OK ({len(summaries)} net{'s' * (len(summaries) != 1)} "
               "built)")
