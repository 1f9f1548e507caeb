"""Tiny models with several inputs, loaded by tests/test_cli_inputs.py with --arch FILE:Class.

Shapes: AttentionStep x (B, 8), memory (B, 50, 16), state (B, 12) -> y (B, 4), state;
Predictor tokens (B, T) int64, lengths (B,) int64, state ((1, B, 8), (1, B, 8)) or None ->
y (B, T, 5), state; Tagger x (B, T, 5) -> (B, T, 3) through ``rnn_class`` (a class).
"""

import torch
from torch import nn


class AttentionStep(nn.Module):
    """One decoder step: dot-product attention over a memory constant per stream + GRUCell."""

    def __init__(self, features=8, memory=16, hidden=12, out=4):
        super().__init__()
        self.hidden = hidden
        self.query = nn.Linear(hidden, memory)
        self.cell = nn.GRUCell(features + memory, hidden)
        self.out = nn.Linear(hidden, out)

    def init_hidden(self, batch_size):
        return torch.zeros(batch_size, self.hidden)

    def forward(self, x, memory, state):
        q = self.query(state)  # (B, M)
        weights = torch.softmax((memory @ q.unsqueeze(-1)).squeeze(-1), dim=-1)  # (B, 50)
        context = (weights.unsqueeze(-1) * memory).sum(1)  # (B, M)
        state = self.cell(torch.cat([x, context], dim=-1), state)
        return self.out(state), state


class Predictor(nn.Module):
    """An RNN-T-like predictor: the state is the third parameter, after tokens and lengths."""

    def __init__(self, vocab=11, embed=6, hidden=8, out=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, tokens, lengths, state=None):
        y, state = self.lstm(self.embed(tokens), state)
        keep = (lengths > 0).to(y.dtype)[:, None, None]  # rows of length 0 give zeros
        return self.head(y) * keep, state


class Tagger(nn.Module):
    """A tagger whose recurrent layer's class is a constructor argument (e.g. nn.GRU)."""

    def __init__(self, rnn_class, features=5, hidden=7, tags=3):
        super().__init__()
        self.rnn = rnn_class(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, tags)

    def forward(self, x):
        return self.head(self.rnn(x)[0])
