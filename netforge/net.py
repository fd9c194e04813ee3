"""Net: a layer DAG built from a NetParameter, with Caffe's semantics.

Building a net follows Caffe's Net::Init: filter layers by the NetState (phase, level, stages),
insert Split layers where a top feeds several bottoms, wire tops and bottoms by name (in-place
when a top repeats the bottom at its index), set up each layer and infer shapes, assign loss
weights, share parameters by ``param { name }``, and decide which layers need backward.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from netforge.backend import NumpyBackend, get_backend
from netforge.backend.base import Backend
from netforge.blob import Blob
from netforge.config import SourceMap, format_path, load_net_param
from netforge.errors import ConfigError, NetforgeError, did_you_mean
from netforge.layers import REGISTRY, Layer, LayerContext
from netforge.proto import pb

log = logging.getLogger("netforge")

PHASES = {"TRAIN": pb.TRAIN, "TEST": pb.TEST}


def parse_phase(phase: str | int) -> int:
    if isinstance(phase, str):
        try:
            return PHASES[phase.upper()]
        except KeyError:
            raise ConfigError(f"unknown phase '{phase}' (expected TRAIN or TEST)") from None
    if phase not in (pb.TRAIN, pb.TEST):
        raise ConfigError(f"unknown phase {phase} (expected 0 = TRAIN or 1 = TEST)")
    return int(phase)


def phase_name(phase: int) -> str:
    return pb.Phase.Name(phase)


# ---------------------------------------------------------------------------------------------
# filtering by NetState


def state_meets_rule(state: pb.NetState, rule: pb.NetStateRule, layer_name: str) -> bool:
    """Caffe's StateMeetsRule: every condition the rule sets must hold."""
    if rule.HasField("phase") and rule.phase != state.phase:
        log.debug("The NetState phase (%d) differed from the phase (%d) specified by a rule in "
                  "layer %s", state.phase, rule.phase, layer_name)
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def filter_layers(param: pb.NetParameter, state: pb.NetState,
                  smap: SourceMap | None = None) -> list[tuple[int, pb.LayerParameter]]:
    """(index in the file, layer) for each layer the state includes."""
    kept = []
    for i, layer in enumerate(param.layer):
        if layer.include and layer.exclude:
            where = smap.where(("layer", i)) if smap else None
            raise ConfigError(f"layer '{layer.name}' has both include and exclude rules; "
                              "specify one or the other", where)
        if layer.include:
            included = any(state_meets_rule(state, r, layer.name) for r in layer.include)
        else:
            included = not any(state_meets_rule(state, r, layer.name) for r in layer.exclude)
        if included:
            kept.append((i, layer))
    return kept


# ---------------------------------------------------------------------------------------------
# Split insertion


def split_layer_name(blob: str, layer: str, top_index: int) -> str:
    return f"{blob}_{layer}_{top_index}_split"


def split_blob_name(blob: str, layer: str, top_index: int, k: int) -> str:
    return f"{split_layer_name(blob, layer, top_index)}_{k}"


