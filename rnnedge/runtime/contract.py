"""What a graph's inputs and outputs are, for the runtime: its rnnedge contract checked
against the graph, or (graphs from elsewhere) inferred from it (``runtime.foreign``).

A graph written by rnnedge carries its contract as JSON under the ``rnnedge`` metadata key
(docs/contract.md); ``rnnedge.contract.from_json`` parses and validates it, and this module
checks it against the graph onnxruntime loaded: the same names, dtypes, ranks and fixed
sizes, so a file edited after export is refused at load, not by onnxruntime mid-stream.

Shapes here are tuples of ``int`` (fixed size), ``str`` (named dynamic axis) or ``None``
(unnamed dynamic axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnedge.contract import (
    FORMAT,
    METADATA_KEY,
    MODES,
    ExportSpec,
    StateSpec,
    TensorSpec,
    from_json,
)
from rnnedge.errors import ContractError, UsageError

__all__ = ["FORMAT", "METADATA_KEY", "MODES", "Contract", "GraphIO", "StateInfo", "TensorInfo",
           "check_spec", "graph_io", "read_contract"]

#: A recurrent state as the runtime sees it: the contract's own StateSpec (dtype a numpy
#: name; ``shape_for(batch)`` / ``zeros(batch)``), inferred for graphs from elsewhere.
StateInfo = StateSpec

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


@dataclass(frozen=True)
class TensorInfo:
    """One data input or output, as the runtime binds it.

    dtype: a numpy dtype (steps compare arrays' dtypes against it).
    shape: per axis an int (fixed), a str (named dynamic) or None (unnamed dynamic).
    batch_axis / time_axis: the axis that is batch / time in this tensor, or None.
    constant: the contract marks this input constant per stream (``"constant": true``):
    a stream or pool takes it once per stream (``constants=``), not with every call.
    """

    name: str
    dtype: np.dtype
    shape: tuple
    batch_axis: int | None = None
    time_axis: int | None = None
    constant: bool = False

    @classmethod
    def of(cls, t: TensorSpec, spec: ExportSpec) -> TensorInfo:
        """The runtime's view of contract tensor ``t`` of ``spec``."""
        return cls(t.name, np.dtype(t.dtype), tuple(t.shape), t.batch_axis, spec.time_axis_of(t),
                   t.constant)

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
class Contract:
    """Everything the runtime needs to know about a graph.

    inputs: every graph input that is not a state (data, plus any foreign graph's inputs
    that a stream will bind as constants), in graph order. metadata: the rnnedge contract
    as a dict (``spec.metadata()``), or None for a foreign graph. spec: the parsed
    ``rnnedge.contract.ExportSpec``, or None for a foreign graph.
    """

    inputs: tuple
    outputs: tuple
    states: tuple
    time_axis: int | None
    mode: str
    metadata: dict | None
    spec: ExportSpec | None = None


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
    if meta is None:
        from rnnedge.runtime.foreign import infer_contract  # it builds this module's types

        return infer_contract(inputs, outputs, state_map, batch_axes, time_axis)
    if state_map is not None or batch_axes is not None or time_axis is not None:
        raise UsageError(
            "this graph carries rnnedge metadata, which already says its states and axes; "
            "state_map, batch_axes and time_axis are only for graphs without it"
        )
    spec = from_json(meta)
    check_spec(spec, inputs, outputs)
    return Contract(tuple(TensorInfo.of(t, spec) for t in spec.inputs),
                    tuple(TensorInfo.of(t, spec) for t in spec.outputs),
                    spec.states, spec.time_axis, spec.mode, spec.metadata(), spec)


def check_spec(spec: ExportSpec, inputs: list[GraphIO], outputs: list[GraphIO]) -> None:
    """Refuse (ContractError) a contract that differs from the graph's real inputs/outputs."""
    _check_against_graph([(t.name, t.dtype, t.shape) for t in spec.inputs]
                         + [(s.input, s.dtype, s.shape) for s in spec.states], inputs, "input")
    _check_against_graph([(t.name, t.dtype, t.shape) for t in spec.outputs]
                         + [(s.output, s.dtype, s.shape) for s in spec.states], outputs, "output")


def _check_against_graph(declared: list[tuple], graph: list[GraphIO], kind: str) -> None:
    """Refuse metadata whose (name, dtype, shape) entries differ from the graph's ``kind``s.

    A size the graph fixes is a mismatch unless the metadata gives that same size; a
    dynamic axis in the graph where the metadata gives a size is not (the graph is wider).
    """
    names = [name for name, _, _ in declared]
    have = {g.name: g for g in graph}
    if sorted(names) != sorted(have):
        raise ContractError(
            f"rnnedge metadata lists graph {kind}s {names} but the graph has {list(have)}; "
            "the file was changed after export: re-export it"
        )
    for name, dtype, shape in declared:
        real = have[name]
        if real.dtype is not None and real.dtype != np.dtype(dtype):
            raise ContractError(
                f"rnnedge metadata says {kind} {name!r} is {dtype}, the graph says "
                f"{real.dtype.name}; re-export the model")
        if not real.shape:  # onnxruntime knows no shape for it: nothing to compare
            continue
        if len(real.shape) != len(shape):
            raise ContractError(
                f"rnnedge metadata gives {kind} {name!r} rank {len(shape)}, the graph "
                f"rank {len(real.shape)}; re-export the model")
        for axis, (want, got) in enumerate(zip(shape, real.shape)):
            if isinstance(got, int) and want != got:
                raise ContractError(
                    f"rnnedge metadata gives {kind} {name!r} shape {list(shape)}, the graph "
                    f"{real.describe().split(' ', 1)[1]} (axis {axis}); re-export the model")
