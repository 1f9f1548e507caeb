"""Graphs not made by rnnedge (no metadata): state pairing, constants, inferred axes."""

from __future__ import annotations

import re

import numpy as np
import pytest

import rnnedge
from rnnedge.errors import ContractError, StepInputError, UsageError
from tests import runtime_graphs as G


def reference(x_steps, hidden=4, seed=2, rate=0.0):
    """The foreign graph's outputs in numpy: h' = 0.5 h + x W (+ rate), y = h'."""
    w = (np.random.default_rng(seed).standard_normal((3, hidden)) * 0.5).astype(np.float32)
    h = np.zeros((x_steps[0].shape[0], hidden), np.float32)
    ys = []
    for x in x_steps:
        h = (0.5 * h + x @ w + np.float32(rate)).astype(np.float32)
        ys.append(h)
    return ys


def steps(batch=2, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch, 3)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("state_in,state_out", [
    ("h0", "hn"), ("state0", "stateN"), ("state", "stateN"), ("h", "h_out"), ("h", "new_h"),
    ("cache_h", "new_cache_h"), ("h_in", "h_out"), ("past_kv", "present_kv"), ("s", "s_next"),
])
def test_naming_conventions_pair_states(state_in, state_out):
    model = rnnedge.load(G.foreign(state_in, state_out), device="cpu")
    assert model.metadata is None
    assert model.state_names == [state_in]
    assert model.contract.states[0].output == state_out
    assert model.contract.states[0].batch_axis == 1  # the dim named "batch"
    assert model.input_names == ["x"] and model.output_names == ["y"]
    stream = model.stream(2)
    xs = steps()
    for x, want in zip(xs, reference(xs)):
        np.testing.assert_allclose(stream.step(x), want, rtol=1e-6, atol=1e-6)


def test_explicit_state_map():
    data = G.foreign("memory", "updated")
    with pytest.raises(ContractError):
        rnnedge.load(data, device="cpu")
    model = rnnedge.load(data, device="cpu", state_map={"memory": "updated"})
    xs = steps(batch=1)
    stream = model.stream(1)
    for x, want in zip(xs, reference(xs)):
        np.testing.assert_allclose(stream.step(x), want, rtol=1e-6, atol=1e-6)


def test_explicit_state_map_overrides_conventions():
    """A map wins over the conventions; state_map={} runs the graph stateless."""
    data = G.foreign("h0", "hn")
    stateless = rnnedge.load(data, device="cpu", state_map={})
    assert stateless.state_names == [] and stateless.input_names == ["x", "h0"]
    y = stateless.stream(2).step({"x": np.ones((2, 3), np.float32), "h0": np.zeros((1, 2, 4), np.float32)})
    assert set(y) == {"y", "hn"}


def test_constants_are_bound_once():
    data = G.foreign("h0", "hn", const_input="rate")
    model = rnnedge.load(data, device="cpu")
    assert model.input_names == ["x", "rate"]
    xs = steps()
    stream = model.stream(2, constants={"rate": np.float32(1.5)})
    assert stream.input_names == ["x"]
    for x, want in zip(xs, reference(xs, rate=1.5)):
        np.testing.assert_allclose(stream.step(x), want, rtol=1e-6, atol=1e-6)
    # Without constants the extra input is an ordinary data input.
    plain = model.stream(2)
    for x, want in zip(xs, reference(xs, rate=-2.0)):
        got = plain.step({"x": x, "rate": np.array(-2.0, np.float32)})
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(StepInputError, match="rate"):
        plain.step(xs[0])
    with pytest.raises(UsageError, match="sr"):
        model.stream(2, constants={"sr": np.float32(1)})
    with pytest.raises(UsageError, match="float32"):
        model.stream(2, constants={"rate": 1.5})  # a Python float is float64
    with pytest.raises(UsageError, match="not non-state"):
        model.stream(2, constants={"h0": np.zeros((1, 2, 4), np.float32)})


def test_constants_are_copied():
    model = rnnedge.load(G.foreign("h0", "hn", const_input="rate"), device="cpu")
    rate = np.array(1.0, np.float32)
    stream = model.stream(1, constants={"rate": rate})
    rate[...] = 100.0
    xs = steps(batch=1, n=2)
    np.testing.assert_allclose(stream.step(xs[0]), reference(xs, rate=1.0)[0], rtol=1e-6)


def _check_listing(message: str, names: list[str]) -> None:
    assert "graph inputs:" in message and "graph outputs:" in message
    for name in names:
        assert name in message
    assert "state_map=" in message


