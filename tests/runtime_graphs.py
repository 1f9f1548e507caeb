"""Small stateful ONNX graphs built with onnx.helper for the runtime tests (no exporter needed).

Every builder returns the serialized model (bytes), which ``rnnedge.load`` accepts.
Graphs use opset 18 and IR version 10 (onnxruntime refuses onnx's newer default IR).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
F32 = TensorProto.FLOAT


def finish(nodes, inputs, outputs, inits, meta: dict | None = None, name="g") -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    if meta is not None:
        helper.set_model_props(model, {"rnnedge": json.dumps(meta)})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, list(shape))


def meta(inputs, outputs, states, time_axis, mode="stream") -> dict:
    """rnnedge metadata (format 1) from (name, dtype, shape) and (in, out, shape, batch_axis)."""
    return {
        "format": 1,
        "mode": mode,
        "inputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in inputs],
        "outputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in outputs],
        "states": [{"input": i, "output": o, "dtype": "float32", "shape": list(s),
                    "batch_axis": b, "init": "zeros"} for i, o, s, b in states],
        "time_axis": time_axis,
        "opset": OPSET,
        "source": {"class": "tests.runtime_graphs", "torch": None},
        "parity": {},
    }


def rnn(kind: str = "LSTM", features: int = 3, hidden: int = 5, layers: int = 1,
        batch_first: bool = False, lengths: bool = False, bidirectional: bool = False,
        seed: int = 0, with_meta: bool = True) -> bytes:
    """nn.LSTM/GRU/RNN-like stack: input (time, batch, F) or (batch, time, F), states
    (layers*dirs, batch, H) with batch_axis 1, output (.., dirs*H). ``lengths`` adds an
    int64 (batch,) input and makes the graph mode "sequence"."""
    rng = np.random.default_rng(seed)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[kind]
    dirs = 2 if bidirectional else 1
    seq = ["batch", "time"] if batch_first else ["time", "batch"]
    nodes, inits = [], []

    def const(arr, name):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    x = "input"
    if batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["x_tm"], perm=[1, 0, 2]))
        x = "x_tm"
    seq_lens = ""
    if lengths:
        nodes.append(helper.make_node("Cast", ["lengths"], ["seq_lens"], to=TensorProto.INT32))
        seq_lens = "seq_lens"
    state_names = [("h0", "hn"), ("c0", "cn")] if kind == "LSTM" else [("h0", "hn")]
    outs = {o: [] for _, o in state_names}
    size = features
    for layer in range(layers):
        w = (rng.standard_normal((dirs, gates * hidden, size)) * 0.4).astype(np.float32)
        r = (rng.standard_normal((dirs, gates * hidden, hidden)) * 0.4).astype(np.float32)
        b = (rng.standard_normal((dirs, 2 * gates * hidden)) * 0.1).astype(np.float32)
        bounds = [const(np.array([layer * dirs]), f"s{layer}"),
                  const(np.array([(layer + 1) * dirs]), f"e{layer}"), const(np.array([0]), f"a{layer}")]
        ins = [x, const(w, f"W{layer}"), const(r, f"R{layer}"), const(b, f"B{layer}"), seq_lens]
        for i, _ in state_names:
            nodes.append(helper.make_node("Slice", [i, *bounds], [f"{i}_{layer}"]))
            ins.append(f"{i}_{layer}")
        attrs = {"hidden_size": hidden}
        if bidirectional:
            attrs["direction"] = "bidirectional"
        if kind == "GRU":
            attrs["linear_before_reset"] = 1
        y = f"Y{layer}"
        node_outs = [y] + [f"{o}_{layer}" for _, o in state_names]
        nodes.append(helper.make_node(kind, ins, node_outs, **attrs))
        for _, o in state_names:
            outs[o].append(f"{o}_{layer}")
        nodes.append(helper.make_node("Transpose", [y], [f"{y}t"], perm=[0, 2, 1, 3]))
        nodes.append(helper.make_node("Reshape", [f"{y}t", const(np.array([0, 0, -1]), f"shp{layer}")],
                                      [f"y{layer}"]))
        x = f"y{layer}"
        size = dirs * hidden
    if batch_first:
        nodes.append(helper.make_node("Transpose", [x], ["output"], perm=[1, 0, 2]))
    else:
        nodes.append(helper.make_node("Identity", [x], ["output"]))
    for _, o in state_names:
        nodes.append(helper.make_node("Concat", outs[o], [o], axis=0))

    sshape = [layers * dirs, "batch", hidden]
    in_specs = [("input", "float32", [*seq, features])]
    graph_in = [vi("input", [*seq, features])]
    if lengths:
        in_specs.append(("lengths", "int64", ["batch"]))
        graph_in.append(vi("lengths", ["batch"], TensorProto.INT64))
    graph_in += [vi(i, sshape) for i, _ in state_names]
    graph_out = [vi("output", [*seq, dirs * hidden])] + [vi(o, sshape) for _, o in state_names]
    m = meta(in_specs, [("output", "float32", [*seq, dirs * hidden])],
             [(i, o, sshape, 1) for i, o in state_names], 1 if batch_first else 0,
             "sequence" if lengths or bidirectional else "stream")
    return finish(nodes, graph_in, graph_out, inits, m if with_meta else None, kind)


def step_cell(features: int = 3, hidden: int = 4, seed: int = 1) -> bytes:
    """A step graph (time_axis null): h' = tanh(x W + h U + b); outputs y = 2 h' and h'.

    input x (batch, F); state h (batch, H), batch_axis 0."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((features, hidden)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((hidden, hidden)) * 0.5).astype(np.float32), "U"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "b"),
             numpy_helper.from_array(np.float32(2.0), "two")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("MatMul", ["h", "U"], ["hu"]),
             helper.make_node("Add", ["xw", "hu"], ["s0"]),
             helper.make_node("Add", ["s0", "b"], ["s1"]),
             helper.make_node("Tanh", ["s1"], ["h_next"]),
             helper.make_node("Mul", ["h_next", "two"], ["y"])]
    m = meta([("x", "float32", ["batch", features])], [("y", "float32", ["batch", hidden])],
             [("h", "h_next", ["batch", hidden], 0)], None)
    return finish(nodes, [vi("x", ["batch", features]), vi("h", ["batch", hidden])],
                  [vi("y", ["batch", hidden]), vi("h_next", ["batch", hidden])], inits, m, "cell")


