"""Shape and utility layers: Reshape, Slice, Silence, ArgMax, Reduction, Tile, Crop,
BatchReindex, Filter, Parameter, Embed (Caffe's semantics, see each class)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from netforge.blob import Blob
from netforge.layers.base import Layer, LayerError, canonical_axis, register, shape_str
from netforge.proto import pb

REDUCE = pb.ReductionParameter


def refuse_in_place(layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
    if any(t is b for t in top for b in bottom):
        raise LayerError(f"{layer.type} does not allow in-place computation")


def index_values(xp: Any, data: Any, limit: int, what: str) -> Any:
    """``data`` as int64 indices, after checking that each value is a whole number in
    [0, limit)."""
    flat = data.reshape(-1)
    if flat.size:
        lo, hi = float(flat.min()), float(flat.max())
        if lo < 0 or hi >= limit:
            bad = lo if lo < 0 else hi
            raise LayerError(f"{what} {bad:g} is out of range [0, {limit})")
        if bool(xp.any(flat != xp.floor(flat))):
            raise LayerError(f"{what} must be whole numbers")
    return flat.astype("int64")


# -- Reshape ---------------------------------------------------------------------------------------
@register
class Reshape(Layer):
    """Changes the shape, not the data: axes [axis, axis+num_axes) of the bottom are replaced by
    reshape_param.shape, where 0 copies the bottom's dim at that position and one -1 is
    inferred from the count. As in Caffe, the top shares data and diff with the bottom (a
    view), so backward has nothing to do."""

    type = "Reshape"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        dims = [int(d) for d in self.param.reshape_param.shape.dim]
        self.dims = dims
        self.copy_axes = [i for i, d in enumerate(dims) if d == 0]
        inferred = [i for i, d in enumerate(dims) if d == -1]
        if len(inferred) > 1:
            raise LayerError("reshape_param.shape contains more than one -1 dim; at most one "
                             "dim may be inferred")
        bad = [d for d in dims if d < -1]
        if bad:
            raise LayerError(f"reshape_param.shape dim {bad[0]} is invalid: dims are positive, "
                             "0 (copy the bottom's dim) or -1 (infer)")
        self.inferred_axis = inferred[0] if inferred else -1
        self.constant_count = 1
        for d in dims:
            if d > 0:
                self.constant_count *= d
        if self.param.reshape_param.num_axes < -1:
            raise LayerError("reshape_param.num_axes must be >= 0, or -1 for all")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        rp = self.param.reshape_param
        b = bottom[0]
        n = b.num_axes
        start = rp.axis if rp.axis >= 0 else n + rp.axis + 1
        if not 0 <= start <= n:
            raise LayerError(f"reshape_param.axis {rp.axis} is out of range for a bottom of "
                             f"shape {shape_str(b.shape)}")
        end = n if rp.num_axes == -1 else start + rp.num_axes
        if end > n:
            raise LayerError(f"reshape_param.axis + num_axes ({start} + {rp.num_axes}) is out "
                             f"of range for a bottom of shape {shape_str(b.shape)}")
        shape = [*b.shape[:start], *self.dims, *b.shape[end:]]
        for i in self.copy_axes:
            if start + i >= n:
                raise LayerError(f"reshape_param.shape has a 0 at position {i}, but the bottom "
                                 f"{shape_str(b.shape)} has no axis {start + i} to copy")
            shape[start + i] = b.shape[start + i]
        if self.inferred_axis >= 0:
            explicit = self.constant_count * b.count_range(0, start) * b.count_range(end)
            for i in self.copy_axes:
                explicit *= shape[start + i]
            if explicit == 0 or b.count % explicit:
                raise LayerError(f"cannot infer the -1 dim: the bottom count ({b.count}) is not "
                                 f"divisible by the product of the other dims ({explicit})")
            shape[start + self.inferred_axis] = b.count // explicit
        count = 1
        for s in shape:
            count *= s
        if count != b.count:
            raise LayerError(f"the new shape {shape_str(shape)} has {count} elements but the "
                             f"bottom {shape_str(b.shape)} has {b.count}")
        self.top_shape = tuple(shape)
        self._share(bottom[0], top[0])

    def _share(self, b: Blob, t: Blob) -> None:
        t.data = b.data.reshape(self.top_shape)
        t.diff = b.diff.reshape(self.top_shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if not self.xp.may_share_memory(top[0].data, bottom[0].data):
            self._share(bottom[0], top[0])

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        # The diffs are shared; copy only if someone replaced the top's arrays.
        if propagate_down[0] and not self.xp.may_share_memory(top[0].diff, bottom[0].diff):
            bottom[0].diff[...] = top[0].diff.reshape(bottom[0].shape)


# -- Slice -----------------------------------------------------------------------------------------
@register
class Slice(Layer):
    """Cuts the bottom along slice_param.axis (or the deprecated slice_dim) into the tops: at
    the slice_points (one fewer than the tops, strictly increasing), or into equal parts."""

    type = "Slice"
    exact_bottoms = 1
    min_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        sp = self.param.slice_param
        if sp.HasField("axis") and sp.HasField("slice_dim"):
            raise LayerError("give either slice_param.axis or the deprecated slice_dim, not both")
        self.points = [int(p) for p in sp.slice_point]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        sp = self.param.slice_param
        b = bottom[0]
        if sp.HasField("slice_dim"):
            self.axis = int(sp.slice_dim)
            if self.axis >= b.num_axes:
                raise LayerError(f"slice_dim {self.axis} is out of range for a bottom of shape "
                                 f"{shape_str(b.shape)}")
        else:
            self.axis = canonical_axis(b, sp.axis, "slice_param.axis")
        dim = b.shape[self.axis]
        n = len(top)
        if self.points:
            if len(self.points) != n - 1:
                raise LayerError(f"Slice with {n} tops takes {n - 1} slice_point(s), got "
                                 f"{len(self.points)}")
            if n > dim:
                raise LayerError(f"cannot slice axis {self.axis} of size {dim} into {n} tops")
            prev = 0
            sizes = []
            for p in self.points:
                if p <= prev:
                    raise LayerError(f"slice_point values must be positive and strictly "
                                     f"increasing, got {self.points}")
                sizes.append(p - prev)
                prev = p
            if prev > dim:
                raise LayerError(f"slice_point {prev} is beyond axis {self.axis} of size {dim} "
                                 f"(bottom {shape_str(b.shape)})")
            sizes.append(dim - prev)
        else:
            if dim % n:
                raise LayerError(f"the number of tops ({n}) must evenly divide axis "
                                 f"{self.axis} of size {dim}")
            sizes = [dim // n] * n
        self.bounds = []
        start = 0
        for t, size in zip(top, sizes, strict=True):
            shape = list(b.shape)
            shape[self.axis] = size
            t.reshape(shape)
            self.bounds.append((start, start + size))
            start += size

    def _index(self, lo: int, hi: int) -> tuple[slice, ...]:
        return (slice(None),) * self.axis + (slice(lo, hi),)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        for t, (lo, hi) in zip(top, self.bounds, strict=True):
            t.data[...] = bottom[0].data[self._index(lo, hi)]

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        for t, (lo, hi) in zip(top, self.bounds, strict=True):
            bottom[0].diff[self._index(lo, hi)] = t.diff


# -- Silence ---------------------------------------------------------------------------------------
@register
class Silence(Layer):
    """Consumes its bottoms so that they are not net outputs; no tops. Backward writes zero
    diffs."""

    type = "Silence"
    min_bottoms = 1
    exact_tops = 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        pass

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        pass

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        for b, down in zip(bottom, propagate_down, strict=True):
            if down:
                b.diff[...] = 0


# -- ArgMax ----------------------------------------------------------------------------------------
@register
class ArgMax(Layer):
    """The indices (or, with out_max_val and an axis, the values) of the top_k largest entries.

    With argmax_param.axis: along that axis; the top is the bottom's shape with that axis
    replaced by top_k. Without: over each item's flattened values (all axes but the first); the
    top has max(3, bottom axes) axes, (N, 1, top_k, 1...), and out_max_val makes it
    (N, 2, top_k, 1...) with the indices in channel 0 and the values in channel 1.
    Ties go to the larger index (Caffe's std::greater on (value, index) pairs)."""

    type = "ArgMax"
    exact_bottoms = 1
    exact_tops = 1
    has_backward = False

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        ap = self.param.argmax_param
        self.top_k = int(ap.top_k)
        self.out_max_val = bool(ap.out_max_val)
        self.has_axis = ap.HasField("axis")
        if self.top_k < 1:
            raise LayerError("argmax_param.top_k must be at least 1")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        b = bottom[0]
        if self.has_axis:
            self.axis = canonical_axis(b, self.param.argmax_param.axis, "argmax_param.axis")
            if self.top_k > b.shape[self.axis]:
                raise LayerError(f"argmax_param.top_k ({self.top_k}) exceeds the size of axis "
                                 f"{self.axis} ({b.shape[self.axis]}) of the bottom "
                                 f"{shape_str(b.shape)}")
            shape = list(b.shape)
            shape[self.axis] = self.top_k
        else:
            if b.num_axes < 1:
                raise LayerError("ArgMax without an axis needs a bottom with a first (num) axis")
            dim = b.count_range(1)
            if self.top_k > dim:
                raise LayerError(f"argmax_param.top_k ({self.top_k}) exceeds the number of "
                                 f"values per item ({dim}) of the bottom {shape_str(b.shape)}")
            shape = [1] * max(3, b.num_axes)
            shape[0] = b.shape[0]
            shape[1] = 2 if self.out_max_val else 1
            shape[2] = self.top_k
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        x = bottom[0].data
        k = self.top_k
        if self.has_axis:
            x = xp.moveaxis(x, self.axis, -1)
        else:
            x = x.reshape(x.shape[0], -1)
        # Ascending stable sort, reversed: largest first, and ties larger index first.
        order = xp.argsort(x, axis=-1, kind="stable")[..., ::-1][..., :k]
        values = xp.take_along_axis(x, order, axis=-1)
        out = top[0].data
        if self.has_axis:
            result = values if self.out_max_val else order.astype(out.dtype)
            out[...] = xp.moveaxis(result, -1, self.axis)
        else:
            n = x.shape[0]
            view = out.reshape(n, -1, k)
            view[:, 0, :] = order
            if self.out_max_val:
                view[:, 1, :] = values


# -- Reduction -------------------------------------------------------------------------------------
@register
class Reduction(Layer):
    """Reduces all axes from reduction_param.axis on with SUM, ASUM (Σ|x|), SUMSQ (Σx²) or MEAN,
    times coeff; the top keeps the axes before ``axis`` (axis 0 gives a scalar)."""

    type = "Reduction"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.op = self.param.reduction_param.operation
        if self.op not in (REDUCE.SUM, REDUCE.ASUM, REDUCE.SUMSQ, REDUCE.MEAN):
            raise LayerError(f"unknown reduction_param.operation {self.op}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        b = bottom[0]
        self.axis = canonical_axis(b, self.param.reduction_param.axis, "reduction_param.axis")
        self.num = b.count_range(0, self.axis)
        self.dim = b.count_range(self.axis)
        top[0].reshape(b.shape[:self.axis])
        self.coeff = float(self.param.reduction_param.coeff)
        if self.op == REDUCE.MEAN:
            if self.dim == 0:
                raise LayerError("MEAN reduction of an empty bottom")
            self.coeff /= self.dim

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(self.num, self.dim)
        if self.op == REDUCE.ASUM:
            y = self.xp.abs(x).sum(axis=1)
        elif self.op == REDUCE.SUMSQ:
            y = (x * x).sum(axis=1)
        else:
            y = x.sum(axis=1)
        if self.coeff != 1.0:
            y = y * self.coeff
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if not propagate_down[0]:
            return
        g = top[0].diff.reshape(self.num, 1) * self.coeff
        diff = bottom[0].diff.reshape(self.num, self.dim)
        if self.op == REDUCE.ASUM:
            diff[...] = self.xp.sign(bottom[0].data.reshape(self.num, self.dim)) * g
        elif self.op == REDUCE.SUMSQ:
            diff[...] = bottom[0].data.reshape(self.num, self.dim) * (2 * g)
        else:
            diff[...] = g


# -- Tile ------------------------------------------------------------------------------------------
@register
class Tile(Layer):
    """Repeats the bottom tile_param.tiles times along tile_param.axis (the whole block from
    that axis on is repeated, like numpy.tile); backward sums the copies."""

    type = "Tile"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        tp = self.param.tile_param
        if not tp.HasField("tiles"):
            raise LayerError("tile_param.tiles (the number of tiles) must be given")
        if tp.tiles < 1:
            raise LayerError(f"tile_param.tiles must be positive, got {tp.tiles}")
        self.tiles = int(tp.tiles)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        b = bottom[0]
        self.axis = canonical_axis(b, self.param.tile_param.axis, "tile_param.axis")
        self.outer = b.count_range(0, self.axis)
        self.inner = b.count_range(self.axis)
        shape = list(b.shape)
        shape[self.axis] *= self.tiles
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        x = bottom[0].data.reshape(self.outer, 1, self.inner)
        top[0].data.reshape(self.outer, self.tiles, self.inner)[...] = x

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            dy = top[0].diff.reshape(self.outer, self.tiles, self.inner)
            bottom[0].diff[...] = dy.sum(axis=1).reshape(bottom[0].shape)


# -- Crop ------------------------------------------------------------------------------------------
@register
class Crop(Layer):
    """Crops bottom 0 to the shape of bottom 1 on every axis from crop_param.axis on (default
    2), starting at crop_param.offset: none (0), one for every cropped axis, or one per cropped
    axis. Backward reaches bottom 0 only (zero outside the crop); the reference bottom gets a
    zero diff."""

    type = "Crop"
    exact_bottoms = 2
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        cp = self.param.crop_param
        start = canonical_axis(bottom[0], cp.axis, "crop_param.axis")
        n_crop = bottom[0].num_axes - start
        if len(cp.offset) > 1 and len(cp.offset) != n_crop:
            raise LayerError(f"crop_param.offset takes one value or one per cropped axis "
                             f"({n_crop}: axes {start}..{bottom[0].num_axes - 1}), got "
                             f"{len(cp.offset)}")

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        cp = self.param.crop_param
        data, ref = bottom[0], bottom[1]
        start = canonical_axis(data, cp.axis, "crop_param.axis")
        n = data.num_axes
        if len(cp.offset) > 1 and len(cp.offset) != n - start:
            raise LayerError(f"crop_param.offset takes one value or one per cropped axis "
                             f"({n - start}), got {len(cp.offset)}")
        if ref.num_axes < n:
            raise LayerError(f"the reference bottom {shape_str(ref.shape)} has fewer axes than "
                             f"the bottom to crop {shape_str(data.shape)}")
        shape = list(data.shape)
        self.index: list[slice] = []
        for i in range(n):
            offset = 0
            if i >= start:
                shape[i] = ref.shape[i]
                if len(cp.offset) == 1:
                    offset = int(cp.offset[0])
                elif len(cp.offset) > 1:
                    offset = int(cp.offset[i - start])
                if data.shape[i] - offset < ref.shape[i]:
                    raise LayerError(f"the crop of axis {i} is out of bounds: size "
                                     f"{ref.shape[i]} at offset {offset} in a bottom of shape "
                                     f"{shape_str(data.shape)}")
            self.index.append(slice(offset, offset + shape[i]))
        top[0].reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = bottom[0].data[tuple(self.index)]

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = 0
            bottom[0].diff[tuple(self.index)] = top[0].diff
        if propagate_down[1]:
            bottom[1].diff[...] = 0  # the crop does not depend on the reference's values


# -- BatchReindex ----------------------------------------------------------------------------------
@register
class BatchReindex(Layer):
    """top[i] = bottom0[indices[i]] along the first axis, where bottom 1 is a 1-D blob of
    indices in [0, N). Backward accumulates into the rows that were picked (repeats sum);
    the indices get no gradient."""

    type = "BatchReindex"
    exact_bottoms = 2
    exact_tops = 1

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index == 0

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        if bottom[1].num_axes != 1:
            raise LayerError(f"BatchReindex takes a 1-D blob of indices as bottom 1, got shape "
                             f"{shape_str(bottom[1].shape)}")
        if bottom[0].num_axes < 1:
            raise LayerError("BatchReindex needs a bottom 0 with a first (num) axis")
        top[0].reshape((bottom[1].shape[0], *bottom[0].shape[1:]))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.idx = index_values(self.xp, bottom[1].data, bottom[0].shape[0],
                                "BatchReindex index")
        top[0].data[...] = self.xp.take(bottom[0].data, self.idx, axis=0)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[1]:
            bottom[1].diff[...] = 0
        if not propagate_down[0]:
            return
        xp = self.xp
        diff = bottom[0].diff
        diff[...] = 0
        inner = bottom[0].count_range(1)
        if top[0].count:
            flat = self.idx[:, None] * inner + xp.arange(inner)[None, :]
            self.backend.scatter_add(diff, flat, top[0].diff.reshape(-1, inner))


# -- Filter ----------------------------------------------------------------------------------------
@register
class Filter(Layer):
    """Keeps the items (first-axis entries) whose selector value is nonzero. The last bottom is
    the selector, of shape (N, 1, ...); the tops are the selected items of the other bottoms,
    in order. An all-zero selector gives empty tops (N = 0), as in Caffe; the first reshape
    (at net setup) keeps all N items, since the selector is not known yet. Backward copies the
    top diffs back and writes 0 for the dropped items; the selector gets no gradient."""

    type = "Filter"
    min_bottoms = 2
    min_tops = 1
    reshape_each_forward = True  # the tops' length is the selector's count of nonzeros

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if len(top) != len(bottom) - 1:
            raise LayerError(f"Filter takes one top per filtered bottom (all bottoms but the "
                             f"last, the selector): {len(bottom) - 1} expected, got {len(top)}")
        self.selector = len(bottom) - 1
        self.first_reshape = True

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != getattr(self, "selector", -1)

    def _select(self, bottom: Sequence[Blob]) -> Any:
        sel = bottom[-1]
        if sel.num_axes < 1 or any(s != 1 for s in sel.shape[1:]):
            raise LayerError(f"the selector (last bottom) must have shape (N, 1, ...), got "
                             f"{shape_str(sel.shape)}")
        for i, b in enumerate(bottom[:-1]):
            if b.num_axes < 1 or b.shape[0] != sel.shape[0]:
                raise LayerError(f"bottom {i} {shape_str(b.shape)} must have the selector's "
                                 f"first dim ({sel.shape[0]})")
        return self.xp.nonzero(sel.data.reshape(-1))[0]

    def _shape_tops(self, bottom: Sequence[Blob], top: Sequence[Blob], n: int) -> None:
        for b, t in zip(bottom[:-1], top, strict=True):
            t.reshape((n, *b.shape[1:]))

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        self.idx = self._select(bottom)
        n = int(self.idx.shape[0])
        if self.first_reshape:
            n = bottom[0].shape[0]
            self.first_reshape = False
        self._shape_tops(bottom, top, n)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.idx = self._select(bottom)
        self._shape_tops(bottom, top, int(self.idx.shape[0]))
        for b, t in zip(bottom[:-1], top, strict=True):
            t.data[...] = self.xp.take(b.data, self.idx, axis=0)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[-1]:
            bottom[-1].diff[...] = 0
        for b, t, down in zip(bottom[:-1], top, propagate_down[:-1], strict=True):
            if down:
                b.diff[...] = 0
                b.diff[self.idx] = t.diff


# -- Parameter -------------------------------------------------------------------------------------
@register
class Parameter(Layer):
    """Exposes one learnable blob of parameter_param.shape (zeros until trained or loaded) as
    its top; the top diff accumulates into the blob's diff."""

    type = "Parameter"
    exact_bottoms = 0
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        dims = [int(d) for d in self.param.parameter_param.shape.dim]
        if any(d < 0 for d in dims):
            raise LayerError(f"parameter_param.shape has a negative dim: {shape_str(dims)}")
        self.blobs = [self.make_blob(dims)]

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape(self.blobs[0].shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].data[...] = self.blobs[0].data

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        self.blobs[0].diff += top[0].diff


# -- Embed -----------------------------------------------------------------------------------------
@register
class Embed(Layer):
    """A lookup table: each bottom value is an index in [0, input_dim) and selects a row of the
    weights W (input_dim, num_output), plus the bias b (num_output) with bias_term. The top is
    the bottom's shape + (num_output,). Backward accumulates into the rows of W that were used
    (repeats sum) and into b; the indices get no gradient."""

    type = "Embed"
    exact_bottoms = 1
    exact_tops = 1

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.embed_param
        if p.num_output < 1:
            raise LayerError("embed_param.num_output must be positive")
        if p.input_dim < 1:
            raise LayerError("embed_param.input_dim must be positive")
        self.num_output, self.input_dim = int(p.num_output), int(p.input_dim)
        self.bias_term = bool(p.bias_term)
        self.blobs = self.weight_and_bias(p, (self.input_dim, self.num_output),
                                          self.num_output, self.bias_term)

    def allow_force_backward(self, bottom_index: int) -> bool:
        return False

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        refuse_in_place(self, bottom, top)
        top[0].reshape((*bottom[0].shape, self.num_output))

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.idx = index_values(self.xp, bottom[0].data, self.input_dim, "Embed index")
        y = self.xp.take(self.blobs[0].data, self.idx, axis=0)
        if self.bias_term:
            y = y + self.blobs[1].data
        top[0].data[...] = y.reshape(top[0].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[0]:
            bottom[0].diff[...] = 0
        n = self.num_output
        dy = top[0].diff.reshape(-1, n)
        if dy.shape[0]:
            flat = self.idx[:, None] * n + self.xp.arange(n)[None, :]
            self.backend.scatter_add(self.blobs[0].diff, flat, dy)
        if self.bias_term:
            self.blobs[1].diff += dy.sum(axis=0)
