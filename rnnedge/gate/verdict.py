"""What a gate result says: the metadata summary, the per-tensor worst figures, and the
ParityError (with advice read from the kinds of the cases that failed)."""

from __future__ import annotations

from dataclasses import dataclass

from rnnedge.errors import ParityError
from rnnedge.gate.compare import INF
from rnnedge.gate.runner import CaseResult, GateResult


def summarize(result: GateResult, device: str = "cpu") -> dict:
    """The metadata ``parity`` entry: worst figures (against float32 eager) and the case
    count; ``referee`` ("float64" or "float32") and, with the float64 referee, its worst
    figures (``ref_max_abs``: graph vs float64; ``eager_max_abs``: float32 eager vs
    float64); the lengths tried (``min_length``/``max_length``, graphs with a time axis);
    ``nan_propagates``; a reduced-precision policy adds what the graph was proven as and
    where (``device``)."""
    summary = {"max_abs": result.max_abs, "max_rel": result.max_rel, "cases": len(result.cases),
               "referee": result.referee}
    if result.referee == "float64":  # over the cases that ran: one that raised has no figures
        ran = [c for c in result.cases if c.error is None]
        summary["ref_max_abs"] = max(c.ref_max_abs for c in ran)
        summary["eager_max_abs"] = max(c.eager_max_abs for c in ran)
    if result.span is not None:
        summary.update(min_length=result.span.low, max_length=result.span.high)
    summary["nan_propagates"] = result.nan_propagates
    policy = result.policy
    if policy.drift_limit is not None:
        summary.update(precision=policy.precision, device=device, atol=policy.atol,
                       rtol=policy.rtol, drift=result.drift, drift_limit=policy.drift_limit)
    return summary


@dataclass(frozen=True)
class TensorSummary:
    """One output or state over every case: its worst figures, the case where its worst
    abs error happened ("" when bit-exact everywhere), and whether it passed every case.
    drift: its worst drift over the drift-judged cases (None when none is)."""

    name: str
    role: str
    max_abs: float
    max_rel: float
    worst_case: str
    passed: bool
    drift: float | None = None


def per_tensor(result: GateResult) -> list[TensorSummary]:
    """Each output and state's worst figures over all cases, in contract order."""
    rows = {name: {"role": role, "max_abs": 0.0, "max_rel": 0.0, "worst_case": "",
                   "passed": True, "drift": None} for name, role in result.tensors}
    for case in result.cases:
        if case.error:  # the graph did not run: every tensor failed there
            for row in rows.values():
                row.update(max_abs=INF, max_rel=INF, worst_case=case.name, passed=False)
            continue
        for t in case.tensors:
            row = rows.get(t.name)
            if row is None:
                continue
            if t.max_abs > row["max_abs"]:
                row["worst_case"] = case.name
            row["max_abs"] = max(row["max_abs"], t.max_abs)
            row["max_rel"] = max(row["max_rel"], t.max_rel)
            if t.drift is not None:
                row["drift"] = max(row["drift"] or 0.0, t.drift)
            row["passed"] = row["passed"] and t.passed
    return [TensorSummary(name, **row) for name, row in rows.items()]


def describe_failure(r: CaseResult, by_drift: bool = False) -> str:
    """'[case: tensor figures, ...]' for one failed case: its missing tensors' max abs and
    rel errors, or (``by_drift``) their drift."""
    if r.error:
        return f"[{r.name}: {r.error}]"
    if by_drift:
        parts = [f"{t.name} drift={t.drift:.3g} (max_abs={t.max_abs:.3g})" for t in r.misses]
    else:
        parts = [f"{t.name} max_abs={t.max_abs:.3g} max_rel={t.max_rel:.3g}" for t in r.misses]
    return f"[{r.name}: " + ", ".join(parts) + "]"


def model_failure(result: GateResult) -> str:
    """One line for a result where eager PyTorch raised in some case: the model's error,
    not the graph's, and what to give so it runs ("" when eager never raised)."""
    raised = [r for r in result.failed if r.culprit == "model"]
    if not raised:
        return ""
    first = raised[0]
    return (f"parity gate could not run the model itself: in {len(raised)} of "
            f"{len(result.cases)} cases eager PyTorch raised, first in '{first.name}': "
            f"{first.error}; this is the model's error, not the graph's: make forward() take "
            "every batch size and length it will be called with, or give the range of lengths "
            "it takes (min_length/max_length, --min-length/--max-length)")


def tensor_failure(result: GateResult, tensors: list[TensorSummary] | None = None) -> str:
    """One line for a missed result, by tensor: 'parity failed: N of M cases differ beyond
    atol, rtol[, drift]: each failing tensor's worst figures and the case they were in',
    then the first case the graph could not run, with its error ("" when passed).
    tensors: ``per_tensor(result)``, when the caller has it already."""
    failed = result.failed
    if not failed:
        return ""
    policy = result.policy
    worst = [t for t in (per_tensor(result) if tensors is None else tensors) if not t.passed]
    parts = [f"{t.name} max abs {t.max_abs:.3g} max rel {t.max_rel:.3g}"
             + ("" if t.drift is None else f" drift {t.drift:.3g}")
             + f" (worst in '{t.worst_case}')" for t in worst]
    broken = [c for c in failed if c.error]
    if broken:
        parts.append(f"in '{broken[0].name}': {broken[0].error}")
    bound = "" if policy.drift_limit is None else f", drift <= {policy.drift_limit:g}"
    return (f"parity failed: {len(failed)} of {len(result.cases)} cases differ beyond "
            f"atol={policy.atol:g}, rtol={policy.rtol:g}{bound}: " + "; ".join(parts))