def step_cell_reference(features: int = 3, hidden: int = 4, seed: int = 1):
    """(W, U, b) of ``step_cell`` with the same seed, to compute it in numpy."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((features, hidden)) * 0.5).astype(np.float32)
    u = (rng.standard_normal((hidden, hidden)) * 0.5).astype(np.float32)
    b = rng.standard_normal(hidden).astype(np.float32) * 0.1
    return w, u, b


def foreign(state_in: str = "h0", state_out: str = "hn", *, extra_outputs=(), const_input=None,
            features: int = 3, hidden: int = 4, batch_dim="batch", time_dim=None, seed: int = 2,
            state_shape=None) -> bytes:
    """A graph without metadata: a leaky accumulator h' = 0.5 h + x W (+ rate), y = h'.

    x: (batch, F), or (batch, time_dim, F) summed over time when time_dim is given;
    state (1, batch, H); ``const_input`` names an extra scalar float input added to h';
    ``extra_outputs`` are more outputs (copies of h') named to confuse the pairing.
    """
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((features, hidden)) * 0.5).astype(np.float32), "W"),
             numpy_helper.from_array(np.float32(0.5), "half")]
    x_shape = [batch_dim, features] if time_dim is None else [batch_dim, time_dim, features]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["_xw"])]
    xw = "_xw"
    if time_dim is not None:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
        nodes.append(helper.make_node("ReduceSum", ["_xw", "ax1"], ["_xws"], keepdims=0))
        xw = "_xws"
    nodes += [helper.make_node("Mul", [state_in, "half"], ["_hh"]),
              helper.make_node("Add", ["_hh", xw], ["_sum"])]
    last = "_sum"
    ins = [vi("x", x_shape)]
    if const_input:
        nodes.append(helper.make_node("Add", ["_sum", const_input], ["_sum2"]))
        last = "_sum2"
        ins.append(vi(const_input, []))
    sshape = state_shape or [1, batch_dim, hidden]
    ins.append(vi(state_in, sshape))
    nodes.append(helper.make_node("Identity", [last], [state_out]))
    nodes.append(helper.make_node("Squeeze", [last, helper_zero(inits)], ["y"]))
    outs = [vi("y", [batch_dim, hidden]), vi(state_out, sshape)]
    for name in extra_outputs:
        nodes.append(helper.make_node("Identity", [last], [name]))
        outs.append(vi(name, sshape))
    return finish(nodes, ins, outs, inits, None, "foreign")


def helper_zero(inits) -> str:
    if not any(t.name == "ax0" for t in inits):
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "ax0"))
    return "ax0"
