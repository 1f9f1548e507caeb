"""Delay lines: where a look-ahead model joins paths of different latencies (a skip
connection around a "same"-padded conv, a U-Net's concat), the path that is less late is
delayed to match, with its last frames carried as a state like a conv cache.

A ``Joins`` (a torch-function mode) follows, per tensor, how many input frames it lags by
when streamed: the model's timed inputs lag by 0, a look-ahead op's output by its input's
lag plus its ``delay``, any other op's output by the largest lag of its tensor arguments.
A call whose tensor arguments lag by different amounts is a join; the joins of one
forward are numbered in call order, which is the same in every run of the model (eager,
streamed, traced). ``find`` runs the model eagerly at two lengths to find, for each join,
the argument that lags by ``k`` frames less than the latest one and its time axis (the
axis that follows the length; an argument without one, e.g. a per-utterance vector,
needs no delay): each becomes a ``TemporalOp`` of kind "delay" (``delay`` = cache = k).
While streaming, the mode replaces that argument by its delay line::

    y = cat(cache, x)[:T]      cache: (batch, .., k, ..) frames, initially zeros
    new cache = last k frames of cat(cache, x)
    drop y's first k frames of a stream (the zeros standing before it; ``<path>.seen0``)

so the argument reaches the join on the same frames as the other path: ``T - k`` frames on
a stream's first call, ``T`` after. States: ``delay<i>.cache0 -> .cachen`` and
``delay<i>.seen0 -> .seenn`` per delay line, ``i`` its order among the model's joins.

The same mode sees slices and reshapes of lagging tensors (``follow``, by their order in a
forward): a slice that only cuts the end along time (``skip[..., :x.shape[-1]]``,
``y[..., :length]``) is left out while streaming (the end comes with the flush); one that
cuts the first frames (``x[..., k:]``) drops them once per stream (a start crop, kind
"crop": a counter ``crop<i>.seen0`` and a lag of k frames); a reshape given a time length
taken from another tensor (``y.view(*other, time)`` after a conv that streams late) gets
-1 there. Lags are in model input frames (Fractions: ops at other rates).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from rnnedge.errors import UnsupportedModelError
from rnnedge.exporters import conv_cache, temporal
from rnnedge.exporters.conv_cache import Slot, TemporalOp

RESHAPES = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape)


class Joins(TorchFunctionMode):
    """Follows each tensor's lag; records the joins (``record``) or delays (``lines``).

    late: {module: delay} of the look-ahead ops; lines: {(join, argument): (op, slot)} to
    apply while streaming, or None to record ``seen``: [(join, argument, k frames, shape)].
    """

    def __init__(self, late: dict, lines: dict | None = None, watch: dict | None = None,
                 crops: frozenset = frozenset(), cuts: dict | None = None,
                 sized: dict | None = None):
        super().__init__()
        self.late, self.lines = late, lines
        self.sized = sized or {}  # {reshape: entry given as the time length}: -1 while streaming
        self.reshapes = 0
        self.shaped: list = []  # per reshape of a tagged tensor: (index, the sizes asked for)
        self.cuts = cuts or {}  # {slice: lag it adds}: start crops (``x[..., k:]``)
        self.watch = watch or {}  # {module: path}: record the lag of its input in ``ups``
        self.crops = crops  # slices along time to leave out while streaming (``end_crops``)
        self.lag: dict[int, Fraction] = {}
        self.keep: list = []  # the tagged tensors, alive: no id is reused meanwhile
        self.count = self.slices = 0
        self.seen: list = []
        self.ups: dict[str, Fraction] = {}
        self.sliced: list = []  # per slice of a tagged tensor: (index, input shape, output shape)

    def _tag(self, t, lag: int) -> None:
        self.lag[id(t)] = lag
        self.keep.append(t)

    @contextlib.contextmanager
    def around(self, inputs):
        """Meanwhile: ``inputs`` (the timed data inputs) lag by 0; hooks on the look-ahead ops."""
        self.lag, self.keep, self.count, self.slices, self.reshapes = {}, [], 0, 0, 0
        for t in inputs:
            self._tag(t, Fraction(0))

        # Each hook holds its own value: while tracing, a hook may be handed another object
        # for its module than the one it was registered on.
        def late(delta):
            def hook(_module, args, out):
                lag = self.lag.get(id(args[0])) if args else None
                if lag is not None and isinstance(out, torch.Tensor):
                    self._tag(out, lag + delta)
            return hook

        def watch(path):
            def pre(_module, args):
                lag = self.lag.get(id(args[0])) if args else None
                if lag is not None:
                    self.ups[path] = lag
            return pre

        hooks = [m.register_forward_hook(late(d)) for m, d in self.late.items()]
        hooks += [m.register_forward_pre_hook(watch(p)) for m, p in self.watch.items()]
        try:
            with self:
                yield self
        finally:
            for h in hooks:
                h.remove()
            self.lag, self.keep = {}, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in RESHAPES and args and id(args[0]) in self.lag:
            k, self.reshapes = self.reshapes, self.reshapes + 1
            sizes = list(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) \
                else list(args[1:])
            if self.lines is None:
                self.shaped.append((k, tuple(int(n) for n in sizes)))
            elif k in self.sized:
                # A length taken from another tensor (x.view(*other, time) after a conv that
                # streams late): the chunk's own length while streaming.
                sizes[self.sized[k]] = -1
                args = (args[0], tuple(sizes))
        if func is torch.Tensor.__getitem__ and id(args[0]) in self.lag:
            k, self.slices = self.slices, self.slices + 1
            if self.lines is not None and k in self.crops:
                return args[0]  # an end crop: the stream's end comes with the flush
            line = self.lines.get(("crop", k)) if self.lines is not None else None
            if line is not None:  # a start crop: the stream's first frames only
                op, slot = line
                out, slot.seen_final = conv_cache.drop_before_start(args[0], op.axis, slot.seen,
                                                                    op.delay)
                self._tag(out, self.lag[id(args[0])] + op.delay * op.per_frame)
                return out
            out = func(*args, **kwargs)
            if self.lines is None:
                self.sliced.append((k, args[1], tuple(args[0].shape), tuple(out.shape),
                                    self.lag[id(args[0])]))
            if isinstance(out, torch.Tensor):
                self._tag(out, self.lag[id(args[0])] + self.cuts.get(k, 0))
            return out
        leaves, spec = pytree.tree_flatten((args, kwargs))
        lags = {k: self.lag[id(t)] for k, t in enumerate(leaves)
                if isinstance(t, torch.Tensor) and id(t) in self.lag}
        top = max(lags.values(), default=None)
        if len(set(lags.values())) > 1:
            join, self.count = self.count, self.count + 1
            for k, lag in lags.items():
                if lag == top:
                    continue
                if self.lines is None:
                    self.seen.append((join, k, top - lag, tuple(leaves[k].shape), lag))
                elif (join, k) in self.lines:
                    leaves[k] = _delayed(leaves[k], *self.lines[(join, k)])
            args, kwargs = pytree.tree_unflatten(leaves, spec)
        out = func(*args, **kwargs)
        if top is not None:
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and id(t) not in self.lag:
                    self._tag(t, top)
        return out


def _delayed(x, op: TemporalOp, slot: Slot):
    """``x`` late by ``op.delay`` frames along ``op.axis``; its first ones of a stream dropped."""
    a = op.axis
    full = torch.cat([slot.init, x], dim=a)
    slot.final = full.narrow(a, full.size(a) - op.cache, op.cache)
    y, slot.seen_final = conv_cache.drop_before_start(full.narrow(a, 0, x.size(a)), a,
                                                       slot.seen, op.delay)
    return y


def timed(inputs, x) -> list:
    return [t for i, t in zip(inputs, x) if "time" in i.axes]


@dataclass
class Followed:
    """What ``follow`` found of a late model: ``lines`` its delay lines (in join order),
    ``ups`` {op path: the model input frames its input lags by}, ``outs`` each flat output
    tensor's lag (None: not from a timed input), ``crops`` the slices along time (their
    order among the slices of timed tensors) that only cut the sequence's end."""

    lines: list
    ups: dict
    outs: list
    crops: frozenset
    sized: dict  # {reshape: the entry that is a time length} (``Joins.sized``)


