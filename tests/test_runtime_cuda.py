"""CUDA execution provider: parity with the CPU and the state kept on the device.

Skipped cleanly where onnxruntime's CUDA execution provider is not usable.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest

import rnnedge
from rnnedge.errors import DeviceError
from tests import runtime_graphs as G

pytestmark = pytest.mark.cuda


def _cuda_reason() -> str | None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA execution provider"
    try:
        rnnedge.load(G.rnn("GRU"), device="cuda")
    except DeviceError as exc:
        return str(exc)
    return None


REASON = _cuda_reason()
if REASON is not None:
    pytest.skip(f"CUDA not usable: {REASON}", allow_module_level=True)

TOL = {"rtol": 1e-3, "atol": 1e-4}  # cuDNN's float32 RNN may round differently (TF32)


def both(data: bytes):
    return rnnedge.load(data, device="cpu"), rnnedge.load(data, device="cuda")


def test_auto_picks_cuda_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = rnnedge.load(G.rnn("GRU"), device="auto")
    assert model.device == "cuda:0"
    assert "CUDAExecutionProvider" in model.session.get_providers()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_cuda_stream_equals_cpu(kind):
    cpu, gpu = both(G.rnn(kind, layers=2, batch_first=True))
    a, b = cpu.stream(3), gpu.stream(3)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.standard_normal((3, int(rng.integers(1, 4)), 3)).astype(np.float32)
        np.testing.assert_allclose(b.step(x), a.step(x), **TOL)
    for name, value in a.state.items():
        np.testing.assert_allclose(b.state[name], value, **TOL)


def test_state_stays_in_the_two_device_buffers():
    gpu = rnnedge.load(G.rnn("LSTM", layers=2), device="cuda")
    stream = gpu.stream(2)
    engine = stream._engine
    sides = [[v.data_ptr() for v in side] for side in engine.bufs]
    assert all(v.device_name() == "cuda" for side in engine.bufs for v in side)
    x = np.ones((1, 2, 3), np.float32)
    seen = []
    for _ in range(50):
        stream.step(x)
        now = [v.data_ptr() for v in engine.current()]
        assert now in sides
        seen.append(now)
    assert seen[::2] != seen[1::2] and set(map(tuple, seen)) == set(map(tuple, sides))


def test_outputs_stay_on_the_device_until_read():
    model = rnnedge.load(G.rnn("GRU", batch_first=True), device="cuda")
    stream = model.stream(2)
    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    want = rnnedge.load(G.rnn("GRU", batch_first=True), device="cpu").stream(2).step(x)
    assert stream.step(x, read=False) is None
    assert all(v.device_name() == "cuda" for v in stream._slot.out_bufs)
    np.testing.assert_allclose(stream.read(), want, atol=1e-4, rtol=1e-4)


def test_cuda_state_roundtrip_and_reset_are_exact():
    gpu = rnnedge.load(G.rnn("GRU", layers=2, batch_first=True), device="cuda")
    stream = gpu.stream(3)
    x = np.random.default_rng(1).standard_normal((3, 4, 3)).astype(np.float32)
    stream.step(x)
    snap = stream.state
    first = stream.step(x)
    stream.state = snap
    assert stream.step(x).tobytes() == first.tobytes()
    stream.reset(np.array([True, False, True]))
    state = stream.state["h0"]
    assert not state[:, [0, 2]].any() and state[:, 1].any()


def test_cuda_pool_equals_cpu_pool():
    cpu, gpu = both(G.rnn("LSTM", batch_first=True))
    pools = [cpu.pool(), gpu.pool()]
    ids = [[p.add() for _ in range(6)] for p in pools]
    rng = np.random.default_rng(2)
    for tick in range(30):
        pick = list(range(6)) if tick % 4 else [0, 2, 5]
        xs = [rng.standard_normal((1, 2, 3)).astype(np.float32) for _ in pick]
        outs = [p.step({sids[j]: x for j, x in zip(pick, xs)}) for p, sids in zip(pools, ids)]
        for j in pick:
            np.testing.assert_allclose(outs[1][ids[1][j]], outs[0][ids[0][j]], **TOL)
        if tick == 10:
            for p, sids in zip(pools, ids):
                p.reset(sids[2])
