"""Stream mode for models that frame audio with ``torch.stft`` or ``Tensor.unfold``: each
call along time is streamed as the strided convolution it is, its cache carried as state.

Each model is exported once in stream mode (its export runs the parity gate), then
streamed by the runtime at several chunkings (one hop, uneven, a prime number of samples,
longer than the window) and on a long stream, and compared with eager PyTorch (the real
``torch.stft``/``unfold``) on the whole input.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812

import rnnedge  # noqa: E402
from rnnedge.errors import UnsupportedModelError  # noqa: E402
from tests import ortref, zoo  # noqa: E402


class StftGRU(nn.Module):
    """(B, T) audio -> causal STFT magnitude (n_fft 16, hop 4, hann) -> log1p -> GRU -> Linear."""

    def __init__(self):
        super().__init__()
        self.register_buffer("window", torch.hann_window(16))
        self.gru = nn.GRU(9, 12, batch_first=True)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):  # (B, T) -> (B, T // 4, 3)
        spec = torch.stft(F.pad(x, (12, 0)), 16, 4, window=self.window, center=False,
                          return_complex=True)  # (B, 9, T // 4) complex
        return self.fc(self.gru(torch.log1p(spec.abs()).transpose(1, 2))[0])


class StftPower(nn.Module):
    """Tensor.stft: a 12-sample hann window in n_fft 16, two-sided, normalized; |X|**2."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(16, 8, batch_first=True)

    def forward(self, x):  # (B, T) -> (B, T // 4, 8)
        spec = F.pad(x, (12, 0)).stft(16, hop_length=4, win_length=12,
                                      window=torch.hann_window(12), center=False,
                                      normalized=True, onesided=False, return_complex=True)
        return self.gru(torch.log1p(spec.abs() ** 2).transpose(1, 2))[0]


class StftReal(nn.Module):
    """view_as_real of a causal STFT (n_fft 8, hop 2, rectangular window) -> LSTM."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(10, 6, batch_first=True)

    def forward(self, x):  # (B, T) -> (B, T // 2, 6)
        spec = torch.stft(F.pad(x, (6, 0)), 8, 2, window=torch.ones(8), center=False,
                          return_complex=True)
        z = torch.view_as_real(spec).permute(0, 2, 1, 3).flatten(2)  # (B, frames, 5 * 2)
        return self.lstm(z)[0]


class UnfoldLSTM(nn.Module):
    """(B, T) -> causal framing x.unfold(-1, 8, 4) -> Linear -> LSTM."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 10)
        self.lstm = nn.LSTM(10, 6, batch_first=True)

    def forward(self, x):  # (B, T) -> (B, T // 4, 6)
        frames = F.pad(x, (4, 0)).unfold(-1, 8, 4)  # (B, T // 4, 8)
        return self.lstm(torch.tanh(self.fc(frames)))[0]


class UnfoldFeatures(nn.Module):
    """(B, T, 6) features -> causal context frames along time, unfold(1, 3, 2) -> GRU."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(18, 8, batch_first=True)

    def forward(self, x):  # (B, T, 6) -> (B, ceil(T / 2), 8)
        frames = F.pad(x, (0, 0, 2, 0)).unfold(1, 3, 2)  # (B, ceil(T / 2), 6, 3)
        return self.gru(frames.flatten(2))[0]


# model, example shape, min_length, chunk multiple, cache states {name: shape}
MODELS = {
    "stft-gru": (StftGRU, (1, 64), 4, 4, {"stft0.cache0": ["batch", 1, 12]}),
    "stft-power": (StftPower, (1, 64), 4, 4, {"stft0.cache0": ["batch", 1, 12]}),
    "stft-real": (StftReal, (1, 64), 2, 2, {"stft0.cache0": ["batch", 1, 6]}),
    "unfold-lstm": (UnfoldLSTM, (1, 64), 4, 4, {"unfold0.cache0": ["batch", 1, 4]}),
    "unfold-features": (UnfoldFeatures, (1, 32, 6), None, 2, {"unfold0.cache0": ["batch", 1, 6, 2]}),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (eval model, graph path, export report, the model's state_dict keys and
    attributes before the export), each exported once in stream mode (gate included)."""
    done = {}

    def get(name):
        if name not in done:
            cls, shape, min_length, _, _ = MODELS[name]
            torch.manual_seed(0)
            model = cls().eval()
            before = ([n for n, _ in model.named_modules()], dict(vars(model)))
            path = tmp_path_factory.mktemp(name) / "model.onnx"
            report = rnnedge.export(model, path, example_input=torch.randn(*shape),
                                    min_length=min_length)
            done[name] = (model, path, report, before)
        return done[name]

    return get


