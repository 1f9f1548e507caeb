"""Plans for whole models: anything built around PyTorch's recurrent layers, or stepping.

Two forms of model are exported (``plan_model``):

**Step-protocol modules** — ``forward(*inputs, state) -> (output, state)`` where ``state``
is a tensor or a nested tuple/list of tensors (e.g. the classic Elman char-RNN, a cell
stack, a feature front-end around an ``nn.LSTMCell``). The initial state is found, in
this order, from an ``init_hidden`` / ``init_state`` / ``init_states`` / ``initHidden``
method (with a batch-size argument, or without one when the state has a batch axis of
size 1), else from ``forward(*inputs, None)``; it must be all zeros (the contract's
``init``). The graph takes the data inputs, then one input per state tensor in pytree
(depth-first) order, and gives the outputs, then the state tensors in the same order.
Every recurrent layer inside is traced into one fused node; other code is traced as is.

**Models whose forward takes only the inputs** and holds nn.RNN/LSTM/GRU (or cells)
inside, e.g. Embedding -> LSTM -> Linear: each layer's initial and final state is
*lifted* into graph inputs/outputs (whatever state the model passes it is replaced), so
the graph streams although the PyTorch forward does not. The gate's reference is the
model run eagerly with its own layers consuming the given states; with zero states it is
first checked to equal the model's own forward.

Names. Data inputs: ``input`` (one) or ``input.0``, ``input.1``, ... (several, in forward
order). Outputs: ``output`` or ``output.0``, ``output.1``, ... (pytree order of what
forward returns; for step-protocol modules, of everything but the state). Step-protocol
state: ``state`` -> ``state_out`` for a single tensor, else ``state.0`` -> ``state.0_out``,
``state.1`` -> ``state.1_out``, ... Lifted state: ``<module path>.h0`` -> ``<module
path>.hn`` and, for LSTMs, ``<module path>.c0`` -> ``<module path>.cn`` (e.g.
``encoder.lstm.h0``), layers in ``named_modules`` order.

Axes. ``input_axes`` (one tuple per data input: ``"batch"``, ``"time"``, or an int / None
for a fixed size) says which axis is which. Without it: when the model holds an
nn.RNN/LSTM/GRU, inputs are ``(batch, time, ...)`` if the first one is batch_first, else
``(time, batch, ...)`` (kept only if forward runs at another length); otherwise (cells
only, or plain code) an input is ``(batch, fixed...)`` and the graph takes one step per
call (``time_axis`` null). Every data input must have a batch axis; ``time`` is dynamic
and the gate streams it in chunks. Traced examples are tiled to batch >= 2 and time >= 3
so that no dynamic size is specialised, and the graph is checked to keep them dynamic.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from rnnedge.errors import ParityError, RnnedgeError, UnsupportedModelError, UsageError
from rnnedge.exporters import trace
from rnnedge.exporters.layers import source_of
from rnnedge.exporters.parity import Plan
from rnnedge.exporters.spec import ExportSpec, StateSpec, TensorSpec

INIT_METHODS = ("init_hidden", "init_state", "init_states", "initHidden")
DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32"}
TRACE_BATCH, TRACE_TIME = 2, 3
# Eager sizes used to tell which output axes follow batch and time: (batch, time) twice.
PROBE_SIZES = ((2, 3), (3, 5))
# Eager-vs-eager check (lifted state at zero vs the model's own forward): same math.
SELF_ATOL, SELF_RTOL = 1e-6, 1e-5

PROTOCOL = (
    "rnnedge exports either a model built on PyTorch's recurrent layers (nn.RNN/LSTM/GRU "
    "or their cells; their state is carried between calls for you) or a step-protocol "
    "module forward(x, state) -> (output, state) with an init_hidden(batch_size) method "
    "(or a forward(x, None) that returns the initial output and state)"
)


# ---------------------------------------------------------------------------
# Data inputs
# ---------------------------------------------------------------------------


@dataclass
class Input:
    """One data input: graph name, dtype, axes ("batch" / "time" / fixed int)."""

    name: str
    dtype: str
    axes: tuple
    low: int = 0  # integer inputs: sampled in [low, high)
    high: int = 0

    def shape(self, batch: int, time: int | None) -> tuple:
        return tuple(batch if a == "batch" else time if a == "time" else a for a in self.axes)

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.axes)


def _example_tuple(example_input) -> tuple[torch.Tensor, ...]:
    items = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise UsageError(
            "example_input for a model must be a tensor or a tuple of tensors (one per data "
            f"input of forward), got {type(example_input).__name__}"
        )
    for t in items:
        if t.dtype not in DTYPES:
            raise UsageError(
                f"example_input tensors must be float32 (features) or int64/int32 (token ids), "
                f"got {t.dtype}; convert the model and example with .float()"
            )
        if t.dim() == 0 or 0 in t.shape:
            raise UsageError(
                f"example_input tensors need a batch axis and no empty axis, got shape "
                f"{tuple(t.shape)}"
            )
    return items


def _check_params(model: nn.Module) -> None:
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        if p.is_floating_point() and p.dtype != torch.float32:
            raise UnsupportedModelError(
                f"{type(model).__name__} has {p.dtype} weights ({name}); rnnedge exports "
                "float32 models: call model.float() first"
            )


def _names(base: str, n: int) -> list[str]:
    return [base] if n == 1 else [f"{base}.{i}" for i in range(n)]


def _given_axes(input_axes, examples) -> list[tuple]:
    if isinstance(input_axes, tuple) and input_axes and not isinstance(input_axes[0], (tuple, list)):
        input_axes = [input_axes]
    axes_list = [tuple(a) for a in input_axes]
    if len(axes_list) != len(examples):
        raise UsageError(
            f"input_axes gives {len(axes_list)} input(s) but example_input has {len(examples)}"
        )
    out = []
    for k, (axes, x) in enumerate(zip(axes_list, examples)):
        if len(axes) != x.dim():
            raise UsageError(
                f"input_axes[{k}] {axes} has {len(axes)} axes but example input {k} has shape "
                f"{tuple(x.shape)}"
            )
        fixed = []
        for i, a in enumerate(axes):
            if isinstance(a, str) and a.isdigit():
                a = int(a)
            if a is None:
                a = int(x.shape[i])
            if isinstance(a, bool) or not (a in ("batch", "time") or isinstance(a, int)):
                raise UsageError(
                    f"input_axes[{k}] axis {i} is {a!r}: use 'batch', 'time' or a fixed size"
                )
            if isinstance(a, int) and a != x.shape[i]:
                raise UsageError(
                    f"input_axes[{k}] fixes axis {i} at {a} but the example has {x.shape[i]}"
                )
            fixed.append(a)
        if fixed.count("batch") != 1 or fixed.count("time") > 1:
            raise UsageError(
                f"input_axes[{k}] {tuple(fixed)} must name exactly one 'batch' axis and at most "
                "one 'time' axis"
            )
        out.append(tuple(fixed))
    times = {a.index("time") for a in out if "time" in a}
    if len(times) > 1:
        raise UsageError("the 'time' axis must be at the same position in every input")
    return out


def _inferred_axes(examples, layers) -> list[tuple]:
    stacks = [m for _, m in layers if isinstance(m, trace.STACKS)]
    out = []
    for x in examples:
        rest = tuple(int(d) for d in x.shape)
        if stacks and x.dim() >= 2:
            lead = ("batch", "time") if stacks[0].batch_first else ("time", "batch")
            out.append(lead + rest[2:])
        else:
            out.append(("batch",) + rest[1:])
    return out


def _resize(x: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``x`` tiled (or cut) along ``axis`` to size ``n``."""
    size = x.shape[axis]
    if size < n:
        reps = [1] * x.dim()
        reps[axis] = -(-n // size)
        x = x.repeat(*reps)
    return x.narrow(axis, 0, n).contiguous()


def _at_size(examples, inputs: list[Input], batch: int, time: int | None):
    out = []
    for x, info in zip(examples, inputs):
        for axis, a in enumerate(info.axes):
            if a == "batch":
                x = _resize(x, axis, batch)
            elif a == "time" and time is not None:
                x = _resize(x, axis, time)
        out.append(x)
    return tuple(out)


def _sizes(examples, axes_list) -> tuple[int, int | None]:
    batches = {int(x.shape[a.index("batch")]) for x, a in zip(examples, axes_list)}
    times = {int(x.shape[a.index("time")]) for x, a in zip(examples, axes_list) if "time" in a}
    if len(batches) > 1 or len(times) > 1:
        raise UsageError(
            f"example inputs disagree on the batch or time size: batch {sorted(batches)}, "
            f"time {sorted(times)}"
        )
    return batches.pop(), (times.pop() if times else None)


def _trace_sizes(batch: int, time: int | None) -> tuple[int, int | None]:
    tb = max(batch, TRACE_BATCH)
    if time is None:
        return tb, None
    tt = max(time, TRACE_TIME)
    return tb, (tt + 1 if tt == tb else tt)


def _token_ranges(model: nn.Module, call: Callable, examples) -> dict[int, tuple[int, int]]:
    """For integer inputs consumed by an nn.Embedding: {input index: (0, num_embeddings)}."""
    found: dict[int, tuple[int, int]] = {}

    def hook(module, args):
        for k, x in enumerate(examples):
            if args and args[0] is x:
                found.setdefault(k, (0, int(module.num_embeddings)))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return found


def make_sample(inputs: list[Input]):
    def sample(rng: np.random.Generator, batch: int, time: int | None) -> dict:
        out = {}
        for info in inputs:
            shape = info.shape(batch, time)
            if info.dtype.startswith("int"):
                out[info.name] = rng.integers(info.low, info.high, size=shape).astype(info.dtype)
            else:
                out[info.name] = rng.standard_normal(shape).astype(info.dtype)
        return out

    return sample


# ---------------------------------------------------------------------------
# Step protocol: finding the state
# ---------------------------------------------------------------------------


@dataclass
class StepState:
    """A step-protocol module's state: its nesting and each tensor's shape and batch axis."""

    treespec: object
    shapes: list[tuple]  # with "batch" at the batch axis
    batch_axes: list[int]
    names: list[tuple[str, str]]

    def zeros(self, batch: int) -> list[torch.Tensor]:
        return [torch.zeros([batch if d == "batch" else d for d in s]) for s in self.shapes]

    def build(self, leaves):
        return pytree.tree_unflatten(list(leaves), self.treespec)

    def specs(self) -> list[StateSpec]:
        return [StateSpec(i, o, "float32", s, ax)
                for (i, o), s, ax in zip(self.names, self.shapes, self.batch_axes)]


def _positional(model: nn.Module) -> tuple[int | None, int]:
    """(positional parameters of forward or None for *args, how many are required)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None, 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return None, sum(p.kind in kinds and p.default is p.empty for p in params)
    pos = [p for p in params if p.kind in kinds]
    return len(pos), sum(p.default is p.empty for p in pos)


def _init_method(model: nn.Module):
    for name in INIT_METHODS:
        fn = getattr(model, name, None)
        if callable(fn):
            return name, fn
    return None


def _leaves(obj, what: str) -> tuple[list, object]:
    leaves, spec = pytree.tree_flatten(obj)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise UnsupportedModelError(
            f"{what} must be a tensor or a nested tuple/list of tensors, got "
            f"{type(obj).__name__}; {PROTOCOL}"
        )
    return leaves, spec


def _split_step(out, what: str):
    """(outputs, state) from what a step-protocol forward returned: the state is last."""
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise UnsupportedModelError(
            f"{what} returned {type(out).__name__}, not (output, state); {PROTOCOL}"
        )
    ys = out[0] if len(out) == 2 else tuple(out[:-1])
    return ys, out[-1]


def _state_names(n: int) -> list[tuple[str, str]]:
    if n == 1:
        return [("state", "state_out")]
    return [(f"state.{i}", f"state.{i}_out") for i in range(n)]


def _batch_axes(a: list, b: list, na: int, nb: int, what: str) -> list[int]:
    axes = []
    for k, (x, y) in enumerate(zip(a, b)):
        diff = [i for i in range(x.dim()) if x.shape[i] != y.shape[i]]
        if x.dim() != y.dim() or len(diff) != 1 or (x.shape[diff[0]], y.shape[diff[0]]) != (na, nb):
            raise UnsupportedModelError(
                f"could not find the batch axis of state tensor {k} from {what} (shapes "
                f"{tuple(x.shape)} at batch {na}, {tuple(y.shape)} at batch {nb}); every state "
                "tensor needs exactly one axis that follows the batch size"
            )
        axes.append(diff[0])
    return axes


def _check_zero(leaves, what: str) -> None:
    for t in leaves:
        if t.dtype != torch.float32:
            raise UnsupportedModelError(f"{what} gives a {t.dtype} state tensor; rnnedge carries float32 states")
        if bool(torch.any(t != 0)):
            raise UnsupportedModelError(
                f"{what} gives a non-zero initial state; the graph contract starts every "
                "stream from zeros: make the initial state zeros (a learned initial state can "
                "be added inside forward)"
            )


def _discover_state(model, batch_probe) -> StepState:
    """The step-protocol state, from an init method or from forward(x, None)."""
    found = _init_method(model)
    with torch.no_grad():
        if found is not None:
            name, fn = found
            takes_batch = _positional_count(fn) > 0
            if takes_batch:
                s2, spec = _leaves(_call_init(fn, name, 2), f"{name}(2)")
                s3, spec3 = _leaves(_call_init(fn, name, 3), f"{name}(3)")
                if spec3 != spec:
                    raise UnsupportedModelError(f"{name}() nests its state differently at batch 2 and 3")
                _check_zero(s2, f"{name}(2)")
                axes = _batch_axes(s2, s3, 2, 3, f"{name}(batch_size)")
            else:
                s1, spec = _leaves(_call_init(fn, name), f"{name}()")
                _check_zero(s1, f"{name}()")
                axes = [_guess_batch_axis(t) for t in s1]
                if None in axes:
                    raise UnsupportedModelError(
                        f"{name}() takes no batch size and its state {[tuple(t.shape) for t in s1]} "
                        "has no axis of size 1 to be the batch; give it a batch_size argument"
                    )
                s2 = [_resize(t, ax, 2) for t, ax in zip(s1, axes)]
                try:
                    out = batch_probe(2, pytree.tree_unflatten(s2, spec))
                    _, st = _split_step(out, "forward(x, state)")
                    got = [tuple(t.shape) for t in pytree.tree_leaves(st)]
                except UnsupportedModelError:
                    raise
                except Exception:  # noqa: BLE001 - a guess that does not run is a wrong guess
                    got = None
                if got != [tuple(t.shape) for t in s2]:
                    raise UnsupportedModelError(
                        f"could not find the batch axis of the state {name}() gives "
                        f"({[tuple(t.shape) for t in s1]}): forward at batch 2 did not keep it; "
                        "give it a batch_size argument: init_hidden(batch_size)"
                    )
        else:
            what = "forward(x, None)"
            _, st2 = _split_step(batch_probe(2, None), what)
            _, st3 = _split_step(batch_probe(3, None), what)
            s2, spec = _leaves(st2, f"the state {what} returns")
            s3, _ = _leaves(st3, f"the state {what} returns")
            axes = _batch_axes(s2, s3, 2, 3, what)
            zeros = [torch.zeros_like(t) for t in s2]
            with_none = pytree.tree_leaves(_split_step(batch_probe(2, None), what)[0])
            with_zeros = pytree.tree_leaves(
                _split_step(batch_probe(2, pytree.tree_unflatten(zeros, spec)), what)[0])
            if len(with_none) != len(with_zeros) or not all(
                    torch.allclose(a, b, atol=SELF_ATOL, rtol=SELF_RTOL)
                    for a, b in zip(with_none, with_zeros)):
                raise UnsupportedModelError(
                    "forward(x, None) does not equal forward(x, zero state): the model starts "
                    "from a non-zero state, but the graph contract starts every stream from "
                    "zeros; give the model an init_hidden(batch_size) returning zeros"
                )
    shapes = [tuple("batch" if i == ax else int(d) for i, d in enumerate(t.shape))
              for t, ax in zip(s2, axes)]
    return StepState(spec, shapes, axes, _state_names(len(s2)))


def _call_init(fn, name: str, *batch):
    try:
        return fn(*batch)
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        call = f"{name}({', '.join(map(str, batch))})"
        raise UnsupportedModelError(
            f"{call} failed ({type(exc).__name__}: {first}); rnnedge calls the init method "
            "with the batch size as its only argument (or with none), and it must return the "
            "zero state on the CPU"
        ) from exc


def _positional_count(fn) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 0
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.VAR_POSITIONAL)
    return sum(p.kind in kinds for p in params)


def _guess_batch_axis(t: torch.Tensor) -> int | None:
    """Batch axis of a state made for batch 1: (layers, 1, hidden) -> 1, (1, hidden) -> 0."""
    if t.dim() == 3 and t.shape[1] == 1:
        return 1
    ones = [i for i in range(t.dim()) if t.shape[i] == 1]
    return ones[0] if ones else None


def _looks_like_step(out) -> bool:
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        return False
    leaves = pytree.tree_leaves(out[-1])
    return bool(leaves) and all(isinstance(t, torch.Tensor) for t in leaves)


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
        out = self.model(*flat[: self.n_inputs], self._state.build(flat[self.n_inputs:]))
        ys, st = _split_step(out, "forward(x, state)")
        return (*_tensor_leaves(ys, "forward's output"), *_tensor_leaves(st, "forward's state"))


class _LiftWrapper(nn.Module):
    def __init__(self, model: nn.Module, ctx: trace.Context, n_inputs: int):
        super().__init__()
        self.model = model
        self.n_inputs = n_inputs
        self._ctx = ctx  # a plain object: not a Module

    def forward(self, *flat):
        self._ctx.begin(flat[self.n_inputs:])
        out = self.model(*flat[: self.n_inputs])
        finals = self._ctx.end()
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
# The plan
# ---------------------------------------------------------------------------


@dataclass
class _Form:
    """How the model is called: flat torch tensors in, flat tensors out."""

    wrapper: nn.Module
    state_specs: list[StateSpec]
    run: Callable  # (inputs tuple, states list) -> flat outputs (data outputs, then states)
    trace_ctx: Callable  # () -> context manager to trace under


def plan_model(model, example_input, mode: str, opset: int, lengths: bool | None, *,
               input_axes=None) -> Plan:
    """Plan the export of a model built around recurrent layers, or of a step-protocol module.

    example_input: a tensor or tuple of tensors, one per data input of forward (the state
    excluded); int64 token ids are fine. Its sizes are not baked in.
    input_axes: optional, one tuple per data input naming each axis "batch", "time" or a
    fixed size (int or None), e.g. [("batch", "time", None)]; inferred when left out.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if lengths:
        raise UsageError(
            "a lengths input is supported for bare nn.RNN/LSTM/GRU layers only; give a model "
            "padded sequences (or export its recurrent layer on its own)"
        )
    _check_params(model)
    examples = _example_tuple(example_input)
    layers = trace.find_layers(model)
    ctx = trace.Context(model, layers)
    hinted = input_axes is not None
    axes_list = _given_axes(input_axes, examples) if hinted else _inferred_axes(examples, layers)
    names = _names("input", len(examples))
    inputs = [Input(n, DTYPES[x.dtype], a) for n, x, a in zip(names, examples, axes_list)]
    batch, time = _sizes(examples, axes_list)
    tb, tt = _trace_sizes(batch, time)
    trace_x = _at_size(examples, inputs, tb, tt)  # what is traced
    probe_x = _at_size(examples, inputs, tb, time)  # eager probes: the example's own length
    what = type(model).__name__

    n_params, n_required = _positional(model)
    fits_state = n_required <= len(examples) + 1 and (n_params is None or n_params > len(examples))
    init = _init_method(model)
    if init is not None and n_params is not None and len(examples) == n_params >= 2:
        raise UsageError(
            f"{what}.forward takes {n_params} positional arguments, the data input(s) then the "
            f"state, and example_input gives {len(examples)}: give only the data inputs (the "
            f"state comes from {init[0]}())"
        )
    # An init method without a state argument to forward (state kept in an attribute) does
    # not make a step protocol: such a model is treated as taking only its inputs.
    step = init is not None and fits_state

    def call_step(x, state):
        with torch.no_grad(), ctx.installed(probing=True):
            return model(*x, state)

    def batch_probe(b, state):
        return call_step(_at_size(examples, inputs, b, time), state)

    # The first eager runs of the user's forward: an exception here means the example
    # (or --input-shape) does not fit the model, which is the caller's to fix.
    with _user_forward(what, examples):
        if not step and fits_state:
            try:
                step = _looks_like_step(call_step(probe_x, None))
            except RnnedgeError:
                raise
            except Exception:  # noqa: BLE001 - not a step-protocol forward after all
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
                state = _discover_state(model, batch_probe)
            except UnsupportedModelError:
                step = False  # forward(x, None) gave (output, something) that is no state
        elif step:
            state = _discover_state(model, batch_probe)
        # Integer inputs are sampled over the vocabulary of the nn.Embedding that reads them.
        if step:
            ranges = _token_ranges(model, lambda: call_step(probe_x, state.build(state.zeros(tb))),
                                   probe_x)
        else:
            ranges = _token_ranges(model, lambda: _probe_model(ctx, model, probe_x), probe_x)
        for k, (info, x) in enumerate(zip(inputs, examples)):
            if info.dtype.startswith("int"):
                info.low, info.high = ranges.get(k, (int(x.min()), int(x.max()) + 1))

        if step:
            form = _step_form(model, ctx, state, inputs, probe_x, tb, mode)
        else:
            form = _lift_form(model, ctx, inputs, probe_x, mode)

    sample = make_sample(inputs)
    if not hinted and tt is not None and not _runs_at_other_length(form, sample, tb, tt):
        # The axis guessed as time is not one (e.g. a step module that reshapes its input
        # for an nn.LSTM): plan again with that axis fixed, one call per fixed-size input.
        fixed = [tuple(int(x.shape[i]) if a == "time" else a for i, a in enumerate(info.axes))
                 for info, x in zip(inputs, examples)]
        return plan_model(model, example_input, mode, opset, lengths, input_axes=fixed)
    time_axis = next((i.axes.index("time") for i in inputs if "time" in i.axes), None)

    if not step:
        _check_lifted_equals_model(model, form, sample, inputs, what)
    outputs = _output_specs(form, sample, inputs, time_axis)
    for out in outputs:
        if "time" in out.shape and out.shape.index("time") != time_axis:
            raise UnsupportedModelError(
                f"output {out.name} of {what} has its time axis at {out.shape.index('time')} "
                f"but the inputs at {time_axis}; a graph has one time axis for inputs and "
                "outputs: transpose the output in forward() (or the input)"
            )
    spec = ExportSpec(mode, tuple(i.spec() for i in inputs), tuple(outputs),
                      tuple(form.state_specs), time_axis, opset, source_of(model))
    graph = _export(form, spec, inputs, trace_x, tb, what)
    return Plan(spec, graph, _reference(form, spec), sample)


@contextlib.contextmanager
def _user_forward(what: str, examples):
    try:
        yield
    except RnnedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        shapes = ", ".join(f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}" for x in examples)
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(
            f"{what}.forward fails on an input of shape {shapes} ({type(exc).__name__}: {line}); "
            "check that the input shape and dtype (--input-shape, --input-dtype) fit the model"
        ) from exc


def _probe_model(ctx: trace.Context, model: nn.Module, x):
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
                longer[k] = _resize(x, axis, x.shape[axis] + 2)
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


def _loop_error(what: str, detail: str) -> ParityError:
    return ParityError(
        f"parity gate cannot pass: {detail}: something in forward() of {what} runs once per "
        "time step in a Python loop over time, which tracing unrolls at the example's fixed "
        "length, so the graph would equal eager PyTorch at that length only; write the "
        "per-step cell as a step-protocol module forward(x, state) -> (output, state) with "
        "init_hidden(batch_size) and let the runtime loop over time; nothing was written"
    )


def _step_form(model, ctx, state: StepState, inputs: list[Input], probe_x, tb: int,
               mode: str) -> _Form:
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
            raise _loop_error(type(model).__name__, (
                f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is called {calls} "
                f"times for {probe_x[k].shape[axis]} steps of {inputs[k].name}"))
    wrapper = _StepWrapper(model, state, len(inputs))

    def run(x, states):
        with torch.no_grad():
            return wrapper(*x, *states)

    return _Form(wrapper, state.specs(), run, lambda: ctx.installed(tracing=True))


def _bidirectional(layer: trace.Layer) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is bidirectional: its "
        "backward direction needs the future of the sequence, so the model cannot stream "
        "step by step; export it with mode='sequence' (--mode sequence), which takes a whole "
        "sequence per call"
    )


