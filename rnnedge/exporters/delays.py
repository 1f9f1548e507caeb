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
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from rnnedge.exporters import conv_cache
from rnnedge.exporters.conv_cache import Slot, TemporalOp
from rnnedge.exporters.inputs import resize

#: How much longer the second probe run is (as ``temporal.GROW``).
GROW = 64


class Joins(TorchFunctionMode):
    """Follows each tensor's lag; records the joins (``record``) or delays (``lines``).

    late: {module: delay} of the look-ahead ops; lines: {(join, argument): (op, slot)} to
    apply while streaming, or None to record ``seen``: [(join, argument, k frames, shape)].
    """

    def __init__(self, late: dict, lines: dict | None = None):
        super().__init__()
        self.late, self.lines = late, lines
        self.lag: dict[int, int] = {}
        self.keep: list = []  # the tagged tensors, alive: no id is reused meanwhile
        self.count = 0
        self.seen: list = []

    def _tag(self, t, lag: int) -> None:
        self.lag[id(t)] = lag
        self.keep.append(t)

    @contextlib.contextmanager
    def around(self, inputs):
        """Meanwhile: ``inputs`` (the timed data inputs) lag by 0; hooks on the look-ahead ops."""
        self.lag, self.keep, self.count = {}, [], 0
        for t in inputs:
            self._tag(t, 0)

        def hook(module, args, out):
            lag = self.lag.get(id(args[0])) if args else None
            if lag is not None and isinstance(out, torch.Tensor):
                self._tag(out, lag + self.late[module])

        hooks = [m.register_forward_hook(hook) for m in self.late]
        try:
            with self:
                yield self
        finally:
            for h in hooks:
                h.remove()
            self.lag, self.keep = {}, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
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
                    self.seen.append((join, k, top - lag, tuple(leaves[k].shape)))
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
    slot.length = x.size(a)
    full = torch.cat([slot.init, x], dim=a)
    slot.final = full.narrow(a, full.size(a) - op.cache, op.cache)
    y, slot.seen_final = conv_cache.drop_before_start(full.narrow(a, 0, x.size(a)), a,
                                                       slot.seen, op.delay)
    return y


def timed(inputs, x) -> list:
    return [t for i, t in zip(inputs, x) if "time" in i.axes]


def find(model, call, inputs, probe_x, ops: list[TemporalOp]) -> list[TemporalOp]:
    """The delay lines ``model`` needs (none without look-ahead ops), in join order.

    call(x): runs the model's forward on inputs ``x``; ops: its temporal ops (``temporal``).
    """
    modules = dict(model.named_modules())
    late = {modules[op.path]: op.delay for op in ops if op.delay}
    if not late:
        return []
    longer = tuple(resize(x, i.axes.index("time"), x.shape[i.axes.index("time")] + GROW)
                   if "time" in i.axes else x for i, x in zip(inputs, probe_x))
    runs = []
    for x in (probe_x, longer):
        joins = Joins(late)
        with torch.no_grad(), joins.around(timed(inputs, x)):
            call(x)
        runs.append(joins.seen)
    found = []
    for (join, k, frames, shape), (_, _, _, other) in zip(*runs):
        moving = [a for a in range(1, len(shape)) if shape[a] != other[a]]
        if len(moving) != 1:
            continue  # no time axis (or not one): nothing to align
        a = moving[0]
        cache = tuple("batch" if j == 0 else (frames if j == a else int(n))
                      for j, n in enumerate(shape))
        path = f"delay{len(found)}"
        found.append(TemporalOp(path, "delay", a, frames + 1, 1, 0, 0, 0, frames, cache,
                                delay=frames, join=(join, k)))
    return found
