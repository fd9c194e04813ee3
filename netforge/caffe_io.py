"""Caffe's binary files: ``.caffemodel`` weights and ``.solverstate`` solver states.

A ``.caffemodel`` is a binary ``NetParameter``; each ``layer`` entry carries its parameter
``blobs`` (``BlobProto``: a ``shape`` or the legacy num/channels/height/width, and ``data`` or
``double_data``). Old files use the V1 ``layers`` entries (or V0 ``layers { layer { ... } }``)
instead; their blobs are matched by layer name the same way. netforge's in-memory form is the
mapping {layer name: [arrays in blob order]} that :mod:`netforge.snapshot` uses for ``.npz``.

A ``.solverstate`` is a binary ``SolverState``: ``iter``, ``learned_net`` (the caffemodel's
path), ``history`` (one BlobProto per learnable param in the net's learnable-param order; 2N for
AdaDelta and Adam) and ``current_step``. netforge adds one field Caffe does not know
(``netforge_state`` = 10000, a JSON string with the solver type, RNG state and data cursors)
so a resume is bit-exact; Caffe's parser skips unknown fields, so the file still loads in
Caffe.

Writing is atomic (:func:`netforge.snapshot.atomic_write_bytes`). Messages are built with
protobuf; only a blob's packed float payload is appended as bytes (field ``data`` or
``double_data``, packed little-endian), so large nets do not go through per-value Python lists.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from netforge.errors import ConfigError
from netforge.proto import pb
from netforge.snapshot import atomic_write_bytes, read_weights, write_weights

if TYPE_CHECKING:
    from netforge.net import Net

log = logging.getLogger("netforge")

CAFFEMODEL = ".caffemodel"
SOLVERSTATE = ".solverstate"
# Caffe field numbers (caffe.proto) used by the direct encoder.
_NET_NAME, _NET_LAYER = 1, 100
_LAYER_BLOBS = 7
_BLOB_SHAPE, _BLOB_DATA, _BLOB_DOUBLE_DATA = 7, 5, 8


class LayerInfo(NamedTuple):
    """What a caffemodel layer entry records besides its blobs."""

    name: str
    type: str = ""
    bottom: tuple[str, ...] = ()
    top: tuple[str, ...] = ()


class CaffeWeights(dict[str, list[np.ndarray]]):
    """{layer name: arrays} read from a caffemodel; ``legacy`` holds the (layer, index) of
    blobs stored with the legacy 4-d num/channels/height/width fields, which Caffe accepts for
    any net blob of the same 4-d "legacy shape" (e.g. a bias (10,) stored as 1×1×1×10)."""

    def __init__(self) -> None:
        super().__init__()
        self.legacy: set[tuple[str, int]] = set()
        self.layers: list[LayerInfo] = []


@dataclass
class SolverStateFile:
    """A Caffe ``.solverstate``'s contents."""

    iter: int
    learned_net: str
    history: list[np.ndarray]
    current_step: int = 0
    legacy: list[bool] = field(default_factory=list)
    extra: dict[str, Any] | None = None


# -- wire helpers -----------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(payload)) + payload


def legacy_shape(shape: Sequence[int]) -> tuple[int, ...] | None:
    """Caffe's LegacyShape: the shape padded with leading 1s to 4 axes (None above 4 axes)."""
    if len(shape) > 4:
        return None
    return (1,) * (4 - len(shape)) + tuple(int(d) for d in shape)


def blob_to_array(blob: pb.BlobProto, where: str) -> tuple[np.ndarray, bool]:
    """(array, stored with the legacy 4-d fields?) as Caffe's Blob::FromProto reads it."""
    legacy = any(blob.HasField(k) for k in ("num", "channels", "height", "width"))
    if legacy:
        shape: tuple[int, ...] = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(int(d) for d in blob.shape.dim)
    if any(d < 0 for d in shape):
        raise ConfigError(f"blob has a negative dimension {shape}", where)
    count = int(np.prod(shape, dtype=np.int64))
    if len(blob.double_data):
        values, dtype, kind = blob.double_data, np.float64, "double_data"
    else:
        values, dtype, kind = blob.data, np.float32, "data"
    if len(values) != count:
        raise ConfigError(f"blob of shape {shape} needs {count} values but its {kind} holds "
                          f"{len(values)}", where)
    return np.array(values, dtype=dtype).reshape(shape), legacy


