"""Walking a whole ONNX model, subgraphs (Scan/Loop/If bodies) included, through onnx_ir."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from rnnedge.errors import ExportError, first_line
from rnnedge.graphs.passes import run


def nodes(model: onnx.ModelProto | ir.Model) -> Iterator[ir.Node]:
    """Every node of ``model``'s main graph and of its subgraphs, depth first."""
    if isinstance(model, onnx.ModelProto):
        model = ir.from_proto(model)
    return ir.traversal.RecursiveGraphIterator(model.graph)


def op_counts(model: onnx.ModelProto | ir.Model) -> dict[str, int]:
    """Node counts by op type, subgraphs included."""
    return dict(Counter(node.op_type for node in nodes(model)))


def toposort(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the nodes of every graph in topological order (a stable sort).

    onnxruntime's float16 converter (keep_io_types=True) appends the Casts of graph inputs
    after the nodes that read them, which onnx's checker (rightly) rejects. A subgraph's
    reads from the outer scope count as reads of the node that holds it.
    """
    try:
        return run(model, common.TopologicalSortPass())
    except ValueError as exc:  # onnx_ir's sort: a cycle
        raise ExportError(
            f"the graph cannot be put in order ({first_line(exc)}); this is an rnnedge bug: "
            "please report it with the model"
        ) from exc
