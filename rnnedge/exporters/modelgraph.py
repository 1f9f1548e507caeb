"""The pieces ``models.plan_model`` composes for a whole model: running its form eagerly
(and saying at which sizes it fails), the output specs (which axes follow batch and
time), the traced graph (checked to keep its dynamic axes) and the eager reference the
gate runs."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch
from torch.utils import _pytree as pytree

from rnnedge.contract import ExportSpec, TensorSpec
from rnnedge.errors import RnnedgeError, UnsupportedModelError, UsageError, first_line
from rnnedge.exporters import ends, torchonnx
from rnnedge.exporters.forms import Form, loop_error
from rnnedge.exporters.inputs import (
    DTYPES,
    Input,
    numbered_names,
)
from rnnedge.exporters.stepping import SELF_ATOL, SELF_RTOL
from rnnedge.runtime import remainder

# Eager sizes used to tell which output axes follow batch and time: (batch, time) twice.
PROBE_SIZES = ((2, 3), (3, 5))


def probe_sizes(min_length: int | None) -> tuple:
    """PROBE_SIZES with every time at least ``min_length`` (still two different times)."""
    low = min_length or 1
    return tuple((b, max(t, low + k)) for k, (b, t) in zip((0, 2), PROBE_SIZES))


def _run(form: Form, x, batch: int, time: int | None, inputs=None) -> list:
    """The wrapper run eagerly from zero states; a failure says at which sizes."""
    try:
        return form.run(x, _zero_states(form.state_specs, batch))
    except RnnedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
        raise _fails_at(type(form.wrapper.model).__name__, exc, batch, time, x,
                        inputs) from exc


def assumed_axes(inputs) -> str:
    """'batch=0, time=1' (per input when several): the axes rnnedge took for each input."""
    def one(info) -> str:
        return ", ".join(f"{a}={i}" for i, a in enumerate(info.axes) if isinstance(a, str))
    if len(inputs) == 1:
        return one(inputs[0])
    return "; ".join(f"{info.name}: {one(info)}" for info in inputs)


def _fails_at(what: str, exc: BaseException, batch: int, time: int | None, x=None,
              inputs=None) -> UsageError:
    at = f"batch {batch}" + (f", time {time}" if time is not None else "")
    if x is not None:  # the shapes that failed, not the example's
        at += " (input shape " + ", ".join(str(tuple(t.shape)) for t in x) + ")"
    if inputs:
        at += f", assumed axes: {assumed_axes(inputs)}"
    first = first_line(exc, fallback="")
    return UsageError(
        f"forward() of {what} fails at {at} ({type(exc).__name__}: {first}); rnnedge runs it "
        "at several batch sizes (and lengths): size everything from the input (x.shape[0]) "
        "instead of fixing it, or give input_axes (--input-shape) if an axis was taken for "
        "batch or time wrongly, or min_length (--min-length) if the model needs a minimum length"
    )


def _torch_inputs(data: dict, inputs: list[Input]):
    # Copies: the model may change its input in place (x.mul_(0.5)).
    return tuple(torch.from_numpy(np.array(data[i.name], copy=True)) for i in inputs)


def _zero_states(specs, batch: int) -> list[torch.Tensor]:
    return [torch.zeros(s.shape_for(batch)) for s in specs]


def other_length_error(form: Form, sample, tb: int, tt: int):
    """None when the form runs at time ``tt + 2``, else (the input shapes tried, the
    model's exception)."""
    rng = np.random.default_rng(1)
    data = sample(rng, tb, tt + 2)
    inputs = tuple(torch.from_numpy(v) for v in data.values())
    try:
        form.run(inputs, _zero_states(form.state_specs, tb))
    except RnnedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - does not run at another length
        return [tuple(t.shape) for t in inputs], exc
    return None


def not_time(what: str, inputs, examples, failed) -> UnsupportedModelError | None:
    """The error for a guessed time axis the model does not run along; None for inputs
    of rank <= 2 ((batch, features): a model that takes one step per call)."""
    if all(x.dim() <= 2 for x in examples):
        return None
    shapes, exc = failed
    axis = next(i.axes.index("time") for i in inputs if "time" in i.axes)
    return UnsupportedModelError(
        f"could not make axis {axis} of the input of {what} dynamic as time: forward() fails "
        f"at input shape {', '.join(map(str, shapes))} ({type(exc).__name__}: "
        f"{first_line(exc, fallback='')}); assumed axes: {assumed_axes(inputs)} (from the "
        "recurrent layer's batch_first); declare the axes with input_axes (--input-shape), "
        "e.g. ('batch', 4, 'time') for a (batch, channels, time) input, or give fixed sizes "
        "(no 'time') for a graph of one fixed-size block per call"
    )


def check_lifted_equals_model(model, form: Form, sample, inputs, what: str,
                               sizes=PROBE_SIZES) -> None:
    rng = np.random.default_rng(2)
    batch, time = sizes[0]
    data = sample(rng, batch, time)
    # Each run gets its own inputs: an in-place op on the input (x.mul_(0.5)) would
    # otherwise feed the second run a different input than the first.
    x = _torch_inputs(data, inputs)
    try:
        with torch.no_grad():
            own = pytree.tree_leaves(model(*x))  # ran already, lifted
            again = pytree.tree_leaves(model(*_torch_inputs(data, inputs)))
    except RnnedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
        raise _fails_at(what, exc, batch, time, x, inputs) from exc
    if len(own) != len(again) or not all(
            torch.equal(a, b) for a, b in zip(own, again) if isinstance(a, torch.Tensor)):
        raise UnsupportedModelError(
            f"forward() of {what} gives different results on the same input: it is not "
            "deterministic (e.g. F.dropout(x, training=True) or other random ops, which "
            "model.eval() does not turn off); no graph can equal it: make dropout follow "
            "self.training (nn.Dropout, or F.dropout(x, training=self.training))"
        )
    lifted = _run(form, _torch_inputs(data, inputs), batch, time, inputs)[: len(own)]
    if len(lifted) != len(own) or not all(a.shape == b.shape and torch.allclose(
            a, b, atol=SELF_ATOL, rtol=SELF_RTOL) for a, b in zip(own, lifted)):
        if any(s.input.endswith(".cache0") for s in form.state_specs):  # ops along time too
            diff = max(((a - b).abs().max().item() for a, b in zip(own, lifted)
                        if a.shape == b.shape), default=float("nan"))
            raise UnsupportedModelError(
                f"with its recurrent states and conv caches carried from zeros, the streamed "
                f"form of {what} differs from its own forward() at length {time} (max |diff| "
                f"{diff:.2g}): a recurrent layer may not start from zeros there, or an op along "
                "time streams differently (e.g. a crop or pad of a conv's output that depends "
                "on where the sequence ends); export with mode='sequence' (--mode sequence)")
        raise UnsupportedModelError(
            f"with zero initial states, {what} with its recurrent state carried differs from "
            "its own forward(): a recurrent layer does not start from zeros there (or forward "
            "is not deterministic); write the model as a step-protocol module forward(x, "
            "state) -> (output, state)"
        )


def check_stream_ends(model, form: Form, sample, inputs, what: str, base: int,
                      low: int = 1) -> None:
    """For a late graph (look-ahead ops streamed late, a flush at the end): the whole stream
    (``form.run``: one flush call) equals the model at lengths ``base`` + every remainder
    modulo the chunk multiple (64 spread over them beyond 64) and at short lengths from
    ``low`` (min_length) up to a stream's shortest first call, so that how the model ends a sequence (its own
    padding to a "valid length", a last partial stride) is proven at more than the lengths
    the stream's grid makes easy. The gate then compares the graph with this stream."""
    m = form.chunk_multiple
    first = remainder.first_length(m, form.chunk_offset, form.latency)  # a stream's least
    times = sorted({base + r for r in ends.rests(m, 64)} |
                   {t for t in (low, (low + first) // 2, first - 1, first) if t >= low})
    rng = np.random.default_rng(4)
    for time in times:
        data = sample(rng, 1, time)
        try:
            with torch.no_grad():
                own = pytree.tree_leaves(model(*_torch_inputs(data, inputs)))
        except RnnedgeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
            raise _fails_at(what, exc, 1, time, None, inputs) from exc
        got = _run(form, _torch_inputs(data, inputs), 1, time, inputs)[: len(own)]
        for a, b in zip(own, got):
            if a.shape == b.shape and torch.allclose(a, b, atol=SELF_ATOL, rtol=SELF_RTOL):
                continue
            diff = f"max |diff| {(a - b).abs().max().item():.2g}" if a.shape == b.shape else \
                f"shape {tuple(b.shape)} for {tuple(a.shape)}"
            raise UnsupportedModelError(
                f"streamed with its look-ahead ops late and a flush at the end, {what} differs "
                f"from its own forward() on a sequence of {time} steps ({diff}): how it ends a "
                f"sequence (e.g. padding it to a valid length) does not fall on the stream's "
                f"grid of {m} steps at this length; export with mode='sequence'")


def output_specs(form: Form, sample, inputs: list[Input], time_axis,
                  sizes=PROBE_SIZES) -> list[TensorSpec]:
    runs = []
    for batch, time in sizes:
        t = time if time_axis is not None else None
        data = sample(np.random.default_rng(3), batch, t)
        flat = _run(form, _torch_inputs(data, inputs), batch, t, inputs)
        outs = flat[: len(flat) - len(form.state_specs)]
        states = flat[len(outs):]
        for s, got in zip(form.state_specs, states):
            want = s.shape_for(batch)
            if tuple(got.shape) != want:
                raise UnsupportedModelError(
                    f"the state after a call has shape {tuple(got.shape)} but the state before "
                    f"it {want} ({s.output}); a carried state must keep its shape"
                )
        runs.append((batch, t, outs))
    (b1, t1, o1), (b2, t2, o2) = runs
    names = numbered_names("output", len(o1))
    specs = []
    for name, a, b in zip(names, o1, o2):
        ratio = 1
        if a.dtype not in DTYPES and a.dtype != torch.float16:
            raise UnsupportedModelError(f"output {name} is {a.dtype}; rnnedge exports float32 outputs")
        if a.dim() != b.dim():
            raise UnsupportedModelError(f"output {name} changes rank with the input size")
        shape = []
        tail = form.ends[len(specs)] if form.ends else None  # (axis, rate, end offset)
        for k, (da, db) in enumerate(zip(a.shape, b.shape)):
            if da == db:
                shape.append(int(da))
            elif (da, db) == (b1, b2):
                shape.append("batch")
            elif tail is not None and k == tail[0]:
                shape.append("time")  # a strided late stream's: frames = N * rate + offset
                ratio = tail[1].numerator if tail[1].denominator == 1 else \
                    (tail[1].numerator, tail[1].denominator)
            elif t1 is not None and (da, db) == (t1, t2):
                shape.append("time")
            elif t1 is not None and form.chunk_multiple > 1 and da * t2 == db * t1:
                shape.append("time")  # downsampled by strides along time (conv caches)
                ratio = Fraction(da, t1)
                ratio = ratio.numerator if ratio.denominator == 1 else \
                    (ratio.numerator, ratio.denominator)
            elif t1 is not None and (da, db) == (b1 * t1, b2 * t2):
                shape.append("batch*time")
            elif t1 is not None and da % t1 == 0 and da // t1 > 1 and db == da // t1 * t2:
                shape.append("time")  # a fixed number of steps per input step (upsampling)
                ratio = da // t1
            else:
                shape.append(f"{name}_{k}")
        if shape.count("time") > 1:  # (batch, time, time) attention maps: no one time axis
            shape = [f"{name}_{k}" if d == "time" else d for k, d in enumerate(shape)]
            ratio = 1
        end = None
        if tail is not None and "time" in shape:
            # The output's end for a whole stream (``ends``), where ceil(N * ratio) is not it.
            c, q = tail[2], tail[1].denominator
            if c != Fraction(q - 1, q):
                end = c.numerator if c.denominator == 1 else (c.numerator, c.denominator)
        specs.append(TensorSpec(name, str(a.dtype).replace("torch.", ""), tuple(shape),
                                time_ratio=ratio, end_offset=end))
    return specs


def export_graph(form: Form, spec: ExportSpec, inputs: list[Input], trace_x, tb: int, what: str,
                 max_length: int | None = None, min_length: int | None = None):
    states = _zero_states(spec.states, tb)
    dyn = [{i: a for i, a in enumerate(info.axes) if isinstance(a, str)} for info in inputs]
    dyn += [{s.batch_axis: "batch"} for s in spec.states]
    in_names = [i.name for i in spec.inputs] + [s.input for s in spec.states]
    out_names = [o.name for o in spec.outputs] + [s.output for s in spec.states]
    axes = [info.axes for info in inputs] + [s.shape for s in spec.states]
    try:
        with form.trace_ctx():
            proto = torchonnx.export_onnx(form.wrapper, (*trace_x, *states), (tuple(dyn),),
                                          in_names, out_names, spec.opset, what, max_length,
                                          min_length)
    except torchonnx.Specialized as exc:
        raise _fixed_axis_error(what, in_names[exc.index], exc.axis, axes[exc.index][exc.axis],
                                exc.size) from None
    _check_dynamic(proto, spec, what)
    declared = {t.name: t.shape for t in spec.inputs + spec.outputs}
    declared.update({s.input: s.shape for s in spec.states})
    declared.update({s.output: s.shape for s in spec.states})
    for vi in list(proto.graph.input) + list(proto.graph.output):
        torchonnx.set_shape(vi, declared[vi.name])
    proto.graph.name = what
    return proto


def _check_dynamic(proto, spec: ExportSpec, what: str) -> None:
    """Refuse a graph whose batch or time axis the trace fixed to the example's size."""
    dims = torchonnx.dim_values(proto)
    shapes = {t.name: t.shape for t in spec.inputs}
    shapes.update({s.input: s.shape for s in spec.states})
    outs = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            for vi in proto.graph.output}
    shapes_out = {t.name: t.shape for t in spec.outputs}
    for table, declared in ((dims, shapes), (outs, shapes_out)):
        for name, shape in declared.items():
            got = table.get(name)
            if got is None or len(got) != len(shape):
                continue
            for axis, want in enumerate(shape):
                if isinstance(want, str) and isinstance(got[axis], int) and got[axis] > 0:
                    raise _fixed_axis_error(what, name, axis, want, got[axis])


def _fixed_axis_error(what: str, name: str, axis: int, axis_name: str, size: int):
    if axis_name == "time":
        return loop_error(what, f"the trace fixed the time axis of {name} at {size} steps")
    return UnsupportedModelError(
        f"the traced graph of {what} fixes axis {axis} ({axis_name}) of {name} at {size}: "
        "forward() builds something with a fixed size there (e.g. torch.zeros(1, ...)); "
        "size it from the input (x.shape[0])"
    )


def reference_of(form: Form, spec: ExportSpec):
    in_names = [t.name for t in spec.inputs]
    out_names = [o.name for o in spec.outputs]
    state_names = [s.input for s in spec.states]

    def reference(data: dict, states: dict):
        x = tuple(torch.from_numpy(np.ascontiguousarray(data[n])) for n in in_names)
        st = [torch.from_numpy(np.ascontiguousarray(states[n])) for n in state_names]
        flat = [t.numpy() for t in form.run(x, st)]
        n = len(out_names)
        return dict(zip(out_names, flat[:n])), dict(zip(state_names, flat[n:]))

    return reference
