"""Streams over graphs from ``rnnedge.export`` equal eager PyTorch stepped the same way."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import rnnedge
from rnnedge.exporters import export

nn = torch.nn
TOL = {"rtol": 1e-4, "atol": 1e-5}
CHUNKS = (3, 1, 5, 2)


def exported(tmp_path, module, example, **kwargs):
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    export(module, path, example_input=example, **kwargs)
    return rnnedge.load(path, device="cpu")


def chunks(total, sizes=CHUNKS):
    start = 0
    for size in itertools.cycle(sizes):
        if start >= total:
            return
        yield slice(start, min(start + size, total))
        start += size


STACKS = {
    "lstm": lambda: nn.LSTM(3, 5),
    "lstm-2-bf": lambda: nn.LSTM(3, 5, num_layers=2, batch_first=True),
    "lstm-proj": lambda: nn.LSTM(3, 6, proj_size=2, batch_first=True),
    "gru": lambda: nn.GRU(3, 5, batch_first=True),
    "gru-2": lambda: nn.GRU(3, 4, num_layers=2),
    "rnn": lambda: nn.RNN(3, 5, batch_first=True),
    "rnn-relu-2": lambda: nn.RNN(3, 5, num_layers=2, nonlinearity="relu"),
}


@pytest.mark.parametrize("name", list(STACKS))
@pytest.mark.parametrize("batch", [1, 3])
def test_stack_stream_equals_eager(tmp_path, name, batch):
    torch.manual_seed(1)
    module = STACKS[name]().eval()
    bf = module.batch_first
    tax = 1 if bf else 0
    x = torch.randn((batch, 23, 3) if bf else (23, batch, 3))
    model = exported(tmp_path, module, x[:, :2] if bf else x[:2])
    stream = model.stream(batch)
    hx = None
    for part in chunks(x.shape[tax]):
        piece = x[:, part] if bf else x[part]
        with torch.no_grad():
            want, hx = module(piece, hx)
        got = stream.step(piece.numpy())
        np.testing.assert_allclose(got, want.numpy(), **TOL)
    state = stream.state
    hn = hx if isinstance(module, (nn.GRU, nn.RNN)) else hx[0]
    np.testing.assert_allclose(state["h0"], hn.numpy(), **TOL)
    if isinstance(module, nn.LSTM):
        np.testing.assert_allclose(state["c0"], hx[1].numpy(), **TOL)
    # run() over the whole input from a fresh stream equals eager over it at once.
    with torch.no_grad():
        want_all, _ = module(x)
    np.testing.assert_allclose(model.stream(batch).run(x.numpy(), chunk=4), want_all.numpy(), **TOL)


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell, nn.RNNCell])
def test_cell_stream_equals_eager(tmp_path, cls):
    torch.manual_seed(2)
    cell = cls(3, 4).eval()
    model = exported(tmp_path, cell, torch.zeros(2, 3))
    assert model.contract.time_axis is None
    stream = model.stream(2)
    hx = None
    for _ in range(15):
        x = torch.randn(2, 3)
        with torch.no_grad():
            hx = cell(x, hx)
        h = hx[0] if cls is nn.LSTMCell else hx
        np.testing.assert_allclose(stream.step(x.numpy()), h.numpy(), **TOL)
    if cls is nn.LSTMCell:
        np.testing.assert_allclose(stream.state["c0"], hx[1].numpy(), **TOL)


def test_pool_over_exported_gru_equals_eager(tmp_path):
    torch.manual_seed(3)
    module = nn.GRU(3, 5, batch_first=True).eval()
    model = exported(tmp_path, module, torch.zeros(1, 2, 3))
    pool = model.pool()
    ids = [pool.add() for _ in range(5)]
    hx = {sid: None for sid in ids}
    for tick in range(12):
        active = ids if tick % 3 else ids[::2]
        feed = {sid: torch.randn(1, 2, 3) for sid in active}
        got = pool.step({sid: x.numpy() for sid, x in feed.items()})
        for sid, x in feed.items():
            with torch.no_grad():
                want, hx[sid] = module(x, hx[sid])
            np.testing.assert_allclose(got[sid], want.numpy(), **TOL)


def test_sequence_mode_bidirectional_with_lengths(tmp_path):
    torch.manual_seed(4)
    module = nn.LSTM(3, 4, bidirectional=True, batch_first=True).eval()
    model = exported(tmp_path, module, torch.zeros(2, 5, 3), mode="sequence")
    assert model.contract.mode == "sequence" and model.input_names == ["input", "lengths"]
    x = torch.randn(3, 9, 3)
    lengths = torch.tensor([9, 4, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        y, (h, c) = module(packed)
    want, _ = nn.utils.rnn.pad_packed_sequence(y, batch_first=True, total_length=9)
    stream = model.stream(3)
    got = stream.step({"input": x.numpy(), "lengths": lengths.numpy().astype(np.int64)})
    np.testing.assert_allclose(got, want.numpy(), **TOL)
    np.testing.assert_allclose(stream.state["h0"], h.numpy(), **TOL)
    np.testing.assert_allclose(stream.state["c0"], c.numpy(), **TOL)
