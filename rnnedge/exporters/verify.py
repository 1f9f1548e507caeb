"""``rnnedge.exporters.verify``: re-run the parity gate of a written graph against its PyTorch model.

The export's Plan (its eager ``reference`` and seeded ``sample`` functions) is rebuilt from
the loaded model in the graph's own mode and opset, and its spec is checked against the
file's contract (names, dtypes, shapes); the gate then runs on the *file's* bytes. So what
is proven is the file on disk, not a fresh export of the model.

Per-tensor figures: the gate reports each case's worst error and the tensors that missed.
To give every output and state its own figures, the gate runs a second time with zero
tolerances, which makes every tensor that differs at all a "miss" carrying its max abs/rel
error (a tensor absent from those misses is bit-exact). Both runs use the gate's fixed seed,
so they see the same data; the verdict comes from the run with the real tolerances.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rnnedge.errors import ContractError, ParityError, UnsupportedModelError, UsageError

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"


@dataclass
class GraphFile:
    """A graph on disk: its serialized bytes and its parsed rnnedge contract."""

    path: Path
    data: bytes
    meta: dict

    @property
    def data_inputs(self) -> list[dict]:
        """The contract's data inputs without the sequence-mode ``lengths`` input."""
        return [t for t in self.meta["inputs"] if not _is_lengths(t)]

    @property
    def has_lengths(self) -> bool:
        return any(_is_lengths(t) for t in self.meta["inputs"])

    @property
    def dtype(self) -> str:
        """The dtype that picks the default tolerances (the first output's)."""
        outs = self.meta.get("outputs") or [{}]
        return outs[0].get("dtype", "float32")


