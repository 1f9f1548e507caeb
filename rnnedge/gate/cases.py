"""The gate's cases as data, and how one case is run through the graph and eager PyTorch.

Time-axis graphs (``lengths.LengthRange``: 1..2000 steps for sequence graphs, 1..1000
for stream graphs by default): whole sequences at batch 1 and 3 over the short lengths
(1, 7, 10, 53: not multiples of each other), one long case at batch 1 (sequence mode:
the whole sequence at the longest length; stream mode: that many steps streamed in
uneven chunks of a few dozen, and with an explicit max_length also one call of it); in
stream mode the short sequence streamed in 1-step and uneven chunks with the state
carried, compared with eager over the whole sequence. Streamed outputs with a time axis
are joined along it; an output without one (a summary of the sequence so far, such as a
classifier's reading of the last step) is compared as the last chunk gives it. Step
graphs (no time axis) are stepped next to eager at batch 1 and 3, over 10 to 200 steps,
from zero and random states. Teacher-forced cases (added by a reduced-precision policy)
start every step from eager's state.

Isolation: eager, the graph and the float64 referee each get their own copies of every
input and state (models update them in place: ``acc += h``, ``x.mul_(0.5)``), and what
each returns is copied before anyone else sees it (``runner.isolated``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rnnedge.contract import ExportSpec
from rnnedge.gate.lengths import LONG_CHUNKS, SHORT_CHUNKS, LengthRange
from rnnedge.gate.plan import Plan

BATCHES = (1, 3)
#: Step graphs: (batch, steps, random initial state).
STEP_CASES = ((1, 10, False), (3, 10, True), (1, 53, True), (3, 53, False), (1, 200, True))
SEED = 20261127

#: The kinds of case; "steps" and "teacher-forced" count single steps (N), the others time steps (T).
KINDS = ("full", "lengths", "stream", "steps", "teacher-forced")

# A graph call: (data inputs, states by input name) -> (outputs by name, states after).
GraphCall = Callable[[dict, dict], tuple[dict, dict]]


@dataclass(frozen=True)
class Case:
    """One gate case.

    kind: one of KINDS. batch, length: the batch size and the number of time steps (or
    of single steps for "steps"/"teacher-forced"). random_state: start from a random
    non-zero state instead of zeros. chunks: the chunk sizes a "stream" case feeds,
    repeated until the sequence is used up. lengths: "random" for per-row lengths drawn
    at random (else every row is full length). least: the fewest time steps one call (a
    chunk, a row's valid length) may have: the gate's min_length.
    """

    kind: str
    batch: int
    length: int
    random_state: bool = False
    chunks: tuple[int, ...] | None = None
    lengths: str | None = None
    least: int = 1

    @property
    def name(self) -> str:
        """For display only (progress, reports, messages); decisions go by the fields."""
        if self.kind in ("steps", "teacher-forced"):
            return f"{self.kind} B={self.batch} N={self.length}"
        name = f"{self.kind} B={self.batch} T={self.length}"
        if self.chunks is not None:
            name += " chunks=" + ",".join(map(str, self.chunks))
        return name


def gate_cases(plan: Plan, teacher_forced: tuple = (), span: LengthRange | None = None) -> tuple[Case, ...]:
    """Every case the gate runs for ``plan``, in order; ``teacher_forced``: (batch, steps)
    pairs a policy adds after the others; ``span``: the lengths (default: the mode's)."""
    spec = plan.spec
    span = span or LengthRange.for_mode(spec.mode, None, None)
    low = span.low
    cases: list[Case] = []
    if spec.time_axis is None:
        cases += [Case("steps", b, n, r) for b, n, r in STEP_CASES]
    else:
        cases += [Case("full", b, t, b > 1, least=low) for b in BATCHES for t in span.short]
        long_full = spec.mode == "sequence" or span.explicit
        if long_full and span.high not in span.short:
            cases.append(Case("full", 1, span.high, least=low))
        if plan.lengths_input:
            cases += [Case("lengths", 3, t, True, lengths="random", least=low)
                      for t in sorted({span.clip(low + 6), span.short_stream})]
        if spec.mode == "stream":
            cases += [Case("stream", b, span.short_stream, b > 1, span.chunks(c), least=low)
                      for b in BATCHES for c in SHORT_CHUNKS]
            if span.high > span.short_stream:
                cases.append(Case("stream", 1, span.high, False, span.chunks(LONG_CHUNKS), least=low))
    cases += [Case("teacher-forced", b, n, b > 1, least=low) for b, n in teacher_forced]
    return tuple(cases)


def initial_states(spec: ExportSpec, rng, batch: int, random: bool) -> dict:
    """States by input name, each in its contract shape with ``batch`` at its batch axis."""
    states = {}
    for s in spec.states:
        arr = rng.standard_normal(s.shape_for(batch)).astype(s.dtype) * 0.5 if random else s.zeros(batch)
        states[s.input] = arr
    return states


def chunk_spans(total: int, pattern, least: int = 1) -> list[tuple[int, int]]:
    """[(start, stop)] cutting ``total`` steps by ``pattern``'s sizes, repeated; a last
    piece shorter than ``least`` joins the one before it."""
    spans, start, k = [], 0, 0
    while start < total:
        size = min(pattern[k % len(pattern)], total - start)
        spans.append((start, start + size))
        start += size
        k += 1
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < least:
        spans[-2:] = [(spans[-2][0], total)]
    return spans


def slice_time(arrays: dict, axis: int, start: int, stop: int, spec: ExportSpec) -> dict:
    """``arrays`` with each timed data input cut to steps [start, stop) along ``axis``."""
    timed = {t.name for t in spec.inputs if "time" in t.shape}
    return {
        k: (np.ascontiguousarray(np.take(v, range(start, stop), axis=axis)) if k in timed else v)
        for k, v in arrays.items()
    }


def _stack(seq: list[dict]) -> dict:
    return {k: np.stack([d[k] for d in seq]) for k in seq[0]} if seq else {}


@dataclass(frozen=True)
class CaseRun:
    """What one case gave: the graph's and eager's outputs (by name) and states (by input
    name), and, where the float64 referee ran, its outputs and states (else None)."""

    got_outs: dict
    got_states: dict
    want_outs: dict
    want_states: dict
    ref_outs: dict | None = None
    ref_states: dict | None = None


def _eager_sequence(reference, inputs: list[dict], states: dict) -> tuple[dict, dict]:
    """A step graph's eager run: each step from the previous one's state, outputs stacked."""
    seq = []
    for x in inputs:
        out, states = reference(x, states)
        seq.append(out)
    return _stack(seq), states


def case_arrays(plan: Plan, graph: GraphCall, eager, rng, case: Case, referee=None) -> CaseRun:
    """Run ``case`` through the graph, eager PyTorch and (when given) the float64 referee.

    graph, eager: (inputs, states) -> (outputs, states), isolated (``runner.isolated``).
    referee: None, or a function of one argument ``run``: it calls ``run(reference64)``
    with the model in float64 and returns what ``run`` returns, or None when the model
    cannot run in float64. Step and teacher-forced cases stack each output over steps
    (steps, *shape); teacher-forced cases stack each state after every step too, since
    each step is judged on its own. Streamed outputs are joined over chunks along their
    time axis; other states are the state after the case.
    """
    spec = plan.spec
    states0 = initial_states(spec, rng, case.batch, case.random_state)
    if case.kind == "teacher-forced":
        return _teacher_forced(plan, graph, eager, rng, case, states0)
    if case.kind == "steps":
        inputs = [plan.sample(rng, case.batch, None) for _ in range(case.length)]
        want_outs, want_states = _eager_sequence(eager, inputs, states0)
        got_outs, got_states = _eager_sequence(graph, inputs, states0)
        ref = referee(lambda ref64: _eager_sequence(ref64, inputs, states0)) if referee else None
        return CaseRun(got_outs, got_states, want_outs, want_states, *(ref or (None, None)))
    inputs = plan.sample(rng, case.batch, case.length)
    if plan.lengths_input:
        row_lengths = np.full(case.batch, case.length, dtype=np.int64)
        if case.lengths == "random":
            row_lengths = rng.integers(min(case.least, case.length), case.length + 1,
                                       size=case.batch).astype(np.int64)
            row_lengths[0] = case.length  # PyTorch pads to the longest row
        inputs[plan.lengths_input] = row_lengths
    want_outs, want_states = eager(inputs, states0)
    ref = referee(lambda ref64: ref64(inputs, states0)) if referee else None
    ref_outs, ref_states = ref or (None, None)
    if case.chunks is None:
        got_outs, got_states = graph(inputs, states0)
        return CaseRun(got_outs, got_states, want_outs, want_states, ref_outs, ref_states)
    got_states, pieces = states0, []
    for start, stop in chunk_spans(case.length, case.chunks, case.least):
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
    return CaseRun(got_outs, got_states, want_outs, want_states, ref_outs, ref_states)


def _teacher_forced(plan: Plan, graph: GraphCall, eager, rng, case: Case, states: dict) -> CaseRun:
    """Each step from eager's state, so that its error is one step's error alone."""
    spec = plan.spec
    inputs = plan.sample(rng, case.batch, case.length) if spec.time_axis is not None else None
    got_seq, got_st, want_seq, want_st = [], [], [], []
    for t in range(case.length):
        if inputs is None:
            x = plan.sample(rng, case.batch, None)
        else:
            x = slice_time(inputs, spec.time_axis, t, t + 1, spec)
            if plan.lengths_input:
                x[plan.lengths_input] = np.ones(case.batch, dtype=np.int64)
        want, want_states = eager(x, states)
        got, got_states = graph(x, states)
        got_seq.append(got)
        got_st.append(got_states)
        want_seq.append(want)
        want_st.append(want_states)
        states = want_states  # teacher forcing: the next step starts from eager's state
    return CaseRun(_stack(got_seq), _stack(got_st), _stack(want_seq), _stack(want_st))
