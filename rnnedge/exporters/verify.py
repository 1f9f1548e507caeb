"""``rnnedge.exporters.verify``: re-run the parity gate of a written graph against its PyTorch model.

The export's Plan (its eager ``reference`` and seeded ``sample`` functions) is rebuilt from
the loaded model in the graph's own mode and opset, and its spec is checked against the
file's contract (names, dtypes, shapes); the gate then runs on the *file's* bytes. So what
is proven is the file on disk, not a fresh export of the model.

The gate runs once: its result keeps every case's figures for every output and state,
so the verdict and the per-tensor worst figures both come from that one run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rnnedge.contract import ExportSpec, from_json
from rnnedge.errors import ContractError, ParityError, UnsupportedModelError, UsageError
from rnnedge.gate import (
    PRECISIONS,
    GateResult,
    model_failure,
    per_tensor,
    policy_for,
    run_gate,
    tensor_failure,
)
from rnnedge.graphs.external import inline_external_data
from rnnedge.graphs.metadata import read_metadata

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"


@dataclass
class GraphFile:
    """A graph on disk: its serialized bytes and its parsed rnnedge contract."""

    path: Path
    data: bytes
    contract: ExportSpec

    @property
    def meta(self) -> dict:
        """The contract as a JSON-ready dict (``contract.metadata()``)."""
        return self.contract.metadata()

    @property
    def data_inputs(self) -> list[dict]:
        """The contract's data inputs without the sequence-mode ``lengths`` input."""
        return [t.as_dict() for t in self.contract.data_inputs]

    @property
    def has_lengths(self) -> bool:
        return self.contract.has_lengths

    @property
    def dtype(self) -> str:
        """The dtype that picks the default tolerances (the first output's)."""
        outputs = self.contract.outputs
        return outputs[0].dtype if outputs else "float32"


