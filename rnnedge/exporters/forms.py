"""The two forms a model is called in for export: flat tensors in, flat tensors out.

A ``Form`` wraps the model so that torch.onnx.export and the parity gate both see the
data inputs then the states going in, and the outputs then the states coming out, and
says how to run it eagerly and under which tracing context.

**Step form** (step-protocol modules, whose state ``stepping`` finds): ``_StepWrapper``
rebuilds the nested state from the flat state tensors and flattens what forward returns.
Every recurrent layer inside is traced into one fused node; other code is traced as is.

**Lifted form** (models whose forward takes only the inputs and holds nn.RNN/LSTM/GRU, or
cells, inside, e.g. Embedding -> LSTM -> Linear): each layer's initial and final state is
*lifted* into graph inputs/outputs (whatever state the model passes it is replaced), so
the graph streams although the PyTorch forward does not. The gate's reference is the
model run eagerly with its own layers consuming the given states; with zero states it is
first checked to equal the model's own forward. Each layer forward calls must run once
per call and not be handed a non-zero state. Lifted state: ``<module path>.h0`` ->
``<module path>.hn`` and, for LSTMs, ``<module path>.c0`` -> ``<module path>.cn`` (e.g.
``encoder.lstm.h0``), layers in ``named_modules`` order.

Both forms refuse a recurrent layer that runs once per time step in a Python loop
(``_loop``: tracing would unroll it at the example's length), and, in stream mode, a
bidirectional layer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from rnnedge.contract import StateSpec
from rnnedge.errors import ParityError, RnnedgeError, UnsupportedModelError, first_line
from rnnedge.exporters import delays, ends, frontends, temporal, trace
from rnnedge.exporters.conv_cache import Caches
from rnnedge.exporters.inputs import Input, resize
from rnnedge.exporters.stepping import PROTOCOL, StepState, call_step, split_step


@dataclass
class Form:
    """How the model is called: flat torch tensors in, flat tensors out."""

    wrapper: nn.Module
    state_specs: list[StateSpec]
    run: Callable  # (inputs tuple, states list) -> flat outputs (data outputs, then states)
    trace_ctx: Callable  # () -> context manager to trace under
    chunk_multiple: int = 1  # stream chunks hold a multiple of this many steps (strides)
    latency: int = 0  # input steps the streamed outputs come late by (look-ahead convs)
    chunk_offset: int = 0  # a stream's first call: steps = this (mod chunk_multiple)
    ends: list | None = None  # per data output (axis, rate, end offset) or None (``ends``)
    model_end: tuple | None = None  # (residue, least): where the model ends (``ends``)


# ---------------------------------------------------------------------------
# Wrappers: flat tensors in, flat tensors out (what torch.onnx.export and the gate see)
# ---------------------------------------------------------------------------


class _StepWrapper(nn.Module):
    def __init__(self, model: nn.Module, state: StepState, n_inputs: int):
        super().__init__()
        self.model = model
        self.n_inputs = n_inputs
        self._state = state  # a plain object: not a Module

    def forward(self, *flat):
        out = call_step(self.model, flat[: self.n_inputs], self._state.build(flat[self.n_inputs:]),
                        self._state.arg)
        ys, st = split_step(out, "forward(x, state)")
        return (*_tensor_leaves(ys, "forward's output"), *_tensor_leaves(st, "forward's state"))


class _InternalWrapper(nn.Module):
    """The model as is: each layer starts from zeros (or what the model gives it) inside."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *flat):
        return tuple(_tensor_leaves(self.model(*flat), "forward's output"))


