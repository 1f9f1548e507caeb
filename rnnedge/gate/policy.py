"""What counts as a pass, as data: one ``Policy`` per precision.

float32 graphs: every element of every output and state within (atol, rtol) of eager, in
every case.

Reduced precisions (int8, fp16). Quantization error compounds through a recurrence: over
the gate's 53 random steps a trained int8 LSTM/GRU drifts 0.1-0.2 (max abs) from eager, a
chaotic trained RNN 0.4, while a random tiny model stays within 0.015 — and a broken graph
(gates swapped, a bias dropped, a direction reversed) can miss by as little as 0.1. No
element-wise tolerance separates the two on the free-running cases, so the policy checks
two things:

- teacher-forced steps: every step starts from *eager's* state, so the error is one
  step's quantization error (<= 0.02 measured on trained models) and any wrong gate, bias
  or weight shows in full; compared element-wise with TOLERANCES[precision];
- the usual free-running cases (whole sequences, 1-step and uneven chunks, state
  carried): each output and state must stay within a normalized RMSE,
  rms(graph - eager) / rms(eager) <= DRIFT[precision]. Measured: working int8 graphs
  0.004-0.025 (LSTM/GRU), 0.12 (chaotic RNN); a reversed direction or swapped gates 0.43
  and up; float16 0.003 at most.
"""

from __future__ import annotations

from dataclasses import dataclass

from rnnedge.errors import UsageError
from rnnedge.gate.cases import Case
from rnnedge.gate.lengths import LengthRange, check_length_range
from rnnedge.gate.tolerance import tolerance

#: Normalized RMS drift bound of the free-running cases, per reduced precision.
DRIFT = {"int8": 0.25, "fp16": 0.05}
#: Teacher-forced cases a reduced-precision policy adds: (batch, steps).
TEACHER_FORCED = ((1, 53), (3, 53))
#: The TOLERANCES key each reduced precision's steps use (fp32 uses the graph's dtype).
TOLERANCE_KEYS = {"fp16": "float16", "int8": "int8"}
#: Every precision the gate has a policy for.
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Policy:
    """How the gate judges a graph.

    precision: "fp32", "int8" or "fp16". atol, rtol: the element-wise tolerances
    (|graph - eager| <= atol + rtol * |eager|). drift_limit: None to judge every case
    element-wise; else the free-running cases are judged by rms drift <= drift_limit and
    only the teacher-forced ones element-wise. teacher_forced: (batch, steps) cases added.
    min_length, max_length: the time-step range the cases cover (``gate.lengths``; None:
    the defaults, per mode).
    """

    precision: str
    atol: float
    rtol: float
    drift_limit: float | None = None
    teacher_forced: tuple[tuple[int, int], ...] = ()
    min_length: int | None = None
    max_length: int | None = None

    def span(self, mode: str) -> LengthRange:
        """The lengths the cases of a ``mode`` graph cover."""
        return LengthRange.for_mode(mode, self.min_length, self.max_length)

    def drift_limit_for(self, case: Case) -> float | None:
        """The drift bound that judges ``case``; None when it is judged element-wise."""
        return None if case.kind == "teacher-forced" else self.drift_limit


def policy_for(precision: str = "fp32", dtype: str = "float32", atol: float | None = None,
               rtol: float | None = None, *, min_length: int | None = None,
               max_length: int | None = None) -> Policy:
    """The policy for a ``precision`` graph whose outputs have ``dtype``; ``atol``/``rtol``
    override the tolerances (for reduced precisions: the teacher-forced steps');
    ``min_length``/``max_length`` set the lengths tried (UsageError when out of range)."""
    if precision not in PRECISIONS:
        raise UsageError(f"no parity policy for precision {precision!r}: expected one of "
                         f"{', '.join(PRECISIONS)}")
    atol, rtol = tolerance(TOLERANCE_KEYS.get(precision, dtype), atol, rtol)
    low, high = check_length_range(min_length, max_length)
    if precision == "fp32":
        return Policy("fp32", atol, rtol, min_length=low, max_length=high)
    return Policy(precision, atol, rtol, DRIFT[precision], TEACHER_FORCED, low, high)
