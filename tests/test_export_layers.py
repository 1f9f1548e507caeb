"""Exporter core: PyTorch's recurrent layers and cells against eager, through the file."""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import rnnedge
from tests import ortref

# Tolerances per dtype for the tests' own, independent comparison.
TOL = {"float32": dict(atol=1e-5, rtol=1e-4)}
FUSED = {"LSTM", "GRU", "RNN"}


def make_stack(kind, layers, batch_first, bias, bidirectional=False, dropout=0.0):
    torch.manual_seed(7 + layers)
    common = dict(num_layers=layers, batch_first=batch_first, bias=bias,
                  bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)
    if kind == "lstm-proj":
        return nn.LSTM(6, 12, proj_size=5, **common)
    if kind.startswith("rnn"):
        return nn.RNN(6, 12, nonlinearity=kind.split("-")[1], **common)
    return {"lstm": nn.LSTM, "gru": nn.GRU}[kind](6, 12, **common)


def eager(model, x, states, lengths=None):
    """Eager PyTorch over the whole sequence; returns (output, [state tensors])."""
    hx = tuple(torch.from_numpy(s) for s in states)
    hx = hx if isinstance(model, nn.LSTM) else hx[0]
    xt = torch.from_numpy(x)
    with torch.no_grad():
        if lengths is not None:
            packed = nn.utils.rnn.pack_padded_sequence(
                xt, torch.from_numpy(lengths), batch_first=model.batch_first, enforce_sorted=False)
            y, hn = model(packed, hx)
            y, _ = nn.utils.rnn.pad_packed_sequence(
                y, batch_first=model.batch_first, total_length=xt.shape[int(model.batch_first)])
        else:
            y, hn = model(xt, hx)
    hn = hn if isinstance(hn, tuple) else (hn,)
    return y.numpy(), [h.numpy() for h in hn]


def seq_input(model, batch, time, seed=0):
    rng = np.random.default_rng(seed)
    shape = (batch, time, 6) if model.batch_first else (time, batch, 6)
    return rng.standard_normal(shape).astype(np.float32)


def random_states(meta, batch, seed=1):
    rng = np.random.default_rng(seed)
    return {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in ortref.zero_states(meta, batch).items()}


STACK_MATRIX = list(itertools.product(
    ["rnn-tanh", "rnn-relu", "lstm", "lstm-proj", "gru"], [1, 2, 3], [True, False], [True, False]))


@pytest.mark.parametrize("kind,layers,batch_first,bias", STACK_MATRIX)
def test_stack_streams_equal_eager(tmp_path, kind, layers, batch_first, bias):
    model = make_stack(kind, layers, batch_first, bias, dropout=0.3)
    model.train()  # the export must use inference semantics and leave the mode alone
    example = torch.randn(1, 1, 6)  # B=1, T=1 must not freeze any axis
    path = tmp_path / "m.onnx"
    report = rnnedge.export(model, path, example_input=example)
    assert model.training
    model.eval()
    meta = ortref.contract(path)
    sess = ortref.session(path)
    # Lengths and chunks the gate never uses, with a carried non-zero state.
    for batch, time, chunks in [(2, 11, (4, 1, 6)), (1, 13, (13,)), (4, 9, (1,) * 9)]:
        x = seq_input(model, batch, time, seed=time)
        states = random_states(meta, batch)
        want_y, want_states = eager(model, x, list(states.values()))
        got, got_states = ortref.stream(sess, meta, {"input": x}, dict(states), chunks)
        np.testing.assert_allclose(got["output"], want_y, **TOL["float32"])
        for name, want in zip(states, want_states):
            np.testing.assert_allclose(got_states[name], want, **TOL["float32"])
    assert report.metadata["parity"]["cases"] == len(report.cases) >= 12


@pytest.mark.parametrize("kind,layers,batch_first", list(itertools.product(
    ["rnn-tanh", "lstm", "lstm-proj", "gru"], [1, 2], [True, False])))
