"""Where the gate runs a reduced-precision graph, and what onnxruntime's CPU provider
does with float16 nodes it has no kernel for."""

from __future__ import annotations

import os
import tempfile

import onnx


def gate_providers(precision: str, model_bytes: bytes) -> tuple[tuple[str, ...], str]:
    """(providers, device) on which the gate should run a ``precision`` graph.

    float16 runs on CUDA when onnxruntime can use it here, since that is where float16
    kernels run and where fp16 graphs are meant to be deployed; everything else, and fp16
    without a usable GPU, runs on the CPU.
    """
    cpu = ("CPUExecutionProvider",)
    if precision != "fp16":
        return cpu, "cpu"
    import warnings

    from rnnedge.runtime.providers import create_session

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fallback to the CPU is an answer here, not news
        _, device = create_session(model_bytes, "auto", 1)
    if device.startswith("cuda"):
        return ("CUDAExecutionProvider", "CPUExecutionProvider"), device
    return cpu, "cpu"


def cpu_fp32_fallback_nodes(model_bytes: bytes) -> int:
    """How many float16 nodes onnxruntime's CPU provider runs in float32 (through inserted
    Casts) for lack of a float16 kernel. 0 for a graph without float16."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="rnnedge-fp16-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = path
        ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(path)
    wrapped = set()
    for node in optimized.graph.node:
        if node.op_type != "Cast" and any(i.startswith("InsertedPrecisionFreeCast_")
                                          for i in node.input):
            wrapped.add(node.name)
    return len(wrapped)
