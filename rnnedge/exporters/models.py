"""Plans for whole models: anything built around PyTorch's recurrent layers, or stepping.

Two forms of model are exported (``plan_model``):

**Step-protocol modules** — ``forward(*inputs, state) -> (output, state)`` where ``state``
is a tensor or a nested tuple/list of tensors, starting from zeros; how the state is found
is in ``stepping``.

**Models whose forward takes only the inputs** and holds nn.RNN/LSTM/GRU (or cells)
inside, e.g. Embedding -> LSTM -> Linear: each layer's initial and final state is
*lifted* into graph inputs/outputs; see ``forms``, which also wraps both forms into flat
tensors in, flat tensors out.

Names. Data inputs (and their axes): see ``inputs``. Outputs: ``output`` or ``output.0``,
``output.1``, ... (pytree order of what forward returns; for step-protocol modules, of
everything but the state). States: see ``stepping`` and ``forms``.

The plan. ``plan_model`` picks the form, runs it eagerly at two (batch, time) sizes to
tell which output axes follow batch and time, traces it at sizes that specialise no
dynamic axis, checks that the graph kept them dynamic, and gives the gate a reference
that runs the model eagerly from given states.

Modules: ``inputs`` (data inputs and their axes), ``stepping`` (a step-protocol module's
state), ``forms`` (how each form is wrapped, run and checked), ``trace`` (the patched
recurrent layers and their custom ops), ``torchonnx`` (the torch.onnx.export run), this
one (``plan_model`` and the plan: output specs, graph, reference). Bare layers are planned
by ``layers`` without tracing; ``api`` picks between the two and runs the export.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from rnnedge.contract import ExportSpec, TensorSpec
from rnnedge.errors import RnnedgeError, UnsupportedModelError, UsageError, first_line
from rnnedge.exporters import packed, torchonnx, trace
from rnnedge.exporters.forms import Form, lift_form, loop_error, probe_model, step_form
from rnnedge.exporters.inputs import (
    DTYPES,
    Input,
    at_size,
    data_names,
    example_sizes,
    example_tuple,
    given_axes,
    inferred_axes,
    make_sample,
    mark_constants,
    numbered_names,
    token_ranges,
    trace_sizes,
)
from rnnedge.exporters.layers import source_of
from rnnedge.exporters.stepping import (
    PROTOCOL,
    SELF_ATOL,
    SELF_RTOL,
    StepProbeError,
    check_state_arg,
    discover_state,
    init_method,
    looks_like_step,
    positional_params,
    state_param,
)
from rnnedge.exporters.stepping import (
    call_step as call_with_state,
)
from rnnedge.gate.lengths import LengthRange
from rnnedge.gate.plan import Plan

# Eager sizes used to tell which output axes follow batch and time: (batch, time) twice.
PROBE_SIZES = ((2, 3), (3, 5))


def probe_sizes(min_length: int | None) -> tuple:
    """PROBE_SIZES with every time at least ``min_length`` (still two different times)."""
    low = min_length or 1
    return tuple((b, max(t, low + k)) for k, (b, t) in zip((0, 2), PROBE_SIZES))


def _check_params(model: nn.Module) -> None:
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        if p.is_floating_point() and p.dtype != torch.float32:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {p.dtype} weights ({name}); rnnedge exports "
                "float32 models: call model.float() first"
            )


def plan_model(model, example_input, mode: str, opset: int, lengths: bool | None, *,
               input_axes=None, min_length: int | None = None, input_names=None,
               constants=(), state_arg: str | None = None,
               max_length: int | None = None, states: str = "carried") -> Plan:
    """Plan the export of a model built around recurrent layers, or of a step-protocol module.

    example_input: a tensor or tuple of tensors, one per data input of forward (the state
    excluded); int64 token ids are fine. Its sizes are not baked in.
    input_axes: optional, one tuple per data input naming each axis "batch", "time" or a
    fixed size (int or None), e.g. [("batch", "time", None)]; inferred when left out.
    min_length: the fewest time steps the model takes: every probe and trace is at least
    that long (the example is tiled up to it). max_length: the longest the gate proves
    (None: its default); a time axis torch.export bounds below it is an ExportError.
    input_names, constants, state_arg: as for ``rnnedge.export`` (inputs.data_names,
    inputs.mark_constants; state_arg is checked to be a parameter of forward).
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if lengths:
        raise UsageError(
            "a lengths input is supported for bare nn.RNN/LSTM/GRU layers only; give a model "
            "padded sequences (or export its recurrent layer on its own)"
        )
    _check_params(model)
    examples = example_tuple(example_input)
    layers = trace.find_layers(model)
    ctx = trace.Context(model, layers)
    hinted = input_axes is not None
    axes_list = given_axes(input_axes, examples) if hinted else inferred_axes(examples, layers)
    names = data_names(input_names, len(examples))
    inputs = [Input(n, DTYPES[x.dtype], a) for n, x, a in zip(names, examples, axes_list)]
    mark_constants(inputs, constants)
    if state_arg is not None:
        check_state_arg(model, state_arg)
    batch, time = example_sizes(examples, axes_list)
    if time is not None and min_length:
        time = max(time, min_length)  # probes at the example's length: at least min_length
    tb, tt = trace_sizes(batch, time)
    trace_x = at_size(examples, inputs, tb, tt)  # what is traced
    probe_x = at_size(examples, inputs, tb, time)  # eager probes: the example's own length
    what = type(model).__name__

    n_params, n_required = positional_params(model)
    fits_state = n_required <= len(examples) + 1 and (n_params is None or n_params > len(examples))
    init = init_method(model)
    if init is not None and n_params is not None and len(examples) == n_params >= 2:
        raise UsageError(
            f"{what}.forward takes {n_params} positional arguments, the data input(s) then the "
            f"state, and example_input gives {len(examples)}: give only the data inputs (the "
            f"state comes from {init[0]}())"
        )
    # An init method without a state argument to forward (state kept in an attribute) does
    # not make a step protocol: such a model is treated as taking only its inputs.
    step = init is not None and fits_state

    arg = state_param(model, state_arg)  # bound by name: forward(input, lengths, state)

    tried = [probe_x]  # the inputs of the last eager probe: a failure names its shapes

    def call_step(x, state):
        tried[-1] = x
        # The model may change its input in place (x.mul_(0.5)): never the caller's tensors.
        # Token ids stay the same objects: token_ranges finds the Embedding that reads them
        # by identity, and an index tensor is not scaled in place.
        x = tuple(t.clone() if t.is_floating_point() else t for t in x)
        with torch.no_grad(), ctx.installed(probing=True):
            return call_with_state(model, x, state, arg)

    def batch_probe(b, state):
        return call_step(at_size(examples, inputs, b, time), state)

    # The first eager runs of the user's forward: an exception here means the example
    # (or --input-shape) does not fit the model, which is the caller's to fix.
    with _user_forward(what, tried, inputs):
        if not step and fits_state:
            try:
                step = looks_like_step(call_step(probe_x, None))
            except RnnedgeError:
                raise
            except Exception:  # noqa: BLE001 - not a step-protocol forward after all
                if arg is not None and not layers:  # it is one, by name: its failure is news
                    raise
                step = False
        if not step and not layers:
            raise UnsupportedModelError(
                f"{what} has no recurrent layer and no step protocol, so there is no state to "
                f"carry between calls; {PROTOCOL}"
            )
        if not step and (len(examples) < n_required
                         or (n_params is not None and len(examples) > n_params)):
            raise UsageError(
                f"{what}.forward takes {n_required} to {n_params} input(s) but example_input "
                f"gives {len(examples)}"
            )

        if step and init is None and layers:
            try:
                state = discover_state(model, batch_probe)
            except StepProbeError:
                raise  # a step module that failed its probe: said as such, not swallowed
            except UnsupportedModelError:
                step = False  # forward(x, None) gave (output, something) that is no state
        elif step:
            state = discover_state(model, batch_probe)
        if step:
            state.arg = arg
        # Integer inputs are sampled over the vocabulary of the nn.Embedding that reads them.
        if step:
            ranges = token_ranges(model, lambda: call_step(probe_x, state.build(state.zeros(tb))),
                                   probe_x)
        else:
            ranges = token_ranges(model, lambda: probe_model(ctx, model, probe_x), probe_x)
        for k, (info, x) in enumerate(zip(inputs, examples)):
            if info.dtype.startswith("int"):
                info.low, info.high = ranges.get(k, (int(x.min()), int(x.max()) + 1))

        if step and states == "internal":
            raise UsageError(
                f"states='internal' is for models whose forward takes only the inputs; "
                f"{what} is a step-protocol module, whose state is its own: drop --state none")
        if step:
            form = step_form(model, ctx, state, inputs, probe_x, tb, mode)
        else:
            form = lift_form(model, ctx, inputs, probe_x, mode, states)

    lengths_at = packed.lengths_input(ctx, inputs, probe_x, mode, what)  # before sampling
    sample = make_sample(inputs)
    failed = None if hinted or tt is None else _other_length_error(form, sample, tb, tt)
    if failed is not None:
        refused = _not_time(what, inputs, examples, failed)
        if refused is not None:  # no silent fixed-size graph for a model with a time axis
            raise refused
        # The axis guessed as time is not one (e.g. a step module that reshapes its input
        # for an nn.LSTM): plan again with that axis fixed, one call per fixed-size input.
        fixed = [tuple(int(x.shape[i]) if a == "time" else a for i, a in enumerate(info.axes))
                 for info, x in zip(inputs, examples)]
        return plan_model(model, example_input, mode, opset, lengths, input_axes=fixed,
                          min_length=min_length, input_names=input_names,
                          constants=constants, state_arg=state_arg, max_length=max_length,
                          states=states)
    time_axis = next((i.axes.index("time") for i in inputs if "time" in i.axes), None)

    # Strided ops along time (conv caches) take whole multiples of their total stride.
    sizes = tuple((b, t * form.chunk_multiple) for b, t in probe_sizes(min_length))
    if not step:
        _check_lifted_equals_model(model, form, sample, inputs, what, sizes)
    outputs = _output_specs(form, sample, inputs, time_axis, sizes)
    for out in outputs:
        if mode == "stream" and "batch*time" in out.shape:
            raise UnsupportedModelError(
                f"output {out.name} of {what} merges batch and time into one axis (e.g. "
                "y.reshape(-1, H) before a head); streamed chunks cannot be joined along it: keep "
                "time as its own axis in forward() (flatten after the graph), or export with "
                "mode='sequence'"
            )
    # Each tensor has its own time axis (TensorSpec.time_axis); time_axis is the inputs'.
    spec = ExportSpec(mode, tuple(i.spec() for i in inputs), tuple(outputs),
                      tuple(form.state_specs), time_axis, opset, source_of(model),
                      chunk_multiple=form.chunk_multiple, latency=form.latency,
                      state="carried" if form.state_specs or step else "internal")
    longest = LengthRange.for_mode(mode, min_length, max_length).high
    graph = _export(form, spec, inputs, trace_x, tb, what, longest)
    return Plan(spec, graph, _reference(form, spec), sample, model=model,
                lengths_input=lengths_at)


