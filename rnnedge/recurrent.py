"""PyTorch's recurrent layer types, listed once, and their weights in ONNX's layout.

``TYPES`` is the one table of the modules rnnedge translates: nn.RNN/LSTM/GRU (stacks,
input (time, batch, I) or (batch, time, I)) and nn.RNNCell/LSTMCell/GRUCell (cells, one
step, input (batch, I)). Each row says what the module is as data: its kind, gate count,
nonlinearities, the ATen ops ``torch.export`` turns it into, its state names and its
constructor's hyper-parameters. ``rebuild`` makes a module back from a row, hyper-parameters
and weights (TorchScript and ``.pt2`` programs cannot be re-traced, but a bare recurrent
layer is fully described by them).

ONNX orders gates differently: LSTM is i,o,f,c where PyTorch is i,f,g,o; GRU is z,r,h
where PyTorch is r,z,n. Every tensor of ``layer_weights`` is stacked over directions, as
the ONNX RNN/LSTM/GRU ops want: W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rnnedge.errors import ModelLoadError

aten = torch.ops.aten

_STACK_HYPER = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional")
_CELL_HYPER = ("input_size", "hidden_size", "bias")


@dataclass(frozen=True)
class LayerType:
    """One PyTorch recurrent module type.

    aten: the ATen ops ``torch.export`` turns it into, one per nonlinearity (in the order
    of ``nonlinearities``) or one when it has none. A stack's op takes (input, hx, params,
    has_biases, num_layers, dropout, train, bidirectional, batch_first) and returns
    (output, *states); a cell's takes (input, hx, w_ih, w_hh, b_ih, b_hh) and returns
    the states (a tuple for two, a tensor for one). hx is a list for two states.
    packed: the PackedSequence overloads of a stack's ops (none for cells).
    states: the state tensors, in order: ("h", "c") for LSTMs, ("h",) otherwise; each
    (layers*directions, batch, H) for a stack, (batch, H) for a cell (LSTM h: P with proj_size).
    """

    cls: type[nn.Module]
    kind: str  # "LSTM", "GRU" or "RNN": the ONNX op and the gate layout
    cell: bool  # a single-step cell, not a multi-step stack
    gates: int  # gate blocks per hidden unit: rows of weight_ih are gates*hidden_size
    nonlinearities: tuple[str, ...]  # those the module accepts; () where fixed
    aten: tuple
    packed: tuple
    states: tuple[str, ...]
    hyper: tuple[str, ...]  # the constructor's hyper-parameters

    @property
    def name(self) -> str:
        return self.cls.__name__


TYPES: tuple[LayerType, ...] = (
    LayerType(nn.LSTM, "LSTM", False, 4, (), (aten.lstm.input,), (aten.lstm.data,),
              ("h", "c"), _STACK_HYPER + ("proj_size",)),
    LayerType(nn.GRU, "GRU", False, 3, (), (aten.gru.input,), (aten.gru.data,),
              ("h",), _STACK_HYPER),
    LayerType(nn.RNN, "RNN", False, 1, ("tanh", "relu"),
              (aten.rnn_tanh.input, aten.rnn_relu.input),
              (aten.rnn_tanh.data, aten.rnn_relu.data), ("h",), _STACK_HYPER + ("nonlinearity",)),
    LayerType(nn.LSTMCell, "LSTM", True, 4, (), (aten.lstm_cell.default,), (),
              ("h", "c"), _CELL_HYPER),
    LayerType(nn.GRUCell, "GRU", True, 3, (), (aten.gru_cell.default,), (), ("h",), _CELL_HYPER),
    LayerType(nn.RNNCell, "RNN", True, 1, ("tanh", "relu"),
              (aten.rnn_tanh_cell.default, aten.rnn_relu_cell.default), (), ("h",),
              _CELL_HYPER + ("nonlinearity",)),
)

#: PyTorch's recurrent modules: multi-step layers and their single-step cells.
STACKS = tuple(t.cls for t in TYPES if not t.cell)
CELLS = tuple(t.cls for t in TYPES if t.cell)
BY_NAME: Mapping[str, LayerType] = {t.name: t for t in TYPES}


@dataclass(frozen=True)
class AtenOp:
    """What one ATen recurrent op stands for: a layer type with this nonlinearity."""

    layer: LayerType
    nonlinearity: str | None


#: ATen op -> the layer type (and nonlinearity) it computes.
ATEN_OPS: Mapping = {
    op: AtenOp(t, t.nonlinearities[i] if t.nonlinearities else None)
    for t in TYPES for i, op in enumerate(t.aten)
}
#: PackedSequence overloads, which rnnedge does not rebuild.
PACKED_OPS = frozenset(op for t in TYPES for op in t.packed)


def type_of(module) -> LayerType | None:
    """The row for ``module`` (an instance of one of the classes or a subclass), else None."""
    for t in TYPES:
        if isinstance(module, t.cls):
            return t
    return None


def has_own_forward(module) -> bool:
    """One of the table's modules running PyTorch's own forward: a subclass that overrides
    forward computes something else, which the translation would not follow."""
    t = type_of(module)
    return t is not None and type(module).forward is t.cls.forward


def kind_of(module: nn.Module) -> str:
    """'LSTM', 'GRU' or 'RNN' for a layer or its cell."""
    t = type_of(module)
    if t is None:
        raise TypeError(f"not a recurrent layer: {type(module).__name__}")
    return t.kind


def hyper_parameters(layer: LayerType, module) -> dict:
    """The constructor's hyper-parameters read from ``module`` (eager or TorchScript).

    A scripted nn.RNN keeps its nonlinearity in ``mode`` ('RNN_TANH'/'RNN_RELU').
    """
    config = {k: getattr(module, k) for k in layer.hyper if hasattr(module, k)}
    mode = getattr(module, "mode", None)
    if layer.nonlinearities and isinstance(mode, str) and mode.startswith("RNN_"):
        config["nonlinearity"] = mode[len("RNN_"):].lower()
    return config


def rebuild(what, hyper: Mapping, weights: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
            *, name: str | None = None, where: str = "",
            advice: str = "save the model again") -> nn.Module:
    """An eval-mode float32 module of type ``what`` with ``hyper`` and ``weights``.

    what: a LayerType, a class name ('LSTM', 'GRUCell', ...) or an ATen op of ``ATEN_OPS``
    (which also fixes the nonlinearity). hyper: constructor arguments; keys the type does
    not take are ignored. weights: a state_dict, or the tensors in the module's own
    parameter order (per layer and direction: weight_ih (G*H, I), weight_hh (G*H, P or H),
    bias_ih (G*H,), bias_hh (G*H,), then weight_hr (P, H) with proj_size).
    Raises ModelLoadError when they do not fit, naming the layer ``name`` (default: its
    class), prefixed with ``where`` and ending in ``advice``.
    """
    config = dict(hyper)
    if isinstance(what, LayerType):
        layer = what
    elif isinstance(what, str):
        layer = BY_NAME[what]
    else:
        op = ATEN_OPS[what]
        layer = op.layer
        if op.nonlinearity:
            config["nonlinearity"] = op.nonlinearity
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer etc.
        module = layer.cls(**{k: v for k, v in config.items() if k in layer.hyper}).eval()
    own = dict(module.named_parameters())
    if isinstance(weights, Mapping):
        names, tensors = list(weights), list(weights.values())
    else:
        names, tensors = list(own), list(weights)
    if (len(names) != len(tensors) or set(names) != set(own)
            or any(own[n].shape != t.shape for n, t in zip(names, tensors))):
        got = [tuple(t.shape) for t in tensors]
        want = [tuple(p.shape) for p in own.values()]
        label = f"{where}: " if where else ""
        raise ModelLoadError(
            f"{label}the weights of {name or layer.name} "
            f"do not fit its hyper-parameters (found {got[:4]}..., expected {want[:4]}...); {advice}"
        )
    with torch.no_grad():
        for n, t in zip(names, tensors):
            own[n].copy_(t.detach().to(torch.float32) if t.is_floating_point() else t)
    return module


# ---------------------------------------------------------------------------
# Weights in ONNX's layout
# ---------------------------------------------------------------------------

# Row-block permutation from PyTorch's gate order to ONNX's.
_GATE_ORDER = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}


@dataclass(frozen=True)
class LayerWeights:
    """One layer, all directions, ONNX layout (float32 numpy).

    W: (D, G*H, I); R: (D, G*H, H); B: (D, 2*G*H) or None when the layer has no bias.
    With ``proj_size`` P: ``proj`` (D, H, P) maps the raw hidden h (…, H) to PyTorch's
    h (…, P) by right-multiplication, and ``unproj`` (D, P, H) maps a given h back to a
    raw h that ``proj`` sends to it (the pseudo-inverse; exact while W_hr has full rank).
    """

    W: np.ndarray
    R: np.ndarray
    B: np.ndarray | None
    proj: np.ndarray | None = None
    unproj: np.ndarray | None = None


def _reorder(t: torch.Tensor, kind: str) -> torch.Tensor:
    blocks = t.chunk(len(_GATE_ORDER[kind]), dim=0)
    return torch.cat([blocks[i] for i in _GATE_ORDER[kind]], dim=0)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def _direction(module: nn.Module, kind: str, suffix: str):
    """(W, R, B, proj) for one layer/direction given its parameter-name suffix."""
    w_ih = getattr(module, f"weight_ih{suffix}")
    w_hh = getattr(module, f"weight_hh{suffix}")
    w_hr = getattr(module, f"weight_hr{suffix}", None)
    W = _reorder(w_ih, kind)
    R = _reorder(w_hh, kind)
    if w_hr is not None:
        # PyTorch feeds back h = W_hr @ h_raw, so R acts on h_raw through R @ W_hr.
        R = R @ w_hr
    bias = getattr(module, f"bias_ih{suffix}", None)
    if bias is not None:
        b_hh = getattr(module, f"bias_hh{suffix}")
        bias = torch.cat([_reorder(bias, kind), _reorder(b_hh, kind)])
    return W, R, bias, w_hr


def layer_weights(module: nn.Module, layer: int | None = None) -> LayerWeights:
    """ONNX-layout weights of ``layer`` of an nn.RNN/LSTM/GRU, or of a cell (layer None)."""
    kind = kind_of(module)
    with torch.no_grad():
        if layer is None:
            parts = [_direction(module, kind, "")]
        else:
            dirs = 2 if module.bidirectional else 1
            parts = [
                _direction(module, kind, f"_l{layer}" + ("_reverse" if d else ""))
                for d in range(dirs)
            ]
        W = np.stack([_np(p[0]) for p in parts])
        R = np.stack([_np(p[1]) for p in parts])
        B = None if parts[0][2] is None else np.stack([_np(p[2]) for p in parts])
        proj = unproj = None
        if parts[0][3] is not None:
            w_hr = [p[3].to(torch.float64) for p in parts]  # (P, H) per direction
            proj = np.stack([_np(w.T) for w in w_hr])
            unproj = np.stack([_np(torch.linalg.pinv(w).T) for w in w_hr])
    return LayerWeights(W=W, R=R, B=B, proj=proj, unproj=unproj)

