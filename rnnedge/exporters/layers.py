"""Plans for PyTorch's own recurrent modules: nn.RNN/LSTM/GRU and their cells.

The graph is built straight from the module's weights (no tracing), so nothing of the
example's shape can be baked in: batch and time are dynamic by construction.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rnnedge.contract import ExportSpec, StateSpec, TensorSpec
from rnnedge.errors import UnsupportedModelError, UsageError
from rnnedge.gate.plan import Plan
from rnnedge.graphs.builder import GraphBuilder
from rnnedge.graphs.emit import emit_cell, emit_stack
from rnnedge.recurrent import CELLS, has_own_forward, kind_of


def is_layer(model) -> bool:
    """One of PyTorch's recurrent modules with its own forward (a subclass that overrides
    forward is a model: the whole-model route refuses or handles it)."""
    return has_own_forward(model)


def input_axes(model) -> tuple:
    """The data input's axes for a layer, e.g. ("batch", "time", 16)."""
    if isinstance(model, CELLS):
        return ("batch", model.input_size)
    seq = ("batch", "time") if model.batch_first else ("time", "batch")
    return (*seq, model.input_size)


def source_of(model) -> dict:
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "torch": torch.__version__}


def _check_example(model, example, ndim: int, layout: str) -> None:
    if not isinstance(example, torch.Tensor):
        raise UsageError(
            f"example_input for {type(model).__name__} must be a tensor {layout}, "
            f"got {type(example).__name__}"
        )
    if example.dim() != ndim or example.shape[-1] != model.input_size:
        raise UsageError(
            f"example_input for {type(model).__name__}(input_size={model.input_size}) must be "
            f"{layout} with {model.input_size} features, got shape {tuple(example.shape)}; "
            "give a batch axis and the layer's input size"
        )
    if example.dtype != torch.float32:
        raise UsageError(
            f"example_input must be float32, got {example.dtype}; convert the model and "
            "example with .float()"
        )
    param = next(model.parameters(), None)
    if param is not None and param.dtype != torch.float32:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {param.dtype} weights; rnnedge exports float32 "
            "models: call model.float() first"
        )


def _state_names(kind: str) -> list[tuple[str, str]]:
    return [("h0", "hn"), ("c0", "cn")] if kind == "LSTM" else [("h0", "hn")]


def plan_stack(model: nn.RNNBase, example, mode: str, opset: int, lengths: bool) -> Plan:
    """Plan for nn.RNN/LSTM/GRU. Input (batch, time, I) if batch_first else (time, batch, I)."""
    kind = kind_of(model)
    layout = "(batch, time, features)" if model.batch_first else "(time, batch, features)"
    _check_example(model, example, 3, layout)
    if model.bidirectional and mode == "stream":
        raise UnsupportedModelError(
            f"{type(model).__name__} is bidirectional: its backward direction needs the "
            "future of the sequence, so it cannot stream step by step; export it with "
            "mode='sequence' (--mode sequence), which takes a whole sequence per call"
        )
    if lengths and mode == "stream":
        raise UsageError(
            "a lengths input is only for mode='sequence'; in stream mode every row "
            "advances one chunk per call"
        )
    dirs = 2 if model.bidirectional else 1
    hidden = model.hidden_size
    h_out = model.proj_size or hidden
    seq_shape = ["batch", "time"] if model.batch_first else ["time", "batch"]
    time_axis = 1 if model.batch_first else 0
    inputs = [TensorSpec("input", "float32", (*seq_shape, model.input_size))]
    if lengths:
        inputs.append(TensorSpec("lengths", "int64", ("batch",)))
    outputs = [TensorSpec("output", "float32", (*seq_shape, dirs * h_out))]
    state_shapes = [(model.num_layers * dirs, "batch", h_out), (model.num_layers * dirs, "batch", hidden)]
    states = [
        StateSpec(i, o, "float32", shape, batch_axis=1)
        for (i, o), shape in zip(_state_names(kind), state_shapes)
    ]
    spec = ExportSpec(mode, tuple(inputs), tuple(outputs), tuple(states), time_axis, opset,
                      source_of(model))

    g = GraphBuilder(opset)
    x = g.input("input", "float32", inputs[0].shape)
    seq_lens = None
    if lengths:
        g.input("lengths", "int64", ["batch"])
        seq_lens = g.op("Cast", ["lengths"], to=6, hint="seq_lens")  # ONNX wants int32
    for s in states:
        g.input(s.input, s.dtype, s.shape)
    if model.batch_first:
        x = g.op("Transpose", [x], perm=[1, 0, 2], hint="x_tm")
    y, hn, cn = emit_stack(g, model, x, "h0", "c0" if kind == "LSTM" else None, seq_lens)
    if model.batch_first:
        y = g.op("Transpose", [y], perm=[1, 0, 2], hint="y_bf")
    g.output(y, "output", "float32", outputs[0].shape)
    for s, value in zip(states, (hn, cn)):
        g.output(value, s.output, s.dtype, s.shape)
    graph = g.model(type(model).__name__)

    return Plan(
        spec=spec,
        graph=graph,
        reference=_stack_reference(model, kind),
        sample=_float_sample(model.input_size, model.batch_first),
        lengths_input="lengths" if lengths else None,
        model=model,  # the gate's float64 referee runs the reference with it in float64
    )