def _is_lengths(t: dict) -> bool:
    # docs/contract.md: in sequence mode an int64 `lengths` input (batch,) may follow.
    return t.get("name") == "lengths" and t.get("dtype") == "int64" and list(t.get("shape", [])) == ["batch"]


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
    props = {p.key: p.value for p in model.metadata_props}
    if "rnnedge" not in props:
        raise ContractError(
            f"{path} has no rnnedge metadata: it was not written by rnnedge export, so there is "
            "no contract to verify against; export the model with rnnedge export"
        )
    try:
        meta = json.loads(props["rnnedge"])
    except json.JSONDecodeError as exc:
        raise ContractError(f"{path}: the rnnedge metadata is not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != 1:
        raise ContractError(
            f"{path}: rnnedge metadata format {meta.get('format') if isinstance(meta, dict) else '?'!r} "
            "is not one this version reads (1); re-export the model with this rnnedge"
        )
    for key in ("mode", "inputs", "outputs", "states", "opset"):
        if key not in meta:
            raise ContractError(f"{path}: rnnedge metadata lacks {key!r}; re-export the model")
    return GraphFile(path, data, meta)


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
    """(example input tensor, axes) for ``module``: the graph's first data input by default.

    input_axes: e.g. ("batch", "time", 16); None takes the graph's own input shape, so
    ``--input-shape`` is optional when verifying or benchmarking a file.
    """
    from rnnedge.loaders.model_file import make_example

    data = graph.data_inputs
    if not data:
        raise ContractError(f"{graph.path}: the contract lists no data input; re-export the model")
    if input_axes is None:
        input_axes = tuple(data[0]["shape"])
        input_dtype = input_dtype or data[0]["dtype"]
    return make_example(module, tuple(input_axes), input_dtype or "float32"), tuple(input_axes)


def plan_for_graph(module, graph: GraphFile, example_input=None, input_axes: tuple | None = None,
                   input_dtype: str | None = None):
    """Rebuild ``module``'s export plan in ``graph``'s mode and opset; check it matches.

    Returns a ``parity.Plan`` whose ``reference``/``sample`` drive the gate. Raises
    ContractError when the model's spec does not match the file's contract (the graph was
    not exported from a model of this shape), and the exporter's own errors otherwise.
    """
    from rnnedge.exporters.api import make_plan

    meta = graph.meta
    derived = input_axes is None and example_input is None
    if example_input is None:
        example_input, input_axes = example_for(module, graph, input_axes, input_dtype)
    name = type(module).__name__
    try:
        plan = make_plan(module, example_input, meta["mode"], int(meta["opset"]), graph.has_lengths,
                         [tuple(input_axes)] if input_axes is not None else None)
    except (UsageError, UnsupportedModelError) as exc:
        if not derived:
            raise
        # The example came from the file's contract: a model that refuses it is not the
        # model the file was exported from.
        raise ContractError(
            f"{graph.path} was not exported from this model: its input "
            f"{_describe(graph.data_inputs[0])} does not fit {name} ({exc})"
        ) from None
    diffs = contract_differences(meta, plan.spec.metadata())
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


@dataclass
class VerifyReport:
    """The outcome of ``verify``.

    cases: parity.CaseResult per gate case (the verdict, at atol/rtol).
    tensors: per output and state (states named by their graph output), its worst
    max_abs / max_rel over all cases, the case where the worst abs error happened, and
    whether it passed every case.
    """

    path: Path
    passed: bool
    cases: list
    tensors: list = field(default_factory=list)
    atol: float = 0.0
    rtol: float = 0.0
    device: str = "cpu"
    source: str = ""
    plan: object = field(default=None, repr=False)  # the rebuilt parity.Plan, for reuse (bench)
    precision: str = "fp32"  # "int8"/"fp16" graphs run their export's reduced-precision gate

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.cases), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.cases), default=0.0)

    @property
    def failed(self) -> list:
        return [c for c in self.cases if not c.passed]

    def as_dict(self) -> dict:
        def num(x: float):
            return x if x == x and x not in (float("inf"), float("-inf")) else str(x)

        return {
            "graph": str(self.path),
            "model": self.source,
            "passed": self.passed,
            "device": self.device,
            "precision": self.precision,
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs": num(self.max_abs),
            "max_rel": num(self.max_rel),
            "cases": [
                {"name": c.name, "max_abs": num(c.max_abs), "max_rel": num(c.max_rel), "passed": c.passed,
                 "misses": [{"tensor": t, "max_abs": num(a), "max_rel": num(r)} for t, a, r in c.misses],
                 **({"error": c.error} if c.error else {})}
                for c in self.cases
            ],
            "tensors": [{**t, "max_abs": num(t["max_abs"]), "max_rel": num(t["max_rel"])}
                        for t in self.tensors],
        }

    def failure_message(self) -> str:
        """One line naming the failing cases' worst tensors (empty when passed)."""
        failed = self.failed
        if not failed:
            return ""
        broken = [c for c in failed if c.error]
        worst = [t for t in self.tensors if not t["passed"]]
        parts = [f"{t['name']} max abs {t['max_abs']:.3g} max rel {t['max_rel']:.3g} "
                 f"(worst in '{t['worst_case']}')" for t in worst]
        if broken:
            parts.append(f"graph failed to run in '{broken[0].name}': {broken[0].error}")
        return (f"parity failed: {len(failed)} of {len(self.cases)} cases differ beyond "
                f"atol={self.atol:g}, rtol={self.rtol:g}: " + "; ".join(parts)
                + f"; {self.path.name} does not equal the model")


def _tensor_figures(spec, strict: list, loose: list) -> list[dict]:
    """Per output/state worst figures from the zero-tolerance run ``strict``."""
    names = [(t.name, "output") for t in spec.outputs] + [(s.output, "state") for s in spec.states]
    rows = {n: {"name": n, "role": role, "max_abs": 0.0, "max_rel": 0.0, "worst_case": "",
                "passed": True} for n, role in names}
    for case in strict:
        if case.error:
            for row in rows.values():
                row["max_abs"] = row["max_rel"] = float("inf")
                row["worst_case"] = case.name
            continue
        for tensor, a, r in case.misses:
            row = rows.get(tensor)
            if row is None:
                continue
            if a > row["max_abs"] or not row["worst_case"]:
                row["worst_case"] = case.name
            row["max_abs"] = max(row["max_abs"], a)
            row["max_rel"] = max(row["max_rel"], r)
    for case in loose:
        if case.error:
            for row in rows.values():
                row["passed"] = False
        for tensor, _, _ in case.misses:
            if tensor in rows:
                rows[tensor]["passed"] = False
    return list(rows.values())


