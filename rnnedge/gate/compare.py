"""Per-tensor comparison of a graph's outputs and states with eager PyTorch's.

With the float64 referee (``gate.referee``) a tensor passes when the graph is within
(atol, rtol) of float32 eager, or at least about as close to the float64 run as float32
eager is: |graph - ref64| <= atol + rtol * |ref64| + max|eager32 - ref64| (per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rnnedge.contract import ExportSpec

INF = float("inf")


@dataclass(frozen=True)
class TensorResult:
    """One output or state in one case.

    name: the graph's name for it (states by their graph *output*, e.g. ``hn``: what the
    caller reads back). role: "output" or "state". max_abs: max |graph - eager|; max_rel:
    max |graph - eager| / max(|eager|, 1e-6). drift: rms(graph - eager) / rms(eager),
    where the policy judges this case by drift (None elsewhere). passed: by the policy.
    ref_max_abs, eager_max_abs: where the float64 referee ran, max |graph - ref64| and
    max |eager32 - ref64| (None elsewhere).
    """

    name: str
    role: str
    max_abs: float
    max_rel: float
    passed: bool
    drift: float | None = None
    ref_max_abs: float | None = None
    eager_max_abs: float | None = None


def errors(got, want) -> tuple[float, float]:
    """(max_abs, max_rel) of ``got`` against ``want``; inf for a shape mismatch or a
    non-finite difference."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return INF, INF
    if got.size == 0:
        return 0.0, 0.0
    diff = np.abs(got - want)
    if not np.all(np.isfinite(diff)):
        return INF, INF
    # Relative to |eager|, floored at 1e-6: an exact zero in eager would otherwise turn
    # float32 rounding into relative figures of 1e30 in reports.
    rel = diff / np.maximum(np.abs(want), 1e-6)
    return float(diff.max()), float(rel.max())


def within(got, want, atol: float, rtol: float) -> bool:
    """Whether every element has |got - want| <= atol + rtol * |want| (shapes equal)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return False
    return bool(np.all(np.abs(got - want) <= atol + rtol * np.abs(want)))


def nrmse(got, want) -> float:
    """rms(got - want) / rms(want) (rms(want) floored at 1e-6); inf for a shape mismatch
    or a non-finite value."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return INF
    if want.size == 0:
        return 0.0
    scale = max(float(np.sqrt(np.mean(want**2))), 1e-6)
    return float(np.sqrt(np.mean((got - want) ** 2))) / scale


def max_abs(got, want) -> float | None:
    """max |got - want|; None for a shape mismatch or a non-finite value (no figure)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return None
    if got.size == 0:
        return 0.0
    diff = np.abs(got - want)
    return float(diff.max()) if np.all(np.isfinite(diff)) else None


def compare_case(spec: ExportSpec, run, atol: float, rtol: float,
                 drift_limit: float | None = None) -> tuple[TensorResult, ...]:
    """Every output and state of one case, judged element-wise by (atol, rtol) (against
    float32 eager, or the float64 referee where it ran: see above), or, with
    ``drift_limit``, by rms drift <= drift_limit.

    run: the case's ``cases.CaseRun``. A tensor the graph did not give is a miss with
    infinite figures.
    """
    ref_outs = run.ref_outs or {}
    ref_states = run.ref_states or {}
    pairs = [(k, "output", run.got_outs.get(k), run.want_outs[k], ref_outs.get(k))
             for k in run.want_outs]
    pairs += [(s.output, "state", run.got_states.get(s.input), run.want_states[s.input],
               ref_states.get(s.input)) for s in spec.states]
    results = []
    for name, role, got, want, ref in pairs:
        if got is None:
            drift = None if drift_limit is None else INF
            results.append(TensorResult(name, role, INF, INF, False, drift))
            continue
        a, r = errors(got, want)
        if drift_limit is not None:
            drift = nrmse(got, want)
            results.append(TensorResult(name, role, a, r, drift <= drift_limit, drift))
            continue
        passed = a < INF and within(got, want, atol, rtol)
        eager_abs = None if ref is None else max_abs(want, ref)
        ref_abs = None if eager_abs is None else max_abs(got, ref)
        if ref_abs is not None:
            passed = passed or within(got, ref, atol + eager_abs, rtol)
        else:
            eager_abs = None
        results.append(TensorResult(name, role, a, r, passed, None, ref_abs, eager_abs))
    return tuple(results)
