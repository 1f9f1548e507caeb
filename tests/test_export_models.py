"""Exporting whole models: step-protocol modules, lifted layer state, and what is refused.

Every graph is driven here by plain onnxruntime and its metadata only (tests/ortref.py),
at lengths, chunkings and batch sizes the parity gate never uses, against eager PyTorch
computed without rnnedge (initial states injected with PyTorch's own forward hooks).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import rnnedge
from tests import ortref, zoo

TOL = dict(atol=1e-5, rtol=1e-4)
FUSED = {"LSTM", "GRU", "RNN"}
BATCH, TIME, CHUNKS = 2, 11, (4, 1, 6)


def _seeded(seed, factory, example, **kwargs):
    def make():
        torch.manual_seed(seed)
        return factory().eval(), example(), kwargs

    return make


CASES = {
    # step-protocol modules
    "elman": _seeded(1, zoo.ElmanRNN, lambda: torch.randn(1, 10)),
    "audio": _seeded(2, zoo.AudioCellStep, lambda: torch.randn(1, 64)),
    "cellstack": _seeded(3, zoo.CellStack, lambda: torch.randn(2, 6)),
    "steplstm": _seeded(4, zoo.StepLSTM, lambda: torch.randn(1, 6)),
    "wordlm": _seeded(5, zoo.WordLM, lambda: torch.randint(0, 30, (5, 2))),
    # forward(x) only: state lifted
    "tagger": _seeded(6, zoo.Tagger, lambda: torch.randint(0, 40, (1, 1))),
    "forecaster": _seeded(7, zoo.Forecaster, lambda: torch.randn(5, 1, 4), opset=17),
    "twokinds": _seeded(8, zoo.TwoLayerKinds, lambda: (torch.randn(2, 5, 5), torch.rand(2, 5, 1))),
    "laststep": _seeded(9, zoo.LastStepClassifier, lambda: torch.randn(2, 5, 6)),
    "meanpool_seq": _seeded(10, zoo.MeanPool, lambda: torch.randn(2, 5, 6), mode="sequence"),
    "bi_seq": _seeded(11, zoo.BiEncoder, lambda: torch.randn(2, 5, 6), mode="sequence"),
}

# (state names, shapes) each export must declare.
STATES = {
    "elman": [("state", "state_out", ["batch", 12])],
    "audio": [("state", "state_out", [2, "batch", 10])],
    "cellstack": [(f"state.{i}", f"state.{i}_out", ["batch", 9]) for i in range(3)],
    "steplstm": [(f"state.{i}", f"state.{i}_out", [1, "batch", 8]) for i in range(2)],
    "wordlm": [(f"state.{i}", f"state.{i}_out", [2, "batch", 12]) for i in range(2)],
    "tagger": [("lstm.h0", "lstm.hn", [2, "batch", 12]), ("lstm.c0", "lstm.cn", [2, "batch", 12])],
    "forecaster": [("core.gru.h0", "core.gru.hn", [1, "batch", 10])],
    "twokinds": [("rnn.h0", "rnn.hn", [1, "batch", 7]), ("lstm.h0", "lstm.hn", [1, "batch", 4]),
                 ("lstm.c0", "lstm.cn", [1, "batch", 9])],
    "laststep": [("lstm.h0", "lstm.hn", [1, "batch", 10]), ("lstm.c0", "lstm.cn", [1, "batch", 10])],
    "meanpool_seq": [("gru.h0", "gru.hn", [1, "batch", 8])],
    "bi_seq": [("encoder.0.h0", "encoder.0.hn", [2, "batch", 5]),
               ("encoder.0.c0", "encoder.0.cn", [2, "batch", 5])],
}
FUSED_NODES = {"elman": 0, "audio": 1, "cellstack": 2, "steplstm": 1, "wordlm": 2, "tagger": 2,
               "forecaster": 1, "twokinds": 2, "laststep": 1, "meanpool_seq": 1, "bi_seq": 1}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export each case once for the whole module: key -> (model, path, report)."""
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(key):
        if key not in cache:
            model, example, kwargs = CASES[key]()
            path = root / f"{key}.onnx"
            report = rnnedge.export(model, path, example_input=example, **kwargs)
            cache[key] = (model, path, report)
        return cache[key]

    return get


