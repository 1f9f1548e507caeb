"""``rnnedge.export``: one straight pipeline, nothing written until everything is proven.

    ExportOptions      every option checked, and the destinations, before any work
    plan_graph         the float32 graph and its eager reference (``layers`` for a bare
                       layer, else ``models``)
    convert            to the precision asked for (``rnnedge.precision``)
    check              the full ONNX check; the serialized graph
    prove              the parity gate on it (``rnnedge.gate``): a ``Proof``
    prepare_targets    every file to write, built and proven: the Triton repository (its
                       batch-first variant gated too, ``rnnedge.triton``), then the graph
                       file with its metadata
    write              each target put in place, both or neither

``pipeline`` calls the stages in that order, one call each.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rnnedge import gate
from rnnedge import precision as precision_mod
from rnnedge.errors import ExportError, ParityError, UsageError
from rnnedge.exporters.inference import inference_mode
from rnnedge.exporters.layers import STACKS, is_layer, plan_layer
from rnnedge.exporters.layers import input_axes as layer_axes
from rnnedge.exporters.options import MODES, ExportOptions
from rnnedge.files import write_bytes_atomic, write_error
from rnnedge.graphs.external import check_model_size, needs_external_data, write_with_external_data
from rnnedge.graphs.metadata import write_metadata
from rnnedge.loaders.integrity import check_finite_weights

Note = Callable[[str], None]


@dataclass
class ExportReport:
    """What an export wrote and how it was proven."""

    path: Path
    metadata: dict
    cases: list = field(default_factory=list)  # [gate.CaseResult]
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
    """Node counts (Scan/Loop/If bodies included), initializers and file size in bytes."""
    from rnnedge.graphs.walk import op_counts

    ops = op_counts(model)
    return {
        "nodes": sum(ops.values()),
        "ops": ops,
        "initializers": len(model.graph.initializer),
        "bytes": size,
    }


def make_plan(model, example_input, mode: str, opset: int, lengths: bool | None,
              input_axes: list | None = None, min_length: int | None = None):
    """Choose how ``model`` is exported; returns a ``gate.Plan``. min_length: the fewest
    time steps the model takes (the planner's probes are at least that long)."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if is_layer(model):
        if input_axes is not None:
            check_axes(type(model).__name__, [layer_axes(model)], input_axes)
        return plan_layer(model, example_input, mode, opset, lengths)
    from rnnedge.exporters.models import plan_model  # torch.onnx machinery: only when needed

    return plan_model(model, example_input, mode, opset, lengths, input_axes=input_axes,
                      min_length=min_length)


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
    min_length: int | None = None,
    max_length: int | None = None,
    triton_backend: str = "onnxruntime",
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
        tolerances of rnnedge.gate.TOLERANCES["int8"] / ["float16"] (see docs/deploy.md).
    triton_repo: also write a Triton model repository there: ``<triton_repo>/<name>/
        {config.pbtxt, 1/model.onnx}`` with a batch-first variant of the graph (stream mode
        only), gated too. triton_name: the model's name (default: ``path``'s stem).
        triton_backend: "onnxruntime" (that batch-first variant, implicit state) or "python"
        (``{config.pbtxt, 1/model.py, 1/model.onnx}``: the proven graph itself, hosted by
        the rnnedge runtime in Triton's Python backend; rnnedge.triton.python_backend).
    min_length, max_length: the range of time steps the model is probed and proven at
        (default: 1 to 2000 steps whole in sequence mode, 1000 streamed in stream mode; see
        docs/exporter.md, "What the gate proves"); a model that needs at least 1000 samples
        exports with min_length=1000.
    Raises UsageError for bad arguments (before any work), UnsupportedModelError,
    ExportError, and ParityError when the graph differs from eager PyTorch; nothing is
    written then.
    """
    options = ExportOptions(
        mode=mode, opset=opset, atol=atol, rtol=rtol, lengths=lengths, input_axes=input_axes,
        precision=precision, triton_repo=triton_repo, triton_name=triton_name, progress=progress,
        min_length=min_length, max_length=max_length, triton_backend=triton_backend,
    ).with_destination(path)
    check_model_size(model)  # over 2 GiB of weights: refused now, not after minutes of work
    check_finite_weights(model)  # NaN/inf weights named as such, not as a failed gate
    with inference_mode(model):  # dropout off meanwhile; every module's own flag back after
        return pipeline(model, path, example_input, options)


def pipeline(model, path: str | os.PathLike, example_input, options: ExportOptions) -> ExportReport:
    """The export pipeline for checked ``options`` (see ``ExportOptions.with_destination``)."""
    note = options.progress or (lambda text: None)
    plan = plan_graph(model, example_input, options, note)
    graph, fp32_bytes = convert(plan, options, note)
    data = check(graph, note)
    proof = prove(plan, data, options, note)
    targets = prepare_targets(path, plan, graph, proof, options, note)
    written = write(targets)
    return report(plan, graph, fp32_bytes, proof, targets, written, options)


def report(plan, graph, fp32_bytes: int, proof: Proof, targets: list[Target],
           written: dict[str, Written], options: ExportOptions) -> ExportReport:
    triton = next((t for t in targets if t.kind == "triton"), None)
    return ExportReport(
        written["graph"].path, plan.spec.metadata(proof.summary), proof.cases,
        proof.policy.atol, proof.policy.rtol, graph_summary(graph, written["graph"].size),
        precision=options.precision, device=proof.device, fp32_bytes=fp32_bytes,
        triton=written["triton"].path if triton else None,
        triton_cases=triton.cases if triton else [],
    )


# ---------------------------------------------------------------------------
# plan, convert, check, gate
# ---------------------------------------------------------------------------


def plan_graph(model, example_input, options: ExportOptions, note: Note):
    """The ``gate.Plan``: the float32 graph, its contract, its eager reference."""
    note("planning the graph (tracing the model where needed)")
    lengths = options.lengths
    if lengths is None:
        lengths = options.mode == "sequence" and isinstance(model, STACKS)
    return make_plan(model, example_input, options.mode, options.opset, lengths,
                     options.input_axes, options.min_length)


def convert(plan, options: ExportOptions, note: Note) -> tuple[onnx.ModelProto, int]:
    """(the graph in ``options.precision``, the float32 graph's size in bytes)."""
    fp32_bytes = len(plan.graph.SerializeToString())
    if options.precision != "fp32":
        note(f"converting to {options.precision}")
    return precision_mod.convert(plan.graph, options.precision), fp32_bytes


def check(graph: onnx.ModelProto, note: Note) -> bytes:
    """The full ONNX check; the serialized graph the gate runs."""
    note("checking the graph")
    return check_graph(graph)


@dataclass(frozen=True)
class Proof:
    """What the gate proved the graph with: its policy (tolerances), where it ran, and
    the results; the Triton variant is proven under the same policy, on the same device."""

    policy: gate.Policy
    providers: tuple
    device: str  # "cpu", "cuda:0"
    cases: list  # [gate.CaseResult]
    summary: dict  # the metadata's "parity" entry


def prove(plan, data: bytes, options: ExportOptions, note: Note) -> Proof:
    """Run the parity gate on ``data``; ParityError on a failed case."""
    dtype = plan.spec.outputs[0].dtype if plan.spec.outputs else "float32"
    policy = gate.policy_for(options.precision, dtype, options.atol, options.rtol,
                             min_length=options.min_length, max_length=options.max_length)
    providers, device = precision_mod.gate_providers(options.precision, data)
    cases, summary = _gate(plan, data, policy, providers, device,
                           lambda case: note(f"parity gate: {case}"))
    return Proof(policy, providers, device, cases, summary)


def _gate(plan, data, policy, providers, device, progress):
    """(results, metadata summary) of the parity gate under ``policy``; raises ParityError
    on a failed case. Reduced precisions: drift-bounded sequences plus exact teacher-forced
    steps (gate/policy.py); the summary says what the graph was proven as, and where."""
    result = gate.run_gate(plan, data, policy, providers=providers, progress=progress)
    gate.raise_on_failure(result)
    return list(result.cases), gate.summarize(result, device)


# ---------------------------------------------------------------------------
# targets, write
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One thing to write, built and proven. kind: "graph" (the graph file at ``path``)
    or "triton" (the model folder ``name`` in the repository at ``path``)."""

    kind: str
    path: Path
    data: bytes  # the serialized model; b"" when its weights go to external data
    model: onnx.ModelProto | None = None  # graph: with its metadata, for external data
    name: str = ""  # Triton: the model's name (its folder)
    config: str = ""  # Triton: config.pbtxt
    cases: list = field(default_factory=list)  # Triton: its own gate results
    extra: dict = field(default_factory=dict)  # Triton: more files, {relative path: bytes}


@dataclass(frozen=True)
class Written:
    path: Path  # the graph file, or the Triton model folder
    size: int  # bytes written (the graph file and its external data; 0 for Triton)


def prepare_targets(path, plan, graph: onnx.ModelProto, proof: Proof, options: ExportOptions,
                    note: Note) -> list[Target]:
    """Every target, in write order: the Triton repository first (when asked), the graph
    file last, so that a graph file that cannot be written rolls the repository back."""
    targets = []
    if options.triton_repo is not None:
        targets.append(triton_target(plan, graph, proof, options, note))
    targets.append(graph_target(path, plan, graph, proof))
    return targets


def graph_target(path, plan, graph: onnx.ModelProto, proof: Proof) -> Target:
    write_metadata(graph, plan.spec.metadata_json(proof.summary))
    external = needs_external_data(graph)  # weights then go to PATH.data (graphs/external.py)
    return Target("graph", Path(path), b"" if external else graph.SerializeToString(), graph)


def triton_target(plan, graph: onnx.ModelProto, proof: Proof, options: ExportOptions,
                  note: Note) -> Target:
    """The Triton model: the batch-first variant (``rnnedge.triton``), gated under the
    graph's own policy on the same device, and its config.pbtxt."""
    from rnnedge import triton

    if options.triton_backend == "python":  # the proven graph itself: no variant to prove
        from rnnedge.triton.python_backend import prepare_python

        served = onnx.ModelProto()
        served.CopyFrom(graph)
        write_metadata(served, plan.spec.metadata_json(proof.summary))
        data, config, extra = prepare_python(served.SerializeToString(), options.triton_name)
        return Target("triton", options.triton_repo, data, name=options.triton_name,
                      config=config, cases=proof.cases, extra=extra)

    def prove_variant(variant_plan, variant: onnx.ModelProto) -> tuple[bytes, list]:
        data = check_graph(variant)
        try:
            cases, summary = _gate(variant_plan, data, proof.policy, proof.providers,
                                   proof.device,
                                   lambda case: note(f"parity gate: Triton variant: {case}"))
        except ParityError as exc:
            raise ParityError(f"batch-first Triton variant: {exc}", exc.failures) from None
        write_metadata(variant, variant_plan.spec.metadata_json(summary))
        return variant.SerializeToString(), cases

    data, config, cases = triton.prepare_variant(plan, graph, options.triton_name,
                                                 precision=options.precision,
                                                 prove=prove_variant)
    return Target("triton", options.triton_repo, data, name=options.triton_name,
                  config=config, cases=cases)


def write(targets: list[Target]) -> dict[str, Written]:
    """Put every target in place, in order, both or neither: each is staged in one
    ExitStack, so a failure of a later one rolls back the earlier ones."""
    written = {}
    with contextlib.ExitStack() as stack:
        for target in targets:
            written[target.kind] = stack.enter_context(PUT[target.kind](target))
    return written


@contextlib.contextmanager
def _put_triton(target: Target) -> Iterator[Written]:
    from rnnedge.triton import repository as triton

    staged = contextlib.ExitStack()
    try:
        folder = staged.enter_context(
            triton.staged_repository(target.path, target.name, target.data, target.config,
                                     extra=target.extra))
    except OSError as exc:  # a full disk: one line, exit 2, nothing left behind
        raise write_error(target.path, exc) from None
    with staged:  # rolled back if a later target cannot be put in place
        yield Written(folder, 0)


@contextlib.contextmanager
def _put_graph(target: Target) -> Iterator[Written]:
    # An atomic rename (of both files with external data): nothing is left to roll back,
    # which is why the graph file is the last target.
    if target.data:
        write_bytes_atomic(target.path, target.data)
        size = len(target.data)
    else:
        size = write_with_external_data(target.path, target.model)
    yield Written(target.path, size)


#: How each kind of target is put in place: a context manager yielding ``Written``.
PUT = {"triton": _put_triton, "graph": _put_graph}
