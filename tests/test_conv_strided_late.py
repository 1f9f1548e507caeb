"""Stream mode for models that look ahead AND stride or upsample along time: a centred
strided conv, a valid conv, a look-ahead conv before a strided one, a denoiser-Demucs-like
U-Net of valid strided convs and transposed convs with skips that pads itself to a "valid
length", and the real `denoiser` package's Demucs (resample 1 and 2) where it is installed.

Each is exported once (the gate runs its stream cases on the runtime's grid: a first call
of ``chunk_offset`` (mod ``chunk_multiple``) steps, then multiples, a flush padded to the
grid), then streamed by the runtime at several chunkings and lengths, including lengths
off the grid, and compared frame for frame with eager PyTorch on the whole input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402, N812

import rnnedge  # noqa: E402
from tests import ortref, zoo  # noqa: E402


class CentredStrided(nn.Module):
    """Conv1d k=5 stride 2 padding 2 (2 frames ahead at stride 2) -> LSTM: (B, T, 4) ->
    (B, ceil(T / 2), 6)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 5, stride=2, padding=2)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x):
        return self.lstm(self.conv(x.transpose(1, 2)).transpose(1, 2))[0]


class ValidConvGRU(nn.Module):
    """A valid Conv1d k=5 (no padding: 4 frames ahead, 4 frames fewer) -> GRU: (B, T, 4) ->
    (B, T - 4, 8); the model needs 5 steps (min_length)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 5)
        self.gru = nn.GRU(6, 8, batch_first=True)

    def forward(self, x):
        return self.gru(self.conv(x.transpose(1, 2)).transpose(1, 2))[0]


class SameThenWide(nn.Module):
    """Centred k=5 -> a valid Conv1d k=25 stride 16 -> GRU: (B, T, 2) -> (B, ~(T - 9) / 16, 4);
    its frames at the end of a stream follow T by floor(T / 16 - 9 / 16) (end_offset)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 5, padding=2)
        self.c2 = nn.Conv1d(3, 3, 25, stride=16)
        self.gru = nn.GRU(3, 4, batch_first=True)

    def forward(self, x):
        return self.gru(self.c2(self.c1(x.transpose(1, 2))).transpose(1, 2))[0]


class LateThenStrided(nn.Module):
    """Centred k=3 (1 frame ahead) -> causal Conv1d k=4 stride 2 -> GRU: the centred conv's
    dropped first frame shifts the strided conv's windows (a first call of odd length)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding=1)
        self.c2 = nn.Conv1d(6, 6, 4, stride=2)
        self.gru = nn.GRU(6, 5, batch_first=True)

    def forward(self, x):  # (B, T, 4) -> (B, ceil(T / 2), 5)
        z = torch.relu(self.c1(x.transpose(1, 2)))
        z = torch.relu(self.c2(F.pad(z, (3, 0))))
        return self.gru(z.transpose(1, 2))[0]


class ValidUNet(nn.Module):
    """denoiser's Demucs in small: pad to a valid length (Python arithmetic on the length),
    valid Conv1d k=4 stride 2 twice, a time-major LSTM, ConvTranspose1d k=4 stride 2 twice
    with skips cropped to the decoder's length, crop to the input: (B, 3, T) -> (B, 3, T)."""

    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv1d(3, 6, 4, 2)
        self.e2 = nn.Conv1d(6, 8, 4, 2)
        self.lstm = nn.LSTM(8, 8)
        self.d2 = nn.ConvTranspose1d(8, 6, 4, 2)
        self.d1 = nn.ConvTranspose1d(6, 3, 4, 2)

    @staticmethod
    def valid_length(n: int) -> int:
        for _ in range(2):
            n = max(math.ceil((n - 4) / 2) + 1, 1)
        for _ in range(2):
            n = (n - 1) * 2 + 4
        return n

    def forward(self, x):
        length = x.shape[-1]
        z = F.pad(x, (0, self.valid_length(length) - length))
        s1 = torch.relu(self.e1(z))
        s2 = torch.relu(self.e2(s1))
        h = self.lstm(s2.permute(2, 0, 1))[0].permute(1, 2, 0)
        y = torch.relu(self.d2(h + s2[..., : h.shape[-1]]))
        y = self.d1(y + s1[..., : y.shape[-1]])
        return y[..., :length]