def random_states(meta, batch, seed=1):
    rng = np.random.default_rng(seed)
    return {k: (0.5 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in ortref.zero_states(meta, batch).items()}


def lifted_eager(model, inputs, states):
    """Eager forward with each layer's initial state injected by a forward pre-hook.

    states: {"<path>.h0": array, "<path>.c0": array}. Returns (outputs, final states by
    the same names), from PyTorch alone.
    """
    paths = sorted({name.rsplit(".", 1)[0] for name in states})
    finals, handles = {}, []
    for path in paths:
        layer = model.get_submodule(path)
        h0 = torch.from_numpy(states[f"{path}.h0"])
        hx = (h0, torch.from_numpy(states[f"{path}.c0"])) if f"{path}.c0" in states else h0

        def pre(module, args, kwargs, hx=hx):
            return (args[0], hx), {}

        def post(module, args, out, path=path):
            hn = out[1]
            finals[f"{path}.h0"] = (hn[0] if isinstance(hn, tuple) else hn).numpy()
            if isinstance(hn, tuple):
                finals[f"{path}.c0"] = hn[1].numpy()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
    try:
        with torch.no_grad():
            out = model(*(torch.from_numpy(v) for v in inputs))
    finally:
        for h in handles:
            h.remove()
    outs = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in outs], finals


# --- step-protocol modules ----------------------------------------------------------

NEST = {
    "elman": lambda s: s[0],
    "audio": lambda s: s[0],
    "cellstack": lambda s: ((s[0],), (s[1], s[2])),
    "steplstm": lambda s: (s[0], s[1]),
}
STEP_INPUT = {"elman": (10,), "audio": (64,), "cellstack": (6,), "steplstm": (6,)}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(NEST))
def test_step_protocol_modules_step_equal_eager(exported, key):
    model, path, report = exported(key)
    meta = ortref.contract(path)
    assert meta["time_axis"] is None and meta["mode"] == "stream"
    assert [(s["input"], s["output"], s["shape"]) for s in meta["states"]] == STATES[key]
    assert [i["name"] for i in meta["inputs"]] == ["input"]
    assert [o["name"] for o in meta["outputs"]] == ["output"]
    assert report.metadata["source"]["class"] == f"tests.zoo.{type(model).__name__}"
    sess = ortref.session(path)
    rng = np.random.default_rng(5)
    for batch in (2, 4):
        states = random_states(meta, batch)
        torch_state = NEST[key]([torch.from_numpy(v) for v in states.values()])
        for _ in range(12):
            x = rng.standard_normal((batch, *STEP_INPUT[key])).astype(np.float32)
            with torch.no_grad():
                y, torch_state = model(torch.from_numpy(x), torch_state)
            got, states = ortref.call(sess, meta, {"input": x}, states)
            np.testing.assert_allclose(got["output"], y.numpy(), **TOL)
            want_states = torch.utils._pytree.tree_leaves(torch_state)
            assert len(want_states) == len(states)
            for got_state, want in zip(states.values(), want_states):
                np.testing.assert_allclose(got_state, want.numpy(), **TOL)


@pytest.mark.slow
def test_step_protocol_with_time_axis_streams_chunks(exported):
    # PyTorch's word_language_model: (time, batch) token ids and an explicit LSTM state.
    model, path, _ = exported("wordlm")
    meta = ortref.contract(path)
    assert meta["time_axis"] == 0
    # Token ids: the contract records the vocabulary the gate sampled them from.
    assert meta["inputs"] == [{"name": "input", "dtype": "int64", "shape": ["time", "batch"],
                               "range": [0, 30], "time_axis": 0}]
    assert meta["outputs"][0]["shape"] == ["time", "batch", 30]
    assert [(s["input"], s["output"], s["shape"]) for s in meta["states"]] == STATES["wordlm"]
    sess = ortref.session(path)
    tokens = np.random.default_rng(0).integers(0, 30, (TIME, BATCH)).astype(np.int64)
    states = random_states(meta, BATCH)
    with torch.no_grad():
        y, (h, c) = model(torch.from_numpy(tokens),
                          tuple(torch.from_numpy(v) for v in states.values()))
    got, got_states = ortref.stream(sess, meta, {"input": tokens}, states, CHUNKS)
    np.testing.assert_allclose(got["output"], y.numpy(), **TOL)
    np.testing.assert_allclose(got_states["state.0"], h.numpy(), **TOL)
    np.testing.assert_allclose(got_states["state.1"], c.numpy(), **TOL)