def test_bidirectional_sequence_mode_with_lengths(tmp_path, kind, layers, batch_first):
    model = make_stack(kind, layers, batch_first, True, bidirectional=True).eval()
    path = tmp_path / "m.onnx"
    rnnedge.export(model, path, example_input=torch.from_numpy(seq_input(model, 2, 5)),
                   mode="sequence")
    meta = ortref.contract(path)
    assert meta["mode"] == "sequence"
    assert [i["name"] for i in meta["inputs"]] == ["input", "lengths"]
    sess = ortref.session(path)
    x = seq_input(model, 3, 17)
    lengths = np.array([17, 4, 11], dtype=np.int64)
    states = random_states(meta, 3)
    want_y, want_states = eager(model, x, list(states.values()), lengths)
    got, got_states = ortref.call(sess, meta, {"input": x, "lengths": lengths}, states)
    np.testing.assert_allclose(got["output"], want_y, **TOL["float32"])
    for name, want in zip(states, want_states):
        np.testing.assert_allclose(got_states[name], want, **TOL["float32"])


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn-tanh"])
def test_bidirectional_stream_mode_is_refused(tmp_path, kind):
    model = make_stack(kind, 1, True, True, bidirectional=True)
    with pytest.raises(rnnedge.UnsupportedModelError, match="bidirectional.*future.*sequence"):
        rnnedge.export(model, tmp_path / "m.onnx", example_input=torch.randn(2, 5, 6))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cell_cls,kwargs", [
    (nn.RNNCell, {}), (nn.RNNCell, {"nonlinearity": "relu"}), (nn.RNNCell, {"bias": False}),
    (nn.LSTMCell, {}), (nn.LSTMCell, {"bias": False}), (nn.GRUCell, {}), (nn.GRUCell, {"bias": False}),
])
@pytest.mark.parametrize("batch", [1, 5])
def test_cells_step_equal_eager(tmp_path, cell_cls, kwargs, batch):
    torch.manual_seed(3)
    cell = cell_cls(6, 10, **kwargs).eval()
    path = tmp_path / "cell.onnx"
    rnnedge.export(cell, path, example_input=torch.randn(1, 6))
    meta = ortref.contract(path)
    assert meta["time_axis"] is None
    sess = ortref.session(path)
    rng = np.random.default_rng(0)
    states = random_states(meta, batch)
    hx = [torch.from_numpy(v) for v in states.values()]
    for _ in range(20):
        x = rng.standard_normal((batch, 6)).astype(np.float32)
        with torch.no_grad():
            out = cell(torch.from_numpy(x), tuple(hx) if cell_cls is nn.LSTMCell else hx[0])
        hx = list(out) if isinstance(out, tuple) else [out]
        got, states = ortref.call(sess, meta, {"input": x}, states)
        np.testing.assert_allclose(got["output"], hx[0].numpy(), **TOL["float32"])
        for name, want in zip(states, hx):
            np.testing.assert_allclose(states[name], want.numpy(), **TOL["float32"])


@pytest.mark.parametrize("model,example,mode", [
    (nn.LSTM(6, 12, num_layers=3, proj_size=4), torch.randn(5, 2, 6), "stream"),
    (nn.GRU(6, 12, num_layers=2, bidirectional=True, batch_first=True), torch.randn(2, 5, 6), "sequence"),
    (nn.RNN(6, 12, num_layers=2), torch.randn(5, 2, 6), "stream"),
    (nn.GRUCell(6, 12), torch.randn(2, 6), "stream"),
])
def test_graph_structure_and_metadata(tmp_path, model, example, mode):
    path = tmp_path / "m.onnx"
    report = rnnedge.export(model, path, example_input=example, mode=mode)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert not {"Loop", "If", "Scan"} & set(ops)
    fused = [op for op in ops if op in FUSED]
    assert len(fused) == getattr(model, "num_layers", 1)
    for node in proto.graph.node:
        if node.op_type == "GRU":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["linear_before_reset"] == 1
    # Weights appear once and live inside the file.
    blobs = [init.raw_data for init in proto.graph.initializer if init.raw_data]
    big = [b for b in blobs if len(b) > 64]
    assert len(big) == len(set(big))
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    assert list(tmp_path.iterdir()) == [path]

    meta = json.loads({p.key: p.value for p in proto.metadata_props}["rnnedge"])
    assert meta["format"] == 1 and meta["mode"] == mode and meta["opset"] == 18
    assert set(meta) == {"format", "mode", "inputs", "outputs", "states", "time_axis", "opset",
                         "source", "parity"}
    assert meta["source"]["class"].endswith(type(model).__name__)
    assert meta["source"]["torch"] == torch.__version__
    parity = {"max_abs": report.max_abs, "max_rel": report.max_rel, "cases": len(report.cases)}
    assert {k: meta["parity"][k] for k in parity} == parity
    assert meta["parity"]["referee"] == "float64"  # a PyTorch layer runs in float64
    graph_inputs = [i.name for i in proto.graph.input]
    graph_outputs = [o.name for o in proto.graph.output]
    assert graph_inputs == [i["name"] for i in meta["inputs"]] + [s["input"] for s in meta["states"]]
    assert graph_outputs == [o["name"] for o in meta["outputs"]] + [s["output"] for s in meta["states"]]
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
        declared = {i["name"]: i["shape"] for i in meta["inputs"] + meta["outputs"]}
        declared.update({s["input"]: s["shape"] for s in meta["states"]})
        declared.update({s["output"]: s["shape"] for s in meta["states"]})
        assert dims == declared[vi.name]
    for s in meta["states"]:
        assert s["shape"][s["batch_axis"]] == "batch" and s["init"] == "zeros"