def read_graph(path: str | os.PathLike) -> GraphFile:
    """Read ``path`` and its rnnedge contract; UsageError / ContractError when it has none."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} not found: expected an ONNX file written by rnnedge export")
    data = path.read_bytes()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds
        raise UsageError(f"{path} is not a readable ONNX file ({type(exc).__name__}); check the path") from None
    data = inline_external_data(model, path) or data  # a NAME.onnx.data beside it, read in
    text = read_metadata(model)
    if text is None:
        raise ContractError(
            f"{path} has no rnnedge metadata: it was not written by rnnedge export, so there is "
            "no contract to verify against; export the model with rnnedge export"
        )
    try:
        spec = from_json(text)
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from None
    return GraphFile(path, data, spec)


def _describe(t: dict) -> str:
    return f"{t['name']} {t['dtype']}[{','.join(map(str, t['shape']))}]"


def _describe_state(s: dict) -> str:
    return f"{s['input']}->{s['output']} {s['dtype']}[{','.join(map(str, s['shape']))}]"


def contract_differences(graph_meta: dict, plan_meta: dict) -> list[str]:
    """What differs between the file's contract and the model's plan, as short phrases."""
    diffs = []
    for key in ("mode", "time_axis"):
        if graph_meta.get(key) != plan_meta.get(key):
            diffs.append(f"{key} {graph_meta.get(key)!r} vs {plan_meta.get(key)!r}")
    for key, describe in (("inputs", _describe), ("outputs", _describe), ("states", _describe_state)):
        got = [describe(t) for t in graph_meta.get(key, [])]
        want = [describe(t) for t in plan_meta.get(key, [])]
        if got != want:
            diffs.append(f"{key} [{'; '.join(got)}] vs [{'; '.join(want)}]")
    return diffs


def example_for(module, graph: GraphFile, input_axes: tuple | None = None, input_dtype: str | None = None):
    """(example input tensor, axes) for ``module``: the graph's data inputs by default (a
    tuple of tensors and a list of axes for several).

    input_axes: e.g. ("batch", "time", 16), or a list of such, one per data input; None
    takes the graph's own input shapes, so ``--input-shape`` is optional when verifying or
    benchmarking a file. input_dtype: a dtype, or a list of them, one per data input.
    """
    from rnnedge.loaders import make_example, make_examples

    data = graph.data_inputs
    if not data:
        raise ContractError(f"{graph.path}: the contract lists no data input; re-export the model")
    if input_axes is None and len(data) > 1:
        specs = [(tuple(t["shape"]), t["dtype"]) for t in data]
        return make_examples(module, specs), [axes for axes, _ in specs]
    if input_axes is not None and input_axes and isinstance(input_axes[0], (tuple, list)):
        dtypes = input_dtype or ["float32"] * len(input_axes)
        axes_list = [tuple(a) for a in input_axes]
        examples = make_examples(module, list(zip(axes_list, dtypes)))
        return (examples[0] if len(examples) == 1 else examples), axes_list
    if input_axes is None:
        input_axes = tuple(data[0]["shape"])
        input_dtype = input_dtype or data[0]["dtype"]
    return make_example(module, tuple(input_axes), input_dtype or "float32"), tuple(input_axes)


def plan_for_graph(module, graph: GraphFile, example_input=None, input_axes: tuple | None = None,
                   input_dtype: str | None = None, min_length: int | None = None,
                   state_arg: str | None = None):
    """Rebuild ``module``'s export plan in ``graph``'s mode and opset; check it matches.

    Returns a ``gate.Plan`` whose ``reference``/``sample`` drive the gate. Raises
    ContractError when the model's spec does not match the file's contract (the graph was
    not exported from a model of this shape), and the exporter's own errors otherwise.
    """
    from rnnedge.exporters.api import make_plan
    from rnnedge.exporters.layers import is_layer

    derived = input_axes is None and example_input is None
    if example_input is None:
        example_input, input_axes = example_for(module, graph, input_axes, input_dtype)
    name = type(module).__name__
    if input_axes is not None and not (input_axes and isinstance(input_axes[0], (tuple, list))):
        input_axes = [tuple(input_axes)]
    # The graph's own input names and constants: a plan of the same model names them alike.
    data = graph.contract.data_inputs
    names = [t.name for t in data] if len(data) == len(input_axes or data) else None
    try:
        plan = make_plan(module, example_input, graph.contract.mode, int(graph.contract.opset),
                         graph.has_lengths,
                         input_axes, min_length, input_names=names if not is_layer(module) else None,
                         constants=[t.name for t in data if t.constant], state_arg=state_arg)
    except (UsageError, UnsupportedModelError) as exc:
        if not derived:
            raise
        # The example came from the file's contract: a model that refuses it is not the
        # model the file was exported from.
        raise ContractError(
            f"{graph.path} was not exported from this model: its input "
            f"{_describe(graph.data_inputs[0])} does not fit {name} ({exc})"
        ) from None
    diffs = contract_differences(graph.meta, plan.spec.metadata())
    if diffs:
        raise ContractError(
            f"{graph.path} was not exported from this model ({name}): graph vs model: "
            + "; ".join(diffs) + "; pass the model (and --arch/--arch-kwargs) the graph was exported from"
        )
    return plan


def providers_for(device: str, data: bytes) -> tuple[list, str]:
    """(onnxruntime providers, "cpu" or "cuda:N") for ``device`` ("cpu", "cuda[:N]", "auto").

    "cuda" raises DeviceError when CUDA is not usable; "auto" falls back to the CPU with the
    runtime's DeviceFallbackWarning (usability is probed with a real session, as the
    runtime does: onnxruntime-gpu lists CUDA even where it cannot run).
    """
    from rnnedge.runtime.providers import create_session, parse_device

    kind, _ = parse_device(device)
    if kind == "cpu":
        return [CPU_EP], "cpu"
    _, actual = create_session(data, device, None)
    if actual.startswith("cuda"):
        return [(CUDA_EP, {"device_id": int(actual.partition(":")[2] or 0)}), CPU_EP], actual
    return [CPU_EP], "cpu"


def _num(x):
    """A float for JSON: inf and nan as strings (JSON has neither)."""
    if x is None:
        return None
    return x if x == x and x not in (float("inf"), float("-inf")) else str(x)


@dataclass
class VerifyReport:
    """The outcome of ``verify``: the gate's ``result`` on the file, and where it ran.

    Its figures and verdict are the result's (``rnnedge.gate.GateResult``), under the
    graph's policy: ``cases`` (gate CaseResults: ``.name``, ``.max_abs``, ``.max_rel``,
    ``.drift``, ``.passed``, ``.misses``, ``.error``), ``passed``, ``failed``, ``max_abs``,
    ``max_rel``, ``drift`` (rms(graph - eager) / rms(eager), judged against
    ``drift_limit``, only for int8/fp16 graphs; max_rel is always a relative error),
    ``atol``, ``rtol``. tensors: per output and state (states named by their graph
    output), a TensorSummary: worst max_abs / max_rel (and drift) over all cases, the case
    where the worst abs error happened, and whether it passed every case.
    """

    path: Path
    result: GateResult = field(repr=False)
    device: str = "cpu"
    source: str = ""
    plan: object = field(default=None, repr=False)  # the rebuilt gate Plan, for reuse (bench)
    precision: str = "fp32"  # "int8"/"fp16" graphs run their export's reduced-precision gate
    tensors: list = field(init=False, default_factory=list)

    def __post_init__(self):
        self.tensors = per_tensor(self.result)

    @property
    def cases(self) -> tuple:
        return self.result.cases

    @property
    def passed(self) -> bool:
        return self.result.passed

    @property
    def failed(self) -> list:
        return self.result.failed

    @property
    def max_abs(self) -> float:
        return self.result.max_abs

    @property
    def max_rel(self) -> float:
        return self.result.max_rel

    @property
    def drift(self) -> float | None:
        """Worst drift over the drift-judged cases; None for a float32 graph."""
        return self.result.drift

    @property
    def atol(self) -> float:
        return self.result.policy.atol

    @property
    def rtol(self) -> float:
        return self.result.policy.rtol

    @property
    def drift_limit(self) -> float | None:
        """The reduced-precision policy's drift bound (None for a float32 graph)."""
        return self.result.policy.drift_limit

    def as_dict(self) -> dict:
        return {
            "graph": str(self.path),
            "model": self.source,
            "passed": self.passed,
            "device": self.device,
            "precision": self.precision,
            "atol": self.atol,
            "rtol": self.rtol,
            "drift_limit": self.drift_limit,
            "max_abs": _num(self.max_abs),
            "max_rel": _num(self.max_rel),
            "drift": _num(self.drift),
            "cases": [
                {"name": c.name, "max_abs": _num(c.max_abs), "max_rel": _num(c.max_rel),
                 "drift": _num(c.drift), "passed": c.passed,
                 "misses": [{"tensor": t.name, "max_abs": _num(t.max_abs),
                             "max_rel": _num(t.max_rel), "drift": _num(t.drift)}
                            for t in c.misses],
                 **({"error": c.error} if c.error else {})}
                for c in self.cases
            ],
            "tensors": [{"name": t.name, "role": t.role, "max_abs": _num(t.max_abs),
                         "max_rel": _num(t.max_rel), "drift": _num(t.drift),
                         "worst_case": t.worst_case, "passed": t.passed}
                        for t in self.tensors],
        }

    def failure_message(self) -> str:
        """One line, in the gate's words, naming the failing cases' worst tensors (empty
        when passed); when eager PyTorch raised, that it is the model's error."""
        if self.passed:
            return ""
        raised = model_failure(self.result)
        if raised:
            return f"{raised}; {self.path.name} was not judged"
        return (tensor_failure(self.result, self.tensors)
                + f"; {self.path.name} does not equal the model")


