"""Streams of graphs that are both strided and late (contract ``chunk_multiple`` M > 1 with
``latency`` L > 0, and ``chunk_offset`` a): the first call held until it can take T1 = a
(mod M) steps with T1 > L, then multiples of M; one flush call on the grid; the outputs cut
to ceil(steps * time_ratio) in all. The graphs are hand-built (tests.runtime_graphs
.strided_late): a look-ahead of L, then blocks of M behind a delay d, so a = (L - d) mod M
and a call off the grid fails inside the graph."""

from __future__ import annotations

import functools
import itertools
import json

import numpy as np
import pytest

import rnnedge
from rnnedge.contract import from_json
from rnnedge.errors import NonFiniteError, UsageError
from tests import runtime_graphs as G

# name: (latency L, chunk_multiple M, delay d); chunk_offset a = (L - d) mod M
CASES = {
    "L5-M4-a1": (5, 4, 0),
    "L5-M4-a2": (5, 4, 3),
    "L2-M3-a2": (2, 3, 0),
    "L2-M3-a0": (2, 3, 2),
    "L1-M4-a1": (1, 4, 0),
    "L6-M2-a1": (6, 2, 1),
    "L4-M4-a0": (4, 4, 0),
    "L0-M4-a1": (0, 4, 3),  # an offset without latency: no flush state set, no zeros past the end
    "L3-M1": (3, 1, 0),  # latency only: as before (no grid)
}
CHUNKINGS = {"1": (1,), "prime": (7,), "uneven": (3, 1, 5, 2, 8), "long": (64,)}
TOTALS = (1, 4, 9, 23, 50)
OUTS = ("u", "up", "y")
BATCH, CHANNELS = 2, 2
TOL = {"rtol": 1e-5, "atol": 1e-5}


@functools.cache
def model(name: str):
    return rnnedge.load(G.strided_late(*CASES[name], channels=CHANNELS), device="cpu")


def offset(name: str) -> int:
    latency, multiple, delay = CASES[name]
    return (latency - delay) % multiple


def smallest_first(name: str) -> int:
    """The least T1 > L with T1 = a (mod M), counted out."""
    latency, multiple, _ = CASES[name]
    return next(t for t in itertools.count(latency + 1) if t % multiple == offset(name))


def held_after(name: str, steps: int) -> int:
    """What a stream holds after ``steps`` steps: all until the first call can run, then
    the steps past the grid (first T1 = a (mod M), then multiples)."""
    latency, multiple, _ = CASES[name]
    if steps < smallest_first(name):
        return steps
    return 0 if multiple == 1 else (steps - offset(name)) % multiple


