"""A small ONNX graph builder: named inputs/outputs, initializers, nodes.

The translation functions in ``emit.py`` write through this; it hands out unique
names so that composing layers never collides.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "float64": TensorProto.DOUBLE,
    "int64": TensorProto.INT64,
    "int32": TensorProto.INT32,
}


def onnx_dtype(dtype: str) -> int:
    return _DTYPES[dtype]


def unique_name(used: set, hint: str) -> str:
    """``hint``, or ``hint_1``, ``hint_2``, ...: the first not in ``used`` (which it joins)."""
    name, i = hint, 0
    while name in used:
        i += 1
        name = f"{hint}_{i}"
    used.add(name)
    return name


class GraphBuilder:
    """Collects nodes and initializers for one graph."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._used: set[str] = set()

    def fresh(self, hint: str) -> str:
        """A name not used yet in this graph, derived from ``hint``."""
        return unique_name(self._used, hint)

    def input(self, name: str, dtype: str, shape) -> str:
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def output(self, value: str, name: str, dtype: str, shape) -> str:
        """Expose ``value`` as graph output ``name`` (through Identity when renamed)."""
        if value != name:
            self._used.add(name)
            self.nodes.append(helper.make_node("Identity", [value], [name], name=f"{name}_out"))
        self.outputs.append(helper.make_tensor_value_info(name, onnx_dtype(dtype), list(shape)))
        return name

    def const(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(self, values, hint: str = "ints") -> str:
        return self.const(np.asarray(values, dtype=np.int64), hint)

    def op(self, op_type: str, inputs, *, n_out: int = 1, hint: str | None = None, **attrs):
        """Add one node; returns its output name, or a list of names when ``n_out > 1``.

        An empty string in ``inputs`` is an omitted optional input, as in ONNX.
        """
        hint = hint or op_type.lower()
        outs = [self.fresh(f"{hint}_y{k}" if n_out > 1 else hint) for k in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{hint}_node"), **attrs)
        )
        return outs if n_out > 1 else outs[0]

    def model(self, graph_name: str, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, self.inputs, self.outputs, initializer=self.initializers
        )
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(
            graph,
            opset_imports=opsets,
            producer_name="rnnedge",
            # The newest IR a given opset needs, not onnx's newest: runtimes lag behind onnx.
            ir_version=helper.find_min_ir_version_for(opsets),
        )
        for key, value in (metadata or {}).items():
            helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, key: value})
        return model