@contextlib.contextmanager
def _user_forward(what: str, tried: list, inputs):
    """UsageError for an exception of the user's forward, naming the input shapes it was
    run at (``tried[-1]``, resized from the example) and the axes assumed."""
    try:
        yield
    except RnnedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                           for x in tried[-1])
        line = first_line(exc)
        raise UsageError(
            f"{what}.forward fails on an input of shape {shapes} ({type(exc).__name__}: {line}); "
            f"assumed axes: {assumed_axes(inputs)}; check that the input shape and dtype "
            "(--input-shape, --input-dtype) fit the model, or declare the axes with "
            "input_axes (--input-shape batch,4,time)"
        ) from exc


# ---------------------------------------------------------------------------
# The plan: running a form, its outputs, its graph and its reference
# ---------------------------------------------------------------------------


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


def _other_length_error(form: Form, sample, tb: int, tt: int):
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


def _not_time(what: str, inputs, examples, failed) -> UnsupportedModelError | None:
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


def _check_lifted_equals_model(model, form: Form, sample, inputs, what: str,
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
    if len(lifted) != len(own) or not all(torch.allclose(a, b, atol=SELF_ATOL, rtol=SELF_RTOL) for a, b in zip(own, lifted)):
        raise UnsupportedModelError(
            f"with zero initial states, {what} with its recurrent state carried differs from "
            "its own forward(): a recurrent layer does not start from zeros there (or forward "
            "is not deterministic); write the model as a step-protocol module forward(x, "
            "state) -> (output, state)"
        )


def _output_specs(form: Form, sample, inputs: list[Input], time_axis,
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
        for k, (da, db) in enumerate(zip(a.shape, b.shape)):
            if da == db:
                shape.append(int(da))
            elif (da, db) == (b1, b2):
                shape.append("batch")
            elif t1 is not None and (da, db) == (t1, t2):
                shape.append("time")
            elif t1 is not None and form.chunk_multiple > 1 and da * t2 == db * t1:
                shape.append("time")  # downsampled by strides along time (conv caches)
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
        specs.append(TensorSpec(name, str(a.dtype).replace("torch.", ""), tuple(shape),
                                time_ratio=ratio))
    return specs


def _export(form: Form, spec: ExportSpec, inputs: list[Input], trace_x, tb: int, what: str,
            max_length: int | None = None):
    states = _zero_states(spec.states, tb)
    dyn = [{i: a for i, a in enumerate(info.axes) if isinstance(a, str)} for info in inputs]
    dyn += [{s.batch_axis: "batch"} for s in spec.states]
    in_names = [i.name for i in spec.inputs] + [s.input for s in spec.states]
    out_names = [o.name for o in spec.outputs] + [s.output for s in spec.states]
    axes = [info.axes for info in inputs] + [s.shape for s in spec.states]
    try:
        with form.trace_ctx():
            proto = torchonnx.export_onnx(form.wrapper, (*trace_x, *states), (tuple(dyn),),
                                      in_names, out_names, spec.opset, what, max_length)
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


def _reference(form: Form, spec: ExportSpec):
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
