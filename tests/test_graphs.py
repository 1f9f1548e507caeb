"""Graph passes (rnnedge.graphs): unfusing GRU/RNN into Scan, the batch-first variant, walking
subgraphs, topological order and names. Graphs are built here with onnx.helper, apart from
rnnedge's own builder, and run with plain onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import rnnedge
from rnnedge.errors import ExportError, UnsupportedModelError
from rnnedge.graphs.batch_first import BatchFirstPass, batch_first
from rnnedge.graphs.builder import GraphBuilder, Writer
from rnnedge.graphs.names import Names
from rnnedge.graphs.unfuse import UnfusePass, has_fused, unfuse
from rnnedge.graphs.walk import op_counts, toposort

F = TensorProto.FLOAT
T, B, IN, H = 7, 3, 4, 5


def vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def model_of(nodes, inputs, outputs, inits=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def run(model: onnx.ModelProto, feeds: dict) -> list:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def fused(kind: str, dirs: int, *, lengths: bool, h0: bool, **attrs) -> tuple:
    """One fused GRU/RNN node graph and feeds: x (T, B, IN) -> y (T, D, B, H), yh (D, B, H)."""
    rng = np.random.default_rng(1)
    gates = 3 if kind == "GRU" else 1
    inits = [("W", rng.standard_normal((dirs, gates * H, IN)).astype(np.float32)),
             ("R", rng.standard_normal((dirs, gates * H, H)).astype(np.float32) * 0.5),
             ("B", rng.standard_normal((dirs, 2 * gates * H)).astype(np.float32))]
    ins = ["x", "W", "R", "B", "lens" if lengths else "", "h0" if h0 else ""]
    if dirs == 2:
        attrs["direction"] = "bidirectional"
    node = helper.make_node(kind, ins, ["y", "yh"], name="rec", hidden_size=H, **attrs)
    inputs = [vi("x", ["T", "B", IN])]
    feeds = {"x": rng.standard_normal((T, B, IN)).astype(np.float32)}
    if lengths:
        inputs.append(vi("lens", ["B"], TensorProto.INT32))
        feeds["lens"] = np.array([T, 2, 5], np.int32)
    if h0:
        inputs.append(vi("h0", [dirs, "B", H]))
        feeds["h0"] = rng.standard_normal((dirs, B, H)).astype(np.float32)
    outputs = [vi("y", ["T", dirs, "B", H]), vi("yh", [dirs, "B", H])]
    return model_of([node], inputs, outputs, inits), feeds


UNFUSE_CASES = [
    ("GRU", 1, False, True, {"linear_before_reset": 1}),
    ("GRU", 1, True, False, {"linear_before_reset": 0}),
    ("GRU", 2, True, True, {"linear_before_reset": 1}),
    ("RNN", 1, True, True, {}),
    ("RNN", 2, False, True, {"activations": ["Relu", "Tanh"]}),
]


@pytest.mark.parametrize("kind,dirs,lengths,h0,attrs", UNFUSE_CASES)
def test_unfuse_keeps_outputs_equal(kind, dirs, lengths, h0, attrs):
    model, feeds = fused(kind, dirs, lengths=lengths, h0=h0, **attrs)
    before = model.SerializeToString()
    out = unfuse(model)
    assert model.SerializeToString() == before  # the input is left as it was
    onnx.checker.check_model(out, full_check=True)
    assert not has_fused(out) and op_counts(out)["Scan"] == dirs
    assert [v.name for v in out.graph.input] == [v.name for v in model.graph.input]
    assert [v.name for v in out.graph.output] == ["y", "yh"]
    assert not {"W", "R", "B"} & {t.name for t in out.graph.initializer}  # fused weights gone
    for want, got in zip(run(model, feeds), run(out, feeds)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attrs,pattern", [
    ({"clip": 1.0}, "clip"),
    ({"layout": 1}, "layout=1"),
    ({"activations": ["HardSigmoid", "Tanh"]}, "activations"),
])
def test_unfuse_requires_what_it_can_express(attrs, pattern):
    model, _ = fused("GRU", 1, lengths=False, h0=True, **attrs)
    with pytest.raises(UnsupportedModelError, match=pattern):
        unfuse(model)
    # The pass itself refuses in its precondition, before touching the graph.
    graph = ir.from_proto(model)
    with pytest.raises(ir.passes.PreconditionError):
        UnfusePass()(graph)
    assert [n.op_type for n in graph.graph] == ["GRU"]


def test_unfuse_refuses_computed_weights():
    model, _ = fused("RNN", 1, lengths=False, h0=True)
    w = [t for t in model.graph.initializer if t.name == "W"][0]
    model.graph.initializer.remove(w)
    model.graph.input.append(vi("W", [1, H, IN]))  # W now computed: a graph input
    with pytest.raises(UnsupportedModelError, match="computed weights"):
        unfuse(model)


def test_op_counts_include_scan_bodies():
    model, _ = fused("GRU", 1, lengths=True, h0=True, linear_before_reset=1)
    out = unfuse(model)
    top = {n.op_type for n in out.graph.node}
    counts = op_counts(out)
    assert "Sigmoid" not in top and counts["Sigmoid"] == 1  # only inside the Scan body
    body = next(a.g for n in out.graph.node if n.op_type == "Scan" for a in n.attribute)
    assert sum(counts.values()) == len(out.graph.node) + len(body.node)


def test_export_report_counts_subgraph_nodes(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.GRU(4, 6).eval()
    report = rnnedge.export(model, tmp_path / "g.onnx", example_input=torch.randn(1, 1, 4),
                            precision="int8")
    graph = onnx.load(tmp_path / "g.onnx")
    assert report.graph["ops"] == op_counts(graph)
    assert report.graph["ops"].get("Sigmoid") and "Sigmoid" not in {n.op_type for n in graph.graph.node}


def time_major_with_state() -> tuple:
    """x (T, B, IN), h0 (1, B, H) -> y (T, B, H), hn (1, B, H): y = x @ W + h0, hn = last y."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((IN, H)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "h0"], ["y"]),
             helper.make_node("Slice", ["y", "minus1", "big", "zero"], ["hn"])]
    inits = [("W", W), ("minus1", np.array([-1], np.int64)), ("big", np.array([T * 9], np.int64)),
             ("zero", np.array([0], np.int64))]
    model = model_of(nodes, [vi("x", ["T", "B", IN]), vi("h0", [1, "B", H])],
                     [vi("y", ["T", "B", H]), vi("hn", [1, "B", H])], inits)
    feeds = {"x": rng.standard_normal((T, B, IN)).astype(np.float32),
             "h0": rng.standard_normal((1, B, H)).astype(np.float32)}
    return model, feeds