def signal(steps: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng([steps, seed]).standard_normal((BATCH, steps, CHANNELS)).astype(np.float32)


def reference(name: str, x: np.ndarray) -> dict:
    return dict(zip(OUTS, G.strided_late_reference(x, *CASES[name])))


def joined(pieces: list) -> dict:
    return {k: np.concatenate([p[k] for p in pieces], axis=1) for k in OUTS}


def assert_equal(got: dict, want: dict, msg: str = "") -> None:
    for k in OUTS:
        assert got[k].shape == want[k].shape, f"{msg} {k}: {got[k].shape} != {want[k].shape}"
        np.testing.assert_allclose(got[k], want[k], **TOL, err_msg=f"{msg} {k}")


def seen(stream) -> float:
    """The input steps the graph has been fed (its frame counter, row 0)."""
    return float(stream.state["look.seen0"][0, 0])


def test_the_graphs_carry_the_contract_they_honour():
    for name, (latency, multiple, _) in CASES.items():
        spec = model(name).contract.spec
        assert (spec.latency, spec.chunk_multiple, spec.chunk_offset) == (latency, multiple, offset(name))
        assert [t.time_ratio for t in spec.outputs] == [1, 2, (1, multiple) if multiple > 1 else 1]


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("total", TOTALS)
def test_any_chunking_plus_flush_equals_the_model(name, chunking, total):
    latency = CASES[name][0]
    x, stream, pieces, start = signal(total), model(name).stream(BATCH), [], 0
    for size in itertools.cycle(CHUNKINGS[chunking]):
        if start >= total:
            break
        pieces.append(stream.step(x[:, start:start + size]))
        start = min(start + size, total)
        assert stream.held == held_after(name, start), f"after {start} steps"
        fed = start - stream.held
        assert seen(stream) == fed
        emitted = sum(p["u"].shape[1] for p in pieces)
        assert emitted == (max(0, fed - latency)), f"u frames after {start} steps"
    pieces.append(stream.flush())
    assert stream.held == 0
    assert_equal(joined(pieces), reference(name, x), f"{chunking} x {total}")


# name, chunk sizes, u frames each call gives, steps held after each (by hand from the rule)
FIRST_CALLS = [
    ("L5-M4-a1", (4, 4, 4, 4), (0, 0, 4, 4), (4, 8, 3, 3)),  # T1 = 9: first 12 -> 9 fed
    ("L5-M4-a1", (9, 1, 3, 5), (4, 0, 4, 4), (0, 1, 0, 1)),
    ("L5-M4-a2", (5, 2, 3), (0, 1, 4), (5, 1, 0)),  # T1 = 6 (> 5, = 2 mod 4): 7 -> 6 fed
    ("L1-M4-a1", (2, 2, 1, 4), (0, 0, 4, 4), (2, 4, 0, 0)),  # T1 = 5
    ("L2-M3-a0", (2, 1, 3), (0, 1, 3), (2, 0, 0)),  # T1 = 3
    ("L0-M4-a1", (1, 4, 4), (1, 4, 4), (0, 0, 0)),  # T1 = 1
    ("L3-M1", (2, 2, 1), (0, 1, 1), (2, 0, 0)),
]


@pytest.mark.parametrize("name, sizes, frames, held", FIRST_CALLS)
def test_first_call_is_held_to_the_offset_then_multiples(name, sizes, frames, held):
    x, stream, start = signal(sum(sizes)), model(name).stream(BATCH), 0
    for size, want_frames, want_held in zip(sizes, frames, held):
        y = stream.step(x[:, start:start + size])
        start += size
        assert (y["u"].shape[1], stream.held) == (want_frames, want_held), f"after {start} steps"
        assert y["up"].shape[1] == 2 * want_frames


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("chunk", [1, 5, 13])
def test_run_plus_flush_equals_the_model(name, chunk):
    x, stream = signal(41, seed=1), model(name).stream(BATCH)
    assert_equal(joined([stream.run(x, chunk=chunk), stream.flush()]), reference(name, x))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("total", [0, 1, "first-1", "first", 23])
def test_flush_feeds_one_call_on_the_grid(name, total):
    """The flush call: held steps zero-padded to a multiple of M (before the first call, to
    the smallest first call), then L rounded up to a multiple of M zero steps; an empty
    stream is not fed at all."""
    latency, multiple, _ = CASES[name]
    first = smallest_first(name)
    total = {"first-1": first - 1, "first": first}.get(total, total)
    x, stream = signal(total), model(name).stream(BATCH)
    pieces = [stream.step(x)] if total else []
    before = seen(stream)
    pieces.append(stream.flush())
    if total == 0:  # nothing fed: zero steps, the graph not called
        assert all(pieces[-1][k].shape == (BATCH, 0, CHANNELS) for k in OUTS)
        assert seen(stream) == 0
        return
    past = -(-latency // multiple) * multiple
    if multiple == 1:
        grid = total - before
    elif before == 0:  # before the first call: up to the smallest first call
        grid = first
    else:
        grid = -(-(total - before) // multiple) * multiple
    assert seen(stream) == before + grid + past
    got = joined(pieces)
    assert_equal(got, reference(name, x), f"{total} steps")
    assert [got[k].shape[1] for k in OUTS] == [total, 2 * total, -(-total // multiple)]


@pytest.mark.parametrize("name", ["L5-M4-a2", "L2-M3-a2", "L0-M4-a1"])
def test_reset_starts_a_new_stream(name):
    stream = model(name).stream(BATCH)
    stream.step(signal(30))
    stream.reset()
    assert stream.held == 0 and seen(stream) == 0
    assert all(v.shape == (BATCH, 0, CHANNELS) for v in stream.flush().values())  # nothing fed since
    stream.step(signal(30))
    stream.flush()
    stream.reset()
    x = signal(19, seed=2)
    assert_equal(joined([stream.step(x[:, :6]), stream.step(x[:, 6:]), stream.flush()]),
                 reference(name, x), "after reset")


@pytest.mark.parametrize("name", ["L5-M4-a2", "L6-M2-a1"])
def test_steps_not_read_still_count_toward_the_cut(name):
    x, stream = signal(23), model(name).stream(BATCH)
    for start in range(0, 23, 5):
        assert stream.step(x[:, start:start + 5], read=False) is None
    fed = 23 - stream.held
    last = stream.flush()
    want = reference(name, x)
    assert last["u"].shape[1] == 23 - max(0, fed - CASES[name][0])
    np.testing.assert_allclose(last["u"], want["u"][:, 23 - last["u"].shape[1]:], **TOL)


def test_a_failed_run_leaves_the_counts_as_they_were():
    """A run that fed the first call and more before a NaN leaves no trace: the flush after
    the real stream still cuts the grid padding's frames."""
    name = "L5-M4-a2"
    bad = signal(40, seed=3)
    bad[0, 30] = np.nan
    x, stream = signal(23), model(name).stream(BATCH)
    with pytest.raises(NonFiniteError):
        stream.run(bad, chunk=4)
    assert stream.held == 0 and seen(stream) == 0
    assert_equal(joined([stream.run(x, chunk=4), stream.flush()]), reference(name, x))


@pytest.mark.parametrize("name, named", [("L5-M4-a1", "latency"), ("L0-M4-a1", "chunk_offset")])
def test_pools_and_row_resets_are_refused(name, named):
    with pytest.raises(UsageError, match=named) as err:
        model(name).pool()
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=named):
        model(name).stream(BATCH).reset(np.array([True, False]))


@pytest.mark.parametrize("name, shown", [
    ("L5-M4-a1", "chunks: first \u2261 1 (mod 4) steps, then multiples of 4; latency 5 steps"),
    ("L4-M4-a0", "chunks of a multiple of 4 steps, latency 4 steps"),
])
def test_inspect_shows_the_offset(cli, tmp_path, name, shown):
    path = tmp_path / "g.onnx"
    path.write_bytes(G.strided_late(*CASES[name], channels=CHANNELS))
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert shown in result.output
    meta = json.loads(cli("inspect", path, "--json").stdout)
    assert from_json(json.dumps(meta)).chunk_offset == offset(name)
