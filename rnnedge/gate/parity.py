"""The parity gate: the exported graph must equal eager PyTorch, or the export fails.

The gate is driven by the export's ``Plan``: its spec says which inputs are data and
which are state, ``sample`` makes seeded data inputs, ``reference`` runs eager PyTorch.
Cases cover batch 1 and 3, lengths 1, 7, 10 and 53 (not multiples of each other), and
the same sequence streamed through the graph in 1-step and uneven chunks with the state
carried, compared with eager over the whole sequence. Streamed outputs with a time axis
are joined along it; an output without one (a summary of the sequence so far, such as
a classifier's reading of the last step) is compared as the last chunk gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from rnnedge.contract import ExportSpec
from rnnedge.errors import ExportError, ParityError, first_line

# Reference: (data inputs, states) -> (data outputs, states after), numpy in and out,
# dicts keyed by graph names (state dicts by the state's *input* name).
Reference = Callable[[dict, dict], tuple[dict, dict]]
# Sample: (rng, batch, time or None) -> data inputs (lengths excluded).
Sample = Callable[[np.random.Generator, int, "int | None"], dict]

BATCHES = (1, 3)
LENGTHS = (1, 7, 10, 53)
STREAM_LENGTH = 53
UNEVEN_CHUNKS = (5, 1, 12, 3, 7)
SEED = 20261127


@dataclass(frozen=True)
class Plan:
    """What one export builds and how the gate checks it."""

    spec: ExportSpec
    graph: object  # onnx.ModelProto
    reference: Reference
    sample: Sample
    lengths_input: str | None = None  # name of the int64 per-row lengths input, if any


@dataclass
class CaseResult:
    """One parity case: worst error over every output and state it compared."""

    name: str
    max_abs: float
    max_rel: float
    passed: bool
    misses: list = field(default_factory=list)  # [(tensor, max_abs, max_rel)]
    error: str | None = None  # the graph could not run this case at all
    drift: float | None = None  # reduced-precision gates: worst relative RMS drift

    def as_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "passed": self.passed}


def compare(got: np.ndarray, want: np.ndarray, atol: float, rtol: float):
    """(max_abs, max_rel, ok) of ``got`` against ``want``."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf"), False
    if got.size == 0:
        return 0.0, 0.0, True
    diff = np.abs(got - want)
    if not np.all(np.isfinite(diff)):
        return float("inf"), float("inf"), False
    # Relative to |eager|, floored at 1e-6: an exact zero in eager would otherwise turn
    # float32 rounding into relative figures of 1e30 in reports.
    rel = diff / np.maximum(np.abs(want), 1e-6)
    ok = bool(np.all(diff <= atol + rtol * np.abs(want)))
    return float(diff.max()), float(rel.max()), ok


def initial_states(spec: ExportSpec, rng, batch: int, random: bool) -> dict:
    states = {}
    for s in spec.states:
        shape = [batch if i == s.batch_axis else d for i, d in enumerate(s.shape)]
        arr = rng.standard_normal(shape).astype(s.dtype) * 0.5 if random else np.zeros(shape, s.dtype)
        states[s.input] = arr
    return states


class GraphRunner:
    """Runs the candidate graph with plain onnxruntime and numpy state."""

    def __init__(self, plan: Plan, model_bytes: bytes, providers):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model_bytes, opts, providers=list(providers))
        self.spec = plan.spec

    def __call__(self, inputs: dict, states: dict):
        feeds = {**inputs, **states}
        names = [t.name for t in self.spec.outputs] + [s.output for s in self.spec.states]
        values = self.session.run(names, feeds)
        n = len(self.spec.outputs)
        outs = dict(zip(names[:n], values[:n]))
        new_states = {s.input: v for s, v in zip(self.spec.states, values[n:])}
        return outs, new_states


def chunk_spans(total: int, pattern) -> list[tuple[int, int]]:
    spans, start, k = [], 0, 0
    while start < total:
        size = min(pattern[k % len(pattern)], total - start)
        spans.append((start, start + size))
        start += size
        k += 1
    return spans