def _lift_form(model, ctx: trace.Context, inputs: list[Input], probe_x, mode) -> _Form:
    what = type(model).__name__
    _probe_model(ctx, model, probe_x)
    called = [layer for layer in ctx.layers if layer.record.calls]
    if not called:
        raise UnsupportedModelError(
            f"forward() of {what} never calls its recurrent layers "
            f"({', '.join(repr(layer.path) for layer in ctx.layers)}); {PROTOCOL}"
        )
    ctx.layers = called
    repeated = [layer for layer in called if layer.record.calls > 1]
    if repeated:
        found = _loop(ctx, lambda x: _probe_model(ctx, model, x), inputs, probe_x)
        if found:
            layer, calls, k, axis = found
            raise _loop_error(what, (
                f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is called {calls} "
                f"times for {probe_x[k].shape[axis]} steps along axis {axis} of "
                f"{inputs[k].name}"))
        layer = repeated[0]
        raise UnsupportedModelError(
            f"layer {layer.path!r} ({trace.kind_name(layer.module)}) is called "
            f"{layer.record.calls} times per forward(); rnnedge carries one state per layer, "
            "so each layer must run once per call: use separate layers, or write the model as "
            "a step-protocol module forward(x, state) -> (output, state)"
        )
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
    wrapper = _LiftWrapper(model, ctx, len(inputs))

    def run(x, states):
        with torch.no_grad(), ctx.installed(lift=True):
            return wrapper(*x, *states)

    return _Form(wrapper, specs, run, lambda: ctx.installed(lift=True, tracing=True))


