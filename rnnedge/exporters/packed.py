"""PackedSequence inside forward: ``pack_padded_sequence`` -> layer -> ``pad_packed_sequence``.

A model such as Tacotron2's encoder packs its padded batch with the per-row lengths it is
given, runs an nn.LSTM on the PackedSequence and pads the result again. Packing is
data-dependent (``batch_sizes`` follows the lengths' values), so it cannot be traced;
but ONNX's RNN/LSTM/GRU take the same per-row lengths as ``sequence_lens``. While a
model is patched (``trace.Context.installed``), ``patched`` replaces both functions,
in ``torch.nn.utils.rnn`` and in every module of the model's classes that imported them
by name:

- eagerly (probes, the gate's reference) they are PyTorch's own, packing with
  ``enforce_sorted=False`` (the same result for sorted lengths; the gate draws unsorted
  ones), and a probe records which tensor was given as the lengths;
- while tracing, ``pack_padded_sequence(x, lengths)`` gives a ``Padded`` (x time-major,
  the lengths as int64), the patched layer turns it into the custom op below, and
  ``pad_packed_sequence`` gives ``(y, lengths)`` back::

      rnnedge::stack_h_len (x, h0, lengths, int layer) -> (y, hn)       nn.RNN, nn.GRU
      rnnedge::stack_hc_len(x, h0, c0, lengths, int layer) -> (y, hn, cn) nn.LSTM

translated by ``emit.emit_stack`` with ``sequence_lens`` (int32). The model input that
carries the lengths becomes the graph's int64 ``lengths`` (batch,) input (sequence mode).
The graph's output keeps the input's full length (``total_length`` = T); PyTorch pads to
the longest row, which is the same when one row is full length.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils import rnn as rnn_utils

from rnnedge.errors import UsageError
from rnnedge.exporters.trace import registered
from rnnedge.exporters.translations import OnnxscriptBuilder
from rnnedge.graphs.emit import emit_stack

PACK, PAD = rnn_utils.pack_padded_sequence, rnn_utils.pad_packed_sequence


@dataclass
class Padded:
    """What ``pack_padded_sequence`` gives while tracing: ``data`` (T, B, ...) time-major,
    ``lengths`` (B,) int64."""

    data: Tensor
    lengths: Tensor


# ---------------------------------------------------------------------------
# Custom ops with per-row lengths
# ---------------------------------------------------------------------------


def _run_packed(m, x: Tensor, hx, lengths: Tensor):
    packed = PACK(x, lengths.cpu(), enforce_sorted=False)
    y, hn = type(m).forward(m, packed, hx)
    y, _ = PAD(y, total_length=x.shape[0])
    return y.contiguous(), hn


@torch.library.custom_op("rnnedge::stack_h_len", mutates_args=())
def _stack_h_len(x: Tensor, h0: Tensor, lengths: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    y, hn = _run_packed(registered(layer), x, h0, lengths)
    return y, hn.clone()


@torch.library.custom_op("rnnedge::stack_hc_len", mutates_args=())
def _stack_hc_len(x: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor,
                  layer: int) -> tuple[Tensor, Tensor, Tensor]:
    y, (hn, cn) = _run_packed(registered(layer), x, (h0, c0), lengths)
    return y, hn.clone(), cn.clone()


def _width(m) -> int:
    return (2 if m.bidirectional else 1) * (m.proj_size or m.hidden_size)


@_stack_h_len.register_fake
def _(x, h0, lengths, layer):
    return x.new_empty(x.shape[0], x.shape[1], _width(registered(layer))), h0.new_empty(h0.shape)


@_stack_hc_len.register_fake
def _(x, h0, c0, lengths, layer):
    y = x.new_empty(x.shape[0], x.shape[1], _width(registered(layer)))
    return y, h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def translations(opset: int) -> dict:
    """torch.onnx.export's translations of the two ops: the fused node with sequence_lens."""

    def seq_lens(g, lengths):
        return g.op("Cast", [lengths], to=6)  # ONNX wants int32

    def stack_h_len(x, h0, lengths, layer):
        g = OnnxscriptBuilder(opset)
        y, hn, _ = emit_stack(g, registered(layer), x, h0, None, seq_lens(g, lengths))
        return y, hn

    def stack_hc_len(x, h0, c0, lengths, layer):
        g = OnnxscriptBuilder(opset)
        return emit_stack(g, registered(layer), x, h0, c0, seq_lens(g, lengths))

    ops = torch.ops.rnnedge
    return {ops.stack_h_len.default: stack_h_len, ops.stack_hc_len.default: stack_hc_len}


