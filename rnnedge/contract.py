"""The rnnedge graph contract: written once by the exporter, read by everything else.

A graph rnnedge writes carries an ``ExportSpec`` as JSON under the ``rnnedge`` key of its
ONNX ``metadata_props`` (format 1, docs/contract.md). ``ExportSpec.to_json`` writes it and
``from_json`` reads it back, validated, or raises ContractError with a one-line message;
every reader (runtime, verify, inspect, bench, precision) goes through ``from_json``.

Shapes are tuples with a string for a dynamic axis ("batch", "time") and an int for a
fixed size; dtypes are numpy names ("float32", "int64"). Only numpy is imported here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np

from rnnedge.errors import ContractError

#: The format a contract is written in: 1, or 2 where a format-1 reader would take a
#: tensor's time axis wrongly (a tensor timed on another axis than ``time_axis``).
FORMAT = 1
FORMATS = (1, 2)  # the formats this version reads
STATE_KINDS = ("carried", "internal")
METADATA_KEY = "rnnedge"
MODES = ("stream", "sequence")
DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool")
INITS = ("zeros",)
#: The state of stream graphs with ``latency`` > 0 that marks a stream's last call (flush):
#: (batch, 1) float32, the zero frames appended past the stream's end (0 on other calls).
FLUSH_STATE, FLUSH_STATE_OUT = "latency.flush0", "latency.flushn"
#: The name, dtype and shape of sequence mode's optional per-row valid lengths input.
LENGTHS = ("lengths", "int64", ("batch",))

Shape = tuple  # of int (fixed size) | str (named dynamic axis)


@dataclass(frozen=True)
class TensorSpec:
    """One data input or output of the graph.

    range: for integer (token id) inputs, the half-open interval ``[low, high)`` of values
    the graph was proven on (an nn.Embedding's ``[0, num_embeddings)``); None when unknown.
    constant: for data inputs, True when the input is constant per stream (e.g. an
    attention decoder's encoder memory, (batch, 50, 512)): it has no time axis, and a
    runtime feeds it once per stream (``constants=``) rather than with every call.
    time_axis: this tensor's own time axis, or None (no time axis): by default the
    position of "time" in ``shape`` (e.g. 2 for a (batch, 1, time, 80) input, 1 for its
    (batch, time, 29) output). time_ratio: for outputs, the steps of this tensor per step
    of the inputs: an int (2 for an output that upsamples time by 2; 1 otherwise), or
    (1, 4) — one step per 4 input steps — for an output downsampled by strides along time
    (written as ``[1, 4]``). end_offset: for outputs of a stream graph both strided and
    late, the frames a whole stream of N input steps has: floor(N * time_ratio +
    end_offset) (an int or a reduced fraction, written ``[num, den]``); None (not written):
    ceil(N * time_ratio).
    """

    name: str
    dtype: str
    shape: Shape
    range: tuple[int, int] | None = None
    constant: bool = False
    time_axis: int | None = None
    time_ratio: int | tuple[int, int] = 1
    end_offset: int | tuple[int, int] | None = None

    def __post_init__(self):
        if self.time_axis is None and "time" in self.shape:  # frozen: hence __setattr__
            object.__setattr__(self, "time_axis", tuple(self.shape).index("time"))

    @property
    def batch_axis(self) -> int | None:
        """The axis named "batch", or None."""
        return self.shape.index("batch") if "batch" in self.shape else None

    @property
    def is_lengths(self) -> bool:
        """True for sequence mode's int64 ``lengths`` input of shape (batch,)."""
        return (self.name, self.dtype, tuple(self.shape)) == LENGTHS

    def as_dict(self) -> dict:
        out = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.range is not None:
            out["range"] = list(self.range)
        if self.constant:  # written only when set: older readers see the same JSON as before
            out["constant"] = True
        if self.time_axis is not None:
            out["time_axis"] = self.time_axis
        if self.time_ratio != 1:
            ratio = self.time_ratio
            out["time_ratio"] = list(ratio) if isinstance(ratio, tuple) else ratio
        if self.end_offset is not None:
            end = self.end_offset
            out["end_offset"] = list(end) if isinstance(end, tuple) else end
        return out


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor: graph input ``input`` before a call, ``output`` after.

    shape: every axis fixed but ``batch_axis``. batch_axis is None only for a state of
    fixed shape (a graph from elsewhere exported for one batch size; never in metadata).
    """

    input: str
    output: str
    dtype: str
    shape: Shape
    batch_axis: int | None
    init: str = "zeros"

    def shape_for(self, batch: int) -> tuple:
        """The concrete shape of this state for ``batch`` rows, e.g. (layers, batch, hidden)."""
        return tuple(batch if axis == self.batch_axis else dim for axis, dim in enumerate(self.shape))

    def zeros(self, batch: int) -> np.ndarray:
        """A fresh state for ``batch`` rows (``init`` "zeros"): ``shape_for(batch)``, ``dtype``."""
        return np.zeros(self.shape_for(batch), self.dtype)

    def as_dict(self) -> dict:
        return {"input": self.input, "output": self.output, "dtype": self.dtype,
                "shape": list(self.shape), "batch_axis": self.batch_axis, "init": self.init}


@dataclass(frozen=True)
class ExportSpec:
    """The whole graph contract.

    parity: the gate's figures; writers add them once the gate has run (``metadata_json``):
    max_abs, max_rel, cases, referee, ref_max_abs, eager_max_abs, min_length, max_length,
    nan_propagates, and for reduced precisions their policy (docs/contract.md); read as given.
    source: what was exported (normally {"class", "torch"}); informational, any JSON value.
    time_axis: the data inputs' time axis (that of the first timed input), None for a
    graph that takes one step per call; each tensor's own is ``TensorSpec.time_axis``.
    state: "carried" (the recurrent state is the graph's ``states``, carried between
    calls) or "internal" (a sequence graph that starts every call from zeros inside: no
    states).
    chunk_multiple: stream graphs with strided ops along time (conv caches): every call
    but a stream's last takes a multiple of this many steps (1: any). latency: the input
    steps an output step comes after its own input step (0: none). chunk_offset: with
    ``chunk_multiple`` M > 1, a stream's first call takes T1 steps, T1 = chunk_offset
    (mod M) and T1 > latency; later calls but the last take multiples of M (0: all do).
    model_end: (residue, least) where a late strided model pads a whole input of N steps to
    its own end, L = the least L >= max(N, least) with L = residue (mod M) (a "valid
    length"), off the stream's grid; None: the grid is the model's end.
    """

    mode: str  # "stream" | "sequence"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    states: tuple[StateSpec, ...]
    time_axis: int | None
    opset: int
    source: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    state: str = "carried"
    chunk_multiple: int = 1
    latency: int = 0
    chunk_offset: int = 0
    model_end: tuple[int, int] | None = None

    @property
    def data_inputs(self) -> tuple[TensorSpec, ...]:
        """The data inputs without sequence mode's ``lengths``."""
        return tuple(t for t in self.inputs if not t.is_lengths)

    @property
    def has_lengths(self) -> bool:
        return any(t.is_lengths for t in self.inputs)

    def time_axis_of(self, t: TensorSpec) -> int | None:
        """The time axis of tensor ``t`` (its own ``time_axis``), or None."""
        return t.time_axis

    @property
    def format(self) -> int:
        """1, or 2 when a format-1 reader (which takes ``time_axis`` for every tensor)
        would misread a tensor's own time axis."""
        tensors = self.inputs + self.outputs
        # A format-1 reader would feed any chunk.
        if self.chunk_multiple != 1 or self.latency or self.chunk_offset:
            return 2
        return 1 if all(_global_time_axis(self.time_axis, t) == t.time_axis for t in tensors) else 2

    def zero_states(self, batch: int) -> dict:
        """{state input name: zeros} for a fresh call of ``batch`` rows."""
        return {s.input: s.zeros(batch) for s in self.states}

    def metadata(self, parity: dict | None = None) -> dict:
        """The contract as a JSON-ready dict; ``parity`` replaces this spec's own figures."""
        return {
            "format": self.format,
            "mode": self.mode,
            "inputs": [t.as_dict() for t in self.inputs],
            "outputs": [t.as_dict() for t in self.outputs],
            "states": [s.as_dict() for s in self.states],
            "time_axis": self.time_axis,
            "opset": self.opset,
            "source": dict(self.source) if isinstance(self.source, dict) else self.source,
            "parity": dict(self.parity if parity is None else parity),
            # Written only when internal: a graph with carried state reads as before.
            **({"state": self.state} if self.state != "carried" else {}),
            # Written only when not the default: other graphs read as before.
            **({"chunk_multiple": self.chunk_multiple} if self.chunk_multiple != 1 else {}),
            **({"latency": self.latency} if self.latency else {}),
            **({"chunk_offset": self.chunk_offset} if self.chunk_offset else {}),
            **({"model_end": list(self.model_end)} if self.model_end else {}),
        }

    def metadata_json(self, parity: dict | None = None) -> str:
        return json.dumps(self.metadata(parity), sort_keys=False)

    def to_json(self) -> str:
        return self.metadata_json()

    def replace(self, **changes) -> ExportSpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_json(cls, text: str) -> ExportSpec:
        return from_json(text)


# --- reading ------------------------------------------------------------------------------

_REQUIRED = ("mode", "inputs", "outputs", "states", "opset")


def _fail(what: str) -> ContractError:
    return ContractError(f"rnnedge metadata is malformed: {what}; see docs/contract.md, or re-export the model")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _name(raw: dict, key: str, where: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value:
        raise _fail(f"{where} needs a non-empty string {key!r}, got {value!r}")
    return value


def _dtype(raw: dict, where: str) -> str:
    value = raw.get("dtype")
    if value not in DTYPES:
        raise _fail(f"{where} has dtype {value!r}; known dtypes are {', '.join(DTYPES)}")
    return value


def _shape(raw: dict, where: str) -> tuple:
    value = raw.get("shape")
    if not isinstance(value, list):
        raise _fail(f"{where} needs a 'shape' list, got {value!r}")
    for dim in value:
        if not (isinstance(dim, str) and dim) and not (_is_int(dim) and dim >= 0):
            raise _fail(f"{where}: shape entries must be axis names or ints >= 0, got {dim!r} in {value!r}")
    return tuple(value)


def _object(raw, where: str) -> dict:
    if not isinstance(raw, dict):
        raise _fail(f"{where} must be a JSON object, got {raw!r}")
    return raw


def _global_time_axis(axis: int | None, t: TensorSpec) -> int | None:
    """Format 1's rule for a tensor's time axis: the graph's ``time_axis`` where ``t`` has
    a dynamic, non-batch axis there (so not for ``lengths`` (batch,), nor a fixed size)."""
    if axis is None or axis >= len(t.shape) or axis == t.batch_axis or isinstance(t.shape[axis], int):
        return None
    return axis


def _tensor(raw, where: str, graph_axis: int | None = None) -> TensorSpec:
    raw = _object(raw, where)
    name = _name(raw, "name", where)
    where = f"{where} {name!r}"
    dtype, shape = _dtype(raw, where), _shape(raw, where)
    span = raw.get("range")
    if span is not None:
        if not np.issubdtype(np.dtype(dtype), np.integer):
            raise _fail(f"{where} is {dtype} but has a 'range', which only integer inputs have")
        if not (isinstance(span, list) and len(span) == 2 and all(map(_is_int, span)) and span[0] < span[1]):
            raise _fail(f"{where}: 'range' must be [low, high] ints with low < high, got {span!r}")
        span = (span[0], span[1])
    constant = raw.get("constant", False)
    if not isinstance(constant, bool):
        raise _fail(f"{where}: 'constant' must be true or false, got {constant!r}")
    if constant and "time" in shape:
        raise _fail(f"{where} is marked constant but has a time axis {list(shape)}")
    if "time_axis" in raw:  # written per tensor since format 2's time: each its own
        axis = raw["time_axis"]
        if axis is not None and (not _is_int(axis) or not 0 <= axis < len(shape)
                                 or _is_int(shape[axis]) or shape[axis] == "batch"):
            raise _fail(f"{where}: time_axis {axis!r} is not a dynamic, non-batch axis of {list(shape)}")
    else:  # older files: the graph's one time_axis, where the tensor has such an axis
        axis = _global_time_axis(graph_axis, TensorSpec(name, dtype, shape))
    ratio = raw.get("time_ratio", 1)
    if isinstance(ratio, list) and len(ratio) == 2 and all(_is_int(r) and r >= 1 for r in ratio) \
            and ratio[1] > 1 and math.gcd(*ratio) == 1:
        ratio = (ratio[0], ratio[1])
    elif not _is_int(ratio) or ratio < 1:
        raise _fail(f"{where}: time_ratio must be an int >= 1 or a reduced fraction "
                    f"[num, den] with den > 1, got {ratio!r}")
    end = raw.get("end_offset")
    if isinstance(end, list) and len(end) == 2 and all(_is_int(e) for e in end) \
            and end[1] > 1 and math.gcd(*end) == 1:
        end = (end[0], end[1])
    elif end is not None and not _is_int(end):
        raise _fail(f"{where}: end_offset must be an int or a reduced fraction [num, den] with "
                    f"den > 1, got {end!r}")
    return TensorSpec(name, dtype, shape, span, constant, axis, ratio, end)


def _state(raw, where: str) -> StateSpec:
    raw = _object(raw, where)
    name = _name(raw, "input", where)
    where = f"state {name!r}"
    output = _name(raw, "output", where)
    dtype, shape = _dtype(raw, where), _shape(raw, where)
    axis = raw.get("batch_axis")
    if not _is_int(axis) or not 0 <= axis < len(shape) or _is_int(shape[axis]):
        raise _fail(f"{where}: batch_axis {axis!r} is not a dynamic axis of {list(shape)}")
    if any(not _is_int(d) for i, d in enumerate(shape) if i != axis):
        raise _fail(f"{where}: only the batch axis may be dynamic in {list(shape)}")
    init = raw.get("init", "zeros")  # absent in hand-written metadata: zeros is the only kind
    if init not in INITS:
        raise _fail(f"{where} has unknown init {init!r} (this version knows {', '.join(map(repr, INITS))})")
    return StateSpec(name, output, dtype, shape, axis, init)


def _unique(names: list[str], kind: str) -> None:
    seen = [n for i, n in enumerate(names) if n in names[:i]]
    if seen:
        raise _fail(f"graph {kind} {seen[0]!r} is listed twice")


def from_json(text: str) -> ExportSpec:
    """The ExportSpec in ``text`` (a graph's ``rnnedge`` metadata), fully validated.

    Raises ContractError (one line) for text that is not JSON, an unknown ``format``, a
    missing or malformed entry, an unknown mode, dtype or init, or a bad batch/time axis.
    """
    try:
        meta = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"the graph's rnnedge metadata is not valid JSON ({exc}); re-export the model") from None
    if not isinstance(meta, dict):
        raise ContractError("the graph's rnnedge metadata must be a JSON object; re-export the model")
    fmt = meta.get("format")
    if fmt not in FORMATS or isinstance(fmt, bool):
        raise ContractError(
            f"the graph's rnnedge metadata has format {fmt!r}; this version reads formats "
            f"{' and '.join(map(str, FORMATS))} only: upgrade rnnedge or re-export the model "
            "with this version")
    missing = [key for key in _REQUIRED if key not in meta]
    if missing:
        raise _fail(f"it lacks {', '.join(map(repr, missing))}")
    mode = meta["mode"]
    if mode not in MODES:
        raise ContractError(f"rnnedge metadata: mode must be one of {MODES}, got {mode!r}; re-export the model")
    time_axis = meta.get("time_axis")
    if time_axis is not None and (not _is_int(time_axis) or time_axis < 0):
        raise ContractError(f"rnnedge metadata: time_axis must be null or an int >= 0, got {time_axis!r}")
    opset = meta["opset"]
    if not _is_int(opset) or opset < 1:
        raise _fail(f"opset must be an int >= 1, got {opset!r}")
    for key in ("inputs", "outputs", "states"):
        if not isinstance(meta[key], list):
            raise _fail(f"{key!r} must be a list, got {meta[key]!r}")
    inputs = tuple(_tensor(t, "input", time_axis) for t in meta["inputs"])
    outputs = tuple(_tensor(t, "output", time_axis) for t in meta["outputs"])
    states = tuple(_state(s, "state") for s in meta["states"])
    _unique([t.name for t in inputs] + [s.input for s in states], "input")
    _unique([t.name for t in outputs] + [s.output for s in states], "output")
    parity = meta.get("parity") or {}
    if not isinstance(parity, dict):
        raise _fail(f"'parity' must be an object, got {parity!r}")
    source = meta.get("source", {})
    state = meta.get("state", "carried")
    if state not in STATE_KINDS or (state == "internal" and (states or mode != "sequence")):
        raise _fail(f"'state' must be one of {STATE_KINDS} (internal: a sequence graph without "
                    f"states), got {state!r}")
    steps = {}
    for key, low in (("chunk_multiple", 1), ("latency", 0), ("chunk_offset", 0)):
        value = meta.get(key, low)
        if not _is_int(value) or value < low:
            raise _fail(f"{key!r} must be an int >= {low}, got {value!r}")
        steps[key] = value
    if steps["chunk_offset"] >= steps["chunk_multiple"]:
        # The first call's steps modulo chunk_multiple: a residue, so below it (and with
        # chunk_multiple 1, always 0).
        raise _fail(f"'chunk_offset' must be below 'chunk_multiple' "
                    f"{steps['chunk_multiple']}, got {steps['chunk_offset']}")
    end = meta.get("model_end")
    if end is not None and not (isinstance(end, list) and len(end) == 2 and all(map(_is_int, end))
                                and 0 <= end[0] < steps["chunk_multiple"] and end[1] >= 1):
        raise _fail(f"'model_end' must be [residue, least] with 0 <= residue < 'chunk_multiple' "
                    f"{steps['chunk_multiple']} and least >= 1, got {end!r}")
    return ExportSpec(mode, inputs, outputs, states, time_axis, opset, source, dict(parity), state,
                      **steps, model_end=None if end is None else tuple(end))