def verify(graph_path, model, *, example_input=None, input_axes: tuple | None = None,
           input_dtype: str | None = None, atol: float | None = None, rtol: float | None = None,
           device: str = "cpu", progress: Callable[[str], None] | None = None,
           source: str = "", min_length: int | None = None,
           max_length: int | None = None, state_arg: str | None = None) -> VerifyReport:
    """Run the parity gate of the graph at ``graph_path`` against ``model`` (an nn.Module).

    example_input / input_axes: as for ``rnnedge.export`` (e.g. a (batch, time, F) tensor,
    axes ("batch", "time", F)); both default to the graph's own first input.
    atol, rtol: default from the graph's dtype (float32: 1e-5, 1e-4), or for an int8/fp16
    graph (its metadata's ``parity.precision``) from that precision, whose export gate
    (drift-bounded sequences plus teacher-forced steps) then gives the verdict.
    device: "cpu", "cuda[:N]" or "auto": the onnxruntime provider the graph runs on.
    progress: called with each case's name as the gate reaches it (once per case).
    min_length, max_length: the range of time steps, as for ``rnnedge.export``.
    state_arg: forward's state parameter, as for ``rnnedge.export``.
    The model is put in eval mode meanwhile; every submodule's own training flag is
    restored afterwards.
    Returns a VerifyReport (it does not raise on a parity miss: see ``raise_on_failure``).
    Raises ContractError when the graph was not exported from a model of this shape,
    UsageError / DeviceError for bad arguments.
    """
    from rnnedge.exporters.inference import inference_mode

    graph = read_graph(graph_path)
    precision = _precision_of(graph)
    policy = policy_for(precision, graph.dtype, atol, rtol, min_length=min_length,
                        max_length=max_length)
    with inference_mode(model):  # dropout off, as export does; every flag back afterwards
        plan = plan_for_graph(model, graph, example_input, input_axes, input_dtype, min_length,
                              state_arg)
        providers, actual = providers_for(device, graph.data)
        result = run_gate(plan, graph.data, policy, providers=providers, progress=progress)
    return VerifyReport(graph.path, result, actual, source or type(model).__name__, plan,
                        precision)


def _precision_of(graph: GraphFile) -> str:
    """"fp32" for a float graph; "int8"/"fp16" for graphs whose export recorded
    ``parity.precision`` and which the gate's reduced-precision policy then proves."""
    precision = str((graph.contract.parity or {}).get("precision", "fp32"))
    if precision not in PRECISIONS:
        raise ContractError(
            f"{graph.path} was exported at precision {precision!r}, which this rnnedge cannot "
            "verify; upgrade rnnedge"
        )
    return precision


def raise_on_failure(report: VerifyReport) -> None:
    """Raise ParityError (CLI exit 1) when any case of ``report`` missed."""
    if not report.passed:
        raise ParityError(report.failure_message(), failures=report.failed)
