"""Where a late stream starts and ends: the first call's length, the latency, and the
frames each op must take as past the end on a flush.

A model with look-ahead ops (``conv_cache``: ``delay`` > 0) streams late. Its ops drop the
outputs that fall before the sequence (``TemporalOp.drop``), which shifts how many frames
the ops after them get on a stream's first call; strided ops need whole strides. So a
stream's first call takes T1 steps with T1 = ``offset`` (mod the chunk multiple M) and
T1 > latency, later calls multiples of M (contract ``chunk_offset``). With ``up`` the
model input frames an op's input lags by and ``per_frame`` the model frames per frame of
its input, the op gets (T1 - up) / per_frame frames on the first call: a whole number, and
a multiple of its stride for a conv or pool. ``offset`` finds the one residue that fits
every op (for denoiser's Demucs: valid_length(1) mod M, the first frame its own
DemucsStreamer takes).

The end. A flush pads the held steps to the grid (the total = offset (mod M): where a
model that pads itself to a "valid length" pads) and appends F zero steps (the latency
rounded up to M). Each op zeroes the frames of its input past the stream's end,
F / per_frame - past of them (``conv_cache.zero_past_end``), where ``past`` = n(N) -
(N - up) / per_frame is measured by running the model at two lengths N on the grid (n(N):
its input's frames in the model; the two must agree). So every op sees the zeros the model
pads with, a transposed conv's held overlap and a delay line's held frames come out, and
frames computed from the F steps only lie past the end, cut by the runtime.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import torch

from rnnedge.errors import UnsupportedModelError
from rnnedge.exporters import delays, temporal
from rnnedge.exporters.conv_cache import TemporalOp
from rnnedge.exporters.inputs import resize
from rnnedge.runtime.remainder import first_length, flush_call, grid_length


def offset(ops: list[TemporalOp], multiple: int) -> int:
    """The residue (mod ``multiple``) of the first call's steps that gives every op whole
    frames, and whole strides to convs and pools; refused when there is none."""
    for a in range(multiple):
        if all(_fits(a, op) and _fits(a + multiple, op) for op in ops):
            return a
    names = ", ".join(f"{op.path!r} (stride {op.stride}, {op.delay} ahead)" for op in ops if op.delay)
    raise UnsupportedModelError(
        f"the look-ahead ops {names} and the strides along time do not line up on any first "
        f"chunk of a stream (checked every length modulo {multiple}); pad the look-ahead ops "
        "causally, or export with mode='sequence'")


def _fits(t1: int, op: TemporalOp) -> bool:
    frames = (t1 - op.up) / op.per_frame
    if frames.denominator != 1:
        return False
    return op.kind not in ("conv", "pool") or frames.numerator % op.stride == 0


def pasts(model, call, inputs, probe_x, ops: list[TemporalOp], at: tuple[int, int]) -> list:
    """``ops`` with ``past`` set, measured on the model at the two grid lengths ``at``."""
    measured = []
    for n in at:
        x = tuple(resize(v, i.axes.index("time"), n) if "time" in i.axes else v
                  for i, v in zip(inputs, probe_x))
        seen = temporal.frames_in(model, call, x)
        joins, _ = delays.run_joins(model, call, inputs, x, ops)
        lines = {(join, k): shape for join, k, _, shape, _ in joins.seen}
        row = {}
        for op in ops:
            if op.kind == "crop":  # zeroes nothing: its frames pass on
                row[op.path] = 0
                continue
            if op.kind == "delay":
                frames = lines.get(op.join, (None,) * (op.axis + 1))[op.axis]
            else:
                frames = seen[op.path][op.axis] if op.path in seen else None
            if frames is None:
                raise UnsupportedModelError(
                    f"temporal op {op.path!r} is not reached at length {n}; export with "
                    "mode='sequence'")
            row[op.path] = frames - (n - op.up) / op.per_frame
        measured.append(row)
    out = []
    for op in ops:
        if measured[0][op.path] != measured[1][op.path]:
            raise UnsupportedModelError(
                f"the frames that reach {op.path!r} at the end of a sequence depend on its "
                f"length beyond the stride grid ({measured[0][op.path]} vs "
                f"{measured[1][op.path]} at lengths {at[0]} and {at[1]}); export with "
                "mode='sequence'")
        out.append(dataclasses.replace(op, past=Fraction(measured[0][op.path])))
    return out


def plan(model, call, inputs, probe_x, ops: list[TemporalOp], multiple: int):
    """(ops with ``up``/``past`` set and the delay lines added, the end crops, the outputs'
    lag in model frames, the first call's offset) of a late model."""
    followed = delays.follow(model, call, inputs, probe_x, ops)
    ops = [dataclasses.replace(op, up=followed.ups.get(op.path, Fraction(0))) for op in ops]
    ops += followed.lines
    lags = [lag for lag in followed.outs if lag is not None]
    lag = max(lags, default=Fraction(0))
    a = offset(ops, multiple)
    latency = math.ceil(lag)
    t1 = first_length(multiple, a, latency)
    start = t1 + multiple * max(1, math.ceil(64 / multiple))
    with torch.no_grad():
        end = model_end(model, call, inputs, probe_x, multiple, start)
        if end is not None and end[0] == a and end[1] <= t1:
            end = None  # the model ends on the stream's grid: nothing to say
        if end is not None:  # measured where the model pads nothing: at its own ends
            start += (end[0] - start) % multiple
        at = (start, start + multiple * max(1, math.ceil(32 / multiple)))
        ops = pasts(model, call, inputs, probe_x, ops, at)
    # A flush's zeros must also reach past each op's own right padding (a centred stft's
    # n_fft // 2 is more than its look-ahead): the latency covers both.
    need = max(((op.right + op.past) * op.per_frame for op in ops), default=Fraction(0))
    return ops, (followed.crops, followed.sized), max(lag, need), a, end


def model_end(model, call, inputs, probe_x, multiple: int, start: int) -> tuple | None:
    """(residue, least) where the model pads its whole input of N steps itself to L = the
    least L >= max(N, least) with L = residue (mod multiple) (denoiser's valid_length), from
    the F.pad of its input at a few lengths; None where it does not pad so."""
    if multiple == 1:
        return None
    low = next(x.shape[i.axes.index("time")] for i, x in zip(inputs, probe_x) if "time" in i.axes)
    low = min(low, 1 + multiple)
    lengths = [low, start, start + 1, start + multiple // 2, start + multiple - 1]
    ends = {}
    for n in lengths:
        x = tuple(resize(v, i.axes.index("time"), n) if "time" in i.axes else v
                  for i, v in zip(inputs, probe_x))
        try:
            ends[n] = n + temporal.end_pad(model, call, x, n)
        except Exception:  # noqa: BLE001 - the model needs more steps: no such end
            return None
    residue = ends[start] % multiple
    least = ends[low]
    rule = all(ends[n] == max(n + (residue - n) % multiple, least) for n in lengths)
    return (residue, least) if rule and any(ends[n] != n for n in lengths) else None


def flushed(run, inputs, latency: int, multiple: int, offset_: int, probe_x, states0,
            model_outs, end: tuple | None = None) -> tuple:
    """(``run`` (x, states) -> flat outputs as a whole stream in one call, each data
    output's end as (axis, rate, offset) or None): the timed inputs padded to the grid
    (M > 1), then F zero steps (latency rounded up to M), the flush state (the last state)
    set to F; each timed output cut to the model's own frames for N real steps,
    floor(N * rate + offset) (fitted on the model: ``model_outs(x)``, its data outputs),
    as ``Stream.flush`` cuts with the contract's ``end_offset``. states0: zero states."""
    def raw(x, states):
        n = next(v.shape[i.axes.index("time")] for i, v in zip(inputs, x) if "time" in i.axes)
        # The one call of a stream that is all flush, as ``Stream.flush`` makes it.
        pad, past = flush_call(n, n, False, multiple, offset_, latency, end)
        total = n + pad
        x = tuple(v if "time" not in i.axes else _zero_padded(v, i.axes.index("time"), total)
                  for i, v in zip(inputs, x))
        return run(x, [*states[:-1], torch.full_like(states[-1], float(past))]), n

    t = next(v.shape[i.axes.index("time")] for i, v in zip(inputs, probe_x) if "time" in i.axes)
    base = grid_length(t, multiple, offset_, latency) + multiple
    ends = _ends(model_outs, inputs, probe_x, base, multiple)

    def call(x, states):
        out, n = raw(x, states)
        out = list(out)
        for k, end in enumerate(ends):
            if end is not None:
                axis, r, c = end
                out[k] = out[k].narrow(axis, 0, min(out[k].shape[axis], math.floor(n * r + c)))
        return out

    return call, ends


def _ends(model_outs, inputs, probe_x, base: int, multiple: int) -> list:
    """Per data output of the model, (time axis, rate, offset) with its frames for N input
    steps = floor(N * rate + offset), fitted at lengths around ``base``; None: no time axis."""
    def counts(n):
        x = tuple(resize(v, i.axes.index("time"), n) if "time" in i.axes else v
                  for i, v in zip(inputs, probe_x))
        with torch.no_grad():
            return [tuple(o.shape) for o in model_outs(x)]

    far = base + 2 * multiple
    lengths = sorted({base + k for k in rests(multiple)} | {far})
    seen = {n: counts(n) for n in lengths}
    ends = []
    for k, (a, b) in enumerate(zip(seen[base], seen[far])):
        moving = [d for d in range(len(a)) if a[d] != b[d]]
        if len(moving) != 1:
            ends.append(None)
            continue
        axis = moving[0]
        r = Fraction(b[axis] - a[axis], far - base)
        c = max(Fraction(seen[n][k][axis]) - r * n for n in lengths)
        if any(math.floor(n * r + c) != seen[n][k][axis] for n in lengths):
            raise UnsupportedModelError(
                f"the length of output {k} at the end of a stream does not follow the input's "
                f"length by a fixed rate ({[seen[n][k][axis] for n in lengths]} frames at "
                f"{lengths} steps); export with mode='sequence'")
        ends.append((axis, r, c))
    return ends


def rests(multiple: int, most: int = 256) -> list[int]:
    """Remainders modulo ``multiple`` to run the model at: all of them (a length's end can
    depend on any), or ``most`` spread over them with the ends of each stride's period."""
    if multiple <= most:
        return list(range(multiple))
    step = multiple / most
    return sorted({int(k * step) for k in range(most)} | {1, multiple - 1})


def _zero_padded(x: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``x`` with zero frames appended along ``axis`` up to ``n``."""
    shape = list(x.shape)
    shape[axis] = n - x.shape[axis]
    return torch.cat([x, x.new_zeros(shape)], dim=axis)