def run_joins(model, call, inputs, x, ops, cuts=None) -> tuple[Joins, list]:
    """(the Joins after running ``call(x)`` with the lags followed, the outputs' lags);
    cuts: {slice: lag} of the start crops (``follow``)."""
    modules = dict(model.named_modules())
    moduled = [op for op in ops if op.kind not in ("delay", "crop")]
    late = {modules[op.path]: op.delay * op.per_frame for op in moduled if op.delay}
    watch = {modules[op.path]: op.path for op in moduled}
    if cuts is None:
        cuts = {op.join[1]: op.delay * op.per_frame for op in ops if op.kind == "crop"}
    joins = Joins(late, None, watch, cuts=cuts)
    with torch.no_grad(), joins.around(timed(inputs, x)):
        y = call(x)
        lags = [joins.lag.get(id(t)) for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]
    return joins, lags


def follow(model, call, inputs, probe_x, ops: list[TemporalOp]) -> Followed:
    """The lags of a model with look-ahead ops, its delay lines and end crops, from runs at
    ``temporal.probes``' two lengths. call(x): the model's forward on inputs x."""
    grow, (probe_x, longer) = temporal.probes(model, inputs, probe_x)
    runs = [run_joins(model, call, inputs, x, ops, {}) for x in (probe_x, longer)]
    starts, cuts = _start_crops(runs[0][0].sliced, runs[1][0].sliced, grow)
    if starts:  # again, with the lag each start crop adds
        runs = [run_joins(model, call, inputs, x, ops, cuts) for x in (probe_x, longer)]
        lag_in = {rec[0]: rec[4] for rec in runs[0][0].sliced}
        starts = [dataclasses.replace(op, up=lag_in[op.join[1]]) for op in starts]
    (j1, lags), (j2, _) = runs
    found = []
    for (join, k, frames, shape, lag), (_, _, _, other, _) in zip(j1.seen, j2.seen):
        moving = [a for a in range(1, len(shape)) if shape[a] != other[a]]
        if len(moving) != 1:
            continue  # no time axis (or not one): nothing to align
        a = moving[0]
        rate = Fraction(other[a] - shape[a], grow)  # its frames per model input frame
        n = frames * rate
        if n.denominator != 1:
            raise UnsupportedModelError(
                f"a skip connection or concatenation joins paths whose lags differ by {n} "
                "frames (look-ahead ops at different strides), which no whole-frame delay "
                "line aligns; pad the look-ahead ops causally, or export with mode='sequence'")
        n = int(n)
        cache = tuple("batch" if j == 0 else (n if j == a else int(d)) for j, d in enumerate(shape))
        found.append(TemporalOp(f"delay{len(found)}", "delay", a, n + 1, 1, 0, 0, 0, n, cache,
                                delay=n, join=(join, k), per_frame=1 / rate, up=lag))
    crops = set()
    for (k, index, shape, _, _), (_, _, other, _, _) in zip(j1.sliced, j2.sliced):
        moving = [a for a in range(len(shape)) if shape[a] != other[a]]
        if len(moving) == 1 and _end_crop(_entry(index, len(shape), moving[0])):
            crops.add(k)
    sized = {}
    for (k, sizes), (_, other) in zip(j1.shaped, j2.shaped):
        moving = [d for d in range(len(sizes)) if sizes[d] != other[d]]
        if len(moving) == 1 and -1 not in sizes and len(sizes) == len(other):
            sized[k] = moving[0]
    return Followed(starts + found, dict(j1.ups), lags, frozenset(crops), sized)