# --- models whose forward takes only the input: lifted state --------------------------

LIFTED_INPUTS = {
    "tagger": lambda rng: [rng.integers(0, 40, (BATCH, TIME)).astype(np.int64)],
    "forecaster": lambda rng: [rng.standard_normal((TIME, BATCH, 4)).astype(np.float32)],
    "twokinds": lambda rng: [rng.standard_normal((BATCH, TIME, 5)).astype(np.float32),
                             rng.random((BATCH, TIME, 1)).astype(np.float32)],
}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(LIFTED_INPUTS))
def test_lifted_state_streams_equal_eager(exported, key):
    model, path, _ = exported(key)
    meta = ortref.contract(path)
    assert [(s["input"], s["output"], s["shape"]) for s in meta["states"]] == STATES[key]
    names = [i["name"] for i in meta["inputs"]]
    sess = ortref.session(path)
    inputs = LIFTED_INPUTS[key](np.random.default_rng(0))
    feeds = dict(zip(names, inputs))
    out_names = [o["name"] for o in meta["outputs"]]

    # From zero states the streamed graph equals the model's own forward().
    got, _ = ortref.stream(sess, meta, feeds, ortref.zero_states(meta, BATCH), CHUNKS)
    with torch.no_grad():
        own = model(*(torch.from_numpy(v) for v in inputs))
    own = own if isinstance(own, tuple) else (own,)
    assert len(own) == len(out_names)
    for name, want in zip(out_names, own):
        np.testing.assert_allclose(got[name], want.numpy(), **TOL)

    # From random states it equals eager with those states fed to the layers.
    states = random_states(meta, BATCH)
    got, got_states = ortref.stream(sess, meta, feeds, dict(states), CHUNKS)
    want, want_states = lifted_eager(model, inputs, states)
    for name, w in zip(out_names, want):
        np.testing.assert_allclose(got[name], w, **TOL)
    assert set(want_states) == set(states)
    for name, w in want_states.items():
        np.testing.assert_allclose(got_states[name], w, **TOL)


def test_integer_and_several_inputs_and_outputs(exported):
    meta = ortref.contract(exported("tagger")[1])
    assert meta["inputs"] == [{"name": "input", "dtype": "int64", "shape": ["batch", "time"],
                               "range": [0, 40], "time_axis": 1}]
    assert meta["time_axis"] == 1
    meta = ortref.contract(exported("twokinds")[1])
    assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [
        ("input.0", ["batch", "time", 5]), ("input.1", ["batch", "time", 1])]
    meta = ortref.contract(exported("forecaster")[1])
    assert meta["time_axis"] == 0 and meta["opset"] == 17
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
        ("output.0", ["time", "batch", 1]), ("output.1", ["time", "batch", 10])]


@pytest.mark.slow
def test_last_step_classifier_streams_its_running_reading(exported):
    # Streaming y[:, -1]: each call's output is the classifier's reading after that chunk.
    model, path, _ = exported("laststep")
    meta = ortref.contract(path)
    assert meta["mode"] == "stream"
    assert meta["outputs"] == [{"name": "output", "dtype": "float32", "shape": ["batch", 3]}]
    sess = ortref.session(path)
    x = np.random.default_rng(1).standard_normal((BATCH, TIME, 6)).astype(np.float32)
    states, end = ortref.zero_states(meta, BATCH), 0
    for size in CHUNKS:
        got, states = ortref.call(sess, meta, {"input": x[:, end:end + size]}, states)
        end += size
        with torch.no_grad():
            want = model(torch.from_numpy(x[:, :end]))
        np.testing.assert_allclose(got["output"], want.numpy(), **TOL)


@pytest.mark.slow
def test_mean_pooling_needs_sequence_mode(exported, tmp_path):
    torch.manual_seed(10)
    with pytest.raises(rnnedge.ParityError, match=r"Whole sequences match.*mode='sequence'"):
        rnnedge.export(zoo.MeanPool().eval(), tmp_path / "m.onnx",
                       example_input=torch.randn(2, 5, 6))
    assert not list(tmp_path.iterdir())

    model, path, _ = exported("meanpool_seq")
    meta = ortref.contract(path)
    assert meta["mode"] == "sequence"
    x = np.random.default_rng(2).standard_normal((3, 9, 6)).astype(np.float32)
    states = random_states(meta, 3)
    got, got_states = ortref.call(ortref.session(path), meta, {"input": x}, dict(states))
    want, want_states = lifted_eager(model, [x], states)
    np.testing.assert_allclose(got["output"], want[0], **TOL)
    np.testing.assert_allclose(got_states["gru.h0"], want_states["gru.h0"], **TOL)


