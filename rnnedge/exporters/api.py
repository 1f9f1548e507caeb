"""``rnnedge.export``: plan, build, check, prove, then write — in that order."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rnnedge.contract import METADATA_KEY
from rnnedge.errors import ExportError, ParityError, UnsupportedModelError, UsageError
from rnnedge.exporters.layers import STACKS, is_layer, plan_layer
from rnnedge.exporters.layers import input_axes as layer_axes
from rnnedge.files import check_destination, write_bytes_atomic
from rnnedge.gate import parity
from rnnedge.gate.tolerance import tolerance
from rnnedge.graphs.opset import check_opset
from rnnedge.precision import core as precision_mod

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
    precision: str = "fp32"  # "fp32" | "fp16" | "int8"
    device: str = "cpu"  # where the gate ran the graph ("cpu", "cuda:0")
    fp32_bytes: int = 0  # size of the float32 graph, to compare a reduced precision with
    triton: Path | None = None  # the Triton model folder written, if any
    triton_cases: list = field(default_factory=list)  # gate results of the Triton variant

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
    precision: str = "fp32",
    triton_repo: str | os.PathLike | None = None,
    triton_name: str | None = None,
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
    progress: called with a short text at each stage and parity case (for a display).
    precision: "fp32"; "int8" (dynamic int8 weights, for CPUs) or "fp16" (float16 weights
        and activations with float32 inputs/outputs, for GPUs), gated with the looser
        tolerances of spec.TOLERANCES["int8"] / ["float16"] (see docs/deploy.md).
    triton_repo: also write a Triton model repository there: ``<triton_repo>/<name>/
        {config.pbtxt, 1/model.onnx}`` with a batch-first variant of the graph (stream mode
        only), gated too. triton_name: the model's name (default: ``path``'s stem).
    Raises UsageError for bad arguments, UnsupportedModelError, ExportError, and
    ParityError when the graph differs from eager PyTorch; nothing is written then.
    """
    opset = check_opset(opset)
    precision = precision_mod.check_precision(precision)
    triton_target = _triton_target(path, mode, triton_repo, triton_name)
    check_destination(path)  # before any work: a bad path should not cost a whole export
    if lengths is None:
        lengths = mode == "sequence" and isinstance(model, STACKS)
    # Inference semantics (dropout off), then each module's own flag back: a model may be
    # training with some parts frozen in eval on purpose.
    flags = [(m, m.training) for m in model.modules()] if hasattr(model, "modules") else []
    if hasattr(model, "eval"):
        model.eval()
    try:
        return _export(model, path, example_input, mode, opset, atol, rtol, lengths,
                       input_axes, progress, precision, triton_target)
    finally:
        for module, training in flags:
            module.training = training


def _triton_target(path, mode, triton_repo, triton_name):
    """(repo, name) for a Triton export, checked before any work; None without one."""
    if triton_repo is None:
        if triton_name is not None:
            raise UsageError("triton_name needs triton_repo (--triton-name needs --triton-repo)")
        return None
    from rnnedge.triton import repository as triton

    if mode != "stream":
        raise UsageError(
            "a Triton repository needs mode='stream': Triton's sequence batcher carries each "
            "stream's state from call to call; a sequence-mode graph takes whole sequences"
        )
    name = triton.check_name(Path(path).stem if triton_name is None else triton_name)
    folder = triton.check_target(triton_repo, name).resolve()
    graph = Path(path).resolve()
    if graph == folder.parent or folder in graph.parents or graph == folder:
        raise UsageError(
            f"the graph file {path} would land in or on the Triton repository {triton_repo}; "
            "write it outside the repository (the repository gets its own batch-first copy)"
        )
    return Path(triton_repo), name


def _gate(plan, data, precision, atol, rtol, providers, device, progress):
    """(results, metadata summary) of the parity gate for a ``precision`` graph; raises
    ParityError on a failed case."""
    if precision == "fp32":
        results = parity.run_gate(plan, data, atol, rtol, providers=providers, progress=progress)
        parity.raise_on_failure(results, atol, rtol)
        return results, parity.summarize(results)
    # Reduced precision: drift-bounded sequences plus exact teacher-forced steps (see
    # precision.py); the summary says what the graph was proven as, and where.
    results = precision_mod.run_gate(plan, data, precision, atol, rtol, providers=providers,
                                     progress=progress)
    precision_mod.raise_on_failure(results, precision, atol, rtol)
    return results, precision_mod.summarize(results, precision, device, atol, rtol)


def _export(model, path, example_input, mode, opset, atol, rtol, lengths, input_axes, progress,
            precision="fp32", triton_target=None):
    note = progress or (lambda text: None)
    note("planning the graph (tracing the model where needed)")
    plan = make_plan(model, example_input, mode, opset, lengths, input_axes)
    dtype = plan.spec.outputs[0].dtype if plan.spec.outputs else "float32"
    atol, rtol = tolerance(precision_mod.tolerance_key(precision, dtype), atol, rtol)

    fp32_bytes = len(plan.graph.SerializeToString())
    if precision != "fp32":
        note(f"converting to {precision}")
    graph = precision_mod.convert(plan.graph, precision)
    note("checking the graph")
    data = check_graph(graph)
    providers, device = precision_mod.gate_providers(precision, data)
    def gate_note(case: str) -> None:
        note(f"parity gate: {case}")

    results, summary = _gate(plan, data, precision, atol, rtol, providers, device, gate_note)

    triton_out = None
    if triton_target is not None:
        triton_out = _triton_variant(plan, graph, triton_target, precision, atol, rtol,
                                     providers, device, gate_note)

    metadata = plan.spec.metadata(summary)
    set_metadata(graph, plan.spec.metadata_json(summary))
    data = graph.SerializeToString()
    if len(data) >= 2**31:
        raise UnsupportedModelError(
            "the graph is over 2 GB, which a single ONNX file cannot hold; rnnedge writes "
            "self-contained files only"
        )
    triton_dir = None
    with contextlib.ExitStack() as stack:
        if triton_out is not None:
            from rnnedge.triton import repository as triton

            # Rolled back if the graph file below cannot be put in place: both or neither.
            triton_dir = stack.enter_context(
                triton.staged_repository(*triton_target, *triton_out[:2]))
        write_bytes_atomic(path, data)
    out = Path(path)
    return ExportReport(out, metadata, results, atol, rtol, graph_summary(graph, len(data)),
                        precision=precision, device=device, fp32_bytes=fp32_bytes,
                        triton=triton_dir, triton_cases=triton_out[2] if triton_out else [])


def _triton_variant(plan, graph, target, precision, atol, rtol, providers, device, progress):
    """(model bytes, config text, gate results) of the batch-first variant for Triton."""
    from rnnedge.triton import repository as triton

    tplan, tgraph = triton.batch_first_plan(plan, graph)
    tdata = check_graph(tgraph)
    label = (lambda case: progress(f"Triton variant: {case}")) if progress else None
    try:
        results, summary = _gate(tplan, tdata, precision, atol, rtol, providers, device, label)
    except ParityError as exc:
        raise ParityError(f"batch-first Triton variant: {exc}", exc.failures) from None
    set_metadata(tgraph, tplan.spec.metadata_json(summary))
    config = triton.config_text(tplan.spec, target[1], precision=precision)
    return tgraph.SerializeToString(), config, results