def blob_bytes(array: Any) -> bytes:
    """A serialized BlobProto: ``shape`` plus packed ``data`` (float32 arrays and anything
    else) or ``double_data`` (float64 arrays, as Caffe's double nets write them)."""
    a = np.asarray(array)
    shape = pb.BlobShape()
    shape.dim.extend(int(d) for d in a.shape)
    out = _delimited(_BLOB_SHAPE, shape.SerializeToString())
    if a.size:
        if a.dtype == np.float64:
            out += _delimited(_BLOB_DOUBLE_DATA, np.ascontiguousarray(a, "<f8").tobytes())
        else:
            out += _delimited(_BLOB_DATA, np.ascontiguousarray(a, "<f4").tobytes())
    return out


# -- caffemodel -------------------------------------------------------------------------------


def _is_caffe_file(path: str | os.PathLike[str], suffix: str) -> bool:
    """A Caffe binary file by name (``suffix``); other names (not ``.npz``) by content: not a
    zip archive, which netforge's .npz files are."""
    p = Path(path)
    if p.name.endswith(suffix):
        return True
    if p.suffix == ".npz" or not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) != b"PK\x03\x04"


def is_caffemodel(path: str | os.PathLike[str]) -> bool:
    return _is_caffe_file(path, CAFFEMODEL)


def parse_net(path: str | os.PathLike[str]) -> pb.NetParameter:
    p = Path(path)
    if not p.exists():
        raise ConfigError("weights file not found", str(path))
    if p.name.endswith(".h5"):
        raise ConfigError("HDF5 caffemodels are not supported; read it with Caffe/pycaffe and "
                          "save as .caffemodel (binary proto)", str(path))
    param = pb.NetParameter()
    try:
        param.ParseFromString(p.read_bytes())
    except (OSError, DecodeError) as e:
        raise ConfigError(f"cannot read the caffemodel (a binary NetParameter): {e}",
                          str(path)) from None
    return param


def net_to_weights(param: pb.NetParameter, where: str = "caffemodel") -> CaffeWeights:
    """{layer name: arrays} of every layer entry with blobs (new ``layer``, V1 ``layers`` and
    V0 ``layers { layer }``), in file order; a later entry of the same name wins, as in
    Caffe's CopyTrainedLayersFrom."""
    if len(param.layer) and len(param.layers):
        raise ConfigError("the caffemodel has both 'layer' and legacy V1 'layers' entries "
                          "(Caffe refuses to upgrade such a file)", where)
    entries: list[tuple[LayerInfo, Iterable[pb.BlobProto]]] = []
    for lp in param.layer:
        entries.append((LayerInfo(lp.name, lp.type, tuple(lp.bottom), tuple(lp.top)), lp.blobs))
    for v1 in param.layers:
        v0 = v1.layer if v1.HasField("layer") else None
        name = v1.name or (v0.name if v0 is not None else "")
        blobs = v1.blobs if len(v1.blobs) or v0 is None else v0.blobs
        kind = pb.V1LayerParameter.LayerType.Name(v1.type) if v1.type else (
            v0.type if v0 is not None else "")
        entries.append((LayerInfo(name, kind, tuple(v1.bottom), tuple(v1.top)), blobs))
    out = CaffeWeights()
    for info, blobs in entries:
        out.layers.append(info)
        arrays = []
        for k, blob in enumerate(blobs):
            arr, legacy = blob_to_array(blob, f"{where}: layer '{info.name}' blob {k}")
            arrays.append(arr)
            if legacy:
                out.legacy.add((info.name, k))
            else:
                out.legacy.discard((info.name, k))
        if arrays:
            out[info.name] = arrays
    return out


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeWeights:
    return net_to_weights(parse_net(path), str(path))


