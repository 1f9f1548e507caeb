"""Small models for the exporter tests: the forms rnnedge exports, and ones it must refuse."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's output on the whole input ``x``: numpy in, numpy out, no autograd."""
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()

# --- step-protocol modules: forward(x, state) -> (y, state) -------------------------


class ElmanRNN(nn.Module):
    """The PyTorch char-RNN tutorial's model: plain Linear recurrence, LogSoftmax head."""

    def __init__(self, input_size=10, hidden_size=12, output_size=5):
        super().__init__()
        self.hidden_size = hidden_size
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.h2o = nn.Linear(hidden_size, output_size)
        self.softmax = nn.LogSoftmax(dim=1)

    def forward(self, input, hidden):
        combined = torch.cat((input, hidden), 1)
        hidden = torch.tanh(self.i2h(combined))
        output = self.softmax(self.h2o(hidden))
        return output, hidden

    def init_hidden(self):
        return torch.zeros(1, self.hidden_size)


class AudioCellStep(nn.Module):
    """A raw audio chunk (B, samples) -> conv features -> LSTMCell, state stacked (2, B, H)."""

    def __init__(self, samples=64, hidden=10, classes=4):
        super().__init__()
        self.hidden = hidden
        self.front = nn.Sequential(
            nn.Conv1d(1, 6, kernel_size=8, stride=4), nn.ReLU(),
            nn.Conv1d(6, 8, kernel_size=4, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
        )
        self.cell = nn.LSTMCell(8, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, chunk, state):
        feat = self.front(chunk.unsqueeze(1)).flatten(1)
        h, c = self.cell(feat, (state[0], state[1]))
        return self.head(h), torch.stack([h, c])

    def init_hidden(self, batch_size):
        return torch.zeros(2, batch_size, self.hidden)


class CellStack(nn.Module):
    """GRUCell -> LSTMCell -> Linear; nested state ((h1,), (h2, c2)) from forward(x, None)."""

    def __init__(self, features=6, hidden=9, out=3):
        super().__init__()
        self.hidden = hidden
        self.c1 = nn.GRUCell(features, hidden)
        self.c2 = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x, state=None):
        if state is None:
            z = x.new_zeros(x.shape[0], self.hidden)
            state = ((z,), (z, z))
        (h1,), (h2, c2) = state
        h1 = self.c1(x, h1)
        h2, c2 = self.c2(h1, (h2, c2))
        return self.head(h2), ((h1,), (h2, c2))


class WordLM(nn.Module):
    """PyTorch's word_language_model: time-major tokens (T, B) and an explicit LSTM state."""

    def __init__(self, vocab=30, emb=8, hidden=12, layers=2):
        super().__init__()
        self.layers, self.hidden = layers, hidden
        self.encoder = nn.Embedding(vocab, emb)
        self.rnn = nn.LSTM(emb, hidden, layers)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, input, hidden):
        output, hidden = self.rnn(self.encoder(input), hidden)
        return self.decoder(output), hidden

    def init_hidden(self, bsz):
        z = torch.zeros(self.layers, bsz, self.hidden)
        return (z, z.clone())


# --- models whose forward takes only the input ---------------------------------------


class Tagger(nn.Module):
    """Embedding -> 2-layer batch_first LSTM -> Linear, one tag per token."""

    def __init__(self, vocab=40, emb=8, hidden=12, tags=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, tags)

    def forward(self, tokens):
        y, _ = self.lstm(self.emb(tokens))
        return self.head(y)


class Forecaster(nn.Module):
    """Time-major GRU forecaster with two outputs (forecast, features) and a nested path."""

    def __init__(self, features=4, hidden=10):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(features, 8), nn.Tanh())
        self.core = nn.ModuleDict({"gru": nn.GRU(8, hidden)})
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        y, _ = self.core["gru"](self.encoder(x))
        return self.out(y), y