def slice_time(arrays: dict, axis: int, start: int, stop: int, spec: ExportSpec) -> dict:
    timed = {t.name for t in spec.inputs if "time" in t.shape}
    return {
        k: (np.ascontiguousarray(np.take(v, range(start, stop), axis=axis)) if k in timed else v)
        for k, v in arrays.items()
    }


def _score(spec, name, got_outs, got_states, want_outs, want_states, atol, rtol) -> CaseResult:
    worst_abs = worst_rel = 0.0
    misses = []
    pairs = [(k, got_outs.get(k), want_outs[k]) for k in want_outs]
    # States are named by their graph output (hn, cn): that is what the caller reads back.
    pairs += [(s.output, got_states.get(s.input), want_states[s.input]) for s in spec.states]
    for tensor, got, want in pairs:
        if got is None:
            misses.append((tensor, float("inf"), float("inf")))
            continue
        a, r, ok = compare(got, want, atol, rtol)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        if not ok:
            misses.append((tensor, a, r))
    return CaseResult(name, worst_abs, worst_rel, not misses, misses)


def gate_cases(plan: Plan):
    """Yield (name, batch, time, random_state, chunk_pattern or None, lengths or None)."""
    spec = plan.spec
    if spec.time_axis is None:
        # Step graphs: one step per call; eager is stepped the same way.
        for batch, steps in ((1, 10), (3, STREAM_LENGTH)):
            yield f"steps B={batch} N={steps}", batch, steps, batch > 1, (1,), None
        return
    for batch in BATCHES:
        for length in LENGTHS:
            yield f"full B={batch} T={length}", batch, length, batch > 1, None, None
    if plan.lengths_input:
        for length in (7, 53):
            yield f"lengths B=3 T={length}", 3, length, True, None, "random"
    if spec.mode == "stream":
        for batch in BATCHES:
            for pattern in ((1,), UNEVEN_CHUNKS):
                label = "1" if pattern == (1,) else ",".join(map(str, pattern))
                yield (f"stream B={batch} T={STREAM_LENGTH} chunks={label}", batch,
                       STREAM_LENGTH, batch > 1, pattern, None)


def case_arrays(plan, graph, rng, case):
    """Run one gate case through the graph and eager PyTorch.

    Returns (graph outputs, graph states, eager outputs, eager states), dicts of numpy
    arrays: outputs by name (stacked over steps for step graphs; joined over chunks along
    their time axis when streamed), states by their input name (the state after the case).
    """
    name, batch, length, random_state, pattern, lengths = case
    spec = plan.spec
    states0 = initial_states(spec, rng, batch, random_state)
    if spec.time_axis is None:
        inputs = [plan.sample(rng, batch, None) for _ in range(length)]
        want_states, got_states = dict(states0), dict(states0)
        want_seq, got_seq = [], []
        for x in inputs:
            w, want_states = plan.reference(x, want_states)
            g, got_states = graph(x, got_states)
            want_seq.append(w)
            got_seq.append(g)
        want_outs = {k: np.stack([w[k] for w in want_seq]) for k in want_seq[0]}
        got_outs = {k: np.stack([g[k] for g in got_seq]) for k in got_seq[0]}
        return got_outs, got_states, want_outs, want_states
    inputs = plan.sample(rng, batch, length)
    if plan.lengths_input:
        row_lengths = np.full(batch, length, dtype=np.int64)
        if lengths == "random":
            row_lengths = rng.integers(1, length + 1, size=batch).astype(np.int64)
            row_lengths[0] = length  # PyTorch pads to the longest row
        inputs[plan.lengths_input] = row_lengths
    want_outs, want_states = plan.reference(inputs, dict(states0))
    if pattern is None:
        got_outs, got_states = graph(inputs, dict(states0))
        return got_outs, got_states, want_outs, want_states
    got_states, pieces = dict(states0), []
    for start, stop in chunk_spans(length, pattern):
        piece, got_states = graph(slice_time(inputs, spec.time_axis, start, stop, spec), got_states)
        pieces.append(piece)
    got_outs = {}
    for t in spec.outputs:
        if "time" in t.shape:
            got_outs[t.name] = np.concatenate([p[t.name] for p in pieces], axis=t.shape.index("time"))
        else:
            # No time axis (e.g. a classifier reading the last step): each chunk's value
            # stands for the sequence so far, so the last chunk's must equal the whole's.
            got_outs[t.name] = pieces[-1][t.name]
    return got_outs, got_states, want_outs, want_states


