"""The one table of PyTorch recurrent layer types (rnnedge.recurrent): it covers every
recurrent class torch.nn has and every ATen op torch.export makes of them, and a layer
rebuilt from its hyper-parameters and weights computes exactly what the original does."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from rnnedge.errors import ModelLoadError
from rnnedge.recurrent import (
    ATEN_OPS,
    BY_NAME,
    CELLS,
    PACKED_OPS,
    STACKS,
    TYPES,
    hyper_parameters,
    kind_of,
    rebuild,
    type_of,
)

aten = torch.ops.aten

# (module factory, input shape): every type, every option that changes the weights' layout.
CASES = {
    "lstm-proj-bidir-2layers": (lambda: nn.LSTM(5, 8, num_layers=2, proj_size=3,
                                                bidirectional=True, dropout=0.3), (4, 2, 5)),
    "lstm-batch-first-nobias": (lambda: nn.LSTM(5, 6, bias=False, batch_first=True), (2, 4, 5)),
    "gru-bidir": (lambda: nn.GRU(5, 6, bidirectional=True), (4, 2, 5)),
    "gru-2layers-batch-first": (lambda: nn.GRU(5, 6, num_layers=2, batch_first=True), (2, 4, 5)),
    "rnn-tanh": (lambda: nn.RNN(5, 6), (4, 2, 5)),
    "rnn-relu-bidir": (lambda: nn.RNN(5, 6, nonlinearity="relu", bidirectional=True), (4, 2, 5)),
    "lstm-cell": (lambda: nn.LSTMCell(5, 6), (2, 5)),
    "gru-cell-nobias": (lambda: nn.GRUCell(5, 6, bias=False), (2, 5)),
    "rnn-cell-tanh": (lambda: nn.RNNCell(5, 6), (2, 5)),
    "rnn-cell-relu": (lambda: nn.RNNCell(5, 6, nonlinearity="relu"), (2, 5)),
}


def _seeded(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    module = factory().eval()
    return module, torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _exported_ops(module, x) -> set:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (x,))
    return {n.target for n in program.module().graph.nodes
            if n.op == "call_function" and n.target in ATEN_OPS}


def _run(module, x) -> list[torch.Tensor]:
    """Every output tensor: (output, h[, c]) for a stack, (h[, c]) for a cell."""
    with torch.no_grad():
        return pytree.tree_leaves(module(x))


def test_the_table_covers_every_recurrent_class_of_torch_nn():
    recurrent = {c for c in vars(nn).values() if isinstance(c, type)
                 and issubclass(c, (nn.RNNBase, nn.RNNCellBase))} - {nn.RNNBase, nn.RNNCellBase}
    assert {t.cls for t in TYPES} == recurrent
    assert set(STACKS) | set(CELLS) == recurrent and not set(STACKS) & set(CELLS)
    assert set(BY_NAME) == {c.__name__ for c in recurrent}


def test_the_table_covers_every_overload_of_the_recurrent_aten_ops():
    for name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        packet = getattr(aten, name)
        assert packet.input in ATEN_OPS and packet.data in PACKED_OPS
        assert set(packet.overloads()) == {"input", "data"}
    for name in ("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell"):
        packet = getattr(aten, name)
        assert [getattr(packet, o) for o in packet.overloads()] == [packet.default]
        assert packet.default in ATEN_OPS
    assert len(ATEN_OPS) == 8 and len(PACKED_OPS) == 4


@pytest.mark.parametrize("name", list(CASES))
def test_torch_export_makes_the_op_the_table_names(name):
    module, x = _seeded(name)
    layer = type_of(module)
    ops = _exported_ops(module, x)
    assert len(ops) == 1
    (op,) = ops
    assert op in layer.aten and ATEN_OPS[op].layer is layer
    assert ATEN_OPS[op].nonlinearity == getattr(module, "nonlinearity", None)


@pytest.mark.parametrize("name", list(CASES))
def test_rebuild_from_hyper_parameters_and_weights_is_identical(name):
    module, x = _seeded(name)
    layer = type_of(module)
    hyper = hyper_parameters(layer, module)
    want = _run(module, x)
    rebuilt = [
        rebuild(layer, hyper, module.state_dict()),
        rebuild(layer.name, hyper, [p.detach() for p in module.parameters()]),
    ]
    (op,) = _exported_ops(module, x)
    # From an ATen op the op fixes the nonlinearity, whatever the hyper-parameters say.
    rebuilt.append(rebuild(op, {**hyper, "nonlinearity": "wrong"}, list(module.parameters())))
    for other in rebuilt:
        assert type(other) is type(module) and not other.training
        got = _run(other, x)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("name", ["lstm-proj-bidir-2layers", "rnn-relu-bidir", "rnn-cell-relu",
                                  "gru-cell-nobias"])
def test_hyper_parameters_read_from_torchscript_match_eager(name):
    module, _ = _seeded(name)
    layer = type_of(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
    assert hyper_parameters(layer, scripted) == hyper_parameters(layer, module)
    assert set(hyper_parameters(layer, module)) == set(layer.hyper)


@pytest.mark.parametrize("weights", [
    lambda m: [p.detach() for p in m.parameters()][:-1],  # one missing
    lambda m: [p.detach()[:, :1] if p.dim() == 2 else p.detach() for p in m.parameters()],
    lambda m: {k + "_x": v for k, v in m.state_dict().items()},
], ids=["too-few", "wrong-shape", "wrong-names"])
def test_rebuild_refuses_weights_that_do_not_fit(weights):
    module, _ = _seeded("lstm-proj-bidir-2layers")
    layer = type_of(module)
    with pytest.raises(ModelLoadError, match=r"^m\.pt2: the weights of LSTM do not fit .*; advice$"):
        rebuild(layer, hyper_parameters(layer, module), weights(module), where="m.pt2",
                advice="advice")


def test_kinds_and_types_of_modules_and_subclasses():
    class MyGRU(nn.GRU):
        pass

    assert [kind_of(t.cls(3, 4)) for t in TYPES] == [t.kind for t in TYPES]
    assert type_of(MyGRU(3, 4)) is BY_NAME["GRU"] and kind_of(MyGRU(3, 4)) == "GRU"
    assert type_of(nn.Linear(3, 4)) is None
    with pytest.raises(TypeError, match="not a recurrent layer: Linear"):
        kind_of(nn.Linear(3, 4))
    for t in TYPES:
        assert t.gates == {"LSTM": 4, "GRU": 3, "RNN": 1}[t.kind]
        assert t.states == (("h", "c") if t.kind == "LSTM" else ("h",))
        assert len(t.aten) == max(1, len(t.nonlinearities))
        assert bool(t.packed) == (not t.cell)