class _LiftWrapper(nn.Module):
    def __init__(self, model: nn.Module, ctx: trace.Context, n_inputs: int,
                 caches: Caches | None = None, timed: Callable = tuple):
        super().__init__()
        self.model = model
        self.n_inputs = n_inputs
        self._ctx = ctx  # a plain object: not a Module
        self._caches = caches  # the temporal ops' caches (conv_cache), after the layers' states
        self._n_layer_states = sum(len(layer.state_shapes()) for layer in ctx.layers)
        self._timed = timed  # flat data inputs -> the timed ones (delay lines tag them)

    def forward(self, *flat):
        states = flat[self.n_inputs:]
        self._ctx.begin(states[: self._n_layer_states])
        if self._caches is not None:
            self._caches.begin(states[self._n_layer_states:])
        if self._caches is not None:
            with self._caches.joining(self._timed(flat[: self.n_inputs])):
                out = self.model(*flat[: self.n_inputs])
        else:
            out = self.model(*flat[: self.n_inputs])
        finals = self._ctx.end()
        if self._caches is not None:
            finals += self._caches.end()
        return (*_tensor_leaves(out, "forward's output"), *finals)


def _tensor_leaves(obj, what: str) -> list:
    leaves = pytree.tree_leaves(obj)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise UnsupportedModelError(
            f"{what} must be tensors (a tensor or nested tuples/lists/dicts of them), got "
            f"{type(obj).__name__}"
        )
    return leaves


# ---------------------------------------------------------------------------
# The two forms
# ---------------------------------------------------------------------------


def probe_model(ctx: trace.Context, model: nn.Module, x):
    for layer in ctx.layers:
        layer.record = trace.Record()
    with torch.no_grad(), ctx.installed(probing=True):
        return model(*x)


def _loop(ctx: trace.Context, call: Callable, inputs: list[Input], probe_x):
    """(layer, calls, input index, axis) when a layer runs once per step along an input axis.

    ``call(x)`` runs forward on inputs ``x`` with the layers probing. Only layers called
    more than once per forward are suspects; the axis is found by lengthening each
    non-batch axis in turn and watching their call counts follow it.
    """
    def counts(x):
        for layer in ctx.layers:
            layer.record = trace.Record()
        call(x)
        return {layer.path: layer.record.calls for layer in ctx.layers}

    base = counts(probe_x)
    suspects = [layer for layer in ctx.layers if base[layer.path] > 1]
    try:
        for k, x in enumerate(probe_x):
            for axis in range(x.dim()):
                if not suspects or inputs[k].axes[axis] == "batch":
                    continue
                longer = list(probe_x)
                longer[k] = resize(x, axis, x.shape[axis] + 2)
                try:
                    grown = counts(tuple(longer))
                except Exception:  # noqa: BLE001 - this axis cannot change size: not time
                    continue
                for layer in suspects:
                    if grown[layer.path] != base[layer.path]:
                        return layer, base[layer.path], k, axis
    finally:
        counts(probe_x)  # leave the records of the example's own run
    return None


def loop_error(what: str, detail: str) -> ParityError:
    return ParityError(
        f"parity gate cannot pass: {detail}: something in forward() of {what} runs once per "
        "time step in a Python loop over time, which tracing unrolls at the example's fixed "
        "length, so the graph would equal eager PyTorch at that length only; write the "
        "per-step cell as a step-protocol module forward(x, state) -> (output, state) with "
        "init_hidden(batch_size) and let the runtime loop over time; nothing was written"
    )


def step_form(model, ctx, state: StepState, inputs: list[Input], probe_x, tb: int,
               mode: str) -> Form:
    timed = [(k, i.axes.index("time")) for k, i in enumerate(inputs) if "time" in i.axes]
    if mode == "stream" and timed:
        for layer in ctx.layers:
            if layer.bidirectional:
                raise _bidirectional(layer)
    if ctx.layers and timed:
        def call(x):
            with torch.no_grad(), ctx.installed(probing=True):
                return model(*x, state.build(state.zeros(tb)))

        found = _loop(ctx, call, inputs, probe_x)
        if found and (found[2], found[3]) in timed:
            layer, calls, k, axis = found
            raise loop_error(type(model).__name__, (
                f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is called {calls} "
                f"times for {probe_x[k].shape[axis]} steps of {inputs[k].name}"))
    wrapper = _StepWrapper(model, state, len(inputs))

    def run(x, states):
        with torch.no_grad():
            return wrapper(*x, *states)

    return Form(wrapper, state.specs(), run, lambda: ctx.installed(tracing=True))


