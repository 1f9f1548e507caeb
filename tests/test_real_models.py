"""Real models as they are (issue 11): structural equivalents of public models, random
weights, no downloads, each exported, proven by the gate and run from the written file at
lengths other than the example's, against eager PyTorch.

DeepSpeech-like and LSTMMasker-like: inputs and outputs with their own time axes.
DPRNN-like and unfold chunkers: layers over chunks of time folded into the batch (state
kept inside a sequence graph). Tacotron2-encoder-like: pack_padded_sequence inside
forward (a ``lengths`` input). SincNet-like: clamp with an int and a float bound.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnnedge
from rnnedge.errors import UnsupportedModelError, UsageError


class DeepSpeechLike(nn.Module):
    """(B, 1, T, F) -> Conv2d over (T, F), same padding -> (B, T, C*F) -> BiGRU -> (B, T, 5)."""

    def __init__(self, feats: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3, padding=1)
        self.rnn = nn.GRU(3 * feats, 6, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))  # (B, 3, T, F)
        x = x.permute(0, 2, 1, 3).flatten(2)  # (B, T, 3F)
        return self.fc(self.rnn(x)[0])


class MaskerLike(nn.Module):
    """(B, C, T) -> transpose -> LSTM -> Linear -> (B, S, C, T) masks."""

    def __init__(self, chans: int = 4, sources: int = 2):
        super().__init__()
        self.chans, self.sources = chans, sources
        self.lstm = nn.LSTM(chans, 8, batch_first=True)
        self.fc = nn.Linear(8, sources * chans)

    def forward(self, x):
        y = self.fc(self.lstm(x.transpose(1, 2))[0])  # (B, T, S*C)
        y = y.unflatten(2, (self.sources, self.chans))  # (B, T, S, C)
        return torch.sigmoid(y.permute(0, 2, 3, 1))  # (B, S, C, T)


class DPRNNLike(nn.Module):
    """(B, N, T) -> padded to chunks of K -> intra-chunk BLSTM over (B*chunks, K, N) ->
    inter-chunk LSTM over (B*K, chunks, N) -> (B, N, T). The padding uses tensor sizes only."""

    def __init__(self, n: int = 4, k: int = 4):
        super().__init__()
        self.k = k
        self.intra = nn.LSTM(n, 3, batch_first=True, bidirectional=True)
        self.intra_fc = nn.Linear(6, n)
        self.inter = nn.LSTM(n, 5, batch_first=True)
        self.inter_fc = nn.Linear(5, n)

    def forward(self, x):
        b, n, t = x.shape
        k = self.k
        chunks = (t + k - 1) // k
        x = F.pad(x, (0, k - 1))[..., : chunks * k]  # (B, N, chunks*K)
        x = x.reshape(b, n, chunks, k).permute(0, 2, 3, 1)  # (B, chunks, K, N)
        intra = self.intra_fc(self.intra(x.reshape(b * chunks, k, n))[0])
        x = x + intra.reshape(b, chunks, k, n)
        inter_in = x.transpose(1, 2).reshape(b * k, chunks, n)
        inter = self.inter_fc(self.inter(inter_in)[0]).reshape(b, k, chunks, n).transpose(1, 2)
        x = x + inter  # (B, chunks, K, N)
        return x.permute(0, 3, 1, 2).reshape(b, n, chunks * k)[..., :t]


class TacotronEncoderLike(nn.Module):
    """tokens (B, T) -> Embedding -> Conv1d stack over (B, C, T) -> pack_padded_sequence ->
    BiLSTM -> pad_packed_sequence -> (B, T, 2H)."""

    def __init__(self, bidirectional: bool = True, convs: int = 2):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.convs = nn.ModuleList(nn.Conv1d(8, 8, 5, padding=2) for _ in range(convs))
        self.lstm = nn.LSTM(8, 6, batch_first=True, bidirectional=bidirectional)

    def forward(self, tokens, lengths):
        x = self.embed(tokens).transpose(1, 2)
        for conv in self.convs:
            x = torch.relu(conv(x))
        x = nn.utils.rnn.pack_padded_sequence(x.transpose(1, 2), lengths.cpu(), batch_first=True,
                                              enforce_sorted=False)
        y, _ = self.lstm(x)
        y, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True)
        return y


class SincLike(nn.Module):
    """SincNet-like front-end: band edges clamped with an int and a float bound (as
    pyannote's ``torch.clamp(low + band, self.min_low_hz, self.sample_rate / 2)``), sinc
    filters over (B, 1, T) with same padding -> LSTM -> (B, T, 6)."""

    def __init__(self, filters: int = 4, width: int = 9, sample_rate: int = 16000):
        super().__init__()
        self.sample_rate, self.min_low_hz, self.min_band_hz = sample_rate, 50, 50
        self.low_hz_ = nn.Parameter(torch.linspace(30, 3000, filters).unsqueeze(1))
        self.band_hz_ = nn.Parameter(torch.full((filters, 1), 400.0))
        self.register_buffer("n_", 2 * math.pi * torch.arange(-(width // 2), width // 2 + 1) / sample_rate)
        self.lstm = nn.LSTM(filters, 6, batch_first=True)

    def forward(self, waveforms):
        low = self.min_low_hz + torch.abs(self.low_hz_)
        high = torch.clamp(low + self.min_band_hz + torch.abs(self.band_hz_), self.min_low_hz,
                           self.sample_rate / 2)
        filters = (torch.cos(low * self.n_) - torch.cos(high * self.n_)) / 100.0  # (F, W)
        x = F.conv1d(waveforms, filters.unsqueeze(1), padding=filters.shape[1] // 2)
        x = torch.log1p(x.abs()).clamp(min=0)  # (B, F, T)
        return self.lstm(x.transpose(1, 2))[0]


def demucs_unfold(a, kernel: int, stride: int):
    """demucs.utils.unfold: frames through as_strided on a padded copy (a.stride())."""
    *shape, length = a.shape
    frames = math.ceil(length / stride)
    a = F.pad(a, (0, (frames - 1) * stride + kernel - length))
    strides = list(a.stride())[:-1] + [stride, 1]
    return a.as_strided([*shape, frames, kernel], strides)


class ChunkerLike(nn.Module):
    """(B, C, T) -> frames of K with hop K/2 (``x.unfold`` or demucs's as_strided) -> LSTM
    over (B*frames, K, C) -> mean per frame -> (B, frames, H)."""

    def __init__(self, how: str, chans: int = 4, k: int = 6):
        super().__init__()
        self.how, self.k = how, k
        self.lstm = nn.LSTM(chans, 5, batch_first=True)

    def forward(self, x):
        if self.how == "unfold":
            frames = x.unfold(-1, self.k, self.k // 2)
        else:
            frames = demucs_unfold(x, self.k, self.k // 2)
        b, c, n, k = frames.shape
        y = self.lstm(frames.permute(0, 2, 3, 1).reshape(b * n, k, c))[0]
        return y.reshape(b, n, k, -1).mean(2)


def _eager(model, *xs):
    with torch.no_grad():
        return model(*(torch.from_numpy(x) for x in xs)).numpy()


def _export(tmp_path, model, example, **kw):
    torch.manual_seed(0)
    path = tmp_path / "m.onnx"
    report = rnnedge.export(model.eval(), path, example_input=example, **kw)
    return report, rnnedge.load(path, device="cpu")


def _seeded(cls, *args):
    torch.manual_seed(0)
    return cls(*args).eval()


@pytest.mark.slow
def test_deepspeech_like_has_its_own_time_axes(tmp_path):
    model = _seeded(DeepSpeechLike)
    report, m = _export(tmp_path, model, torch.randn(1, 1, 10, 8), mode="sequence",
                        input_axes=[("batch", 1, "time", 8)])
    meta = report.metadata
    assert meta["format"] == 2  # a format-1 reader would take axis 2 for the output's time
    assert [t["time_axis"] for t in meta["inputs"] + meta["outputs"]] == [2, 1]
    assert meta["outputs"][0]["shape"] == ["batch", "time", 5]
    x = np.random.default_rng(1).standard_normal((2, 1, 23, 8)).astype(np.float32)
    y = m.stream(batch=2).step(x)
    np.testing.assert_allclose(y, _eager(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequence", "stream"])
def test_masker_like_output_time_on_its_last_axis(tmp_path, mode):
    model = _seeded(MaskerLike)
    report, m = _export(tmp_path, model, torch.randn(1, 4, 10), mode=mode,
                        input_axes=[("batch", 4, "time")])
    out = report.metadata["outputs"][0]
    assert out["shape"] == ["batch", 2, 4, "time"] and out["time_axis"] == 3
    assert report.metadata["inputs"][0]["time_axis"] == 2
    x = np.random.default_rng(2).standard_normal((3, 4, 29)).astype(np.float32)
    stream = m.stream(batch=3)
    y = stream.run(x, chunk=4) if mode == "stream" else stream.step(x)  # chunks joined on axis 3
    np.testing.assert_allclose(y, _eager(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_dprnn_like_keeps_its_state_inside_a_sequence_graph(tmp_path):
    model = _seeded(DPRNNLike)
    report, m = _export(tmp_path, model, torch.randn(1, 4, 12), mode="sequence",
                        input_axes=[("batch", 4, "time")])
    meta = report.metadata
    assert meta["states"] == [] and meta["state"] == "internal"
    assert meta["outputs"][0]["shape"] == ["batch", 4, "time"]
    for t in (5, 13, 30):  # not multiples of the chunk
        x = np.random.default_rng(t).standard_normal((2, 4, t)).astype(np.float32)
        np.testing.assert_allclose(m.stream(batch=2).step(x), _eager(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_dprnn_like_in_stream_mode_names_the_folded_layer(tmp_path):
    # Plain numbers (not "[6]") and the CLI's spelling of the advice.
    with pytest.raises(UnsupportedModelError,
                       match=r"layer 'intra' \(LSTM\) runs over a batch of 6 rows where the "
                             r"model's batch is 2 .*export with mode='sequence' \(--mode sequence\)"):
        _export(tmp_path, _seeded(DPRNNLike), torch.randn(1, 4, 12), mode="stream",
                input_axes=[("batch", 4, "time")])


@pytest.mark.slow
def test_states_internal_on_request(tmp_path):
    model = _seeded(MaskerLike)
    report, m = _export(tmp_path, model, torch.randn(1, 4, 10), mode="sequence",
                        input_axes=[("batch", 4, "time")], states="internal")
    assert report.metadata["states"] == [] and report.metadata["state"] == "internal"
    assert m.contract.states == ()
    x = np.random.default_rng(3).standard_normal((2, 4, 17)).astype(np.float32)
    np.testing.assert_allclose(m.stream(batch=2).step(x), _eager(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kw, match", [
    ({"mode": "stream", "states": "internal"}, "needs mode='sequence'"),
    ({"mode": "sequence", "states": "lifted"}, "states must be 'carried' or 'internal'"),
])
def test_states_option_is_checked_before_any_work(tmp_path, kw, match):
    with pytest.raises(UsageError, match=match):
        rnnedge.export(MaskerLike(), tmp_path / "m.onnx", example_input=torch.randn(1, 4, 10), **kw)


@pytest.mark.slow
def test_tacotron_encoder_like_packs_with_a_lengths_input(tmp_path):
    model = _seeded(TacotronEncoderLike)
    example = (torch.randint(0, 20, (2, 10)), torch.tensor([10, 7]))
    report, m = _export(tmp_path, model, example, mode="sequence")
    meta = report.metadata
    assert [(t["name"], t["dtype"], t["shape"]) for t in meta["inputs"]] == [
        ("input.0", "int64", ["batch", "time"]), ("lengths", "int64", ["batch"])]
    assert any(c.case.kind == "lengths" for c in report.cases)  # random per-row lengths
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 20, (3, 19)).astype(np.int64)
    lengths = np.array([19, 4, 11], np.int64)  # unsorted; the longest row is full length
    y = m.stream(batch=3).step({"input.0": tokens, "lengths": lengths})
    np.testing.assert_allclose(y, _eager(model, tokens, lengths), atol=1e-4, rtol=1e-4)


def test_packing_in_stream_mode_is_refused(tmp_path):
    with pytest.raises(UsageError, match="packs its sequences"):
        _export(tmp_path, _seeded(TacotronEncoderLike, False, 0),
                (torch.randint(0, 20, (2, 10)), torch.tensor([10, 7])), mode="stream")


@pytest.mark.slow
def test_sinc_like_front_end_with_mixed_clamp_bounds(tmp_path):
    model = _seeded(SincLike)
    report, m = _export(tmp_path, model, torch.randn(1, 1, 40), mode="sequence",
                        input_axes=[("batch", 1, "time")])
    assert report.metadata["outputs"][0]["time_axis"] == 1
    x = np.random.default_rng(5).standard_normal((2, 1, 77)).astype(np.float32)
    np.testing.assert_allclose(m.stream(batch=2).step(x), _eager(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["unfold", "as_strided"])
def test_unfold_chunker_with_an_lstm(tmp_path, how):
    model = _seeded(ChunkerLike, how)
    report, m = _export(tmp_path, model, torch.randn(1, 4, 24), mode="sequence",
                        input_axes=[("batch", 4, "time")], min_length=6)
    assert report.metadata["state"] == "internal"  # the LSTM runs over batch*frames
    for t in (6, 17, 40):
        x = np.random.default_rng(t).standard_normal((2, 4, t)).astype(np.float32)
        np.testing.assert_allclose(m.stream(batch=2).step(x), _eager(model, x), atol=1e-4, rtol=1e-4)


def test_format_1_files_still_read_with_one_time_axis():
    from rnnedge.contract import from_json

    meta = {"format": 1, "mode": "stream", "time_axis": 1, "opset": 18, "states": [],
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", "T", 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", "T", 2]},
                        {"name": "last", "dtype": "float32", "shape": ["batch", 2]}]}
    spec = from_json(json.dumps(meta))
    assert [t.time_axis for t in spec.inputs + spec.outputs] == [1, 1, None]
    assert spec.metadata()["format"] == 1  # what a format-1 reader reads the same way
