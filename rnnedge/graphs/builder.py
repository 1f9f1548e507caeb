"""Building ONNX nodes through onnx_ir: one node writer for the layer translation and the passes.

``Writer`` records nodes and initializers on an ``onnx_ir.tape.Tape`` under names from one
``Names``; ``GraphBuilder`` is a writer plus graph inputs and outputs, for the translation
functions in ``emit.py``. Values are onnx_ir values; a graph input may also be named by its
string (the exporters name the state inputs they declare).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from rnnedge.graphs import external
from rnnedge.graphs.names import Names

_DTYPES = {
    "float32": ir.DataType.FLOAT,
    "float16": ir.DataType.FLOAT16,
    "float64": ir.DataType.DOUBLE,
    "int64": ir.DataType.INT64,
    "int32": ir.DataType.INT32,
    "bool": ir.DataType.BOOL,
}


def ir_dtype(dtype: str) -> ir.DataType:
    """The onnx_ir data type of a contract dtype name ("float32", "int64", ...)."""
    return _DTYPES[dtype]


def tensor_value(name: str, dtype: str, shape) -> ir.Value:
    """A typed value (e.g. a graph input); ``shape`` mixes ints and axis names."""
    return ir.val(name, ir_dtype(dtype), ir.Shape(list(shape)))


class Writer:
    """Nodes and initializers for one graph or subgraph, recorded on an onnx_ir Tape.

    Every name is ``prefix + hint`` made unique through ``names``; a subgraph's writer
    shares its model's ``names`` (ONNX forbids a subgraph to reuse an outer name).
    """

    def __init__(self, names: Names | None = None, prefix: str = ""):
        self.tape = ir.tape.Tape()
        self.names = names if names is not None else Names()
        self.prefix = prefix
        self.inputs: dict[str, ir.Value] = {}  # values that may be given by name

    def value(self, v) -> ir.Value | None:
        """An input as onnx_ir takes it: "" or None is an omitted optional input."""
        if v is None or (isinstance(v, str) and v == ""):
            return None
        return self.inputs[v] if isinstance(v, str) else v

    def op(self, op_type: str, inputs, *, n_out: int = 1, hint: str | None = None, **attrs):
        """Add one node; returns its output value, or a list of values when ``n_out > 1``.

        An empty string in ``inputs`` is an omitted optional input, as in ONNX.
        """
        hint = self.prefix + (hint or op_type.lower())
        out_names = [self.names(f"{hint}_y{k}" if n_out > 1 else hint) for k in range(n_out)]
        outs = self.tape.op_multi_out(
            op_type, [self.value(v) for v in inputs], attributes=attrs or None,
            num_outputs=n_out, name=self.names(f"{hint}_node"))
        for value, name in zip(outs, out_names):
            value.name = name
        return list(outs) if n_out > 1 else outs[0]

    def const(self, array, hint: str) -> ir.Value:
        """An initializer holding ``array`` (its shape kept, 0-d included)."""
        name = self.names(self.prefix + hint)
        # No copy of an array that is C-ordered already: the weights of a big layer are
        # GiBs, and every caller hands over a fresh array (recurrent.layer_weights, lists).
        return self.tape.initializer(ir.tensor(np.asarray(array, order="C"), name=name), name=name)

    def ints(self, values, hint: str = "ints") -> ir.Value:
        return self.const(np.asarray(values, dtype=np.int64), hint)


class GraphBuilder(Writer):
    """A writer for one whole graph: typed inputs and outputs, then ``model()``."""

    def __init__(self, opset: int):
        super().__init__()
        self.opset = opset
        self.outputs: list[ir.Value] = []

    def input(self, name: str, dtype: str, shape) -> ir.Value:
        self.inputs[name] = tensor_value(self.names.take(name), dtype, shape)
        return self.inputs[name]

    def output(self, value, name: str, dtype: str, shape) -> ir.Value:
        """Expose ``value`` as graph output ``name`` (through Identity when renamed)."""
        value = self.value(value)
        if value.name != name:
            self.names.take(name)
            value = self.tape.op("Identity", [value], name=self.names(f"{name}_out"))
            value.name = name
        value.dtype, value.shape = ir_dtype(dtype), ir.Shape(list(shape))
        self.outputs.append(value)
        return value

    def model(self, graph_name: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = ir.Graph(list(self.inputs.values()), self.outputs, nodes=self.tape.nodes,
                         initializers=self.tape.initializers, opset_imports={"": self.opset},
                         name=graph_name)
        # The newest IR a given opset needs, not onnx's newest: runtimes lag behind onnx.
        ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", self.opset)])
        model = ir.Model(graph, ir_version=ir_version, producer_name="rnnedge")
        model.metadata_props.update(metadata or {})
        # Inside external.staging, weights over the threshold go to a data file first.
        return external.to_proto(model)
