"""Whole-model torch.export programs (.pt2) through `rnnedge export`, read back by plain
onnxruntime (tests/ortref.py) and compared with the original eager model from zero state."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rnnedge.errors import ModelLoadError
from rnnedge.loaders import ProgramStep, load_model
from tests import ortref

T, B, CHUNKS = 11, 3, (4, 1, 6)
ATOL, RTOL = 1e-5, 1e-4


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        y, _ = self.lstm(self.emb(x))
        return self.head(y)


class Forecaster(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 16, num_layers=2)
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.gru(x)[0])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Module()
        self.enc.lstm = nn.LSTM(6, 10, num_layers=2, proj_size=4, bidirectional=True,
                                batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        y, (h, _) = self.enc.lstm(x)
        return self.head(y), h


class CellStep(nn.Module):
    """Step protocol around an LSTMCell: forward(x, (h, c)) -> (y, (h, c))."""

    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x, state):
        h, c = self.cell(x, state)
        return self.out(h), (h, c)


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)


def save_program(tmp_path, model, *args, name="prog"):
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model.eval(), args), path)
    return path


def export(cli, path, shape, *extra):
    out = path.with_suffix(".onnx")
    result = cli("export", str(path), "-o", str(out), "--input-shape",
                 shape, *extra)
    assert result.exit_code == 0, result.output
    return out, ortref.contract(out), ortref.session(out)


def close(got, want):
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else want
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_tagger_streams_like_eager(cli, tmp_path):
    torch.manual_seed(1)
    model = Tagger()
    path = save_program(tmp_path, model, torch.randint(0, 40, (2, 5)))
    loaded = load_model(path)
    assert isinstance(loaded.lstm, nn.LSTM) and isinstance(loaded.emb, nn.Embedding)
    _, meta, sess = export(cli, path, "batch,time", "--input-dtype", "int64")
    assert [s["input"] for s in meta["states"]] == ["lstm.h0", "lstm.c0"]
    x = torch.randint(0, 40, (B, T))
    got, _ = ortref.stream(sess, meta, {"input": x.numpy()}, ortref.zero_states(meta, B), CHUNKS)
    with torch.no_grad():
        close(got["output"], model(x))


@pytest.mark.slow
def test_time_major_gru_forecaster_streams_like_eager(cli, tmp_path):
    torch.manual_seed(2)
    model = Forecaster()
    path = save_program(tmp_path, model, torch.randn(5, 2, 3))
    _, meta, sess = export(cli, path, "time,batch,3")
    assert meta["time_axis"] == 0 and meta["states"][0]["shape"][0] == 2
    x = torch.randn(T, B, 3)
    got, states = ortref.stream(sess, meta, {"input": x.numpy()}, ortref.zero_states(meta, B), CHUNKS)
    with torch.no_grad():
        close(got["output"], model(x))
        close(states["gru.h0"], model.gru(x)[1])


@pytest.mark.slow
def test_bidirectional_proj_lstm_in_sequence_mode(cli, tmp_path):
    torch.manual_seed(3)
    model = Encoder()
    path = save_program(tmp_path, model, torch.randn(2, 5, 6))
    _, meta, sess = export(cli, path, "batch,time,6", "--mode", "sequence")
    states = {s["input"]: s["shape"] for s in meta["states"]}
    assert states == {"enc.lstm.h0": [4, "batch", 4], "enc.lstm.c0": [4, "batch", 10]}
    x = torch.randn(B, T, 6)
    outs, _ = ortref.call(sess, meta, {"input": x.numpy()}, ortref.zero_states(meta, B))
    with torch.no_grad():
        y, h = model(x)
    close(outs["output.0"], y)
    close(outs["output.1"], h)


def test_bidirectional_program_refuses_stream_mode(cli, tmp_path):
    path = save_program(tmp_path, Encoder(), torch.randn(2, 5, 6))
    result = cli("export", str(path), "-o", str(tmp_path / "o.onnx"),
                 "--input-shape", "batch,time,6")
    assert result.exit_code == 1 and "bidirectional" in result.stderr and "--mode sequence" in result.stderr


@pytest.mark.slow
def test_step_protocol_cell_program_steps_like_eager(cli, tmp_path):
    torch.manual_seed(4)
    model = CellStep()
    path = save_program(tmp_path, model, torch.randn(2, 5), (torch.zeros(2, 7), torch.zeros(2, 7)))
    loaded = load_model(path)
    assert isinstance(loaded, ProgramStep)
    assert [tuple(t.shape) for t in loaded.init_hidden(4)] == [(4, 7), (4, 7)]
    _, meta, sess = export(cli, path, "batch,5")
    assert meta["time_axis"] is None and [s["batch_axis"] for s in meta["states"]] == [0, 0]
    xs = torch.randn(T, B, 5)
    states = ortref.zero_states(meta, B)
    state = (torch.zeros(B, 7), torch.zeros(B, 7))
    for x in xs:  # one step per call, the state carried
        outs, states = ortref.call(sess, meta, {"input": x.numpy()}, states)
        with torch.no_grad():
            y, state = model(x, state)
        close(outs["output"], y)
    close(states["state.0"], state[0])
    close(states["state.1"], state[1])


def test_program_without_recurrent_layer_is_refused(cli, tmp_path):
    path = save_program(tmp_path, Dense(), torch.randn(2, 5, 4))
    with pytest.raises(ModelLoadError, match="no nn.RNN/LSTM/GRU.*--arch"):
        load_model(path)
    result = cli("export", str(path), "-o", str(tmp_path / "o.onnx"),
                 "--input-shape", "batch,time,4")
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ")


def test_bare_layer_program_stays_a_bare_layer(tmp_path):
    layer = nn.GRU(4, 6, batch_first=True)
    loaded = load_model(save_program(tmp_path, layer, torch.randn(2, 5, 4)))
    assert type(loaded) is nn.GRU and loaded.batch_first and loaded.hidden_size == 6
    x = torch.randn(B, T, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], layer(x)[0])


class DropoutStack(nn.Module):
    """Linear -> 2-layer LSTM with dropout (inactive in eval) -> Linear."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.lstm = nn.LSTM(4, 8, num_layers=2, dropout=0.3, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.lstm(self.inp(x))[0])


