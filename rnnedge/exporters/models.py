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
one (``plan_model``), ``modelgraph`` (the pieces it composes: output specs, graph, reference). Bare layers are planned
by ``layers`` without tracing; ``api`` picks between the two and runs the export.
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from rnnedge.contract import ExportSpec
from rnnedge.errors import RnnedgeError, UnsupportedModelError, UsageError, first_line
from rnnedge.exporters import packed, trace
from rnnedge.exporters.forms import lift_form, probe_model, step_form
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
    token_ranges,
    trace_sizes,
)
from rnnedge.exporters.layers import source_of
from rnnedge.exporters.modelgraph import (
    assumed_axes,
    check_lifted_equals_model,
    check_stream_ends,
    export_graph,
    not_time,
    other_length_error,
    output_specs,
    probe_sizes,
    reference_of,
)
from rnnedge.exporters.stepping import (
    PROTOCOL,
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
    with _user_forward(what, tried, inputs, examples[0]):
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
    failed = None if hinted or tt is None else other_length_error(form, sample, tb, tt)
    if failed is not None:
        refused = not_time(what, inputs, examples, failed)
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
        check_lifted_equals_model(model, form, sample, inputs, what, sizes)
        if form.latency:  # the stream's end, at every kind of length
            check_stream_ends(model, form, sample, inputs, what,
                              max(sizes[-1][1], form.latency + form.chunk_multiple),
                              min_length or 1)
    outputs = output_specs(form, sample, inputs, time_axis, sizes)
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
                      chunk_offset=form.chunk_offset, model_end=form.model_end,
                      state="carried" if form.state_specs or step else "internal")
    # Only a max_length the user gave allows a bounded time axis (up to it): the default
    # is the gate's longest length, not a limit of the model's.
    graph = export_graph(form, spec, inputs, trace_x, tb, what, max_length,
                         LengthRange.for_mode(mode, min_length, max_length).low)
    return Plan(spec, graph, reference_of(form, spec), sample, model=model,
                lengths_input=lengths_at)


def _axes_hint(info, example) -> str:
    """--input-shape for the example (e.g. (1, 32, 100)) in the other usual layout, since the
    assumed one may be what failed: (batch, time, F) offered as batch,32,time and back."""
    axes, shape = list(info.axes), [int(n) for n in example.shape]
    if "time" in axes and len(axes) >= 3:
        t = axes.index("time")
        last = len(axes) - 1
        other = last if t != last else next(i for i, a in enumerate(axes) if a != "batch")
        axes[t], axes[other] = shape[t], "time"
    return ",".join(str(a) for a in axes)


@contextlib.contextmanager
def _user_forward(what: str, tried: list, inputs, example):
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
            f"input_axes (--input-shape, e.g. {_axes_hint(inputs[0], example)} for the "
            f"example of shape {tuple(int(n) for n in example.shape)})"
        ) from exc