def plan_cell(model: nn.Module, example, mode: str, opset: int) -> Plan:
    """Plan for nn.RNNCell/LSTMCell/GRUCell: one step per call, input (batch, I)."""
    kind = kind_of(model)
    _check_example(model, example, 2, "(batch, features)")
    hidden = model.hidden_size
    inputs = [TensorSpec("input", "float32", ("batch", model.input_size))]
    outputs = [TensorSpec("output", "float32", ("batch", hidden))]
    states = [StateSpec(i, o, "float32", ("batch", hidden), 0) for i, o in _state_names(kind)]
    spec = ExportSpec(mode, tuple(inputs), tuple(outputs), tuple(states), None, opset,
                      source_of(model))

    g = GraphBuilder(opset)
    g.input("input", "float32", inputs[0].shape)
    for s in states:
        g.input(s.input, s.dtype, s.shape)
    hn, cn = emit_cell(g, model, "input", "h0", "c0" if kind == "LSTM" else None)
    g.output(hn, "output", "float32", outputs[0].shape)
    for s, value in zip(states, (hn, cn)):
        g.output(value, s.output, s.dtype, s.shape)
    graph = g.model(type(model).__name__)
    return Plan(spec, graph, _cell_reference(model, kind), _float_sample(model.input_size, None),
                model=model)


def _float_sample(features: int, batch_first: bool | None):
    def sample(rng: np.random.Generator, batch: int, time: int | None) -> dict:
        if time is None:
            shape = (batch, features)
        else:
            shape = (batch, time, features) if batch_first else (time, batch, features)
        return {"input": rng.standard_normal(shape).astype(np.float32)}

    return sample


def _stack_reference(model: nn.RNNBase, kind: str):
    def reference(inputs: dict, states: dict):
        x = torch.from_numpy(inputs["input"])
        h0 = torch.from_numpy(states["h0"])
        hx = (h0, torch.from_numpy(states["c0"])) if kind == "LSTM" else h0
        with torch.no_grad():
            if "lengths" in inputs:
                lengths = torch.from_numpy(inputs["lengths"])
                packed = nn.utils.rnn.pack_padded_sequence(
                    x, lengths, batch_first=model.batch_first, enforce_sorted=False
                )
                y, hn = model(packed, hx)
                y, _ = nn.utils.rnn.pad_packed_sequence(
                    y, batch_first=model.batch_first, total_length=x.shape[int(model.batch_first)]
                )
            else:
                y, hn = model(x, hx)
        new = {"h0": (hn[0] if kind == "LSTM" else hn).numpy()}
        if kind == "LSTM":
            new["c0"] = hn[1].numpy()
        return {"output": y.numpy()}, new

    return reference


def _cell_reference(model: nn.Module, kind: str):
    def reference(inputs: dict, states: dict):
        x = torch.from_numpy(inputs["input"])
        h0 = torch.from_numpy(states["h0"])
        with torch.no_grad():
            if kind == "LSTM":
                h, c = model(x, (h0, torch.from_numpy(states["c0"])))
                return {"output": h.numpy()}, {"h0": h.numpy(), "c0": c.numpy()}
            h = model(x, h0)
        return {"output": h.numpy()}, {"h0": h.numpy()}

    return reference


def plan_layer(model, example, mode: str, opset: int, lengths: bool | None) -> Plan:
    """The plan for any of PyTorch's recurrent modules (``is_layer(model)`` must hold)."""
    if isinstance(model, CELLS):
        if lengths:
            raise UsageError("a lengths input needs a time axis; cells take one step per call")
        if mode == "sequence":
            raise UsageError(
                f"{type(model).__name__} takes one step per call, so it has no sequence to take "
                "whole; export it with mode='stream'"
            )
        return plan_cell(model, example, mode, opset)
    return plan_stack(model, example, mode, opset, bool(lengths))
