"""rnnedge.loaders.load_model on every PyTorch recurrent layer type saved in the forms that
cannot be re-traced (TorchScript, torch.export .pt2): each comes back as the eager module
with the same hyper-parameters, computing exactly what the original does."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from rnnedge.loaders import load_model
from rnnedge.recurrent import hyper_parameters, type_of

# (module factory, example input): one per table row, with the options that matter.
LAYERS = {
    "lstm-proj-bidir": (lambda: nn.LSTM(4, 6, num_layers=2, proj_size=3, bidirectional=True),
                        (5, 2, 4)),
    "gru-batch-first": (lambda: nn.GRU(4, 6, batch_first=True), (2, 5, 4)),
    "rnn-tanh": (lambda: nn.RNN(4, 6), (5, 2, 4)),
    "rnn-relu-nobias": (lambda: nn.RNN(4, 6, nonlinearity="relu", bias=False), (5, 2, 4)),
    "lstm-cell": (lambda: nn.LSTMCell(4, 6), (2, 4)),
    "gru-cell": (lambda: nn.GRUCell(4, 6), (2, 4)),
    "rnn-cell-relu": (lambda: nn.RNNCell(4, 6, nonlinearity="relu"), (2, 4)),
}


def _layer(name):
    factory, shape = LAYERS[name]
    torch.manual_seed(0)
    return factory().eval(), torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _save(tmp_path, module, x, form):
    path = tmp_path / ("m.pt" if form == "torchscript" else "m.pt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if form == "torchscript":
            torch.jit.save(torch.jit.script(module), path)
        else:
            torch.export.save(torch.export.export(module, (x,)), path)
    return path


@pytest.mark.parametrize("form", ["torchscript", "pt2"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_saved_layer_loads_as_the_same_eager_layer(tmp_path, name, form):
    module, x = _layer(name)
    loaded = load_model(_save(tmp_path, module, x, form))
    layer = type_of(module)
    if form == "torchscript" or not layer.cell:
        # A bare stack's program (and any TorchScript archive) gives the layer itself.
        assert type(loaded) is type(module)
        assert hyper_parameters(layer, loaded) == hyper_parameters(layer, module)
    assert not loaded.training
    with torch.no_grad():
        got, want = pytree.tree_leaves(loaded(x)), pytree.tree_leaves(module(x))
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))

