"""Streaming temporal ops: a convolution, pooling or transposed convolution along time that
takes (chunk, cache) and gives (output, new cache), so that chunks streamed one after the
other give, frame for frame, what the op gives on the whole sequence.

Every op is described by a ``TemporalOp`` (found by ``temporal.analyse``). While a
``Caches`` is installed, each op's module has its instance ``forward`` replaced by a
``CacheCall`` that reads its initial cache from a plain ``Slot`` (not a Module) and leaves
its final cache there, as ``trace`` does for the recurrent layers' lifted states. Outside
``installed`` the model is untouched.

The math, along the op's time axis ``a`` of its input (``span`` = dilation*(kernel-1)+1,
``stride`` s, ``left`` the zero frames the model pads before the sequence)::

    conv / pool:  x = cat(cache, chunk)          cache: C frames, initially zeros = padding
                  y = op(x) with no time padding C = the one value in [span-s, span-1]
                  new cache = last C frames of x    with C = left (mod s); emits chunk/s frames
    transposed:   z = conv_transpose(chunk) without bias or cropping, (T-1)*s + span frames
                  z[:O] += overlap                  overlap: O = span - s frames of partial sums
                  y = z[:T*s] + bias; new overlap = z[T*s:]

Padding the model applies itself with ``F.pad``/a pad module straight before a conv
(``fused_left``/``fused_right`` frames) is left out while streaming (``Unpad``): the cache
stands for it before the sequence, a flush's zeros after. Chunks must hold a multiple of the op's total stride (``chunk_multiple``) but for
the last one of a stream. Shapes: a Conv1d's cache is (batch, channels, C); a Conv2d's
over (freq, time) (batch, channels, freq, C); the time axis is the op input's.

Look-ahead (``delay`` > 0: a centred kernel, "same" padding; at a stride see ``ends``) streams late: the
zero cache stands for ``delay`` frames more than the model pads, so the op's first
``delay`` outputs fall before the sequence; a counter state ``<path>.seen0 -> .seenn``
((batch, 1), float32: output frames computed so far, capped at ``delay``; row 0 counts
for all) drops them, so nothing downstream (a recurrent layer) ever sees them. A graph
with such ops has one more state, ``contract.FLUSH_STATE`` ((batch, 1)): the frames at
the end of this call that lie past the end of the stream (0 but on the last call, which
``Stream.flush`` makes: ``latency`` zero frames appended, this state set to
``latency``). Each look-ahead op zeroes the last ``flush - up`` frames of its input
(``up``: the latency of the ops before it), i.e. it gets exactly its own right padding
of zeros, so stream + flush equals the model on the whole input. Look-ahead ops in series
add up (``up`` of each: the sum before it). Where paths of different latencies join (a skip
connection, a concat), the less late one goes through a delay line (kind "delay", no
module; ``delays``): a cache of the difference in frames and a counter, as above.

A call of fewer than ``latency + 1`` frames at a stream's start emits no frame; onnxruntime's
CPU GRU/LSTM kernels abort the process (``std::terminate``) on 0 steps, so nothing feeds a
graph such a call (the runtime holds a stream's first frames; the gate's probes are longer).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own alias
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from rnnedge.contract import FLUSH_STATE, FLUSH_STATE_OUT, StateSpec

KINDS = ("conv", "pool", "transposed", "delay", "crop")


@dataclass(frozen=True)
class TemporalOp:
    """One op along time, as streamed.

    path: the module's path in the model (delay lines: ``delay<i>``, start crops:
    ``crop<i>``). kind: one of KINDS. axis: the time axis of its input (>= 2). span,
    stride: its kernel's reach and its stride along time. left: the zero frames before the
    sequence (its own padding plus ``fused_left``). fused_left, fused_right: frames of the
    model's own zero padding of its input by an F.pad (``pad_call``: that call's index in a
    forward), left out while streaming. cache: frames carried (overlap frames for a
    transposed conv). shape: the cache's shape with "batch" at axis 0 and ``cache`` at
    ``axis``. multiple: the numerator of ``per_frame * stride`` (the chunk multiple it
    needs). delay: frames of its input that fall before the sequence (look-ahead; a delay
    line's or start crop's frames), ``drop`` of its outputs. up: the model input frames
    its input lags by; per_frame: model input frames per frame of its input (a Fraction);
    past: ``ends.pasts``' measure of the frames past the end at a flush; right: the zero
    frames the model pads after the sequence. join: for a delay line the (join, argument)
    it delays, for a start crop ("crop", slice index).
    """

    path: str
    kind: str
    axis: int
    span: int
    stride: int
    left: int
    fused_left: int
    fused_right: int
    cache: int
    shape: tuple
    multiple: int = 1
    delay: int = 0
    up: Fraction = Fraction(0)
    join: tuple | None = None
    per_frame: Fraction = Fraction(1)
    past: Fraction = Fraction(0)
    pad_call: int | None = None
    right: int = 0  # zero frames the model pads after the sequence (own padding + F.pad)

    @property
    def drop(self) -> int:
        """Output frames of a stream's start that fall before the sequence (look-ahead)."""
        return self.delay if self.kind == "delay" else self.delay // self.stride

    def state_names(self) -> tuple[str, str]:
        return f"{self.path}.cache0", f"{self.path}.cachen"

    def spec(self) -> StateSpec:
        i, o = self.state_names()
        return StateSpec(i, o, "float32", self.shape, 0)

    def specs(self) -> list[StateSpec]:
        """Its cache, then for a look-ahead op its counter of frames seen."""
        seen = [StateSpec(f"{self.path}.seen0", f"{self.path}.seenn", "float32", ("batch", 1), 0)]
        if self.kind == "crop":  # a start crop (``x[..., k:]``) keeps no frames, only counts
            return seen
        return [self.spec()] + (seen if self.delay else [])


