"""How torch.onnx.export translates rnnedge's custom ops: ``graphs/emit.py`` (the same
translation as bare layers) through onnxscript, one fused RNN/LSTM/GRU node per layer."""

from __future__ import annotations

import numpy as np
import torch

from rnnedge.exporters.trace import registered
from rnnedge.graphs.emit import emit_cell, emit_stack


class OnnxscriptBuilder:
    """The ``GraphBuilder`` interface emit.py uses, over an onnxscript opset module.

    Used inside a custom translation, where onnxscript records the ops into the graph
    torch.onnx.export builds: values are onnxscript's symbolic tensors, not names.
    """

    def __init__(self, opset: int):
        import onnxscript

        self.opset = max(opset, 18)  # torch.onnx builds at >= 18 and converts down after
        self._op = getattr(onnxscript, f"opset{self.opset}")

    def op(self, op_type: str, inputs, *, n_out: int = 1, hint: str | None = None, **attrs):
        args = [None if isinstance(v, str) and v == "" else v for v in inputs]
        result = getattr(self._op, op_type)(*args, **attrs)
        if n_out == 1:
            return result[0] if isinstance(result, (tuple, list)) else result
        return list(result)[:n_out]

    def const(self, array: np.ndarray, hint: str):
        import onnx_ir

        return self._op.Constant(value=onnx_ir.tensor(np.ascontiguousarray(array), name=hint))

    def ints(self, values, hint: str = "ints"):
        return self.const(np.asarray(values, dtype=np.int64), hint)


def translations(opset: int) -> dict:
    """torch.onnx.export's custom_translation_table: the four rnnedge ops, the two with
    per-row lengths (``packed``) and rnnedge's fixes for other ops (``fixes``)."""
    from rnnedge.exporters import fixes, packed  # they build on OnnxscriptBuilder

    def stack_h(x, h0, layer):
        y, hn, _ = emit_stack(OnnxscriptBuilder(opset), registered(layer), x, h0, None)
        return y, hn

    def stack_hc(x, h0, c0, layer):
        return emit_stack(OnnxscriptBuilder(opset), registered(layer), x, h0, c0)

    def cell_h(x, h0, layer):
        return emit_cell(OnnxscriptBuilder(opset), registered(layer), x, h0, None)[0]

    def cell_hc(x, h0, c0, layer):
        return emit_cell(OnnxscriptBuilder(opset), registered(layer), x, h0, c0)

    ops = torch.ops.rnnedge
    return {
        ops.stack_h.default: stack_h,
        ops.stack_hc.default: stack_hc,
        ops.cell_h.default: cell_h,
        ops.cell_hc.default: cell_hc,
        **packed.translations(opset),
        **fixes.translations(opset),
    }
