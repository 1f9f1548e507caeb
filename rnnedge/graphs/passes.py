"""Running onnx_ir passes over ONNX protos: the one way rnnedge edits a finished graph.

Each graph edit is an ``onnx_ir.passes.InPlacePass`` (``UnfusePass``, ``BatchFirstPass``,
onnx_ir's ``TopologicalSortPass``) whose ``requires`` refuses a graph it cannot handle and
whose ``ensures`` checks what it promises. ``run`` applies passes to a copy of a proto.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from rnnedge.errors import RnnedgeError


def run(model: onnx.ModelProto, *passes: ir.passes.PassBase) -> onnx.ModelProto:
    """``model`` (left as it is) with ``passes`` applied in order, then onnx_ir's NameFixPass.

    NameFixPass is the last word on names: whatever a pass left unnamed or duplicated gets
    a unique one (the passes here name everything through ``names.Names``, so on their own
    graphs it changes nothing). A typed rnnedge error from a pass's ``requires`` (the
    graph holds something the pass cannot express) reaches the caller as itself, not
    wrapped in onnx_ir's PreconditionError.
    """
    result = ir.from_proto(model)
    for each in (*passes, common.NameFixPass()):
        try:
            result = each(result).model
        except ir.passes.PreconditionError as exc:
            if isinstance(exc.__cause__, RnnedgeError):
                raise exc.__cause__ from None
            raise
    return ir.to_proto(result)