def _bidirectional(layer: trace.Layer) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is bidirectional: its "
        "backward direction needs the future of the sequence, so the model cannot stream "
        "step by step; export it with mode='sequence' (--mode sequence), which takes a whole "
        "sequence per call"
    )


def _foreign_batch(ctx: trace.Context, model, inputs: list[Input], probe_x):
    """The first called layer that runs over a whole multiple of the model's batch (e.g.
    DPRNN's intra-chunk BLSTM over batch*chunks), the same multiple at the probe's batch
    and one more; else None. A layer batch that does not follow the model's at all is a
    wrongly taken batch axis, which the lifted run reports."""
    batch = int(probe_x[0].shape[inputs[0].axes.index("batch")])
    seen = []
    try:
        for b in (batch, batch + 1):
            x = tuple(resize(t, info.axes.index("batch"), b) for t, info in zip(probe_x, inputs))
            try:
                probe_model(ctx, model, x)
            except Exception:  # noqa: BLE001 - not at this batch: other checks say why
                return None
            seen.append({layer.path: layer.record.batches for layer in ctx.layers})
        for layer in ctx.layers:
            at_b, at_next = seen[0][layer.path], seen[1][layer.path]
            if len(at_b) == 1 and len(at_next) == 1:
                (n1,), (n2,) = at_b, at_next
                if n1 % batch == 0 and n1 // batch > 1 and n2 == n1 // batch * (batch + 1):
                    return layer
        return None
    finally:
        probe_model(ctx, model, probe_x)  # leave the records of the example's own run


def internal_form(model, ctx: trace.Context) -> Form:
    """Sequence graphs without carried state: the model as is, no state inputs/outputs."""
    wrapper = _InternalWrapper(model)

    def run(x, states):
        with torch.no_grad(), ctx.installed():
            return wrapper(*x)

    return Form(wrapper, [], run, lambda: ctx.installed(tracing=True))


