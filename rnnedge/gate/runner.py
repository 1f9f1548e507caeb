"""The one gate runner: every case of a plan through the graph, judged by a policy.

Each case runs the graph, float32 eager and (where the model runs in float64, under a
float32 policy) the float64 referee, each on its own copies of the inputs and states.
An exception is the culprit's: one raised by eager is the model's ("the model raised X
at batch B, length T"), one raised by onnxruntime the graph's (with the shapes it was
fed). After the cases, the NaN probe (``nonfinite``) records whether a NaN propagates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rnnedge.errors import ExportError, first_line
from rnnedge.gate.cases import SEED, Case, case_arrays, gate_cases, on_grid
from rnnedge.gate.compare import INF, TensorResult, compare_case
from rnnedge.gate.nonfinite import STEPS, nan_propagates
from rnnedge.gate.plan import Plan
from rnnedge.gate.policy import Policy
from rnnedge.gate.referee import float64_referee
from rnnedge.runtime import remainder


@dataclass(frozen=True)
class CaseResult:
    """One case: every output and state it compared (``tensors``), or the one-line
    ``error`` of a case that could not run at all, and whose it was (``culprit``: "model"
    when eager PyTorch raised, "graph" when onnxruntime did)."""

    case: Case
    tensors: tuple[TensorResult, ...] = ()
    error: str | None = None
    culprit: str | None = None

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def passed(self) -> bool:
        return self.error is None and all(t.passed for t in self.tensors)

    @property
    def misses(self) -> tuple[TensorResult, ...]:
        """The tensors that failed (none for a case that could not run: see ``error``)."""
        return tuple(t for t in self.tensors if not t.passed)

    @property
    def max_abs(self) -> float:
        return INF if self.error else max((t.max_abs for t in self.tensors), default=0.0)

    @property
    def max_rel(self) -> float:
        return INF if self.error else max((t.max_rel for t in self.tensors), default=0.0)

    @property
    def drift(self) -> float | None:
        """Worst rms drift over its tensors, where the policy judged this case by drift."""
        drifts = [t.drift for t in self.tensors if t.drift is not None]
        return max(drifts) if drifts else None

    @property
    def refereed(self) -> bool:
        """Whether the float64 referee judged every tensor of this case."""
        return bool(self.tensors) and all(t.ref_max_abs is not None for t in self.tensors)

    @property
    def ref_max_abs(self) -> float | None:
        """Worst max |graph - ref64| over its tensors (None without the referee)."""
        return max(t.ref_max_abs for t in self.tensors) if self.refereed else None

    @property
    def eager_max_abs(self) -> float | None:
        """Worst max |eager32 - ref64| over its tensors (None without the referee)."""
        return max(t.eager_max_abs for t in self.tensors) if self.refereed else None

    def as_dict(self) -> dict:
        out = {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel,
               "passed": self.passed}
        if self.refereed:
            out.update(ref_max_abs=self.ref_max_abs, eager_max_abs=self.eager_max_abs)
        return out


@dataclass(frozen=True)
class GateResult:
    """Every case's result under ``policy``; ``tensors``: (name, role) of every output and
    state in contract order (states by their graph output name)."""

    policy: Policy
    cases: tuple[CaseResult, ...]
    tensors: tuple[tuple[str, str], ...] = ()
    nan_propagates: bool | None = None  # see ``nonfinite``; None: not probed / no float input
    span: object = None  # the lengths.LengthRange tried (None for a step graph)

    @property
    def referee(self) -> str:
        """"float64" when the float64 referee judged every case that ran, else "float32"."""
        ran = [c for c in self.cases if c.error is None]
        return "float64" if ran and all(c.refereed for c in ran) else "float32"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.passed]

    @property
    def max_abs(self) -> float:
        return max((c.max_abs for c in self.cases), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((c.max_rel for c in self.cases), default=0.0)

    @property
    def drift(self) -> float | None:
        """Worst drift over the drift-judged cases; None when the policy judges none so."""
        drifts = [c.drift for c in self.cases if c.drift is not None]
        if self.policy.drift_limit is None:
            return None
        return max(drifts, default=0.0)


def _copy(arrays: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in arrays.items()}


def isolated(call):
    """``call`` on its own copies of the inputs and states, its results copied too: a model
    that updates its input or state in place (``acc += h``) changes nobody else's arrays."""
    def run(inputs: dict, states: dict):
        outs, new_states = call(_copy(inputs), _copy(states))
        return _copy(outs), _copy(new_states)

    return run


def _shapes(arrays: dict) -> str:
    return ", ".join(f"{k} {tuple(np.shape(v))} {np.asarray(v).dtype}" for k, v in arrays.items())