@pytest.mark.slow
def test_bidirectional_layer_inside_a_model(exported, tmp_path):
    with pytest.raises(rnnedge.UnsupportedModelError,
                       match=r"'encoder\.0' \(LSTM\) is bidirectional.*mode='sequence'"):
        rnnedge.export(zoo.BiEncoder(), tmp_path / "m.onnx", example_input=torch.randn(2, 5, 6))
    assert not list(tmp_path.iterdir())

    model, path, _ = exported("bi_seq")
    meta = ortref.contract(path)
    x = np.random.default_rng(3).standard_normal((3, 9, 6)).astype(np.float32)
    got, _ = ortref.call(ortref.session(path), meta, {"input": x}, ortref.zero_states(meta, 3))
    with torch.no_grad():
        want = model(torch.from_numpy(x))
    np.testing.assert_allclose(got["output"], want.numpy(), **TOL)


@pytest.mark.parametrize("key", list(FUSED_NODES))
def test_graph_structure_and_metadata(exported, key):
    model, path, report = exported(key)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 10
    opset = CASES[key]()[2].get("opset", 18)
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", opset)]
    ops = [n.op_type for n in proto.graph.node]
    assert not {"Loop", "If", "Scan"} & set(ops)
    assert sum(op in FUSED for op in ops) == FUSED_NODES[key]
    # Weights appear once, as initializers inside the file.
    big = [i.raw_data for i in proto.graph.initializer if len(i.raw_data) > 64]
    assert len(big) == len(set(big))
    assert not any(n.op_type == "Constant" and any(len(a.t.raw_data) > 64 for a in n.attribute)
                   for n in proto.graph.node)
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in proto.graph.initializer)

    props = {p.key: p.value for p in proto.metadata_props}
    assert list(props) == ["rnnedge"]
    meta = json.loads(props["rnnedge"])
    assert meta["opset"] == opset and meta["format"] == 1
    assert meta["parity"]["cases"] == len(report.cases) >= 2
    graph_inputs = [i.name for i in proto.graph.input]
    graph_outputs = [o.name for o in proto.graph.output]
    assert graph_inputs == [i["name"] for i in meta["inputs"]] + [s["input"] for s in meta["states"]]
    assert graph_outputs == [o["name"] for o in meta["outputs"]] + [s["output"] for s in meta["states"]]
    declared = {i["name"]: i["shape"] for i in meta["inputs"] + meta["outputs"]}
    declared.update({s["input"]: s["shape"] for s in meta["states"]})
    declared.update({s["output"]: s["shape"] for s in meta["states"]})
    for vi in list(proto.graph.input) + list(proto.graph.output):
        assert [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim] == declared[vi.name]
    for s in meta["states"]:
        assert s["shape"][s["batch_axis"]] == "batch" and s["init"] == "zeros"
    # The model is left as it was: no patched forward on any layer.
    assert not any("forward" in vars(m) for m in model.modules())


# --- what is refused, and how ---------------------------------------------------------


