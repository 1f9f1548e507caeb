"""PyTorch recurrent weights in ONNX's layout.

ONNX orders gates differently: LSTM is i,o,f,c where PyTorch is i,f,g,o; GRU is z,r,h
where PyTorch is r,z,n. Every tensor here is stacked over directions, as the ONNX
RNN/LSTM/GRU ops want: W (D, G*H, I), R (D, G*H, H), B (D, 2*G*H).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: PyTorch's recurrent modules: multi-step layers and their single-step cells.
STACKS = (nn.RNN, nn.LSTM, nn.GRU)
CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)

# Row-block permutation from PyTorch's gate order to ONNX's.
_GATE_ORDER = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}


def kind_of(module: nn.Module) -> str:
    """'LSTM', 'GRU' or 'RNN' for a layer or its cell."""
    for kind, layer, cell in (
        ("LSTM", nn.LSTM, nn.LSTMCell),
        ("GRU", nn.GRU, nn.GRUCell),
        ("RNN", nn.RNN, nn.RNNCell),
    ):
        if isinstance(module, (layer, cell)):
            return kind
    raise TypeError(f"not a recurrent layer: {type(module).__name__}")


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