FLUSH_SPEC = StateSpec(FLUSH_STATE, FLUSH_STATE_OUT, "float32", ("batch", 1), 0)


@dataclass
class Slot:
    """One op's cache for the current call (plain object: never traced as a Module)."""

    init: Tensor | None = None
    final: Tensor | None = None
    seen: Tensor | None = None  # look-ahead ops: output frames computed so far, (batch, 1)
    seen_final: Tensor | None = None


@dataclass
class Cached:
    """One op of the model, as patched."""

    op: TemporalOp
    module: nn.Module | None  # None: a delay line
    slot: Slot = field(default_factory=Slot)
    flush: Slot | None = None  # the graph's flush state (shared by all ops), when any looks ahead


class Caches:
    """The streamed temporal ops of one export; their caches in ``ops`` order."""

    def __init__(self, model: nn.Module, ops: list[TemporalOp], loose: dict | None = None):
        modules = dict(model.named_modules())
        self.flush = Slot() if any(op.delay for op in ops) else None
        self.ops = [Cached(op, modules.get(op.path) if op.kind not in ("delay", "crop") else None,
                           flush=self.flush) for op in ops]
        # Pads that feed an op, and zero padding after the sequence elsewhere (``loose``:
        # {F.pad call: time axis}; a flush's zeros stand for it).
        self.unpad = Unpad({**(loose or {}),
                            **{op.pad_call: op.axis for op in ops if op.pad_call is not None}})
        self.lag = Fraction(0)  # input frames the outputs come late by (``ends``)
        self.crops: frozenset = frozenset()  # end crops left out while streaming (``delays``)
        self.sized: dict = {}  # reshapes given a time length: -1 while streaming (``delays``)
        self.offset = 0  # a stream's first call: steps = offset (mod chunk multiple)
        self.model_end: tuple | None = None  # (residue, least): the model's own end (``ends``)

    @property
    def latency(self) -> int:
        """Input frames the outputs come late by, whole (0: every op causal)."""
        return math.ceil(self.lag)

    def specs(self) -> list[StateSpec]:
        """Per op its cache (and counter), then the flush state where any op looks ahead."""
        specs = [s for c in self.ops for s in c.op.specs()]
        return specs + ([FLUSH_SPEC] if self.flush is not None else [])

    @contextlib.contextmanager
    def installed(self):
        """Patch every op's forward with its streaming form meanwhile, and take the model's
        own zero padding along time off their inputs (their caches and the flush stand for it)."""
        patched = []
        try:
            for c in self.ops:
                if c.module is not None:
                    c.module.forward = CacheCall(c)
                    patched.append(c)
            with self.unpad:
                yield self
        finally:
            for c in patched:
                vars(c.module).pop("forward", None)

    def joining(self, inputs):
        """A context that delays, at each join of paths of different latencies, the less
        late one (``delays``; after ``begin``); ``inputs``: the timed data inputs."""
        if self.flush is None:
            return contextlib.nullcontext()
        from rnnedge.exporters.delays import Joins  # it builds on this module

        late = {c.module: c.op.delay * c.op.per_frame for c in self.ops
                if c.module is not None and c.op.delay}
        lines = {c.op.join: (c.op, c.slot) for c in self.ops if c.op.kind in ("delay", "crop")}
        return Joins(late, lines, crops=self.crops, sized=self.sized).around(inputs)

    def begin(self, states) -> None:
        """Hand the initial states (flat, in ``specs`` order) to the slots."""
        states = list(states)
        self.unpad.calls = 0
        if self.flush is not None:
            self.flush.init = states.pop()
        it = iter(states)
        for c in self.ops:
            crop = c.op.kind == "crop"
            c.slot = Slot(init=None if crop else next(it), seen=next(it) if c.op.delay else None)
        if next(it, None) is not None:
            raise RuntimeError("more cache states than ops")  # a bug

    def end(self) -> list:
        """The final caches, flat; every op must have run once this call."""
        finals = []
        for c in self.ops:
            if (c.slot.seen_final if c.op.kind == "crop" else c.slot.final) is None:
                raise RuntimeError(f"temporal op {c.op.path!r} was not called")  # analysed: a bug
            if c.op.kind != "crop":
                finals.append(c.slot.final)
            if c.op.delay:
                finals.append(c.slot.seen_final)
            c.slot = Slot()
        if self.flush is not None:  # back to 0: only the call it was set for is a flush
            finals.append(self.flush.init * 0)
        return finals