def insert_splits(layers: list[tuple[int, pb.LayerParameter]], smap: SourceMap | None = None,
                  known: Sequence[str] = ()) -> list[tuple[int | None, pb.LayerParameter]]:
    """Caffe's InsertSplits: a top read by several bottoms (an explicit nonzero loss_weight
    counts as one more reader) gets a Split layer right after its producer."""
    last_top: dict[str, tuple[int, int]] = {name: (-1, k) for k, name in enumerate(known)}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    readers: dict[tuple[int, int], int] = {}
    loss_weight: dict[tuple[int, int], float] = {}
    for i, (orig, lp) in enumerate(layers):
        for j, bottom in enumerate(lp.bottom):
            if bottom not in last_top:
                where = smap.where(("layer", orig, "bottom", j)) if smap else None
                raise ConfigError(
                    f"layer '{lp.name}' ({lp.type}): unknown bottom blob '{bottom}' "
                    f"(bottom {j}); no earlier layer in this phase produces it",
                    where, did_you_mean(bottom, last_top))
            src = last_top[bottom]
            source_of[(i, j)] = src
            readers[src] = readers.get(src, 0) + 1
        for j, top in enumerate(lp.top):
            in_place = j < len(lp.bottom) and lp.bottom[j] == top
            if top in last_top and not in_place:
                src = last_top[top]
                producer = layers[src[0]][1].name if src[0] >= 0 else "the net inputs"
                where = smap.where(("layer", orig, "top", j)) if smap else None
                raise ConfigError(
                    f"layer '{lp.name}': top blob '{top}' is already produced by layer "
                    f"'{producer}' (in-place use must repeat the bottom at the same index)",
                    where)
            last_top[top] = (i, j)
        for j, w in enumerate(lp.loss_weight):
            loss_weight[(i, j)] = w
            if w != 0:
                readers[(i, j)] = readers.get((i, j), 0) + 1

    out: list[tuple[int | None, pb.LayerParameter]] = []
    used: dict[tuple[int, int], int] = {}
    for i, (orig, lp) in enumerate(layers):
        lp = _copy(lp)
        for j, bottom in enumerate(lp.bottom):
            src = source_of[(i, j)]
            if readers.get(src, 0) > 1 and src[0] >= 0:
                k = used.get(src, 0)
                used[src] = k + 1
                producer = layers[src[0]][1].name
                lp.bottom[j] = split_blob_name(bottom, producer, src[1], k)
        out.append((orig, lp))
        for j, top in enumerate(lp.top):
            n = readers.get((i, j), 0)
            if n <= 1:
                continue
            split = pb.LayerParameter(name=split_layer_name(top, lp.name, j), type="Split")
            split.bottom.append(top)
            split.top.extend(split_blob_name(top, lp.name, j, k) for k in range(n))
            w = loss_weight.get((i, j), 0.0)
            if w:
                split.loss_weight.extend([w] + [0.0] * (n - 1))
                # The split carries the weight now: the producer's top keeps weight 0.
                weights = list(lp.loss_weight)
                weights[j] = 0.0
                del lp.loss_weight[:]
                lp.loss_weight.extend(weights)
            out.append((None, split))
    return out


def _copy(lp: pb.LayerParameter) -> pb.LayerParameter:
    c = pb.LayerParameter()
    c.CopyFrom(lp)
    return c


# ---------------------------------------------------------------------------------------------


@dataclass
class ParamInfo:
    """One learnable parameter blob (an owner, never a sharer) and its multipliers."""

    blob: Blob
    lr_mult: float
    decay_mult: float
    layer: str
    index: int
    name: str = ""


