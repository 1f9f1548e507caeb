"""Parity tolerances: per dtype (atol, rtol), each overridable by the caller."""

from __future__ import annotations

from rnnedge.errors import UsageError
from rnnedge.limits import check_tolerance

#: Parity tolerances per dtype: (atol, rtol). A miss of |a-b| <= atol + rtol*|b| fails.
TOLERANCES: dict[str, tuple[float, float]] = {
    "float32": (1e-5, 1e-4),
    "float16": (1e-2, 1e-2),
    # int8 weights, per-call uint8 activations (precision="int8"). Used by the int8 gate's
    # teacher-forced steps (gate/policy.py): a working graph's step is off by <= 0.02, trained
    # models included; a swapped gate pair, a dropped bias or an ignored incoming state
    # misses by 0.2 and more (tests/test_precision.py breaks graphs on purpose).
    "int8": (5e-2, 5e-2),
}


def tolerance(dtype: str, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """The (atol, rtol) for ``dtype``, each overridable by the caller."""
    if dtype not in TOLERANCES:
        raise UsageError(
            f"no parity tolerance for dtype {dtype}: expected one of {sorted(TOLERANCES)}; "
            "export a float32 model"
        )
    base_atol, base_rtol = TOLERANCES[dtype]
    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None:  # inf would pass any graph, NaN none: both refused
            check_tolerance(label, value)
    return (base_atol if atol is None else float(atol), base_rtol if rtol is None else float(rtol))