def _signal(name: str, total: int, batch: int, seed: int) -> np.ndarray:
    shape = (batch, total) + tuple(MODELS[name][1][2:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_export_carries_the_front_end_cache_and_passes_the_gate(exported, name):
    model, path, report, (names, attrs) = exported(name)
    multiple, caches = MODELS[name][3], MODELS[name][4]
    meta = ortref.contract(path)
    states = {s["input"]: s for s in meta["states"]}
    assert {k: states[k]["shape"] for k in caches} == caches
    assert all(states[k]["output"] == k.replace(".cache0", ".cachen") for k in caches)
    assert meta["chunk_multiple"] == multiple and "latency" not in meta
    streamed = [c for c in report.cases if c.case.kind == "stream"]
    assert any(c.case.length >= 1000 for c in streamed)
    assert report.max_abs < 1e-4
    # The user's model is left as it was: no front-end module, no patched forward.
    assert [n for n, _ in model.named_modules()] == names and dict(vars(model)) == attrs


# Chunk patterns in samples: one hop of the stft-gru/unfold-lstm front-ends, a prime, longer
# than every window here, uneven (including steps shorter than a hop).
CHUNKINGS = {"hop": (4,), "prime": (7,), "long": (97,), "uneven": (5, 1, 12, 3, 7)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_runtime_stream_equals_eager_on_the_whole_input(exported, name, chunking):
    model, path, _, _ = exported(name)
    total = 1000  # a multiple of every hop here: the stream ends on a whole frame
    x = _signal(name, total, 2, 7)
    stream = rnnedge.load(path, device="cpu").stream(batch=2)
    pieces, start, k, pattern = [], 0, 0, CHUNKINGS[chunking]
    while start < total:
        size = pattern[k % len(pattern)]
        pieces.append(stream.step(x[:, start:start + size]))
        start, k = start + size, k + 1
    pieces.append(stream.flush())
    got = np.concatenate(pieces, axis=1)
    want = zoo.eager(model, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stft-gru", "unfold-lstm", "unfold-features"])
def test_long_stream_with_a_partial_last_hop(exported, name):
    """4,001 samples in chunks of 13: flush() feeds the held sample(s) zero-padded to a
    hop, so the stream ends as eager does on the input zero-padded to a whole hop (the
    causal stft/unfold itself drops a partial last frame; a ceil-framed model keeps it)."""
    model, path, _, _ = exported(name)
    multiple = MODELS[name][3]
    total = 4001
    x = _signal(name, total, 1, 3)
    stream = rnnedge.load(path, device="cpu").stream(batch=1)
    got = np.concatenate([stream.run(x, chunk=13), stream.flush()], axis=1)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, -total % multiple)
    want = zoo.eager(model, np.pad(x, pad))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
    whole = zoo.eager(model, x)  # the frames eager gives on the input itself: the same
    np.testing.assert_allclose(got[:, : whole.shape[1]], whole, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_inspect_shows_the_front_end_caches(exported, cli):
    _, path, _, _ = exported("stft-gru")
    result = cli("inspect", path)
    assert result.exit_code == 0, result.output
    assert "stft0.cache0" in result.output
    assert "chunks of a multiple of 4 steps" in result.output
    assert "1 conv cache state(s)" in result.output


@pytest.mark.slow
def test_sequence_mode_keeps_the_front_end_as_it_is(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    rnnedge.export(UnfoldLSTM().eval(), path, example_input=torch.randn(1, 64), mode="sequence",
                   min_length=4)
    assert [s["input"] for s in ortref.contract(path)["states"]] == ["lstm.h0", "lstm.c0"]


class CentredReflect(nn.Module):
    """torch.stft's default: center=True with reflect padding."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(9, 4, batch_first=True)

    def forward(self, x):
        spec = torch.stft(x, 16, 4, window=torch.hann_window(16), return_complex=True)
        return self.gru(spec.abs().transpose(1, 2))[0]


class ReflectUnfold(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(8, 4, batch_first=True)

    def forward(self, x):
        return self.gru(F.pad(x, (4, 0), mode="reflect").unfold(-1, 8, 4))[0]


class Front(nn.Module):
    """A causal stft front-end as one layer of an nn.Sequential: (B, T) -> (B, T // 4, 9)."""

    def forward(self, x):
        spec = torch.stft(F.pad(x, (12, 0)), 16, 4, window=torch.hann_window(16), center=False,
                          return_complex=True)
        return spec.abs().transpose(1, 2)


class GRUOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(9, 4, batch_first=True)

    def forward(self, x):
        return self.gru(x)[0]


def sequential_stft() -> nn.Module:
    return nn.Sequential(Front(), GRUOut())


@pytest.mark.parametrize("cls, words", [
    (sequential_stft, ["Sequential", "torch.stft", "wrap it in a Module"]),
    (CentredReflect, ["torch.stft call 0", "center=True", "'reflect'", "pad_mode='constant'"]),
    (ReflectUnfold, ["Tensor.unfold call 0", "size 8, step 4", "reflect"]),
])
def test_what_cannot_stream_is_refused_by_name(tmp_path, cls, words):
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError) as err:
        rnnedge.export(cls().eval(), tmp_path / "m.onnx", example_input=torch.randn(1, 64),
                       min_length=16)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message
    assert not (tmp_path / "m.onnx").exists()


class StftAhead(nn.Module):
    """center=False without a left pad: each frame needs n_fft - hop = 12 samples ahead."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(9, 6, batch_first=True)

    def forward(self, x):
        spec = torch.stft(x, 16, 4, window=torch.hann_window(16), center=False,
                          return_complex=True)
        return self.gru(torch.log1p(spec.abs()).transpose(1, 2))[0]


class StftCentredZeros(StftAhead):
    """center=True, pad_mode="constant": 8 zeros on each side, 4 samples ahead."""

    def forward(self, x):
        spec = torch.stft(x, 16, 4, window=torch.hann_window(16), center=True,
                          pad_mode="constant", return_complex=True)
        return self.gru(torch.log1p(spec.abs()).transpose(1, 2))[0]


@pytest.mark.slow
@pytest.mark.parametrize("cls, latency", [(StftAhead, 12), (StftCentredZeros, 8)])
def test_look_ahead_front_end_streams_late(tmp_path, cls, latency):
    """Frames that need samples ahead stream late (contract latency), and a flush ends the
    stream where the model ends it: as many frames as eager at any length."""
    torch.manual_seed(0)
    model = cls().eval()
    path = tmp_path / "m.onnx"
    rnnedge.export(model, path, example_input=torch.randn(1, 64), min_length=16)
    meta = ortref.contract(path)
    assert meta["latency"] == latency and meta["chunk_multiple"] == 4
    for total in (16, 17, 1000, 1003):
        x = np.random.default_rng(total).standard_normal((2, total)).astype(np.float32)
        stream = rnnedge.load(path, device="cpu").stream(batch=2)
        got = np.concatenate([stream.run(x, chunk=7), stream.flush()], axis=1)
        want = zoo.eager(model, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)
