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

from rnnedge.contract import FLUSH_STATE, ExportSpec
from rnnedge.gate.lengths import LONG_CHUNKS, SHORT_CHUNKS, LengthRange
from rnnedge.gate.plan import Plan
from rnnedge.runtime import remainder

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
            # Strided ops along time (conv caches) take multiples of their total stride.
            m = spec.chunk_multiple
            short, high = span.short_stream, span.high
            if on_grid(spec):  # several calls after a first one on the grid, then a flush
                first = remainder.first_length(m, spec.chunk_offset, spec.latency)
                short, high = max(short, first + 3 * m), max(high, first + 8 * m)
            cases += [Case("stream", b, short, b > 1,
                           tuple(k * m for k in span.chunks(c)), least=low)
                      for b in BATCHES for c in SHORT_CHUNKS]
            if high > short:
                cases.append(Case("stream", 1, high, False,
                                  tuple(k * m for k in span.chunks(LONG_CHUNKS)), least=low))
    cases += [Case("teacher-forced", b, n, b > 1, least=low) for b, n in teacher_forced]
    return tuple(cases)


def initial_states(spec: ExportSpec, rng, batch: int, random: bool) -> dict:
    """States by input name, each in its contract shape with ``batch`` at its batch axis."""
    states = {}
    for s in spec.states:
        arr = rng.standard_normal(s.shape_for(batch)).astype(s.dtype) * 0.5 if random else s.zeros(batch)
        states[s.input] = arr
    for name in states:
        # The flush state marks a stream's last call; look-ahead ops' and delay lines' frame
        # counters (``.seen0``) agree only from a stream's start: neither is drawn at random.
        if name == FLUSH_STATE or name.endswith(".seen0"):
            states[name] = np.zeros_like(states[name])
    return states


def flush_inputs(spec: ExportSpec, arrays: dict, steps: int | None = None) -> dict:
    """``arrays`` (a stream's last frames, maybe none) with ``steps`` (default
    ``spec.latency``) zero steps appended along each timed data input's own axis: the
    inputs of a flush call."""
    axes = {t.name: t.time_axis for t in spec.inputs if t.time_axis is not None}
    out = {}
    for k, v in arrays.items():
        if k in axes:
            width = [(0, 0)] * v.ndim
            width[axes[k]] = (0, spec.latency if steps is None else steps)
            v = np.pad(v, width)
        out[k] = v
    return out


def flush_state(spec: ExportSpec, states: dict, past: int | None = None) -> dict:
    """``states`` with the flush state set to the zero steps of a flush call past the
    model's end (default ``spec.latency``, rounded up to ``chunk_multiple``)."""
    past = remainder.past_end(spec.latency, spec.chunk_multiple) if past is None else past
    return {**states, FLUSH_STATE: np.full_like(states[FLUSH_STATE], past)}


def on_grid(spec: ExportSpec) -> bool:
    """Whether a stream graph is both strided and late: its calls follow the runtime's grid."""
    return spec.chunk_multiple > 1 and bool(spec.latency or spec.chunk_offset)


def grid_spans(spans: list, total: int, spec: ExportSpec) -> tuple[list, tuple, tuple]:
    """(the spans fed as ordinary calls, the span fed with the flush call, (the zero steps
    appended to it, its flush state)) for a graph ``on_grid``, cut from the chunks
    ``spans`` as ``Stream.step``/``flush`` cut them: a first call of T1 = chunk_offset (mod
    chunk_multiple) steps, T1 > latency, then multiples, the rest padded to the grid."""
    m, a, latency = spec.chunk_multiple, spec.chunk_offset, spec.latency
    calls, start, started = [], 0, False
    for _, stop in spans:
        avail = stop - start
        if not started:
            if avail < remainder.first_length(m, a, latency):
                continue
            n, started = avail - (avail - a) % m, True
        else:
            n = avail - avail % m
        if n:
            calls.append((start, start + n))
            start += n
    return calls, (start, total), remainder.flush_call(total, total - start, started, m, a,
                                                       latency, spec.model_end)


def latency_spans(spans: list, latency: int) -> tuple[list, tuple | None]:
    """(the spans fed as ordinary calls, the span fed with the flush call or None) for a
    graph with ``latency``: its first call must have more than ``latency`` steps (every op
    then emits a frame), so the leading spans are joined; a stream of no more than
    ``latency`` steps is one flush call."""
    while len(spans) > 1 and spans[0][1] - spans[0][0] <= latency:
        spans[:2] = [(spans[0][0], spans[1][1])]
    if spans and spans[0][1] - spans[0][0] <= latency:
        return [], spans[0]
    return spans, None


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


def slice_time(arrays: dict, start: int, stop: int, spec: ExportSpec) -> dict:
    """``arrays`` with each timed data input cut to steps [start, stop) along its own time
    axis (``TensorSpec.time_axis``: a (batch, 1, time, F) input along 2, a (batch, time)
    one along 1)."""
    axes = {t.name: t.time_axis for t in spec.inputs if t.time_axis is not None}
    return {
        k: (np.ascontiguousarray(np.take(v, range(start, stop), axis=axes[k])) if k in axes else v)
        for k, v in arrays.items()
    }


def hold_constants(spec: ExportSpec, steps: list[dict]) -> list[dict]:
    """``steps`` with every input the contract marks constant held at its first step's
    value: a constant (e.g. an attention memory) is fed once per stream."""
    names = [t.name for t in spec.inputs if t.constant]
    if not names or not steps:
        return steps
    return [{**x, **{n: steps[0][n] for n in names}} for x in steps]


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
        inputs = hold_constants(spec, [plan.sample(rng, case.batch, None) for _ in range(case.length)])
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
    if case.chunks is None and not spec.latency:
        got_outs, got_states = graph(inputs, states0)
        return CaseRun(got_outs, got_states, want_outs, want_states, ref_outs, ref_states)
    got_states, pieces = states0, []
    spans, last = chunk_spans(case.length, case.chunks or (case.length,), case.least), None
    pad = past = None
    if on_grid(spec):  # as the runtime feeds it: a first call off the grid, then multiples
        spans, last, (pad, past) = grid_spans(spans, case.length, spec)
    elif spec.latency:  # eager is the whole stream: the graph's ends with a flush call
        spans, last = latency_spans(spans, spec.latency)
        last = last or (case.length, case.length)
    for start, stop in spans:
        piece, got_states = graph(slice_time(inputs, start, stop, spec), got_states)
        pieces.append(piece)
    if last is not None:
        piece, got_states = graph(flush_inputs(spec, slice_time(inputs, *last, spec), pad),
                                  flush_state(spec, got_states, past))
        pieces.append(piece)
    got_outs = {}
    for t in spec.outputs:
        if t.time_axis is not None:  # each output along its own time axis
            got_outs[t.name] = np.concatenate([p[t.name] for p in pieces], axis=t.time_axis)
            if pad is not None or t.end_offset is not None:  # frames past the model's end
                got_outs[t.name] = remainder.cut_due([got_outs[t.name]], [t.time_axis],
                                                     [t.time_ratio], [0], case.length,
                                                     [t.end_offset])[0]
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
    first = None
    for t in range(case.length):
        if inputs is None:
            x = plan.sample(rng, case.batch, None)
            first = first or x
            x = hold_constants(spec, [first, x])[1]
        else:
            x = slice_time(inputs, t, t + 1, spec)
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