def raise_on_failure(result: GateResult) -> None:
    """Raise ParityError naming each failing case and tensor, if any case failed."""
    failed = result.failed
    if not failed:
        return
    policy = result.policy
    n, total = len(failed), len(result.cases)
    raised = model_failure(result)
    if raised:
        message = raised + "; nothing was written"
    elif policy.drift_limit is None:
        parts = " ".join(describe_failure(r) for r in failed)
        message = (f"parity gate failed: {n} of {total} cases differ from eager PyTorch beyond "
                   f"atol={policy.atol:g}, rtol={policy.rtol:g}: {parts}; nothing was written. "
                   + _advice(result, failed))
    else:
        parts = " ".join(describe_failure(r, policy.drift_limit_for(r.case) is not None)
                         for r in failed)
        message = (f"{policy.precision} parity gate failed: {n} of {total} cases differ from "
                   f"eager PyTorch (teacher-forced steps: atol={policy.atol:g}, "
                   f"rtol={policy.rtol:g}; whole sequences: drift <= {policy.drift_limit:g}): "
                   f"{parts}; nothing was written. " + _reduced_advice(result))
    raise ParityError(message, failures=failed)


def _small(result: GateResult, failed: list[CaseResult]) -> bool:
    """Whether every miss is within 10x the tolerance (by its abs or its rel figure)."""
    policy = result.policy
    misses = [t for r in failed for t in r.misses]
    return bool(misses) and not any(r.error for r in failed) and all(
        t.max_abs < 10 * policy.atol or t.max_rel < 10 * policy.rtol for t in misses)


def _advice(result: GateResult, failed: list[CaseResult]) -> str:
    """What the pattern of failures most likely means, and what to do about it."""
    results = result.cases
    full = [r for r in results if r.case.kind == "full"]
    timed = [r for r in results if r.case.kind in ("full", "stream", "lengths")]
    longest_short = max((r.case.length for r in full if r.case.batch > 1), default=None)
    if longest_short is not None and timed:
        short = [r for r in timed if r.case.length <= longest_short]
        long = [r for r in timed if r.case.length > longest_short]
        if short and long and all(r.passed for r in short) and all(not r.passed for r in long):
            bad = ",".join(sorted({str(r.case.length) for r in long}))
            return (f"The graph matches up to T={longest_short} but not at T={bad}: a length was "
                    "baked into the graph (a size computed in Python from the example's "
                    "length, e.g. padding to a 'valid length', or a bound torch.export put on the "
                    "time axis); compute sizes with tensor ops on x.shape, or give the longest "
                    "length you run as max_length (--max-length) to find the bound at export")
    if full and all(r.passed for r in full) and all(r.case.kind == "stream" for r in failed):
        return ("Whole sequences match but chunked streaming does not: the model depends on "
                "the whole sequence or on the position in it (global or cumulative "
                "normalisation, pooling, a bidirectional layer), so it cannot stream; export "
                "it with mode='sequence' (--mode sequence)")
    lengths = sorted({r.case.length for r in full if r.passed})
    if full and lengths and any(not r.passed for r in full):
        return ("The graph matches at some lengths only (T=" + ",".join(map(str, lengths))
                + "): something was traced at a fixed length, typically a Python loop over "
                "time in forward(), which tracing unrolls; write the per-step cell as a "
                "step-protocol module forward(x, state) -> (y, state) and let the runtime loop")
    if all(r.culprit == "graph" for r in failed):
        return ("The graph cannot run at the shapes named: a size was fixed in the graph; "
                "report the model with this message")
    if _small(result, failed):
        return ("The differences are tiny (within 10x the tolerance): loosen atol/rtol "
                "(--atol/--rtol) if that accuracy is enough for you")
    worst = max((t.max_abs for r in failed for t in r.misses), default=INF)
    return (f"The differences are large (worst max_abs {worst:.3g}, over 10x atol="
            f"{result.policy.atol:g}): the graph computes something else than the model; "
            "report the model with this message")


def _reduced_advice(result: GateResult) -> str:
    policy = result.policy
    steps_ok = all(r.passed for r in result.cases if r.case.kind == "teacher-forced")
    if steps_ok:
        return ("One step at a time the graph matches, but the error compounds over the "
                f"sequence: this model is sensitive to {policy.precision} rounding; check its "
                "task accuracy with rnnedge.precision.agreement, or export it in float32")
    return (f"Single steps already differ beyond atol={policy.atol:g}, rtol={policy.rtol:g}: "
            "if the differences are small, loosen atol/rtol (--atol/--rtol); if large, the "
            "converted graph is wrong: report the model with this message")