def swap_lstm_gates(node, initializers):
    """PyTorch's gate order (i, f, g, o) left in ONNX's slots (i, o, f, c): the classic silent
    mistake. W, R: (1, 4*hidden, in); B: (1, 8*hidden), the W and R biases one after the other."""
    from onnx import numpy_helper

    for name, order in zip(node.input[1:4], ([0, 2, 3, 1], [0, 2, 3, 1], [0, 2, 3, 1, 4, 6, 7, 5])):
        blocks = np.split(numpy_helper.to_array(initializers[name]), len(order), axis=1)
        swapped = np.concatenate([blocks[i] for i in order], axis=1)
        initializers[name].CopyFrom(numpy_helper.from_array(swapped, name))


def drop_linear_before_reset(node, initializers):
    """GRU's reset gate applied before the recurrent product (ONNX's default), not after as in PyTorch."""
    for attr in list(node.attribute):
        if attr.name == "linear_before_reset":
            node.attribute.remove(attr)


@pytest.mark.parametrize("model,op,break_graph", [
    (lambda: nn.LSTM(6, 12), "LSTM", swap_lstm_gates),
    (lambda: nn.GRU(6, 12), "GRU", drop_linear_before_reset),
], ids=["lstm-gate-order", "gru-reset-placement"])
def test_broken_translation_fails_the_gate(cli, tmp_path, model, op, break_graph):
    # A correct export, then the written file broken the way a wrong translation would be:
    # `rnnedge verify` (the gate on the file's own bytes) must name the misses and exit 1.
    torch.manual_seed(0)
    module = model()
    graph, weights_file = tmp_path / "m.onnx", tmp_path / "m.pt"
    rnnedge.export(module, graph, example_input=torch.randn(5, 2, 6))
    torch.save(module, weights_file)
    verify = ["verify", graph, "--against", weights_file, "--trust-pickle"]
    assert cli(*verify).exit_code == 0

    proto = onnx.load(str(graph))
    node = next(n for n in proto.graph.node if n.op_type == op)
    break_graph(node, {t.name: t for t in proto.graph.initializer})
    onnx.save(proto, str(graph))
    line = cli.one_error_line(cli(*verify), 1)
    assert line.startswith("error: parity failed") and "output max abs" in line and "hn max abs" in line


