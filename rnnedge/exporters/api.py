"""``rnnedge.export``: plan, build, check, prove, then write — in that order."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rnnedge.atomic import write_bytes_atomic
from rnnedge.errors import ExportError, UnsupportedModelError, UsageError
from rnnedge.exporters import parity
from rnnedge.exporters.layers import STACKS, is_layer, plan_layer
from rnnedge.exporters.layers import input_axes as layer_axes
from rnnedge.exporters.spec import METADATA_KEY, check_opset, tolerance

MODES = ("stream", "sequence")


@dataclass
class ExportReport:
    """What an export wrote and how it was proven."""

    path: Path
    metadata: dict
    cases: list = field(default_factory=list)  # [parity.CaseResult]
    atol: float = 0.0
    rtol: float = 0.0
    graph: dict = field(default_factory=dict)  # summary: ops, nodes, initializers, bytes

    @property
    def max_abs(self) -> float:
        return self.metadata["parity"]["max_abs"]

    @property
    def max_rel(self) -> float:
        return self.metadata["parity"]["max_rel"]


def graph_summary(model: onnx.ModelProto, size: int) -> dict:
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "nodes": len(model.graph.node),
        "ops": ops,
        "initializers": len(model.graph.initializer),
        "bytes": size,
    }


def make_plan(model, example_input, mode: str, opset: int, lengths: bool | None,
              input_axes: list | None = None):
    """Choose how ``model`` is exported; returns a ``parity.Plan``."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if is_layer(model):
        if input_axes is not None:
            check_axes(type(model).__name__, [layer_axes(model)], input_axes)
        return plan_layer(model, example_input, mode, opset, lengths)
    from rnnedge.exporters.models import plan_model  # torch.onnx machinery: only when needed

    return plan_model(model, example_input, mode, opset, lengths, input_axes=input_axes)


def check_axes(what: str, expected: list, given: list) -> None:
    """Refuse declared input axes (e.g. from --input-shape) that do not fit the model."""
    for want, axes in zip(expected, given):
        if tuple(axes) != tuple(want):
            text = ",".join(map(str, want))
            raise UsageError(
                f"input shape {','.join(map(str, axes))} does not fit {what}: expected {text}; "
                f"pass --input-shape {text}"
            )


def check_graph(model: onnx.ModelProto) -> bytes:
    """Full ONNX check (with strict shape inference); returns the serialized model."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ExportError(
            f"the generated graph is not valid ONNX ({first}); this is an rnnedge bug: "
            "please report it with the model"
        ) from exc
    return model.SerializeToString()


def set_metadata(model: onnx.ModelProto, value: str) -> None:
    props = {p.key: p.value for p in model.metadata_props}
    props[METADATA_KEY] = value
    onnx.helper.set_model_props(model, props)


def export(
    model,
    path: str | os.PathLike,
    *,
    example_input,
    mode: str = "stream",
    opset: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    lengths: bool | None = None,
    input_axes: list | None = None,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Export ``model`` to a stateful step-wise ONNX graph at ``path``, proven by the gate.

    model: nn.RNN/LSTM/GRU, nn.RNNCell/LSTMCell/GRUCell, or a model built around them.
    example_input: a tensor shaped like one call's input, e.g. (batch, time, features)
        for a batch_first layer; its sizes are not baked in (batch and time stay dynamic).
    mode: "stream" (state carried between calls) or "sequence" (whole sequence per call;
        required for bidirectional layers).
    lengths: add an int64 ``lengths`` input (batch,) of valid lengths per row, as a
        PackedSequence gives; defaults to True in sequence mode for layers.
    input_axes: optional, per data input, its axes as names (dynamic: "batch", "time")
        and integers (fixed sizes), e.g. [("batch", "time", 16)]; checked against the model.
    Raises UsageError for bad arguments, UnsupportedModelError, ExportError, and
    ParityError when the graph differs from eager PyTorch; nothing is written then.
    """
    opset = check_opset(opset)
    if lengths is None:
        lengths = mode == "sequence" and isinstance(model, STACKS)
    was_training = bool(getattr(model, "training", False))
    if was_training:
        model.eval()  # inference semantics: dropout off
    try:
        return _export(model, path, example_input, mode, opset, atol, rtol, lengths,
                       input_axes, progress)
    finally:
        if was_training:
            model.train()


def _export(model, path, example_input, mode, opset, atol, rtol, lengths, input_axes, progress):
    plan = make_plan(model, example_input, mode, opset, lengths, input_axes)
    dtype = plan.spec.outputs[0].dtype if plan.spec.outputs else "float32"
    atol, rtol = tolerance(dtype, atol, rtol)

    graph = plan.graph
    data = check_graph(graph)
    results = parity.run_gate(plan, data, atol, rtol, progress=progress)
    parity.raise_on_failure(results, atol, rtol)

    metadata = plan.spec.metadata(parity.summarize(results))
    set_metadata(graph, plan.spec.metadata_json(parity.summarize(results)))
    data = graph.SerializeToString()
    if len(data) >= 2**31:
        raise UnsupportedModelError(
            "the graph is over 2 GB, which a single ONNX file cannot hold; rnnedge writes "
            "self-contained files only"
        )
    out = write_bytes_atomic(path, data)
    return ExportReport(out, metadata, results, atol, rtol, graph_summary(graph, len(data)))
