"""``rnnedge.export``: one straight pipeline, nothing written until everything is proven.

    ExportOptions      every option checked, and the destinations, before any work
    plan_graph         the float32 graph and its eager reference (``layers`` for a bare
                       layer, else ``models``)
    convert            to the precision asked for (``rnnedge.precision``)
    check              the full ONNX check; the serialized graph (or a staged file's path)
    prove              the parity gate on it (``rnnedge.gate``): a ``Proof``
    prepare_targets    every file to write, built and proven: the Triton repository (its
                       batch-first variant gated too, ``rnnedge.triton``), then the graph
                       file with its metadata
    write              each target put in place, both or neither

``pipeline`` calls the stages in that order, one call each, inside ``external.staging``:
a bare layer's graph over the threshold is built with its weights in a data file staged
beside the destination, checked and gated by path, and renamed into place with it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from rnnedge import gate
from rnnedge import precision as precision_mod
from rnnedge.errors import ExportError, ParityError, UsageError, first_line
from rnnedge.exporters.inference import inference_mode
from rnnedge.exporters.layers import input_axes as layer_axes
from rnnedge.exporters.layers import is_layer, plan_layer
from rnnedge.exporters.options import MODES, ExportOptions
from rnnedge.exporters.targets import Target, Written, write
from rnnedge.graphs import external
from rnnedge.graphs.metadata import write_metadata
from rnnedge.loaders.integrity import check_finite_weights
from rnnedge.recurrent import STACKS

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
              input_axes: list | None = None, min_length: int | None = None, *,
              input_names=None, constants=(), state_arg: str | None = None,
              max_length: int | None = None, states: str = "carried"):
    """Choose how ``model`` is exported; returns a ``gate.Plan``. min_length: the fewest
    time steps the model takes (the planner's probes are at least that long). input_names,
    constants, state_arg: as for ``export`` (whole models only)."""
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if is_layer(model):
        if input_axes is not None:
            check_axes(type(model).__name__, [layer_axes(model)], input_axes)
        if (input_names is not None and list(input_names) != ["input"]) or constants \
                or state_arg is not None:
            raise UsageError("input_names, constants and state_arg are for whole models; a bare "
                             f"{type(model).__name__} takes one input named 'input'")
        if states != "carried":
            raise UsageError(f"states='internal' is for whole models; a bare {type(model).__name__} "
                             "always carries its state (h0/c0 inputs, zeros to start from zero)")
        return plan_layer(model, example_input, mode, opset, lengths)
    from rnnedge.exporters.models import plan_model  # torch.onnx machinery: only when needed

    return plan_model(model, example_input, mode, opset, lengths, input_axes=input_axes,
                      min_length=min_length, input_names=input_names, constants=constants,
                      state_arg=state_arg, max_length=max_length, states=states)


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
    except Exception as exc:  # noqa: BLE001 - ValidationError, InferenceError, and others
        # torch.export and the ONNX translation succeeded; onnx's own check did not.
        stage = "shape inference" if "Inference" in type(exc).__name__ else "checker"
        first = first_line(exc, limit=300)
        raise ExportError(
            f"torch.export and the ONNX translation succeeded, but the graph fails onnx's "
            f"{stage} ({type(exc).__name__}: {first}); nothing was written: please report it "
            "with the model"
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
    input_names: list | None = None,
    constants: list | tuple = (),
    state_arg: str | None = None,
    states: str = "carried",
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
    input_names: the data inputs' graph names, one per tensor of example_input (e.g.
        forward's parameter names: ["x", "memory"]); default ``input`` / ``input.0``, ...
    constants: names of data inputs that are constant per stream (e.g. an attention
        decoder's ``memory``): no time axis; the contract marks them ``"constant": true``,
        the gate holds them fixed over a stream and the runtime takes them once per stream
        (``model.stream(batch, constants={...})``).
    state_arg: the name of forward's state parameter of a step-protocol module (default:
        found from the signature).
    states: "carried" (default: each recurrent layer's state is a graph input and output)
        or "internal" (sequence mode, models whose forward takes only the inputs: every
        call starts from zero state inside the graph, no state inputs/outputs; chosen by
        itself in sequence mode when a layer's batch is not the model's, e.g. chunks of
        time folded into the batch). The contract says which (``"state": "internal"``).
    Raises UsageError for bad arguments (before any work), UnsupportedModelError,
    ExportError, and ParityError when the graph differs from eager PyTorch; nothing is
    written then.
    """
    options = ExportOptions(
        mode=mode, opset=opset, atol=atol, rtol=rtol, lengths=lengths, input_axes=input_axes,
        precision=precision, triton_repo=triton_repo, triton_name=triton_name, progress=progress,
        min_length=min_length, max_length=max_length, triton_backend=triton_backend,
        input_names=input_names, constants=constants, state_arg=state_arg, states=states,
    ).with_destination(path)
    # Over 2 GiB of weights on a route that cannot take them: refused now, not after minutes.
    external.check_model_size(model, is_layer(model), options.precision, options.triton_repo)
    check_finite_weights(model)  # NaN/inf weights named as such, not as a failed gate
    with inference_mode(model):  # dropout off meanwhile; every module's own flag back after
        return pipeline(model, path, example_input, options)


def pipeline(model, path: str | os.PathLike, example_input, options: ExportOptions) -> ExportReport:
    """The export pipeline for checked ``options`` (see ``ExportOptions.with_destination``)."""
    note = options.progress or (lambda text: None)
    with external.staging(path) as stage:  # removed on the way out: committed or failed
        plan = plan_graph(model, example_input, options, note)
        graph, fp32_bytes = convert(plan, options, note, stage)
        data = check(graph, note, stage)
        proof = prove(plan, data, options, note)
        targets = prepare_targets(path, plan, graph, proof, options, note, stage)
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
                     options.input_axes, options.min_length, input_names=options.input_names,
                     constants=options.constants, state_arg=options.state_arg,
                     max_length=options.max_length, states=options.states)


