"""Upgrading Caffe's legacy configs to the current form (Caffe's upgrade_proto.cpp).

* V0 nets (``layers { layer { type: "conv" kernelsize: 5 ... } bottom: ... }``, with separate
  ``padding`` layers) become V1 nets (UpgradeV0Net), then
* the data-layer transformation fields of V1 ``DATA``/``IMAGE_DATA``/``WINDOW_DATA`` layers
  (``scale``, ``mean_file``, ``crop_size``, ``mirror`` in their own parameters) move into
  ``transform_param`` (UpgradeNetDataTransformation), then
* V1 nets (``layers { type: CONVOLUTION blobs_lr: 1 weight_decay: 1 ... }``) become ``layer``
  entries with string types and ``param { lr_mult decay_mult name share_mode }``
  (UpgradeV1Net).

``upgrade_net(param, full=True)`` (``netforge upgrade-config``) also does what Caffe's current
upgrade does beyond that: net-level ``input``/``input_shape``/``input_dim`` become an ``Input``
layer (UpgradeNetInput) and a Data layer's deprecated ``data_param`` transformation fields move
into ``transform_param``. Loading a net upgrades only the legacy layer forms (the Net handles
net-level inputs itself), so that source locations keep their layer indices.

``upgrade_solver`` turns the deprecated ``solver_type`` enum into the ``type`` string
(UpgradeSolverType) and upgrades the solver's inline nets.
"""

from __future__ import annotations

import logging

from netforge.config import KeyPath, SourceMap
from netforge.errors import ConfigError
from netforge.proto import pb

log = logging.getLogger("netforge")

V1 = pb.V1LayerParameter

# UpgradeV1LayerType
V1_TYPES: dict[int, str] = {
    V1.NONE: "", V1.ABSVAL: "AbsVal", V1.ACCURACY: "Accuracy", V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL", V1.CONCAT: "Concat", V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution", V1.DECONVOLUTION: "Deconvolution", V1.DATA: "Data",
    V1.DROPOUT: "Dropout", V1.DUMMY_DATA: "DummyData", V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise", V1.EXP: "Exp", V1.FLATTEN: "Flatten", V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output", V1.HINGE_LOSS: "HingeLoss", V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData", V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct", V1.LRN: "LRN", V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss", V1.MVN: "MVN",
    V1.POOLING: "Pooling", V1.POWER: "Power", V1.RELU: "ReLU", V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss", V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax", V1.SOFTMAX_LOSS: "SoftmaxWithLoss", V1.SPLIT: "Split",
    V1.SLICE: "Slice", V1.TANH: "TanH", V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}