def _run(form: _Form, x, batch: int, time: int | None) -> list:
    """The wrapper run eagerly from zero states; a failure says at which sizes."""
    try:
        return form.run(x, _zero_states(form.state_specs, batch))
    except RnnedgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported in one line
        at = f"batch {batch}" + (f", time {time}" if time is not None else "")
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UnsupportedModelError(
            f"forward() of {type(form.wrapper.model).__name__} fails at {at} "
            f"({type(exc).__name__}: {first}); rnnedge runs it at several batch sizes (and "
            "lengths): size everything from the input (x.shape[0]) instead of fixing it, or "
            "give input_axes (--input-shape) if an axis was taken for batch or time wrongly"
        ) from exc


def _torch_inputs(data: dict, inputs: list[Input]):
    return tuple(torch.from_numpy(np.ascontiguousarray(data[i.name])) for i in inputs)


def _zero_states(specs, batch: int) -> list[torch.Tensor]:
    return [torch.zeros([batch if i == s.batch_axis else d for i, d in enumerate(s.shape)])
            for s in specs]


def _runs_at_other_length(form: _Form, sample, tb: int, tt: int) -> bool:
    rng = np.random.default_rng(1)
    try:
        data = sample(rng, tb, tt + 2)
        inputs = tuple(torch.from_numpy(v) for v in data.values())
        form.run(inputs, _zero_states(form.state_specs, tb))
    except RnnedgeError:
        raise
    except Exception:  # noqa: BLE001 - does not run at another length
        return False
    return True


