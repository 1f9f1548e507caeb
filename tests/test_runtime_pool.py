"""A pool of single-row streams stepped as one batch equals the streams stepped alone."""

from __future__ import annotations

import numpy as np
import pytest

import rnnedge
from rnnedge.errors import StepInputError, UsageError
from tests import runtime_graphs as G

TOL = {"rtol": 1e-5, "atol": 1e-6}

GRAPHS = {
    "lstm-time-major": (lambda: G.rnn("LSTM", layers=2), lambda rng, t: rng.standard_normal((t, 1, 3))),
    "gru-batch-first": (lambda: G.rnn("GRU", batch_first=True), lambda rng, t: rng.standard_normal((1, t, 3))),
    "step-cell": (G.step_cell, lambda rng, t: rng.standard_normal((1, 3))),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
def test_pool_equals_per_stream_with_joins_leaves_and_resets(graph):
    build, sample = GRAPHS[graph]
    model = rnnedge.load(build(), device="cpu")
    rng = np.random.default_rng(len(graph))
    pool = model.pool()
    alone = {}  # pool id -> the same stream run on its own (batch 1)
    for tick in range(40):
        # Joins and leaves between steps.
        for _ in range(rng.integers(0, 3)):
            sid = pool.add()
            alone[sid] = model.stream(1)
        if len(alone) > 2 and rng.random() < 0.3:
            sid = rng.choice(list(alone))
            pool.remove(sid)
            del alone[sid]
        if alone and rng.random() < 0.2:
            sid = rng.choice(list(alone))
            pool.reset(sid)
            alone[sid].reset()
        if not alone:
            continue
        # Often the same streams in the same order (they stay resident), sometimes a subset.
        ids = list(alone)
        if rng.random() < 0.3:
            ids = list(rng.permutation(ids)[: rng.integers(1, len(ids) + 1)])
        length = int(rng.choice([1, 1, 3]))
        feed = {sid: sample(rng, length).astype(np.float32) for sid in ids}
        got = pool.step(feed)
        assert list(got) == ids
        for sid in ids:
            np.testing.assert_allclose(got[sid], alone[sid].step(feed[sid]), **TOL,
                                       err_msg=f"tick {tick} stream {sid}")
    assert sorted(pool.ids) == sorted(alone) and len(pool) == len(alone)
    for sid, stream in alone.items():
        for name, value in stream.state.items():
            np.testing.assert_allclose(pool.get_state(sid)[name], value, **TOL)


def test_pool_state_get_set_and_add_with_state():
    model = rnnedge.load(G.rnn("GRU", batch_first=True), device="cpu")
    rng = np.random.default_rng(3)
    pool = model.pool()
    a, b = pool.add(), pool.add()
    x = {sid: rng.standard_normal((1, 2, 3)).astype(np.float32) for sid in (a, b)}
    pool.step(x)
    snap = pool.get_state(a)
    assert snap["h0"].shape == (1, 1, 5)
    c = pool.add(state=snap)  # a copy of a, from here on independent
    y1 = pool.step({a: x[a], c: x[a], b: x[b]})
    np.testing.assert_allclose(y1[a], y1[c], **TOL)
    pool.set_state(b, snap)
    y2 = pool.step({a: x[a], b: x[a]})
    assert not np.allclose(y2[a], y2[b])  # a moved on; b restarted from a's old state
    np.testing.assert_allclose(y2[b], y1[c], **TOL)
    with pytest.raises(StepInputError, match="shape"):
        pool.set_state(a, {"h0": np.zeros((1, 2, 5), np.float32)})
    with pytest.raises(StepInputError, match="unknown states"):
        pool.add(state={"c0": np.zeros((1, 1, 5), np.float32)})


def test_pool_rows_are_reused_and_capacity_grows():
    model = rnnedge.load(G.step_cell(), device="cpu")
    pool = model.pool()
    ids = [pool.add() for _ in range(20)]  # beyond the first capacity of 8
    x = np.ones((1, 3), np.float32)
    first = pool.step({sid: x for sid in ids})
    for sid in ids[::2]:
        pool.remove(sid)
    newcomers = [pool.add() for _ in range(10)]
    out = pool.step({sid: x for sid in newcomers + ids[1::2]})
    for sid in newcomers:  # fresh zero state despite reusing rows
        np.testing.assert_array_equal(out[sid], first[ids[0]])
    assert all(sid not in pool for sid in ids[::2])


def test_pool_errors_leave_state_alone():
    model = rnnedge.load(G.rnn("LSTM", batch_first=True), device="cpu")
    pool = model.pool()
    a, b = pool.add(), pool.add()
    good = np.ones((1, 2, 3), np.float32)
    pool.step({a: good, b: good})
    before = {sid: pool.get_state(sid) for sid in (a, b)}
    pool.step({a: good, b: good})  # resident again
    after_one = {sid: pool.get_state(sid) for sid in (a, b)}
    bad_feeds = [
        {a: good, b: np.ones((1, 3, 3), np.float32)},  # different chunk length
        {a: good, b: good.astype(np.float64)},
        {a: good, b: np.ones((2, 2, 3), np.float32)},  # batch 2 in one stream
        {a: good, 99: good},
        {},
    ]
    for feed in bad_feeds:
        with pytest.raises(StepInputError):
            pool.step(feed)
    for sid in (a, b):
        for name, value in pool.get_state(sid).items():
            np.testing.assert_array_equal(value, after_one[sid][name])
            assert not np.array_equal(value, before[sid][name])
    with pytest.raises(UsageError, match="no stream"):
        pool.remove(99)
    with pytest.raises(UsageError, match="no stream"):
        pool.reset(99)