def lift_form(model, ctx: trace.Context, inputs: list[Input], probe_x, mode,
              states: str = "carried") -> Form:
    """The lifted form; with ``states="internal"`` (or, in sequence mode, a layer whose
    batch is not the model's) the model as is, without carried state (``internal_form``)."""
    what = type(model).__name__
    probe_model(ctx, model, probe_x)
    called = [layer for layer in ctx.layers if layer.record.calls]
    if not called:
        raise UnsupportedModelError(
            f"forward() of {what} never calls its recurrent layers "
            f"({', '.join(repr(layer.path) for layer in ctx.layers)}); {PROTOCOL}"
        )
    ctx.layers = called
    if states == "carried":
        foreign = _foreign_batch(ctx, model, inputs, probe_x)
        if foreign is not None and mode == "stream":
            raise UnsupportedModelError(
                f"layer {foreign.path!r} ({trace.kind_name(foreign.module)}) runs over a batch "
                f"of {', '.join(map(str, sorted(foreign.record.batches)))} rows where the "
                "model's batch is "
                f"{int(probe_x[0].shape[inputs[0].axes.index('batch')])} (e.g. chunks of time "
                "folded into the batch), so its state cannot be carried from call to call; "
                "export with mode='sequence' (--mode sequence), which keeps its state inside "
                "the graph"
            )
        if foreign is not None:
            states = "internal"
    repeated = [layer for layer in called if layer.record.calls > 1]
    if repeated:
        found = _loop(ctx, lambda x: probe_model(ctx, model, x), inputs, probe_x)
        if found:
            layer, calls, k, axis = found
            raise loop_error(what, (
                f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is called {calls} "
                f"times for {probe_x[k].shape[axis]} steps along axis {axis} of "
                f"{inputs[k].name}"))
        layer = repeated[0]
        if states == "internal":
            return internal_form(model, ctx)  # one layer called on several pieces: fine
        raise UnsupportedModelError(
            f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is called "
            f"{layer.record.calls} times per forward(); rnnedge carries one state per layer, "
            "so each layer must run once per call: use separate layers, or write the model as "
            "a step-protocol module forward(x, state) -> (output, state)"
        )
    if states == "internal":
        return internal_form(model, ctx)
    for layer in called:
        if layer.record.nonzero_state:
            raise UnsupportedModelError(
                f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is given a non-zero "
                "initial state inside forward() (e.g. another layer's final state, or a state "
                "kept from the previous call); rnnedge carries each layer's state as a graph "
                "input starting from zeros, which would replace it: write the model as a "
                "step-protocol module forward(x, state) -> (output, state)"
            )
        if mode == "stream" and layer.bidirectional:
            raise _bidirectional(layer)
    specs = []
    for layer in called:
        for (i, o), shape in zip(layer.state_names(), layer.state_shapes()):
            specs.append(StateSpec(i, o, "float32", shape, layer.batch_axis()))
    caches, multiple, fronts = None, 1, frontends.NONE
    if mode == "stream" and any("time" in i.axes for i in inputs):
        # torch.stft / Tensor.unfold along time: redirected to the strided convs they are.
        fronts = frontends.find(model, lambda x: probe_model(ctx, model, x), inputs, probe_x)
        with fronts.redirected():
            # Convolutions/pooling along time stream with their input's last frames as a cache.
            ops, multiple, loose = temporal.analyse(model, lambda x: probe_model(ctx, model, x),
                                                    inputs, probe_x)
            # Skip connections around look-ahead ops: the less late path gets a delay line.
            # Look-ahead: delay lines where paths of different lags join, the first call's
            # offset and each op's end (``ends``).
            late = None
            if any(op.delay for op in ops):
                ops, *late = ends.plan(model, lambda x: probe_model(ctx, model, x), inputs,
                                       probe_x, ops, multiple)
            if ops:
                caches = Caches(model, ops, loose)
                if late:
                    (caches.crops, caches.sized), caches.lag, caches.offset, caches.model_end = late
                specs += caches.specs()
    wrapper = _LiftWrapper(model, ctx, len(inputs), caches, lambda x: delays.timed(inputs, x))

    @contextlib.contextmanager
    def installed(tracing: bool):
        with ctx.installed(lift=True, tracing=tracing), fronts.redirected():
            with caches.installed() if caches is not None else contextlib.nullcontext():
                yield

    def run(x, states):
        with torch.no_grad(), installed(False):
            return wrapper(*x, *states)

    latency, offset, tails = 0, 0, None
    if caches is not None and caches.flush is not None:
        # Look-ahead convs stream late: the reference is a whole stream, i.e. one flush call.
        batch = next(int(x.shape[i.axes.index("batch")]) for i, x in zip(inputs, probe_x)
                     if "batch" in i.axes)
        zeros = [torch.zeros(s.shape_for(batch), dtype=torch.float32) for s in specs]
        latency, offset = caches.latency, caches.offset
        def model_outs(x):
            out = pytree.tree_leaves(probe_model(ctx, model, x))
            return [t for t in out if isinstance(t, torch.Tensor)]

        try:
            run, tails = ends.flushed(run, inputs, latency, multiple, offset, probe_x, zeros,
                                      model_outs, caches.model_end)
            run(probe_x, zeros)
        except RnnedgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - shapes that no longer line up
            names = ", ".join(f"{c.op.path!r} ({c.op.delay})" for c in caches.ops if c.op.delay)
            raise UnsupportedModelError(
                f"the model fails when streamed with its look-ahead ops {names} late by their "
                f"look-ahead ({type(exc).__name__}: {first_line(exc, fallback='')}), e.g. where "
                "a skip connection or concatenation joins paths of different latencies that "
                "rnnedge could not align; pad those ops causally, or export with "
                "mode='sequence'") from exc
    return Form(wrapper, specs, run, lambda: installed(True), multiple, latency, offset, tails,
                caches.model_end if caches is not None else None)