class TwoLayerKinds(nn.Module):
    """RNN(relu) then LSTM with projection, batch_first, two inputs (features + a gain)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(5, 7, nonlinearity="relu", batch_first=True)
        self.lstm = nn.LSTM(7, 9, proj_size=4, batch_first=True)

    def forward(self, x, gain):
        y, _ = self.rnn(x * gain)
        y, _ = self.lstm(y)
        return y


class LastStepClassifier(nn.Module):
    """The common tutorial classifier: zero (h0, c0) made in forward, reads y[:, -1, :]."""

    def __init__(self, features=6, hidden=10, classes=3):
        super().__init__()
        self.hidden = hidden
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        h0 = torch.zeros(1, x.size(0), self.hidden)
        c0 = torch.zeros(1, x.size(0), self.hidden)
        y, _ = self.lstm(x, (h0, c0))
        return self.fc(y[:, -1, :])


class MeanPool(nn.Module):
    """GRU then mean over time: needs the whole sequence."""

    def __init__(self, features=6, hidden=8):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x):
        y, _ = self.gru(x)
        return self.fc(y.mean(dim=1))


class BiEncoder(nn.Module):
    """A bidirectional LSTM inside a model."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.encoder = nn.ModuleList([nn.LSTM(6, 5, batch_first=True, bidirectional=True)])

    def forward(self, x):
        y, _ = self.encoder[0](self.proj(x))
        return y


class PythonLoop(nn.Module):
    """A cell driven by a Python loop over time inside forward (tracing unrolls it)."""

    def __init__(self, features=6, hidden=8):
        super().__init__()
        self.hidden = hidden
        self.cell = nn.GRUCell(features, hidden)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], self.hidden)
        ys = []
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
            ys.append(h)
        return torch.stack(ys, 1)


class NoState(nn.Module):
    """An MLP: nothing recurrent, no step protocol."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x):
        return self.net(x)


class CustomLSTM(nn.LSTM):
    """An nn.LSTM subclass with its own forward: not PyTorch's semantics any more."""

    def forward(self, input, hx=None):
        y, hx = super().forward(input, hx)
        return y * 2, hx


class HasCustomLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 6), CustomLSTM(6, 4, batch_first=True))

    def forward(self, x):
        y, _ = self.block(x)
        return y


class StepLSTM(nn.Module):
    """A step module that feeds its (batch, features) input to a batch_first nn.LSTM one step
    at a time: no time axis in the input although it holds a sequence layer."""

    def __init__(self, features=6, hidden=8):
        super().__init__()
        self.hidden = hidden
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, 2)

    def forward(self, x, state):
        y, state = self.lstm(x.unsqueeze(1), state)
        return self.fc(y[:, 0]), state

    def init_hidden(self, batch_size):
        return (torch.zeros(1, batch_size, self.hidden), torch.zeros(1, batch_size, self.hidden))


class ElmanChunkLoop(nn.Module):
    """A step module that loops over the time axis of its chunk in plain Python code."""

    def __init__(self, features=6, hidden=8):
        super().__init__()
        self.hidden = hidden
        self.i2h = nn.Linear(features + hidden, hidden)

    def forward(self, x, h):
        ys = []
        for t in range(x.shape[1]):
            h = torch.tanh(self.i2h(torch.cat([x[:, t], h], 1)))
            ys.append(h)
        return torch.stack(ys, 1), h

    def init_hidden(self, batch_size):
        return torch.zeros(batch_size, self.hidden)


class StatefulAttribute(nn.Module):
    """Old-tutorial style: the LSTM state kept in an attribute between calls."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.hidden = None

    def init_hidden(self, batch_size):
        return (torch.zeros(1, batch_size, 8), torch.zeros(1, batch_size, 8))

    def forward(self, x):
        y, self.hidden = self.lstm(x, self.hidden)
        return y


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 8, batch_first=True)

    def forward(self, x):
        y, _ = self.gru(x)
        if y.sum() > 0:
            return y * 2
        return y
