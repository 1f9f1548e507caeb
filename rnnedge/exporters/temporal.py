"""Finding the ops along time of a model exported in stream mode, and how each streams.

``analyse`` runs the model eagerly at three lengths with hooks on every convolution,
pooling and transposed convolution (and a torch-function mode that sees ``F.pad``). An
op runs along time when one of its spatial input axes follows the input's length: that
axis is its time axis (any axis: Conv2d over (freq, time) or (time, freq) alike). Ops with
no axis following the length (a per-frame conv, kernel 1 along time) are left as they
are. Each op along time becomes a ``conv_cache.TemporalOp``: a cache state carried
between calls like a recurrent state (``conv_cache``).

What streams: causal ops (the model pads ``dilation*(kernel-1)`` zeros before the
sequence, with the op's own ``padding`` or an ``F.pad``/pad module straight before it),
and ops whose look-ahead is absorbed by their stride (e.g. kernel 3, padding 1, stride 2);
transposed convolutions without time cropping (upsampling, their overlap carried);
right padding whose extra end frames the model crops (``y[..., :T]``; the gate checks);
strides of any size (chunks are then multiples of the total stride: ``chunk_multiple``).
Ops that look ahead ("same" padding, a valid conv, at any stride) stream late (``delay``
frames of their input fall before the sequence), with delay lines where paths of
different lags join (``delays``) and a stream's first call and end placed by ``ends``.
Zero padding after the sequence may follow the length (a "valid length") in such late
graphs, where a flush stands for it, and may feed other ops than a conv there (``loose``).
What is refused, by name, with why: a length-dependent pad in a graph without look-ahead,
padding before the sequence that follows the length, non-zero or reflect padding along
time, max pooling over padded time, ``ceil_mode``, a pad before the sequence that does
not feed an op directly, ops called more than once per forward, and ops that see the
whole sequence (InstanceNorm, attention, adaptive pooling over time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own alias
from torch import nn
from torch.overrides import TorchFunctionMode

from rnnedge.errors import UnsupportedModelError
from rnnedge.exporters.conv_cache import TemporalOp
from rnnedge.exporters.inputs import resize

CONVS = (nn.Conv1d, nn.Conv2d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool1d, nn.MaxPool2d)
#: Modules that see the whole sequence along time: (types, why they cannot stream).
WHOLE = (
    ((nn.InstanceNorm1d, nn.InstanceNorm2d), "normalises over the time axis (statistics of "
     "the whole sequence)"),
    ((nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
      nn.TransformerEncoder, nn.Transformer), "attends over the whole sequence"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
     "pools to a fixed size, so each output frame depends on the whole sequence"),
)
#: The least that the second probe run is longer by (``growth``).
GROW = 64


def growth(model: nn.Module) -> int:
    """How much longer the second probe run is: a multiple of the product of the strides of
    every conv, pool and transposed conv (so that each op's input grows by whole frames and
    its rate comes out exact, a Demucs's 4**5 included), at least ``GROW``."""
    product = 1
    for m in model.modules():
        if isinstance(m, CONVS + TRANSPOSED + POOLS):
            s = m.stride if not isinstance(m, POOLS) or m.stride else m.kernel_size
            product *= max(s) if isinstance(s, (tuple, list)) else int(s)
    return product * -(-GROW // product)


def probes(model: nn.Module, inputs, probe_x, *extra: int) -> tuple[int, list]:
    """(``growth``, the inputs at a base length and at that plus ``growth`` and each of
    ``extra``). The base is the example's length, or 3 * growth where that is longer: at a
    tiny example (the CLI's 5 steps) a model that pads itself to a "valid length" pads
    every probe to the same least length, and the ops' rates would come out wrong."""
    grow = growth(model)

    def at(x, i, n):
        return resize(x, i.axes.index("time"), n) if "time" in i.axes else x

    t = next(x.shape[i.axes.index("time")] for i, x in zip(inputs, probe_x) if "time" in i.axes)
    base = max(t, 3 * grow)
    return grow, [tuple(at(x, i, base + k) for i, x in zip(inputs, probe_x))
                  for k in (0, grow, *extra)]


@dataclass
class _Seen:
    """What one probe run saw one module do."""

    calls: int = 0
    shape: tuple = ()
    out: tuple = ()
    pad: int | None = None  # index of the F.pad call whose output it was given


@dataclass
class _Pads(TorchFunctionMode):
    """Records every F.pad call: (input shape, pad, mode, value), and keeps its output."""

    calls: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    feeding: set = field(default_factory=set)  # indices of calls whose output fed a module

    def __post_init__(self):
        super().__init__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.pad:
            x, pad = args[0], tuple(args[1] if len(args) > 1 else kwargs["pad"])
            mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
            value = args[3] if len(args) > 3 else kwargs.get("value", None)
            self.calls.append((tuple(x.shape), pad, mode, value))
            self.outputs.append(out)
        return out


def _run(call, model: nn.Module, x) -> tuple[dict, list]:
    seen: dict[str, _Seen] = {}
    hooks = []
    pads = _Pads()

    def hook(path):
        def pre(_module, args):
            rec = seen.setdefault(path, _Seen())
            rec.calls += 1
            rec.shape = tuple(args[0].shape)
            rec.pad = next((i for i, o in enumerate(pads.outputs) if o is args[0]), None)
            if rec.pad is not None:
                pads.feeding.add(rec.pad)
        def post(_module, _args, out):
            seen[path].out = tuple(out.shape)
        return pre, post

    watched = CONVS + TRANSPOSED + POOLS + tuple(t for types, _ in WHOLE for t in types)
    for path, m in model.named_modules():
        if isinstance(m, watched):
            pre, post = hook(path)
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with pads:
            call(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, pads


def _pad_at(pad: tuple, ndim: int, axis: int) -> tuple[int, int]:
    """(left, right) of an F.pad tuple along ``axis`` of an ``ndim``-d input."""
    k = 2 * (ndim - 1 - axis)
    return (pad[k], pad[k + 1]) if k + 1 < len(pad) else (0, 0)


def _pair(v, i: int) -> int:
    return v[i] if isinstance(v, (tuple, list)) else v


def _refuse(path: str, m: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(m).__name__} {path!r} runs along the time axis and {why}, so the model "
        "cannot stream chunk by chunk; export it with mode='sequence' (--mode sequence)"
    )


def analyse(model: nn.Module, call, inputs, probe_x) -> tuple[list[TemporalOp], int, dict]:
    """(the ops along time, in module order; the chunk multiple; the zero pads after the
    sequence that feed no op, {F.pad call: time axis}, only in late graphs) of ``model``.

    call(x): runs the model's forward on the inputs ``x`` (a tuple). inputs: the
    exporter's ``Input``s, one with a "time" axis; probe_x: inputs at the example's size.
    """
    # The third, one step longer: a pad to a "valid length" can be 0 at both others.
    grow, (probe_x, longer, odd) = probes(model, inputs, probe_x, 1)
    with torch.no_grad():
        seen1, run1 = _run(call, model, probe_x)
        seen2, run2 = _run(call, model, longer)
        _, run3 = _run(call, model, odd)
    pads1, pads2 = run1.calls, run2.calls
    pads3 = run3.calls if len(run3.calls) == len(pads1) else pads1
    modules = dict(model.named_modules())
    feeding = run1.feeding
    loose, refused = {}, None  # zero padding after the sequence only: a flush's (late graphs)
    varying = None  # the refusal of a pad into an op that follows the length (late graphs only)
    for i, (shape, pad, mode, value) in enumerate(pads1):
        if i in feeding or i >= len(pads2):
            continue
        for a in range(len(shape)):
            if shape[a] != pads2[i][0][a] and any(
                    any(_pad_at(p[i][1], len(shape), a)) for p in (pads1, pads2, pads3)):
                if _pad_at(pad, len(shape), a)[0] or mode != "constant" or (value or 0) != 0:
                    raise _loose(pad, shape)
                loose[i] = a
                refused = refused or _loose(pad, shape)
    fused: set[int] = set()
    ops, multiple = [], 1
    for path, rec in seen1.items():
        m = modules[path]
        other = seen2.get(path)
        if other is None or len(other.shape) != len(rec.shape):
            continue
        moving = [a for a in range(len(rec.shape)) if rec.shape[a] != other.shape[a]]
        timed = [a for a in moving if a >= 2]
        if not timed:
            continue  # per frame (time folded into the batch, or no time at all)
        for types, why in WHOLE:
            if isinstance(m, types):
                raise _refuse(path, m, why)
        if len(timed) > 1:
            raise _refuse(path, m, f"more than one of its axes {timed} follows the length")
        if rec.calls > 1:
            raise _refuse(path, m, f"is called {rec.calls} times per forward(), but rnnedge "
                                   "carries one cache per op: use one module per call")
        a = timed[0]
        fl = fr = fr2 = 0
        if rec.pad is not None:
            shape, pad, mode, value = pads1[rec.pad]
            fl, fr = _pad_at(pad, len(shape), a)
            fl2, fr2 = (None, None) if other.pad is None else \
                _pad_at(pads2[other.pad][1], len(shape), a)
            # Padding after the sequence may follow the length (a "valid length" pad) where
            # a flush ends the stream as the model does (a late graph: ``ends``, checked
            # against the model); before the sequence it may not.
            if fl2 != fl:
                raise _refuse(path, m, "is fed an input padded along time by an amount that "
                                       "depends on the length (lengths-dependent arithmetic)")
            fr3 = _pad_at(pads3[rec.pad][1], len(shape), a)[1]
            if len({fr, fr2, fr3}) > 1:
                varying = varying or _refuse(
                    path, m, "is fed an input padded along time by an amount that depends on "
                             "the length (lengths-dependent arithmetic)")
            if fl or fr or fr2 or fr3:
                if mode != "constant" or (value or 0) != 0:
                    raise _refuse(path, m, f"its input is padded along time with mode {mode!r} "
                                           f"value {value!r}; only zero padding streams")
                fused.add(rec.pad)
        n1 = rec.shape[a] - fl - fr
        n2 = other.shape[a] - fl - fr2
        op = _op(path, m, a, rec.out if isinstance(m, TRANSPOSED) else rec.shape, fl, fr)
        if op is None:
            continue  # kernel 1 and stride 1 along time: per frame
        per_frame = Fraction(grow, n2 - n1)  # model input frames per frame of this op's input
        # Its input comes in whole frames; a conv/pool's also in whole strides (a transposed
        # conv's output is s frames per input frame, whatever the count).
        need = per_frame if op.kind == "transposed" else per_frame * op.stride
        multiple = math.lcm(multiple, need.numerator)
        ops.append(dataclasses.replace(op, multiple=need.numerator, per_frame=per_frame,
                                       pad_call=rec.pad if rec.pad in fused else None))
    order = {path: k for k, (path, _) in enumerate(model.named_modules())}
    ops.sort(key=lambda op: order[op.path])
    if not any(op.delay for op in ops):  # no flush to stand for them: late graphs end with one
        if loose:
            raise refused
        if varying:
            raise varying
    return ops, multiple, loose


def _loose(pad: tuple, shape: tuple) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"forward() pads along the time axis (F.pad {pad} on an input of shape {shape}) where "
        "the padded tensor does not go straight into a convolution or pooling; rnnedge streams "
        "zero padding only as the cache of the op it feeds (or, after the sequence, as a "
        "flush's zeros where an op looks ahead): pad right before the op (or with its own "
        "padding=), or export with mode='sequence'")


def end_pad(model: nn.Module, call, x, n: int) -> int:
    """The zero steps the model's first F.pad of an input of ``n`` steps along time appends
    (0: none), from one run of ``call(x)``."""
    _, pads = _run(call, model, x)
    for shape, pad, _mode, _value in pads.calls:
        for a in range(len(shape)):
            if shape[a] == n:
                left, right = _pad_at(pad, len(shape), a)
                if right and not left:
                    return right
    return 0


def frames_in(model: nn.Module, call, x) -> dict:
    """{module path: the shape of its input without the model's own F.pad before it} of
    the watched modules, from one run of ``call(x)``."""
    seen, pads = _run(call, model, x)
    out = {}
    for path, rec in seen.items():
        shape = list(rec.shape)
        if rec.pad is not None:
            padded, pad = pads.calls[rec.pad][:2]
            for a in range(len(shape)):
                shape[a] -= sum(_pad_at(pad, len(padded), a))
        out[path] = tuple(shape)
    return out


def _op(path: str, m: nn.Module, a: int, shape: tuple, fl: int, fr: int) -> TemporalOp | None:
    """The TemporalOp of module ``m`` along axis ``a`` of its input, or None for an op that
    works per frame; ``shape``: its input's (its output's for a transposed conv)."""
    i = a - 2
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
        k, d = _pair(m.kernel_size, i), _pair(m.dilation, i)
    elif isinstance(m, POOLS):
        k, d = _pair(m.kernel_size, i), 1
    else:
        k, d = m.kernel_size[i], m.dilation[i]
    s = _pair(m.stride, i) if not isinstance(m, POOLS) or m.stride else k
    span = d * (k - 1) + 1
    padding = m.padding
    if isinstance(padding, str):
        total = 0 if padding == "valid" else span - 1
        pl, pr = total // 2, total - total // 2
    else:
        pl = pr = _pair(padding, i)
    if getattr(m, "padding_mode", "zeros") != "zeros" and pl:
        raise _refuse(path, m, f"pads time with padding_mode {m.padding_mode!r}; only zeros stream")
    if getattr(m, "ceil_mode", False):
        raise _refuse(path, m, "uses ceil_mode=True, whose last window depends on the length")
    left, right = pl + fl, pr + fr
    if span == 1 and s == 1 and not (left or right):
        return None
    cache_shape = tuple("batch" if j == 0 else (None if j == a else int(n)) for j, n in enumerate(shape))
    if isinstance(m, TRANSPOSED):
        if pl or _pair(m.output_padding, i) or fl or fr:
            raise _refuse(path, m, "crops or pads its output along time (padding/output_padding, "
                                   "which depend on where the sequence ends: crop after it instead)")
        if span < s:
            raise _refuse(path, m, f"has a kernel reach {span} shorter than its stride {s}")
        c = span - s
        kind = "transposed"
    else:
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) and left:
            raise _refuse(path, m, "pads time with -inf, which a zero cache cannot stand for")
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)) and left and not m.count_include_pad:
            raise _refuse(path, m, "averages without counting its padding (count_include_pad="
                                   "False), which a zero cache cannot stand for")
        # The one cache length in [span - s, span - 1] that keeps the windows where the
        # model puts them (congruent to left modulo the stride).
        c = span - s + (left - (span - s)) % s
        if c < 0:
            raise _refuse(path, m, f"has a stride {s} larger than its kernel reach {span}, so it "
                                   "skips frames across chunks")
        if c < left:
            raise _refuse(path, m, f"pads {left} frame(s) before the sequence, more than its "
                                   f"kernel reach {span} needs")
        # It emits (c - left) / s frames before the sequence starts (dropped: latency);
        # the frames its right padding adds at the end come from a flush (``ends``).
        delay = c - left
        kind = "conv" if isinstance(m, CONVS) else "pool"
        return TemporalOp(path, kind, a, span, s, left, fl, fr, c,
                          tuple(c if n is None else n for n in cache_shape), delay=delay,
                          right=right)
    cache_shape = tuple(c if n is None else n for n in cache_shape)
    return TemporalOp(path, kind, a, span, s, left, fl, fr, c, cache_shape)
