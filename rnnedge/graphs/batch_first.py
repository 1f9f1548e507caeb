"""Graph inputs and outputs moved to batch-first by Transposes around an unchanged graph.

Used for Triton, which batches along axis 0 of every tensor, while rnnedge's graphs keep
PyTorch's layouts (time-major data, states (layers*dirs, batch, hidden)). The moved input
``x`` becomes a new graph input ``x`` (batch first) that feeds a Transpose back to the old
layout, which everything inside reads as before; a moved output ``y`` is the Transpose of
what the graph computed. Names, dtypes, order of inputs and outputs, and every node inside
stay as they are.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from rnnedge.errors import ExportError
from rnnedge.graphs.builder import Writer
from rnnedge.graphs.names import Names
from rnnedge.graphs.passes import run


def inverse(perm) -> list[int]:
    """The permutation that undoes ``perm``."""
    return [int(i) for i in np.argsort(perm)]


def _permuted(shape: ir.Shape | None, perm) -> ir.Shape | None:
    return None if shape is None else ir.Shape([shape[p] for p in perm])


def _io(model: ir.Model) -> tuple[list, list]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


class BatchFirstPass(ir.passes.InPlacePass):
    """Graph inputs/outputs named in ``moves`` ({name: permutation to batch-first}) moved.

    requires: each name is a graph input or output (not both), its rank that of the
    permutation where the graph declares one. ensures: the graph's input and output names
    and their order are what they were.
    """

    def __init__(self, moves: dict[str, list[int]]):
        super().__init__()
        self.moves = {name: [int(p) for p in perm] for name, perm in moves.items()}
        self._io_before: tuple[list, list] | None = None

    def requires(self, model: ir.Model) -> None:
        inputs, outputs = _io(model)
        declared = {v.name: v for v in (*model.graph.inputs, *model.graph.outputs)}
        for name, perm in self.moves.items():
            if (name in inputs) == (name in outputs):
                where = "both a graph input and an output" if name in inputs else "not in the graph"
                raise ExportError(f"batch-first: tensor {name!r} is {where}; this is an "
                                  "rnnedge bug: please report it with the model")
            shape = declared[name].shape
            if sorted(perm) != list(range(len(perm))) or (shape is not None and len(shape) != len(perm)):
                raise ExportError(f"batch-first: permutation {perm} does not fit tensor {name!r} "
                                  f"of shape {shape}; this is an rnnedge bug: please report it")
        self._io_before = (inputs, outputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = Names.of(graph)
        before, after = Writer(names), Writer(names)
        for k, old in enumerate(graph.inputs):
            perm = self.moves.get(old.name)
            if perm is None:
                continue
            new = ir.val(old.name, old.dtype, _permuted(old.shape, perm))
            native = before.op("Transpose", [new], hint=f"{old.name}_native", perm=inverse(perm))
            native.type, native.shape = old.type, old.shape
            old.replace_all_uses_with(native)
            graph.inputs[k] = new
        for k, old in enumerate(graph.outputs):
            perm = self.moves.get(old.name)
            if perm is None:
                continue
            name = old.name
            old.name = names(f"{name}_native")
            moved = after.op("Transpose", [old], hint=f"{name}_to_batch_first", perm=perm)
            moved.name, moved.type, moved.shape = name, old.type, _permuted(old.shape, perm)
            graph.outputs[k] = moved
        # Input Transposes first and output ones last: the graph stays topologically sorted.
        first = next(iter(graph), None)
        if first is None:
            graph.extend(before.tape.nodes)
        else:
            graph.insert_before(first, before.tape.nodes)
        graph.extend(after.tape.nodes)
        return ir.passes.PassResult(model, modified=bool(before.tape.nodes or after.tape.nodes))

    def ensures(self, model: ir.Model) -> None:
        if _io(model) != self._io_before:
            raise ir.passes.PostconditionError(
                f"graph inputs/outputs changed: {self._io_before} -> {_io(model)}")


def batch_first(model: onnx.ModelProto, moves: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` with the graph inputs/outputs in ``moves`` made batch-first."""
    return run(model, BatchFirstPass(moves))