def fit_legacy_shapes(source: Mapping[str, list[np.ndarray]],
                      nets: Sequence[Net]) -> dict[str, list[np.ndarray]]:
    """Reshape legacy 4-d blobs to the net's blob shape where their legacy shapes agree
    (Caffe's Blob::ShapeEquals); anything else is left for the net's shape check."""
    legacy = getattr(source, "legacy", set())
    out = {name: list(arrays) for name, arrays in source.items()}
    for name, k in legacy:
        if name not in out or k >= len(out[name]):
            continue
        for net in nets:
            i = net.layer_by_name.get(name)
            if i is None or k >= len(net.layers[i].blobs):
                continue
            target = tuple(net.layers[i].blobs[k].shape)
            arr = out[name][k]
            if arr.shape != target and legacy_shape(target) == arr.shape:
                out[name][k] = arr.reshape(target)
            break
    return out


def read_any_weights(path: str | os.PathLike[str],
                     nets: Sequence[Net] = ()) -> dict[str, list[np.ndarray]]:
    """Weights from a ``.npz`` (netforge) or a ``.caffemodel`` (Caffe), by layer name;
    legacy-shaped caffemodel blobs are fitted to ``nets``' shapes."""
    if is_caffemodel(path):
        return fit_legacy_shapes(read_caffemodel(path), nets)
    return read_weights(path)


def net_layers(net: Net) -> list[LayerInfo]:
    """Every layer of a built net (Split layers included, as Caffe's Net::ToProto)."""
    return [LayerInfo(name, lp.type, tuple(bottoms), tuple(tops))
            for name, lp, bottoms, tops in zip(net.layer_names, net.layer_params,
                                               net.bottom_names, net.top_names, strict=True)]


def param_layers(param: pb.NetParameter, phase: int = pb.TRAIN) -> list[LayerInfo]:
    """The layers a net file includes in ``phase`` (TRAIN: what Caffe's snapshots hold)."""
    from netforge.net import filter_layers

    state = pb.NetState()
    state.CopyFrom(param.state)
    state.phase = phase
    layers = [LayerInfo(lp.name, lp.type, tuple(lp.bottom), tuple(lp.top))
              for _, lp in filter_layers(param, state)]
    layers += [LayerInfo(v1.name, pb.V1LayerParameter.LayerType.Name(v1.type),
                         tuple(v1.bottom), tuple(v1.top)) for v1 in param.layers]
    return layers


def caffemodel_bytes(weights: Mapping[str, Sequence[Any]],
                     layers: Sequence[LayerInfo] | None = None, name: str = "") -> bytes:
    """A serialized NetParameter: one ``layer`` per entry of ``layers`` (name, type, bottom,
    top and, where ``weights`` has them, blobs), then one per remaining weights entry (name
    and blobs only)."""
    out = bytearray()
    if name:
        out += _delimited(_NET_NAME, name.encode())
    seen: set[str] = set()
    for info in [*(layers or ()), *(LayerInfo(n) for n in weights)]:
        if info.name in seen:
            continue
        seen.add(info.name)
        lp = pb.LayerParameter(name=info.name, bottom=list(info.bottom), top=list(info.top))
        if info.type:
            lp.type = info.type
        body = lp.SerializeToString()
        for arr in weights.get(info.name, ()):
            body += _delimited(_LAYER_BLOBS, blob_bytes(arr))
        out += _delimited(_NET_LAYER, body)
    return bytes(out)


def write_caffemodel(path: str | os.PathLike[str], weights: Mapping[str, Sequence[Any]],
                     layers: Sequence[LayerInfo] | None = None, name: str = "") -> None:
    atomic_write_bytes(path, caffemodel_bytes(weights, layers, name))