@pytest.mark.slow
def test_program_with_dropout_between_layers(cli, tmp_path):
    torch.manual_seed(4)
    model = DropoutStack()
    path = save_program(tmp_path, model, torch.randn(2, 5, 4))
    assert not load_model(path).lstm.training  # rebuilt for inference, dropout off
    _, meta, sess = export(cli, path, "batch,time,4")
    x = torch.randn(B, T, 4)
    got, _ = ortref.stream(sess, meta, {"input": x.numpy()}, ortref.zero_states(meta, B), CHUNKS)
    with torch.no_grad():
        close(got["output"], model.eval()(x))


@pytest.mark.parametrize("cell,state", [
    (nn.RNNCell(4, 6), lambda: torch.randn(3, 6)),
    (nn.GRUCell(4, 6), lambda: torch.randn(3, 6)),
    (nn.LSTMCell(4, 6), lambda: (torch.randn(3, 6), torch.randn(3, 6))),
])
def test_bare_cell_program_called_with_its_state(cli, tmp_path, cell, state):
    torch.manual_seed(5)
    path = save_program(tmp_path, cell, torch.randn(3, 4), state())
    loaded = load_model(path)
    assert type(loaded) is type(cell)
    _, meta, sess = export(cli, path, "batch,4")
    assert meta["time_axis"] is None and meta["states"][0]["input"] == "h0"
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    states = ortref.zero_states(meta, 2)
    got, _ = ortref.call(sess, meta, {"input": x}, states)
    with torch.no_grad():
        want = cell.eval()(torch.from_numpy(x))
    close(got["output"], want[0] if isinstance(want, tuple) else want)


class TimeMajorStep(nn.Module):
    """forward(x, h) -> (y, h) around a 2-layer time-major GRU: h is (layers, batch, hidden)."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 6, num_layers=2)
        self.lin = nn.Linear(6, 2)

    def forward(self, x, h):
        y, h = self.gru(x, h)
        return self.lin(y), h


def test_step_program_state_batch_axis_follows_the_layer_layout(tmp_path):
    # Exported with T == num_layers == 2: the time length alone would fit the state's axis 0.
    torch.manual_seed(6)
    path = save_program(tmp_path, TimeMajorStep(), torch.randn(2, 3, 4), torch.zeros(2, 3, 6))
    loaded = load_model(path)
    assert isinstance(loaded, ProgramStep)
    assert tuple(loaded.init_hidden(7).shape) == (2, 7, 6)
