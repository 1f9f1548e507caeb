"""Every error path: typed, naming expected vs got, and leaving the stream's state alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import rnnedge
from rnnedge.errors import ContractError, DeviceError, ModelLoadError, StepInputError, UsageError
from rnnedge.runtime import DeviceFallbackWarning, providers
from tests import runtime_graphs as G


@pytest.fixture(scope="module")
def lstm():
    return rnnedge.load(G.rnn("LSTM", batch_first=True), device="cpu")


@pytest.fixture(scope="module")
def seq():
    return rnnedge.load(G.rnn("GRU", lengths=True, batch_first=True), device="cpu")


def advanced(model, batch=2):
    """A stream that has taken a few steps (a non-zero state) and its snapshot."""
    stream = model.stream(batch)
    x = np.random.default_rng(0).standard_normal((batch, 3, 3)).astype(np.float32)
    stream.step(x if model.input_names == ["input"] else {"input": x, "lengths": np.full(batch, 3)})
    return stream, stream.state


def assert_state(stream, snapshot):
    now = stream.state
    assert list(now) == list(snapshot)
    for name in now:
        np.testing.assert_array_equal(now[name], snapshot[name])


BAD_STEPS = {
    "float64": (np.ones((2, 1, 3)), r"'input' must be float32, got float64 \(convert it with \.astype\(np\.float32\)\)"),
    "int": (np.ones((2, 1, 3), np.int64), "must be float32, got int64"),
    "rank": (np.ones((2, 3), np.float32), re.escape("must have shape float32[batch=2, time, 3] (rank 3), got (2, 3) (rank 2)")),
    "batch": (np.ones((3, 1, 3), np.float32), "axis 0 is the batch, 3 rows, but this stream has batch 2"),
    "features": (np.ones((2, 1, 4), np.float32), re.escape("got (2, 1, 4): axis 2 must be 3")),
    "empty-time": (np.ones((2, 0, 3), np.float32), "empty time axis"),
    "none": (None, "must be a numpy array"),
    "dict-missing": ({"inpt": np.ones((2, 1, 3), np.float32)}, re.escape("missing ['input']; unexpected ['inpt']")),
    "dict-extra": ({"input": np.ones((2, 1, 3), np.float32), "h0": np.ones((1, 2, 5), np.float32)},
                   re.escape("unexpected ['h0']")),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_input_is_refused_and_state_kept(lstm, case):
    value, message = BAD_STEPS[case]
    stream, snap = advanced(lstm)
    with pytest.raises(StepInputError, match=message):
        stream.step(value)
    assert_state(stream, snap)
    # The stream still steps exactly like one that never saw the bad input.
    twin = lstm.stream(2)
    twin.state = snap
    x = np.full((2, 2, 3), 0.3, np.float32)
    np.testing.assert_array_equal(stream.step(x), twin.step(x))


def test_bad_input_after_good_shape_is_checked(lstm):
    """A shape cached from an earlier step does not let a different dtype through."""
    stream, snap = advanced(lstm)
    with pytest.raises(StepInputError, match="float32"):
        stream.step(np.ones((2, 3, 3), np.float64))  # same shape as the last step
    assert_state(stream, snap)


@pytest.mark.parametrize("value,message", [
    ({"input": np.ones((2, 1, 3), np.float32)}, re.escape("missing ['lengths']")),
    ({"input": np.ones((2, 1, 3), np.float32), "lengths": np.ones(2, np.int32)}, "'lengths' must be int64, got int32"),
    ({"input": np.ones((2, 1, 3), np.float32), "lengths": np.ones(3, np.int64)}, "this stream has batch 2"),
    (np.ones((2, 1, 3), np.float32), re.escape("takes 2 data inputs ['input', 'lengths']: pass a dict")),
])
def test_bad_multi_input_step(seq, value, message):
    stream, snap = advanced(seq)
    with pytest.raises(StepInputError, match=message):
        stream.step(value)
    assert_state(stream, snap)


@pytest.mark.parametrize("lengths", [[3, 4], [0, 2], [-1, 3], [3, 0]])
def test_lengths_out_of_range_are_refused_every_call(seq, lengths):
    stream, snap = advanced(seq)  # the same shapes as before: only the values are wrong
    with pytest.raises(StepInputError, match=r"'lengths' must be between 1 and the input's 3"):
        stream.step({"input": np.ones((2, 3, 3), np.float32), "lengths": np.array(lengths)})
    assert_state(stream, snap)


def test_numpy_integer_chunk_is_accepted(lstm):
    x = np.random.default_rng(3).standard_normal((2, 7, 3)).astype(np.float32)
    np.testing.assert_array_equal(lstm.stream(2).run(x, chunk=np.int64(3)), lstm.stream(2).run(x, chunk=3))


def test_run_errors_leave_state(lstm):
    stream, snap = advanced(lstm)
    with pytest.raises(StepInputError):
        stream.run(np.ones((2, 9, 4), np.float32), chunk=2)
    for chunk in (0, -1, 1.5, True):
        with pytest.raises(UsageError, match="chunk"):
            stream.run(np.ones((2, 9, 3), np.float32), chunk=chunk)
    assert_state(stream, snap)


@pytest.mark.parametrize("value,message", [
    ({"h0": np.zeros((1, 3, 5), np.float32)}, re.escape("state 'h0' must be a float32 array of shape [1, 2, 5], got float32[1, 3, 5]")),
    ({"h0": np.zeros((1, 2, 5), np.float64)}, "got float64"),
    ({"h0": [[0.0]]}, "got list"),
    ({"hn": np.zeros((1, 2, 5), np.float32)}, re.escape("unknown states ['hn']; this graph's states are ['h0', 'c0']")),
    ([np.zeros((1, 2, 5), np.float32)], "a state is a dict"),
    ({"h0": np.zeros((1, 2, 5), np.float32), "c0": np.zeros((2, 2, 5), np.float32)}, "'c0'"),
])
def test_bad_state_assignment_changes_nothing(lstm, value, message):
    stream, snap = advanced(lstm)
    with pytest.raises(StepInputError, match=message):
        stream.state = value
    assert_state(stream, snap)


def test_state_assignment_partial_and_copy_semantics(lstm):
    stream, snap = advanced(lstm)
    ones = np.ones((1, 2, 5), np.float32)
    stream.state = {"c0": ones}
    assert_state(stream, {"h0": snap["h0"], "c0": ones})
    ones[...] = 7  # the stream copied it
    np.testing.assert_array_equal(stream.state["c0"], 1)
    got = stream.state
    got["h0"][...] = 9  # a read is a copy
    np.testing.assert_array_equal(stream.state["h0"], snap["h0"])


def with_meta(change) -> bytes:
    model = onnx.load_from_string(G.rnn("GRU"))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["rnnedge"])
    text = change(meta)
    onnx.helper.set_model_props(model, {"rnnedge": text if isinstance(text, str) else json.dumps(meta)})
    return model.SerializeToString()


@pytest.mark.parametrize("change,message", [
    (lambda m: m.update(format=3), "format 3; this version reads formats 1 and 2 only"),
    (lambda m: m.pop("format"), "format None"),
    (lambda m: "{not json", "not valid JSON"),
    (lambda m: "[1, 2]", "must be a JSON object"),
    (lambda m: m.update(mode="batch"), "mode must be one of"),
    (lambda m: m["inputs"][0].update(name="x"), re.escape("lists graph inputs ['x', 'h0'] but the graph has ['input', 'h0']")),
    (lambda m: m["inputs"][0].update(dtype="float16"), "says input 'input' is float16, the graph says float32"),
    (lambda m: m["states"][0].update(init="random"), "unknown init 'random'"),
    (lambda m: m["states"][0].update(batch_axis=0), "batch_axis 0 is not a dynamic axis"),
    (lambda m: m.pop("states"), "malformed"),
    (lambda m: m.update(time_axis=-1), "time_axis must be null or an int"),
])
def test_bad_metadata_is_a_contract_error(change, message):
    with pytest.raises(ContractError, match=message):
        rnnedge.load(with_meta(change), device="cpu")


def test_load_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no ONNX file"):
        rnnedge.load(tmp_path / "missing.onnx", device="cpu")
    with pytest.raises(ModelLoadError, match="cannot load"):
        rnnedge.load(b"not an onnx model", device="cpu")
    with pytest.raises(UsageError, match="path"):
        rnnedge.load(42, device="cpu")
    path = tmp_path / "m.onnx"
    path.write_bytes(G.rnn("GRU"))
    assert rnnedge.load(str(path), device="cpu").state_names == ["h0"]
    assert rnnedge.load(path, device="cpu").source == str(path)


@pytest.mark.parametrize("kwargs,message", [
    ({"device": "gpu"}, "device must be"),
    ({"device": "cuda:x"}, "device must be"),
    ({"threads": -1}, "threads"),
    ({"threads": 1.5}, "threads"),
])
def test_bad_load_arguments(kwargs, message):
    with pytest.raises(UsageError, match=message):
        rnnedge.load(G.rnn("GRU"), **{"device": "cpu", **kwargs})


def test_bad_stream_arguments(lstm):
    for batch in (0, -1, 1.0, True, None):
        with pytest.raises(UsageError, match="batch"):
            lstm.stream(batch)
    with pytest.raises(UsageError, match="constants"):
        lstm.stream(1, constants=[1])


def test_threads_option_reaches_the_session():
    model = rnnedge.load(G.rnn("GRU"), device="cpu", threads=2)
    opts = model.session.get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert rnnedge.load(G.rnn("GRU"), device="cpu").session.get_session_options().intra_op_num_threads == 1


CUDA_LISTED = providers.CUDA_EP in ort.get_available_providers()


def _cuda_works() -> bool:
    rnnedge.load(G.rnn("GRU"), device="cpu")  # no probe
    if not CUDA_LISTED:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return rnnedge.load(G.rnn("GRU"), device="auto").device.startswith("cuda")


CUDA_WORKS = _cuda_works()


@pytest.mark.skipif(CUDA_WORKS, reason="a usable GPU is present")
def test_cuda_without_gpu_is_a_device_error():
    for _ in range(2):  # the second answer comes from the cached probe
        with pytest.raises(DeviceError, match="device='cuda'"):
            rnnedge.load(G.rnn("GRU"), device="cuda")


# Loads with device="auto" in a fresh process, whose first load probes CUDA (this one's
# probe is cached by now): each load's warnings, and whatever reached stderr.
FRESH_AUTO_LOADS = """
import json, warnings
import rnnedge
from tests import runtime_graphs as G