def dims(v) -> list:
    return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]


def test_batch_first_moves_inputs_outputs_and_states():
    model, feeds = time_major_with_state()
    moves = {"x": [1, 0, 2], "y": [1, 0, 2], "h0": [1, 0, 2], "hn": [1, 0, 2]}
    out = batch_first(model, moves)
    onnx.checker.check_model(out, full_check=True)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    assert [v.name for v in out.graph.input] == ["x", "h0"]
    assert [v.name for v in out.graph.output] == ["y", "hn"]
    assert [dims(v) for v in out.graph.input] == [["B", "T", IN], ["B", 1, H]]
    assert [dims(v) for v in out.graph.output] == [["B", "T", H], ["B", 1, H]]
    want = run(model, feeds)
    got = run(out, {k: np.ascontiguousarray(v.transpose(1, 0, 2)) for k, v in feeds.items()})
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g, w.transpose(1, 0, 2))
    assert op_counts(out)["Transpose"] == 4


def test_batch_first_leaves_unmoved_tensors():
    model, feeds = time_major_with_state()
    out = batch_first(model, {"h0": [1, 0, 2]})
    assert [dims(v) for v in out.graph.input] == [["T", "B", IN], ["B", 1, H]]
    got = run(out, {**feeds, "h0": np.ascontiguousarray(feeds["h0"].transpose(1, 0, 2))})
    np.testing.assert_array_equal(got[0], run(model, feeds)[0])


