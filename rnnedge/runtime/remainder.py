"""The frames a stream holds back for graphs whose chunks are multiples of a stride.

A stream graph with strided ops along time (contract ``chunk_multiple`` m > 1) takes, on
every call but a stream's last, a multiple of m time steps. ``Stream.step`` accepts any
length: it feeds the largest multiple of m of (held frames + new frames) and holds the
rest (fewer than m steps per data input, along each input's own time axis) for the next
call; ``Stream.flush`` feeds what is held padded with zeros to m steps and returns the
outputs of the real frames only. Frames held are this stream's own state, next to the
graph's (``Stream.held``); ``reset`` drops them. numpy only.

Graphs with ``latency`` > 0 (look-ahead convolutions streamed late) drop the first
``latency`` frames of a stream inside; their first call must have more than ``latency``
steps (so that every op emits a frame), so a stream's first steps are held until there
are (``first``); their flush call takes what is held and ``latency`` zero steps
(``extended``).

Graphs with both (m > 1 and ``latency`` L > 0, or a ``chunk_offset`` a > 0) take a first
call of T1 steps, T1 = a (mod m) and T1 > L (``split`` with ``offset`` and ``least``;
the smallest is ``first_length``), then multiples of m. Their flush call takes what is
held zero-padded to that grid, then ``past_end`` zero steps; the stream's outputs are then
cut to ``frames_due`` frames in all.
"""

from __future__ import annotations

import math

import numpy as np


