"""Nothing corrupt let through, nothing lost: NaN/inf, threads, external data, sizes, byte order.

All through the public API (rnnedge.load, Stream, Pool). A refused call must leave the
state bit-identical, and the stream must then go on exactly as if the call never happened.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import rnnedge
from rnnedge.errors import (
    ConcurrentUseError,
    ContractError,
    ModelLoadError,
    NonFiniteError,
    StepInputError,
    UsageError,
)
from tests import runtime_graphs as G

F = 4  # features = state size of the accumulator graph


def accumulator(scale: float = 1.0, external: str | None = None, hidden: int = F) -> bytes:
    """h' = h + scale * x, y = h' with x, h (batch, F); a counter for x = 1.

    external: store ``scale`` (F float32) as external data at this location instead.
    hidden: another state size (graph and metadata agree): then h' = h and y = scale * x.
    """
    w = numpy_helper.from_array(np.full(F, scale, np.float32), "w")
    if external is not None:
        w.ClearField("raw_data")
        w.data_location = TensorProto.EXTERNAL
        for key, value in (("location", external), ("offset", "0"), ("length", str(4 * F))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
    nodes = [helper.make_node("Mul", ["x", "w"], ["xw"]),
             helper.make_node("Add", ["h", "xw"], ["h_next"]),
             helper.make_node("Identity", ["h_next"], ["y"])]
    if hidden != F:
        nodes = [helper.make_node("Mul", ["x", "w"], ["y"]),
                 helper.make_node("Identity", ["h"], ["h_next"])]
    m = G.meta([("x", "float32", ["batch", F])], [("y", "float32", ["batch", F])],
               [("h", "h_next", ["batch", hidden], 0)], None)
    graph = helper.make_graph(nodes, "acc", [G.vi("x", ["batch", F]), G.vi("h", ["batch", hidden])],
                              [G.vi("y", ["batch", F]), G.vi("h_next", ["batch", hidden])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", G.OPSET)], ir_version=10)
    helper.set_model_props(model, {"rnnedge": json.dumps(m)})
    return model.SerializeToString()


def same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


GRAPHS = {  # name: (graph, input maker (rng, batch) -> one chunk)
    "gru": (lambda: G.rnn("GRU", batch_first=True), lambda rng, b: rng.standard_normal((b, 3, 3))),
    "lstm": (lambda: G.rnn("LSTM", layers=2), lambda rng, b: rng.standard_normal((3, b, 3))),
    "cell": (G.step_cell, lambda rng, b: rng.standard_normal((b, 3))),
}
BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


# --- NaN and inf -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_nonfinite_input_is_refused_and_the_stream_goes_on_unchanged(graph, bad):
    build, make = GRAPHS[graph]
    model = rnnedge.load(build(), device="cpu")
    rng = np.random.default_rng(7)
    x1, x2, x3 = (make(rng, 2).astype(np.float32) for _ in range(3))
    stream, reference = model.stream(2), model.stream(2)
    y1 = stream.step(x1)
    before = stream.state
    poisoned = x2.copy()
    poisoned.reshape(-1)[5] = BAD[bad]
    with pytest.raises(NonFiniteError) as err:
        stream.step(poisoned)
    message = str(err.value)
    assert "\n" not in message and "NaN or inf" in message and "state is unchanged" in message
    assert "1 of" in message and "check_finite=False" in message
    assert isinstance(err.value, StepInputError)
    assert same_bits(stream.state, before)
    np.testing.assert_array_equal(stream.read(), y1)  # nothing ran: the last outputs stand
    # It goes on as if the refused step never happened.
    np.testing.assert_array_equal(stream.step(x3), (reference.step(x1), reference.step(x3))[1])
    assert same_bits(stream.state, reference.state)


def test_nonfinite_in_a_later_chunk_of_run_restores_the_state():
    model = rnnedge.load(G.rnn("GRU", batch_first=True), device="cpu")
    stream = model.stream(1)
    x = np.random.default_rng(1).standard_normal((1, 9, 3)).astype(np.float32)
    stream.step(x[:, :2])
    before = stream.state
    x[0, 7, 1] = np.nan
    with pytest.raises(NonFiniteError):
        stream.run(x, chunk=2)  # chunks 1-3 run first, chunk 4 is refused
    assert same_bits(stream.state, before)


def test_nonfinite_outputs_from_finite_inputs_are_undone():
    model = rnnedge.load(accumulator(scale=1e30), device="cpu")
    stream = model.stream(1)
    small = np.full((1, F), 1e-3, np.float32)
    stream.step(small)
    before = stream.state
    with pytest.raises(NonFiniteError, match=r"produced NaN or inf in \['y', 'h_next'\].*step was undone") as err:
        stream.step(np.full((1, F), 1e10, np.float32))  # 1e40 overflows float32
    assert err.value.names == ["y", "h_next"]
    assert same_bits(stream.state, before)
    np.testing.assert_array_equal(stream.step(small), before["h"] + np.float32(1e27))


def test_a_nonfinite_state_cannot_be_set_and_nothing_changes():
    model = rnnedge.load(accumulator(), device="cpu")
    stream = model.stream(2)
    stream.step(np.ones((2, F), np.float32))
    before = stream.state
    with pytest.raises(NonFiniteError, match="state 'h' holds NaN or inf"):
        stream.state = {"h": np.array([[0, 0, np.nan, 0], [0, 0, 0, 0]], np.float32)}
    assert same_bits(stream.state, before)
    pool = model.pool()
    with pytest.raises(NonFiniteError):
        pool.add({"h": np.full((1, F), np.inf, np.float32)})
    assert len(pool) == 0
    sid = pool.add()
    with pytest.raises(NonFiniteError):
        pool.set_state(sid, {"h": np.full((1, F), np.nan, np.float32)})
    assert same_bits(pool.get_state(sid), {"h": np.zeros((1, F), np.float32)})


@pytest.mark.parametrize("where", ["load", "stream"])
def test_check_finite_false_lets_nonfinite_values_through(where):
    model = rnnedge.load(G.rnn("GRU", batch_first=True), device="cpu", check_finite=where != "load")
    stream = model.stream(1, check_finite=False) if where == "stream" else model.stream(1)
    assert model.pool(check_finite=False).check_finite is False
    x = np.full((1, 2, 3), np.nan, np.float32)
    y = stream.step(x)  # onnxruntime's CPU GRU makes finite numbers of it: the opt-out's price
    assert y.shape == (1, 2, 5)
    stream.state = {"h0": np.full((1, 1, 5), np.nan, np.float32)}
    assert np.isnan(stream.state["h0"]).all()
    overflowing = rnnedge.load(accumulator(scale=1e30), device="cpu", check_finite=False).stream(1)
    assert np.isinf(overflowing.step(np.full((1, F), 1e10, np.float32))).all()


@pytest.mark.parametrize("value", [1, "yes", None])
def test_check_finite_must_be_a_bool(value):
    if value is None:  # None at load is not "the default": load has no model to take it from
        with pytest.raises(UsageError, match="check_finite must be True or False"):
            rnnedge.load(accumulator(), device="cpu", check_finite=None)
        return
    model = rnnedge.load(accumulator(), device="cpu")
    with pytest.raises(UsageError, match="check_finite"):
        model.stream(1, check_finite=value)


def test_pool_refuses_a_nonfinite_input_naming_the_stream_and_changes_no_state():
    model = rnnedge.load(G.rnn("GRU", batch_first=True), device="cpu")
    rng = np.random.default_rng(3)
    pool = model.pool()
    ids = [pool.add() for _ in range(3)]
    xs = {sid: rng.standard_normal((1, 2, 3)).astype(np.float32) for sid in ids}
    pool.step(xs)
    before = {sid: pool.get_state(sid) for sid in ids}
    bad = dict(xs)
    bad[ids[1]] = xs[ids[1]].copy()
    bad[ids[1]][0, 1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=rf"of streams \[{ids[1]}\]"):
        pool.step(bad)
    assert all(same_bits(pool.get_state(sid), before[sid]) for sid in ids)
    out = pool.step(xs)
    alone = model.stream(1)
    alone.step(xs[ids[2]])
    np.testing.assert_array_equal(out[ids[2]], alone.step(xs[ids[2]]))


def test_pool_undoes_a_step_whose_outputs_overflow():
    pool = rnnedge.load(accumulator(scale=1e30), device="cpu").pool()
    a, b = pool.add(), pool.add()
    small = np.full((1, F), 1e-3, np.float32)
    pool.step({a: small, b: small})
    before = {a: pool.get_state(a), b: pool.get_state(b)}
    with pytest.raises(NonFiniteError, match=rf"in \[.y., .h_next.\] of streams \[{b}\] from finite inputs"):
        pool.step({a: small, b: np.full((1, F), 1e10, np.float32)})
    assert same_bits(pool.get_state(a), before[a]) and same_bits(pool.get_state(b), before[b])


def test_the_gate_probe_records_whether_nan_propagates():
    torch = pytest.importorskip("torch")
    from rnnedge.exporters.api import make_plan
    from rnnedge.gate.nonfinite import nan_propagates

    torch.manual_seed(0)
    facts = {}
    for layer in (torch.nn.GRU(3, 4, batch_first=True), torch.nn.RNN(3, 4, batch_first=True)):
        plan = make_plan(layer, torch.randn(1, 5, 3), "stream", 18, None)
        facts[type(layer).__name__] = nan_propagates(plan, plan.graph.SerializeToString())
    # onnxruntime's CPU GRU kernel swallows the NaN; its RNN kernel passes it on.
    assert facts == {"GRU": False, "RNN": True}


# --- threads -------------------------------------------------------------------------------------


class Held:
    """An input whose conversion to an array waits for ``release``: a call held in progress."""

    def __init__(self, value: np.ndarray):
        self.value = value
        self.entered, self.release = threading.Event(), threading.Event()

    def __array__(self, dtype=None, copy=None):
        self.entered.set()
        assert self.release.wait(10)
        return self.value


def in_thread(call) -> tuple[threading.Thread, list]:
    errors: list = []

    def target():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


def test_a_second_thread_on_a_busy_stream_is_refused_and_no_step_is_lost():
    stream = rnnedge.load(accumulator(), device="cpu").stream(1)
    one = np.ones((1, F), np.float32)
    held = Held(one)
    thread, errors = in_thread(lambda: stream.step(held))
    assert held.entered.wait(10)
    for call in (lambda: stream.step(one), lambda: stream.run(one, 1), lambda: stream.state,
                 stream.reset, stream.read):
        with pytest.raises(ConcurrentUseError, match="another thread; give each thread its own stream"):
            call()
    held.release.set()
    thread.join(10)
    assert not errors
    np.testing.assert_array_equal(stream.state["h"], one)  # the held step, and only it
    np.testing.assert_array_equal(stream.step(one), 2 * one)  # free again


def test_a_second_thread_on_a_busy_pool_is_refused():
    pool = rnnedge.load(accumulator(), device="cpu").pool()
    sid = pool.add()
    one = np.ones((1, F), np.float32)
    held = Held(one)
    thread, errors = in_thread(lambda: pool.step({sid: held}))
    assert held.entered.wait(10)
    for call in (lambda: pool.step({sid: one}), pool.add, lambda: pool.get_state(sid),
                 lambda: pool.reset(sid), lambda: pool.remove(sid)):
        with pytest.raises(ConcurrentUseError, match="this pool is already in a call"):
            call()
    held.release.set()
    thread.join(10)
    assert not errors and pool.ids == [sid]
    np.testing.assert_array_equal(pool.get_state(sid)["h"], one)


def test_two_threads_hammering_one_stream_never_lose_a_step_silently():
    stream = rnnedge.load(accumulator(), device="cpu").stream(1)
    one = np.ones((1, F), np.float32)
    done, refused = [0, 0], [0, 0]
    barrier = threading.Barrier(2)

    def hammer(k):
        barrier.wait()
        for _ in range(2000):
            try:
                stream.step(one)
                done[k] += 1
            except ConcurrentUseError:
                refused[k] += 1

    threads = [threading.Thread(target=hammer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(done) + sum(refused) == 4000
    np.testing.assert_array_equal(stream.state["h"], np.full((1, F), sum(done), np.float32))


# --- external data -------------------------------------------------------------------------------

SECRET = np.arange(1, F + 1, dtype=np.float32)  # what "secret.txt" holds, read as the weights


@pytest.mark.parametrize("location", ["secret.txt", "sub/../secret.txt", "../secret.txt"])
def test_bytes_with_external_data_are_refused(tmp_path, monkeypatch, location):
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.txt").write_bytes(SECRET.tobytes())
    (tmp_path / "secret.txt").write_bytes(SECRET.tobytes())
    monkeypatch.chdir(work)
    with pytest.raises(ModelLoadError) as err:
        rnnedge.load(accumulator(external=location), device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert "refers to external data" in message and "external_data_dir=" in message


def test_bytes_with_external_data_load_from_a_named_folder_only(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "w.bin").write_bytes(SECRET.tobytes())
    (tmp_path / "secret.txt").write_bytes(SECRET.tobytes())
    monkeypatch.chdir(tmp_path)
    model = rnnedge.load(accumulator(external="w.bin"), device="cpu", external_data_dir=folder)
    np.testing.assert_array_equal(model.stream(1).step(np.ones((1, F), np.float32))[0], SECRET)
    with pytest.raises(ModelLoadError, match="not all inside external_data_dir"):
        rnnedge.load(accumulator(external="../secret.txt"), device="cpu", external_data_dir=folder)
    with pytest.raises(UsageError, match="must be an existing folder"):
        rnnedge.load(accumulator(external="w.bin"), device="cpu", external_data_dir=tmp_path / "nope")
    path = folder / "g.onnx"
    path.write_bytes(accumulator(external="w.bin"))
    with pytest.raises(UsageError, match="only for a graph given as bytes"):
        rnnedge.load(path, device="cpu", external_data_dir=folder)
    # By path, the file's own folder holds its external data.
    np.testing.assert_array_equal(rnnedge.load(path, device="cpu").stream(1).step(np.ones((1, F), np.float32))[0],
                                  SECRET)


# --- byte order and sizes --------------------------------------------------------------------------


def test_big_endian_float32_is_taken_as_float32():
    model = rnnedge.load(G.rnn("GRU", batch_first=True), device="cpu")
    x = np.random.default_rng(5).standard_normal((2, 3, 3)).astype(np.float32)
    native, swapped = model.stream(2), model.stream(2)
    for _ in range(2):  # the second step takes the stream's fast path
        np.testing.assert_array_equal(swapped.step(x.astype(">f4")), native.step(x))
    swapped.state = {"h0": native.state["h0"].astype(">f4")}
    assert same_bits(swapped.state, native.state)
    pool = model.pool()
    sid = pool.add({"h0": np.ones((1, 1, 5), ">f4")})
    alone = model.stream(1)
    alone.state = {"h0": np.ones((1, 1, 5), np.float32)}
    np.testing.assert_array_equal(pool.step({sid: x[:1].astype(">f4")})[sid], alone.step(x[:1]))


def test_a_huge_state_size_is_a_usage_error_before_anything_is_allocated():
    model = rnnedge.load(accumulator(hidden=10**12), device="cpu")  # graph and metadata agree
    for make in (lambda: model.stream(1), model.pool):
        with pytest.raises(UsageError, match=r"state 'h' of shape \[1, 1000000000000\].*GiB") as err:
            make()
        assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="smaller batch"):
        rnnedge.load(G.rnn("GRU"), device="cpu").stream(batch=10**9)


def test_tampered_metadata_with_a_huge_state_gives_a_typed_error():
    good = accumulator()
    tampered = good.replace(b'"shape": ["batch", 4], "batch_axis": 0',
                            b'"shape": ["batch", 1000000000000], "batch_axis": 0')
    assert tampered != good
    with pytest.raises((ContractError, UsageError)):
        rnnedge.load(tampered, device="cpu").stream(1)
