"""Stream mode for models with convolutions along time: conv caches carried as state.

Each model is exported once (its export runs the parity gate: whole sequences, streams
in 1-step and uneven chunks, a 1000-step stream), then streamed by the runtime at more
chunkings (1, a prime, longer than the receptive field, uneven, any length with the
remainder held back and flushed) and compared with eager PyTorch on the whole input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812

import rnnedge  # noqa: E402
from rnnedge.contract import ExportSpec, from_json  # noqa: E402
from rnnedge.errors import ContractError, UnsupportedModelError  # noqa: E402
from tests import ortref, zoo  # noqa: E402


class KWS(nn.Module):
    """Causal CRNN keyword spotter: Conv1d k5 -> Conv1d k3 dilation 2 -> GRU -> Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(8, 12, 5)
        self.c2 = nn.Conv1d(12, 12, 3, dilation=2)
        self.gru = nn.GRU(12, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):  # (B, T, 8) -> (B, T, 4)
        z = torch.relu(self.c1(F.pad(x.transpose(1, 2), (4, 0))))
        z = torch.relu(self.c2(F.pad(z, (4, 0))))
        y, _ = self.gru(z.transpose(1, 2))
        return self.fc(y)


class OwnPadding(nn.Module):
    """Causal by the conv's own padding argument with a ZeroPad module; pooling after."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ConstantPad1d((2, 0), 0.0)
        self.c1 = nn.Conv1d(5, 6, 3)
        self.bn = nn.BatchNorm1d(6)
        self.pool = nn.AvgPool1d(2, stride=1, padding=1)
        self.lstm = nn.LSTM(6, 8, batch_first=True)

    def forward(self, x):  # (B, T, 5) -> (B, T, 8)
        z = self.bn(self.c1(self.pad(x.transpose(1, 2))))
        z = self.pool(z)[..., : x.shape[1]]
        return self.lstm(z.transpose(1, 2))[0]


class Strided(nn.Module):
    """Two causal Conv1d with stride 2 (total 4) -> GRU -> Linear: output at 1/4 the rate."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(6, 8, 4, stride=2)
        self.c2 = nn.Conv1d(8, 8, 3, stride=2)
        self.gru = nn.GRU(8, 10, batch_first=True)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):  # (B, T, 6) -> (B, ceil(T/4), 3)
        z = torch.relu(self.c1(F.pad(x.transpose(1, 2), (3, 0))))
        z = torch.tanh(self.c2(F.pad(z, (2, 0))))
        y, _ = self.gru(z.transpose(1, 2))
        return self.fc(y)


