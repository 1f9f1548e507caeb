"""Checking what a caller passes against the contract, with errors that say expected vs got.

These run only when a stream sees a new input shape or dtype; a step whose input looks
like the last one is checked by one shape-tuple and one dtype compare.
"""

from __future__ import annotations

import numpy as np

from rnnedge.errors import StepInputError
from rnnedge.runtime.contract import StateInfo, TensorInfo


def as_list(data: tuple, x, where: str) -> list:
    """The data inputs from ``x`` (an array for one input, else a dict by name), in order."""
    names = [t.name for t in data]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        extra = [k for k in x if k not in names]
        if missing or extra:
            parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise StepInputError(
                f"{where}: got inputs {list(x)} but the graph takes {names} ({'; '.join(parts)})")
        return [x[n] for n in names]
    if len(names) != 1:
        raise StepInputError(
            f"{where}: this graph takes {len(names)} data inputs {names}: pass a dict "
            f"{{name: array}}, got {type(x).__name__}")
    return [x]


def native(value: np.ndarray) -> np.ndarray:
    """``value`` in this machine's byte order: a big-endian float32 is still float32, so it is
    converted (onnxruntime reads native bytes), not refused as another dtype."""
    return value if value.dtype.isnative else value.astype(value.dtype.newbyteorder("="))


def check(t: TensorInfo, value, batch: int | None, where: str) -> np.ndarray:
    """``value`` as an ndarray after checking dtype, rank, batch and fixed sizes."""
    if not isinstance(value, np.ndarray):
        if value is None or isinstance(value, (dict, str, bytes)):
            raise StepInputError(f"{where}: input {t.name!r} must be a numpy array {t.describe(batch)}, "
                                 f"got {type(value).__name__}")
        value = np.asarray(value)
    value = native(value)
    expect = t.describe(batch)
    if value.dtype != t.dtype:
        raise StepInputError(
            f"{where}: input {t.name!r} must be {t.dtype.name}, got {value.dtype.name} "
            f"(convert it with .astype(np.{t.dtype.name}))")
    if value.ndim != len(t.shape):
        raise StepInputError(
            f"{where}: input {t.name!r} must have shape {expect} (rank {len(t.shape)}), got "
            f"{tuple(value.shape)} (rank {value.ndim})")
    for axis, (dim, got) in enumerate(zip(t.shape, value.shape)):
        if axis == t.batch_axis and batch is not None and got != batch:
            raise StepInputError(
                f"{where}: input {t.name!r} must have shape {expect}, got {tuple(value.shape)}: "
                f"axis {axis} is the batch, {got} rows, but this stream has batch {batch}")
        if isinstance(dim, int) and got != dim:
            raise StepInputError(
                f"{where}: input {t.name!r} must have shape {expect}, got {tuple(value.shape)}: "
                f"axis {axis} must be {dim}")
        if axis == t.time_axis and got < 1:
            raise StepInputError(
                f"{where}: input {t.name!r} has an empty time axis (axis {axis}): give at least one step")
    return value


def check_state(states: tuple, batch: int, values, where: str) -> dict:
    """{state input name: array} after checking names, shapes and dtypes exactly."""
    if not isinstance(values, dict):
        raise StepInputError(f"{where}: a state is a dict {{state input name: array}}, got {type(values).__name__}")
    by_name: dict[str, StateInfo] = {s.input: s for s in states}
    extra = [k for k in values if k not in by_name]
    if extra:
        raise StepInputError(f"{where}: unknown states {extra}; this graph's states are {list(by_name)}")
    out = {}
    for name, value in values.items():
        s = by_name[name]
        want = s.shape_for(batch)
        if isinstance(value, np.ndarray):
            value = native(value)
        if not isinstance(value, np.ndarray) or value.dtype != s.dtype or value.shape != want:
            got = (f"{value.dtype.name}{list(value.shape)}" if isinstance(value, np.ndarray)
                   else type(value).__name__)
            raise StepInputError(
                f"{where}: state {name!r} must be a {s.dtype} array of shape {list(want)}, got {got}")
        out[name] = value
    return out


def lengths_of(contract, data: tuple) -> tuple | None:
    """(index of ``lengths``, index of the timed input, its time axis) for a sequence-mode
    graph that takes per-row lengths, else None."""
    names = [t.name for t in data]
    timed = [i for i, t in enumerate(data) if t.time_axis is not None]
    if contract.mode == "sequence" and "lengths" in names and timed:
        return names.index("lengths"), timed[0], data[timed[0]].time_axis
    return None


def check_lengths(lengths, steps: int, where: str) -> None:
    """Per-row valid lengths (sequence mode) must lie in 1..steps, as PyTorch's packing wants.

    Checked on every call (values change from call to call); onnxruntime would otherwise
    fail inside the run with its own message, or accept 0 where PyTorch refuses it.
    """
    values = np.asarray(lengths)
    if values.size and (values.min() < 1 or values.max() > steps):
        raise StepInputError(
            f"{where}: 'lengths' must be between 1 and the input's {steps} time steps, got "
            f"{values.tolist()}")
