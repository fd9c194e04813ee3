"""Recurrent layers: RNN, LSTM (Caffe's RecurrentLayer family) and LSTMUnit.

Caffe builds RNN and LSTM as an internal net unrolled over the T timesteps of its input; here
the same mathematics runs as a loop over time (forward) and back-propagation through time
(backward), with Caffe's bottoms, tops and parameter blobs, so Caffe weights load unchanged.

Bottoms (RNN and LSTM): x (T × N × ...), cont (T × N) and optionally x_static (N × ...); with
``expose_hidden`` then the initial states, each 1 × N × num_output (h_0 for RNN; h_0, c_0 for
LSTM). Tops: the output sequence (T × N × num_output), then with ``expose_hidden`` the final
states (h_T for RNN; h_T, c_T for LSTM). ``cont[t, n] = 0`` starts a new sequence in stream n
at step t: the recurrent input is ``cont_t · h_{t−1}`` (and for LSTM the cell term is scaled by
cont_t too). Without ``expose_hidden`` the final state of one forward is the initial state of
the next (as Caffe copies h_T to h_0), so a stream may continue across batches when its cont is
1 at t = 0; no gradient crosses batches. Gradients never reach cont. With ``expose_hidden``,
unlike Caffe (whose unrolled net shares only the data of those blobs), the gradient does reach
h_0/c_0 and does flow back from the h_T/c_T tops: the exact BPTT gradient of the layer.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from netforge.blob import Blob
from netforge.layers.base import Layer, LayerContext, LayerError, register, shape_str
from netforge.proto import pb


def _sigmoid(xp: Any, a: Any) -> Any:
    # 0.5·tanh(0.5a) + 0.5: the logistic function without overflow in exp for large |a|.
    return 0.5 * xp.tanh(0.5 * a) + 0.5


def _lstm_step(xp: Any, a: Any, c_prev: Any, cont: Any) -> tuple[Any, Any, Any, Any]:
    """One LSTM cell update (Caffe's LSTMUnit). ``a`` (N, 4H) holds the gate inputs in the
    order i, f, o, g; ``cont`` is (N, 1). Returns (ifo, g, c, tanh(c)) with ifo (N, 3H) the
    sigmoid gates; h = o · tanh(c)."""
    hidden = c_prev.shape[1]
    ifo = _sigmoid(xp, a[:, :3 * hidden])
    g = xp.tanh(a[:, 3 * hidden:])
    c = cont * ifo[:, hidden:2 * hidden] * c_prev + ifo[:, :hidden] * g
    return ifo, g, c, xp.tanh(c)


def _lstm_step_backward(xp: Any, ifo: Any, g: Any, tanh_c: Any, c_prev: Any, cont: Any,
                        dh: Any, dc: Any) -> tuple[Any, Any]:
    """Gradients of one LSTM cell update: from dL/dh_t and dL/dc_t (the part reaching c_t
    from later steps or the c top) to dL/da_t (gate inputs) and dL/dc_{t−1}."""
    hidden = c_prev.shape[1]
    i, f, o = ifo[:, :hidden], ifo[:, hidden:2 * hidden], ifo[:, 2 * hidden:]
    dc_total = dc + dh * o * (1 - tanh_c * tanh_c)
    da = xp.empty((c_prev.shape[0], 4 * hidden), dtype=c_prev.dtype)
    da[:, :hidden] = dc_total * g * i * (1 - i)
    da[:, hidden:2 * hidden] = dc_total * c_prev * cont * f * (1 - f)
    da[:, 2 * hidden:3 * hidden] = dh * tanh_c * o * (1 - o)
    da[:, 3 * hidden:] = dc_total * i * (1 - g * g)
    return da, dc_total * cont * f


class _Recurrent(Layer):
    """What RNN and LSTM share: the bottoms and tops, the input projections (W_x·x_t + b and
    W_x_static·x_static), the state carried between forwards, and the BPTT frame."""

    # Subclasses: the state names (in Caffe's recurrent input order) and gates per unit.
    state_names: ClassVar[tuple[str, ...]] = ()
    gates: ClassVar[int] = 1

    def __init__(self, param: pb.LayerParameter, ctx: LayerContext):
        super().__init__(param, ctx)
        self.expose = bool(self.param.recurrent_param.expose_hidden)
        self.n_exposed = len(self.state_names) if self.expose else 0
        self.carry: list[Any] | None = None
        self.cache: dict[str, Any] = {}

    # -- counts -----------------------------------------------------------------------------------
    def check_counts(self, n_bottom: int, n_top: int) -> str | None:
        states = ", ".join(self.state_names)
        lo = 2 + self.n_exposed
        if not lo <= n_bottom <= lo + 1:
            names = f"x, cont, optional x_static, {states}" if self.expose else \
                "x, cont and optional x_static"
            return f"takes {lo} or {lo + 1} bottom blobs ({names}), got {n_bottom}"
        want = 1 + self.n_exposed
        if n_top != want:
            finals = ", ".join(name.replace("_0", "_T") for name in self.state_names)
            names = f"the output, then {finals}" if self.expose else "the output"
            return f"takes exactly {want} top blob(s) ({names}), got {n_top}"
        return None

    def min_top_count(self) -> int:
        return 1 + self.n_exposed

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 1  # never to the sequence continuation indicators

    # -- setup and shapes -------------------------------------------------------------------------
    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.param.recurrent_param
        if p.num_output < 1:
            raise LayerError("recurrent_param.num_output must be positive")
        self.hidden = int(p.num_output)
        self.static = len(bottom) > 2 + self.n_exposed
        self.state_offset = 2 + int(self.static)
        x = bottom[0]
        if x.num_axes < 2:
            raise LayerError(f"bottom 0 (x) must have at least 2 axes (timesteps, streams, ...), "
                             f"got shape {shape_str(x.shape)}")
        self.steps, self.streams = x.shape[0], x.shape[1]
        self.input_dim = x.count_range(2)
        self.static_dim = 0
        if self.static:
            if bottom[2].num_axes < 1:
                raise LayerError("bottom 2 (x_static) must have at least 1 axis (streams, ...)")
            self.static_dim = bottom[2].count_range(1)
        rows = self.gates * self.hidden
        # Caffe's parameter order (that of the unrolled net's layers), filled in that order.
        blobs = self.weight_and_bias(p, (rows, self.input_dim), rows, True)
        if self.static:
            blobs += self.weight_and_bias(p, (rows, self.static_dim), 0, False)
        blobs += self.weight_and_bias(p, (rows, self.hidden), 0, False)
        blobs += self.output_blobs(p)
        self.blobs = blobs
        self.carry = None
        self.check_shapes(bottom)

    def output_blobs(self, p: Any) -> list[Blob]:
        return []

    def check_shapes(self, bottom: Sequence[Blob]) -> None:
        x, cont = bottom[0], bottom[1]
        if x.num_axes < 2:
            raise LayerError(f"bottom 0 (x) must have at least 2 axes (timesteps, streams, ...), "
                             f"got shape {shape_str(x.shape)}")
        steps, streams = x.shape[0], x.shape[1]
        if steps != self.steps:
            raise LayerError(f"x has {steps} timesteps but the layer was set up for "
                             f"{self.steps} (a recurrent layer is unrolled for a fixed number "
                             "of timesteps, as in Caffe)")
        if cont.shape != (steps, streams):
            raise LayerError(f"bottom 1 (cont) must have shape (timesteps, streams) = "
                             f"{shape_str((steps, streams))}, got {shape_str(cont.shape)}")
        if x.count_range(2) != self.input_dim:
            raise LayerError(f"x {shape_str(x.shape)} has {x.count_range(2)} inputs per step, "
                             f"but the weights expect {self.input_dim}")
        if self.static:
            xs = bottom[2]
            if xs.num_axes < 1 or xs.shape[0] != streams:
                raise LayerError(f"bottom 2 (x_static) must have {streams} streams on its first "
                                 f"axis (as x has), got shape {shape_str(xs.shape)}")
            if xs.count_range(1) != self.static_dim:
                raise LayerError(f"x_static {shape_str(xs.shape)} has {xs.count_range(1)} "
                                 f"inputs per stream, but the weights expect {self.static_dim}")
        state_shape = (1, streams, self.hidden)
        for k, name in enumerate(self.state_names[:self.n_exposed]):
            b = bottom[self.state_offset + k]
            if b.shape != state_shape:
                raise LayerError(f"bottom {self.state_offset + k} ({name}) must have shape "
                                 f"{shape_str(state_shape)} (1, streams, num_output), got "
                                 f"{shape_str(b.shape)}")

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.check_shapes(bottom)
        streams = bottom[0].shape[1]
        if streams != self.streams:
            self.carry = None  # a new batch size: no state to continue
        self.streams = streams
        top[0].reshape((self.steps, streams, self.hidden))
        for k in range(self.n_exposed):
            top[1 + k].reshape((1, streams, self.hidden))

    def reset_state(self) -> None:
        """Forget the state carried over from the previous forward (Caffe's Reset)."""
        self.carry = None

    # -- forward and backward ---------------------------------------------------------------------
    @property
    def recurrent_index(self) -> int:
        return 3 if self.static else 2

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        xp = self.xp
        steps, streams, hidden = self.steps, self.streams, self.hidden
        rows = self.gates * hidden
        x = bottom[0].data.reshape(steps * streams, self.input_dim)
        pre = (x @ self.blobs[0].data.T + self.blobs[1].data).reshape(steps, streams, rows)
        if self.static:
            xs = bottom[2].data.reshape(streams, self.static_dim)
            pre += (xs @ self.blobs[2].data.T)[None]
        if self.expose:
            init = [bottom[self.state_offset + k].data.reshape(streams, hidden)
                    for k in range(self.n_exposed)]
        elif self.carry is not None:
            init = self.carry
        else:
            init = [xp.zeros((streams, hidden), dtype=pre.dtype) for _ in self.state_names]
        cont = bottom[1].data.reshape(steps, streams, 1)
        final = self.run(pre, cont, init, top[0])
        if self.expose:
            for k, state in enumerate(final):
                top[1 + k].data[...] = state.reshape(1, streams, hidden)
        else:
            self.carry = [xp.array(state, copy=True) for state in final]

    @abstractmethod
    def run(self, pre: Any, cont: Any, init: list[Any], out: Blob) -> list[Any]:
        """The time loop: from the projected inputs ``pre`` (T, N, gates·H) and the initial
        states, write the output sequence, cache what backward needs, return the final states."""

    @abstractmethod
    def bptt(self, dout: Any, dfinal: list[Any], cont: Any) -> tuple[Any, list[Any]]:
        """Back through time: from the output and final-state gradients, accumulate the
        recurrent (and output) weight gradients; return dL/dpre and dL/d(initial states)."""

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        # propagate_down[1] (cont) is ignored, as in Caffe: the indicators get no gradient.
        steps, streams, hidden = self.steps, self.streams, self.hidden
        rows = self.gates * hidden
        dout = top[0].diff.reshape(steps, streams, hidden)
        if self.expose:
            dfinal = [top[1 + k].diff.reshape(streams, hidden) for k in range(self.n_exposed)]
        else:
            dfinal = [self.xp.zeros((streams, hidden), dtype=dout.dtype)
                      for _ in self.state_names]
        cont = bottom[1].data.reshape(steps, streams, 1)
        dpre, dinit = self.bptt(dout, dfinal, cont)
        dpre2 = dpre.reshape(steps * streams, rows)
        x = bottom[0].data.reshape(steps * streams, self.input_dim)
        self.blobs[0].diff += dpre2.T @ x
        self.blobs[1].diff += dpre2.sum(axis=0)
        if propagate_down[0]:
            bottom[0].diff[...] = (dpre2 @ self.blobs[0].data).reshape(bottom[0].shape)
        if self.static:
            dstatic = dpre.sum(axis=0)
            xs = bottom[2].data.reshape(streams, self.static_dim)
            self.blobs[2].diff += dstatic.T @ xs
            if propagate_down[2]:
                bottom[2].diff[...] = (dstatic @ self.blobs[2].data).reshape(bottom[2].shape)
        for k in range(self.n_exposed):
            if propagate_down[self.state_offset + k]:
                bottom[self.state_offset + k].diff[...] = dinit[k].reshape(1, streams, hidden)


@register
class RNN(_Recurrent):
    """Caffe's vanilla RNN: h_t = tanh(W_xh·x_t + b_h + W_xh_static·x_static +
    W_hh·(cont_t·h_{t−1})), o_t = tanh(W_ho·h_t + b_o); the top is o.

    Params (recurrent_param): num_output, weight_filler, bias_filler, expose_hidden
    (debug_info is accepted and has no effect). Blobs, in Caffe's order: W_xh (H, I), b_h (H),
    W_xh_static (H, I_static) only with x_static, W_hh (H, H), W_ho (H, H), b_o (H).
    """

    type = "RNN"
    state_names = ("h_0",)
    gates = 1

    def output_blobs(self, p: Any) -> list[Blob]:
        return self.weight_and_bias(p, (self.hidden, self.hidden), self.hidden, True)

    def run(self, pre: Any, cont: Any, init: list[Any], out: Blob) -> list[Any]:
        xp = self.xp
        steps, streams, hidden = pre.shape
        w_hh = self.blobs[self.recurrent_index].data
        w_ho, b_o = (self.blobs[self.recurrent_index + 1].data,
                     self.blobs[self.recurrent_index + 2].data)
        hs = xp.empty((steps, streams, hidden), dtype=pre.dtype)
        h_conted = xp.empty_like(hs)
        h = init[0]
        for t in range(steps):
            h_conted[t] = cont[t] * h
            h = xp.tanh(pre[t] + h_conted[t] @ w_hh.T)
            hs[t] = h
        o = xp.tanh(hs.reshape(-1, hidden) @ w_ho.T + b_o).reshape(steps, streams, hidden)
        out.data[...] = o
        self.cache = {"h": hs, "h_conted": h_conted, "o": o}
        return [h]

    def bptt(self, dout: Any, dfinal: list[Any], cont: Any) -> tuple[Any, list[Any]]:
        xp = self.xp
        steps, streams, hidden = dout.shape
        k = self.recurrent_index
        w_hh, w_ho = self.blobs[k].data, self.blobs[k + 1].data
        hs, h_conted, o = self.cache["h"], self.cache["h_conted"], self.cache["o"]
        do = (dout * (1 - o * o)).reshape(-1, hidden)
        self.blobs[k + 1].diff += do.T @ hs.reshape(-1, hidden)
        self.blobs[k + 2].diff += do.sum(axis=0)
        dh_out = (do @ w_ho).reshape(steps, streams, hidden)
        dpre = xp.empty_like(dout)
        dh_next = dfinal[0]
        for t in reversed(range(steps)):
            da = (dh_out[t] + dh_next) * (1 - hs[t] * hs[t])
            dpre[t] = da
            dh_next = cont[t] * (da @ w_hh)
        self.blobs[k].diff += dpre.reshape(-1, hidden).T @ h_conted.reshape(-1, hidden)
        return dpre, [dh_next]


@register
class LSTM(_Recurrent):
    """Caffe's LSTM: gate inputs a_t = W_xc·x_t + b_c + W_xc_static·x_static +
    W_hc·(cont_t·h_{t−1}) split as i, f, o, g; i, f, o = σ(·), g = tanh(·);
    c_t = cont_t·f_t·c_{t−1} + i_t·g_t; h_t = o_t·tanh(c_t); the top is h.

    Params (recurrent_param): num_output, weight_filler, bias_filler, expose_hidden
    (debug_info is accepted and has no effect). Blobs, in Caffe's order: W_xc (4H, I),
    b_c (4H), W_xc_static (4H, I_static) only with x_static, W_hc (4H, H).
    """

    type = "LSTM"
    state_names = ("h_0", "c_0")
    gates = 4

    def run(self, pre: Any, cont: Any, init: list[Any], out: Blob) -> list[Any]:
        xp = self.xp
        steps, streams, _ = pre.shape
        hidden = self.hidden
        w_hc = self.blobs[self.recurrent_index].data
        dt = pre.dtype
        ifo = xp.empty((steps, streams, 3 * hidden), dtype=dt)
        g = xp.empty((steps, streams, hidden), dtype=dt)
        tanh_c = xp.empty_like(g)
        c_prev = xp.empty_like(g)
        h_conted = xp.empty_like(g)
        h, c = init
        for t in range(steps):
            h_conted[t] = cont[t] * h
            c_prev[t] = c
            a = pre[t] + h_conted[t] @ w_hc.T
            ifo[t], g[t], c, tanh_c[t] = _lstm_step(xp, a, c, cont[t])
            h = ifo[t, :, 2 * hidden:] * tanh_c[t]
            out.data[t] = h
        self.cache = {"ifo": ifo, "g": g, "tanh_c": tanh_c, "c_prev": c_prev,
                      "h_conted": h_conted}
        return [h, c]

    def bptt(self, dout: Any, dfinal: list[Any], cont: Any) -> tuple[Any, list[Any]]:
        xp = self.xp
        steps, streams, hidden = dout.shape
        k = self.recurrent_index
        w_hc = self.blobs[k].data
        cache = self.cache
        dpre = xp.empty((steps, streams, 4 * hidden), dtype=dout.dtype)
        dh_next, dc_next = dfinal
        for t in reversed(range(steps)):
            da, dc_next = _lstm_step_backward(xp, cache["ifo"][t], cache["g"][t],
                                              cache["tanh_c"][t], cache["c_prev"][t], cont[t],
                                              dout[t] + dh_next, dc_next)
            dpre[t] = da
            dh_next = cont[t] * (da @ w_hc)
        self.blobs[k].diff += (dpre.reshape(-1, 4 * hidden).T
                               @ cache["h_conted"].reshape(-1, hidden))
        return dpre, [dh_next, dc_next]


@register
class LSTMUnit(Layer):
    """One LSTM cell update, as Caffe's LSTMUnit (the unit inside its unrolled LSTM).

    Bottoms: c_prev (1, N, H), x (1, N, 4H) the gate inputs in the order i, f, o, g, and
    cont (1, N). Tops: c (1, N, H) and h (1, N, H), with i, f, o = σ(·), g = tanh(·),
    c = cont·f·c_prev + i·g and h = o·tanh(c). No parameters; no gradient to cont (asking for
    one is an error, as in Caffe).
    """

    type = "LSTMUnit"
    exact_bottoms = 3
    exact_tops = 2

    def allow_force_backward(self, bottom_index: int) -> bool:
        return bottom_index != 2

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        c_prev, x, cont = bottom
        names = ("c_prev", "x", "cont")
        if c_prev.num_axes != 3:
            raise LayerError(f"bottom 0 (c_prev) must have 3 axes (1, streams, hidden), got "
                             f"shape {shape_str(c_prev.shape)}")
        streams, hidden = c_prev.shape[1], c_prev.shape[2]
        for i, (b, axes) in enumerate(((c_prev, 3), (x, 3), (cont, 2))):
            if b.num_axes != axes or b.shape[0] != 1 or b.shape[1] != streams:
                want = "(1, streams, ...)" if axes == 3 else "(1, streams)"
                raise LayerError(f"bottom {i} ({names[i]}) must have {axes} axes {want} with "
                                 f"1 timestep and {streams} streams, got {shape_str(b.shape)}")
        if x.shape[2] != 4 * hidden:
            raise LayerError(f"bottom 1 (x) must hold 4 × {hidden} = {4 * hidden} gate inputs "
                             f"per stream (4 × c_prev's last axis), got {x.shape[2]}")
        top[0].reshape_like(c_prev)
        top[1].reshape_like(c_prev)

    def _step(self, bottom: Sequence[Blob]) -> tuple[Any, ...]:
        _, streams, hidden = bottom[0].shape
        c_prev = bottom[0].data.reshape(streams, hidden)
        a = bottom[1].data.reshape(streams, 4 * hidden)
        cont = bottom[2].data.reshape(streams, 1)
        ifo, g, c, tanh_c = _lstm_step(self.xp, a, c_prev, cont)
        return c_prev, cont, ifo, g, c, tanh_c

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        _, _, ifo, _, c, tanh_c = self._step(bottom)
        hidden = bottom[0].shape[2]
        top[0].data[...] = c.reshape(top[0].shape)
        top[1].data[...] = (ifo[:, 2 * hidden:] * tanh_c).reshape(top[1].shape)

    def backward(self, top: Sequence[Blob], propagate_down: Sequence[bool],
                 bottom: Sequence[Blob]) -> None:
        if propagate_down[2]:
            raise LayerError("LSTMUnit cannot backpropagate to the sequence continuation "
                             "indicators (bottom 2, cont)")
        if not (propagate_down[0] or propagate_down[1]):
            return
        # Recomputed from the bottoms (like Caffe), so in-place changes to the tops are harmless.
        c_prev, cont, ifo, g, _, tanh_c = self._step(bottom)
        _, streams, hidden = bottom[0].shape
        da, dc_prev = _lstm_step_backward(self.xp, ifo, g, tanh_c, c_prev, cont,
                                          top[1].diff.reshape(streams, hidden),
                                          top[0].diff.reshape(streams, hidden))
        if propagate_down[0]:
            bottom[0].diff[...] = dc_prev.reshape(bottom[0].shape)
        if propagate_down[1]:
            bottom[1].diff[...] = da.reshape(bottom[1].shape)