def _check_lifted_equals_model(model, form: _Form, sample, inputs, what: str) -> None:
    rng = np.random.default_rng(2)
    batch, time = PROBE_SIZES[0]
    data = sample(rng, batch, time)
    x = _torch_inputs(data, inputs)
    with torch.no_grad():
        own = pytree.tree_leaves(model(*x))  # ran already, through the lifted wrapper
    lifted = _run(form, x, batch, time)[: len(own)]
    if len(lifted) != len(own) or not all(torch.allclose(a, b, atol=SELF_ATOL, rtol=SELF_RTOL) for a, b in zip(own, lifted)):
        raise UnsupportedModelError(
            f"with zero initial states, {what} with its recurrent state carried differs from "
            "its own forward(): a recurrent layer does not start from zeros there (or forward "
            "is not deterministic); write the model as a step-protocol module forward(x, "
            "state) -> (output, state)"
        )


def _output_specs(form: _Form, sample, inputs: list[Input], time_axis) -> list[TensorSpec]:
    runs = []
    for batch, time in PROBE_SIZES:
        t = time if time_axis is not None else None
        data = sample(np.random.default_rng(3), batch, t)
        flat = _run(form, _torch_inputs(data, inputs), batch, t)
        outs = flat[: len(flat) - len(form.state_specs)]
        states = flat[len(outs):]
        for s, got in zip(form.state_specs, states):
            want = tuple(batch if i == s.batch_axis else d for i, d in enumerate(s.shape))
            if tuple(got.shape) != want:
                raise UnsupportedModelError(
                    f"the state after a call has shape {tuple(got.shape)} but the state before "
                    f"it {want} ({s.output}); a carried state must keep its shape"
                )
        runs.append((batch, t, outs))
    (b1, t1, o1), (b2, t2, o2) = runs
    names = _names("output", len(o1))
    specs = []
    for name, a, b in zip(names, o1, o2):
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
            else:
                shape.append(f"{name}_{k}")
        specs.append(TensorSpec(name, str(a.dtype).replace("torch.", ""), tuple(shape)))
    return specs


