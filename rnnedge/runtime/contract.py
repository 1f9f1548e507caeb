"""What a graph's inputs and outputs are: read from rnnedge metadata, or inferred.

A graph written by rnnedge carries its contract as JSON under the ``rnnedge`` metadata
key (docs/contract.md); it is checked against the graph's real inputs and outputs. A
graph from elsewhere has no metadata: its state pairs come from ``state_map`` or from
naming conventions, and shapes, dtypes and batch/time axes from the graph's value infos.

Shapes here are tuples of ``int`` (fixed size), ``str`` (named dynamic axis) or ``None``
(unnamed dynamic axis).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from rnnedge.errors import ContractError, UsageError

FORMAT = 1
METADATA_KEY = "rnnedge"
MODES = ("stream", "sequence")

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
_BATCH_NAMES = re.compile(r"^(batch.*|n|b|bs|nbatch|num_batch|.*_batch)$", re.IGNORECASE)
_TIME_NAMES = re.compile(r"^(time.*|t|seq|seq_len|seqlen|sequence.*|frames|num_frames|steps)$",
                         re.IGNORECASE)


@dataclass(frozen=True)
class TensorInfo:
    """One data input or output.

    shape: per axis an int (fixed), a str (named dynamic) or None (unnamed dynamic).
    batch_axis / time_axis: the axis that is batch / time in this tensor, or None.
    """

    name: str
    dtype: np.dtype
    shape: tuple
    batch_axis: int | None = None
    time_axis: int | None = None

    def describe(self, batch: int | None = None) -> str:
        """``float32[time, batch=2, 16]``: the shape a caller must give."""
        dims = []
        for axis, dim in enumerate(self.shape):
            label = "?" if dim is None else str(dim)
            if axis == self.batch_axis and batch is not None:
                label = f"batch={batch}"
            dims.append(label)
        return f"{self.dtype.name}[{', '.join(dims)}]"


@dataclass(frozen=True)
class StateInfo:
    """One recurrent state: graph input ``input`` before a call, output ``output`` after.

    shape: as in TensorInfo; every axis but ``batch_axis`` is fixed. batch_axis is None
    for a state of fixed shape (a foreign graph exported for one batch size).
    """

    input: str
    output: str
    dtype: np.dtype
    shape: tuple
    batch_axis: int | None
    init: str = "zeros"

    def shape_for(self, batch: int) -> tuple:
        """The concrete shape of this state for ``batch`` rows."""
        return tuple(batch if axis == self.batch_axis else dim for axis, dim in enumerate(self.shape))


@dataclass(frozen=True)
class Contract:
    """Everything the runtime needs to know about a graph.

    inputs: every graph input that is not a state (data, plus any foreign graph's inputs
    that a stream will bind as constants), in graph order. metadata: the parsed rnnedge
    JSON, or None for a foreign graph.
    """

    inputs: tuple
    outputs: tuple
    states: tuple
    time_axis: int | None
    mode: str
    metadata: dict | None


@dataclass(frozen=True)
class GraphIO:
    """A graph input or output as onnxruntime reports it."""

    name: str
    dtype: np.dtype | None  # None for a type numpy cannot hold (then it cannot be bound)
    type_name: str
    shape: tuple

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        dtype = self.dtype.name if self.dtype is not None else self.type_name
        return f"{self.name} {dtype}[{dims}]"


def graph_io(args) -> list[GraphIO]:
    """``session.get_inputs()`` / ``get_outputs()`` as GraphIO."""
    out = []
    for arg in args:
        name = _ORT_DTYPES.get(arg.type)
        shape = tuple(arg.shape) if arg.shape is not None else ()
        shape = tuple(d if isinstance(d, int) and d >= 0 else (d or None) for d in shape)
        out.append(GraphIO(arg.name, np.dtype(name) if name else None, arg.type, shape))
    return out


def read_contract(meta: str | None, inputs: list[GraphIO], outputs: list[GraphIO], *,
                  state_map: dict | None = None, batch_axes: dict | None = None,
                  time_axis: int | None = None) -> Contract:
    """The contract of a graph: from its rnnedge metadata JSON, else inferred (foreign)."""
    if meta is not None:
        if state_map is not None or batch_axes is not None or time_axis is not None:
            raise UsageError(
                "this graph carries rnnedge metadata, which already says its states and axes; "
                "state_map, batch_axes and time_axis are only for graphs without it"
            )
        return _from_metadata(meta, inputs, outputs)
    return _foreign(inputs, outputs, state_map, batch_axes or {}, time_axis)


# --- graphs written by rnnedge ------------------------------------------------------------


def _from_metadata(text: str, inputs: list[GraphIO], outputs: list[GraphIO]) -> Contract:
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ContractError(f"the graph's rnnedge metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise ContractError("the graph's rnnedge metadata must be a JSON object")
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise ContractError(
            f"the graph's rnnedge metadata has format {fmt!r}; this runtime reads format "
            f"{FORMAT} only: upgrade rnnedge or re-export the model with this version"
        )
    mode = meta.get("mode")
    if mode not in MODES:
        raise ContractError(f"rnnedge metadata: mode must be one of {MODES}, got {mode!r}")
    time_axis = meta.get("time_axis")
    if time_axis is not None and (not isinstance(time_axis, int) or time_axis < 0):
        raise ContractError(f"rnnedge metadata: time_axis must be null or an int >= 0, got {time_axis!r}")
    try:
        data_in = [_meta_tensor(t, time_axis) for t in meta["inputs"]]
        data_out = [_meta_tensor(t, time_axis) for t in meta["outputs"]]
        states = [_meta_state(s) for s in meta["states"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ContractError(f"rnnedge metadata is malformed ({exc!r}); see docs/contract.md") from exc

    _check_against_graph(
        [t.name for t in data_in] + [s.input for s in states], inputs, "input",
        {t.name: t for t in data_in} | {s.input: s for s in states})
    _check_against_graph(
        [t.name for t in data_out] + [s.output for s in states], outputs, "output",
        {t.name: t for t in data_out} | {s.output: s for s in states})
    return Contract(tuple(data_in), tuple(data_out), tuple(states), time_axis, mode, meta)


def _meta_shape(raw) -> tuple:
    shape = tuple(raw)
    for dim in shape:
        if not (isinstance(dim, str) or (isinstance(dim, int) and dim >= 0)):
            raise ValueError(f"shape entries must be strings or ints >= 0, got {dim!r}")
    return shape


def _meta_tensor(raw: dict, time_axis: int | None) -> TensorInfo:
    shape = _meta_shape(raw["shape"])
    batch = shape.index("batch") if "batch" in shape else None
    # The contract's time_axis applies to tensors that have one: not to `lengths` (batch,).
    tax = None
    if time_axis is not None and time_axis < len(shape) and time_axis != batch \
            and not isinstance(shape[time_axis], int):
        tax = time_axis
    return TensorInfo(str(raw["name"]), np.dtype(raw["dtype"]), shape, batch, tax)


def _meta_state(raw: dict) -> StateInfo:
    shape = _meta_shape(raw["shape"])
    axis = raw["batch_axis"]
    if not isinstance(axis, int) or not 0 <= axis < len(shape) or isinstance(shape[axis], int):
        raise ValueError(f"state {raw['input']!r}: batch_axis {axis!r} is not a dynamic axis of {list(shape)}")
    if any(not isinstance(d, int) for i, d in enumerate(shape) if i != axis):
        raise ValueError(f"state {raw['input']!r}: only the batch axis may be dynamic in {list(shape)}")
    init = raw.get("init", "zeros")
    if init != "zeros":
        raise ValueError(f"state {raw['input']!r}: unknown init {init!r} (this runtime knows 'zeros')")
    return StateInfo(str(raw["input"]), str(raw["output"]), np.dtype(raw["dtype"]), shape, axis, init)


def _check_against_graph(names: list[str], graph: list[GraphIO], kind: str, specs: dict) -> None:
    have = {g.name: g for g in graph}
    if sorted(names) != sorted(have) or len(set(names)) != len(names):
        raise ContractError(
            f"rnnedge metadata lists graph {kind}s {names} but the graph has {list(have)}; "
            "the file was changed after export: re-export it"
        )
    for name in names:
        spec, real = specs[name], have[name]
        if real.dtype is not None and real.dtype != spec.dtype:
            raise ContractError(
                f"rnnedge metadata says {kind} {name!r} is {spec.dtype.name}, the graph says "
                f"{real.dtype.name}; re-export the model")
        if real.shape and len(real.shape) != len(spec.shape):
            raise ContractError(
                f"rnnedge metadata gives {kind} {name!r} rank {len(spec.shape)}, the graph "
                f"rank {len(real.shape)}; re-export the model")


# --- graphs from elsewhere -----------------------------------------------------------------

# (input, output) naming conventions for a state pair, tried on every input/output pair.
_CONVENTIONS = (
    lambda i, o: i.endswith("0") and o in (i[:-1] + "n", i[:-1] + "N"),  # h0 -> hn
    lambda i, o: o in (i + "N", i + "n", i + "_n", i + "_out", i + "_new", i + "_next"),
    lambda i, o: o in ("new_" + i, "next_" + i),  # X -> new_X, cache_X -> new_cache_X
    lambda i, o: i.endswith("_in") and o == i[:-3] + "_out",
    lambda i, o: i.startswith("past_") and o == "present_" + i[5:],
)


def _matches(i: str, o: str) -> bool:
    return any(rule(i, o) for rule in _CONVENTIONS)


def _listing(inputs: list[GraphIO], outputs: list[GraphIO]) -> str:
    return ("graph inputs: " + ", ".join(g.describe() for g in inputs)
            + "; graph outputs: " + ", ".join(g.describe() for g in outputs))


def _example_map(inputs: list[GraphIO], outputs: list[GraphIO]) -> dict:
    """A plausible state_map for an error message: a state keeps its shape and dtype."""
    example, used = {}, set()
    for same in (lambda a, b: a.shape == b.shape, lambda a, b: len(a.shape) == len(b.shape)):
        for i in inputs:
            if i.name in example or not i.shape:
                continue
            for o in outputs:
                if o.name not in used and o.dtype == i.dtype and same(i, o):
                    example[i.name] = o.name
                    used.add(o.name)
                    break
        if example:
            break
    return example or {"<state input>": "<state output>"}


def pair_states(inputs: list[GraphIO], outputs: list[GraphIO], state_map: dict | None) -> dict:
    """{state input: state output} for a graph without metadata.

    Uses ``state_map`` when given (checked), else the naming conventions; ambiguous or
    empty pairings raise ContractError listing the graph's inputs and outputs.
    """
    in_names = {g.name: g for g in inputs}
    out_names = {g.name: g for g in outputs}
    if state_map is not None:
        if not isinstance(state_map, dict):
            raise UsageError(f"state_map must be a dict {{state input: state output}}, got {type(state_map).__name__}")
        bad = [k for k in state_map if k not in in_names] + \
              [v for v in state_map.values() if v not in out_names]
        if bad or len(set(state_map.values())) != len(state_map):
            what = f"unknown names {bad}" if bad else "an output paired twice"
            raise ContractError(f"state_map {state_map} has {what}; {_listing(inputs, outputs)}; "
                                f"e.g. state_map={_example_map(inputs, outputs)!r}")
        for i, o in state_map.items():
            a, b = in_names[i], out_names[o]
            if a.dtype != b.dtype or len(a.shape) != len(b.shape):
                raise ContractError(
                    f"state_map pairs {a.describe()} with {b.describe()}, which differ in dtype "
                    f"or rank; {_listing(inputs, outputs)}")
        return dict(state_map)

    candidates = {i.name: [o.name for o in outputs if _matches(i.name, o.name)] for i in inputs}
    claimed: dict[str, list[str]] = {}
    for i, outs in candidates.items():
        for o in outs:
            claimed.setdefault(o, []).append(i)
    problems = [f"input {i!r} matches outputs {outs}" for i, outs in candidates.items() if len(outs) > 1]
    problems += [f"output {o!r} matches inputs {ins}" for o, ins in claimed.items() if len(ins) > 1]
    pairs = {i: outs[0] for i, outs in candidates.items() if len(outs) == 1}
    if not problems and not pairs:
        problems.append("no input/output pair follows a known naming convention "
                        "(h0->hn, X->XN, X->X_out, X->new_X, cache_X->new_cache_X)")
    if problems:
        example: dict = {}
        for i, outs in candidates.items():
            free = [o for o in outs if o not in example.values()]
            if free:
                example[i] = free[0]
        example = example or _example_map(inputs, outputs)
        raise ContractError(
            f"cannot pair the graph's state inputs with its outputs: {'; '.join(problems)}; "
            f"{_listing(inputs, outputs)}; pass the pairs explicitly, e.g. "
            f"rnnedge.load(path, state_map={example!r}) (state_map={{}} runs it stateless)")
    for i, o in pairs.items():
        a, b = in_names[i], out_names[o]
        if a.dtype != b.dtype or len(a.shape) != len(b.shape):
            raise ContractError(
                f"input {a.describe()} and output {b.describe()} are named like a state pair but "
                f"differ in dtype or rank; {_listing(inputs, outputs)}; pass state_map explicitly")
    return pairs


def _named_axis(shape: tuple, pattern: re.Pattern) -> int | None:
    for axis, dim in enumerate(shape):
        if isinstance(dim, str) and pattern.match(dim):
            return axis
    return None


def _check_axis(name: str, axis, rank: int) -> int:
    if not isinstance(axis, int) or not 0 <= axis < rank:
        raise UsageError(f"batch_axes[{name!r}] must be an axis of its rank-{rank} tensor, got {axis!r}")
    return axis


def _foreign_tensor(g: GraphIO, batch_axes: dict, time_axis: int | None) -> TensorInfo:
    if g.dtype is None:
        raise ContractError(f"graph input/output {g.name!r} has type {g.type_name}, which rnnedge cannot bind")
    rank = len(g.shape)
    if g.name in batch_axes:
        batch = _check_axis(g.name, batch_axes[g.name], rank)
    else:
        batch = _named_axis(g.shape, _BATCH_NAMES)
        if batch is None and rank > 0:
            batch = 0
    if time_axis is not None:
        tax = time_axis if time_axis < rank and time_axis != batch else None
    else:
        tax = _named_axis(g.shape, _TIME_NAMES)
    return TensorInfo(g.name, g.dtype, g.shape, batch, tax)


def _foreign_state(i: GraphIO, o: GraphIO, batch_axes: dict) -> StateInfo:
    if i.dtype is None:
        raise ContractError(f"state input {i.name!r} has type {i.type_name}, which rnnedge cannot bind")
    dynamic = [axis for axis, dim in enumerate(i.shape) if not isinstance(dim, int)]
    if i.name in batch_axes:
        batch = _check_axis(i.name, batch_axes[i.name], len(i.shape))
    else:
        batch = _named_axis(i.shape, _BATCH_NAMES)
        if batch is None and dynamic:
            batch = dynamic[0]
    rest = [axis for axis in dynamic if axis != batch]
    if rest:
        raise ContractError(
            f"state input {i.describe()} has dynamic axes {rest} besides its batch axis "
            f"{batch}, so its initial state has no known shape; fix the graph's input shape "
            "(e.g. onnx.tools.update_model_dims) or pass batch_axes")
    return StateInfo(i.name, o.name, i.dtype, i.shape, batch)


def _foreign(inputs: list[GraphIO], outputs: list[GraphIO], state_map, batch_axes: dict,
             time_axis: int | None) -> Contract:
    if not isinstance(batch_axes, dict):
        raise UsageError(f"batch_axes must be a dict {{name: axis}}, got {type(batch_axes).__name__}")
    if time_axis is not None and (not isinstance(time_axis, int) or time_axis < 0):
        raise UsageError(f"time_axis must be None or an int >= 0, got {time_axis!r}")
    pairs = pair_states(inputs, outputs, state_map)
    by_out = {g.name: g for g in outputs}
    states = tuple(_foreign_state(g, by_out[pairs[g.name]], batch_axes)
                   for g in inputs if g.name in pairs)
    paired_out = set(pairs.values())
    data_in = tuple(_foreign_tensor(g, batch_axes, time_axis) for g in inputs if g.name not in pairs)
    data_out = tuple(_foreign_tensor(g, batch_axes, time_axis) for g in outputs if g.name not in paired_out)
    axes = {t.time_axis for t in data_in + data_out if t.time_axis is not None}
    graph_time = axes.pop() if len(axes) == 1 else None
    return Contract(data_in, data_out, states, graph_time, "stream", None)
