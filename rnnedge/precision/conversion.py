"""Reduced-precision variants of an exported graph: int8 weights (CPU) and float16 (GPU).

Both take the float32 graph the exporter built and return a graph with the same inputs,
outputs, state pairs and metadata, which then goes through the gate with the precision's
policy (``rnnedge.gate.policy``: teacher-forced steps within TOLERANCES["int8"] /
["float16"], whole sequences and streamed cases within a drift bound; docs/deploy.md).

int8 — onnxruntime's dynamic quantization (``quantize_dynamic``): weights stored as int8
with a float scale, activations quantized per call. Fused LSTM nodes become
com.microsoft ``DynamicQuantizeLSTM``; GRU and RNN have no int8 kernel there, so they are
first rewritten as MatMul + Scan (``unfused.unfuse``) and their MatMuls — the input
projection outside the loop and ``h @ R^T`` inside the Scan body — are quantized. The
quantizer must be told to enter subgraphs (``EnableSubgraph``) for the latter.

float16 — ``onnxruntime.transformers.float16.convert_float_to_float16`` with
``keep_io_types=True``: weights and activations in float16, graph inputs and outputs
(data and state) stay float32 so callers and the contract do not change. onnxruntime's
CPU provider has no float16 RNN/LSTM/GRU kernels: on CPU it inserts Casts and runs those
nodes in float32 on the float16-rounded weights. The gate therefore runs on CUDA where
it is usable; on a CPU-only machine it checks the graph as converted on the CPU, which
proves the conversion (weights rounded to float16, float16 tensors between nodes, float32
I/O) but not CUDA's float16 arithmetic — the metadata records which provider ran it.

Graph walking (``op_counts``, ``toposort``) is ``rnnedge.graphs.walk``'s, through onnx_ir.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from rnnedge.errors import ExportError, UnsupportedModelError, UsageError, first_line
from rnnedge.graphs.walk import op_counts, toposort

FP16_MAX = 65504.0
# Ops the dynamic quantizer emits; one of them must appear or nothing was quantized.
_INT8_OPS = {"DynamicQuantizeLSTM", "MatMulInteger", "DynamicQuantizeMatMul",
             "DynamicQuantizeLinear", "ConvInteger"}


def check_precision(precision) -> str:
    """``precision`` validated: one of PRECISIONS (None means "fp32")."""
    if precision is None:
        return "fp32"
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise UsageError(
            f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}; "
            "int8 is for CPUs (--quantize int8), fp16 for GPUs (--precision fp16)"
        )
    return precision.lower()


def convert(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """``model`` (float32) in ``precision``: the same model for "fp32", else a new one."""
    return CONVERTERS[check_precision(precision)](model)


def to_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 weight quantization (per tensor, int8 weights, uint8 activations).

    Per-channel scales were tried: no measurable accuracy gain on these graphs, and
    onnxruntime's CPU kernel rejects them for the batched (D, P, H) projection MatMul of
    ``proj_size`` LSTMs.
    """
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from rnnedge.graphs.unfuse import unfuse

    source = unfuse(model)  # GRU/RNN -> MatMul + Scan; LSTM stays fused (it has a kernel)
    # The quantizer rewrites Gemm as MatMul with a transposed weight but keeps the old
    # value_info of that weight, then fails its own shape inference; it re-infers anyway.
    del source.graph.value_info[:]
    with tempfile.TemporaryDirectory(prefix="rnnedge-int8-") as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(source, src)
        # The quantizer logs a warning per model about pre-processing; the gate is our check.
        quiet = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False,
                             extra_options={"EnableSubgraph": True})
        except Exception as exc:  # noqa: BLE001 - the quantizer raises plain exceptions
            first = first_line(exc)
            raise ExportError(
                f"onnxruntime's int8 quantizer failed on the graph ({first}); export in "
                "float32 (leave out --quantize) and report the model"
            ) from exc
        finally:
            logging.getLogger().setLevel(quiet)
        out = onnx.load(dst)
    if not set(op_counts(out)) & _INT8_OPS:
        raise UnsupportedModelError(
            "int8 quantization found no weights it can quantize in this graph (no LSTM, "
            "GRU, RNN or MatMul with constant weights); export it in float32"
        )
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    return out


def _fp16_range_check(model: onnx.ModelProto) -> None:
    for init in model.graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size and float(np.max(np.abs(arr))) > FP16_MAX:
            raise UnsupportedModelError(
                f"weight {init.name} holds values up to {float(np.max(np.abs(arr))):.3g}, beyond "
                f"float16's range (±{FP16_MAX:g}); export it in float32 or int8"
            )


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float16 weights and activations; float32 graph inputs and outputs (data and state)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    _fp16_range_check(model)
    # onnxruntime 1.31's CPU NchwcTransformer (ORT_ENABLE_ALL) crashes the process on a
    # float16 Transpose feeding a MatMul (e.g. batch_first -> Linear head in whole models):
    # those Transposes stay float32, between Casts, which it handles.
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for k, node in enumerate(named.graph.node):
        node.name = node.name or f"rnnedge_node_{k}"  # the block list goes by node name
    model = named
    consumers = {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    keep = [n.name for n in model.graph.node
            if n.op_type == "Transpose" and set(n.output) & consumers]
    try:
        out = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions
        first = first_line(exc)
        raise ExportError(
            f"onnxruntime's float16 converter failed on the graph ({first}); export in "
            "float32 (leave out --precision) and report the model"
        ) from exc
    return toposort(out)


#: precision -> the function converting a float32 graph to it (fp32: unchanged).
CONVERTERS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "fp32": lambda model: model,
    "fp16": to_fp16,
    "int8": to_int8,
}
PRECISIONS = tuple(CONVERTERS)
