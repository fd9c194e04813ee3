"""Config tools behind ``netforge upgrade-config``, ``convert-config`` and ``check``.

* ``detect_kind``: whether a file is a net (NetParameter) or a solver (SolverParameter).
* ``write_config``: a message as prototxt, YAML (by the suffix) or binary (.caffemodel,
  .binaryproto).
* ``upgrade_config`` / ``convert_config``: file to file.
* ``check_config``: builds the net(s) a net or solver file describes, without training, and
  summarises each as a per-layer table (``NetSummary``, ``format_summary``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message

from netforge.config import (
    SourceMap,
    apply_overrides,
    is_yaml,
    load_net_param,
    load_solver_param,
    parse_message,
    read_text,
    to_yaml,
)
from netforge.errors import ConfigError
from netforge.proto import pb
from netforge.snapshot import atomic_write_bytes
from netforge.upgrade import upgrade_net, upgrade_solver

KINDS = ("net", "solver")
BINARY_SUFFIXES = (".caffemodel", ".binaryproto")


def _error_line(e: ConfigError) -> int:
    """The line an error points at (0 when it has none): how far a parse got."""
    parts = (e.where or "").rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return int(parts[1])
    return 0


def detect_kind(path: str | os.PathLike[str], kind: str | None = None) -> str:
    """'net' or 'solver': ``kind`` when given, else whichever message the file parses as.
    When it parses as neither, the error of the parse that got further is raised."""
    if kind is not None:
        if kind not in KINDS:
            raise ConfigError(f"unknown kind '{kind}' (net or solver)", "--kind")
        return kind
    if str(path).lower().endswith(BINARY_SUFFIXES):
        return "net"
    text = read_text(path, "config")
    errors: list[ConfigError] = []
    for name, message in (("net", pb.NetParameter()), ("solver", pb.SolverParameter())):
        try:
            parse_message(text, message, str(path), is_yaml(path))
        except ConfigError as e:
            errors.append(e)
            continue
        return name
    net_err, solver_err = errors
    raise solver_err if _error_line(solver_err) > _error_line(net_err) else net_err


def load_config(path: str | os.PathLike[str],
                kind: str | None = None) -> tuple[str, Message, SourceMap]:
    """(kind, message, source map) of a net or solver file; nets are upgraded on load."""
    kind = detect_kind(path, kind)
    if kind == "net":
        net, smap = load_net_param(path)
        return kind, net, smap
    solver, smap = load_solver_param(path)
    return kind, solver, smap


def format_config(message: Message, path: str | os.PathLike[str], header: str = "") -> bytes:
    """``message`` as the file ``path`` should hold: YAML, binary or prototxt."""
    name = str(path).lower()
    if name.endswith(BINARY_SUFFIXES):
        return message.SerializeToString()
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    if is_yaml(name):
        return (comment + to_yaml(message)).encode()
    return (comment + text_format.MessageToString(message)).encode()


def write_config(message: Message, path: str | os.PathLike[str], header: str = "") -> None:
    out = Path(path)
    if out.parent and not out.parent.exists():
        raise ConfigError("output folder does not exist", str(out.parent))
    atomic_write_bytes(out, format_config(message, out, header))


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def upgrade_config(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                   kind: str | None = None) -> tuple[str, list[str]]:
    """Write ``src`` upgraded to the current form as ``dst``. Returns (kind, changes)."""
    kind = detect_kind(src, kind)
    if kind == "net":
        if str(src).lower().endswith(BINARY_SUFFIXES):
            net, _ = load_net_param(src)  # legacy layers are upgraded (and logged) on load
            notes = upgrade_net(net, full=True)
        else:
            net = pb.NetParameter()
            smap = parse_message(read_text(src, "net"), net, str(src), is_yaml(src))
            notes = upgrade_net(net, full=True, smap=smap)
        message: Message = net
    else:
        sp = pb.SolverParameter()
        smap = parse_message(read_text(src, "solver"), sp, str(src), is_yaml(src))
        notes = upgrade_solver(sp, full=True, smap=smap)
        files = [getattr(sp, k) for k in ("net", "train_net") if sp.HasField(k)]
        for name in [*files, *sp.test_net]:
            notes.append(f"note: the net file '{name}' is not upgraded here (netforge reads "
                         "legacy nets; run upgrade-config on it for the current form)")
        message = sp
    changed = any(not n.startswith("note:") for n in notes)
    header = f"Upgraded by `netforge upgrade-config` from {Path(src).name}." if changed else ""
    write_config(message, dst, header)
    return kind, notes


def convert_config(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                   kind: str | None = None) -> str:
    """Rewrite a net or solver file in the format of ``dst``'s suffix (prototxt ↔ YAML; also
    binary). The message is unchanged (a legacy net is upgraded, as every load does)."""
    if _same_file(src, dst):
        raise ConfigError("the output is the input file; give another name", str(dst))
    kind, message, _ = load_config(src, kind)
    write_config(message, dst)
    return kind


# -- check ------------------------------------------------------------------------------------


@dataclass
class LayerRow:
    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    shapes: list[tuple[int, ...]]
    params: int
    shared: int
    memory: int  # bytes of the top blobs


@dataclass
class NetSummary:
    title: str
    rows: list[LayerRow] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    loss_outputs: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def memory(self) -> int:
        return sum(r.memory for r in self.rows)


def summarize_net(net: object, title: str) -> NetSummary:
    """A built Net as rows: layer, type, bottoms → tops, top shapes, parameters (owned;
    shared ones counted by their owner), top memory (every top counted, in-place ones too,
    like Caffe's 'Memory required for data')."""
    from netforge.net import Net

    assert isinstance(net, Net)
    owned: dict[str, int] = {}
    for info in net.learnable_params:
        owned[info.layer] = owned.get(info.layer, 0) + info.blob.count
    itemsize = net.backend.dtype.itemsize
    summary = NetSummary(title, inputs=list(net.inputs), outputs=list(net.outputs))
    for i, name in enumerate(net.layer_names):
        tops = net.top_vecs[i]
        total = sum(b.count for b in net.layers[i].blobs)
        mine = owned.get(name, 0)
        summary.rows.append(LayerRow(
            name=name, type=net.layer_params[i].type, bottoms=list(net.bottom_names[i]),
            tops=list(net.top_names[i]), shapes=[tuple(t.shape) for t in tops], params=mine,
            shared=total - mine, memory=sum(t.count for t in tops) * itemsize))
    summary.loss_outputs = [n for n in net.outputs if net.output_weight(n)]
    return summary


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def format_summary(summary: NetSummary) -> str:
    head = ("layer", "type", "bottoms -> tops", "top shapes", "params", "memory")
    body = []
    for r in summary.rows:
        params = f"{r.params:,}" + (f" (+{r.shared:,} shared)" if r.shared else "")
        body.append((r.name, r.type, f"{', '.join(r.bottoms) or '-'} -> "
                     f"{', '.join(r.tops) or '-'}", ", ".join(_shape_text(s) for s in r.shapes)
                     or "-", params, human_bytes(r.memory)))
    widths = [max(len(row[k]) for row in (head, *body)) for k in range(len(head))]
    right = {4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if k in right else c.ljust(w)
                         for k, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [summary.title, line(head), line(["-" * w for w in widths])]
    out += [line(row) for row in body]
    out.append(f"Total: {len(summary.rows)} layers, {summary.params:,} parameters, "
               f"{human_bytes(summary.memory)} of top blobs ({summary.memory:,} bytes)")
    if summary.inputs:
        out.append(f"Inputs: {', '.join(summary.inputs)}")
    outputs = [f"{n} (loss)" if n in summary.loss_outputs else n for n in summary.outputs]
    out.append(f"Outputs: {', '.join(outputs) or '-'}")
    return "\n".join(out)


def _phase_rules(net: pb.NetParameter) -> bool:
    """Whether any layer depends on the phase (so both phases are worth checking)."""
    return any(lp.HasField("phase") or any(r.HasField("phase") for r in (*lp.include,
                                                                          *lp.exclude))
               for lp in net.layer)


def check_config(path: str | os.PathLike[str], *, phase: str | None = None,
                 overrides: Sequence[str] = (), kind: str | None = None,
                 level: int = 0, stages: Sequence[str] = ()
                 ) -> tuple[str, list[tuple[str, str, str]], list[NetSummary]]:
    """Validate a net or solver file and build its nets on the CPU without training.

    A net is built in ``phase``, or in TRAIN and TEST when its layers depend on the phase
    (else TEST). A solver builds its train net and every test net (``phase`` picks one
    side). Returns (kind, overrides applied, summaries); any problem is a ConfigError.
    """
    from netforge.backend import NumpyBackend
    from netforge.net import Net
    from netforge.solver import Solver

    kind, message, smap = load_config(path, kind)
    changes = apply_overrides(message, list(overrides))
    backend = NumpyBackend()
    summaries: list[NetSummary] = []
    if isinstance(message, pb.NetParameter):
        phases = [phase.upper()] if phase else (["TRAIN", "TEST"] if _phase_rules(message)
                                                else ["TEST"])
        for ph in phases:
            net = Net(message, ph, level=level, stages=stages, backend=backend, source=smap,
                      base_dir=Path(path).parent, verbose=False, seed=0)
            try:
                summaries.append(summarize_net(net, f"{path} ({ph})"))
            finally:
                net.close()
        return kind, changes, summaries
    assert isinstance(message, pb.SolverParameter)
    solver = Solver(message, backend=backend, source=smap, path=path, weights=[],
                    level=level, stages=tuple(stages), verbose=False)
    try:
        if phase is None or phase.upper() == "TRAIN":
            summaries.append(summarize_net(solver.net, f"train net of {path} (TRAIN)"))
        if phase is None or phase.upper() == "TEST":
            for k, net in enumerate(solver.test_nets):
                summaries.append(summarize_net(net, f"test net #{k} of {path} (TEST)"))
    finally:
        solver.close()
    return kind, changes, summaries
