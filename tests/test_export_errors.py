"""Exporter errors that name the culprit (issue 10): bounded time axes, axes that cannot be
made dynamic, failing probes, non-deterministic step modules, translation vs tracing
failures; and the state bound by name, never by position."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rnnedge


class CeilPad(nn.Module):
    """Pads time to a multiple of 4 computed in Python floats: torch.export bounds T."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8, batch_first=True)
        self.linear = nn.Linear(8, 2)

    def forward(self, x):
        t = x.shape[1]
        padded = int(math.ceil(t / 4)) * 4
        y, _ = self.lstm(F.pad(x, (0, 0, 0, padded - t)))
        return self.linear(y)[:, :t]


class FloorPad(CeilPad):
    """The same padding in integer arithmetic: exportable at every length."""

    def forward(self, x):
        t = x.shape[1]
        y, _ = self.lstm(F.pad(x, (0, 0, 0, (t + 3) // 4 * 4 - t)))
        return self.linear(y)[:, :t]


class ValidLength(nn.Module):
    """denoiser.demucs-like: pad to a valid length through strided convs, LSTM, crop."""

    def __init__(self, depth=2, kernel=4, stride=2):
        super().__init__()
        self.depth, self.kernel, self.stride = depth, kernel, stride
        self.encoder = nn.Sequential(nn.Conv1d(1, 4, kernel, stride), nn.ReLU(),
                                     nn.Conv1d(4, 8, kernel, stride), nn.ReLU())
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.decoder = nn.Sequential(nn.ConvTranspose1d(8, 4, kernel, stride), nn.ReLU(),
                                     nn.ConvTranspose1d(4, 1, kernel, stride))

    def valid_length(self, length):
        for _ in range(self.depth):
            length = max(math.ceil((length - self.kernel) / self.stride) + 1, 1)
        for _ in range(self.depth):
            length = (length - 1) * self.stride + self.kernel
        return int(length)

    def forward(self, x):
        t = x.shape[-1]
        z = self.encoder(F.pad(x, (0, self.valid_length(t) - t))).permute(0, 2, 1)
        z, _ = self.lstm(z)
        return self.decoder(z.permute(0, 2, 1))[..., :t]


class ConvGRU(nn.Module):
    """Conv1d(k=5) front-end over (B, C, T), then a GRU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 5)
        self.gru = nn.GRU(6, 8, batch_first=True)

    def forward(self, x):
        y, _ = self.gru(self.conv(x).transpose(1, 2))
        return y


class DropoutStep(nn.Module):
    """A step-protocol module with always-on dropout."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(4, 8)

    def forward(self, x, state=None):
        h = self.cell(F.dropout(x, 0.5, training=True), state)
        return h, h


class DropoutLifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)

    def forward(self, x):
        y, _ = self.lstm(F.dropout(x, 0.5, training=True))
        return y


class FixedBatch(nn.Module):
    """Fails at any batch but the example's: the error names the shape that failed."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)

    def forward(self, x):
        y, _ = self.lstm(x)
        return y.reshape(1, x.shape[1], 8)


class CumMax(nn.Module):
    """Traces (torch.export), but torch.onnx has no translation for aten.cummax."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)

    def forward(self, x):
        y, _ = self.lstm(x)
        return torch.cummax(y, dim=1).values


class Predictor(nn.Module):
    """torchaudio RNN-T predictor's signature: forward(input, lengths, state)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)

    def forward(self, input, lengths, state=None):  # noqa: A002 - torchaudio's name
        y, (h, c) = self.lstm(input, state)
        return y, lengths, (h, c)


CASES = {
    "ceil-padded-length": (CeilPad, torch.randn(1, 10, 3), dict(mode="sequence"),
                           rnnedge.ExportError,
                           ["bounded the time axis", "input", "at most 12 steps",
                            "math.ceil", "nothing was written"]),
    "valid-length": (ValidLength, torch.randn(1, 1, 40),
                     dict(mode="sequence", input_axes=[("batch", 1, "time")]),
                     rnnedge.ExportError, ["bounded the time axis (axis 2)", "at most 42 steps",
                                           "torch says"]),
    # An example as long as the gate's longest length: the bound lies above it, but the
    # graph is still right near the example's length only (the padded length is traced).
    "valid-length-long-example": (ValidLength, torch.randn(1, 1, 2000),
                                  dict(mode="sequence", input_axes=[("batch", 1, "time")]),
                                  rnnedge.ExportError, ["bounded the time axis (axis 2)",
                                                        "torch says", "nothing was written"]),
    # A valid conv streams late (4 frames ahead), but the model needs 5 steps to run.
    "conv-front-end-time-declared": (ConvGRU, torch.randn(1, 4, 12),
                                     dict(input_axes=[("batch", 4, "time")]),
                                     rnnedge.UsageError, ["fails at batch 2, time 3",
                                                          "min_length (--min-length)"]),
    "conv-front-end-guessed": (ConvGRU, torch.randn(1, 4, 12), {}, rnnedge.RnnedgeError,
                               ["assumed axes: batch=0, time=1", "(--input-shape, e.g. "
                                "batch,4,time for the example of shape (1, 4, 12))"]),
    "resized-probe-names-shape": (FixedBatch, torch.randn(1, 5, 4), {}, rnnedge.UsageError,
                                  ["fails", "(2, ", "assumed axes: batch=0, time=1",
                                   "e.g. batch,5,time for the example of shape (1, 5, 4)"]),
    "dropout-step-module": (DropoutStep, torch.randn(2, 4), {}, rnnedge.UnsupportedModelError,
                            ["not deterministic", "F.dropout"]),
    "dropout-lifted": (DropoutLifted, torch.randn(2, 5, 4), {}, rnnedge.UnsupportedModelError,
                       ["not deterministic", "F.dropout"]),
    "translation-failure": (CumMax, torch.randn(2, 5, 4), {}, rnnedge.ExportError,
                            ["torch.export traced CumMax", "ONNX translation failed at "
                             "aten.cummax.default"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("key", list(CASES))
def test_errors_name_the_culprit(tmp_path, key):
    make, example, options, error, fragments = CASES[key]
    torch.manual_seed(0)
    out = tmp_path / "m.onnx"
    with pytest.raises(error) as caught:
        rnnedge.export(make().eval(), out, example_input=example, **options)
    text = str(caught.value)
    assert "\n" not in text and "report it" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    if key == "dropout-step-module":
        assert "write a step-protocol module" not in text and "init_hidden" not in text
    assert not out.exists()


@pytest.mark.slow
def test_padded_length_in_integer_arithmetic_is_right_at_16000_steps(tmp_path):
    torch.manual_seed(0)
    model = FloorPad().eval()
    out = tmp_path / "pad.onnx"
    rnnedge.export(model, out, example_input=torch.randn(1, 10, 3), mode="sequence")
    graph = rnnedge.load(out, device="cpu")
    x = np.random.default_rng(0).standard_normal((1, 16000, 3)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = graph.stream(batch=1).step(x)  # sequence mode: the whole sequence, one call
    assert got.shape == want.shape == (1, 16000, 2)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_predictor_state_is_bound_by_name_not_position(tmp_path):
    torch.manual_seed(0)
    model = Predictor().eval()
    out = tmp_path / "pred.onnx"
    example = (torch.randn(2, 5, 4), torch.tensor([5, 3]))
    report = rnnedge.export(model, out, example_input=example,
                            input_axes=[("batch", "time", 4), ("batch",)])
    states = report.metadata["states"]
    assert [s["shape"] for s in states] == [[1, "batch", 8], [1, "batch", 8]]
    assert out.exists()


@pytest.mark.slow
def test_state_arg_names_the_state_parameter(tmp_path):
    class Renamed(Predictor):
        def forward(self, input, lengths, memory=None):  # noqa: A002
            return super().forward(input, lengths, memory)

    torch.manual_seed(0)
    report = rnnedge.export(Renamed().eval(), tmp_path / "r.onnx",
                            example_input=(torch.randn(2, 5, 4), torch.tensor([5, 3])),
                            input_axes=[("batch", "time", 4), ("batch",)], state_arg="memory")
    assert len(report.metadata["states"]) == 2