def save_net(net: Net, path: str | os.PathLike[str]) -> None:
    """Net::ToProto's layout: every layer of the net in order, blobs where it has them."""
    write_caffemodel(path, net.weights(), net_layers(net), net.name)


# -- solverstate ------------------------------------------------------------------------------


def is_caffe_solverstate(path: str | os.PathLike[str]) -> bool:
    return _is_caffe_file(path, SOLVERSTATE)


def solverstate_bytes(iteration: int, learned_net: str, history: Sequence[Any],
                      current_step: int = 0, extra: Mapping[str, Any] | None = None) -> bytes:
    state = pb.SolverState(iter=int(iteration), learned_net=learned_net,
                           current_step=int(current_step))
    for h in history:
        state.history.add().MergeFromString(blob_bytes(h))
    if extra is not None:
        state.netforge_state = json.dumps(dict(extra))
    return state.SerializeToString()


def write_solverstate(path: str | os.PathLike[str], iteration: int, learned_net: str,
                      history: Sequence[Any], current_step: int = 0,
                      extra: Mapping[str, Any] | None = None) -> None:
    """A Caffe SolverState (plus netforge's ``extra`` resume state in ``netforge_state``,
    which Caffe ignores), written atomically."""
    atomic_write_bytes(path, solverstate_bytes(iteration, learned_net, history, current_step,
                                               extra))


def read_solverstate(path: str | os.PathLike[str]) -> SolverStateFile:
    p = Path(path)
    if not p.exists():
        raise ConfigError("solver state file not found", str(path))
    if p.name.endswith(CAFFEMODEL):
        raise ConfigError("this is a weights file (.caffemodel), not a solver state; resume "
                          "takes the .solverstate written beside it, and --weights fine-tunes "
                          "from a .caffemodel", str(path))
    raw = p.read_bytes()
    state = pb.SolverState()
    try:
        state.ParseFromString(raw)
    except (DecodeError, ValueError) as e:
        raise ConfigError(f"cannot read the solver state (a binary SolverState): {e}",
                          str(path)) from None
    history, legacy = [], []
    for k, blob in enumerate(state.history):
        arr, was_legacy = blob_to_array(blob, f"{path}: history blob {k}")
        history.append(arr)
        legacy.append(was_legacy)
    extra = None
    if state.HasField("netforge_state"):
        try:
            extra = json.loads(state.netforge_state)
        except json.JSONDecodeError as e:
            raise ConfigError(f"netforge's resume state (netforge_state) is not valid JSON: "
                              f"{e}", str(path)) from None
    return SolverStateFile(state.iter, state.learned_net, history, state.current_step, legacy,
                           extra)


# -- conversion -------------------------------------------------------------------------------


def convert_weights(src: str | os.PathLike[str], dst: str | os.PathLike[str],
                    model: str | os.PathLike[str] | None = None
                    ) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Convert weights between .npz and .caffemodel (either direction, chosen by ``dst``'s
    name: ``.npz`` or anything else = caffemodel). ``model`` (a net file) supplies the layer
    types, bottoms and tops of a caffemodel (its TRAIN phase, as Caffe's snapshots). Returns
    (layer, blob shapes) for each layer converted."""
    weights: dict[str, list[np.ndarray]] = dict(read_any_weights(src))
    if Path(dst).suffix == ".npz":
        write_weights(dst, weights)
    else:
        layers = None
        name = ""
        if model is not None:
            from netforge.config import load_net_param

            param, _ = load_net_param(model)
            layers, name = param_layers(param), param.name
            known = {info.name for info in layers}
            missing = [n for n in weights if n not in known]
            if missing:
                log.warning("Not in the TRAIN phase of %s (written with name and blobs only): "
                            "%s", model, ", ".join(missing))
        write_caffemodel(dst, weights, layers, name)
    return [(n, [tuple(a.shape) for a in arrays]) for n, arrays in weights.items()]