def _start_crops(sliced1: list, sliced2: list, grow: int) -> tuple[list, dict]:
    """(a TemporalOp of kind "crop" per slice that cuts a stream's first frames along time,
    ``x[..., k:]``, {slice: the lag it adds}) from the slices seen at two lengths."""
    found, cuts = [], {}
    for (k, index, shape, _out, _), (_, _, other, _, _) in zip(sliced1, sliced2):
        moving = [a for a in range(len(shape)) if shape[a] != other[a]]
        if len(moving) != 1:
            continue
        a = moving[0]
        entry = _entry(index, len(shape), a)
        if not (isinstance(entry, slice) and entry.stop is None and entry.step in (None, 1)
                and isinstance(entry.start, int) and entry.start > 0):
            continue
        rate = Fraction(other[a] - shape[a], grow)
        found.append(TemporalOp(f"crop{len(found)}", "crop", a, 1, 1, 0, 0, 0, 0, ("batch", 1),
                                delay=entry.start, join=("crop", k), per_frame=1 / rate))
        cuts[k] = entry.start / rate
    return found, cuts


def _entry(index, ndim: int, axis: int):
    """The entry of a ``tensor[index]`` that applies to ``axis`` (slice(None): none)."""
    entries = list(index) if isinstance(index, tuple) else [index]
    used = sum(1 for e in entries if e is not None and e is not Ellipsis)
    flat = []
    for e in entries:
        if e is Ellipsis:
            flat += [slice(None)] * (ndim - used)
        elif e is not None:
            flat.append(e)
    return flat[axis] if axis < len(flat) else slice(None)


def _end_crop(entry) -> bool:
    """Whether ``entry`` keeps the sequence's start and cuts only its end (x[..., :n])."""
    return (isinstance(entry, slice) and entry.start in (None, 0) and entry.step in (None, 1)
            and entry.stop is not None)