class CaseFailed(Exception):
    """A case could not run; ``culprit`` "model" or "graph", ``message`` one line."""

    def __init__(self, culprit: str, message: str):
        super().__init__(message)
        self.culprit, self.message = culprit, message


def _blamed(call, culprit: str, case: Case):
    """``call`` whose exceptions become CaseFailed naming ``culprit`` and the sizes."""
    def run(inputs: dict, states: dict):
        try:
            return call(inputs, states)
        except Exception as exc:  # noqa: BLE001 - user code and onnxruntime raise anything
            what = f"{type(exc).__name__}: {first_line(exc, 300, fallback='')}"
            if culprit == "model":
                at = f"batch {case.batch}" + ("" if case.kind == "steps" else f", length {case.length}")
                message = f"the model raised {what} at {at}"
            else:
                message = f"the graph failed to run on {_shapes({**inputs, **states})} ({what})"
            raise CaseFailed(culprit, message) from exc

    return run


class GraphRunner:
    """Runs the candidate graph with plain onnxruntime and numpy state.

    model_bytes: the serialized graph, or the path of a graph file (one whose weights are
    in an external data file beside it, which onnxruntime finds by the file's folder).
    """

    def __init__(self, plan: Plan, model_bytes: bytes | str | os.PathLike, providers):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        model = model_bytes if isinstance(model_bytes, bytes) else os.fspath(model_bytes)
        self.session = ort.InferenceSession(model, opts, providers=list(providers))
        self.spec = plan.spec

    def __call__(self, inputs: dict, states: dict):
        feeds = {**inputs, **states}
        names = [t.name for t in self.spec.outputs] + [s.output for s in self.spec.states]
        values = self.session.run(names, feeds)
        n = len(self.spec.outputs)
        outs = dict(zip(names[:n], values[:n]))
        new_states = {s.input: v for s, v in zip(self.spec.states, values[n:])}
        return outs, new_states


def run_gate(plan: Plan, model_bytes: bytes | str | os.PathLike, policy: Policy, *,
             providers=("CPUExecutionProvider",),
             progress: Callable[[str], None] | None = None) -> GateResult:
    """Run every case of ``plan`` (and the policy's teacher-forced ones) once through the
    graph ``model_bytes`` on ``providers``; ``progress`` gets each case's name first.
    model_bytes may be a graph file's path instead (a graph with external data, over 2 GiB).

    Returns every case's per-tensor figures; raises nothing on a miss (see
    ``raise_on_failure``). A case the graph cannot run is a failed case with its error;
    a graph onnxruntime cannot load at all raises ExportError.
    """
    try:
        graph = GraphRunner(plan, model_bytes, providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        first = first_line(exc, 300)
        raise ExportError(
            f"onnxruntime cannot load the exported graph ({first}); nothing was written: try "
            "the default opset, or report the model"
        ) from None
    rng = np.random.default_rng(SEED)  # one stream for all cases, in order: reproducible
    span = policy.span(plan.spec.mode)
    # The referee judges float32 graphs; reduced precisions are judged by drift from eager.
    referee = None
    if policy.drift_limit is None:
        referee = float64_referee(plan.model, isolated(plan.reference))
    results = []
    for case in gate_cases(plan, policy.teacher_forced, span):
        if progress:
            progress(case.name)
        eager = _blamed(isolated(plan.reference), "model", case)
        graph_call = _blamed(isolated(graph), "graph", case)
        try:
            run = case_arrays(plan, graph_call, eager, rng, case, referee)
            tensors = compare_case(plan.spec, run, policy.atol, policy.rtol,
                                   policy.drift_limit_for(case))
            results.append(CaseResult(case, tensors))
        except CaseFailed as exc:
            results.append(CaseResult(case, (), exc.message, exc.culprit))
        if referee is not None and results[-1].error is None and not results[-1].refereed:
            referee = None  # the model did not run in float64: no use trying every case
    names = tuple((t.name, "output") for t in plan.spec.outputs)
    names += tuple((s.output, "state") for s in plan.spec.states)
    try:
        # More steps than the latency: a look-ahead graph emits nothing on a shorter first
        # call, and onnxruntime's CPU GRU/LSTM abort the process on 0 steps.
        spec = plan.spec
        steps = max(span.low, STEPS, spec.latency + 1)
        if on_grid(spec):  # a strided late graph's first call: on its grid
            steps = remainder.grid_length(steps, spec.chunk_multiple, spec.chunk_offset,
                                          spec.latency)
        nan = nan_propagates(plan, model_bytes, providers, session=graph.session, steps=steps)
    except Exception:  # noqa: BLE001 - a graph that cannot take the probe: not known
        nan = None
    return GateResult(policy, tuple(results), names, nan,
                      None if plan.spec.time_axis is None else span)