rows = []
for _ in range(3):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = rnnedge.load(G.rnn("GRU"), device="auto")
    rows.append({"device": model.device, "warnings": [w.category.__name__ for w in caught],
                 "message": str(caught[0].message) if caught else "",
                 "filename": caught[0].filename if caught else ""})
print(json.dumps(rows))
"""


@pytest.mark.skipif(CUDA_WORKS or not CUDA_LISTED, reason="needs onnxruntime-gpu without a usable GPU")
def test_auto_falls_back_with_one_warning_and_no_ort_log(tmp_path):
    script = tmp_path / "auto_loads.py"
    script.write_text(FRESH_AUTO_LOADS)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 3
    for row in rows:
        assert row["device"] == "cpu"
        assert row["warnings"] == [DeviceFallbackWarning.__name__]
        assert "\n" not in row["message"] and "running on CPU" in row["message"]
        assert row["filename"] == str(script)  # points at the caller's load()
    assert "onnxruntime" not in done.stderr.lower() and "cuda" not in done.stderr.lower(), done.stderr
    with pytest.warns(DeviceFallbackWarning):
        rnnedge.load(G.rnn("GRU"))


def test_cpu_is_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rnnedge.load(G.rnn("GRU"), device="cpu").device == "cpu"


@pytest.mark.parametrize("value,message", [
    ({"input": np.ones((2, 3, 3), np.float32), "lengths": None}, "'lengths' must be a numpy array"),
    ({"input": np.ones((2, 3, 3), np.float32), "lengths": np.array(["a", "b"])}, "'lengths' must be int64"),
    ({"input": np.ones(3, np.float32), "lengths": np.array([3, 3])}, "rank 3"),
    ({"input": None, "lengths": np.array([3, 3])}, "'input' must be a numpy array"),
    ({"input": np.ones((2, 3), np.float32), "lengths": np.array([5, 5])}, "rank 3"),
])
def test_sequence_inputs_are_checked_before_lengths_values(seq, value, message):
    stream, snap = advanced(seq)
    with pytest.raises(StepInputError, match=message):
        stream.step(value)
    assert_state(stream, snap)


@pytest.mark.parametrize("lengths", [[0], [9], [-1]])
def test_pool_checks_lengths_values(seq, lengths):
    pool = seq.pool()
    sid = pool.add()
    with pytest.raises(StepInputError, match="'lengths' must be between 1 and"):
        pool.step({sid: {"input": np.ones((1, 3, 3), np.float32), "lengths": np.array(lengths)}})


def lookup_graph() -> bytes:
    """x (batch, time, 1) float32 holding indices into a 4-entry table -> y = TABLE[x]
    (batch, time, 1); state h0 -> hn (batch, 1) adds y summed over time. An index past the
    table makes onnxruntime's Gather fail inside the run, at any input shape: a real failed
    run, also on the bound per-step path of an input shape that ran before."""
    table = onnx.numpy_helper.from_array(np.arange(4, dtype=np.float32), "table")
    axes = onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [onnx.helper.make_node("Cast", ["x"], ["idx"], to=onnx.TensorProto.INT64),
             onnx.helper.make_node("Gather", ["table", "idx"], ["y"]),
             onnx.helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=0),
             onnx.helper.make_node("Add", ["h0", "total"], ["hn"])]
    meta = G.meta([("x", "float32", ["batch", "time", 1])], [("y", "float32", ["batch", "time", 1])],
                  [("h0", "hn", ["batch", 1], 0)], time_axis=1)
    return G.finish(nodes, [G.vi("x", ["batch", "time", 1]), G.vi("h0", ["batch", 1])],
                    [G.vi("y", ["batch", "time", 1]), G.vi("hn", ["batch", 1])],
                    [table, axes], meta)


@pytest.fixture(scope="module")
def lookup():
    return rnnedge.load(lookup_graph(), device="cpu")


IN_TABLE = np.array([[[1.0], [2.0]]], np.float32)  # (1, 2, 1): adds 3 to the state
PAST_TABLE = np.array([[[1.0], [7.0]]], np.float32)  # same shape, index 7 of 4: Gather fails


def test_a_failed_run_leaves_the_state_unchanged(lookup):
    stream = lookup.stream(1)
    for _ in range(2):  # the second step runs the bindings the first one made
        stream.step(IN_TABLE)
    snap = stream.state
    with pytest.raises(RuntimeError, match="out of"):
        stream.step(PAST_TABLE)
    assert_state(stream, snap)
    np.testing.assert_array_equal(stream.step(IN_TABLE), [[[1.0], [2.0]]])
    np.testing.assert_array_equal(stream.state["h0"], [[9.0]])  # three good steps, no more


def test_a_failed_pool_run_leaves_every_streams_state_unchanged(lookup):
    pool = lookup.pool()
    a, b = pool.add(), pool.add()
    for _ in range(2):
        pool.step({a: IN_TABLE, b: IN_TABLE})
    with pytest.raises(RuntimeError, match="out of"):
        pool.step({a: IN_TABLE, b: PAST_TABLE})
    for sid in (a, b):
        np.testing.assert_array_equal(pool.get_state(sid)["h0"], [[6.0]])


def test_read_after_a_failed_run_refuses_stale_outputs(lookup):
    stream = lookup.stream(1)
    stream.step(IN_TABLE)
    with pytest.raises(RuntimeError, match="out of"):  # fails inside onnxruntime
        stream.step(PAST_TABLE)
    with pytest.raises(UsageError, match="the last one failed"):
        stream.read()