class Transposed2dNorms(nn.Module):
    """Conv2d over (freq, time) at stride 2 in time looking 2 frames ahead, centred in
    frequency; GroupNorm and LayerNorm per frame (over channels and frequency, never time);
    GLU over channels; LSTM; ConvTranspose2d upsampling time by 2: (B, T, 8) -> (B, T, 8)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, (3, 4), stride=(1, 2), padding=(1, 0))
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm([4, 8])
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.up = nn.ConvTranspose2d(4, 1, (1, 4), stride=(1, 2))

    def forward(self, x):
        b, t, f = x.shape
        # 1 frame before, 2 after: ceil(T / 2) frames, each looking 2 frames ahead.
        z = F.glu(self.c1(F.pad(x.transpose(1, 2).unsqueeze(1), (1, 2))), dim=1)
        n = z.shape[-1]
        z = z.permute(0, 3, 1, 2).reshape(b * n, 4, f)  # per frame: (B * T/2, 4, F)
        z = self.ln(self.gn(z)).reshape(b, n, 4 * f)
        h = self.lstm(z)[0].reshape(b, n, 4, f).permute(0, 2, 3, 1)  # (B, 4, F, T/2)
        y = self.up(h)[..., :t]  # (B, 1, F, T)
        return y.squeeze(1).transpose(1, 2)


# model, example shape, input axes, (chunk_multiple, latency, chunk_offset), delay lines,
# min_length, end_offset
MODELS = {
    "centred-strided": (CentredStrided, (1, 10, 4), None, (2, 2, 0), 0, None, None),
    "valid-conv-gru": (ValidConvGRU, (1, 10, 4), None, (1, 4, 0), 0, 5, -4),
    "late-then-strided": (LateThenStrided, (1, 10, 4), None, (2, 1, 1), 0, None, None),
    "valid-unet": (ValidUNet, (1, 3, 64), ("batch", 3, "time"), (4, 6, 2), 1, None, None),
    "transposed2d-norms": (Transposed2dNorms, (1, 10, 8), None, (2, 2, 0), 0, 2, None),
    "same-then-wide": (SameThenWide, (1, 32, 2), None, (16, 18, 2), 0, 32, [-9, 16]),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    done = {}

    def get(name):
        if name not in done:
            cls, shape, axes, _, _, min_length, _ = MODELS[name]
            torch.manual_seed(0)
            model = cls().eval()
            path = tmp_path_factory.mktemp(name) / "model.onnx"
            extra = {"input_axes": axes} if axes else {}
            extra.update({"min_length": min_length} if min_length else {})
            report = rnnedge.export(model, path, example_input=torch.randn(*shape), **extra)
            done[name] = (model, path, report)
        return done[name]

    return get


def _signal(name: str, total: int, seed: int) -> np.ndarray:
    shape = (2, 3, total) if name == "valid-unet" else (2, total, MODELS[name][1][2])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_export_states_the_grid_and_passes_the_gate(exported, name):
    _, path, report = exported(name)
    meta = ortref.contract(path)
    multiple, latency, offset = MODELS[name][3]
    assert (meta.get("chunk_multiple", 1), meta["latency"], meta.get("chunk_offset", 0)) == \
        (multiple, latency, offset)
    # The output's end where it is not ceil(T * time_ratio): T - 4 frames for a valid conv.
    assert meta["format"] == 2 and meta["outputs"][0].get("end_offset") == MODELS[name][6]
    states = [s["input"] for s in meta["states"]]
    assert states[-1] == "latency.flush0"
    assert sum(s.startswith("delay") and s.endswith(".cache0") for s in states) == MODELS[name][4]
    streamed = [c for c in report.cases if c.case.kind == "stream"]
    assert any(c.case.length >= 1000 for c in streamed)
    assert report.max_abs < 1e-4


# 1 step, uneven, a prime, longer than the receptive field, and more than the whole input.
CHUNKINGS = {"one": (1,), "uneven": (5, 1, 12, 3, 7), "prime": (7,), "long": (97,),
             "whole": (5000,)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("total", [5, 64, 301, 2001])
def test_stream_plus_flush_equals_eager_on_the_whole_input(exported, name, chunking, total):
    model, path, _ = exported(name)
    total = max(total, MODELS[name][5] or 0)
    x = _signal(name, total, total)
    axis = 2 if name == "valid-unet" else 1
    stream = rnnedge.load(path, device="cpu").stream(batch=2)
    pieces, start, k, pattern = [], 0, 0, CHUNKINGS[chunking]
    while start < total:
        size = pattern[k % len(pattern)]
        piece = np.take(x, range(start, min(start + size, total)), axis=axis)
        pieces.append(stream.step(piece))
        start, k = start + size, k + 1
    pieces.append(stream.flush())
    got = np.concatenate(pieces, axis=axis)
    want = zoo.eager(model, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["same-then-wide", "late-then-strided"])
def test_every_length_of_a_period_ends_as_eager(exported, name):
    """Every remainder modulo the chunk multiple: the stream's last frames and their count
    are the model's (an end fitted on a few lengths only was one frame short at 1 in 16)."""
    model, path, _ = exported(name)
    multiple = MODELS[name][3][0]
    low = MODELS[name][5] or 2
    for total in range(low, low + 3 * multiple):
        x = _signal(name, total, total)
        stream = rnnedge.load(path, device="cpu").stream(batch=2)
        got = np.concatenate([stream.step(x), stream.flush()], axis=1)
        want = zoo.eager(model, x)
        assert got.shape == want.shape, total
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3, err_msg=str(total))


