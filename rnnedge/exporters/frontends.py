"""Framing front-ends along time, ``torch.stft`` and ``Tensor.unfold``, streamed as the
strided convolutions they are.

A front-end that frames audio (``torch.stft(x, n_fft, hop, window=w, center=False)``, or
``x.unfold(-1, size, step)``) computes each frame from ``size`` samples every ``step``: a
convolution along time with kernel ``size`` and stride ``step``. In stream mode ``find``
runs the model at two lengths (a torch-function mode records every ``F.pad``,
``torch.stft``/``Tensor.stft`` and ``Tensor.unfold`` call) and, for each call whose framed
axis follows the input's length, builds that convolution (``FrontEnd``, ``_module``):

    stft:    Conv1d(1, 2*bins, n_fft, stride=hop), no bias; its weight rows are the
             window (centred in n_fft, as torch.stft pads it) times cos(2 pi f n / n_fft)
             (real part, bins rows) then times -sin (imaginary part), times n_fft**-0.5
             when ``normalized``; bins = n_fft // 2 + 1 (onesided) or n_fft.
    unfold:  the identity basis, Conv1d(1, size, size, stride=step) for a (B, T) input; a
             Conv2d with kernel (1, size) over (B, 1, M, T) where the input has more axes
             (M: the other axes flattened, time moved last).

While ``Frontends.redirected`` is entered, each such module is attached to the model
(``stft0``, ``unfold0``: per kind, in call order) and the model's forward runs under a
mode (``_Redirect``) that sends the k-th call to its module and rebuilds what the caller
expects: a complex (B, bins, frames) tensor (``torch.complex``: torch.onnx exports it and
``.abs()``/``view_as_real`` on it) or its real view (``return_complex=False``), and
(B, .., frames, size) for unfold. So the temporal analysis (``temporal``), the caches
(``conv_cache``), the delay lines, tracing and the gate see a plain strided convolution.
The window's values are read once (by ``find``): a window that changes between calls is
not followed.

Padding. An ``F.pad`` whose output goes straight into a front-end and pads only its time
axis is done on the module's input layout instead (same values for the caller), so that
the temporal analysis sees it feed the convolution: zero padding of ``n_fft - hop``
samples before the sequence (``F.pad(x, (n_fft - hop, 0))``) is causal and streams
exactly. ``center=True`` with ``pad_mode="constant"`` is that convolution's own zero
padding of ``n_fft // 2`` on both sides (look-ahead). What streams and what is refused is
then the temporal analysis' to say; its refusals are re-worded to name the front-end
("torch.stft call 0 (n_fft 16, hop 4; ...)"). Refused here, by name: ``center=True`` with
reflect/replicate/circular padding (it mirrors samples the stream does not have yet), a
1-d (unbatched) signal, and a pad into a front-end whose amount depends on the length.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own alias
from torch import nn
from torch.overrides import TorchFunctionMode

from rnnedge.errors import UnsupportedModelError
from rnnedge.exporters import framing
from rnnedge.exporters.inputs import resize
from rnnedge.exporters.temporal import _pad_at

STFTS = (torch.stft, torch.Tensor.stft)
UNFOLDS = (torch.Tensor.unfold,)
#: Functional convolutions: redirected where their weight is no module's parameter (a
#: fixed filter, e.g. a resampler's sinc kernel made in forward).
FNCONVS = (F.conv1d,)
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
NAMES = {"stft": "torch.stft", "unfold": "Tensor.unfold", "conv": "F.conv1d"}


def _kind(func, args, kwargs) -> str | None:
    """"stft", "unfold" or "conv" for a call ``find`` redirects, else None."""
    if func in STFTS:
        return "stft"
    if func in UNFOLDS:
        return "unfold"
    if func in FNCONVS:
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        return None if isinstance(weight, nn.Parameter) else "conv"
    return None


#: How much longer the second probe run is (which axis follows the length; no rates here).
GROW = 64
_STFT_SIGNATURE = inspect.signature(torch.stft)


@dataclass(frozen=True)
class FrontEnd:
    """One framing call of forward, streamed as a strided convolution.

    kind: "stft" or "unfold"; index: its order among forward's calls of that kind;
    path: the module it is redirected to (attached to the model meanwhile); axis: the
    time axis of its input; mids: the sizes of its input's other non-batch axes; size,
    step: samples per frame and between frames; bins: stft output rows (0 for unfold);
    center: stft's zero padding of size // 2 on both sides; complex_out: stft returns a
    complex tensor (else its real view, (..., 2)).
    """

    kind: str
    index: int
    path: str
    axis: int
    mids: tuple
    size: int
    step: int
    bins: int = 0
    center: bool = False
    complex_out: bool = True

    def describe(self) -> str:
        if self.kind == "conv":
            return (f"F.conv1d call {self.index} (kernel {self.size}, stride {self.step}; "
                    f"streamed as a Conv1d {self.path!r})")
        if self.kind == "stft":
            return (f"torch.stft call {self.index} (n_fft {self.size}, hop {self.step}; streamed "
                    f"as a strided Conv1d {self.path!r})")
        conv = "Conv1d" if not self.mids else "Conv2d"
        return (f"Tensor.unfold call {self.index} (size {self.size}, step {self.step}; streamed "
                f"as a strided {conv} {self.path!r})")


def _refuse(kind: str, index: int, why: str, fix: str = "") -> UnsupportedModelError:
    name = NAMES[kind]
    return UnsupportedModelError(
        f"{name} call {index} along the time axis {why}, so it cannot stream chunk by chunk; "
        f"{fix + ', or ' if fix else ''}export the model with mode='sequence' (--mode sequence)")


@dataclass
class _Seen:
    """One framing call as a probe run saw it."""

    kind: str
    index: int
    args: dict  # its arguments by name (stft: torch.stft's; unfold: dimension, size, step)
    shape: tuple  # its input's
    pad: int | None  # the F.pad call whose output it was given


class _Record(TorchFunctionMode):
    """Records the F.pad calls (input shape, pad, output) and the framing calls."""

    def __init__(self):
        super().__init__()
        self.pads: list = []
        self.calls: list[_Seen] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.pad:
            named = dict(zip(("input", "pad"), args), **kwargs)
            self.pads.append((tuple(named["input"].shape), tuple(named["pad"]), out))
        elif (kind := _kind(func, args, kwargs)) is not None:
            if kind == "stft":
                bound = _STFT_SIGNATURE.bind(*args, **kwargs)
                bound.apply_defaults()
                named = dict(bound.arguments)
            elif kind == "conv":
                named = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                         **dict(zip(_CONV_ARGS, args)), **kwargs}
            else:
                named = dict(zip(("input", "dimension", "size", "step"), args), **kwargs)
            x = named["input"]
            pad = next((i for i, (_, _, o) in enumerate(self.pads) if o is x), None)
            index = sum(c.kind == kind for c in self.calls)
            self.calls.append(_Seen(kind, index, named, tuple(x.shape), pad))
        return out


def _fn_conv(seen, path: str, axis: int) -> tuple:
    """(its FrontEnd, an nn.Conv1d with its fixed weight and options) of an F.conv1d call."""
    args = seen.args
    w = args["weight"].detach()
    groups = int(args["groups"])
    def pick(v):
        return (v if isinstance(v, str) else (int(v[0]) if isinstance(v, (tuple, list))
                                                        else int(v)))
    m = nn.Conv1d(w.shape[1] * groups, w.shape[0], w.shape[2], pick(args["stride"]),
                  pick(args["padding"]), pick(args["dilation"]), groups,
                  bias=args["bias"] is not None)
    m.weight = nn.Parameter(w.to(torch.float32).clone(), requires_grad=False)
    if args["bias"] is not None:
        m.bias = nn.Parameter(args["bias"].detach().to(torch.float32).clone(), requires_grad=False)
    return FrontEnd("conv", seen.index, path, axis, (), w.shape[2], pick(args["stride"])), m.eval()


def _free_name(model: nn.Module, name: str) -> str:
    while hasattr(model, name):
        name = "frontend_" + name
    return name


def find(model: nn.Module, call, inputs, probe_x) -> Frontends:
    """The model's framing front-ends along time, ready to be redirected.

    call(x): runs the model's forward on the inputs ``x`` (a tuple); inputs: the
    exporter's ``Input``s, one with a "time" axis; probe_x: inputs at the example's size.
    """
    longer = tuple(resize(x, i.axes.index("time"), x.shape[i.axes.index("time")] + GROW)
                   if "time" in i.axes else x for i, x in zip(inputs, probe_x))
    runs = []
    for x in (probe_x, longer):
        record = _Record()
        with torch.no_grad(), record:
            call(x)
        if not record.calls and not runs:
            return NONE  # nothing to redirect (the usual case): one probe run only
        runs.append(record)
    if [(c.kind, c.index) for c in runs[0].calls] != [(c.kind, c.index) for c in runs[1].calls]:
        raise UnsupportedModelError(
            "forward() calls torch.stft / Tensor.unfold a number of times that depends on the "
            "input's length, so the calls cannot stream as fixed convolutions; export it with "
            "mode='sequence' (--mode sequence)")
    found, pads, modules = [], {}, {}
    for seen, other in zip(runs[0].calls, runs[1].calls):
        ndim = len(seen.shape)
        axis = ndim - 1 if seen.kind != "unfold" else int(seen.args["dimension"]) % max(ndim, 1)
        if ndim == 0 or seen.shape[axis] == other.shape[axis]:
            continue  # framing along an axis that is not time: a per-frame op, left as it is
        if ndim < 2:
            raise _refuse(seen.kind, seen.index, "takes a 1-d signal with no batch axis; give "
                          "it (batch, time)")
        x = seen.args["input"]
        window = seen.args.get("window")
        if x.is_complex() or not x.is_floating_point() or (window is not None
                                                            and window.is_complex()):
            raise _refuse(seen.kind, seen.index, f"takes a {x.dtype} signal (or a complex "
                          "window); only real floating-point signals and windows stream")
        mids = tuple(int(n) for d, n in enumerate(seen.shape) if d not in (0, axis))
        path = _free_name(model, f"{seen.kind}{seen.index}")
        if seen.kind == "conv":
            fe, m = _fn_conv(seen, path, axis)
            found.append(fe)
            modules[fe.path] = m
            continue  # its input is the module's: a pad before it feeds the module itself
        if seen.kind == "stft":
            kernel, bins, opts = framing.stft_kernel(seen.args)
            if opts["center"] and opts["pad_mode"] != "constant":
                raise _refuse("stft", seen.index, f"pads with center=True, pad_mode="
                              f"{opts['pad_mode']!r}: it mirrors samples around the "
                              "sequence's ends, which a stream does not have yet",
                              "pad causally instead (F.pad(x, (n_fft - hop, 0)) with "
                              "center=False), or with pad_mode='constant'")
            fe = FrontEnd("stft", seen.index, path, axis, mids, kernel.shape[1], opts["hop"],
                          bins, opts["center"], opts["complex"] is not False)
        else:
            size, step = int(seen.args["size"]), int(seen.args["step"])
            kernel = torch.eye(size, dtype=torch.float64)
            fe = FrontEnd("unfold", seen.index, path, axis, mids, size, step)
        if seen.pad is not None:
            _, pad, _ = runs[0].pads[seen.pad]
            other_pad = runs[1].pads[other.pad][1] if other.pad is not None else None
            only_time = all(_pad_at(pad, ndim, d) == (0, 0) for d in range(ndim) if d != axis)
            if only_time and any(_pad_at(pad, ndim, axis)):
                if other_pad != pad:
                    raise _refuse(seen.kind, seen.index, "is fed an input padded along time by "
                                  "an amount that depends on the length (lengths-dependent "
                                  "arithmetic)")
                pads[seen.pad] = (fe, _pad_at(pad, ndim, axis))
        found.append(fe)
        modules[fe.path] = framing.framing_conv(kernel, fe.step, bool(mids))
    return Frontends(model, found, pads, modules)


class Frontends:
    """The model's front-ends as found by ``find``; ``redirected`` streams them as convs."""

    def __init__(self, model: nn.Module, calls: list[FrontEnd], pads: dict, modules: dict):
        self.model = model
        self.calls = {(fe.kind, fe.index): fe for fe in calls}
        self.pads = pads  # F.pad call index -> (front-end it feeds, (left, right) along time)
        self.modules = modules  # path -> nn.Module
        self.depth = 0  # redirected() entered and not left yet: re-entering changes nothing

    @contextlib.contextmanager
    def redirected(self):
        """Meanwhile: the modules attached to the model and its forward redirecting the
        front-end calls to them; a refusal naming a module names its front-end."""
        if not self.calls or self.depth:
            yield self
            return
        model = self.model
        if isinstance(model, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            # A container runs (or lists) every child: the attached conv would become a layer.
            raise UnsupportedModelError(
                f"the model is an {type(model).__name__} whose layers call torch.stft / "
                "Tensor.unfold; rnnedge attaches each front-end's convolution to the model while "
                "exporting, which the container would run as a layer: wrap it in a Module with "
                "its own forward (def forward(self, x): return self.layers(x))")
        own = vars(model).get("forward")
        inner = own if own is not None else type(model).forward.__get__(model)

        def forward(*args, **kwargs):
            with _Redirect(self):
                return inner(*args, **kwargs)

        self.depth += 1
        added = []  # only what was attached is taken off again (a name clash attaches less)
        try:
            for path, m in self.modules.items():
                model.add_module(path, m)
                added.append(path)
            model.forward = forward
            yield self
        except UnsupportedModelError as exc:
            named = self._named(exc)
            if named is exc:
                raise
            raise named from exc
        finally:
            if own is not None:
                model.forward = own
            else:
                vars(model).pop("forward", None)
            for path in added:
                del model._modules[path]
            self.depth -= 1

    def _named(self, exc: UnsupportedModelError) -> UnsupportedModelError:
        names = {repr(fe.path): fe.describe() for fe in self.calls.values()}
        pattern = "(?:Conv[12]d )?(" + "|".join(map(re.escape, names)) + ")"
        text = re.sub(pattern, lambda found: names[found.group(1)], str(exc))
        return exc if text == str(exc) else UnsupportedModelError(text)


def _to_layout(x: torch.Tensor, fe: FrontEnd) -> torch.Tensor:
    """(B, 1, T) or (B, 1, M, T): the module's input for a front-end input ``x``."""
    if not fe.mids:
        return x.unsqueeze(1)
    return x.movedim(fe.axis, -1).flatten(1, -2).unsqueeze(1)


def _from_layout(u: torch.Tensor, fe: FrontEnd) -> torch.Tensor:
    """The front-end input that ``_to_layout`` made ``u`` from."""
    if not fe.mids:
        return u.squeeze(1)
    return u.squeeze(1).unflatten(1, fe.mids).movedim(-1, fe.axis)


class _Redirect(TorchFunctionMode):
    """One forward: sends each front-end call to its module; does the F.pad calls that
    feed them on the module's layout (``padded``: what the caller got -> that tensor)."""

    def __init__(self, fronts: Frontends):
        super().__init__()
        self.fronts = fronts
        self.n_pads = 0
        self.counts = {"stft": 0, "unfold": 0, "conv": 0}
        self.padded: dict[int, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.pad:
            j, self.n_pads = self.n_pads, self.n_pads + 1
            if j in self.fronts.pads:
                return self._pad(args, kwargs, *self.fronts.pads[j])
        elif (kind := _kind(func, args, kwargs)) is not None:
            k, self.counts[kind] = self.counts[kind], self.counts[kind] + 1
            fe = self.fronts.calls.get((kind, k))
            if fe is not None:
                return self._frames(fe, args[0] if args else kwargs["input"])
        return func(*args, **kwargs)

    def _pad(self, args, kwargs, fe: FrontEnd, left_right: tuple) -> torch.Tensor:
        named = dict(zip(("input", "pad", "mode", "value"), args), **kwargs)
        extra = {k: v for k, v in named.items() if k in ("mode", "value")}
        u = F.pad(_to_layout(named["input"], fe), left_right, **extra)
        v = _from_layout(u, fe)
        self.padded[id(v)] = (v, u)
        return v

    def _frames(self, fe: FrontEnd, x: torch.Tensor) -> torch.Tensor:
        if fe.kind == "conv":
            m = self.fronts.modules[fe.path]
            return m.to(x.dtype)(x) if m.weight.dtype != x.dtype else m(x)
        hit = self.padded.get(id(x))
        u = hit[1] if hit is not None and hit[0] is x else _to_layout(x, fe)
        if fe.center:
            u = F.pad(u, (fe.size // 2, fe.size // 2))
        m = self.fronts.modules[fe.path]
        if m.weight.dtype != u.dtype:  # the gate's float64 referee converts the model
            m.to(u.dtype)
        y = m(u)  # (B, K, frames) or (B, K, M, frames)
        if fe.kind == "stft":
            re, im = y[:, : fe.bins], y[:, fe.bins:]
            return torch.complex(re, im) if fe.complex_out else torch.stack([re, im], dim=-1)
        if not fe.mids:
            return y.transpose(1, 2)  # (B, frames, size)
        return y.permute(0, 2, 3, 1).unflatten(1, fe.mids).movedim(-2, fe.axis)


#: No front-ends: ``redirected`` changes nothing (sequence mode, models without a time axis).
NONE = Frontends(None, [], {}, {})
