"""Streaming equals one-shot: chunked steps carry the state exactly like one whole call."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import rnnedge
from rnnedge.errors import UsageError
from tests import runtime_graphs as G

LENGTHS = (1, 7, 10, 53)
UNEVEN = (3, 1, 5, 2, 8)  # not multiples of each other, nor of the lengths
TOL = {"rtol": 1e-5, "atol": 1e-6}


def feed(stream, x, sizes, time_axis):
    """Step ``x`` through ``stream`` in chunks cycling through ``sizes``; outputs concatenated."""
    outs, start, total = [], 0, x.shape[time_axis]
    for size in itertools.cycle(sizes):
        if start >= total:
            break
        index = (slice(None),) * time_axis + (slice(start, start + size),)
        outs.append(stream.step(x[index]))
        start += size
    return np.concatenate(outs, axis=time_axis)


def sequence(rng, batch, length, features, batch_first):
    shape = (batch, length, features) if batch_first else (length, batch, features)
    return rng.standard_normal(shape).astype(np.float32)


def raw_session(model, feeds: dict):
    """The graph run directly by onnxruntime from a zero state: the independent reference."""
    batch_of = next(iter(feeds.values())).shape[model.contract.inputs[0].batch_axis]
    zeros = {s.input: s.zeros(batch_of) for s in model.contract.states}
    names = model.output_names + [s.output for s in model.contract.states]
    got = model.session.run(names, {**feeds, **zeros})
    return got[0], dict(zip(model.state_names, got[len(model.output_names):]))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("batch", [1, 3])
def test_chunked_equals_one_shot(kind, batch_first, layers, batch):
    model = rnnedge.load(G.rnn(kind, layers=layers, batch_first=batch_first, seed=layers), device="cpu")
    tax = 1 if batch_first else 0
    rng = np.random.default_rng([len(kind), batch_first, layers, batch])
    for length in LENGTHS:
        x = sequence(rng, batch, length, 3, batch_first)
        want, want_state = raw_session(model, {"input": x})
        one = model.stream(batch)
        np.testing.assert_allclose(one.step(x), want, **TOL)
        plans = {"1-step": (1,), "uneven": UNEVEN, "uneven-rev": UNEVEN[::-1]}
        for label, sizes in plans.items():
            stream = model.stream(batch)
            got = feed(stream, x, sizes, tax)
            np.testing.assert_allclose(got, want, **TOL, err_msg=f"{label} length {length}")
            for name, value in stream.state.items():
                np.testing.assert_allclose(value, want_state[name], **TOL, err_msg=f"{label} {name}")
        for chunk in (1, 4, 10, 64):
            stream = model.stream(batch)
            np.testing.assert_allclose(stream.run(x, chunk=chunk), want, **TOL, err_msg=f"run {chunk}")


def test_stream_continues_across_calls_and_shapes():
    """The state carries over between run() and step() calls of different chunk lengths."""
    model = rnnedge.load(G.rnn("LSTM", batch_first=True), device="cpu")
    x = sequence(np.random.default_rng(0), 2, 40, 3, True)
    want, _ = raw_session(model, {"input": x})
    stream = model.stream(2)
    parts = [stream.run(x[:, :13], chunk=5), stream.step(x[:, 13:14]), stream.run(x[:, 14:], chunk=26)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), want, **TOL)


def test_many_shapes_beyond_the_binding_cache():
    """More distinct chunk lengths than the engine keeps bound still give the right answer."""
    model = rnnedge.load(G.rnn("GRU"), device="cpu")
    sizes = tuple(range(1, 21))  # 20 > MAX_SLOTS
    x = sequence(np.random.default_rng(1), 1, sum(sizes) * 2, 3, False)
    want, _ = raw_session(model, {"input": x})
    np.testing.assert_allclose(feed(model.stream(1), x, sizes, 0), want, **TOL)


@pytest.mark.parametrize("batch", [1, 4])
def test_step_graph_matches_numpy(batch):
    model = rnnedge.load(G.step_cell(), device="cpu")
    assert model.contract.time_axis is None
    w, u, b = G.step_cell_reference()
    rng = np.random.default_rng(batch)
    stream = model.stream(batch)
    h = np.zeros((batch, 4), np.float32)
    for _ in range(25):
        x = rng.standard_normal((batch, 3)).astype(np.float32)
        h = np.tanh(x @ w + h @ u + b)
        np.testing.assert_allclose(stream.step(x), 2 * h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stream.state["h"], h, rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="time axis"):
        stream.run(rng.standard_normal((batch, 3)).astype(np.float32), chunk=1)


def test_sequence_mode_with_lengths():
    """A sequence-mode graph: `lengths` is an ordinary data input (dict needed)."""
    model = rnnedge.load(G.rnn("LSTM", lengths=True, batch_first=True), device="cpu")
    assert model.contract.mode == "sequence"
    assert model.input_names == ["input", "lengths"]
    rng = np.random.default_rng(5)
    x = sequence(rng, 3, 12, 3, True)
    lengths = np.array([12, 5, 1], np.int64)
    want, want_state = raw_session(model, {"input": x, "lengths": lengths})
    stream = model.stream(3)
    np.testing.assert_allclose(stream.step({"input": x, "lengths": lengths}), want, **TOL)
    for name in model.state_names:
        np.testing.assert_allclose(stream.state[name], want_state[name], **TOL)
    # A short row's state is its state at its own length: it equals a run over just that.
    short, short_state = raw_session(model, {"input": x[1:2, :5], "lengths": np.array([5], np.int64)})
    np.testing.assert_allclose(stream.state["h0"][:, 1:2], short_state["h0"], **TOL)
    # Unidirectional with full lengths: chunks carried through the state equal one call.
    chunked = model.stream(3)
    outs = [chunked.step({"input": x[:, a:b], "lengths": np.full(3, b - a, np.int64)})
            for a, b in ((0, 4), (4, 5), (5, 12))]
    full, _ = raw_session(model, {"input": x, "lengths": np.full(3, 12, np.int64)})
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, **TOL)
    with pytest.raises(UsageError, match="sequence"):
        chunked.run({"input": x, "lengths": lengths}, chunk=4)


def test_bidirectional_sequence_graph_steps():
    model = rnnedge.load(G.rnn("GRU", bidirectional=True, layers=2), device="cpu")
    x = sequence(np.random.default_rng(6), 2, 9, 3, False)
    want, want_state = raw_session(model, {"input": x})
    stream = model.stream(2)
    np.testing.assert_allclose(stream.step(x), want, **TOL)
    assert stream.state["h0"].shape == (4, 2, 5)
    np.testing.assert_allclose(stream.state["h0"], want_state["h0"], **TOL)


def test_several_outputs_come_back_as_a_dict():
    data = G.foreign(extra_outputs=("tap",), state_in="h0", state_out="hn")
    model = rnnedge.load(data, device="cpu")
    y = model.stream(2).step(np.ones((2, 3), np.float32))
    assert isinstance(y, dict) and list(y) == ["y", "tap"]
    np.testing.assert_array_equal(y["tap"][0], y["y"])


def test_outputs_are_fresh_arrays():
    """A returned output is the caller's: later steps do not overwrite it."""
    model = rnnedge.load(G.rnn("GRU"), device="cpu")
    stream = model.stream(1)
    x = np.ones((1, 1, 3), np.float32)
    first = stream.step(x)
    kept = first.copy()
    stream.step(x * 3)
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(stream.step(x), kept)  # the state did advance