@pytest.mark.slow
def test_inspect_shows_the_first_chunk(exported, cli):
    result = cli("inspect", str(exported("valid-unet")[1]))
    assert result.exit_code == 0, result.output
    assert "first ≡ 2 (mod 4)" in result.output and "latency 6" in result.output
    result = cli("inspect", str(exported("same-then-wide")[1]))
    assert "floor(N*1/16 + -9/16) steps" in result.output


# resample: (chunk_multiple, latency, chunk_offset, model_end). resample=2 also streams its
# functional sinc resamplers (F.conv1d, 56 and 55 samples ahead), a [..., 1:] crop, a
# stack + view interleave and even/odd slices; it pads to valid lengths = 10 (mod 32), off
# its stream's grid (2 mod 32): the contract's model_end.
DEMUCS = {1: (64, 84, 20, None), 2: (32, 154, 2, [10, 74])}


@pytest.mark.slow
@pytest.mark.parametrize("resample", list(DEMUCS))
def test_denoiser_demucs_streams(tmp_path, cli, resample):
    """The `denoiser` package's causal Demucs (random weights, normalize=False); skipped
    where it is not installed (`pip install --no-deps denoiser`: its wheel pins torch 1.5).
    Its stream, flushed, equals the model on the whole signal frame for frame, at lengths
    on and off its stride grid, where its own DemucsStreamer differs at the end."""
    demucs = pytest.importorskip("denoiser.demucs")
    torch.manual_seed(0)
    model = demucs.Demucs(hidden=4, depth=3, normalize=False, resample=resample, causal=True).eval()
    path = tmp_path / "demucs.onnx"
    rnnedge.export(model, path, example_input=torch.randn(1, 1, 512), input_axes=("batch", 1, "time"))
    meta = ortref.contract(path)
    assert (meta["chunk_multiple"], meta["latency"], meta["chunk_offset"],
            meta.get("model_end")) == DEMUCS[resample]
    shown = cli("inspect", str(path)).output
    assert ("its own length ≡ 10 (mod 32), at least 74" in shown) == (resample == 2)
    for total, chunk in ((4096, 256), (4099, 100), (1000, 64), (195, 13), (70, 7), (3, 1)):
        x = np.random.default_rng(total).standard_normal((1, 1, total)).astype(np.float32)
        stream = rnnedge.load(path, device="cpu").stream(batch=1)
        got = np.concatenate([stream.run(x, chunk=chunk), stream.flush()], axis=-1)
        want = zoo.eager(model, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_cli_exports_demucs_from_its_weights(tmp_path, cli):
    """`rnnedge export` builds its example at 5 steps: the probes reach past the least valid
    length all the same (at 5 steps every probe pads to it and the rates came out wrong)."""
    demucs = pytest.importorskip("denoiser.demucs")
    torch.manual_seed(0)
    model = demucs.Demucs(hidden=4, depth=3, normalize=False, resample=1, causal=True).eval()
    torch.save(model.state_dict(), tmp_path / "demucs.pt")
    out = tmp_path / "demucs.onnx"
    result = cli("export", str(tmp_path / "demucs.pt"), "--arch", "denoiser.demucs:Demucs",
                 "--arch-kwargs", '{"hidden": 4, "depth": 3, "normalize": false, "resample": 1}',
                 "--input-shape", "batch,1,time", "-o", str(out))
    assert result.exit_code == 0, result.output
    x = np.random.default_rng(2).standard_normal((1, 1, 3001)).astype(np.float32)
    stream = rnnedge.load(out, device="cpu").stream(batch=1)
    got = np.concatenate([stream.run(x, chunk=160), stream.flush()], axis=-1)
    np.testing.assert_allclose(got, zoo.eager(model, x), atol=1e-5, rtol=1e-4)