class Unpad(TorchFunctionMode):
    """The model's ``F.pad`` calls that feed a temporal op (``fused``: {call index in one
    forward: time axis}) without their padding along time: while streaming, the op's cache
    stands for the frames before the sequence and a flush's zeros for those after (a pad
    whose amount the model computes from the length, e.g. to a "valid length", included).
    Calls are counted from ``Caches.begin``; their order is the same in every run."""

    def __init__(self, fused: dict):
        super().__init__()
        self.fused, self.calls = fused, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.pad:
            return func(*args, **kwargs)
        k, self.calls = self.calls, self.calls + 1
        if k not in self.fused:
            return func(*args, **kwargs)
        x = args[0]
        pad = list(args[1] if len(args) > 1 else kwargs.pop("pad"))
        j = 2 * (x.dim() - 1 - self.fused[k])
        pad[j:j + 2] = [0, 0]
        return func(x, pad, *args[2:], **kwargs) if any(pad) else x


def _tail(x: Tensor, axis: int, n: int) -> Tensor:
    return x.narrow(axis, x.size(axis) - n, n)


def _time_padding(padding, axis: int, n: int) -> tuple:
    """The module's padding tuple (n spatial axes) with the time axis' entry zeroed."""
    pads = list(padding) if isinstance(padding, (tuple, list)) else [padding] * n
    pads[axis - 2] = 0
    return tuple(pads)


