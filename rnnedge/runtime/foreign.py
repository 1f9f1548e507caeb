"""The contract of a graph not written by rnnedge (no metadata), inferred from the graph.

State pairs come from ``state_map`` or from naming conventions (h0 -> hn, X -> new_X, ...);
shapes, dtypes and batch/time axes from the graph's inputs and outputs as onnxruntime
reports them (``GraphIO``). Ambiguous or impossible pairings raise ContractError listing
every graph input and output and a ``state_map`` to pass.
"""

from __future__ import annotations

import re

from rnnedge.contract import StateSpec
from rnnedge.errors import ContractError, UsageError
from rnnedge.runtime.contract import Contract, GraphIO, TensorInfo

_BATCH_NAMES = re.compile(r"^(batch.*|n|b|bs|nbatch|num_batch|.*_batch)$", re.IGNORECASE)
_TIME_NAMES = re.compile(r"^(time.*|t|seq|seq_len|seqlen|sequence.*|frames|num_frames|steps)$",
                         re.IGNORECASE)

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
        unlike = _unlike_pair(state_map, in_names, out_names)
        if unlike:
            a, b = unlike
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
    unlike = _unlike_pair(pairs, in_names, out_names)
    if unlike:
        a, b = unlike
        raise ContractError(
            f"input {a.describe()} and output {b.describe()} are named like a state pair but "
            f"differ in dtype or rank; {_listing(inputs, outputs)}; pass state_map explicitly")
    return pairs


def _unlike_pair(pairs: dict, in_names: dict, out_names: dict) -> tuple | None:
    """The first (input, output) of ``pairs`` ({input name: output name}) that differ in
    dtype or rank, so cannot be one state; None when every pair can."""
    for i, o in pairs.items():
        a, b = in_names[i], out_names[o]
        if a.dtype != b.dtype or len(a.shape) != len(b.shape):
            return a, b
    return None


def _named_axis(shape: tuple, pattern: re.Pattern) -> int | None:
    for axis, dim in enumerate(shape):
        if isinstance(dim, str) and pattern.match(dim):
            return axis
    return None


def _check_axis(name: str, axis, rank: int) -> int:
    if not isinstance(axis, int) or not 0 <= axis < rank:
        raise UsageError(f"batch_axes[{name!r}] must be an axis of its rank-{rank} tensor, got {axis!r}")
    return axis


def _tensor(g: GraphIO, batch_axes: dict, time_axis: int | None) -> TensorInfo:
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


def _state(i: GraphIO, o: GraphIO, batch_axes: dict) -> StateSpec:
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
    return StateSpec(i.name, o.name, i.dtype.name, i.shape, batch)


def infer_contract(inputs: list[GraphIO], outputs: list[GraphIO], state_map: dict | None,
                   batch_axes: dict | None, time_axis: int | None) -> Contract:
    """The Contract of a graph without rnnedge metadata (see the module docstring)."""
    batch_axes = {} if batch_axes is None else batch_axes
    if not isinstance(batch_axes, dict):
        raise UsageError(f"batch_axes must be a dict {{name: axis}}, got {type(batch_axes).__name__}")
    if time_axis is not None and (not isinstance(time_axis, int) or time_axis < 0):
        raise UsageError(f"time_axis must be None or an int >= 0, got {time_axis!r}")
    pairs = pair_states(inputs, outputs, state_map)
    by_out = {g.name: g for g in outputs}
    states = tuple(_state(g, by_out[pairs[g.name]], batch_axes) for g in inputs if g.name in pairs)
    paired_out = set(pairs.values())
    data_in = tuple(_tensor(g, batch_axes, time_axis) for g in inputs if g.name not in pairs)
    data_out = tuple(_tensor(g, batch_axes, time_axis) for g in outputs if g.name not in paired_out)
    axes = {t.time_axis for t in data_in + data_out if t.time_axis is not None}
    graph_time = axes.pop() if len(axes) == 1 else None
    return Contract(data_in, data_out, states, graph_time, "stream", None)