def _take(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


def joined(arrays: list, axes: list, held: list | None) -> list:
    """``arrays`` after the frames ``held`` (None: nothing held), along each time axis."""
    if held is None:
        return arrays
    return [a if ax is None else np.concatenate([h, a], axis=ax)
            for a, h, ax in zip(arrays, held, axes)]


def split(arrays: list, axes: list, held: list | None, multiple: int, offset: int = 0,
          least: int = 0) -> tuple[list | None, list]:
    """(the arrays to feed now, or None when there is no length to feed; the frames to hold).

    arrays: one per data input, checked; axes: each one's time axis (None: no time axis,
    fed as given); held: what the last call held, or None. The length fed is the largest
    one <= held + new steps that is ``offset`` modulo ``multiple``, if it is over ``least``
    (0, 0: the largest multiple of ``multiple``, if any).
    """
    arrays = joined(arrays, axes, held)
    total = next(a.shape[ax] for a, ax in zip(arrays, axes) if ax is not None)
    cut = total - (total - offset) % multiple
    if cut <= least:
        return None, [None if ax is None else a.copy() for a, ax in zip(arrays, axes)]
    keep = [None if ax is None else _take(a, ax, cut, total).copy() for a, ax in zip(arrays, axes)]
    return [a if ax is None else _take(a, ax, 0, cut) for a, ax in zip(arrays, axes)], keep


def first_length(multiple: int, offset: int, least: int) -> int:
    """The smallest first call: the least T > ``least`` with T = ``offset`` (mod ``multiple``)."""
    return least + 1 + (offset - least - 1) % multiple


def grid_length(steps: int, multiple: int, offset: int, latency: int) -> int:
    """``steps`` padded up to a stream's grid in one call: = ``offset`` (mod ``multiple``),
    at least the smallest first call."""
    return max(steps + (offset - steps) % multiple, first_length(multiple, offset, latency))


def past_end(latency: int, multiple: int) -> int:
    """The zero steps a flush call appends past a stream's end: ``latency`` rounded up to a
    multiple of ``multiple`` (so the call stays on the grid)."""
    return -(-latency // multiple) * multiple


def flush_steps(real: int, started: bool, multiple: int, offset: int, latency: int) -> int:
    """The zero steps a flush call appends to the ``real`` steps held: up to the grid (a
    multiple of ``multiple`` once the first call has run, else the smallest first call;
    none for ``multiple`` 1, as before), then ``past_end``."""
    if multiple == 1:
        grid = 0
    elif started:
        grid = -real % multiple
    else:  # the stream's only call: up to the smallest first call (as the model's end)
        grid = grid_length(real, multiple, offset, latency) - real
    return grid + past_end(latency, multiple)


def flush_call(real: int, held: int, started: bool, multiple: int, offset: int, latency: int,
               end: tuple | None) -> tuple[int, int]:
    """(zero steps to append to the ``held`` steps, the flush state) of a late graph's flush
    call, ``real`` steps fed in all. Without ``end`` (contract ``model_end``): up to the grid
    (``flush_steps``) and the flush state ``past_end``. With it: up to the model's own end L
    (the least L >= max(real, least) with L = residue (mod multiple)), then on to the
    grid (at least the smallest first call), then ``past_end``; the flush state counts the
    zero steps past L, which the graph's ops take as past the end."""
    f = past_end(latency, multiple)
    if end is None:
        return flush_steps(held, started, multiple, offset, latency), f
    residue, least = end
    length = max(real + (residue - real) % multiple, least)
    grid = grid_length(length, multiple, offset, latency)
    return grid - real + f, grid + f - length


def frames_due(steps: int, ratio, offset=None) -> int:
    """The frames an output of ``time_ratio`` ``ratio`` (int, or (num, den)) has for a
    whole input of ``steps`` steps: ceil(steps * ratio), or with the contract's
    ``end_offset`` (int, or (num, den)) floor(steps * ratio + end_offset)."""
    num, den = ratio if isinstance(ratio, tuple) else (ratio, 1)
    if offset is None:
        return -(-steps * num // den)
    onum, oden = offset if isinstance(offset, tuple) else (offset, 1)
    return (steps * num * oden + onum * den) // (den * oden)


def frames(value, axis: int) -> int:
    """The steps along ``axis`` of an output: a numpy array or (CUDA) an OrtValue."""
    shape = value.shape
    return (shape() if callable(shape) else shape)[axis]


def cut_due(values: list, axes: list, ratios: list, emitted: list, steps: int,
            offsets: list | None = None) -> list:
    """A flush call's outputs, each cut along its time axis (None: as is) so that with the
    ``emitted`` frames before it the stream's add up to at most ``frames_due(steps,
    ratio, offset)``; an output with fewer is kept as it is (never padded)."""
    out = []
    offsets = offsets or [None] * len(values)
    for value, axis, ratio, done, offset in zip(values, axes, ratios, emitted, offsets):
        keep = max(0, frames_due(steps, ratio, offset) - done)
        if axis is not None and value.shape[axis] > keep:
            value = _take(value, axis, 0, keep).copy()
        out.append(value)
    return out


def held_steps(held: list | None, axes: list) -> int:
    """How many time steps ``held`` holds (0 for None)."""
    if held is None:
        return 0
    return next(h.shape[ax] for h, ax in zip(held, axes) if ax is not None)


def padded(held: list, axes: list, multiple: int) -> list:
    """``held`` zero-padded along time to ``multiple`` steps (the model's own end: zeros)."""
    return extended(held, axes, multiple - held_steps(held, axes))


def trim(value: np.ndarray, axis: int | None, real: int, fed: int) -> np.ndarray:
    """An output of a padded call cut to the frames of the ``real`` of ``fed`` input steps
    (ceil of the output's own rate: causal ops make them equal to the whole input's)."""
    if axis is None:
        return value
    keep = math.ceil(real * value.shape[axis] / fed)
    return _take(value, axis, 0, keep).copy()


def empty(shape: tuple, dtype, axis: int, batch: int) -> np.ndarray:
    """A zero-step output: ``shape`` (the contract's) with batch rows and 0 along ``axis``."""
    dims = [0 if i == axis else batch if d == "batch" else (d if isinstance(d, int) else 0)
            for i, d in enumerate(shape)]
    return np.zeros(dims, dtype)


def first(arrays: list, axes: list, held: list | None, latency: int) -> tuple[list | None, list | None]:
    """(the arrays to feed now, or None while a stream's first steps are no more than
    ``latency``; the frames to hold, or None)."""
    arrays = joined(arrays, axes, held)
    total = next(a.shape[ax] for a, ax in zip(arrays, axes) if ax is not None)
    if total <= latency:
        return None, [a.copy() for a in arrays]
    return arrays, None


def take_none(spec, batch: int) -> np.ndarray:
    """A zero-step array for data input ``spec`` (a TensorSpec with a time axis)."""
    return empty(spec.shape, spec.dtype, spec.time_axis, batch)


def extended(held: list, axes: list, steps: int) -> list:
    """``held`` with ``steps`` zero steps appended along each one's time axis."""
    out = []
    for h, ax in zip(held, axes):
        if ax is None:
            out.append(h)
            continue
        width = [(0, 0)] * h.ndim
        width[ax] = (0, steps)
        out.append(np.pad(h, width))
    return out