# UpgradeV0LayerType
V0_TYPES: dict[str, int] = {
    "accuracy": V1.ACCURACY, "bnll": V1.BNLL, "concat": V1.CONCAT, "conv": V1.CONVOLUTION,
    "data": V1.DATA, "dropout": V1.DROPOUT, "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN, "hdf5_data": V1.HDF5_DATA, "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL, "images": V1.IMAGE_DATA, "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT, "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS, "pool": V1.POOLING,
    "relu": V1.RELU, "sigmoid": V1.SIGMOID, "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS, "split": V1.SPLIT, "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

# V0 field -> {V0 layer type: (V1 sub-message, its field)}; a field set on a layer type not
# listed is reported and dropped, as Caffe does.
_V0_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "num_output": {"conv": ("convolution_param", "num_output"),
                   "innerproduct": ("inner_product_param", "num_output")},
    "biasterm": {"conv": ("convolution_param", "bias_term"),
                 "innerproduct": ("inner_product_param", "bias_term")},
    "weight_filler": {"conv": ("convolution_param", "weight_filler"),
                      "innerproduct": ("inner_product_param", "weight_filler")},
    "bias_filler": {"conv": ("convolution_param", "bias_filler"),
                    "innerproduct": ("inner_product_param", "bias_filler")},
    "pad": {"conv": ("convolution_param", "pad"), "pool": ("pooling_param", "pad")},
    "kernelsize": {"conv": ("convolution_param", "kernel_size"),
                   "pool": ("pooling_param", "kernel_size")},
    "group": {"conv": ("convolution_param", "group")},
    "stride": {"conv": ("convolution_param", "stride"), "pool": ("pooling_param", "stride")},
    "pool": {"pool": ("pooling_param", "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    "local_size": {"lrn": ("lrn_param", "local_size")},
    "alpha": {"lrn": ("lrn_param", "alpha")},
    "beta": {"lrn": ("lrn_param", "beta")},
    "k": {"lrn": ("lrn_param", "k")},
    "source": {"data": ("data_param", "source"), "hdf5_data": ("hdf5_data_param", "source"),
               "images": ("image_data_param", "source"),
               "window_data": ("window_data_param", "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "batchsize": {"data": ("data_param", "batch_size"),
                  "hdf5_data": ("hdf5_data_param", "batch_size"),
                  "images": ("image_data_param", "batch_size"),
                  "window_data": ("window_data_param", "batch_size")},
    "rand_skip": {"data": ("data_param", "rand_skip"),
                  "images": ("image_data_param", "rand_skip")},
    "shuffle_images": {"images": ("image_data_param", "shuffle")},
    "new_height": {"images": ("image_data_param", "new_height")},
    "new_width": {"images": ("image_data_param", "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": ("window_data_param", "fg_threshold")},
    "det_bg_threshold": {"window_data": ("window_data_param", "bg_threshold")},
    "det_fg_fraction": {"window_data": ("window_data_param", "fg_fraction")},
    "det_context_pad": {"window_data": ("window_data_param", "context_pad")},
    "det_crop_mode": {"window_data": ("window_data_param", "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", "")},
}
# V0 fields that go to transform_param whatever the layer type.
_V0_TRANSFORM = {"scale": "scale", "meanfile": "mean_file", "cropsize": "crop_size",
                 "mirror": "mirror"}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")
_V1_DATA_PARAMS = {V1.DATA: "data_param", V1.IMAGE_DATA: "image_data_param",
                   V1.WINDOW_DATA: "window_data_param"}
# V1 sub-messages copied over as they are (every V1LayerParameter message field but the few
# handled on their own).
_V1_COPIED = tuple(
    fd.name for fd in V1.DESCRIPTOR.fields
    if fd.message_type is not None and fd.name not in ("include", "exclude", "blobs", "layer"))

SOLVER_TYPES = {pb.SolverParameter.SGD: "SGD", pb.SolverParameter.NESTEROV: "Nesterov",
                pb.SolverParameter.ADAGRAD: "AdaGrad", pb.SolverParameter.RMSPROP: "RMSProp",
                pb.SolverParameter.ADADELTA: "AdaDelta", pb.SolverParameter.ADAM: "Adam"}


def net_needs_v0_upgrade(param: pb.NetParameter) -> bool:
    return any(lp.HasField("layer") for lp in param.layers)


def net_needs_v1_upgrade(param: pb.NetParameter) -> bool:
    return len(param.layers) > 0


def net_needs_upgrade(param: pb.NetParameter, full: bool = False) -> bool:
    """Whether ``upgrade_net(param, full=full)`` would change anything."""
    if net_needs_v1_upgrade(param):
        return True
    if full:
        return bool(param.input) or any(_modern_data_fields(lp) for lp in param.layer)
    return False


def _where(smap: SourceMap | None, *path: str | int) -> str | None:
    return smap.where(tuple(path)) if smap is not None else None


# -- V0 -> V1 ---------------------------------------------------------------------------------


def _remove_v0_padding(param: pb.NetParameter, smap: SourceMap | None) -> list[int]:
    """UpgradeV0PaddingLayers, in place: drop ``padding`` layers, give their pad to the
    conv/pool layer they feed. Returns the original index of each remaining layer."""
    last_top: dict[str, int] = {name: -1 for name in param.input}
    kept: list[pb.V1LayerParameter] = []
    origin: list[int] = []
    for i, conn in enumerate(param.layers):
        v0 = conn.layer
        new = None
        if v0.type != "padding":
            new = pb.V1LayerParameter()
            new.CopyFrom(conn)
            kept.append(new)
            origin.append(i)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise ConfigError(f"V0 layer '{v0.name}': unknown bottom blob '{blob}'",
                                  _where(smap, "layers", i, "bottom", j))
            src = last_top[blob]
            if src < 0 or param.layers[src].layer.type != "padding":
                continue
            pad = param.layers[src]
            if v0.type not in ("conv", "pool"):
                raise ConfigError(f"V0 padding layer '{pad.layer.name}' feeds layer "
                                  f"'{v0.name}' of type '{v0.type}' (only conv and pool can "
                                  "take padding)", _where(smap, "layers", i))
            if len(conn.bottom) != 1 or len(pad.bottom) != 1 or len(pad.top) != 1:
                raise ConfigError(f"V0 padding layer '{pad.layer.name}' and the layer it "
                                  "feeds must each have one bottom (and the padding one top)",
                                  _where(smap, "layers", src))
            if new is not None:
                new.layer.pad = pad.layer.pad
                new.bottom[j] = pad.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    del param.layers[:]
    param.layers.extend(kept)
    return origin


def _v0_to_v1(conn: pb.V1LayerParameter, smap: SourceMap | None, index: int,
              notes: list[str]) -> pb.V1LayerParameter:
    """UpgradeV0LayerParameter."""
    out = pb.V1LayerParameter()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return out
    v0 = conn.layer
    if v0.HasField("name"):
        out.name = v0.name
    kind = v0.type
    if v0.HasField("type"):
        if kind not in V0_TYPES:
            raise ConfigError(f"unknown V0 layer type '{kind}' (known: {', '.join(V0_TYPES)})",
                              _where(smap, "layers", index, "layer", "type"))
        out.type = V0_TYPES[kind]  # type: ignore[assignment]
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for field, targets in _V0_FIELDS.items():
        if not v0.HasField(field):
            continue
        target = targets.get(kind)
        if target is None:
            notes.append(f"V0 layer '{v0.name}': parameter {field} does not apply to layer "
                         f"type '{kind}'; dropped")
            continue
        sub_name, name = target
        sub = getattr(out, sub_name)
        value = getattr(v0, field)
        if not name:
            sub.CopyFrom(value)
        elif field in ("weight_filler", "bias_filler"):
            getattr(sub, name).CopyFrom(value)
        elif field == "pool":
            sub.pool = value  # V0 and current PoolMethod share their numbers
        elif sub.DESCRIPTOR.fields_by_name[name].is_repeated:
            getattr(sub, name).append(value)
        else:
            setattr(sub, name, value)
    for field, name in _V0_TRANSFORM.items():
        if v0.HasField(field):
            setattr(out.transform_param, name, getattr(v0, field))
    return out


def _upgrade_v0(param: pb.NetParameter, smap: SourceMap | None, notes: list[str]) -> list[int]:
    """UpgradeV0Net, in place. Returns each new layer's original index."""
    origin = _remove_v0_padding(param, smap)
    upgraded = [_v0_to_v1(conn, smap, origin[k], notes) for k, conn in enumerate(param.layers)]
    del param.layers[:]
    param.layers.extend(upgraded)
    return origin


# -- data transformation fields ---------------------------------------------------------------


def _upgrade_v1_data_transform(param: pb.NetParameter) -> bool:
    """UpgradeNetDataTransformation: the V1 data layers' own scale/mean_file/crop_size/mirror
    move into transform_param (overriding it, as Caffe does)."""
    changed = False
    for lp in param.layers:
        sub_name = _V1_DATA_PARAMS.get(lp.type)
        if sub_name is None or not lp.HasField(sub_name):
            continue
        sub = getattr(lp, sub_name)
        for name in _TRANSFORM_FIELDS:
            if sub.HasField(name):
                setattr(lp.transform_param, name, getattr(sub, name))
                sub.ClearField(name)
                changed = True
    return changed


def _modern_data_fields(lp: pb.LayerParameter) -> list[str]:
    if lp.type != "Data" or not lp.HasField("data_param"):
        return []
    return [n for n in _TRANSFORM_FIELDS if lp.data_param.HasField(n)]


def _upgrade_modern_data_transform(param: pb.NetParameter, notes: list[str]) -> None:
    """A Data layer's deprecated data_param transformation fields -> transform_param, where
    transform_param does not set them already (what the Data layer reads)."""
    for lp in param.layer:
        for name in _modern_data_fields(lp):
            if not lp.transform_param.HasField(name):
                setattr(lp.transform_param, name, getattr(lp.data_param, name))
                notes.append(f"layer '{lp.name}': data_param.{name} moved to "
                             f"transform_param.{name}")
            else:
                notes.append(f"layer '{lp.name}': dropped data_param.{name} (transform_param."
                             f"{name} is set and wins)")
            lp.data_param.ClearField(name)


# -- V1 -> current ----------------------------------------------------------------------------


def _grow(lp: pb.LayerParameter, n: int) -> pb.ParamSpec:
    while len(lp.param) <= n:
        lp.param.add()
    return lp.param[n]


def upgrade_v1_layer(v1: pb.V1LayerParameter) -> pb.LayerParameter:
    """UpgradeV1LayerParameter."""
    lp = pb.LayerParameter()
    lp.bottom.extend(v1.bottom)
    lp.top.extend(v1.top)
    if v1.HasField("name"):
        lp.name = v1.name
    lp.include.extend(v1.include)
    lp.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        lp.type = V1_TYPES.get(v1.type, "")
    lp.blobs.extend(v1.blobs)
    for i, name in enumerate(v1.param):
        _grow(lp, i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        _grow(lp, i).share_mode = mode  # type: ignore[assignment]  # same numbers
    for i, lr in enumerate(v1.blobs_lr):
        _grow(lp, i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        _grow(lp, i).decay_mult = decay
    lp.loss_weight.extend(v1.loss_weight)
    for name in _V1_COPIED:
        if v1.HasField(name):
            getattr(lp, name).CopyFrom(getattr(v1, name))
    return lp


# -- nets -------------------------------------------------------------------------------------


def _upgrade_inputs(param: pb.NetParameter) -> bool:
    """UpgradeNetInput: net-level inputs with shapes become an Input layer in front. Inputs
    without any shape are kept as they are (the Net reads them)."""
    if not param.input or not (param.input_shape or param.input_dim):
        return False
    lp = pb.LayerParameter(name="input", type="Input")
    lp.top.extend(param.input)
    dims = list(param.input_dim)
    for k in range(len(param.input)):
        shape = lp.input_param.shape.add()
        if param.input_shape:
            if k < len(param.input_shape):
                shape.CopyFrom(param.input_shape[k])
        else:
            shape.dim.extend(dims[4 * k:4 * k + 4])
    layers = [lp, *param.layer]
    del param.layer[:]
    param.layer.extend(layers)
    param.ClearField("input")
    param.ClearField("input_shape")
    param.ClearField("input_dim")
    return True


def upgrade_net(param: pb.NetParameter, *, full: bool = False,
                smap: SourceMap | None = None) -> list[str]:
    """Upgrade ``param`` in place (UpgradeNetAsNeeded). Returns one line per change made, for
    the log. ``full`` also moves net-level inputs into an Input layer and a Data layer's
    deprecated data_param fields into transform_param (what ``upgrade-config`` writes)."""
    notes: list[str] = []
    if len(param.layers) and len(param.layer):
        raise ConfigError("this net mixes 'layer' entries with legacy V1 'layers' entries; "
                          "use one form (netforge upgrade-config converts 'layers')",
                          _where(smap, "layers", 0))
    if net_needs_v0_upgrade(param):
        _upgrade_v0(param, smap, notes)
        notes.append("upgraded V0 'layers { layer { ... } }' to V1 'layers'")
    if _upgrade_v1_data_transform(param):
        notes.append("moved the data layers' scale/mean_file/crop_size/mirror into "
                     "transform_param")
    if len(param.layers):
        layers = [upgrade_v1_layer(v1) for v1 in param.layers]
        param.ClearField("layers")
        param.layer.extend(layers)
        notes.append("upgraded V1 'layers' to 'layer'")
    if full:
        _upgrade_modern_data_transform(param, notes)
        if _upgrade_inputs(param):
            notes.append("net-level input/input_dim/input_shape became an Input layer")
    return notes


def upgrade_source_map(param: pb.NetParameter, smap: SourceMap) -> SourceMap:
    """Positions of a V0/V1 net's ``layers`` entries, re-keyed as the upgraded ``layer``
    entries (best effort: a field's new path falls back to its layer's position)."""
    v0 = net_needs_v0_upgrade(param)
    order = list(range(len(param.layers)))
    if v0:
        order = [i for i, conn in enumerate(param.layers) if conn.layer.type != "padding"]
    new_index = {old: new for new, old in enumerate(order)}
    renamed = {"blobs_lr": "param", "weight_decay": "param", "blob_share_mode": "param"}
    out = SourceMap(smap.filename)
    for key, pos in smap.positions.items():
        new_key: KeyPath = key
        if len(key) >= 2 and key[0] == "layers" and isinstance(key[1], int):
            j = new_index.get(key[1])
            if j is None:
                continue
            rest = key[2:]
            if v0 and rest[:1] == ("layer",):
                rest = rest[1:]
            if rest and isinstance(rest[0], str):
                rest = (renamed.get(rest[0], rest[0]), *rest[1:])
            new_key = ("layer", j, *rest)
        out.positions.setdefault(new_key, pos)
    return out


def upgrade_loaded_net(param: pb.NetParameter, smap: SourceMap | None,
                       origin: str | None = None) -> tuple[pb.NetParameter, SourceMap | None]:
    """A V0/V1 net as an upgraded copy (and its re-keyed source map), with a warning in the
    log; a current net is returned as it is."""
    if not net_needs_v1_upgrade(param):
        return param, smap
    new = pb.NetParameter()
    new.CopyFrom(param)
    notes = upgrade_net(new, smap=smap)
    new_smap = upgrade_source_map(param, smap) if smap is not None else None
    name = origin or (smap.filename if smap is not None else None) or f"net '{param.name}'"
    for note in notes:
        log.warning("%s: %s", name, note)
    log.warning("%s: this is Caffe's legacy syntax; `netforge upgrade-config` writes the "
                "current form", name)
    return new, new_smap


# -- solvers ----------------------------------------------------------------------------------


def solver_needs_upgrade(sp: pb.SolverParameter, full: bool = True) -> bool:
    nets = [sp.net_param, sp.train_net_param, *sp.test_net_param]
    return sp.HasField("solver_type") or any(net_needs_upgrade(n, full) for n in nets)


def upgrade_solver(sp: pb.SolverParameter, *, full: bool = True,
                   smap: SourceMap | None = None) -> list[str]:
    """UpgradeSolverAsNeeded, in place: ``solver_type`` (enum) -> ``type`` (string); inline
    nets are upgraded too. Returns one line per change."""
    notes: list[str] = []
    if sp.HasField("solver_type"):
        if sp.HasField("type"):
            raise ConfigError("set either 'type' or the deprecated 'solver_type', not both",
                              _where(smap, "solver_type"))
        sp.type = SOLVER_TYPES[sp.solver_type]
        sp.ClearField("solver_type")
        notes.append(f"solver_type (enum) became type: \"{sp.type}\"")
    nets: list[tuple[str, pb.NetParameter]] = [
        (k, getattr(sp, k)) for k in ("net_param", "train_net_param") if sp.HasField(k)]
    nets += [(f"test_net_param[{i}]", n) for i, n in enumerate(sp.test_net_param)]
    for key, net in nets:
        notes += [f"{key}: {note}" for note in upgrade_net(net, full=full)]
    return notes
