"""Net diagrams like Caffe's python/draw_net.py, as Graphviz DOT text (no pydot needed).

Layers are filled boxes labelled "name (Type)" plus their key parameters (Caffe's colors:
Convolution #FF5050, Pooling #FF9900, InnerProduct #CC33FF, others #6495ED); blobs are grey
octagons. An in-place layer (a top that repeats its bottom, e.g. ReLU) is a green box on the
blob's path: bottom blob -> in-place layer -> the blob's next consumers, so the graph stays
acyclic (Caffe draws a blob -> layer -> same-blob cycle instead). Edges from a layer to its
tops carry Caffe's labels ("Batch N" for data layers, num_output for Convolution,
Deconvolution and InnerProduct). .svg and .png are rendered with Graphviz's ``dot``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from netforge.config import load_net_param
from netforge.errors import ConfigError
from netforge.net import filter_layers, parse_phase
from netforge.proto import pb

RANKDIRS = ("LR", "TB", "BT", "RL")
FORMATS = (".dot", ".gv", ".svg", ".png", ".pdf")
COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
          "InnerProduct": "#CC33FF"}
DEFAULT_COLOR = "#6495ED"
IN_PLACE_COLOR = "#90EE90"
BLOB_COLOR = "#E0E0E0"


def _q(text: str) -> str:
    """A DOT quoted string ("\\n" in ``text`` stays a DOT line break)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _plain(v: Any, default: int) -> str:
    if isinstance(v, int):
        return str(v)
    return str(v[0]) if len(v) else str(default)


def _hw(p: Any, base: str, plain: str, default: int) -> str:
    """One of kernel size / stride / pad: "h x w" when the _h/_w fields are set, else the
    (first) plain value."""
    h, w = f"{base}_h", f"{base}_w"
    if p.HasField(h) or p.HasField(w):
        return f"{getattr(p, h)}x{getattr(p, w)}"
    return _plain(getattr(p, plain), default)


def _geometry(p: Any) -> list[str]:
    """Caffe's "kernel size / stride / pad" lines of a Convolution or Pooling parameter."""
    return [f"kernel size: {_hw(p, 'kernel', 'kernel_size', 1)}",
            f"stride: {_hw(p, 'stride', 'stride', 1)}", f"pad: {_hw(p, 'pad', 'pad', 0)}"]


def layer_label(lp: pb.LayerParameter) -> str:
    kind = lp.type
    lines = [lp.name]
    if kind == "Pooling":
        method = pb.PoolingParameter.PoolMethod.Name(lp.pooling_param.pool)
        lines.append(f"(Pooling {method})")
        if lp.pooling_param.global_pooling:
            lines.append("global")
        else:
            lines += _geometry(lp.pooling_param)
    else:
        lines.append(f"({kind})")
    if kind in ("Convolution", "Deconvolution"):
        cp = lp.convolution_param
        lines.append(f"num_output: {cp.num_output}")
        lines += _geometry(cp)
    elif kind == "InnerProduct":
        lines.append(f"num_output: {lp.inner_product_param.num_output}")
    elif kind == "Dropout":
        lines.append(f"ratio: {lp.dropout_param.dropout_ratio:g}")
    return "\n".join(lines)


def edge_label(lp: pb.LayerParameter) -> str | None:
    """Caffe's get_edge_label: the batch size for data layers, num_output for Conv/IP."""
    if lp.type in ("Data", "ImageData", "WindowData", "HDF5Data"):
        for field_name in ("data_param", "image_data_param", "window_data_param",
                           "hdf5_data_param"):
            if lp.HasField(field_name):
                return f"Batch {getattr(lp, field_name).batch_size}"
        return None
    if lp.type in ("Convolution", "Deconvolution"):
        return str(lp.convolution_param.num_output)
    if lp.type == "InnerProduct":
        return str(lp.inner_product_param.num_output)
    return None


def select_layers(param: pb.NetParameter, phase: str | None) -> list[pb.LayerParameter]:
    """All layers (phase None/ALL, like draw_net.py's default), or those a phase includes."""
    if phase is None or phase.upper() == "ALL":
        return list(param.layer)
    state = pb.NetState()
    state.CopyFrom(param.state)
    state.phase = parse_phase(phase)
    return [lp for _, lp in filter_layers(param, state)]