@pytest.mark.slow
def test_python_loop_over_time_is_a_parity_error(tmp_path):
    # A cell driven by a Python loop inside forward(x): found before tracing.
    with pytest.raises(rnnedge.ParityError,
                       match=r"'cell' \(GRUCell\) is called 5 times.*Python loop over time.*"
                             r"step-protocol module forward\(x, state\)"):
        rnnedge.export(zoo.PythonLoop(), tmp_path / "a.onnx", example_input=torch.randn(2, 5, 6))
    # Plain code looping over a declared time axis: torch.export fixes the length.
    with pytest.raises(rnnedge.ParityError,
                       match=r"fixed the time axis of input at 5 steps.*Python loop over time"):
        rnnedge.export(zoo.ElmanChunkLoop(), tmp_path / "b.onnx",
                       example_input=torch.randn(2, 5, 6), input_axes=[("batch", "time", 6)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("model,error,pattern", [
    (zoo.NoState(), rnnedge.UnsupportedModelError,
     r"no recurrent layer and no step protocol.*forward\(x, state\) -> \(output, state\)"),
    (zoo.HasCustomLayer(), rnnedge.UnsupportedModelError,
     r"layer 'block\.1' is a tests\.zoo\.CustomLSTM"),
    (zoo.StatefulAttribute(), rnnedge.UnsupportedModelError,
     r"'lstm' \(LSTM\) is given a non-zero initial state"),
    (zoo.DataDependent(), rnnedge.ExportError, r"torch\.export could not trace DataDependent \(GuardOnDataDependentSymNode: .*\) "
     r"at tests/zoo\.py:\d+; make forward\(\) traceable"),
], ids=["no-state", "custom-layer", "state-attribute", "data-dependent"])
def test_unsupported_models_are_refused_in_one_line(tmp_path, model, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        rnnedge.export(model.eval(), tmp_path / "m.onnx", example_input=torch.randn(2, 5, 6))
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_a_trace_failure_names_no_line_when_none_is_the_models():
    from rnnedge.exporters.torchonnx import failure

    # Raised by no frame at all: nothing to name, the message stays as it was.
    text = str(failure(RuntimeError("boom"), "M"))
    assert text.startswith("torch.export could not trace M (RuntimeError: boom); make forward()")


def test_bad_example_and_axes_are_usage_errors(tmp_path):
    model = zoo.Tagger()
    with pytest.raises(rnnedge.UsageError, match="tensor or a tuple of tensors"):
        rnnedge.export(model, tmp_path / "m.onnx", example_input=[[1, 2]])
    with pytest.raises(rnnedge.UsageError, match="'batch', 'time' or a fixed size"):
        rnnedge.export(model, tmp_path / "m.onnx", example_input=torch.randint(0, 40, (2, 5)),
                       input_axes=[("batch", "frames")])
    with pytest.raises(rnnedge.UsageError, match="lengths input is supported for bare"):
        rnnedge.export(model, tmp_path / "m.onnx", example_input=torch.randint(0, 40, (2, 5)),
                       mode="sequence", lengths=True)
    assert not list(tmp_path.iterdir())


class FlatHead(torch.nn.Module):
    """Embedding -> LSTM -> y.reshape(-1, H) -> Linear: a head over batch*time rows."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 6)
        self.lstm = torch.nn.LSTM(6, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 5)

    def forward(self, tokens):
        y, _ = self.lstm(self.emb(tokens))
        return self.head(y.reshape(-1, 8))


@pytest.mark.slow
def test_merged_batch_time_output_is_refused_in_stream_mode(tmp_path):
    example = torch.randint(0, 20, (2, 5))
    with pytest.raises(rnnedge.UnsupportedModelError, match="merges batch and time"):
        rnnedge.export(FlatHead(), tmp_path / "a.onnx", example_input=example)
    report = rnnedge.export(FlatHead(), tmp_path / "b.onnx", example_input=example, mode="sequence")
    assert report.metadata["outputs"][0]["shape"] == ["batch*time", 5]


class OverridingGRU(torch.nn.GRU):
    def forward(self, x, hx=None):
        y, h = super().forward(x, hx)
        return torch.relu(y), h


def test_top_level_layer_subclass_with_its_own_forward_is_refused(tmp_path):
    with pytest.raises(rnnedge.UnsupportedModelError, match="OverridingGRU"):
        rnnedge.export(OverridingGRU(4, 6), tmp_path / "m.onnx", example_input=torch.randn(5, 2, 4))
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_training_flags_of_every_module_are_restored(tmp_path):
    model = zoo.Tagger()
    model.train()
    model.emb.eval()  # frozen on purpose
    rnnedge.export(model, tmp_path / "m.onnx", example_input=torch.randint(0, 40, (2, 5)))
    assert model.training and not model.emb.training and model.lstm.training


def test_declared_axes_that_do_not_fit_are_usage_errors(tmp_path):
    with pytest.raises(rnnedge.UsageError, match="fails at"):
        rnnedge.export(zoo.LastStepClassifier(), tmp_path / "a.onnx",
                       example_input=torch.randn(5, 2, 6), input_axes=[("time", "batch", 6)])
    with pytest.raises(rnnedge.UsageError, match="unbatched input"):
        rnnedge.export(zoo.LastStepClassifier(), tmp_path / "b.onnx",
                       example_input=torch.randn(2, 6), input_axes=[("batch", 6)])
