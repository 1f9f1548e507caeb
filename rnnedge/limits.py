"""Bounds on every size that comes from a user or a file, checked before anything is allocated.

A typo (``--hidden 100000``, a time axis of 10^11) must be a usage error (exit 2) at once,
not minutes of swapping and a MemoryError. The limits are far above what a recurrent model
on an edge device needs; each message says which limit was hit and what to do.
docs/safety.md lists them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from rnnedge.errors import UsageError

#: Elements in one tensor that rnnedge makes itself (an example input, a benchmark feed):
#: 2^28 float32 values are 1 GiB.
MAX_ELEMENTS = 2**28
#: One axis of one tensor (a fixed feature size, a batch, a chunk of time steps).
MAX_DIM = 2**24
#: Hidden size of the demo's recurrent layer (an LSTM of 16384 holds 4 GiB of weights).
MAX_HIDDEN = 16384
#: Seconds of training in the demo: a day.
MAX_SECONDS = 86_400.0
#: Time steps fed per benchmark measurement.
MAX_STEPS = 10_000_000


def check_count(what: str, value, limit: int, minimum: int = 1) -> int:
    """``value`` as an int in [minimum, limit], or UsageError naming ``what`` and the limit."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= limit:
        raise UsageError(f"{what} must be an integer from {minimum} to {limit:,}, got {value!r}; "
                         "give a smaller value")
    return value


def check_seconds(what: str, value, limit: float = MAX_SECONDS) -> float:
    """``value`` as a finite float in (0, limit], or UsageError (inf, NaN and 0 included)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= limit):
        raise UsageError(f"{what} must be a number of seconds > 0 and <= {limit:g}, got {value!r}")
    return seconds


def check_shape(what: str, shape: Iterable[int], limit: int = MAX_ELEMENTS,
                show_shape: bool = True) -> tuple[int, ...]:
    """``shape`` if each axis is <= MAX_DIM and all together hold <= ``limit`` elements."""
    shape = tuple(int(d) for d in shape)
    elements = math.prod(shape)
    if any(d > MAX_DIM for d in shape) or elements > limit:
        shown = f" of shape {shape}" if show_shape else ""
        raise UsageError(
            f"{what}{shown} would hold {elements:,} elements, over rnnedge's limit of "
            f"{limit:,} (axes at most {MAX_DIM:,}); give smaller sizes"
        )
    return shape


def check_tolerance(label: str, value) -> float:
    """A parity tolerance: a finite number >= 0 (inf would pass any graph, NaN none)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number >= 0):
        raise UsageError(f"{label} must be a finite number >= 0, got {value!r}")
    return number