def _export(form: _Form, spec: ExportSpec, inputs: list[Input], trace_x, tb: int, what: str):
    states = _zero_states(spec.states, tb)
    dyn = [{i: a for i, a in enumerate(info.axes) if isinstance(a, str)} for info in inputs]
    dyn += [{s.batch_axis: "batch"} for s in spec.states]
    in_names = [i.name for i in spec.inputs] + [s.input for s in spec.states]
    out_names = [o.name for o in spec.outputs] + [s.output for s in spec.states]
    axes = [info.axes for info in inputs] + [s.shape for s in spec.states]
    try:
        with form.trace_ctx():
            proto = trace.export_onnx(form.wrapper, (*trace_x, *states), (tuple(dyn),),
                                      in_names, out_names, spec.opset, what)
    except trace.Specialized as exc:
        raise _fixed_axis_error(what, in_names[exc.index], exc.axis, axes[exc.index][exc.axis],
                                exc.size) from None
    _check_dynamic(proto, spec, what)
    declared = {t.name: t.shape for t in spec.inputs + spec.outputs}
    declared.update({s.input: s.shape for s in spec.states})
    declared.update({s.output: s.shape for s in spec.states})
    for vi in list(proto.graph.input) + list(proto.graph.output):
        trace.set_shape(vi, declared[vi.name])
    proto.graph.name = what
    return proto


def _check_dynamic(proto, spec: ExportSpec, what: str) -> None:
    """Refuse a graph whose batch or time axis the trace fixed to the example's size."""
    dims = trace.dim_values(proto)
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
        return _loop_error(what, f"the trace fixed the time axis of {name} at {size} steps")
    return UnsupportedModelError(
        f"the traced graph of {what} fixes axis {axis} ({axis_name}) of {name} at {size}: "
        "forward() builds something with a fixed size there (e.g. torch.zeros(1, ...)); "
        "size it from the input (x.shape[0])"
    )


def _reference(form: _Form, spec: ExportSpec):
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