def verify(graph_path, model, *, example_input=None, input_axes: tuple | None = None,
           input_dtype: str | None = None, atol: float | None = None, rtol: float | None = None,
           device: str = "cpu", progress: Callable[[str], None] | None = None,
           source: str = "") -> VerifyReport:
    """Run the parity gate of the graph at ``graph_path`` against ``model`` (an nn.Module).

    example_input / input_axes: as for ``rnnedge.export`` (e.g. a (batch, time, F) tensor,
    axes ("batch", "time", F)); both default to the graph's own first input.
    atol, rtol: default from the graph's dtype (float32: 1e-5, 1e-4), or for an int8/fp16
    graph (its metadata's ``parity.precision``) from that precision, whose export gate
    (drift-bounded sequences plus teacher-forced steps) then gives the verdict; the
    per-tensor figures are the plain gate's free-running errors either way.
    device: "cpu", "cuda[:N]" or "auto": the onnxruntime provider the graph runs on.
    Returns a VerifyReport (it does not raise on a parity miss: see ``raise_on_failure``).
    Raises ContractError when the graph was not exported from a model of this shape,
    UsageError / DeviceError for bad arguments.
    """
    from rnnedge.gate import parity
    from rnnedge.gate.tolerance import tolerance

    graph = read_graph(graph_path)
    precision, precision_mod = _precision_of(graph)
    key = graph.dtype if precision_mod is None else precision_mod.tolerance_key(precision, graph.dtype)
    atol, rtol = tolerance(key, atol, rtol)
    was_training = bool(getattr(model, "training", False))
    model.eval()  # inference semantics (dropout off), as export does
    try:
        plan = plan_for_graph(model, graph, example_input, input_axes, input_dtype)
        providers, actual = providers_for(device, graph.data)
        if precision_mod is None:
            loose = parity.run_gate(plan, graph.data, atol, rtol, providers=providers, progress=progress)
        else:  # an int8/fp16 graph: proven as its export proved it (drift + teacher-forced steps)
            loose = precision_mod.run_gate(plan, graph.data, precision, atol, rtol,
                                           providers=providers, progress=progress)
        strict = parity.run_gate(plan, graph.data, 0.0, 0.0, providers=providers,
                                 progress=(lambda case: progress(f"{case} (per-tensor figures)"))
                                 if progress else None)
    finally:
        if was_training:
            model.train()
    tensors = _tensor_figures(plan.spec, strict, loose)
    return VerifyReport(graph.path, all(c.passed for c in loose), loose, tensors, atol, rtol,
                        actual, source or type(model).__name__, plan, precision)


def _precision_of(graph: GraphFile):
    """("fp32", None) for a float graph; (precision, the precision module) for int8/fp16
    graphs, whose export records ``parity.precision`` and which need that module's gate."""
    precision = str((graph.meta.get("parity") or {}).get("precision", "fp32"))
    if precision == "fp32":
        return precision, None
    try:
        from rnnedge.precision import core as precision_mod
    except ImportError:
        precision_mod = None
    if precision_mod is None or precision not in getattr(precision_mod, "PRECISIONS", ()):
        raise ContractError(
            f"{graph.path} was exported at precision {precision!r}, which this rnnedge cannot "
            "verify; upgrade rnnedge"
        )
    return precision, precision_mod


def raise_on_failure(report: VerifyReport) -> None:
    """Raise ParityError (CLI exit 1) when any case of ``report`` missed."""
    if not report.passed:
        raise ParityError(report.failure_message(), failures=report.failed)