def test_tolerance_override_is_honoured(tmp_path):
    model = nn.GRU(6, 12, num_layers=2)
    with pytest.raises(rnnedge.ParityError, match="atol=0, rtol=0"):
        rnnedge.export(model, tmp_path / "a.onnx", example_input=torch.randn(5, 2, 6),
                       atol=0.0, rtol=0.0)
    report = rnnedge.export(model, tmp_path / "b.onnx", example_input=torch.randn(5, 2, 6),
                            atol=1e-3, rtol=1e-3)
    assert (report.atol, report.rtol) == (1e-3, 1e-3)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(example_input=torch.randn(2, 5, 7)), rnnedge.UsageError, "6 features.*got shape"),
    (dict(example_input=torch.randn(5, 6)), rnnedge.UsageError, "batch axis"),
    (dict(example_input=torch.randn(2, 5, 6).double()), rnnedge.UsageError, "float32"),
    (dict(example_input=[1, 2]), rnnedge.UsageError, "must be a tensor"),
    (dict(example_input=torch.randn(2, 5, 6), mode="chunky"), rnnedge.UsageError, "mode must be"),
    (dict(example_input=torch.randn(2, 5, 6), opset=9), rnnedge.UsageError, "opset must be"),
    (dict(example_input=torch.randn(2, 5, 6), opset=27), rnnedge.UsageError, "opset must be an integer from 14 to"),
    (dict(example_input=torch.randn(2, 5, 6), atol=-1.0), rnnedge.UsageError, "atol"),
    (dict(example_input=torch.randn(2, 5, 6), lengths=True), rnnedge.UsageError, "sequence"),
])
def test_bad_arguments_are_usage_errors(tmp_path, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        rnnedge.export(nn.LSTM(6, 12), tmp_path / "m.onnx", **kwargs)
    assert not list(tmp_path.iterdir())


# An option that cannot work is refused before any work: the progress display never
# hears of planning, the model is not traced, nothing is written.
BAD_OPTIONS = [
    (dict(precision="int4"), "precision must be one of"),
    (dict(mode="chunky"), "mode must be one of"),
    (dict(opset=9), "opset must be"),
    (dict(rtol=float("nan")), "rtol must be a"),
    (dict(mode="sequence", triton_repo="repo"), "needs mode='stream'"),
    (dict(triton_name="m"), "triton_name needs triton_repo"),
    (dict(triton_repo="repo", triton_name="no/slash"), "Triton model name"),
    (dict(triton_repo="."), "would land in or on the Triton repository"),
    (dict(path="missing/m.onnx"), "expected an existing folder"),
    (dict(path="."), "it is a folder"),
]


@pytest.mark.parametrize("options,pattern", BAD_OPTIONS)
def test_bad_options_fail_before_any_work(tmp_path, monkeypatch, options, pattern):
    monkeypatch.chdir(tmp_path)
    heard = []
    options = dict(options)
    path = options.pop("path", "m.onnx")
    with pytest.raises(rnnedge.UsageError, match=pattern):
        rnnedge.export(nn.GRU(6, 12), path, example_input=torch.randn(5, 2, 6),
                       progress=heard.append, **options)
    assert heard == []
    assert not list(tmp_path.iterdir())


def test_a_good_export_reports_its_stages_in_order(tmp_path):
    heard = []
    rnnedge.export(nn.GRU(6, 12), tmp_path / "m.onnx", example_input=torch.randn(5, 2, 6),
                   progress=heard.append)
    stages = [text for text in heard if not text.startswith("parity gate: ")]
    assert [s.split(" ")[0] for s in stages] == ["planning", "checking"]
    assert heard.index(stages[1]) < len(heard) - 1  # the gate's cases come after the check


def test_export_options_are_frozen_and_normalised():
    import dataclasses

    from rnnedge.exporters import ExportOptions
    from rnnedge.graphs.opset import DEFAULT_OPSET

    options = ExportOptions(precision="INT8")
    assert (options.precision, options.opset, options.mode) == ("int8", DEFAULT_OPSET, "stream")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.mode = "sequence"
    with pytest.raises(rnnedge.UsageError, match="precision must be one of"):
        ExportOptions(precision="int4")


def test_inference_mode_restores_every_modules_own_flag():
    from rnnedge.exporters.inference import inference_mode

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    model.train()
    model[2].eval()  # frozen on purpose
    with pytest.raises(RuntimeError), inference_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("the export failed")
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_cells_have_no_sequence_mode(tmp_path):
    with pytest.raises(rnnedge.UsageError, match="one step per call"):
        rnnedge.export(nn.GRUCell(6, 12), tmp_path / "m.onnx", example_input=torch.randn(2, 6),
                       mode="sequence")


def test_unwritable_destination_is_a_usage_error(tmp_path):
    with pytest.raises(rnnedge.UsageError, match="existing folder"):
        rnnedge.export(nn.GRU(6, 12), tmp_path / "missing" / "m.onnx",
                       example_input=torch.randn(5, 2, 6))


def test_other_opsets(tmp_path):
    from rnnedge.graphs.opset import max_opset

    for opset in (14, 17, 20, max_opset()):
        report = rnnedge.export(nn.LSTM(6, 12), tmp_path / f"m{opset}.onnx",
                                example_input=torch.randn(5, 2, 6), opset=opset)
        assert report.metadata["opset"] == opset
        assert onnx.load(str(report.path)).opset_import[0].version == opset