@pytest.mark.parametrize("moves,pattern", [
    ({"nope": [1, 0, 2]}, "not in the graph"),
    ({"x": [1, 0]}, "does not fit"),
    ({"x": [0, 0, 1]}, "does not fit"),
])
def test_batch_first_requires_tensors_it_can_move(moves, pattern):
    model, _ = time_major_with_state()
    with pytest.raises(ExportError, match=pattern):
        batch_first(model, moves)
    with pytest.raises(ir.passes.PreconditionError):
        BatchFirstPass(moves)(ir.from_proto(model))


def test_toposort_orders_nodes_and_subgraph_reads():
    """A Scan whose body reads an outer value listed after it; a Cast listed after its reader."""
    step = helper.make_graph(
        [helper.make_node("Add", ["s", "bias"], ["s2"]), helper.make_node("Identity", ["s2"], ["o"])],
        "body", [vi("s", [2]), vi("xt", [2])], [vi("s2", [2]), vi("o", [2])])
    nodes = [
        helper.make_node("Scan", ["s0", "xs"], ["sn", "ys"], body=step, num_scan_inputs=1),
        helper.make_node("Relu", ["xf"], ["bias"]),
        helper.make_node("Identity", ["x"], ["xs"]),
        helper.make_node("Cast", ["x16"], ["xf"], to=F),
    ]
    model = model_of(nodes, [vi("s0", [2]), vi("x", [3, 2]), vi("x16", [2], TensorProto.FLOAT16)],
                     [vi("sn", [2]), vi("ys", [3, 2])])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    out = toposort(model)
    onnx.checker.check_model(out, full_check=True)
    order = [n.op_type for n in out.graph.node]
    assert order.index("Cast") < order.index("Relu") < order.index("Scan")
    feeds = {"s0": np.zeros(2, np.float32), "x": np.ones((3, 2), np.float32),
             "x16": np.array([1, -2], np.float16)}
    np.testing.assert_array_equal(run(out, feeds)[0], [3, 0])


def test_names_are_unique_across_scopes():
    names = Names(["a"])
    assert [names("a"), names("a"), names("b")] == ["a_1", "a_2", "b"]
    model, _ = fused("GRU", 1, lengths=False, h0=True, linear_before_reset=1)
    out = unfuse(unfuse(model, kinds=("GRU",)))  # a second run finds nothing to do
    taken = Names.of(ir.from_proto(out).graph)
    assert {"x", "h0", "y", "yh"} <= taken.used and any("h_prev" in n for n in taken.used)
    # Names.of sees into the Scan body: a new writer there cannot reuse a body name.
    assert "rec_d0_RT" in taken.used
    assert Writer(taken, prefix="rec_d0_").const(np.zeros(1, np.float32), "RT").name == "rec_d0_RT_1"


def test_builder_names_hints_uniquely_and_keeps_io_names():
    g = GraphBuilder(18)
    x = g.input("x", "float32", ["batch", 3])
    a = g.op("Relu", [x], hint="x")  # the hint of a graph input: renamed, never shadowing it
    b = g.op("Relu", [a], hint="x")
    g.output(b, "y", "float32", ["batch", 3])
    g.output("x", "x_copy", "float32", ["batch", 3])
    model = g.model("m", {"key": "value"})
    onnx.checker.check_model(model, full_check=True)
    assert [n.output[0] for n in model.graph.node] == ["x_1", "x_2", "y", "x_copy"]
    assert {p.key: p.value for p in model.metadata_props} == {"key": "value"}
    assert model.producer_name == "rnnedge" and model.ir_version == 8
    got = run(model, {"x": np.array([[-1, 2, -3]], np.float32)})
    np.testing.assert_array_equal(got[0], [[0, 2, 0]])