def _run_case(plan, graph, rng, case, atol, rtol) -> CaseResult:
    return _score(plan.spec, case[0], *case_arrays(plan, graph, rng, case), atol, rtol)


def run_gate(
    plan: Plan,
    model_bytes: bytes,
    atol: float,
    rtol: float,
    *,
    providers=("CPUExecutionProvider",),
    progress: Callable[[str], None] | None = None,
) -> list[CaseResult]:
    """Run every case; return their results (no exception; see ``raise_on_failure``)."""
    try:
        graph = GraphRunner(plan, model_bytes, providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own kinds
        first = first_line(exc, 300)
        raise ExportError(
            f"onnxruntime cannot load the exported graph ({first}); nothing was written: try "
            "the default opset, or report the model"
        ) from None
    rng = np.random.default_rng(SEED)
    results = []
    for case in gate_cases(plan):
        if progress:
            progress(case[0])
        try:
            results.append(_run_case(plan, graph, rng, case, atol, rtol))
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run is a failed case
            results.append(CaseResult(case[0], float("inf"), float("inf"), False, [],
                                      first_line(exc, 300)))
    return results


def summarize(results: list[CaseResult]) -> dict:
    """The metadata ``parity`` entry: worst figures and the case count."""
    return {
        "max_abs": max((r.max_abs for r in results), default=0.0),
        "max_rel": max((r.max_rel for r in results), default=0.0),
        "cases": len(results),
    }


def describe_failure(r: CaseResult, miss: str = "{t} max_abs={a:.3g} max_rel={e:.3g}") -> str:
    """'[case: tensor figures, ...]' for one failed case; ``miss`` formats (t, a, e)."""
    if r.error:
        return f"[{r.name}: graph failed to run: {r.error}]"
    return f"[{r.name}: " + ", ".join(miss.format(t=t, a=a, e=e) for t, a, e in r.misses) + "]"


def raise_on_failure(results: list[CaseResult], atol: float, rtol: float) -> None:
    """Raise ParityError naming each failing case and tensor, if any case failed."""
    failed = [r for r in results if not r.passed]
    if not failed:
        return
    parts = [describe_failure(r) for r in failed]
    raise ParityError(
        f"parity gate failed: {len(failed)} of {len(results)} cases differ from eager PyTorch "
        f"beyond atol={atol:g}, rtol={rtol:g}: " + " ".join(parts)
        + f"; nothing was written. {_advice(results, failed)}",
        failures=failed,
    )


def _advice(results: list[CaseResult], failed: list[CaseResult]) -> str:
    """What the pattern of failures most likely means, and what to do about it."""
    full = [r for r in results if r.name.startswith("full")]
    if full and all(r.passed for r in full) and all(r.name.startswith("stream") for r in failed):
        return ("Whole sequences match but chunked streaming does not: the model looks at "
                "the whole sequence (e.g. mean pooling, a bidirectional layer), so it cannot "
                "stream; export it with mode='sequence' (--mode sequence)")
    lengths = {r.name.split("T=")[-1].split()[0] for r in full if r.passed}
    if full and lengths and any(not r.passed for r in full):
        return ("The graph matches at some lengths only (T=" + ",".join(sorted(lengths))
                + "): something was traced at a fixed length, typically a Python loop over "
                "time in forward(), which tracing unrolls; write the per-step cell as a "
                "step-protocol module forward(x, state) -> (y, state) and let the runtime loop")
    return ("If the differences are tiny, loosen atol/rtol (--atol/--rtol); otherwise "
            "report the model with this message")