def test_reset_all_and_masked_rows():
    model = rnnedge.load(G.rnn("LSTM", batch_first=True), device="cpu")
    rng = np.random.default_rng(7)
    x = sequence(rng, 3, 4, 3, True)
    stream = model.stream(3)
    stream.step(x)
    before = stream.state
    stream.reset(np.array([False, True, False]))
    after = stream.state
    for name in model.state_names:
        np.testing.assert_array_equal(after[name][:, 1], 0)
        np.testing.assert_array_equal(after[name][:, [0, 2]], before[name][:, [0, 2]])
    # A reset row continues exactly like a fresh stream fed the same input.
    y = stream.step(x)
    fresh = model.stream(1).step(x[1:2])
    np.testing.assert_allclose(y[1:2], fresh, **TOL)
    stream.reset()
    assert all(not v.any() for v in stream.state.values())
    with pytest.raises(UsageError, match="mask"):
        stream.reset(np.array([True, False]))
    with pytest.raises(UsageError, match="mask"):
        stream.reset(np.array([1, 0, 1]))


def test_non_contiguous_input():
    model = rnnedge.load(G.rnn("GRU", batch_first=True), device="cpu")
    x = sequence(np.random.default_rng(8), 2, 6, 3, True)
    want = model.stream(2).step(x)
    view = np.asfortranarray(x)
    np.testing.assert_array_equal(model.stream(2).step(view), want)


def test_step_without_read_then_read():
    model = rnnedge.load(G.rnn("LSTM", batch_first=True), device="cpu")
    x = np.random.default_rng(5).standard_normal((2, 4, 3)).astype(np.float32)
    lazy, eager_read = model.stream(2), model.stream(2)
    with pytest.raises(rnnedge.UsageError, match="no step has run"):
        lazy.read()
    assert lazy.step(x, read=False) is None
    want = eager_read.step(x)
    got = lazy.read()
    np.testing.assert_array_equal(got, want)
    got[...] = 0  # a new array each time: the stream's buffer is not exposed
    np.testing.assert_array_equal(lazy.read(), want)
    np.testing.assert_array_equal(lazy.step(x), eager_read.step(x))  # the state carried on
