"""Over which lengths the gate proves a graph: the ``LengthRange`` and its case grid.

Defaults reach the lengths users run: a sequence graph is run whole at up to
``DEFAULT_MAX["sequence"]`` steps, a stream graph streamed for ``DEFAULT_MAX["stream"]``
steps in uneven chunks of a few dozen, next to the short lengths 1, 7, 10, 53 (none a
multiple of another, nor of a typical example's length). ``min_length`` shifts every
length and chunk to at least ``min_length`` (min, min+6, min+9, min+52, ..., max) for
models that need a minimum input; ``max_length`` sets the longest. Importing this module
does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from rnnedge.errors import UsageError

#: The longest run the gate makes by default, per mode (one long case per mode, batch 1).
DEFAULT_MAX = {"sequence": 2000, "stream": 1000}
#: The short lengths' offsets from min_length: 1, 7, 10, 53 by default.
SHORT_OFFSETS = (0, 6, 9, 52)
#: Chunk sizes (minus 1, plus min_length) of the short streamed cases: 1-step and uneven.
SHORT_CHUNKS = ((1,), (5, 1, 12, 3, 7))
#: Chunk sizes (same rule) of the long streamed run: uneven, a few dozen steps each.
LONG_CHUNKS = (37, 23, 41, 29, 50, 31, 44)
#: The most steps a gate case may take: beyond, the arrays alone run to gigabytes.
MAX_LENGTH_LIMIT = 1_000_000


def check_length(label: str, value) -> int | None:
    """``value`` as a positive int (None stays None); UsageError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{label} must be a whole number of time steps, got {value!r}")
    if not 1 <= value <= MAX_LENGTH_LIMIT:
        raise UsageError(f"{label} must be between 1 and {MAX_LENGTH_LIMIT} time steps, got {value}")
    return value


def check_length_range(min_length, max_length) -> tuple[int | None, int | None]:
    """(min_length, max_length) checked: positive ints or None, min <= max (UsageError)."""
    low = check_length("min_length (--min-length)", min_length)
    high = check_length("max_length (--max-length)", max_length)
    if low is not None and high is not None and low > high:
        raise UsageError(f"min_length {low} is above max_length {high}: the gate would have no "
                         "length to try; give min_length <= max_length")
    return low, high


@dataclass(frozen=True)
class LengthRange:
    """The gate's time-step range for one graph: every call is ``low``..``high`` steps long.
    explicit: whether ``high`` was given (max_length) rather than defaulted."""

    low: int
    high: int
    explicit: bool = False

    @classmethod
    def for_mode(cls, mode: str, min_length: int | None, max_length: int | None) -> LengthRange:
        low = min_length or 1
        if max_length is not None:
            return cls(low, max_length, True)
        return cls(low, max(DEFAULT_MAX.get(mode, DEFAULT_MAX["sequence"]), 3 * low))

    def clip(self, n: int) -> int:
        return min(max(n, self.low), self.high)

    @property
    def short(self) -> tuple[int, ...]:
        """The short lengths: low, low+6, low+9, low+52, those within range."""
        return tuple(sorted({self.clip(self.low + k) for k in SHORT_OFFSETS}))

    @property
    def short_stream(self) -> int:
        """The total length of the short streamed cases (53 by default)."""
        return self.clip(self.low + SHORT_OFFSETS[-1])

    def chunks(self, pattern: tuple[int, ...]) -> tuple[int, ...]:
        """``pattern`` shifted so its smallest chunk is ``low``, each within range."""
        return tuple(self.clip(c - 1 + self.low) for c in pattern)