class Conv2dCRNN(nn.Module):
    """Conv2d over (freq, time), causal in time, 'same' in frequency, BatchNorm, freq pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, (3, 3), padding=(1, 0))
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d((2, 1))
        self.c2 = nn.Conv2d(4, 4, (3, 2), padding=(1, 0))
        self.lstm = nn.LSTM(4 * 4, 12, batch_first=True)
        self.fc = nn.Linear(12, 2)

    def forward(self, x):  # (B, T, 8 freq) -> (B, T, 2)
        z = x.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T)
        z = self.pool(torch.relu(self.bn(self.c1(F.pad(z, (2, 0))))))
        z = torch.relu(self.c2(F.pad(z, (1, 0))))
        b, c, f, t = z.shape
        y, _ = self.lstm(z.reshape(b, c * f, t).transpose(1, 2))
        return self.fc(y)


class DemucsLike(nn.Module):
    """Causal conv encoder (strides 4, 2) + LSTM + ConvTranspose1d decoder, skip connections."""

    def __init__(self, h: int = 8):
        super().__init__()
        self.e1 = nn.Conv1d(1, h, 8, stride=4)
        self.e2 = nn.Conv1d(h, 2 * h, 4, stride=2)
        self.lstm = nn.LSTM(2 * h, 2 * h, batch_first=True)
        self.d2 = nn.ConvTranspose1d(2 * h, h, 4, stride=2)
        self.d1 = nn.ConvTranspose1d(h, 1, 8, stride=4)

    def forward(self, x):  # (B, T, 1) -> (B, T, 1)
        n = x.shape[1]
        e1 = torch.relu(self.e1(F.pad(x.transpose(1, 2), (7, 0))))
        e2 = torch.relu(self.e2(F.pad(e1, (3, 0))))
        y, _ = self.lstm(e2.transpose(1, 2))
        d = torch.relu(self.d2(y.transpose(1, 2) + e2))[..., : e1.shape[-1]] + e1
        return self.d1(d)[..., :n].transpose(1, 2)


# model, input features, example length, chunk multiple, cache states {name: shape}
MODELS = {
    "kws": (KWS, 8, 10, 1, {"c1.cache0": ["batch", 8, 4], "c2.cache0": ["batch", 12, 4]}),
    "own-padding": (OwnPadding, 5, 10, 1, {"c1.cache0": ["batch", 5, 2],
                                           "pool.cache0": ["batch", 6, 1]}),
    "strided": (Strided, 6, 16, 4, {"c1.cache0": ["batch", 6, 3], "c2.cache0": ["batch", 8, 2]}),
    "conv2d": (Conv2dCRNN, 8, 10, 1, {"c1.cache0": ["batch", 1, 8, 2],
                                      "c2.cache0": ["batch", 4, 4, 1]}),
    "demucs-like": (DemucsLike, 1, 64, 8, {"e1.cache0": ["batch", 1, 7], "e2.cache0": ["batch", 8, 3],
                                           "d2.cache0": ["batch", 8, 2], "d1.cache0": ["batch", 1, 4]}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (eval model, graph path, export report), each exported once (gate included)."""
    done = {}

    def get(name):
        if name not in done:
            cls, feats, length, _, _ = MODELS[name]
            torch.manual_seed(0)
            model = cls().eval()
            path = tmp_path_factory.mktemp(name) / "model.onnx"
            report = rnnedge.export(model, path, example_input=torch.randn(1, length, feats))
            done[name] = (model, path, report)
        return done[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_export_carries_conv_caches_and_passes_the_gate(exported, name):
    _, path, report = exported(name)
    _, _, _, multiple, caches = MODELS[name]
    meta = ortref.contract(path)
    states = {s["input"]: s for s in meta["states"]}
    assert {k: states[k]["shape"] for k in caches} == caches
    assert all(states[k]["output"] == k.replace(".cache0", ".cachen") and states[k]["batch_axis"] == 0
               for k in caches)
    assert meta.get("chunk_multiple", 1) == multiple
    assert meta["format"] == (2 if multiple > 1 else 1)  # a format-1 reader would feed any chunk
    streamed = [c for c in report.cases if c.case.kind == "stream"]
    assert any(c.case.length >= 1000 for c in streamed)  # the long stream
    assert {c.case.chunks[0] for c in streamed} >= {multiple}  # 1-step (times the multiple)
    assert report.max_abs < 1e-4


# Chunk patterns fed by the runtime (multiplied by the chunk multiple where there is one):
# 1 step, a prime, longer than every receptive field here, uneven.
CHUNKINGS = {"one": (1,), "prime": (7,), "long": (97,), "uneven": (5, 1, 12, 3, 7)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kws", "own-padding", "conv2d", "strided", "demucs-like"])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_runtime_stream_equals_eager_on_the_whole_input(exported, name, chunking):
    model, path, _ = exported(name)
    _, feats, _, multiple, _ = MODELS[name]
    total = 300 * multiple
    x = np.random.default_rng(7).standard_normal((2, total, feats)).astype(np.float32)
    stream = rnnedge.load(path, device="cpu").stream(batch=2)
    pieces, start, k = [], 0, 0
    pattern = CHUNKINGS[chunking]
    while start < total:
        size = pattern[k % len(pattern)] * multiple
        pieces.append(stream.step(x[:, start:start + size]))
        start, k = start + size, k + 1
    got = np.concatenate(pieces, axis=1)
    want = zoo.eager(model, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["strided", "demucs-like"])
@pytest.mark.parametrize("total", [53, 1001])
def test_any_chunk_length_is_held_back_and_flushed(exported, name, total):
    """Chunks that are not multiples of the stride: the runtime holds the rest back, and
    flush() at the end gives what eager gives on the whole input, not a multiple long."""
    model, path, _ = exported(name)
    feats, multiple = MODELS[name][1], MODELS[name][3]
    x = np.random.default_rng(3).standard_normal((1, total, feats)).astype(np.float32)
    stream = rnnedge.load(path, device="cpu").stream(batch=1)
    pieces, start, sizes = [], 0, (1, 2, 3, 5, 7, 11, 13)
    for k in range(10_000):
        if start >= total:
            break
        size = sizes[k % len(sizes)]
        pieces.append(stream.step(x[:, start:start + size]))
        start = min(start + size, total)
        assert stream.held == start % multiple
    pieces.append(stream.flush())
    assert stream.held == 0
    want = zoo.eager(model, x)
    got = np.concatenate(pieces, axis=1)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    run = rnnedge.load(path, device="cpu").stream(batch=1)
    got = np.concatenate([run.run(x, chunk=5), run.flush()], axis=1)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_inspect_shows_chunk_multiple_and_caches(exported, cli):
    _, path, _ = exported("strided")
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "chunks of a multiple of 4 steps" in result.output
    # One output step per 4 input steps: the contract says so, for apps sizing buffers.
    assert ortref.contract(path)["outputs"][0]["time_ratio"] == [1, 4]
    assert "2 conv cache state(s)" in result.output
    assert "c1.cache0" in result.output


class WholeNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm1d(4)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        return self.lstm(self.norm(x.transpose(1, 2)).transpose(1, 2))[0]


class PadToMultiple(nn.Module):
    """Pads its end to a multiple of 8 (length arithmetic) before a causal strided conv: no
    flush of a causal stream stands for that padding."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(4, 3, 4, stride=4)
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        z = F.pad(x.transpose(1, 2), (0, (-x.shape[1]) % 8))
        return self.gru(self.c(z).transpose(1, 2))[0]


class PadAway(nn.Module):
    """Pads time, then an activation, then the conv: the pad does not feed the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        z = torch.tanh(F.pad(x.transpose(1, 2), (2, 0)))
        return self.lstm(self.conv(z).transpose(1, 2))[0]


class Reflect(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        z = F.pad(x.transpose(1, 2), (2, 0), mode="reflect")
        return self.lstm(self.conv(z).transpose(1, 2))[0]


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        z = self.conv(F.pad(x.transpose(1, 2), (2, 0)))
        z = self.conv(F.pad(z, (2, 0)))
        return self.lstm(z.transpose(1, 2))[0]


class CentredSkip(nn.Module):
    """A skip connection around a look-ahead conv: the paths' latencies differ."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        z = x.transpose(1, 2)
        return self.lstm((self.conv(z) + z).transpose(1, 2))[0]


class TwoLate(nn.Module):
    """Two centred convs in series: latency 1 + 1."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 4, 3, padding=1)
        self.c2 = nn.Conv1d(4, 4, 3, padding=1)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        return self.lstm(self.c2(self.c1(x.transpose(1, 2))).transpose(1, 2))[0]


@pytest.mark.parametrize("cls, words", [
    (WholeNorm, ["InstanceNorm1d 'norm'", "normalises over the time axis"]),
    (PadToMultiple, ["Conv1d 'c'", "padded along time by an amount that depends on the length"]),
    (PadAway, ["pads along the time axis", "does not go straight into a convolution"]),
    (Reflect, ["Conv1d 'conv'", "mode 'reflect'"]),
    (Twice, ["Conv1d 'conv'", "called 2 times"]),
])
def test_what_cannot_stream_is_refused_by_name(tmp_path, cls, words):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError) as err:
        rnnedge.export(cls().eval(), tmp_path / "m.onnx", example_input=torch.randn(1, 10, 4))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_sequence_mode_keeps_the_convs_whole(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    rnnedge.export(CentredSkip().eval(), path, example_input=torch.randn(1, 10, 4), mode="sequence")
    assert [s["input"] for s in ortref.contract(path)["states"]] == ["lstm.h0", "lstm.c0"]


def _spec(**changes) -> ExportSpec:
    from rnnedge.contract import StateSpec, TensorSpec

    spec = ExportSpec("stream", (TensorSpec("input", "float32", ("batch", "time", 6)),),
                      (TensorSpec("output", "float32", ("batch", "time", 3)),),
                      (StateSpec("c1.cache0", "c1.cachen", "float32", ("batch", 6, 3), 0),),
                      1, 18)
    return spec.replace(**changes)


@pytest.mark.parametrize("multiple, latency, fmt", [(1, 0, 1), (4, 0, 2), (1, 3, 2)])
def test_contract_chunk_multiple_and_latency_round_trip(multiple, latency, fmt):
    spec = _spec(chunk_multiple=multiple, latency=latency)
    meta = json.loads(spec.to_json())
    assert meta["format"] == fmt
    assert ("chunk_multiple" in meta) == (multiple != 1) and ("latency" in meta) == (latency != 0)
    back = from_json(spec.to_json())
    assert (back.chunk_multiple, back.latency) == (multiple, latency)


@pytest.mark.parametrize("key, value", [("chunk_multiple", 0), ("chunk_multiple", 2.5),
                                        ("latency", -1), ("latency", True)])
def test_contract_refuses_bad_chunk_multiple_or_latency(key, value):
    meta = json.loads(_spec(chunk_multiple=4).to_json())
    meta[key] = value
    with pytest.raises(ContractError, match=key):
        from_json(json.dumps(meta))


class SameConvLSTM(nn.Module):
    """Centred padding: Conv1d k=5 padding=2 (2 frames of look-ahead) -> LSTM -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(6, 8, 5, padding=2)
        self.lstm = nn.LSTM(8, 10, batch_first=True)
        self.fc = nn.Linear(10, 3)

    def forward(self, x):  # (B, T, 6) -> (B, T, 3)
        return self.fc(self.lstm(torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2))[0])


class CausalThenLate(nn.Module):
    """Causal conv -> centred dilated conv (k=3, dilation 2, padding 'same') -> GRU."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv1d(4, 6, 3)
        self.c1 = nn.Conv1d(6, 6, 3, padding="same", dilation=2)
        self.gru = nn.GRU(6, 8, batch_first=True)

    def forward(self, x):  # (B, T, 4) -> (B, T, 8)
        z = torch.tanh(self.c0(F.pad(x.transpose(1, 2), (2, 0))))
        return self.gru(torch.relu(self.c1(z)).transpose(1, 2))[0]


class LateInSeries(nn.Module):
    """Centred k=5 -> causal k=3 -> centred dilated (look-ahead 2 + 2, latency 4 > the gate's
    3-step probes: a graph emits nothing on a first call of no more than 4 steps)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 5, padding=2)
        self.c0 = nn.Conv1d(6, 6, 3)
        self.c2 = nn.Conv1d(6, 6, 3, padding="same", dilation=2)
        self.gru = nn.GRU(6, 5, batch_first=True)

    def forward(self, x):  # (B, T, 4) -> (B, T, 5)
        z = torch.relu(self.c1(x.transpose(1, 2)))
        z = torch.relu(self.c0(F.pad(z, (2, 0))))
        return self.gru(torch.relu(self.c2(z)).transpose(1, 2))[0]


class UNetLike(nn.Module):
    """"Same"-padded conv stack with a residual and two concat skips (U-Net-like): paths of
    latency 0, 2, 3 and 5 joined, each less late one through a delay line; latency 6."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv1d(4, 6, 5, padding=2)
        self.e2 = nn.Conv1d(6, 6, 3, padding=1)
        self.mid = nn.Conv1d(6, 6, 3, padding="same", dilation=2)
        self.d2 = nn.Conv1d(12, 6, 3, padding=1)
        self.d1 = nn.Conv1d(6 + 4, 4, 1)
        self.gru = nn.GRU(4, 5, batch_first=True)

    def forward(self, x):  # (B, T, 4) -> (B, T, 5)
        z = x.transpose(1, 2)
        e1 = torch.relu(self.e1(z))
        e2 = torch.relu(self.e2(e1))
        m = torch.relu(self.mid(e2)) + e2
        d2 = torch.relu(self.d2(torch.cat([m, e1], dim=1)))
        return self.gru(self.d1(torch.cat([d2, z], dim=1)).transpose(1, 2))[0]


# model, input features, latency, delay lines {state: shape}
LATE = {"same-conv-lstm": (SameConvLSTM, 6, 2, {}), "causal-then-late": (CausalThenLate, 4, 2, {}),
        "two-late": (TwoLate, 4, 2, {}), "late-in-series": (LateInSeries, 4, 4, {}),
        "centred-skip": (CentredSkip, 4, 1, {"delay0.cache0": ["batch", 4, 1]}),
        "unet-like": (UNetLike, 4, 6, {"delay0.cache0": ["batch", 6, 2],
                                       "delay1.cache0": ["batch", 6, 3],
                                       "delay2.cache0": ["batch", 4, 6]})}


@pytest.fixture(scope="module")
def late(tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            cls, feats, _, _ = LATE[name]
            torch.manual_seed(0)
            model = cls().eval()
            path = tmp_path_factory.mktemp(name) / "model.onnx"
            report = rnnedge.export(model, path, example_input=torch.randn(1, 10, feats))
            done[name] = (model, path, report)
        return done[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LATE))
def test_look_ahead_streams_late_with_latency_in_the_contract(late, name):
    _, path, report = late(name)
    meta = ortref.contract(path)
    assert meta["latency"] == LATE[name][2] and meta["format"] == 2
    states = [s["input"] for s in meta["states"]]
    assert states[-1] == "latency.flush0" and any(s.endswith(".seen0") for s in states)
    shapes = {s["input"]: s["shape"] for s in meta["states"]}
    assert {k: v for k, v in shapes.items() if k.endswith(".cache0") and k.startswith("delay")} \
        == LATE[name][3]
    assert all(k.replace(".cache0", ".seen0") in shapes for k in LATE[name][3])
    streamed = [c for c in report.cases if c.case.kind == "stream"]
    assert streamed and any(c.case.chunks[0] == 1 for c in streamed)  # 1-step chunks, flushed
    assert report.max_abs < 1e-4


# 1 step, uneven, a prime, longer than the receptive field and than the whole input.
LATE_CHUNKINGS = {"one": (1,), "uneven": (5, 1, 12, 3, 7), "prime": (7,), "long": (97,),
                  "whole": (500,)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LATE))
@pytest.mark.parametrize("chunking", list(LATE_CHUNKINGS))
@pytest.mark.parametrize("total", [2, 301])
def test_late_stream_plus_flush_equals_eager_on_the_whole_input(late, name, chunking, total):
    model, path, _ = late(name)
    feats, latency = LATE[name][1], LATE[name][2]
    x = np.random.default_rng(5).standard_normal((2, total, feats)).astype(np.float32)
    stream = rnnedge.load(path, device="cpu").stream(batch=2)
    pieces, start, k, pattern = [], 0, 0, LATE_CHUNKINGS[chunking]
    while start < total:
        size = pattern[k % len(pattern)]
        pieces.append(stream.step(x[:, start:start + size]))
        start, k = start + size, k + 1
        emitted = sum(p.shape[1] for p in pieces)
        assert emitted == (0 if min(start, total) <= latency else min(start, total) - latency)
    pieces.append(stream.flush())
    got = np.concatenate(pieces, axis=1)
    want = zoo.eager(model, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    stream.reset()
    again = np.concatenate([stream.run(x, chunk=3), stream.flush()], axis=1)
    np.testing.assert_allclose(again, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_flush_of_an_empty_late_stream_gives_zero_steps(late):
    # The graph would emit 0 steps, on which onnxruntime's GRU aborts the process.
    stream = rnnedge.load(late("late-in-series")[1], device="cpu").stream(batch=2)
    assert stream.flush().shape == (2, 0, 5)


@pytest.mark.slow
def test_inspect_shows_latency(late, cli):
    _, path, _ = late("same-conv-lstm")
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "latency 2 steps" in result.output


@pytest.mark.slow
def test_a_pool_refuses_what_it_cannot_hold(late, exported):
    from rnnedge.errors import StepInputError, UsageError

    with pytest.raises(UsageError, match="2 steps late"):
        rnnedge.load(late("same-conv-lstm")[1], device="cpu").pool()
    pool = rnnedge.load(exported("strided")[1], device="cpu").pool()
    a = pool.add()
    assert pool.step({a: np.zeros((1, 8, 6), np.float32)})[a].shape == (1, 2, 3)
    with pytest.raises(StepInputError, match="multiples of 4"):
        pool.step({a: np.zeros((1, 6, 6), np.float32)})