def net_to_dot(param: pb.NetParameter, rankdir: str = "LR", phase: str | None = None) -> str:
    """The DOT text of a net."""
    if rankdir.upper() not in RANKDIRS:
        raise ConfigError(f"unknown rankdir '{rankdir}' (one of {', '.join(RANKDIRS)})")
    layers = select_layers(param, phase)
    out = [f"digraph {_q(param.name or 'net')} {{",
           f"  rankdir={rankdir.upper()};",
           '  node [fontname="Helvetica", fontsize=10];',
           '  edge [fontname="Helvetica", fontsize=9];']
    blob_nodes: dict[str, str] = {}     # blob name -> its octagon node id
    current: dict[str, str] = {}        # blob name -> node id that holds its latest value
    legacy = list(param.input)
    for name in legacy:
        node = f"blob_{name}"
        blob_nodes[name] = node
        current[name] = node
        out.append(f"  {_q(node)} [label={_q(name)}, shape=octagon, style=filled, "
                   f'fillcolor="{BLOB_COLOR}"];')
    for k, lp in enumerate(layers):
        node = f"layer_{k}_{lp.name}"
        in_place = [t for j, t in enumerate(lp.top) if j < len(lp.bottom) and lp.bottom[j] == t]
        color = IN_PLACE_COLOR if in_place else COLORS.get(lp.type, DEFAULT_COLOR)
        out.append(f"  {_q(node)} [label={_q(layer_label(lp))}, shape=box, "
                   f'style="filled,rounded", fillcolor="{color}"];')
        for name in lp.bottom:
            if name not in current:  # a bottom nobody produced (filtered out): draw it anyway
                blob_nodes[name] = f"blob_{name}"
                current[name] = blob_nodes[name]
                out.append(f"  {_q(blob_nodes[name])} [label={_q(name)}, shape=octagon, "
                           f'style=filled, fillcolor="{BLOB_COLOR}"];')
            src = current[name]
            label = f" [label={_q(name)}]" if src != blob_nodes[name] else ""
            out.append(f"  {_q(src)} -> {_q(node)}{label};")
        top_label = edge_label(lp)
        for name in lp.top:
            if name in in_place:
                current[name] = node  # later readers of this blob read the in-place result
                out.append(f"  // in-place: layer {lp.name} rewrites blob {name}")
                continue
            if name not in blob_nodes:
                blob_nodes[name] = f"blob_{name}"
                out.append(f"  {_q(blob_nodes[name])} [label={_q(name)}, shape=octagon, "
                           f'style=filled, fillcolor="{BLOB_COLOR}"];')
            current[name] = blob_nodes[name]
            label = f" [label={_q(top_label)}]" if top_label else ""
            out.append(f"  {_q(node)} -> {_q(blob_nodes[name])}{label};")
    out.append("}")
    return "\n".join(out) + "\n"


def draw_net_file(model: str | os.PathLike[str], out: str | os.PathLike[str],
                  rankdir: str = "LR", phase: str | None = None) -> Path:
    """Write ``out`` (.dot/.gv as text; .svg/.png/.pdf through Graphviz's ``dot``)."""
    target = Path(out)
    ext = target.suffix.lower()
    if ext not in FORMATS:
        raise ConfigError(f"cannot write '{target.suffix or target.name}' files "
                          f"(use {', '.join(FORMATS)})", str(out))
    param, _ = load_net_param(model)
    dot_text = net_to_dot(param, rankdir, phase)
    target.parent.mkdir(parents=True, exist_ok=True)
    if ext in (".dot", ".gv"):
        target.write_text(dot_text, encoding="utf-8")
        return target
    exe = shutil.which("dot")
    if exe is None:
        raise ConfigError(f"writing {ext} needs Graphviz's 'dot' program, which is not on PATH: "
                          "install Graphviz (apt install graphviz, brew install graphviz, "
                          "conda install graphviz) or write a .dot file instead", str(out))
    proc = subprocess.run([exe, f"-T{ext[1:]}", "-o", str(target)], input=dot_text.encode(),
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"Graphviz dot failed: {proc.stderr.decode(errors='replace').strip()}",
                          str(out))
    return target