class CacheCall:
    """The patched ``forward`` of one temporal module: cat(cache, chunk) -> op -> new cache."""

    def __init__(self, cached: Cached):
        self.cached = cached

    def __call__(self, x: Tensor) -> Tensor:
        op, slot = self.cached.op, self.cached.slot
        a = op.axis
        flush = self.cached.flush
        if flush is not None:  # a late graph: the frames past the stream's end become zeros
            x = zero_past_end(x, a, flush.init, op)
        y = self._op(x)
        if op.drop:
            y, slot.seen_final = drop_before_start(y, a, slot.seen, op.drop)
        return y

    def _op(self, x: Tensor) -> Tensor:
        op, m, slot = self.cached.op, self.cached.module, self.cached.slot
        a = op.axis
        if op.kind == "transposed":
            y, slot.final = _transposed(m, x, slot.init, op)
            return y
        full = torch.cat([slot.init, x], dim=a)
        slot.final = _tail(full, a, op.cache)
        n = x.dim() - 2
        if op.kind == "conv":
            conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
            return conv(full, m.weight, m.bias, m.stride, _time_padding(m.padding, a, n),
                        m.dilation, m.groups)
        pads = _time_padding(m.padding, a, n)
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
            pool = (F.avg_pool1d, F.avg_pool2d)[n - 1]
            extra = () if n == 1 else (m.divisor_override,)
            return pool(full, m.kernel_size, m.stride, pads, m.ceil_mode, m.count_include_pad, *extra)
        pool = (F.max_pool1d, F.max_pool2d)[n - 1]
        return pool(full, m.kernel_size, m.stride, pads, m.dilation, m.ceil_mode)


def _count(x: Tensor, a: int) -> tuple[Tensor, Tensor]:
    """(0..n-1 as float, n as a float tensor) for the n frames of ``x`` along ``a``: sizes
    as tensors, so that the exported graph computes them per call."""
    idx = torch.arange(x.size(a), device=x.device, dtype=torch.float32)
    return idx, torch.ones_like(idx).sum()


def zero_past_end(x: Tensor, a: int, flush: Tensor, op: TemporalOp) -> Tensor:
    """``x`` with its frames past the stream's end zeroed: the zeros the model pads with.
    flush: (batch, 1), the zero steps a flush call appended to the model's input (0 on other
    calls); ``flush / op.per_frame - op.past`` of this op's input frames lie past the end
    (``past``: measured on the model at lengths on the stream's grid, ``temporal.ends``)."""
    idx, n = _count(x, a)
    f = flush.reshape(-1)[0]
    past = ((f / float(op.per_frame) - float(op.past)).round().clamp(min=0)
            * (f > 0).to(x.dtype))
    shape = [1] * x.dim()
    shape[a] = -1
    return x * (idx + past < n).to(x.dtype).reshape(shape)


def drop_before_start(y: Tensor, a: int, seen: Tensor, delay: int) -> tuple[Tensor, Tensor]:
    """(``y`` without the frames that fall before the sequence, the new counter): of the
    first ``delay`` output frames of a stream, none is emitted."""
    idx, n = _count(y, a)
    done = seen.reshape(-1)[0].round().clamp(0, delay)
    keep = torch.nonzero(idx >= delay - done).reshape(-1)
    new = (seen * 0 + torch.clamp(done + n, max=delay))
    return y.index_select(a, keep), new


def _transposed(m: nn.Module, x: Tensor, overlap: Tensor, op: TemporalOp):
    """(output (.., T*s, ..), new overlap): overlap-add of the partial sums past the chunk."""
    a, s = op.axis, op.stride
    n = x.dim() - 2
    conv = (F.conv_transpose1d, F.conv_transpose2d)[n - 1]
    out_pad = list(m.output_padding)
    out_pad[a - 2] = 0
    z = conv(x, m.weight, None, m.stride, _time_padding(m.padding, a, n), tuple(out_pad),
             m.groups, m.dilation)  # (T-1)*s + span frames along a
    o = op.cache
    head = z.narrow(a, 0, o) + overlap
    z = torch.cat([head, z.narrow(a, o, z.size(a) - o)], dim=a)
    emitted = x.size(a) * s
    y = z.narrow(a, 0, emitted)
    if m.bias is not None:
        y = y + m.bias.reshape([1, -1] + [1] * n)
    return y, _tail(z, a, o)