def convert(plan, options: ExportOptions, note: Note,
            stage: external.Stage | None = None) -> tuple[onnx.ModelProto, int]:
    """(the graph in ``options.precision``, the float32 graph's size in bytes, external
    data included)."""
    fp32_bytes = external.total_size(plan.graph)
    if stage is not None and (options.precision != "fp32" or options.triton_repo is not None):
        external.inline_staged(plan.graph, stage)  # they rewrite one in-memory protobuf
    if options.precision != "fp32":
        note(f"converting to {options.precision}")
    return precision_mod.convert(plan.graph, options.precision), fp32_bytes


def check(graph: onnx.ModelProto, note: Note, stage: external.Stage | None = None) -> bytes | Path:
    """The full ONNX check; the serialized graph the gate runs, or the staged graph's path
    when its weights are in a staged data file (a session opened on it finds them)."""
    note("checking the graph")
    if stage is not None and external.has_external_data(graph):
        return external.check_staged(graph, stage)
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


def prove(plan, data: bytes | Path, options: ExportOptions, note: Note) -> Proof:
    """Run the parity gate on ``data`` (bytes, or a staged graph's path); ParityError on a
    failed case."""
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


def prepare_targets(path, plan, graph: onnx.ModelProto, proof: Proof, options: ExportOptions,
                    note: Note, stage: external.Stage | None = None) -> list[Target]:
    """Every target, in write order: the Triton repository first (when asked), the graph
    file last, so that a graph file that cannot be written rolls the repository back.

    The graph's metadata is written once and the graph serialized at most once: the graph
    file and a Python-backend Triton model (which serves the proven graph itself) share it."""
    write_metadata(graph, plan.spec.metadata_json(proof.summary))
    staged = stage is not None and external.has_external_data(graph)
    # Weights staged or going to PATH.data (graphs/external.py): the file needs no bytes.
    external_file = staged or external.needs_external_data(graph)
    python = options.triton_repo is not None and options.triton_backend == "python"
    data = graph.SerializeToString() if python or not external_file else b""
    targets = []
    if options.triton_repo is not None:
        targets.append(triton_target(plan, graph, data, proof, options, note))
    targets.append(Target("graph", Path(path), b"" if external_file else data, graph,
                          stage=stage if staged else None))
    return targets


def triton_target(plan, graph: onnx.ModelProto, data: bytes, proof: Proof,
                  options: ExportOptions, note: Note) -> Target:
    """The Triton model: the batch-first variant (``rnnedge.triton``), gated under the
    graph's own policy on the same device, and its config.pbtxt. data: the serialized
    ``graph`` with its metadata, which the Python backend serves as it is."""
    from rnnedge import triton

    if options.triton_backend == "python":  # the proven graph itself: no variant to prove
        from rnnedge.triton.python_backend import prepare_python

        data, config, extra = prepare_python(data, options.triton_name)
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