class Net:
    """A network in one phase. Like pycaffe's Net::

        net = Net("models/lenet_train_test.yaml", "TEST", weights="lenet_iter_10000.npz")
        out = net.forward()            # {"accuracy": ..., "loss": ...}
        net.blobs["conv1"].data        # activations by blob name
        net.params["conv1"][0].data    # weights by layer name
    """

    def __init__(self, model: str | os.PathLike[str] | pb.NetParameter, phase: str | int = "TEST",
                 *, level: int = 0, stages: Sequence[str] = (), state: pb.NetState | None = None,
                 weights: str | os.PathLike[str] | None = None,
                 backend: Backend | str | None = None,
                 rng: np.random.Generator | None = None, seed: int | None = None,
                 source: SourceMap | None = None, base_dir: str | os.PathLike[str] | None = None,
                 verbose: bool = True):
        if isinstance(model, pb.NetParameter):
            param, smap = model, source
            self.path: str | None = None
        else:
            param, smap = load_net_param(model)
            self.path = str(model)
            base_dir = base_dir or Path(model).parent
        self.source = smap
        self.base_dir = Path(base_dir) if base_dir is not None else None
        if isinstance(backend, str) or backend is None:
            backend = get_backend(backend or "CPU")
        self.backend: Backend = backend or NumpyBackend()
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.verbose = verbose

        self.state = pb.NetState()
        self.state.CopyFrom(param.state)
        self.state.phase = parse_phase(phase)
        if level:
            self.state.level = level
        self.state.stage.extend(s for s in stages if s not in self.state.stage)
        if state is not None:
            self.state.MergeFrom(state)
        self.phase = self.state.phase
        self.name = param.name
        self.param = param

        self.layers: list[Layer] = []
        self.layer_names: list[str] = []
        self.layer_params: list[pb.LayerParameter] = []
        self.bottom_vecs: list[list[Blob]] = []
        self.top_vecs: list[list[Blob]] = []
        self.bottom_names: list[list[str]] = []
        self.top_names: list[list[str]] = []
        self.loss_weights: list[list[float]] = []
        self.layer_need_backward: list[bool] = []
        self.bottom_need_backward: list[list[bool]] = []
        self.blobs: OrderedDict[str, Blob] = OrderedDict()
        self.learnable_params: list[ParamInfo] = []
        self.inputs: list[str] = []
        self.outputs: list[str] = []
        self.loss = 0.0
        self._build(param, smap)
        # per layer: the bottom and top shapes its last reshape in forward() saw
        self._shaped: list[list[tuple[int, ...]] | None] = [None] * len(self.layers)
        if weights is not None:
            self.copy_from(weights)

    # -- building ---------------------------------------------------------------------------------
    def _where(self, orig: int | None, *path: str | int) -> str | None:
        if self.source is None or orig is None:
            return self.source.filename if self.source else None
        return self.source.where(("layer", orig, *path))

    def _info(self, msg: str, *args: Any) -> None:
        if self.verbose:
            log.info(msg, *args, stacklevel=2)

    def resolve_path(self, p: str) -> str:
        """Data sources: as given (relative to the working directory, like Caffe), else
        relative to the net file's folder."""
        if os.path.isabs(p) or os.path.exists(p) or self.base_dir is None:
            return p
        alt = self.base_dir / p
        return str(alt) if alt.exists() else p

    def _build(self, param: pb.NetParameter, smap: SourceMap | None) -> None:
        if len(param.layers):
            # A V0/V1 NetParameter given directly (files are upgraded by load_net_param).
            from netforge.upgrade import upgrade_loaded_net

            param, smap = upgrade_loaded_net(param, smap, self.path)
            self.param, self.source = param, smap
        self._info("Initializing net from parameters: name: %s, phase: %s", param.name,
                   phase_name(self.phase))
        ctx = LayerContext(backend=self.backend, phase=self.phase, rng=self.rng,
                           resolve_path=self.resolve_path)
        layers: list[tuple[int, pb.LayerParameter]] = []
        legacy_inputs = self._legacy_inputs(param)
        if legacy_inputs is not None:
            layers.append((-1, legacy_inputs))
        layers += filter_layers(param, self.state, smap)
        with_splits = insert_splits(layers, smap)
        producers: dict[str, str] = {}
        unused: OrderedDict[str, None] = OrderedDict()
        memory = 0
        for orig, lp in with_splits:
            o = orig if orig is not None and orig >= 0 else None
            cls = REGISTRY.get(lp.type)
            if cls is None:
                raise ConfigError(f"layer '{lp.name}': unknown layer type '{lp.type}'",
                                  self._where(o, "type"), did_you_mean(lp.type, REGISTRY))
            layer = cls(lp, ctx)
            self._info("Creating Layer %s", lp.name)
            top_names = list(lp.top)
            if cls.auto_top_blobs and len(top_names) < layer.min_top_count():
                # Caffe's anonymous "(automatic)" tops: computed (and counted in the loss)
                # but never an input to another layer nor a net output.
                top_names += [f"(automatic {lp.name} {k})"
                              for k in range(len(top_names), layer.min_top_count())]
            problem = layer.check_counts(len(lp.bottom), len(top_names))
            if problem:
                raise ConfigError(f"layer '{lp.name}' ({lp.type}) {problem}", self._where(o))
            bottoms = []
            for name in lp.bottom:
                bottoms.append(self.blobs[name])
                unused.pop(name, None)
                self._info("%s <- %s", lp.name, name)
            tops = []
            for j, name in enumerate(top_names):
                if j < len(lp.bottom) and lp.bottom[j] == name:
                    tops.append(self.blobs[name])
                    self._info("%s -> %s (in-place)", lp.name, name)
                elif name in self.blobs:
                    raise ConfigError(
                        f"layer '{lp.name}': top blob '{name}' is already produced by layer "
                        f"'{producers[name]}' (in-place use must repeat the bottom at the same "
                        "index)", self._where(o, "top", j))
                else:
                    blob = Blob(self.backend, (), name)
                    self.blobs[name] = blob
                    producers[name] = lp.name
                    tops.append(blob)
                    self._info("%s -> %s", lp.name, name)
                if j < len(lp.top):
                    unused[name] = None
            self._info("Setting up %s", lp.name)
            try:
                layer.setup(bottoms, tops)
                layer.reshape(bottoms, tops)
            except NetforgeError as e:
                shapes = ", ".join(f"{n} {b.shape}" for n, b in zip(lp.bottom, bottoms,
                                                                     strict=True))
                detail = f" (bottoms: {shapes})" if shapes else ""
                raise ConfigError(f"layer '{lp.name}' ({lp.type}): {e}{detail}",
                                  self._where(o)) from None
            weights = self._loss_weights(layer, lp, len(tops), o)
            for t, w in zip(tops, weights, strict=True):
                self._info("Top shape: %s (%d)", " ".join(map(str, t.shape)), t.count)
                if w:
                    self._info("    with loss weight %g", w)
                memory += t.count
            self.layers.append(layer)
            self.layer_names.append(lp.name)
            self.layer_params.append(lp)
            self.bottom_vecs.append(bottoms)
            self.top_vecs.append(tops)
            self.bottom_names.append(list(lp.bottom))
            self.top_names.append(top_names)
            self.loss_weights.append(weights)
            self._append_params(layer, lp, o)
        self._info("Memory required for data: %d", memory * self.backend.dtype.itemsize)
        self._need_backward(param.force_backward)
        self._pooling_after = self._pooling_pairs()
        self._pooled_by = {j: i for i, j in self._pooling_after.items()}
        self.outputs = sorted(unused)
        for name in self.outputs:
            self._info("This network produces output %s", name)
        self.inputs = [n for lp in self.layer_params if lp.type == "Input" for n in lp.top]
        self.layer_by_name = {n: i for i, n in enumerate(self.layer_names)}
        self._info("Network initialization done.")

    @staticmethod
    def _legacy_inputs(param: pb.NetParameter) -> pb.LayerParameter | None:
        """Net-level ``input``/``input_shape``/``input_dim`` become an Input layer (Caffe's
        upgrade does the same)."""
        if not param.input:
            return None
        lp = pb.LayerParameter(name="input", type="Input")
        lp.top.extend(param.input)
        if param.input_shape:
            for s in param.input_shape:
                lp.input_param.shape.add().CopyFrom(s)
        elif param.input_dim:
            dims = list(param.input_dim)
            for k in range(len(param.input)):
                lp.input_param.shape.add().dim.extend(dims[4 * k:4 * k + 4])
        return lp

    def _loss_weights(self, layer: Layer, lp: pb.LayerParameter, n_tops: int,
                      orig: int | None) -> list[float]:
        weights = list(lp.loss_weight)
        if not weights and layer.is_loss:
            weights = [1.0]
        if weights and len(weights) != n_tops:
            if layer.is_loss and not lp.loss_weight and n_tops > 1:
                raise ConfigError(
                    f"layer '{lp.name}' ({lp.type}) has {n_tops} tops: give loss_weight once "
                    "per top (e.g. 1 for the loss and 0 for the others)", self._where(orig))
            raise ConfigError(f"layer '{lp.name}': loss_weight must be unspecified or given once "
                              f"per top blob ({n_tops} tops, {len(weights)} weights)",
                              self._where(orig, "loss_weight", 0))
        return weights or [0.0] * n_tops

    def _append_params(self, layer: Layer, lp: pb.LayerParameter, orig: int | None) -> None:
        owners = self._owners = getattr(self, "_owners", {})
        layer.param_propagate_down = []  # type: ignore[attr-defined]
        for j, blob in enumerate(layer.blobs):
            spec = lp.param[j] if j < len(lp.param) else pb.ParamSpec()
            layer.param_propagate_down.append(spec.lr_mult != 0)  # type: ignore[attr-defined]
            if spec.name and spec.name in owners:
                owner_layer, owner_index, owner_spec, owner_blob = owners[spec.name]
                where = self._where(orig, "param", j)
                if spec.share_mode == pb.ParamSpec.PERMISSIVE:
                    if owner_blob.count != blob.count:
                        raise ConfigError(
                            f"layer '{lp.name}': cannot share param '{spec.name}' owned by layer "
                            f"'{owner_layer}': counts differ ({owner_blob.count} vs "
                            f"{blob.count})", where)
                elif owner_blob.shape != blob.shape:
                    raise ConfigError(
                        f"layer '{lp.name}': cannot share param '{spec.name}' owned by layer "
                        f"'{owner_layer}': shapes differ ({owner_blob.shape} vs {blob.shape}); "
                        "use share_mode: PERMISSIVE to share by count", where)
                for mult in ("lr_mult", "decay_mult"):
                    if spec.HasField(mult) and owner_spec.HasField(mult) and \
                            getattr(spec, mult) != getattr(owner_spec, mult):
                        raise ConfigError(f"layer '{lp.name}': shared param '{spec.name}' has a "
                                          f"different {mult} than its owner '{owner_layer}'", where)
                if owner_blob.shape == blob.shape:
                    layer.blobs[j] = owner_blob
                else:
                    view = Blob(self.backend, (), owner_blob.name)
                    view.data = owner_blob.data.reshape(blob.shape)
                    view.diff = owner_blob.diff.reshape(blob.shape)
                    layer.blobs[j] = view
                self._info("Sharing parameters '%s' owned by layer '%s', param index %d",
                           spec.name, owner_layer, owner_index)
                continue
            if spec.name:
                owners[spec.name] = (lp.name, j, spec, blob)
            blob.name = f"{lp.name}[{j}]"
            self.learnable_params.append(
                ParamInfo(blob, spec.lr_mult, spec.decay_mult, lp.name, j, spec.name))

    def _need_backward(self, force_backward: bool) -> None:
        need_blob: dict[str, bool] = {}
        for i, layer in enumerate(self.layers):
            lp = self.layer_params[i]
            if lp.propagate_down and len(lp.propagate_down) != len(lp.bottom):
                raise ConfigError(f"layer '{lp.name}': propagate_down must be given once per "
                                  "bottom", None)
            need = any(need_blob.get(b, False) for b in self.bottom_names[i])
            need = need or any(layer.param_propagate_down)  # type: ignore[attr-defined]
            # An explicit propagate_down overrides the blob's own need (Caffe's AppendBottom).
            bottom_need = [bool(lp.propagate_down[j]) if lp.propagate_down
                           else need_blob.get(b, False)
                           for j, b in enumerate(self.bottom_names[i])]
            if not layer.has_backward:
                need = False
                bottom_need = [False] * len(bottom_need)
            self.layer_need_backward.append(need)
            self.bottom_need_backward.append(bottom_need)
            for t in self.top_names[i]:
                need_blob[t] = need_blob.get(t, False) or need
        under_loss: set[str] = set()
        skip: set[str] = set()
        for i in reversed(range(len(self.layers))):
            contributes = False
            skip_down = True
            for j, t in enumerate(self.top_names[i]):
                if self.loss_weights[i][j] != 0 or t in under_loss:
                    contributes = True
                if t not in skip:
                    skip_down = False
            if self.layer_need_backward[i] and skip_down:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_names[i])
            if not contributes:
                self.layer_need_backward[i] = False
            for j, b in enumerate(self.bottom_names[i]):
                if contributes:
                    under_loss.add(b)
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip.add(b)
        if force_backward:
            for i, layer in enumerate(self.layers):
                if not layer.has_backward:
                    continue
                self.layer_need_backward[i] = True
                self.bottom_need_backward[i] = [
                    need or layer.allow_force_backward(j)
                    for j, need in enumerate(self.bottom_need_backward[i])]
                layer.param_propagate_down = [True] * len(layer.blobs)  # type: ignore[attr-defined]
        for i, name in enumerate(self.layer_names):
            self._info("%s %s backward computation.", name,
                       "needs" if self.layer_need_backward[i] else "does not need")

    # A Convolution whose top only the next layer reads, a MAX Pooling, may make that layer's
    # forward and backward inside its own, image by image (Convolution.forward_pooled; where
    # the backend or the layers cannot, each runs its own as before). Only the Net's full
    # passes do this: a forward that ends at the convolution or starts at the pooling runs
    # them apart, and so do layers whose passes were wrapped (_unwrapped).
    FUSE_POOLING = True

    def _pooling_pairs(self) -> dict[int, int]:
        """Convolution index -> the index of the Pooling layer it may run inside its own."""
        from netforge.layers.vision import Convolution, Pooling

        readers: dict[int, int] = {}
        for bottoms in self.bottom_vecs:
            for b in bottoms:
                readers[id(b)] = readers.get(id(b), 0) + 1
        pairs = {}
        for i in range(len(self.layers) - 1):
            conv, pool, j = self.layers[i], self.layers[i + 1], i + 1
            if not (type(conv) is Convolution and type(pool) is Pooling
                    and len(self.bottom_vecs[i]) == len(self.top_vecs[i]) == 1
                    and len(self.top_vecs[j]) == 1):
                continue
            blob = self.top_vecs[i][0]
            if (self.bottom_vecs[j][0] is not blob or self.top_vecs[j][0] is blob
                    or readers[id(blob)] != 1 or self.loss_weights[i][0] or self.loss_weights[j][0]
                    or self.layer_need_backward[i] != self.layer_need_backward[j]
                    or (self.layer_need_backward[j] and not self.bottom_need_backward[j][0])):
                continue
            pairs[i] = j
        return pairs

    def _unwrapped(self, *indices: int) -> bool:
        """Whether these layers' forward and backward are their classes' own: a layer whose
        passes were wrapped on the instance (debug_info's logging, a user's hook) expects
        them called, so it runs apart."""
        return not any("forward" in vars(self.layers[i]) or "backward" in vars(self.layers[i])
                       for i in indices)

    # -- running ----------------------------------------------------------------------------------
    @property
    def params(self) -> OrderedDict[str, list[Blob]]:
        """Layer name -> its parameter blobs (layers without parameters are left out)."""
        return OrderedDict((n, layer.blobs) for n, layer in zip(self.layer_names, self.layers,
                                                                strict=True) if layer.blobs)

    def forward(self, start: int = 0, end: int | None = None,
                **inputs: Any) -> dict[str, Any]:
        """Run layers [start, end]; keyword arguments set input blobs first. Returns the
        output blobs' data by name; the weighted loss is in ``self.loss``."""
        for name, value in inputs.items():
            if name not in self.blobs:
                raise ConfigError(f"no blob named '{name}' in net '{self.name}'",
                                  hint=did_you_mean(name, self.blobs))
            arr = self.backend.asarray(value)
            self.blobs[name].reshape(arr.shape)
            self.blobs[name].data[...] = arr
        end = len(self.layers) - 1 if end is None else end
        loss, pooled = 0.0, -1
        pairs = self._pooling_after if self.FUSE_POOLING else {}
        with self.backend.running():
            for i in range(start, end + 1):
                if i == pooled:  # its forward ran inside the convolution's
                    continue
                layer, bottom, top = self.layers[i], self.bottom_vecs[i], self.top_vecs[i]
                self._reshape(i)
                j = pairs.get(i, end + 1)
                if j <= end and self._unwrapped(i, j):
                    self._reshape(j)
                    if layer.forward_pooled(bottom, top, self.layers[j], self.top_vecs[j]):
                        pooled = j
                        continue
                layer.forward(bottom, top)
                for t, w in zip(top, self.loss_weights[i], strict=True):
                    if w:
                        loss += w * float(t.data.sum())
        self.loss = loss
        return {name: self.blobs[name].data for name in self.outputs}

    def _reshape(self, i: int) -> None:
        """Caffe reshapes every layer before every forward. A layer whose reshape depends only
        on shapes is skipped while its bottoms and tops keep the shapes its last reshape saw
        (LeNet: ~0.1 ms a step of Python)."""
        layer, bottom, top = self.layers[i], self.bottom_vecs[i], self.top_vecs[i]
        shapes = [b.data.shape for b in bottom] + [t.data.shape for t in top]
        if shapes != self._shaped[i] or layer.reshape_each_forward or not bottom:
            layer.reshape(bottom, top)
            self._shaped[i] = [b.data.shape for b in bottom] + [t.data.shape for t in top]

    def backward_prepare(self) -> None:
        """Seed the loss tops' diffs with their loss weights (Caffe's SetLossWeights)."""
        for i in range(len(self.layers)):
            for t, w in zip(self.top_vecs[i], self.loss_weights[i], strict=True):
                if w:
                    t.diff[...] = w

    def backward(self, ready: Callable[[int], None] | None = None) -> None:
        """Backward through every layer that needs it, last to first. ``ready(i)`` is called
        once the layers from i on are done (whether layer i ran or not): the gradients of the
        params that only those layers use are then final."""
        self.backward_prepare()
        need, pairs = self.layer_need_backward, self._pooling_after if self.FUSE_POOLING else {}
        with self.backend.running():
            for i in reversed(range(len(self.layers))):
                self._backward_layer(i, need, pairs)
                if ready is not None:
                    ready(i)

    def _backward_layer(self, i: int, need: list[bool], pairs: dict[int, int]) -> None:
        if not need[i] or (self.FUSE_POOLING and i in self._pooled_by):
            return  # a pooling's backward waits for its convolution's (below)
        layer, top, bottom = self.layers[i], self.top_vecs[i], self.bottom_vecs[i]
        j = pairs.get(i)
        if j is not None and need[j]:
            if self._unwrapped(i, j) and layer.backward_pooled(
                    top, self.bottom_need_backward[i], bottom, self.layers[j],
                    self.top_vecs[j]):
                return
            self.layers[j].backward(self.top_vecs[j], self.bottom_need_backward[j],
                                    self.bottom_vecs[j])
        layer.backward(top, self.bottom_need_backward[i], bottom)

    def forward_backward(self, ready: Callable[[int], None] | None = None) -> float:
        self.forward()
        if ready is None:
            self.backward()  # as a wrapper on the instance (debug_info's) expects it
        else:
            self.backward(ready)
        return self.loss

    def param_users(self) -> list[list[int]]:
        """For each learnable param, the indices of the layers that use it (owner and
        sharers), in order."""
        xp = self.backend.xp
        return [[i for i, layer in enumerate(self.layers)
                 if any(b is p.blob or xp.may_share_memory(b.diff, p.blob.diff)
                        for b in layer.blobs)]
                for p in self.learnable_params]

    def param_ready_at(self) -> list[int]:
        """For each learnable param, the index of the first layer that uses it (owner or
        sharer): its gradient is final once backward has passed that layer."""
        return [min(users) for users in self.param_users()]

    def clear_param_diffs(self) -> None:
        for p in self.learnable_params:
            p.blob.diff[...] = 0

    def output_weight(self, name: str) -> float:
        """The loss weight of an output blob (0 for non-loss outputs)."""
        for i, names in enumerate(self.top_names):
            if name in names:
                return self.loss_weights[i][names.index(name)]
        return 0.0

    # -- weights ----------------------------------------------------------------------------------
    def share_trained_layers_with(self, other: Net) -> None:
        """Use ``other``'s parameter blobs for every layer of the same name (the TEST net
        reading the TRAIN net's weights). Layers only here keep their own weights."""
        for i, layer in enumerate(self.layers):
            j = other.layer_by_name.get(self.layer_names[i])
            if j is None or not layer.blobs:
                continue
            src = other.layers[j].blobs
            if len(src) != len(layer.blobs):
                raise ConfigError(f"layer '{self.layer_names[i]}' has {len(layer.blobs)} "
                                  f"parameter blobs here and {len(src)} in the train net")
            for k, (mine, theirs) in enumerate(zip(layer.blobs, src, strict=True)):
                if mine.shape != theirs.shape:
                    raise ConfigError(f"layer '{self.layer_names[i]}' param {k}: shape "
                                      f"{mine.shape} here but {theirs.shape} in the train net")
            layer.blobs[:] = src

    def weights(self) -> dict[str, list[Any]]:
        """Layer name -> host copies of its parameter arrays."""
        return {name: [self.backend.to_numpy(b.data) for b in blobs]
                for name, blobs in self.params.items()}

    def copy_from(self, path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
        """Load weights by layer name (fine-tuning) from netforge's .npz or Caffe's
        .caffemodel. Returns (loaded, ignored) layer names."""
        from netforge.caffe_io import read_any_weights

        source = read_any_weights(path, [self])
        return self.load_weights(source, str(path))

    def load_weights(self, source: Mapping[str, Sequence[np.ndarray]],
                     origin: str = "weights") -> tuple[list[str], list[str]]:
        loaded, ignored = [], []
        for name, arrays in source.items():
            i = self.layer_by_name.get(name)
            if i is None:
                log.info("Ignoring source layer %s", name)
                ignored.append(name)
                continue
            blobs = self.layers[i].blobs
            if len(blobs) != len(arrays):
                raise ConfigError(f"incompatible number of blobs for layer '{name}': "
                                  f"{len(arrays)} in the weights, {len(blobs)} in the net", origin)
            for k, (b, a) in enumerate(zip(blobs, arrays, strict=True)):
                if tuple(b.shape) != tuple(a.shape):
                    raise ConfigError(
                        f"cannot copy param {k} weights from layer '{name}'; shape mismatch. "
                        f"Source param shape is {tuple(a.shape)}; target param shape is "
                        f"{b.shape}. To learn this layer's parameters from scratch rather than "
                        "copying from a saved net, rename the layer.", origin)
                b.data[...] = self.backend.asarray(a)
            loaded.append(name)
        return loaded, ignored

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the weights atomically: as Caffe's binary NetParameter when the name ends in
        .caffemodel, else as .npz."""
        from netforge.caffe_io import CAFFEMODEL, save_net
        from netforge.snapshot import write_weights

        if str(path).endswith(CAFFEMODEL):
            save_net(self, path)
            return
        write_weights(path, self.weights())

    def close(self) -> None:
        """Stop background work (data prefetch threads)."""
        for layer in self.layers:
            closer = getattr(layer, "close", None)
            if closer is not None:
                closer()

    def describe_layer(self, i: int) -> str:
        return f"layer '{self.layer_names[i]}' ({self.layer_params[i].type})"


def key_path(*parts: str | int) -> str:
    return format_path(tuple(parts))