def test_ambiguous_pairing_lists_inputs_outputs_and_a_map():
    data = G.foreign("h", "h_out", extra_outputs=("new_h",))
    with pytest.raises(ContractError) as err:
        rnnedge.load(data, device="cpu")
    message = str(err.value)
    assert "'h' matches outputs ['h_out', 'new_h']" in message
    _check_listing(message, ["x", "h", "y", "h_out", "new_h"])
    assert "state_map={'h': 'h_out'}" in message
    # The suggested map works.
    model = rnnedge.load(data, device="cpu", state_map={"h": "h_out"})
    assert model.output_names == ["y", "new_h"]


def test_incomplete_pairing_suggests_a_map():
    data = G.foreign("memory", "updated")
    with pytest.raises(ContractError) as err:
        rnnedge.load(data, device="cpu")
    message = str(err.value)
    assert "no input/output pair follows a known naming convention" in message
    _check_listing(message, ["x", "memory", "y", "updated"])
    # The example pairs the same-shape tensors, not x with y.
    assert "state_map={'memory': 'updated'}" in message
    assert re.search(r"memory float32\[1, batch, 4\]", message)


@pytest.mark.parametrize("state_map,needle", [
    ({"nope": "hn"}, "unknown names ['nope']"),
    ({"h0": "nope"}, "unknown names ['nope']"),
    ({"x": "hn"}, "differ in dtype or rank"),
])
def test_bad_state_map(state_map, needle):
    with pytest.raises(ContractError, match=re.escape(needle)) as err:
        rnnedge.load(G.foreign("h0", "hn"), device="cpu", state_map=state_map)
    if "unknown" in needle:
        _check_listing(str(err.value), ["x", "h0", "y", "hn"])


def test_state_map_refused_for_rnnedge_graphs():
    with pytest.raises(UsageError, match="metadata"):
        rnnedge.load(G.rnn("GRU"), device="cpu", state_map={"h0": "hn"})


def test_batch_axis_from_unnamed_dynamic_dim_and_name_n():
    unnamed = rnnedge.load(G.foreign(batch_dim=None, state_shape=[1, None, 4]), device="cpu")
    assert unnamed.contract.states[0].batch_axis == 1
    assert unnamed.contract.inputs[0].batch_axis == 0  # data: axis 0 by default
    named = rnnedge.load(G.foreign(batch_dim="N"), device="cpu")
    assert named.contract.states[0].batch_axis == 1
    xs = steps(batch=3)
    for model in (unnamed, named):
        stream = model.stream(3)
        for x, want in zip(xs, reference(xs)):
            np.testing.assert_allclose(stream.step(x), want, rtol=1e-6, atol=1e-6)


def test_batch_axes_override():
    model = rnnedge.load(G.foreign(state_shape=[1, "batch", 4]), device="cpu", batch_axes={"h0": 1, "x": 0})
    assert model.contract.states[0].batch_axis == 1
    with pytest.raises(UsageError, match="batch_axes"):
        rnnedge.load(G.foreign(), device="cpu", batch_axes={"h0": 7})


def test_fixed_batch_graph():
    model = rnnedge.load(G.foreign(batch_dim=1), device="cpu")
    assert model.contract.states[0].batch_axis is None
    with pytest.raises(UsageError, match="fixed batch of 1"):
        model.stream(2)
    xs = steps(batch=1)
    stream = model.stream(1)
    for x, want in zip(xs, reference(xs)):
        np.testing.assert_allclose(stream.step(x), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ContractError, match="batch axis"):
        model.pool()


def test_dynamic_state_dims_besides_batch_are_refused():
    with pytest.raises(ContractError, match="dynamic axes"):
        rnnedge.load(G.foreign(state_shape=[None, "batch", 4]), device="cpu")


@pytest.mark.parametrize("time_dim", ["time", "T", "seq"])
def test_time_axis_from_dim_name(time_dim):
    model = rnnedge.load(G.foreign(time_dim=time_dim), device="cpu")
    assert model.contract.inputs[0].time_axis == 1
    assert model.contract.outputs[0].time_axis is None  # y (batch, H) has no time axis
    with pytest.raises(UsageError, match="time axis"):
        model.stream(1).run(np.ones((1, 5, 3), np.float32), chunk=2)
    # Chunks of any length step fine.
    stream = model.stream(2)
    x = np.random.default_rng(0).standard_normal((2, 7, 3)).astype(np.float32)
    a = stream.step(x[:, :3])
    b = stream.step(x[:, 3:])
    want = reference([x[:, :3].sum(1), x[:, 3:].sum(1)])
    np.testing.assert_allclose(a, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, want[1], rtol=1e-5, atol=1e-5)


def test_no_time_axis_without_a_time_name():
    model = rnnedge.load(G.foreign(time_dim="frames_dyn"), device="cpu")
    assert model.contract.inputs[0].time_axis is None
    forced = rnnedge.load(G.foreign(time_dim="frames_dyn"), device="cpu", time_axis=1)
    assert forced.contract.inputs[0].time_axis == 1
