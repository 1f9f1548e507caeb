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


def strided_late(latency: int, multiple: int, delay: int = 0, channels: int = 2) -> bytes:
    """A stream graph that is both late and strided, honouring the contract exactly.

    The model on a whole input x (batch, N, C), zeros past its end: u[t] = x[t] + 2 x[t+L]
    (t < N: a look-ahead of L = ``latency``); up (batch, 2N, C): u and -u interleaved
    (time_ratio 2); y (batch, ceil(N/M), C): blocks of M = ``multiple`` frames of v =
    ``delay`` zero frames then u (zeros past its end), y[j] = sum_i (i+1) v[jM+i]
    (time_ratio [1, M]). Streamed: a cache of the last L input frames, a frame counter
    (look.seen) and the flush state: a stream's first call drops u's first L frames and
    puts the delay in front of v, so v's frames come in blocks when the first call has
    T1 = L - delay (mod M) steps (``chunk_offset``; any other length fails in Reshape) and
    later ones multiples of M. A flush call (flush state F >= L) emits u up to F frames
    before its end and pads v to a block with zeros. delay <= L.
    """
    big = np.iinfo(np.int64).max
    inits = []

    def c(name, value, dtype=np.int64):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    n = helper.make_node
    c("L", [latency]), c("M", [multiple]), c("D", [delay]), c("zero", [0]), c("one", [1])
    c("ax1", [1]), c("ax2", [2]), c("big", [big]), c("two", 2.0, np.float32)
    c("w", (np.arange(multiple, dtype=np.float32) + 1).reshape(multiple, 1), np.float32)
    c("shp_up", [0, -1, channels]), c("shp_blocks", [0, -1, multiple, channels])
    nodes = [
        n("Shape", ["x"], ["T"], start=1, end=2),
        n("Concat", ["look.cache0", "x"], ["z"], axis=1),
        n("Slice", ["z", "zero", "T", "ax1"], ["z_now"]),
        n("Add", ["L", "T"], ["LT"]),
        n("Slice", ["z", "L", "LT", "ax1"], ["z_ahead"]),
        n("Mul", ["z_ahead", "two"], ["z_ahead2"]),
        n("Add", ["z_now", "z_ahead2"], ["u_all"]),
        n("Slice", ["z", "T", "big", "ax1"], ["look.cachen"]),
        # Row 0's counters count for all rows.
        n("Slice", ["look.seen0", "zero", "one", "zero"], ["seen_r"]),
        n("Reshape", ["seen_r", "one"], ["seen_f"]),
        n("Cast", ["seen_f"], ["seen"], to=TensorProto.INT64),
        n("Slice", ["latency.flush0", "zero", "one", "zero"], ["flush_r"]),
        n("Reshape", ["flush_r", "one"], ["flush_f"]),
        n("Cast", ["flush_f"], ["flush"], to=TensorProto.INT64),
        n("Sub", ["L", "seen"], ["L_seen"]),
        n("Max", ["zero", "L_seen"], ["drop"]),
        n("Sub", ["flush", "L"], ["F_L"]),
        n("Max", ["zero", "F_L"], ["cut_end"]),
        n("Sub", ["T", "cut_end"], ["kend"]),
        n("Slice", ["u_all", "drop", "kend", "ax1"], ["u"]),
        n("Unsqueeze", ["u", "ax1"], ["u_1"]),
        n("Transpose", ["u_1"], ["u_2"], perm=[0, 2, 1, 3]),
        n("Neg", ["u_2"], ["u_neg"]),
        n("Concat", ["u_2", "u_neg"], ["u_pair"], axis=2),
        n("Reshape", ["u_pair", "shp_up"], ["up"]),
        n("Equal", ["seen", "zero"], ["is_first"]),
        n("Cast", ["is_first"], ["first_i"], to=TensorProto.INT64),
        n("Mul", ["first_i", "D"], ["pre"]),
        n("Sub", ["kend", "drop"], ["count_u"]),
        n("Add", ["count_u", "pre"], ["count_v"]),
        n("Mod", ["count_v", "M"], ["rest"]),
        n("Sub", ["M", "rest"], ["short"]),
        n("Mod", ["short", "M"], ["to_block"]),
        n("Greater", ["flush", "zero"], ["is_flush"]),
        n("Cast", ["is_flush"], ["flush_i"], to=TensorProto.INT64),
        n("Mul", ["to_block", "flush_i"], ["post"]),
        n("Concat", ["zero", "pre", "zero", "zero", "post", "zero"], ["pads"], axis=0),
        n("Pad", ["u", "pads"], ["v"]),
        n("Reshape", ["v", "shp_blocks"], ["blocks"]),
        n("Mul", ["blocks", "w"], ["weighted"]),
        n("ReduceSum", ["weighted", "ax2"], ["y"], keepdims=0),
        n("Cast", ["T"], ["T_f"], to=TensorProto.FLOAT),
        n("Add", ["look.seen0", "T_f"], ["look.seenn"]),
        n("Sub", ["latency.flush0", "latency.flush0"], ["latency.flushn"]),
    ]
    timed = ["batch", "time", channels]
    states = [("look.cache0", "look.cachen", ["batch", latency, channels], 0),
              ("look.seen0", "look.seenn", ["batch", 1], 0),
              ("latency.flush0", "latency.flushn", ["batch", 1], 0)]
    m = meta([("x", "float32", timed)],
             [("u", "float32", timed), ("up", "float32", timed), ("y", "float32", timed)],
             states, 1)
    m["format"] = 2
    m["outputs"][1]["time_ratio"] = 2
    if multiple > 1:
        m["outputs"][2]["time_ratio"] = [1, multiple]
        m["chunk_multiple"] = multiple
    m["latency"] = latency
    if (latency - delay) % multiple:
        m["chunk_offset"] = (latency - delay) % multiple
    graph_in = [vi("x", timed)] + [vi(i, s) for i, _, s, _ in states]
    graph_out = [vi(name, timed) for name in ("u", "up", "y")] + [vi(o, s) for _, o, s, _ in states]
    return finish(nodes, graph_in, graph_out, inits, m, "strided_late")


def strided_late_reference(x: np.ndarray, latency: int, multiple: int, delay: int = 0):
    """(u, up, y) of ``strided_late``'s model on the whole input x (batch, N, C), in numpy."""
    batch, steps, channels = x.shape
    ahead = np.concatenate([x, np.zeros((batch, latency, channels), x.dtype)], axis=1)
    u = x + 2 * ahead[:, latency:latency + steps]
    up = np.stack([u, -u], axis=2).reshape(batch, 2 * steps, channels)
    v = np.concatenate([np.zeros((batch, delay, channels), x.dtype), u], axis=1)
    v = np.pad(v, [(0, 0), (0, -v.shape[1] % multiple), (0, 0)])
    w = (np.arange(multiple, dtype=np.float32) + 1).reshape(multiple, 1)
    y = (v.reshape(batch, -1, multiple, channels) * w).sum(axis=2)
    return u, up, y[:, :-(-steps // multiple)]
