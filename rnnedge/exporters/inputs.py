"""Data inputs of a model plan: their names, dtypes, axes, example sizes and sampling.

Names. Data inputs: ``input`` (one) or ``input.0``, ``input.1``, ... (several, in forward
order). Each is float32 (features) or int64/int32 (token ids); integer inputs are sampled
in ``[0, num_embeddings)`` of the nn.Embedding that reads them, else in the example's range.

Axes. ``input_axes`` (one tuple per data input: ``"batch"``, ``"time"``, or an int / None
for a fixed size) says which axis is which. Without it: when the model holds an
nn.RNN/LSTM/GRU, inputs are ``(batch, time, ...)`` if the first one is batch_first, else
``(time, batch, ...)`` (kept only if forward runs at another length); otherwise (cells
only, or plain code) an input is ``(batch, fixed...)`` and the graph takes one step per
call (``time_axis`` null). Every data input must have a batch axis; ``time`` is dynamic
and the gate streams it in chunks. Each input has its own time axis (its position of
"time", or none), and the timed inputs share their number of steps. An int64 (batch,)
input that forward packs its sequences with is renamed ``lengths`` (``packed``) and
sampled full length (the gate draws per-row lengths itself). Traced examples are tiled to batch >= 2 and time >= 3
so that no dynamic size is specialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rnnedge.contract import TensorSpec
from rnnedge.errors import UsageError
from rnnedge.recurrent import STACKS

DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32"}
TRACE_BATCH, TRACE_TIME = 2, 3


@dataclass
class Input:
    """One data input: graph name, dtype, axes ("batch" / "time" / fixed int)."""

    name: str
    dtype: str
    axes: tuple
    low: int = 0  # integer inputs: sampled in [low, high)
    high: int = 0
    constant: bool = False  # constant per stream (no time axis), e.g. an attention memory

    def shape(self, batch: int, time: int | None) -> tuple:
        return tuple(batch if a == "batch" else time if a == "time" else a for a in self.axes)

    def spec(self) -> TensorSpec:
        # Token ids: the contract records the range the gate sampled (the vocabulary).
        span = (self.low, self.high) if self.dtype.startswith("int") and self.high > self.low else None
        return TensorSpec(self.name, self.dtype, self.axes, span, self.constant)


def example_tuple(example_input) -> tuple[torch.Tensor, ...]:
    items = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise UsageError(
            "example_input for a model must be a tensor or a tuple of tensors (one per data "
            f"input of forward), got {type(example_input).__name__}"
        )
    for t in items:
        if t.dtype not in DTYPES:
            raise UsageError(
                f"example_input tensors must be float32 (features) or int64/int32 (token ids), "
                f"got {t.dtype}; convert the model and example with .float()"
            )
        if t.dim() == 0 or 0 in t.shape:
            raise UsageError(
                f"example_input tensors need a batch axis and no empty axis, got shape "
                f"{tuple(t.shape)}"
            )
    return items


def numbered_names(base: str, n: int) -> list[str]:
    return [base] if n == 1 else [f"{base}.{i}" for i in range(n)]


def data_names(input_names, n: int) -> list[str]:
    """The data inputs' graph names: ``input_names`` (e.g. forward's parameter names, as
    ``--input NAME=...`` gives them) checked, else ``input`` / ``input.0``, ``input.1``, ..."""
    if input_names is None:
        return numbered_names("input", n)
    names = list(input_names)
    if len(names) != n or not all(isinstance(x, str) and x for x in names):
        raise UsageError(f"input_names must be {n} non-empty string(s), one per data input, got "
                         f"{names!r}")
    # Other graph names: states "state" / "state.N" (lifted ones hold a dot, which a
    # parameter name cannot), outputs "output" / "output.N".
    taken = [x for x in names if x.partition(".")[0] in ("state", "output")]
    if len(set(names)) != n or taken:
        raise UsageError(f"input_names must be distinct and not a state's or output's name "
                         f"(state, state.N, output, output.N), got {names!r}")
    return names


def mark_constants(inputs: list[Input], constants) -> None:
    """Mark the inputs named in ``constants`` as constant per stream (no time axis)."""
    names = [i.name for i in inputs]
    for name in constants or ():
        if name not in names:
            raise UsageError(f"constants names {name!r}, which is not a data input; the data "
                             f"inputs are {names}")
        info = inputs[names.index(name)]
        if "time" in info.axes:
            raise UsageError(f"input {name!r} is marked constant but has a time axis "
                             f"{info.axes}; a constant is fed once per stream: give it fixed sizes")
        info.constant = True


def given_axes(input_axes, examples) -> list[tuple]:
    if isinstance(input_axes, tuple) and input_axes and not isinstance(input_axes[0], (tuple, list)):
        input_axes = [input_axes]
    axes_list = [tuple(a) for a in input_axes]
    if len(axes_list) != len(examples):
        raise UsageError(
            f"input_axes gives {len(axes_list)} input(s) but example_input has {len(examples)}"
        )
    out = []
    for k, (axes, x) in enumerate(zip(axes_list, examples)):
        if len(axes) != x.dim():
            raise UsageError(
                f"input_axes[{k}] {axes} has {len(axes)} axes but example input {k} has shape "
                f"{tuple(x.shape)}"
            )
        fixed = []
        for i, a in enumerate(axes):
            if isinstance(a, str) and a.isdigit():
                a = int(a)
            if a is None:
                a = int(x.shape[i])
            if isinstance(a, bool) or not (a in ("batch", "time") or isinstance(a, int)):
                raise UsageError(
                    f"input_axes[{k}] axis {i} is {a!r}: use 'batch', 'time' or a fixed size"
                )
            if isinstance(a, int) and a != x.shape[i]:
                raise UsageError(
                    f"input_axes[{k}] fixes axis {i} at {a} but the example has {x.shape[i]}"
                )
            fixed.append(a)
        if fixed.count("batch") != 1 or fixed.count("time") > 1:
            raise UsageError(
                f"input_axes[{k}] {tuple(fixed)} must name exactly one 'batch' axis and at most "
                "one 'time' axis"
            )
        out.append(tuple(fixed))
    # Each input has its own time axis (a (batch, 1, time, F) spectrogram and a (batch,
    # time) mask may go together); they share the number of steps (example_sizes).
    return out


def inferred_axes(examples, layers) -> list[tuple]:
    stacks = [m for _, m in layers if isinstance(m, STACKS)]
    out = []
    for x in examples:
        rest = tuple(int(d) for d in x.shape)
        if stacks and x.dim() >= 2:
            lead = ("batch", "time") if stacks[0].batch_first else ("time", "batch")
            out.append(lead + rest[2:])
        else:
            out.append(("batch",) + rest[1:])
    return out


def resize(x: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """``x`` tiled (or cut) along ``axis`` to size ``n``."""
    size = x.shape[axis]
    if size < n:
        reps = [1] * x.dim()
        reps[axis] = -(-n // size)
        x = x.repeat(*reps)
    return x.narrow(axis, 0, n).contiguous()


def at_size(examples, inputs: list[Input], batch: int, time: int | None):
    out = []
    for x, info in zip(examples, inputs):
        for axis, a in enumerate(info.axes):
            if a == "batch":
                x = resize(x, axis, batch)
            elif a == "time" and time is not None:
                x = resize(x, axis, time)
        out.append(x)
    return tuple(out)


def example_sizes(examples, axes_list) -> tuple[int, int | None]:
    batches = {int(x.shape[a.index("batch")]) for x, a in zip(examples, axes_list)}
    times = {int(x.shape[a.index("time")]) for x, a in zip(examples, axes_list) if "time" in a}
    if len(batches) > 1 or len(times) > 1:
        raise UsageError(
            f"example inputs disagree on the batch or time size: batch {sorted(batches)}, "
            f"time {sorted(times)}"
        )
    return batches.pop(), (times.pop() if times else None)


def trace_sizes(batch: int, time: int | None) -> tuple[int, int | None]:
    tb = max(batch, TRACE_BATCH)
    if time is None:
        return tb, None
    tt = max(time, TRACE_TIME)
    return tb, (tt + 1 if tt == tb else tt)


def token_ranges(model: nn.Module, call: Callable, examples) -> dict[int, tuple[int, int]]:
    """For integer inputs consumed by an nn.Embedding: {input index: (0, num_embeddings)}."""
    found: dict[int, tuple[int, int]] = {}

    def hook(module, args):
        for k, x in enumerate(examples):
            if args and args[0] is x:
                found.setdefault(k, (0, int(module.num_embeddings)))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return found


def make_sample(inputs: list[Input]):
    def sample(rng: np.random.Generator, batch: int, time: int | None) -> dict:
        out = {}
        for info in inputs:
            shape = info.shape(batch, time)
            if info.name == "lengths" and shape == (batch,):  # packed sequences: full rows
                out[info.name] = np.full(batch, 1 if time is None else time, np.int64)
            elif info.dtype.startswith("int"):
                out[info.name] = rng.integers(info.low, info.high, size=shape).astype(info.dtype)
            else:
                out[info.name] = rng.standard_normal(shape).astype(info.dtype)
        return out

    return sample