def traced_call(layer, x: Padded, hx):
    """A stack layer's traced call on a ``Padded``: (Padded y, state) as PyTorch's
    (PackedSequence, state). hx: None or the layer's (h0[, c0]) with batch at axis 1."""
    m = layer.module
    xt = x.data
    if hx is None:
        n = m.num_layers * (2 if m.bidirectional else 1)
        h = xt.new_zeros(n, xt.shape[1], m.proj_size or m.hidden_size)
        hx = (h, xt.new_zeros(n, xt.shape[1], m.hidden_size)) if layer.has_c else h
    ops = torch.ops.rnnedge
    if layer.has_c:
        y, hn, cn = ops.stack_hc_len(xt, hx[0], hx[1], x.lengths, layer.layer_id)
        return Padded(y, x.lengths), (hn, cn)
    y, hn = ops.stack_h_len(xt, hx, x.lengths, layer.layer_id)
    return Padded(y, x.lengths), hn


# ---------------------------------------------------------------------------
# The patched functions
# ---------------------------------------------------------------------------


def _functions(ctx):
    def pack_padded_sequence(input, lengths, batch_first=False, enforce_sorted=True):
        if ctx.probing:
            ctx.packed_lengths.append(lengths)
        if ctx.tracing:
            x = input.transpose(0, 1) if batch_first else input
            return Padded(x, torch.as_tensor(lengths).to(torch.int64))
        return PACK(input, lengths, batch_first=batch_first, enforce_sorted=False)

    def pad_packed_sequence(sequence, batch_first=False, padding_value=0.0, total_length=None):
        if not isinstance(sequence, Padded):
            return PAD(sequence, batch_first=batch_first, padding_value=padding_value,
                       total_length=total_length)
        y = sequence.data  # (T, B, H): zeros past each row's length (ONNX's Y)
        if padding_value:
            steps = torch.arange(y.shape[0], device=y.device).unsqueeze(1)
            valid = (steps < sequence.lengths.unsqueeze(0)).unsqueeze(-1)
            y = torch.where(valid, y, torch.full_like(y, padding_value))
        return (y.transpose(0, 1) if batch_first else y), sequence.lengths

    return {"pack_padded_sequence": pack_padded_sequence, "pad_packed_sequence": pad_packed_sequence}


@contextlib.contextmanager
def patched(ctx):
    """Both functions replaced meanwhile, in torch.nn.utils.rnn and in the modules of the
    model's classes (``from torch.nn.utils.rnn import pack_padded_sequence``)."""
    originals = {"pack_padded_sequence": PACK, "pad_packed_sequence": PAD}
    modules = {id(rnn_utils): rnn_utils}
    for m in ctx.model.modules():
        for cls in type(m).__mro__:
            mod = sys.modules.get(cls.__module__)
            if mod is not None:
                modules.setdefault(id(mod), mod)
    replaced = []
    try:
        for mod in modules.values():
            for name, fn in _functions(ctx).items():
                if getattr(mod, name, None) is originals[name]:
                    setattr(mod, name, fn)
                    replaced.append((mod, name))
        yield
    finally:
        for mod, name in replaced:
            setattr(mod, name, originals[name])


def lengths_input(ctx, inputs: list, probe_x, mode: str, what: str) -> str | None:
    """``"lengths"`` when forward packs its sequences with one of its inputs (which is
    renamed ``lengths``: the graph's int64 (batch,) per-row lengths, sequence mode), else None.

    ``ctx.packed_lengths``: what the probes gave pack_padded_sequence as lengths; the input
    is the one given as is (``lengths.cpu()`` on the CPU is the same tensor) or equal to it.
    """
    given = [t for t in ctx.packed_lengths if isinstance(t, Tensor)]
    if not ctx.packed_lengths:
        return None
    if mode == "stream":
        raise UsageError(
            f"forward() of {what} packs its sequences (pack_padded_sequence), which takes whole "
            "sequences of per-row lengths: export it with mode='sequence' (--mode sequence)")
    for info, x in zip(inputs, probe_x):
        if x.dim() != 1 or not any(t is x or (t.shape == x.shape and torch.equal(t, x)) for t in given):
            continue
        if x.dtype != torch.int64 or info.axes != ("batch",):
            raise UsageError(
                f"input {info.name} of {what} gives pack_padded_sequence its lengths, so it becomes "
                f"the graph's lengths input: give it as int64 of shape (batch,), got {x.dtype} "
                f"with axes {info.axes}")
        info.name, info.low, info.high = "lengths", 0, 0  # no token range: the gate draws them
        return "lengths"
    return None
